"""A tiny causal LM built locally from nothing: a byte-level BPE tokenizer trained on the given
texts and a Llama-style model with random weights.

No download, no model hub: tests and the demo run on it. The saved directory loads back with
``AutoTokenizer.from_pretrained`` and ``AutoModelForCausalLM.from_pretrained`` like any other
checkpoint, so every code path that takes "a model directory" can be exercised with it.

Special tokens have fixed ids: ``<pad>`` = 0, ``<s>`` = 1 (bos), ``</s>`` = 2 (eos), ``<unk>`` = 3.
The tokenizer never adds bos/eos on its own; callers add them where the prompt format wants them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
_N_BYTES = 256  # the byte-level alphabet is always in the vocabulary


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, model_max_length: int = 2048):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    The vocabulary holds the four special tokens (ids 0..3), the 256 byte symbols and up to
    ``vocab_size`` tokens in all (fewer when the texts do not support that many merges). Any text
    encodes (no unknown bytes) and decodes back to itself.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(SPECIAL_TOKENS) + _N_BYTES:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + _N_BYTES}, got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((t for t in texts if t), trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:  # guaranteed by the trainer; checked because ids are part of the contract
            raise RuntimeError(f"special token {name!r} got id {tok.token_to_id(name)}, expected {i}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
        truncation_side="right",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


@dataclass
class TinyModelSpec:
    """Shape of the tiny model. ``vocab_size`` is an upper bound: the model's vocabulary is the
    trained tokenizer's size, which equals it when the texts are varied enough."""

    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 1024
    seed: int = 0
    architecture: str = "llama"  # llama | mistral

    def __post_init__(self):
        if self.architecture not in ("llama", "mistral"):
            raise ValueError(f"architecture must be 'llama' or 'mistral', got {self.architecture!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")


def tiny_config(spec: TinyModelSpec, vocab_size: int | None = None):
    """The ``transformers`` config for ``spec`` (Llama or Mistral), untied embeddings."""
    from transformers import LlamaConfig, MistralConfig

    cls = LlamaConfig if spec.architecture == "llama" else MistralConfig
    return cls(
        vocab_size=vocab_size if vocab_size is not None else spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )


def build_tiny_model(out_dir: str | Path, texts: Iterable[str], spec: TinyModelSpec | None = None) -> Path:
    """Train a tokenizer on ``texts``, build a randomly initialised model, save both to ``out_dir``.

    Deterministic: the same texts and ``spec`` give the same tokenizer and the same weights. The
    caller's global torch RNG state is left as it was.
    """
    import torch
    from transformers import LlamaForCausalLM, MistralForCausalLM

    spec = spec or TinyModelSpec()
    out = Path(out_dir)
    tokenizer = train_tokenizer(texts, vocab_size=spec.vocab_size, model_max_length=spec.max_position_embeddings)
    config = tiny_config(spec, vocab_size=len(tokenizer))
    model_cls = LlamaForCausalLM if spec.architecture == "llama" else MistralForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = model_cls(config)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
