"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _fp32_on_cpu():
    """Tests compare memories, logits and greedy outputs exactly: ``dtype: auto`` stays fp32 on CPU
    for the whole session (Ray workers started later inherit it). The real-base tests ask for bf16
    explicitly where the processor has it."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CLARA_CPU_BF16", "0")
    yield
    mp.undo()


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """``<repo>/../shared/data``: the real sample data shared by the project's checkouts."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data directory {path} is missing (expected beside the repository)")
    return path


@pytest.fixture(scope="session")
def scp_sample_path(shared_data_dir: Path) -> Path:
    """The 900-chunk stage-1 (SCP) sample, ``scp_sample.jsonl``."""
    path = shared_data_dir / "scp_sample.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="session")
def scp_records(scp_sample_path: Path):
    """The sample's examples (one per QA pair), read and validated once."""
    from clara.data.records import read_records

    return read_records(scp_sample_path, "scp")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, scp_records) -> Path:
    """A tiny random-weight Llama with a tokenizer trained on the sample, saved to a directory."""
    from clara.tiny import TinyModelSpec, build_tiny_model

    texts = [ex.chunks[0] for ex in scp_records] + [ex.question for ex in scp_records] + [
        ex.answer for ex in scp_records]
    spec = TinyModelSpec(vocab_size=4096, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4)
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "base", texts, spec)


@pytest.fixture
def make_model(tiny_base):
    """Build a fresh ClaraModel on the tiny base: ``make_model(compression_rate=4, ...)``."""
    from clara.config import ClaraConfig, LoraSettings
    from clara.model import ClaraModel

    def make(seed: int = 0, **overrides):
        # fp32 pinned: dtype "auto" would hold a frozen base in bf16 on CPUs with native bf16,
        # and these tests compare memories and logits exactly.
        settings = dict(base_model=str(tiny_base), compression_rate=4, doc_max_tokens=64, device="cpu",
                        dtype="float32", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
        settings.update(overrides)
        return ClaraModel.from_base(ClaraConfig(**settings), seed=seed)

    return make


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 logical CPUs, started once per test session (4-6 s, ~460 MB).

    Actors in tests ask for fractional CPUs: two actors at num_cpus=1 plus a read task deadlock
    on 2 CPUs.
    """
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
