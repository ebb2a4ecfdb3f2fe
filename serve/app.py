"""The CLaRa Ray Serve application: an HTTP ingress, a retriever and a generator, passing latent tensors.

    clara serve --model runs/model --index-uri ./index            # == python -m serve.app ...
    serve run serve/config.yaml                                     # the same app from the config file
    serve deploy serve/config.yaml                                  # onto a running Ray cluster

Three deployments, each with its own resources and autoscaling (see :mod:`serve.config`):

* ``Ingress`` (FastAPI): validates requests against the configured limits and composes the other two
  through deployment handles. The OpenAPI page is ``/docs``.
* ``Retriever``: the query reasoner encodes a batch of questions (``@serve.batch``); the LanceDB index
  proposes candidates by ANN search on the low-dimensional key and re-scores them exactly on their
  full memory (:class:`clara.retrieval.Retriever`). Returns each question's top-k ids, scores, texts
  and memory tokens as a tensor ``[k, n_mem, d]``. A new index version is picked up within
  ``index_refresh_s`` (or at once by ``POST /v1/reload``), without a restart.
* ``Generator``: a batch of (question, background) pairs (``@serve.batch``) -> answers. The
  background is the chunks' memory tensor (CLaRa; it never becomes text on the way) or, in ``text``
  mode, the chunks' text (plain-text RAG on the same backbone). Engine: transformers, or vLLM with
  the memory placed in the prompt embeddings (:mod:`clara.vllm_engine`).

HTTP API:

* ``POST /v1/answer`` ``{question, top_k?, return_chunks?, mode?}`` ->
  ``{answer, mode, chunks: [{chunk_id, doc_id, score, text?}], index_version, timings}``
* ``POST /v1/retrieve`` ``{question, top_k?, include_text?}`` -> ``{chunks, index_version, timings}``
* ``POST /v1/decode`` ``{chunk_id | text, max_new_tokens?}`` -> ``{decoded, ...}``: a chunk's memory
  regenerated as text, to inspect a latent
* ``POST /v1/reload``: pick up the newest index version now (on the retriever replica reached)
* ``GET /healthz`` (the ingress is up), ``GET /readyz`` (retriever and generator answer; 503 if not)

Bad requests get a 4xx whose ``detail`` says what is wrong; internal failures a 5xx with a request id
and never a stack trace (that goes to the replica's log).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from serve.config import Mode, ServeSettings, read_config_file

logger = logging.getLogger("ray.serve")

APP_NAME = "clara"
DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")


# --------------------------------------------------------------------------------------------
# errors the API maps to status codes (the deployments' failures are translated into these)


class Unavailable(Exception):
    """A deployment cannot answer now (replica died, overloaded, index mismatch): 503."""


class NotFound(Exception):
    """The request names something that does not exist: 404."""


# --------------------------------------------------------------------------------------------
# the HTTP API


class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(description="The question, in plain text.", examples=["Who founded the city?"])
    top_k: int | None = Field(None, description="Chunks the generator reads (default and limit: server config).")
    return_chunks: bool = Field(False, description="Include each retrieved chunk's text in the response.")
    mode: Mode | None = Field(None, description="memory: the chunks' memory tokens (CLaRa); text: their text "
                                                "(plain-text RAG, same backbone). Default: server config.")


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(description="The question, in plain text.")
    top_k: int | None = Field(None, description="Chunks to return (default and limit: server config).")
    include_text: bool = Field(True, description="Include each chunk's text.")


class DecodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    chunk_id: str | None = Field(None, description="An indexed chunk: its stored memory is decoded.")
    text: str | None = Field(None, description="A chunk's text: compressed by the served compressor, then decoded.")
    max_new_tokens: int | None = Field(None, gt=0, le=4096, description="Length limit of the regenerated text.")


class ChunkOut(BaseModel):
    chunk_id: str
    doc_id: str
    score: float = Field(description="Exact CLaRa score: cosine of the flattened query and chunk memories.")
    text: str | None = None


class AnswerResponse(BaseModel):
    answer: str
    mode: Mode
    chunks: list[ChunkOut]
    index_version: int
    timings: dict[str, float] = Field(description="Milliseconds: retrieve, generate (each the batch it ran in), "
                                                  "total (in the ingress); batch sizes.")


class RetrieveResponse(BaseModel):
    chunks: list[ChunkOut]
    index_version: int
    timings: dict[str, float]


class DecodeResponse(BaseModel):
    chunk_id: str | None
    decoded: str = Field(description="Text the generator regenerates from the memory tokens alone.")
    n_mem: int
    timings: dict[str, float]


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _chunks(r, include_text: bool) -> list[ChunkOut]:
    return [ChunkOut(chunk_id=c, doc_id=d, score=round(s, 6), text=t if include_text else None)
            for c, d, s, t in zip(r.chunk_ids, r.doc_ids, r.scores, r.texts)]


def create_api(backend: Any, settings: ServeSettings) -> FastAPI:
    """The FastAPI app over ``backend``, an object with the async methods ``retrieve(question, k,
    with_memory)``, ``generate(question, background)``, ``memory_of(chunk_id)``, ``compress(text)``,
    ``decode(memory, max_new_tokens)``, ``reload()`` and ``ready()`` (the ingress deployment; tests
    pass a fake). Validation against ``settings``' limits happens here, before the backend is called.
    """
    s = settings
    api = FastAPI(
        title="CLaRa on Ray",
        version="1",
        description="Compressed-latent RAG: the retriever sends the top-k chunks' memory tokens to the "
                    f"generator as tensors. Limits: question <= {s.max_question_chars} characters, "
                    f"1 <= top_k <= {s.max_top_k}.",
    )

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        text = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors) or "invalid request"
        return JSONResponse(status_code=422, content={"detail": text, "errors": errors})

    @api.exception_handler(Unavailable)
    async def _unavailable(_: Request, exc: Unavailable) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": str(exc)}, headers={"Retry-After": "1"})

    @api.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": str(exc)})

    @api.exception_handler(asyncio.TimeoutError)
    async def _timeout(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=504, content={"detail": f"the request took longer than "
                                                                f"{s.request_timeout_s:g} s"})

    @api.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        rid = uuid.uuid4().hex[:12]
        logger.error("request %s %s failed (id %s)", request.method, request.url.path, rid, exc_info=exc)
        return JSONResponse(status_code=500, content={"detail": f"internal error (request id {rid}); "
                                                                f"the server log has the details"})

    def question_of(q: str) -> str:
        q = q.strip()
        if not q:
            raise HTTPException(422, "question is empty")
        if len(q) > s.max_question_chars:
            raise HTTPException(422, f"question has {len(q)} characters; the limit is {s.max_question_chars}")
        return q

    def top_k_of(k: int | None) -> int:
        if k is None:
            return s.default_top_k
        if not 1 <= k <= s.max_top_k:
            raise HTTPException(422, f"top_k must be between 1 and {s.max_top_k}, got {k}")
        return k

    async def within_limit(coro):
        return await asyncio.wait_for(coro, timeout=s.request_timeout_s)

    @api.post("/v1/answer", response_model=AnswerResponse, response_model_exclude_none=True,
              summary="Answer a question from the top-k retrieved chunks")
    async def answer(req: AnswerRequest) -> AnswerResponse:
        t0 = time.perf_counter()
        question, k = question_of(req.question), top_k_of(req.top_k)
        if req.mode is not None and req.mode != s.mode and not s.allow_mode_override:
            raise HTTPException(422, f"mode is fixed to {s.mode!r} by the server configuration")
        mode = req.mode or s.mode

        async def run():
            r = await backend.retrieve(question, k, mode == "memory")
            background = r.memory if mode == "memory" else list(r.texts)
            g = await backend.generate(question, background)
            return r, g

        r, g = await within_limit(run())
        return AnswerResponse(
            answer=g["answer"], mode=mode, chunks=_chunks(r, req.return_chunks), index_version=r.index_version,
            timings={"retrieve_ms": _ms(r.seconds), "generate_ms": _ms(g["seconds"]),
                     "total_ms": _ms(time.perf_counter() - t0), "retrieve_batch": r.batch_size,
                     "generate_batch": g["batch_size"]},
        )

    @api.post("/v1/retrieve", response_model=RetrieveResponse, response_model_exclude_none=True,
              summary="The top-k chunks for a question (exact CLaRa scores)")
    async def retrieve(req: RetrieveRequest) -> RetrieveResponse:
        t0 = time.perf_counter()
        question, k = question_of(req.question), top_k_of(req.top_k)
        r = await within_limit(backend.retrieve(question, k, False))
        return RetrieveResponse(chunks=_chunks(r, req.include_text), index_version=r.index_version,
                                timings={"retrieve_ms": _ms(r.seconds), "total_ms": _ms(time.perf_counter() - t0),
                                         "retrieve_batch": r.batch_size})

    @api.post("/v1/decode", response_model=DecodeResponse,
              summary="Regenerate text from a chunk's memory tokens (inspect a latent)")
    async def decode(req: DecodeRequest) -> DecodeResponse:
        t0 = time.perf_counter()
        if (req.chunk_id is None) == (req.text is None):
            raise HTTPException(422, "give exactly one of chunk_id (an indexed chunk) or text (a chunk to compress)")
        if req.text is not None:
            if not req.text.strip():
                raise HTTPException(422, "text is empty")
            if len(req.text) > s.max_decode_chars:
                raise HTTPException(422, f"text has {len(req.text)} characters; the limit is {s.max_decode_chars}")

        async def run():
            if req.chunk_id is not None:
                memory = await backend.memory_of(req.chunk_id)
                if memory is None:
                    raise NotFound(f"chunk {req.chunk_id!r} is not in the index")
            else:
                memory = await backend.compress(req.text)
            return memory, await backend.decode(memory, req.max_new_tokens or s.decode_max_new_tokens)

        memory, decoded = await within_limit(run())
        return DecodeResponse(chunk_id=req.chunk_id, decoded=decoded, n_mem=int(memory.shape[-2]),
                              timings={"total_ms": _ms(time.perf_counter() - t0)})

    @api.post("/v1/reload", summary="Pick up the newest index version now")
    async def reload() -> dict[str, int]:
        return {"index_version": await within_limit(backend.reload())}

    @api.get("/healthz", summary="Liveness of the ingress")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="Readiness: the retriever and the generator answer")
    async def readyz() -> JSONResponse:
        try:
            info = await asyncio.wait_for(backend.ready(), timeout=min(10.0, s.request_timeout_s))
        except (Unavailable, asyncio.TimeoutError) as exc:
            return JSONResponse(status_code=503, content={"ready": False, "detail": str(exc) or "timed out"})
        return JSONResponse(status_code=200, content={"ready": True, **info})

    return api


# --------------------------------------------------------------------------------------------
# the deployments


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


@serve.deployment(name="Retriever")
class RetrieverDeployment:
    """Query reasoner + LanceDB index (:class:`clara.retrieval.Retriever`), batched."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from clara.retrieval import Retriever

        self.settings = ServeSettings.model_validate(settings)
        s = self.settings
        _set_threads(s.retriever.threads())
        self.retriever = Retriever.open(s.model, s.index_uri, s.table, device=s.device,
                                        storage_options=s.storage_options or None, candidates=s.candidates,
                                        refresh_interval_s=s.index_refresh_s)
        self.retrieve.set_max_batch_size(s.retriever.max_batch_size)
        self.retrieve.set_batch_wait_timeout_s(s.retriever.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def retrieve(self, questions: list[str], ks: list[int], with_memory: list[bool]) -> list:
        return await asyncio.to_thread(self.retriever.retrieve, questions, ks, None, with_memory)

    async def memory_of(self, chunk_id: str):
        """``[n_mem, d]`` memory of one indexed chunk, or ``None`` if it is not in the index."""
        try:
            memory = await asyncio.to_thread(self.retriever.memory_of, [chunk_id])
        except KeyError:
            return None
        return memory[0]

    async def compress(self, text: str):
        return (await asyncio.to_thread(self.retriever.compress, [text]))[0]

    async def refresh(self, force: bool = True) -> int:
        return await asyncio.to_thread(self.retriever.refresh, force)

    async def ready(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.retriever.describe)

    def check_health(self) -> None:
        if self.retriever is None:
            raise RuntimeError("the retriever is not loaded")


@serve.deployment(name="Generator")
class GeneratorDeployment:
    """Question + background (memory tensor or chunk texts) -> answer, batched; transformers or vLLM."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from clara.model import ClaraModel

        self.settings = ServeSettings.model_validate(settings)
        s = self.settings
        _set_threads(s.generator.threads())
        self.model = ClaraModel.from_pretrained(s.model, device=s.device)
        if s.engine == "vllm":
            from clara.vllm_engine import VllmGenerator

            self.engine = VllmGenerator(self.model, **s.vllm)
        else:
            self.engine = self.model
        self._lock = threading.Lock()  # one model call at a time: adapters are switched in place
        self.generate.set_max_batch_size(s.generator.max_batch_size)
        self.generate.set_batch_wait_timeout_s(s.generator.batch_wait_timeout_s)

    def _generate(self, questions: list[str], backgrounds: list) -> list[dict[str, Any]]:
        from clara.retrieval import generate_answers

        with self._lock:
            t0 = time.perf_counter()
            answers = generate_answers(self.engine, questions, backgrounds, self.settings.max_new_tokens)
            seconds = time.perf_counter() - t0
        return [{"answer": a, "seconds": seconds, "batch_size": len(questions)} for a in answers]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def generate(self, questions: list[str], backgrounds: list) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._generate, questions, backgrounds)

    def _decode(self, memory, max_new_tokens: int | None) -> str:
        with self._lock:
            return self.engine.decode_memory(memory.to(self.model.device), max_new_tokens=max_new_tokens)[0]

    async def decode(self, memory, max_new_tokens: int | None = None) -> str:
        return await asyncio.to_thread(self._decode, memory, max_new_tokens)

    async def ready(self) -> dict[str, Any]:
        c = self.model.config
        return {"engine": self.settings.engine, "n_mem": c.n_mem, "d": self.model.hidden_size,
                "compression_rate": c.compression_rate, "device": str(self.model.device)}

    def check_health(self) -> None:
        if self.engine is None:
            raise RuntimeError("the generator is not loaded")

    def __del__(self) -> None:
        close = getattr(getattr(self, "engine", None), "close", None)
        if callable(close):
            close()


def _unavailable_types() -> tuple[type[BaseException], ...]:
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    return RayActorError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """HTTP ingress: validates, then composes Retriever -> Generator through deployment handles."""

    def __init__(self, retriever, generator, settings: dict[str, Any]) -> None:
        self.settings = ServeSettings.model_validate(settings)
        self.retriever = retriever
        self.generator = generator
        self._unavailable = _unavailable_types()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self, self.settings)

    async def _call(self, what: str, response):
        """Await a handle call; failures of the deployment's replica become :class:`Unavailable`."""
        from ray.exceptions import RayTaskError

        from clara.store import IndexMismatchError

        try:
            return await response
        except self._unavailable as exc:
            raise Unavailable(f"the {what} is unavailable ({type(exc).__name__}); retry shortly") from exc
        except RayTaskError as exc:
            if isinstance(getattr(exc, "cause", None), IndexMismatchError) or isinstance(exc, IndexMismatchError):
                raise Unavailable(f"the {what} cannot serve its index: it was built by another compressor") from exc
            raise

    async def retrieve(self, question: str, k: int, with_memory: bool):
        return await self._call("retriever", self.retriever.retrieve.remote(question, k, with_memory))

    async def generate(self, question: str, background):
        return await self._call("generator", self.generator.generate.remote(question, background))

    async def memory_of(self, chunk_id: str):
        return await self._call("retriever", self.retriever.memory_of.remote(chunk_id))

    async def compress(self, text: str):
        return await self._call("retriever", self.retriever.compress.remote(text))

    async def decode(self, memory, max_new_tokens: int | None):
        return await self._call("generator", self.generator.decode.remote(memory, max_new_tokens))

    async def reload(self) -> int:
        return await self._call("retriever", self.retriever.refresh.remote(True))

    async def ready(self) -> dict[str, Any]:
        retriever, generator = await asyncio.gather(self._call("retriever", self.retriever.ready.remote()),
                                                    self._call("generator", self.generator.ready.remote()))
        return {"retriever": retriever, "generator": generator}


def build_app(config):
    """The application for ``config`` (a :class:`ServeSettings` or its dict, e.g. a config file's
    ``args``): ``serve.run(build_app(config))``. Relative model and index paths are made absolute here.

    It is also the ``import_path`` of ``serve/config.yaml`` (``serve.app:build_app``).
    """
    settings = config if isinstance(config, ServeSettings) else ServeSettings.model_validate(config)
    settings = settings.resolved()
    args = settings.model_dump(mode="json")
    retriever = RetrieverDeployment.options(**settings.retriever.deployment_options()).bind(args)
    generator = GeneratorDeployment.options(**settings.generator.deployment_options()).bind(args)
    return Ingress.options(**settings.ingress.deployment_options()).bind(retriever, generator, args)


# --------------------------------------------------------------------------------------------
# clara serve


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clara serve",
        description="Run the CLaRa Serve application (ingress, retriever and generator deployments) on a local "
                    "Ray, or on the Ray at --address, until interrupted. Settings come from a Serve config file "
                    "(its first application's args, or --app) and the flags below override them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="Serve config file (YAML)")
    p.add_argument("--app", help="application in the config file (default: the first)")
    p.add_argument("--model", help="CLaRa model directory")
    p.add_argument("--index-uri", help="LanceDB database of the chunk index")
    p.add_argument("--table", help="chunk table")
    p.add_argument("--mode", choices=("memory", "text"), help="default generator background")
    p.add_argument("--engine", choices=("hf", "vllm"), help="generator engine")
    p.add_argument("--device", help="torch device of the replicas' model (cpu, cuda, mps)")
    p.add_argument("--host", help="HTTP host (config file's http_options.host, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (config file's http_options.port, else 8000)")
    p.add_argument("--address", help="Ray address to connect to (default: start a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (default: all)")
    p.add_argument("--check", action="store_true", help="validate the settings, print them as JSON and exit")
    return p


def settings_from_args(args: argparse.Namespace) -> tuple[ServeSettings, dict[str, Any]]:
    """Settings (config file + flag overrides) and the serve options (name, route prefix, host, port)."""
    values, options = read_config_file(args.config, args.app) if args.config else ({}, {})
    for flag, key in (("model", "model"), ("index_uri", "index_uri"), ("table", "table"), ("mode", "mode"),
                      ("engine", "engine"), ("device", "device")):
        if getattr(args, flag) is not None:
            values[key] = getattr(args, flag)
    http = dict(options.get("http_options") or {})
    serve_options = {"name": options.get("name", APP_NAME), "route_prefix": options.get("route_prefix", "/"),
                     "host": args.host or http.get("host", "127.0.0.1"), "port": args.port or http.get("port", 8000)}
    return ServeSettings.model_validate(values).resolved(), serve_options


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        settings, opts = settings_from_args(args)
    except Exception as exc:  # a config error is the user's to fix: no traceback
        print(f"clara serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(json.dumps({"settings": settings.model_dump(mode="json"), "serve": opts}, indent=2))
        return 0
    import ray

    if not ray.is_initialized():
        init: dict[str, Any] = {"address": args.address, "include_dashboard": False}
        if args.num_cpus is not None:
            init["num_cpus"] = args.num_cpus
        ray.init(**init)
    serve.start(http_options={"host": opts["host"], "port": opts["port"]})
    serve.run(build_app(settings), name=opts["name"], route_prefix=opts["route_prefix"], blocking=False)
    prefix = opts["route_prefix"].rstrip("/")
    print(f"clara serve: http://{opts['host']}:{opts['port']}{prefix}/docs (Ctrl-C stops)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    serve.delete(opts["name"])
    serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
