"""The commands the documentation gives are commands the code accepts.

Every ``clara ...``, ``python -m pipelines|serve|clara ...`` and ``python benchmarks/X.py ...`` line in a fenced or
indented code block of the README, the experiment log, the cluster README and the model cards, and every such
inline command in their prose, is parsed by the parser it reaches, and stopped there: nothing runs. A renamed or
removed flag fails here instead of in a user's terminal. Sketches with placeholders (``...``, ``<x>``, ``[--flag
N]``, an upper-case word such as ``URI``) and table cells are skipped.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import shlex
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "benchmarks/EXPERIMENTS.md", "cluster/README.md",
        *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "clara/pretrained").glob("*/MODEL_CARD.md"))]
STARTS = ("python benchmarks/", "python -m pipelines", "python -m serve", "python -m clara", "clara ")
SHELL_STOPS = {"|", ">", ">>", "&&", ";", "&", "2>&1"}


def documented_commands(text: str) -> list[str]:
    """The project's commands in a Markdown text, each on one line (backslash continuations joined)."""
    found = []
    for m in re.finditer(r"```[a-z]*\n(.*?)```", text, re.S):
        found += re.sub(r"\\\n\s*", " ", m.group(1)).splitlines()
    for m in re.finditer(r"^    (\S(?:.*\\\n)*.*)", text, re.M):  # indented code blocks
        found.append(re.sub(r"\\\n\s*", " ", m.group(1)))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    prose = "\n".join(line for line in prose.splitlines() if not line.lstrip().startswith("|"))
    found += [m.group(1) for m in re.finditer(r"`([^`]+)`", prose)]
    out = []
    for c in (" ".join(c.split()) for c in found):
        c = re.sub(r"^(\w+=\S+\s+)+", "", c)  # VAR=value prefixes
        if not c.startswith(STARTS) or any(s in c for s in ("...", "<", "[")):
            continue
        if any(re.fullmatch(r"[A-Z_]+", w) for w in c.split()):
            continue
        out.append(c)
    return out


class _Parsed(Exception):
    pass


def parse_only(command: str) -> str | None:
    """Parse ``command`` with the parser its entry point builds, stopping right after: None if it parses, else
    what argparse said."""
    words = []
    for w in shlex.split(command, comments=True):
        if w in SHELL_STOPS:
            break
        words.append(w)
    if words[0] == "clara":
        from pipelines.cli import main
        argv = words[1:]
    elif words[:2] == ["python", "-m"]:
        main, argv = importlib.import_module(words[2]).main, words[3:]
    else:
        if str(ROOT / "benchmarks") not in sys.path:
            sys.path.insert(0, str(ROOT / "benchmarks"))
        main, argv = importlib.import_module(Path(words[1]).stem).main, words[2:]
    real = argparse.ArgumentParser.parse_args

    def stop_after_parsing(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop_after_parsing), \
            mock.patch.object(sys, "argv", [words[0], *argv]):
        try:
            main(argv) if inspect.signature(main).parameters else main()
        except _Parsed:
            return None
        except SystemExit as e:
            return f"argparse exited with status {e.code}"
    raise AssertionError(f"{command!r} returned without parsing its arguments: it ran")


COMMANDS = [(doc, c) for doc in DOCS for c in documented_commands((ROOT / doc).read_text())]


def test_the_docs_give_commands_to_check():
    docs = {doc for doc, _ in COMMANDS}
    assert len(COMMANDS) >= 30 and {"README.md", "cluster/README.md"} <= docs, COMMANDS
    assert any("MODEL_CARD" in d and "memory_probe.py --init" in c for d, c in COMMANDS)


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_a_documented_command_parses(doc, command, capsys):
    said = parse_only(command)
    assert said is None, f"{doc}: `{command}`: {said}\n{capsys.readouterr().err}"


def test_a_wrong_flag_is_caught(capsys):
    assert parse_only("python benchmarks/memory_probe.py --steps 10 --no-such-flag") is not None
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    assert parse_only("clara export a-model out-dir --dtype int3") is not None
    assert parse_only("clara export a-model out-dir --dtype float32") is None
