"""CLaRa model directories: save, load, and import Apple's released checkpoint layout.

Layout of a directory written by :func:`save_model` (format 2), in the ecosystem's own formats::

    clara.json                    {"format": 2, "config": {...}, "compressor_version": "...",
                                   "base": "reference" | "included", "adapters": [...]}
    adapters/<name>/              one PEFT LoRA adapter per folder (compressor, generator,
                                  query_reasoner): adapter_config.json + adapter_model.safetensors,
                                  what ``PeftModel.from_pretrained(base, folder)`` loads
    memory_embeddings.safetensors "memory_embeddings" [n_mem, d], and the memory normalisation
                                  ("memory_center" [n_mem, d], "memory_scale" [1])
    tokenizer/                    the tokenizer (optional for a referenced base: then the base's)
    base/                         only when the base weights were trained (config.train_base): the
                                  base in Hugging Face's layout (config.json + model.safetensors),
                                  what ``AutoModelForCausalLM.from_pretrained(folder)`` loads

So the generator is usable without this package::

    base = AutoModelForCausalLM.from_pretrained(<base_model, or the directory's base/>)
    generator = PeftModel.from_pretrained(base, "<dir>/adapters/generator")
    # then feed inputs_embeds with the memory vectors in place of the <MEM> tokens

A frozen base is referenced by ``config.base_model`` (a hub name or a path), not copied. Format 1
(all adapters in one ``adapters.safetensors`` under ``<adapter>.<peft key>``, the base as
``base/base.safetensors`` with PEFT-wrapped key names) is still read.
A compact export (:func:`save_model` with ``adapters=`` a subset, ``storage_dtype=torch.bfloat16``,
``tokenizer=False``; ``clara export``) keeps only what a later stage starts from; the manifest
lists the adapters it holds and the others start fresh on load. Such a directory can be shipped
inside the package and loaded by name (:func:`clara.bases.resolve_model_dir`).
Writes are atomic: a temporary directory renamed into place, so a crash never leaves half a model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from clara.bases import resolve_base, resolve_model_dir
from clara.config import ADAPTERS, ClaraConfig, LoraSettings

FORMAT = 2
READS = (1, 2)
MANIFEST = "clara.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's file names
ADAPTER_CONFIG = "adapter_config.json"


class CheckpointError(ValueError):
    """A model directory is missing files or does not match its manifest."""


def _lora_state(model, adapter: str) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model.peft, adapter_name=adapter)


def _base_state(model) -> dict[str, torch.Tensor]:
    """The base's weights under Hugging Face's own names (the LoRA wrappers' ``base_layer`` folded away),
    each shared tensor once (tied embeddings: the input embedding's name is kept)."""
    state, seen = {}, set()
    for k, v in model.peft.base_model.model.state_dict().items():
        if "lora_" in k:
            continue
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        state[k.replace(".base_layer.", ".")] = v.detach().contiguous().cpu()
    return state


def _write_adapter(model, adapter: str, folder: Path, cast) -> None:
    """One adapter as PEFT writes it: ``adapter_config.json`` (PEFT's own serialisation, the base named
    as the config names it) and ``adapter_model.safetensors`` (PEFT's key names)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    cfg = model.peft.peft_config[adapter]
    saved_name, saved_mode = cfg.base_model_name_or_path, cfg.inference_mode
    try:
        cfg.base_model_name_or_path, cfg.inference_mode = model.config.base_model, True
        cfg.save_pretrained(str(folder))
    finally:
        cfg.base_model_name_or_path, cfg.inference_mode = saved_name, saved_mode
    save_file({k: cast(v) for k, v in _lora_state(model, adapter).items()}, str(folder / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})


def save_model(model, path: str | Path, *, adapters: tuple[str, ...] | list[str] = ADAPTERS,
               storage_dtype: torch.dtype | None = None, tokenizer: bool = True) -> Path:
    """Save ``model`` (a :class:`~clara.model.ClaraModel`) to directory ``path``, atomically.

    ``adapters``: the adapters to keep (default all three); ``storage_dtype``: cast the saved
    adapter and memory tensors (``torch.bfloat16`` halves the size; the compressor version is
    computed on bf16-rounded weights, so it is unchanged); ``tokenizer=False`` leaves the tokenizer
    out (allowed for a referenced base, which has it).
    """
    from safetensors.torch import save_file

    bad = sorted(set(adapters) - set(ADAPTERS))
    if bad or not adapters:
        raise ValueError(f"adapters must be a non-empty subset of {ADAPTERS}, got {list(adapters)}")
    if not tokenizer and model.config.train_base:
        raise ValueError("tokenizer=False needs a referenced base (config.train_base is set: the base is included)")

    def cast(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().contiguous().cpu()
        return t.to(storage_dtype) if storage_dtype is not None and t.is_floating_point() else t

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        for a in adapters:
            _write_adapter(model, a, tmp / "adapters" / a, cast)
        save_file({"memory_embeddings": cast(model.memory_embeddings),
                   "memory_center": cast(model.memory_center),
                   "memory_scale": cast(model.memory_scale.reshape(1))},
                  str(tmp / "memory_embeddings.safetensors"))
        if tokenizer:
            model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        if model.config.train_base:
            (tmp / "base").mkdir()
            lm = model.peft.base_model.model
            lm.config.save_pretrained(str(tmp / "base"))
            if getattr(lm, "generation_config", None) is not None:
                lm.generation_config.save_pretrained(str(tmp / "base"))
            save_file(_base_state(model), str(tmp / "base" / "model.safetensors"), metadata={"format": "pt"})
        manifest = {
            "format": FORMAT,
            "config": model.config.to_dict(),
            "compressor_version": model.compressor_version(),
            "base": "included" if model.config.train_base else "reference",
            "adapters": list(adapters),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_manifest(path: str | Path) -> dict:
    path = resolve_model_dir(path)
    f = path / MANIFEST
    if not f.is_file():
        hint = ""
        if (path / "adapters.pth").exists():
            hint = " (it looks like Apple's CLaRa layout: use ClaraModel.from_apple)"
        raise CheckpointError(f"{path} is not a CLaRa model directory: {MANIFEST} is missing{hint}")
    manifest = json.loads(f.read_text())
    if manifest.get("format") not in READS:
        raise CheckpointError(f"{f}: unsupported format {manifest.get('format')!r} (this version reads "
                              f"{', '.join(map(str, READS))})")
    return manifest


def load_model(model_cls, path: str | Path, device: str | None = None):
    """Load a directory written by :func:`save_model` as a ``model_cls`` (:class:`~clara.model.ClaraModel`,
    whose ``from_pretrained`` calls this). ``device`` overrides the saved setting."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(path)
    manifest = read_manifest(path)
    # Directories written before memory normalisation existed read raw memory states.
    config = ClaraConfig.from_dict({"memory_norm": "none", **manifest["config"]})
    if device is not None:
        config.device = device
    dev = config.resolve_device()
    dtype = config.resolve_dtype(dev)
    if (path / "tokenizer").is_dir():
        tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    elif manifest["base"] == "reference":
        tokenizer = AutoTokenizer.from_pretrained(resolve_base(config.base_model))
    else:
        raise CheckpointError(f"{path}: tokenizer/ is missing")
    old = manifest["format"] == 1
    if manifest["base"] == "included" and not old:  # Hugging Face's layout: transformers reads it
        lm = AutoModelForCausalLM.from_pretrained(str(path / "base"), dtype=dtype)
    elif manifest["base"] == "included":
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path / "base")), dtype=dtype)
    else:
        lm = AutoModelForCausalLM.from_pretrained(resolve_base(config.base_model), dtype=dtype)
    model = model_cls(lm, tokenizer, config)
    if manifest["base"] == "included" and old:
        state = load_file(str(path / "base" / "base.safetensors"))
        missing, unexpected = model.peft.load_state_dict(state, strict=False)
        missing = [k for k in missing if "lora_" not in k and not _is_tied(model, k)]
        if missing or unexpected:
            raise CheckpointError(f"{path}/base: base weights do not match the model "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    # Older directories hold all three adapters; a compact export lists its own (the rest start fresh).
    if old:
        adapters = load_file(str(path / "adapters.safetensors"))
        for a in manifest.get("adapters", ADAPTERS):
            prefix = f"{a}."
            _load_adapter(model, a, {k[len(prefix):]: v for k, v in adapters.items() if k.startswith(prefix)},
                          path)
    else:
        for a in manifest["adapters"]:
            f = path / "adapters" / a / ADAPTER_WEIGHTS
            if not f.is_file():
                raise CheckpointError(f"{path}: adapter {a!r} is listed in {MANIFEST} but {f} is missing")
            _load_adapter(model, a, load_file(str(f)), f)
    mem_state = load_file(str(path / "memory_embeddings.safetensors"))
    mem = mem_state["memory_embeddings"]
    if mem.shape != model.memory_embeddings.shape:
        raise CheckpointError(f"{path}: memory_embeddings {tuple(mem.shape)} do not match n_mem x d "
                              f"{tuple(model.memory_embeddings.shape)}")
    with torch.no_grad():
        model.memory_embeddings.copy_(mem)
        if config.memory_norm != "none":
            if "memory_center" not in mem_state or mem_state["memory_center"].shape != model.memory_center.shape:
                raise CheckpointError(f"{path}: memory_norm is {config.memory_norm!r} but "
                                      f"memory_embeddings.safetensors holds no memory_center of shape "
                                      f"{tuple(model.memory_center.shape)}")
            model.memory_center.copy_(mem_state["memory_center"])
            model.memory_scale.copy_(mem_state["memory_scale"].reshape(()))
            model.memory_center_steps.fill_(1)
    model = model.to(dev)
    version = model.compressor_version()
    if version != manifest["compressor_version"]:
        raise CheckpointError(f"{path}: loaded compressor version {version} differs from the manifest's "
                              f"{manifest['compressor_version']}; the files are inconsistent")
    return model


def _is_tied(model, key: str) -> bool:
    return bool(getattr(model.base_model.config, "tie_word_embeddings", False)) and "lm_head" in key


def _load_adapter(model, adapter: str, state: dict[str, torch.Tensor], where) -> None:
    from peft import set_peft_model_state_dict

    if not state:
        raise CheckpointError(f"{where}: no weights for adapter {adapter!r}")
    expected = set(_lora_state(model, adapter))
    missing, extra = expected - set(state), set(state) - expected
    if missing or extra:
        raise CheckpointError(f"{where}: adapter {adapter!r} does not fit the model "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})")
    current = _lora_state(model, adapter)
    for k, v in state.items():
        if tuple(v.shape) != tuple(current[k].shape):
            raise CheckpointError(f"{where}: adapter {adapter!r} tensor {k} has shape {tuple(v.shape)}, "
                                  f"the model expects {tuple(current[k].shape)}")
    set_peft_model_state_dict(model.peft, state, adapter_name=adapter)


# -- Apple's released layout ------------------------------------------------------------------
APPLE_ADAPTERS = {"encoder_adapter": "compressor", "decoder_adapter": "generator",
                  "query_reasoner_adapter": "query_reasoner"}


def import_apple_checkpoint(model_cls, path: str | Path, base_model: str | None = None, device: str | None = None,
                            dtype: str = "auto"):
    """Load a checkpoint in apple/ml-clara's layout as a ``model_cls`` (:meth:`ClaraModel.from_apple
    <clara.model.ClaraModel.from_apple>` calls this).

    That layout is ``config.json`` (``decoder_model_name``, ``compr_rate``, ``doc_max_length``,
    ``lora_r``), ``adapters.pth`` (``{"encoder_adapter" | "decoder_adapter" |
    "query_reasoner_adapter": {peft key: tensor}}``) and ``decoder_first_last_layers.pth``
    (``model.embed_tokens.weight`` / ``lm_head.weight`` of the vocabulary extended with
    ``<MEM0>..<MEMn-1>`` and three control tokens). The rows of the ``<MEMi>`` tokens become
    :attr:`memory_embeddings`; the base vocabulary's rows replace the base model's.

    The reference wraps prompts in its base model's chat template, this project does not: the
    weights load exactly, but expect to fine-tune briefly (stage 2) before comparing answers.
    ``base_model`` overrides ``decoder_model_name`` (a local copy of the base model); ``dtype`` is
    :attr:`ClaraConfig.dtype` of the imported model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    for name in ("config.json", "adapters.pth"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: {name} is missing; not an Apple CLaRa checkpoint")
    ref = json.loads((path / "config.json").read_text())
    for key in ("compr_rate", "doc_max_length"):
        if key not in ref:
            raise CheckpointError(f"{path}/config.json: field {key!r} is missing")
    r = int(ref.get("lora_r", 16))
    config = ClaraConfig(
        base_model=base_model or ref.get("decoder_model_name") or "",
        compression_rate=int(ref["compr_rate"]),
        doc_max_tokens=int(ref["doc_max_length"]),
        lora=LoraSettings(r=r, alpha=2 * r, dropout=0.1),
        top_k=int(ref.get("generation_top_k", 5)),
        device=device or "auto",
        dtype=dtype,
        memory_norm="none",  # the reference reads raw memory states
    )
    dev = config.resolve_device()
    tokenizer = AutoTokenizer.from_pretrained(resolve_base(config.base_model))
    lm = AutoModelForCausalLM.from_pretrained(resolve_base(config.base_model), dtype=config.resolve_dtype(dev))
    model = model_cls(lm, tokenizer, config)
    adapters = torch.load(path / "adapters.pth", map_location="cpu", weights_only=True)
    if "encoder_adapter" not in adapters or "decoder_adapter" not in adapters:
        raise CheckpointError(f"{path}/adapters.pth: needs 'encoder_adapter' and 'decoder_adapter', "
                              f"found {sorted(adapters)}")
    if "query_reasoner_adapter" not in adapters:  # the paper initialises it from the compressor
        adapters = {**adapters, "query_reasoner_adapter": adapters["encoder_adapter"]}
    want = set(_lora_state(model, "compressor"))
    for ref_name, ours in APPLE_ADAPTERS.items():
        state = {}
        for k, v in adapters[ref_name].items():
            key = k
            while key.startswith("base_model.model."):
                key = key[len("base_model.model."):]
            key = key.replace(f".{ref_name}.", ".").replace(".default.", ".")
            state["base_model.model." + key] = v
        if set(state) != want:
            raise CheckpointError(f"{path}/adapters.pth: {ref_name!r} does not fit {config.base_model} "
                                  f"(e.g. missing {sorted(want - set(state))[:2]}, "
                                  f"unexpected {sorted(set(state) - want)[:2]})")
        _load_adapter(model, ours, state, path / "adapters.pth")
    layers_file = path / "decoder_first_last_layers.pth"
    if layers_file.is_file():
        layers = torch.load(layers_file, map_location="cpu", weights_only=True)
        emb = layers.get("model.embed_tokens.weight")
        if emb is None:
            raise CheckpointError(f"{layers_file}: 'model.embed_tokens.weight' is missing")
        vocab, n_mem = model.input_embeddings.weight.shape[0], config.n_mem
        if emb.shape[0] < vocab + n_mem or emb.shape[1] != model.hidden_size:
            raise CheckpointError(f"{layers_file}: embeddings {tuple(emb.shape)} cannot hold {vocab} base tokens "
                                  f"and {n_mem} memory tokens of width {model.hidden_size}")
        with torch.no_grad():
            model.input_embeddings.weight.copy_(emb[:vocab])
            model.memory_embeddings.copy_(emb[vocab:vocab + n_mem])  # <MEM0>..<MEMn-1>, added first
            head = layers.get("lm_head.weight")
            out = model.base_model.get_output_embeddings()
            if head is not None and out is not None and out.weight is not model.input_embeddings.weight:
                out.weight.copy_(head[:vocab])
    return model.to(dev)
