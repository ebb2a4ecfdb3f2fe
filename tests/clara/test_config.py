import pytest
import torch

from clara.config import ClaraConfig, ConfigError, LoraSettings, resolve_dtype


@pytest.mark.parametrize("rate,n_mem", [(1, 256), (4, 64), (16, 16), (32, 8), (128, 2), (256, 1)])
def test_n_mem_is_doc_max_tokens_over_rate(rate, n_mem):
    assert ClaraConfig(base_model="m", compression_rate=rate, doc_max_tokens=256).n_mem == n_mem


@pytest.mark.parametrize("field,value", [("compression_rate", 0), ("compression_rate", 512), ("doc_max_tokens", -1),
                                         ("top_k", 1.5), ("topk_temperature", 0), ("dtype", "fp8"), ("base_model", ""),
                                         ("content_weight", 0), ("content_weight", True)])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        ClaraConfig(**{"base_model": "m", field: value})


def test_round_trip_and_unknown_fields(tmp_path):
    cfg = ClaraConfig(base_model="m", compression_rate=8, lora=LoraSettings(r=4, alpha=8))
    cfg.save(tmp_path / "c.json")
    assert ClaraConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(ConfigError, match="unknown field.*compresion_rate"):
        ClaraConfig.from_dict({"base_model": "m", "compresion_rate": 8})
    with pytest.raises(ConfigError, match="lora.r"):
        ClaraConfig.from_dict({"base_model": "m", "lora": {"r": 0}})


def test_dtype_follows_device():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


def test_frozen_base_runs_bf16_only_on_cpus_with_native_bf16(monkeypatch):
    from clara import config as config_module

    cpu = torch.device("cpu")
    monkeypatch.setattr(config_module, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", cpu, frozen_base=True) == torch.bfloat16
    assert resolve_dtype("auto", cpu, frozen_base=False) == torch.float32  # a trained base keeps fp32 weights
    assert ClaraConfig(base_model="m", train_base=True).resolve_dtype(cpu) == torch.float32
    assert ClaraConfig(base_model="m").resolve_dtype(cpu) == torch.bfloat16
    monkeypatch.setattr(config_module, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", cpu, frozen_base=True) == torch.float32
    assert config_module.autocast_dtype("auto", cpu) is None
    assert config_module.autocast_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ConfigError, match="autocast"):
        config_module.autocast_dtype("fp8", cpu)


def test_memory_norm_is_validated():
    assert ClaraConfig(base_model="m").memory_norm == "center"
    with pytest.raises(ConfigError, match="memory_norm"):
        ClaraConfig(base_model="m", memory_norm="whiten")
