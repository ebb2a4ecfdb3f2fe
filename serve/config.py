"""Settings of the CLaRa Serve application: typed, validated, with a description per field.

A ``serve/config.yaml`` application's ``args`` (and ``clara serve``'s flags) only fill in
:class:`ServeSettings`; a bad value fails when the application is built, naming the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Mode = Literal["memory", "text"]
REDACTED = "***"
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|(^|_)KEY($|_)|AUTH", re.IGNORECASE)
Engine = Literal["hf", "vllm"]


class DeploymentSettings(BaseModel):
    """Resources, autoscaling and batching of one deployment."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per replica (fractions allowed).")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (the generator is the one that wants one).")
    memory_bytes: int | None = Field(None, gt=0, description="Memory reserved per replica, in bytes.")
    torch_threads: int | None = Field(None, gt=0, description="torch threads per replica; default max(1, num_cpus).")
    autoscaling: dict[str, Any] = Field(
        default_factory=lambda: {"min_replicas": 1, "max_replicas": 1},
        description="Ray Serve autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, "
                    "upscale_delay_s, downscale_delay_s, ...), validated by ray.serve.config.AutoscalingConfig.",
    )
    max_ongoing_requests: int = Field(32, gt=0, description="Requests one replica accepts at once.")
    max_batch_size: int = Field(16, gt=0, description="Requests per @serve.batch call (retriever, generator).")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="How long a batch waits to fill up.")
    health_check_period_s: float = Field(5.0, gt=0, description="Seconds between Serve's replica health checks.")
    env_vars: dict[str, str] = Field(default_factory=dict,
                                     description="Environment of the replica processes (runtime_env env_vars).")

    @field_validator("autoscaling")
    @classmethod
    def _autoscaling(cls, value: dict[str, Any]) -> dict[str, Any]:
        from ray.serve.config import AutoscalingConfig

        unknown = sorted(set(value) - set(AutoscalingConfig.model_fields))
        if unknown:  # AutoscalingConfig itself ignores unknown keys: a typo would pass silently
            raise ValueError(f"unknown autoscaling key(s) {unknown}; known: {sorted(AutoscalingConfig.model_fields)}")
        AutoscalingConfig(**value)  # raises with the key's name
        return value

    def threads(self) -> int:
        return self.torch_threads or max(1, int(self.num_cpus))

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of ``Deployment.options``."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            actor["num_gpus"] = self.num_gpus
        if self.memory_bytes:
            actor["memory"] = self.memory_bytes
        if self.env_vars:
            actor["runtime_env"] = {"env_vars": dict(self.env_vars)}
        return {"ray_actor_options": actor, "autoscaling_config": dict(self.autoscaling),
                "max_ongoing_requests": self.max_ongoing_requests,
                "health_check_period_s": self.health_check_period_s}


def _ingress_default() -> DeploymentSettings:
    return DeploymentSettings(num_cpus=0.1, max_ongoing_requests=256,
                              autoscaling={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 64})


def _retriever_default() -> DeploymentSettings:
    return DeploymentSettings(num_cpus=0.5, autoscaling={"min_replicas": 1, "max_replicas": 2,
                                                         "target_ongoing_requests": 8})


def _generator_default() -> DeploymentSettings:
    return DeploymentSettings(num_cpus=1.0, autoscaling={"min_replicas": 1, "max_replicas": 2,
                                                         "target_ongoing_requests": 8})


class ServeSettings(BaseModel):
    """Everything the CLaRa application needs: what to serve, the request limits, the deployments."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="CLaRa model directory (ClaraModel.save_pretrained); relative paths are "
                                   "resolved against the working directory of the process that builds the app.")
    index_uri: str = Field(description="LanceDB database of the chunk index (local directory or s3://...).")
    table: str = Field("chunks", min_length=1, description="Chunk table in the database.")
    storage_options: dict[str, str] = Field(default_factory=dict, description="LanceDB storage options.")
    device: str | None = Field(None, description="torch device of the replicas' model; default: the model's own.")

    mode: Mode = Field("memory", description="Default background of the generator: the chunks' memory tokens "
                                             "(CLaRa) or their text (plain-text RAG, same backbone).")
    allow_mode_override: bool = Field(True, description="Requests may choose the mode.")
    engine: Engine = Field("hf", description="Generator engine: hf (transformers) or vllm (prompt embeddings).")
    vllm: dict[str, Any] = Field(default_factory=dict,
                                 description="Keyword arguments of vllm.LLM (max_model_len, kv_cache_memory_bytes, "
                                             "dtype, tensor_parallel_size, ...).")

    default_top_k: int = Field(5, gt=0, description="Chunks read per question when the request gives no top_k.")
    max_top_k: int = Field(20, gt=0, description="Largest top_k a request may ask for.")
    candidates: int = Field(50, gt=0, description="ANN candidates re-scored exactly per question (>= max_top_k).")
    max_question_chars: int = Field(2000, gt=0, description="Longest question accepted, in characters.")
    max_decode_chars: int = Field(20000, gt=0, description="Longest chunk text /v1/decode compresses.")
    max_new_tokens: int | None = Field(None, gt=0, description="Answer length limit; default: the model's.")
    decode_max_new_tokens: int | None = Field(None, gt=0,
                                              description="Length limit of /v1/decode; default: doc_max_tokens.")
    index_refresh_s: float | None = Field(5.0, ge=0, description="A new index version is picked up within this "
                                                                 "many seconds (0: checked on every request; "
                                                                 "null: only POST /v1/reload).")
    request_timeout_s: float = Field(60.0, gt=0, description="A request still running after this gets a 504.")
    max_body_bytes: int = Field(64 * 1024, gt=0, description="Largest request body accepted (413 above it).")

    api_token_env: str | None = Field(
        "CLARA_API_TOKEN", description="Environment variable of the ingress replicas holding the bearer token "
                                       "that /v1/answer and /v1/retrieve require (from a Kubernetes secret). "
                                       "Unset or empty: those routes are open. Tokens never come from this file.")
    admin_token_env: str | None = Field(
        "CLARA_ADMIN_TOKEN", description="Environment variable holding the bearer token of the admin routes "
                                         "(/v1/reload, /v1/decode). Unset or empty: those routes are disabled.")
    docs: bool = Field(True, description="Serve /docs (Swagger UI; the page loads its script and style from the "
                                         "jsdelivr CDN) and /openapi.json.")

    ingress: DeploymentSettings = Field(default_factory=_ingress_default)
    retriever: DeploymentSettings = Field(default_factory=_retriever_default)
    generator: DeploymentSettings = Field(default_factory=_generator_default)

    @model_validator(mode="after")
    def _limits(self) -> ServeSettings:
        if self.default_top_k > self.max_top_k:
            raise ValueError(f"default_top_k ({self.default_top_k}) is larger than max_top_k ({self.max_top_k})")
        if self.candidates < self.max_top_k:
            raise ValueError(f"candidates ({self.candidates}) must be at least max_top_k ({self.max_top_k})")
        if not self.model.strip() or not self.index_uri.strip():
            raise ValueError("model and index_uri must not be empty")
        return self

    def redacted(self) -> dict[str, Any]:
        """The settings as JSON data with secrets masked: every storage option's value (object-store keys
        and tokens live there) and every replica environment variable whose name looks like a secret."""
        data = self.model_dump(mode="json")
        data["storage_options"] = {k: REDACTED for k in data["storage_options"]}
        for name in ("ingress", "retriever", "generator"):
            env = data[name]["env_vars"]
            data[name]["env_vars"] = {k: REDACTED if _SECRET_NAME.search(k) else v for k, v in env.items()}
        return data

    def resolved(self, base: str | Path | None = None) -> ServeSettings:
        """A copy with relative local model and index paths made absolute (against ``base`` or the cwd)."""
        root = Path(base) if base is not None else Path.cwd()

        def absolute(p: str) -> str:
            if "://" in p or Path(p).is_absolute():
                return p
            return str((root / p).resolve())

        return self.model_copy(update={"model": absolute(self.model), "index_uri": absolute(self.index_uri)})


def read_config_file(path: str | Path, app: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(args, serve_options)`` of one application in a Serve config file (``serve/config.yaml``).

    ``serve_options``: ``name``, ``route_prefix`` and ``http_options`` (host, port). A plain YAML
    mapping (no ``applications`` key) is taken as the args themselves.
    """
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping, got {type(data).__name__}")
    if "applications" not in data:
        return data, {}
    apps = data["applications"] or []
    chosen = [a for a in apps if app is None or a.get("name") == app]
    if not chosen:
        names = [a.get("name") for a in apps]
        raise ValueError(f"{path}: no application {app!r} (found {names})")
    entry = chosen[0]
    options = {"name": entry.get("name", "default"), "route_prefix": entry.get("route_prefix", "/"),
               "http_options": dict(data.get("http_options") or {})}
    return dict(entry.get("args") or {}), options


__all__ = ["DeploymentSettings", "Engine", "Mode", "ServeSettings", "read_config_file"]
