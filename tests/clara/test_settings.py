"""The one configuration system: a settings dataclass -> checked loading, flags, --config files."""

from __future__ import annotations

import argparse
import io
from dataclasses import dataclass, field, fields
from typing import Literal

import pytest
import yaml

from clara import settings
from clara.config import ClaraConfig, ConfigError, LoraSettings


@dataclass
class _Inner:
    #: Rank.
    r: int = 4


@dataclass
class _Job:
    """A settings class as the jobs write them."""

    #: Where the records are.
    data: list[str]
    #: Learning rate.
    lr: float = 1e-3
    mode: Literal["fast", "exact"] = "fast"  # how to search
    #: Print more.
    verbose: bool = False
    steps: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    inner: _Inner = field(default_factory=_Inner)
    #: Not on the command line.
    secret: str = field(default="s", metadata={"cli": False})

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    settings.add_config_flags(p)
    settings.add_flags(p, _Job, required=("data",))
    return p


def test_field_docs_come_from_the_comments():
    docs = settings.field_docs(_Job)
    assert docs["data"] == "Where the records are."
    assert docs["mode"] == "how to search"  # a trailing comment
    assert "steps" not in docs


def test_load_coerces_yaml_text_and_names_every_bad_field():
    job = settings.load(_Job, {"data": ["a"], "lr": "2e-4", "inner": {"r": "8"}})
    assert job.lr == 2e-4 and job.inner == _Inner(r=8)
    with pytest.raises(ConfigError, match=r"f\.yaml: unknown field\(s\) colour, inner\.rank"):
        settings.load(_Job, {"data": ["a"], "colour": 1, "inner": {"rank": 2}}, source="f.yaml")
    with pytest.raises(ConfigError) as e:
        settings.load(_Job, {"data": ["a"], "mode": "slow", "inner": {"r": "x"}})
    assert "mode: input should be 'fast' or 'exact', got 'slow'" in str(e.value) and "inner.r:" in str(e.value)
    with pytest.raises(ConfigError, match=r"data: required"):
        settings.load(_Job, {})
    with pytest.raises(ConfigError, match=r"^lr: must be > 0, got -1"):  # the class's own check
        settings.load(_Job, {"data": ["a"], "lr": -1})


def test_flags_are_derived_and_the_command_line_wins_over_the_file(tmp_path):
    p = _parser()
    text = p.format_help()
    for flag in ("--data", "--lr", "--mode {fast,exact}", "--verbose, --no-verbose", "--steps", "--env KEY=VALUE"):
        assert flag in text
    assert "--secret" not in text and "--inner" not in text
    assert "Learning rate. (default: 0.001)" in " ".join(text.split())

    cfg = tmp_path / "job.yaml"
    cfg.write_text("data: [x.jsonl]\nlr: 5e-4\nmode: exact\nenv: {A: a}\ninner: {r: 16}\n")
    job = settings.from_args(_Job, p.parse_args(["--config", str(cfg), "--lr", "0.1", "--env", "B=2"]),
                             required=("data",))
    assert job == _Job(data=["x.jsonl"], lr=0.1, mode="exact", env={"A": "a", "B": "2"}, inner=_Inner(16))
    job = settings.from_args(_Job, p.parse_args(["--data", "a,b", "c", "--verbose"]), required=("data",))
    assert job.data == ["a", "b", "c"] and job.verbose and job.lr == 1e-3
    with pytest.raises(ConfigError, match="--data: required"):
        settings.from_args(_Job, p.parse_args(["--lr", "1"]), required=("data",))
    with pytest.raises(ConfigError, match="job.yaml: lr: must be > 0"):
        settings.from_args(_Job, p.parse_args(["--config", str(cfg), "--lr", "-2"]), required=("data",))


def test_print_config_reads_back_to_the_same_settings(tmp_path):
    job = _Job(data=["a"], lr=0.5, env={"K": "v"}, inner=_Inner(2))
    out = io.StringIO()
    settings.print_config(job, out)
    path = tmp_path / "printed.yaml"
    path.write_text(out.getvalue())
    assert settings.load(_Job, settings.read_file(path)) == job


def _jobs():
    from pipelines import cli, demo, evaluate, index, synth, train

    def sub(name):
        parser = cli.build_parser()
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return action.choices[name]

    return [(synth.SynthSettings, synth.build_parser()), (index.IndexSettings, index.build_parser()),
            (train.TrainJobConfig, train.build_parser()), (evaluate.EvaluateJobSettings, evaluate.build_parser()),
            (demo.DemoSettings, demo.build_parser()), (cli.QuickstartSettings, sub("quickstart"))]


def test_every_job_setting_is_a_documented_flag_and_a_config_field():
    """The CLI of each job is derived from its settings class: nothing is written twice."""
    for cls, parser in _jobs():
        by_dest = {a.dest: a for a in parser._actions}
        assert "config" in by_dest and "print_config" in by_dest, cls.__name__
        for f in fields(cls):
            nested = settings._strip_optional(settings._hints(cls)[f.name])[0]
            names = ([f"{f.name}.{g.name}" for g in fields(nested)] if f.metadata.get("flatten")
                     else [f.name])
            for name in names:
                assert name in by_dest, f"{cls.__name__}.{name} has no flag"
                assert by_dest[name].help and len(by_dest[name].help) > 12, f"{cls.__name__}.{name}: no help"


def test_clara_config_is_loaded_by_the_same_system():
    cfg = ClaraConfig.from_dict({"base_model": "b", "compression_rate": "4", "lora": {"r": 8}})
    assert cfg.compression_rate == 4 and cfg.lora == LoraSettings(r=8)
    with pytest.raises(ConfigError, match="unknown field.*lora.rank"):
        ClaraConfig.from_dict({"base_model": "b", "lora": {"rank": 8}})
    assert yaml.safe_load(yaml.safe_dump(settings.dump(cfg))) == cfg.to_dict()


def test_runtime_choices_are_marked_once_and_left_out_of_the_model_identity():
    from clara.config import BEHAVIOUR_FIELDS, RUNTIME_FIELDS
    from pipelines.train import INIT_OVERRIDES

    assert set(RUNTIME_FIELDS) == {"device", "dtype", "top_k", "topk_temperature", "mse_weight", "content_weight",
                                 "max_new_tokens"}
    assert INIT_OVERRIDES == BEHAVIOUR_FIELDS == tuple(n for n in RUNTIME_FIELDS if n not in ("device", "dtype"))
    a = ClaraConfig(base_model="b", compression_rate=4, top_k=2, device="cpu")
    b = ClaraConfig(base_model="b", compression_rate=4, top_k=9, dtype="float32", max_new_tokens=3)
    assert a.model_dict() == b.model_dict() and "top_k" not in a.model_dict()
    assert ClaraConfig(base_model="b", compression_rate=8).model_dict() != a.model_dict()
