import json

import pytest
import torch

from clara.checkpoint import CheckpointError, read_manifest
from clara.model import ClaraModel


def _randomise_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.peft.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def chunk(scp_records):
    return scp_records[0].chunks[0]


@pytest.mark.parametrize("train_base", [False, True])
def test_save_then_load_gives_identical_outputs(make_model, tmp_path, chunk, train_base):
    model = make_model(train_base=train_base)
    _randomise_adapters(model)
    if train_base:
        with torch.no_grad():
            model.input_embeddings.weight.add_(0.01)  # a trained base must travel with the checkpoint
    path = model.save_pretrained(tmp_path / "m")
    assert read_manifest(path)["base"] == ("included" if train_base else "reference")
    loaded = ClaraModel.from_pretrained(path)
    assert loaded.compressor_version() == model.compressor_version()
    memory = model.compress([chunk])
    assert torch.equal(loaded.compress([chunk]), memory)
    assert torch.equal(loaded.encode_query(["Who?"]), model.encode_query(["Who?"]))
    question = ["Who is the editor?"]
    assert loaded.generate(question, memory.unsqueeze(1), max_new_tokens=8) == model.generate(
        question, memory.unsqueeze(1), max_new_tokens=8)


@pytest.mark.parametrize("train_base", [False, True])
def test_the_directory_loads_with_plain_transformers_and_peft(make_model, tiny_base, tmp_path, train_base):
    """Each adapter folder is PEFT's, the base (when trained) Hugging Face's: loaded without this
    package, the generator and the compressor give the same logits as ClaraModel's on the same input
    embeddings."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = make_model(train_base=train_base)
    _randomise_adapters(model)
    if train_base:
        with torch.no_grad():
            model.input_embeddings.weight.add_(0.01)
            next(p for n, p in model.peft.named_parameters() if "mlp" in n and "lora_" not in n).mul_(1.1)
    path = model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (path / "adapters").iterdir()) == ["compressor", "generator", "query_reasoner"]
    cfg = json.loads((path / "adapters" / "generator" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == model.config.lora.r
    lm = AutoModelForCausalLM.from_pretrained(path / "base" if train_base else tiny_base, dtype=torch.float32)
    plain = PeftModel.from_pretrained(lm, path / "adapters" / "generator", adapter_name="generator")
    plain.load_adapter(path / "adapters" / "compressor", adapter_name="compressor")
    plain.eval()
    model.eval()
    embeds = torch.randn(2, 11, model.hidden_size, generator=torch.Generator().manual_seed(3)) * 0.05
    for name in ("generator", "compressor"):
        plain.set_adapter(name)
        with torch.no_grad(), model.adapter(name):
            want = model.peft(inputs_embeds=embeds).logits
            got = plain(inputs_embeds=embeds).logits
        assert torch.allclose(got, want, atol=1e-5), (name, (got - want).abs().max())


def test_the_format_1_layout_still_loads(make_model, tmp_path, chunk):
    """Directories written before the PEFT layout (one adapters.safetensors, format 1) load as before."""
    from safetensors.torch import load_file, save_file

    model = make_model()
    _randomise_adapters(model)
    path = model.save_pretrained(tmp_path / "m")
    manifest = json.loads((path / "clara.json").read_text())
    flat = {}
    for a in manifest["adapters"]:
        weights = load_file(str(path / "adapters" / a / "adapter_model.safetensors"))
        flat.update({f"{a}.{k}": v for k, v in weights.items()})
    save_file(flat, str(path / "adapters.safetensors"))
    import shutil

    shutil.rmtree(path / "adapters")
    (path / "clara.json").write_text(json.dumps({**manifest, "format": 1}))
    loaded = ClaraModel.from_pretrained(path)
    assert torch.equal(loaded.compress([chunk]), model.compress([chunk]))
    (path / "clara.json").write_text(json.dumps({**manifest, "format": 7}))
    with pytest.raises(CheckpointError, match="unsupported format 7"):
        ClaraModel.from_pretrained(path)


def test_compressor_version_tracks_the_compressor_only(make_model):
    model = make_model()
    v = model.compressor_version()
    with torch.no_grad():
        next(p for n, p in model.peft.named_parameters() if ".generator." in n).add_(1.0)
    assert model.compressor_version() == v
    with torch.no_grad():
        next(p for n, p in model.peft.named_parameters() if ".compressor." in n).add_(1.0)
    assert model.compressor_version() != v


def test_corrupt_directory_is_a_clear_error(make_model, tmp_path):
    with pytest.raises(CheckpointError, match="clara.json is missing"):
        ClaraModel.from_pretrained(tmp_path)
    path = make_model().save_pretrained(tmp_path / "m")
    manifest = json.loads((path / "clara.json").read_text())
    manifest["compressor_version"] = "0000"
    (path / "clara.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="inconsistent"):
        ClaraModel.from_pretrained(path)


def test_apple_layout_imports(make_model, tiny_base, tmp_path, chunk):
    """Write a checkpoint in apple/ml-clara's layout from a known model, import it, compare."""
    from peft import get_peft_model_state_dict

    # Apple's layout carries raw memory states (memory_norm "none")
    source = make_model(compression_rate=4, doc_max_tokens=64, lora={"r": 4, "alpha": 8, "dropout": 0.1},
                        memory_norm="none")
    _randomise_adapters(source, seed=3)
    out = tmp_path / "apple"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({
        "model_type": "CLaRa", "decoder_model_name": str(tiny_base), "compr_rate": 4, "doc_max_length": 64,
        "lora": True, "lora_r": 4, "generation_top_k": 5, "training_stage": "stage2"}))
    names = {"compressor": "encoder_adapter", "generator": "decoder_adapter"}  # no query reasoner released
    torch.save({ref: get_peft_model_state_dict(source.peft, adapter_name=ours) for ours, ref in names.items()},
               out / "adapters.pth")
    emb = source.input_embeddings.weight.detach()
    extra = torch.randn(3, emb.shape[1])  # <AE>, <ENC>, <SEP>
    vocab_ext = torch.cat([emb, source.memory_embeddings.detach(), extra])
    head = source.base_model.get_output_embeddings().weight.detach()
    torch.save({"model.embed_tokens.weight": vocab_ext,
                "lm_head.weight": torch.cat([head, torch.randn(source.config.n_mem + 3, emb.shape[1])])},
               out / "decoder_first_last_layers.pth")

    imported = ClaraModel.from_apple(out, device="cpu", dtype="float32")
    assert imported.config.n_mem == 16 and imported.config.lora.r == 4
    assert torch.equal(imported.memory_embeddings, source.memory_embeddings)
    assert torch.equal(imported.compress([chunk]), source.compress([chunk]))
    # the query reasoner starts as a copy of the compressor, as in the paper
    assert torch.equal(imported.encode_query(["Who founded Flip?"]), source.compress(["Who founded Flip?"]))
    question, memory = ["Who?"], source.compress([chunk]).unsqueeze(1)
    assert imported.generate(question, memory, max_new_tokens=6) == source.generate(question, memory,
                                                                                      max_new_tokens=6)
    # and it saves in our layout
    assert ClaraModel.from_pretrained(imported.save_pretrained(tmp_path / "ours")).compressor_version() == \
        imported.compressor_version()


def test_apple_layout_mismatch_is_a_clear_error(tiny_base, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"decoder_model_name": str(tiny_base), "compr_rate": 4,
                                                      "doc_max_length": 64, "lora_r": 4}))
    torch.save({"encoder_adapter": {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                                    torch.zeros(4, 128)}, "decoder_adapter": {}}, tmp_path / "adapters.pth")
    with pytest.raises(CheckpointError, match="encoder_adapter.*does not fit"):
        ClaraModel.from_apple(tmp_path, device="cpu")


def test_loads_in_bf16_with_the_same_compressor_version(make_model, tmp_path, chunk):
    model = make_model()
    _randomise_adapters(model)
    path = model.save_pretrained(tmp_path / "m")
    manifest = json.loads((path / "clara.json").read_text())
    manifest["config"]["dtype"] = "bfloat16"  # as on a GPU: weights held in bf16
    (path / "clara.json").write_text(json.dumps(manifest))
    loaded = ClaraModel.from_pretrained(path)
    assert loaded.input_embeddings.weight.dtype == torch.bfloat16
    assert loaded.memory_embeddings.dtype == torch.float32  # trained parameters keep fp32 master weights
    assert loaded.compressor_version() == model.compressor_version()
    cos = torch.nn.functional.cosine_similarity(loaded.compress([chunk]).float().flatten(),
                                                model.compress([chunk]).flatten(), dim=0)
    assert cos > 0.99


def test_compact_export_keeps_the_compressor_and_ships_by_name(make_model, tmp_path, chunk, monkeypatch, capsys):
    """``clara export``: chosen adapters in bf16, no tokenizer; loads by path or as a packaged name."""
    from clara import bases
    from pipelines.cli import main

    model = make_model()
    _randomise_adapters(model)
    full = model.save_pretrained(tmp_path / "full")
    assert main(["export", str(full), str(tmp_path / "pkg" / "tiny-compressor")]) == 0
    compact = tmp_path / "pkg" / "tiny-compressor"
    assert "MiB" in capsys.readouterr().out
    manifest = read_manifest(compact)
    assert manifest["adapters"] == ["compressor", "generator"] and not (compact / "tokenizer").exists()
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*.safetensors"))  # noqa: E731
    assert size(compact) < 0.4 * size(full)  # two of three adapters, half the bytes each

    loaded = ClaraModel.from_pretrained(compact)
    assert loaded.compressor_version() == model.compressor_version()  # the version is taken on bf16 weights
    ref, got = model.compress([chunk]), loaded.compress([chunk])
    assert torch.allclose(got, ref, atol=0.05 * float(ref.abs().max())) and not torch.equal(got, ref)
    from clara.checkpoint import _lora_state

    # The query reasoner was left out: it starts as a fresh adapter does (LoRA B = 0: the identity).
    q = _lora_state(loaded, "query_reasoner")
    assert q and all(not v.any() for k, v in q.items() if "lora_B" in k)
    assert any(v.any() for k, v in _lora_state(model, "query_reasoner").items() if "lora_B" in k)

    monkeypatch.setattr(bases, "PRETRAINED_DIR", tmp_path / "pkg")
    monkeypatch.chdir(tmp_path)
    assert bases.pretrained_names() == ["tiny-compressor"]
    assert ClaraModel.from_pretrained("tiny-compressor").compressor_version() == model.compressor_version()
    with pytest.raises(CheckpointError, match="not a CLaRa model directory"):
        read_manifest("no-such-model")
    assert main(["export", str(full), str(tmp_path / "x"), "--adapters", "decoder"]) == 2
    assert "subset" in capsys.readouterr().err
