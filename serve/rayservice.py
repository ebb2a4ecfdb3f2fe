"""Produce ``cluster/rayservice.yaml``'s ``serveConfigV2`` from ``serve/config.yaml``, one source.

    python -m serve.rayservice            # rewrite serveConfigV2 in cluster/rayservice.yaml
    python -m serve.rayservice --check    # exit 1 (and say so) if the manifest is out of date

The cluster's Serve application is the local one (``serve/config.yaml``) with a site's differences
(``cluster/serve-site.yaml``: proxy location, host, absolute model and index locations, the
generator's GPU) merged in. The code and its dependencies come with the pods' image (the project image,
``cluster/Dockerfile``), so the application needs no runtime environment. Edit those files and run this;
never edit serveConfigV2 by hand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "serve" / "config.yaml"
SITE = ROOT / "cluster" / "serve-site.yaml"
MANIFEST = ROOT / "cluster" / "rayservice.yaml"
_START, _END = "  serveConfigV2: |\n", "  rayClusterConfig:\n"


def merge(base: Any, over: Any) -> Any:
    """``over`` merged into ``base``: mappings key by key, lists of named mappings (applications,
    deployments) by name; anything else is replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base[k], v) if k in base else v
        return out
    named = (isinstance(base, list) and isinstance(over, list)
             and all(isinstance(x, dict) and "name" in x for x in base + over))
    if named:
        out = [dict(x) for x in base]
        index = {x["name"]: i for i, x in enumerate(out)}
        for x in over:
            if x["name"] in index:
                out[index[x["name"]]] = merge(out[index[x["name"]]], x)
            else:
                out.append(x)
        return out
    return over


def serve_config_v2() -> dict[str, Any]:
    """The cluster's Serve config: serve/config.yaml with the site's differences merged in."""
    return merge(yaml.safe_load(SERVE_CONFIG.read_text()), yaml.safe_load(SITE.read_text()))


def render() -> str:
    """The manifest with serveConfigV2 produced anew."""
    text = MANIFEST.read_text()
    if _START not in text or _END not in text:
        raise SystemExit(f"{MANIFEST}: no '{_START.strip()}' ... '{_END.strip()}' block to fill")
    head, rest = text.split(_START, 1)
    _, tail = rest.split(_END, 1)
    body = yaml.safe_dump(serve_config_v2(), sort_keys=False, width=110)
    block = "".join("    " + line + "\n" if line else "\n" for line in body.splitlines())
    note = ("    # Produced by `python -m serve.rayservice` from serve/config.yaml and cluster/serve-site.yaml:\n"
            "    # edit those and rerun it, not this block.\n")
    return head + _START + note + block + _END + tail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.rayservice", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only check that the manifest is up to date")
    a = p.parse_args(argv)
    new = render()
    if a.check:
        if new != MANIFEST.read_text():
            print(f"{MANIFEST.relative_to(ROOT)} is out of date: run `python -m serve.rayservice`", file=sys.stderr)
            return 1
        return 0
    MANIFEST.write_text(new)
    print(f"wrote serveConfigV2 of {MANIFEST.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
