"""The CLaRa Ray Serve application: an HTTP ingress, a retriever and a generator, passing latent tensors.

    serve run serve/config.yaml                                     # local Ray, from the config file
    serve deploy serve/config.yaml                                  # onto a running Ray cluster
    serve run serve.app:build_app model=runs/model index_uri=./index  # args only, default deployments
    clara serve --model runs/model --index-uri ./index              # the config file, args overridden

Three deployments, each with its own resources and autoscaling (Serve's ``deployments:`` options)
and its own live settings (``user_config``, applied by ``reconfigure``; see :mod:`serve.config`):

* ``Ingress`` (FastAPI): validates requests against the configured limits and composes the other two
  through deployment handles. The OpenAPI page is ``/docs``.
* ``Retriever``: the query reasoner encodes a batch of questions (``@serve.batch``); the LanceDB index
  proposes candidates by ANN search on the low-dimensional key and re-scores them exactly on their
  full memory (:class:`clara.index.retrieve.Retriever`). Returns each question's top-k ids, scores, texts
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
* ``GET /inspect``: a page to look inside the latents (the chunks' memories decoded beside their text)
* ``GET /healthz`` (the ingress is up), ``GET /readyz`` (the index opens, matches the model and has rows,
  and the generator answers; 503 if not)

Access: with ``$CLARA_API_TOKEN`` set in the ingress replicas' environment (``api_token_env``), the
``/v1`` routes need ``Authorization: Bearer <token>``; the admin routes (``/v1/reload``, ``/v1/decode``:
an expensive generation, an index operation) need ``$CLARA_ADMIN_TOKEN`` (``admin_token_env``) and are
disabled without it. Tokens are compared in constant time and never read from the config file.
``/healthz``, ``/readyz`` and ``/docs`` stay open (probes; ``docs: false`` removes the page).

Bad requests get a 4xx whose ``detail`` says what is wrong (text that is not valid Unicode, a body over
``max_body_bytes``: 413); internal failures a 5xx with a request id and never a stack trace (that goes
to the replica's log). Requests are batched on the retriever and the generator; one request that fails
inside a batch fails alone (the batch is retried item by item).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import hmac
import importlib.resources
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from clara.settings import load
from serve.config import (
    AppArgs,
    IngressConfig,
    IngressSettings,
    Mode,
    RetrieverConfig,
    check_deployments,
    read_config_file,
    redacted,
    user_config,
)

logger = logging.getLogger("ray.serve")

APP_NAME = "clara"
DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")
#: Longest chunk id a request may name (ids are ``<doc_id>::<position>``); also caps what errors echo.
MAX_ID_CHARS = 512


# --------------------------------------------------------------------------------------------
# errors the API maps to status codes (the deployments' failures are translated into these)


class Unavailable(Exception):
    """A deployment cannot answer now (replica died, overloaded, index mismatch): 503."""


class NotFound(Exception):
    """The request names something that does not exist: 404."""


# --------------------------------------------------------------------------------------------
# the HTTP API


class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # strict: top_k "5" or true is an error
    question: str = Field(description="The question, in plain text.", examples=["Who founded the city?"])
    top_k: int | None = Field(None, description="Chunks the generator reads (default and limit: server config).")
    return_chunks: bool = Field(False, description="Include each retrieved chunk's text in the response.")
    mode: Mode | None = Field(None, description="memory: the chunks' memory tokens (CLaRa); text: their text "
                                                "(plain-text RAG, same backbone). Default: server config.")


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    question: str = Field(description="The question, in plain text.")
    top_k: int | None = Field(None, description="Chunks to return (default and limit: server config).")
    include_text: bool = Field(True, description="Include each chunk's text.")


class DecodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    chunk_id: str | None = Field(None, max_length=MAX_ID_CHARS,
                                 description="An indexed chunk: its stored memory is decoded.")
    text: str | None = Field(None, description="A chunk's text: compressed by the served compressor, then decoded.")
    max_new_tokens: int | None = Field(None, gt=0, le=4096,
                                       description="Length limit of the regenerated text (also capped by the "
                                                   "model's context length).")


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


def request_id(request: Request) -> str:
    """Serve's id of this request (its proxy takes the client's ``X-Request-ID`` or makes one, puts it in
    every replica log line and returns it as the response's ``X-Request-ID``), so an error body, the
    logs and the client all name the same request. Outside Serve (tests): the header, else a new id."""
    rid = request.headers.get("x-request-id", "")
    if not rid:
        try:
            from ray.serve.context import _get_serve_request_context  # private, but the id Serve logs with

            rid = _get_serve_request_context().request_id
        except Exception:  # noqa: BLE001 - no Serve context: not behind Serve
            rid = ""
    if not rid:
        rid = getattr(request.state, "fallback_rid", "") or uuid.uuid4().hex[:12]
        request.state.fallback_rid = rid
    return _short(rid, 64)


#: ``observe(route, mode, status, seconds)``: one call per finished request (the ingress's metrics).
Observer = Callable[[str, str, int, float], None]


def _short(text: str, n: int = 80) -> str:
    """``text`` cut for an error message: a request must not be able to make the server echo megabytes."""
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} characters)"


def valid_text(field: str, value: str) -> str:
    """``value`` if it encodes as UTF-8; a JSON ``\\ud800`` escape decodes to an unpaired surrogate that
    the tokenizer cannot take, so it is refused here (422 naming ``field``), not deep inside a batch."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise HTTPException(422, f"{field}: not valid Unicode text (an unpaired surrogate at character "
                                 f"{exc.start})") from None
    return value


@dataclass(frozen=True)
class Tokens:
    """Bearer tokens of the API: ``api`` guards the /v1 routes (None: open), ``admin`` the admin routes
    (None: disabled). Read from the environment variables the settings name, never from the settings."""

    api: str | None = None
    admin: str | None = None
    admin_env: str | None = None

    @classmethod
    def from_env(cls, settings: IngressSettings) -> Tokens:
        def read(name: str | None) -> str | None:
            return (os.environ.get(name) or None) if name else None

        return cls(api=read(settings.api_token_env), admin=read(settings.admin_token_env),
                   admin_env=settings.admin_token_env)


def _matches(given: str | None, token: str | None) -> bool:
    return given is not None and token is not None and hmac.compare_digest(given.encode(), token.encode())


class BodyLimit:
    """ASGI middleware: a request body over ``limit()`` bytes gets a 413 before the app sees it (read per
    request: the ingress's ``user_config`` may change it live). A declared Content-Length is checked up
    front; a body without one (chunked) is read here, up to the limit, and handed on whole (the limit is
    small: request bodies are questions)."""

    def __init__(self, app: Any, limit: Callable[[], int]) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit()
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > limit:
                return await self._refuse(send, limit)
            return await self.app(scope, receive, send)  # the HTTP server holds the body to its length
        parts, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > limit:
                return await self._refuse(send, limit)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(parts), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send, limit: int) -> None:
        body = json.dumps({"detail": f"the request body is larger than {limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


@functools.cache
def _page() -> str:
    """The inspection page (``serve/inspect.html``, package data)."""
    return importlib.resources.files("serve").joinpath("inspect.html").read_text(encoding="utf-8")


def create_api(backend: Any, limits: IngressConfig | None = None, settings: IngressSettings | None = None,
               tokens: Tokens | None = None, observe: Observer | None = None) -> FastAPI:
    """The FastAPI app over ``backend``, an object with the async methods ``retrieve(question, k,
    with_memory)``, ``generate(question, background)``, ``memory_of(chunk_id)``, ``compress(text)``,
    ``decode(memory, max_new_tokens)``, ``reload()`` and ``ready()`` (the ingress deployment; tests
    pass a fake). Validation against ``limits`` (read on every request: the ingress's ``reconfigure``
    changes them in place) and authentication (``tokens``; default: none, every route but the admin
    ones open) happen here, before the backend is called. ``observe`` is told about every finished
    request (route, mode, status, seconds); error bodies carry the request id.
    """
    s = limits if limits is not None else IngressConfig()
    fixed = settings if settings is not None else IngressSettings()
    tokens = tokens or Tokens()
    bearer = HTTPBearer(auto_error=False, description="CLARA_API_TOKEN (or the admin token) as a bearer token")

    def authorised(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        given = creds.credentials if creds is not None else None
        if tokens.api is not None and not (_matches(given, tokens.api) or _matches(given, tokens.admin)):
            raise HTTPException(401, "a valid bearer token is required (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})

    def admin(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if tokens.admin is None:
            raise HTTPException(403, f"admin routes are disabled: set ${tokens.admin_env or 'CLARA_ADMIN_TOKEN'} "
                                     f"in the ingress replicas' environment to enable them")
        if not _matches(creds.credentials if creds is not None else None, tokens.admin):
            raise HTTPException(401, "this route needs the admin bearer token", headers={"WWW-Authenticate": "Bearer"})

    docs = {} if fixed.docs else {"docs_url": None, "openapi_url": None}
    api = FastAPI(
        redoc_url=None,
        **docs,
        title="CLaRa on Ray",
        version="1",
        description="Compressed-latent RAG: the retriever sends the top-k chunks' memory tokens to the "
                    "generator as tensors. Limits (the ingress's user_config; 422 / 413 when exceeded): "
                    "question length, top_k, body size.",
    )
    api.add_middleware(BodyLimit, limit=lambda: s.max_body_bytes)

    @api.middleware("http")
    async def _observe(request: Request, call_next):
        t0, status = time.perf_counter(), 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            if observe is not None:
                route = request.scope.get("route")
                path = getattr(route, "path", None) or "unmatched"
                observe(path, getattr(request.state, "mode", ""), status, time.perf_counter() - t0)

    def error(request: Request, status: int, detail: str, **extra: Any) -> JSONResponse:
        headers = extra.pop("headers", None)
        return JSONResponse(status_code=status, headers=headers,
                            content={"detail": detail, "request_id": request_id(request), **extra})

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(request, exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        text = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors) or "invalid request"
        return error(request, 422, text, errors=errors)

    @api.exception_handler(Unavailable)
    async def _unavailable(request: Request, exc: Unavailable) -> JSONResponse:
        return error(request, 503, str(exc), headers={"Retry-After": "1"})

    @api.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return error(request, 404, str(exc))

    @api.exception_handler(asyncio.TimeoutError)
    async def _timeout(request: Request, exc: Exception) -> JSONResponse:
        return error(request, 504, f"the request took longer than {s.request_timeout_s:g} s")

    @api.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id(request)
        logger.error("request %s %s failed (request id %s)", request.method, request.url.path, rid, exc_info=exc)
        return error(request, 500, f"internal error (request id {rid}); the server log has the details")

    def question_of(q: str) -> str:
        q = valid_text("question", q).strip()
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
              summary="Answer a question from the top-k retrieved chunks", dependencies=[Depends(authorised)])
    async def answer(req: AnswerRequest, request: Request) -> AnswerResponse:
        t0 = time.perf_counter()
        question, k = question_of(req.question), top_k_of(req.top_k)
        if req.mode is not None and req.mode != fixed.mode and not fixed.allow_mode_override:
            raise HTTPException(422, f"mode is fixed to {fixed.mode!r} by the server configuration")
        mode = req.mode or fixed.mode
        request.state.mode = mode

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
              summary="The top-k chunks for a question (exact CLaRa scores)", dependencies=[Depends(authorised)])
    async def retrieve(req: RetrieveRequest) -> RetrieveResponse:
        t0 = time.perf_counter()
        question, k = question_of(req.question), top_k_of(req.top_k)
        r = await within_limit(backend.retrieve(question, k, False))
        return RetrieveResponse(chunks=_chunks(r, req.include_text), index_version=r.index_version,
                                timings={"retrieve_ms": _ms(r.seconds), "total_ms": _ms(time.perf_counter() - t0),
                                         "retrieve_batch": r.batch_size})

    @api.post("/v1/decode", response_model=DecodeResponse,
              summary="Regenerate text from a chunk's memory tokens (inspect a latent; admin)",
              dependencies=[Depends(admin)])
    async def decode(req: DecodeRequest) -> DecodeResponse:
        t0 = time.perf_counter()
        if (req.chunk_id is None) == (req.text is None):
            raise HTTPException(422, "give exactly one of chunk_id (an indexed chunk) or text (a chunk to compress)")
        if req.chunk_id is not None:
            valid_text("chunk_id", req.chunk_id)
        if req.text is not None:
            if not valid_text("text", req.text).strip():
                raise HTTPException(422, "text is empty")
            if len(req.text) > s.max_decode_chars:
                raise HTTPException(422, f"text has {len(req.text)} characters; the limit is {s.max_decode_chars}")

        async def run():
            if req.chunk_id is not None:
                memory = await backend.memory_of(req.chunk_id)
                if memory is None:
                    raise NotFound(f"chunk {_short(req.chunk_id)!r} is not in the index")
            else:
                memory = await backend.compress(req.text)
            return memory, await backend.decode(memory, req.max_new_tokens)

        memory, decoded = await within_limit(run())
        return DecodeResponse(chunk_id=req.chunk_id, decoded=decoded, n_mem=int(memory.shape[-2]),
                              timings={"total_ms": _ms(time.perf_counter() - t0)})

    @api.post("/v1/reload", summary="Pick up the newest index version now (admin)", dependencies=[Depends(admin)])
    async def reload() -> dict[str, int]:
        return {"index_version": await within_limit(backend.reload())}

    if fixed.page:
        @api.get("/inspect", response_class=HTMLResponse, include_in_schema=False)
        async def inspect_page() -> HTMLResponse:
            # the page calls the API above with the token typed into it; it holds no data itself
            return HTMLResponse(_page(), headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                                                  "Content-Security-Policy": "default-src 'self'; script-src "
                                                  "'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:"})

    @api.get("/healthz", summary="Liveness of the ingress")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="Readiness: the index is usable (opens, matches the model, has rows) and the "
                                "generator answers")
    async def readyz() -> JSONResponse:
        try:
            info = await asyncio.wait_for(backend.ready(), timeout=min(10.0, s.request_timeout_s))
        except (Unavailable, asyncio.TimeoutError) as exc:
            return JSONResponse(status_code=503, content={"ready": False, "detail": str(exc) or "timed out"})
        return JSONResponse(status_code=200, content={"ready": True, **info})

    return api


# --------------------------------------------------------------------------------------------
# the deployments


def run_isolated(call: Callable[..., list], *columns: list) -> list:
    """``call(*columns)`` for a batch; if it raises, each item again on its own, so a request that
    breaks the batch (text the tokenizer refuses, a bad tensor) fails alone. A failed item's place
    holds its exception (the ingress raises it for that request); the others hold their results."""
    try:
        return call(*columns)
    except Exception as exc:
        if len(columns[0]) == 1:
            return [exc]
        logger.warning("a batch of %d failed (%s: %s); retrying its items one by one", len(columns[0]),
                       type(exc).__name__, str(exc)[:200])
    out: list = []
    for i in range(len(columns[0])):
        try:
            out += call(*[[c[i]] for c in columns])
        except Exception as exc:
            out.append(exc)
    return out


class EngineHealth:
    """A replica's health as its own calls show it: unhealthy after ``limit`` consecutive calls that
    failed for a reason other than their input (a ``RuntimeError`` from torch or the vLLM engine, out of
    memory, a dead engine process), so that Serve replaces the replica. A request the model refuses
    (``TypeError`` / ``ValueError``: text the tokenizer cannot take, a tensor of the wrong shape) fails
    alone and says nothing about the replica."""

    INPUT_ERRORS = (TypeError, ValueError)

    def __init__(self, limit: int = 3) -> None:
        self.limit = limit
        self.failures = 0
        self.last: BaseException | None = None

    def observe(self, results: Sequence[Any]) -> None:
        for r in results:
            if not isinstance(r, BaseException):
                self.failures = 0
            elif not isinstance(r, self.INPUT_ERRORS):
                self.failures += 1
                self.last = r

    def check(self) -> None:
        if self.failures >= self.limit:
            raise RuntimeError(f"the last {self.failures} calls failed in the engine "
                               f"({type(self.last).__name__}: {str(self.last)[:200]})")


def _set_threads(n: int | None) -> None:
    """torch threads of this replica: ``n``, or the CPUs Ray reserved for it (at least 1)."""
    import ray
    import torch

    if n is None:
        n = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    torch.set_num_threads(n)


def _apply_batching(batched, config) -> None:
    """A ``user_config``'s batch size, batch wait and torch threads, applied to a running replica."""
    batched.set_max_batch_size(config.max_batch_size)
    batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
    _set_threads(config.torch_threads)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (unit tests)
        return ""


@serve.deployment(name="Retriever", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32)
class RetrieverDeployment:
    """Query reasoner + LanceDB index (:class:`clara.index.retrieve.Retriever`), batched.

    Built from its part of the app's args; tuned live by its ``user_config`` (:class:`RetrieverConfig`).
    """

    def __init__(self, model: str, index_uri: str, table: str = "chunks", shards: int = 1,
                 storage_options: dict[str, str] | None = None, device: str | None = None) -> None:
        from clara.index.retrieve import Retriever

        self.config = RetrieverConfig()
        self.retriever = Retriever.open(model, index_uri, table, device=device, shards=shards,
                                        storage_options=storage_options or None, candidates=self.config.candidates,
                                        refresh_interval_s=self.config.index_refresh_s)
        self.reconfigure({})

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve calls this with the deployment's ``user_config`` (at start and on every change)."""
        c = user_config("Retriever", config)
        self.retriever.set_retrieval(c.retrieval, c.text_weight)  # first: it refuses hybrid without a text index
        self.config = c
        _apply_batching(self.retrieve, c)
        self.retriever.candidates = c.candidates
        self.retriever.refresh_interval_s = c.index_refresh_s

    def _retrieve(self, questions: list[str], ks: list[int], with_memory: list[bool]) -> list:
        return self.retriever.retrieve(questions, ks, None, with_memory)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def retrieve(self, questions: list[str], ks: list[int], with_memory: list[bool]) -> list:
        return await asyncio.to_thread(run_isolated, self._retrieve, questions, ks, with_memory)

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
        """The index as served (see :meth:`Retriever.health`; its location is not disclosed), and the
        replica's live settings."""
        info = await asyncio.to_thread(self.retriever.health)
        info = {k: v for k, v in info.items() if k != "index_uri"}
        return {**info, "replica": _replica_id(), "max_batch_size": self.config.max_batch_size,
                "candidates": self.retriever.candidates, "retrieval": self.retriever.retrieval}

    def check_health(self) -> None:
        # Serve replaces a replica whose check fails: an index that cannot be read, was rebuilt by
        # another compressor or is empty makes this one unhealthy rather than answering 500s.
        self.retriever.health()


@serve.deployment(name="Generator", ray_actor_options={"num_cpus": 1.0}, max_ongoing_requests=32)
class GeneratorDeployment:
    """Question + background (memory tensor or chunk texts) -> answer; transformers or vLLM.

    transformers: requests are grouped by ``@serve.batch`` and run one batch at a time. vLLM: the
    replica holds only the prompt layout and the token-embedding table beside vLLM's async engine
    (no ClaraModel), and every request goes straight to the engine, which batches continuously.
    Built from its part of the app's args; tuned live by its ``user_config`` (:class:`GeneratorConfig`).
    """

    def __init__(self, model: str, device: str | None = None, engine: str = "hf",
                 vllm: dict[str, Any] | None = None) -> None:
        self.engine_name = engine
        if engine == "vllm":
            from clara.vllm_engine import VllmGenerator

            self.engine = VllmGenerator.from_model_dir(model, **(vllm or {}))
            self.model = None
            self._info = {"n_mem": self.engine.prompt.n_mem, "d": self.engine.embed.embedding_dim}
        else:
            from clara.model import ClaraModel

            self.model = self.engine = ClaraModel.from_pretrained(model, device=device)
            c = self.model.config
            self._info = {"n_mem": c.n_mem, "d": self.model.hidden_size, "compression_rate": c.compression_rate,
                          "device": str(self.model.device)}
        self._lock = threading.Lock()  # one model call at a time: adapters are switched in place
        self.health = EngineHealth()
        self.reconfigure({})

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve calls this with the deployment's ``user_config`` (at start and on every change)."""
        self.config = user_config("Generator", config)
        _apply_batching(self.generate, self.config)

    async def answer(self, question: str, background) -> dict[str, Any]:
        """One request: through the batch queue (transformers) or straight into vLLM's running batch."""
        if self.engine_name != "vllm":
            return await self.generate(question, background)
        t0 = time.perf_counter()
        try:
            if hasattr(background, "shape"):  # memory [k, n_mem, d]
                texts = await self.engine.agenerate([question], [int(background.shape[0])], [background],
                                                    self.config.max_new_tokens)
            else:  # chunk texts
                texts = await self.engine.agenerate([question], [list(background)], None, self.config.max_new_tokens)
        except Exception as exc:
            self.health.observe([exc])
            raise
        self.health.observe(texts)
        return {"answer": texts[0], "seconds": time.perf_counter() - t0, "batch_size": 1}

    def _generate(self, questions: list[str], backgrounds: list) -> list[dict[str, Any]]:
        from clara.index.retrieve import generate_answers

        with self._lock:
            t0 = time.perf_counter()
            answers = generate_answers(self.engine, questions, backgrounds, self.config.max_new_tokens)
            seconds = time.perf_counter() - t0
        return [{"answer": a, "seconds": seconds, "batch_size": len(questions)} for a in answers]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def generate(self, questions: list[str], backgrounds: list) -> list[dict[str, Any]]:
        results = await asyncio.to_thread(run_isolated, self._generate, questions, backgrounds)
        self.health.observe(results)
        return results

    def _decode(self, memory, max_new_tokens: int | None) -> str:
        device = self.model.device if self.model is not None else "cpu"
        with self._lock:
            return self.engine.decode_memory(memory.to(device),
                                             max_new_tokens=max_new_tokens or self.config.decode_max_new_tokens)[0]

    async def decode(self, memory, max_new_tokens: int | None = None) -> str:
        try:
            text = await asyncio.to_thread(self._decode, memory, max_new_tokens)
        except Exception as exc:
            self.health.observe([exc])
            raise
        self.health.observe([text])
        return text

    async def ready(self) -> dict[str, Any]:
        return {"engine": self.engine_name, **self._info, "replica": _replica_id(),
                "max_batch_size": self.config.max_batch_size, "batch_wait_timeout_s": self.config.batch_wait_timeout_s}

    def check_health(self) -> None:
        """Serve calls this periodically: a replica whose engine keeps failing is replaced."""
        self.health.check()

    def __del__(self) -> None:
        close = getattr(getattr(self, "engine", None), "close", None)
        if callable(close):
            close()


class ServeMetrics:
    """The application's metrics, exported by Ray's metrics agent (Prometheus names ``ray_clara_*``;
    Serve adds the deployment, replica and application tags). Recorded in the ingress."""

    LATENCY_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]

    def __init__(self) -> None:
        from ray.serve import metrics as m

        self.requests = m.Counter("clara_requests", description="HTTP requests by path, mode and status.",
                                  tag_keys=("path", "mode", "status"))
        self.latency = m.Histogram("clara_request_latency_ms", description="End-to-end latency in the ingress.",
                                   boundaries=self.LATENCY_MS, tag_keys=("path",))
        self.stage = m.Histogram("clara_stage_latency_ms", description="Latency of the retrieve and generate "
                                 "batches a request ran in.", boundaries=self.LATENCY_MS, tag_keys=("stage",))
        self.batch = m.Histogram("clara_batch_size", description="Requests in the batch a request ran in.",
                                 boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("stage",))
        self.memory_tokens = m.Histogram("clara_memory_tokens", description="Memory vectors the generator reads "
                                         "per request (k x n_mem).", boundaries=[8, 16, 32, 64, 128, 256, 512, 1024])
        self.text_tokens = m.Histogram("clara_text_tokens_replaced", description="Tokens of the retrieved chunks' "
                                       "text those memory vectors stand for.",
                                       boundaries=[64, 128, 256, 512, 1024, 2048, 4096, 8192])
        self.index_version = m.Gauge("clara_index_version", description="Index version of the latest answer.")
        self.index_errors = m.Counter("clara_index_errors", description="Requests refused because the index "
                                      "could not be served (mismatch, unavailable, empty).", tag_keys=("kind",))

    def request(self, path: str, mode: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"path": path, "mode": mode or "-", "status": str(status)})
        self.latency.observe(seconds * 1000.0, tags={"path": path})

    def retrieved(self, r, with_memory: bool) -> None:
        self.stage.observe(r.seconds * 1000.0, tags={"stage": "retrieve"})
        self.batch.observe(r.batch_size, tags={"stage": "retrieve"})
        self.index_version.set(r.index_version)
        if with_memory and r.memory is not None:
            self.memory_tokens.observe(int(r.memory.shape[0] * r.memory.shape[1]))
            self.text_tokens.observe(int(getattr(r, "text_tokens", 0)))

    def generated(self, g: dict[str, Any]) -> None:
        self.stage.observe(g["seconds"] * 1000.0, tags={"stage": "generate"})
        self.batch.observe(g["batch_size"], tags={"stage": "generate"})


def _unavailable_types() -> tuple[type[BaseException], ...]:
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    return RayActorError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError


def _index_unavailable(what: str, exc: BaseException) -> Unavailable | None:
    """The 503 for an index the retriever cannot serve now, else None."""
    from clara.index.retrieve import IndexEmptyError, IndexUnavailableError
    from clara.index.schema import IndexMismatchError, TextIndexMissingError

    if isinstance(exc, TextIndexMissingError):
        return Unavailable(f"the {what} is set to hybrid retrieval but its index has no full-text index; "
                           "rebuild it with the index job (text index on) or set retrieval: latent")
    if isinstance(exc, IndexMismatchError):
        return Unavailable(f"the {what} cannot serve its index: it was built by another compressor")
    if isinstance(exc, IndexEmptyError):
        return Unavailable(f"the index holds no chunks yet; the {what} has nothing to retrieve")
    if isinstance(exc, IndexUnavailableError):
        return Unavailable(f"the {what} cannot read its index now (rebuilt or missing); retry shortly")
    return None


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress()
class Ingress:
    """HTTP ingress: validates, then composes Retriever -> Generator through deployment handles.

    Built from its part of the app's args (:class:`IngressSettings`); its request limits are its
    ``user_config`` (:class:`IngressConfig`), changed in place so the running API sees them at once.
    """

    def __init__(self, retriever, generator, settings: dict[str, Any] | None = None) -> None:
        self.settings = IngressSettings(**(settings or {}))
        self.limits = IngressConfig()
        self.retriever = retriever
        self.generator = generator
        self._unavailable = _unavailable_types()
        self.metrics = ServeMetrics()

    def reconfigure(self, config: dict[str, Any]) -> None:
        new = user_config("Ingress", config)
        for f in dataclasses.fields(IngressConfig):  # in place: create_api's handlers hold this object
            setattr(self.limits, f.name, getattr(new, f.name))

    def __serve_build_asgi_app__(self) -> FastAPI:
        tokens = Tokens.from_env(self.settings)
        if tokens.api is None:
            logger.warning("$%s is not set: /v1/answer and /v1/retrieve are open to anyone who reaches the port",
                           self.settings.api_token_env)
        return create_api(self, self.limits, self.settings, tokens, observe=self.metrics.request)

    async def _call(self, what: str, response):
        """Await a handle call; failures of the deployment's replica become :class:`Unavailable`."""
        from ray.exceptions import RayTaskError

        try:
            result = await response
        except self._unavailable as exc:
            raise Unavailable(f"the {what} is unavailable ({type(exc).__name__}); retry shortly") from exc
        except RayTaskError as exc:
            raise (self._index_error(what, getattr(exc, "cause", None) or exc) or exc) from exc
        if isinstance(result, BaseException):  # this request's item failed in its batch (run_isolated)
            raise self._index_error(what, result) or result
        return result

    def _index_error(self, what: str, exc: BaseException) -> Unavailable | None:
        mapped = _index_unavailable(what, exc)
        if mapped is not None:
            self.metrics.index_errors.inc(tags={"kind": type(exc).__name__})
        return mapped

    async def retrieve(self, question: str, k: int, with_memory: bool):
        r = await self._call("retriever", self.retriever.retrieve.remote(question, k, with_memory))
        self.metrics.retrieved(r, with_memory)
        return r

    async def generate(self, question: str, background):
        g = await self._call("generator", self.generator.answer.remote(question, background))
        self.metrics.generated(g)
        return g

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


def build_app(args: dict[str, Any] | AppArgs) -> serve.Application:
    """The application for ``args`` (:class:`AppArgs` or its mapping): the ``import_path`` of
    ``serve/config.yaml`` (``serve.app:build_app``) and of ``serve run serve.app:build_app model=...
    index_uri=...``. Relative model and index paths are made absolute here. Deployment options and
    ``user_config`` come from the config file's ``deployments:`` list, applied by Serve itself."""
    return application(args)


def application(args: dict[str, Any] | AppArgs, deployments: dict[str, dict] | list[dict] | None = None
                ) -> serve.Application:
    """:func:`build_app` with ``deployments`` applied here (a config file's ``deployments:`` list, or
    ``{name: options}``): what ``clara serve``, the demo, the tests and the benchmark call to get the
    same app as ``serve run serve/config.yaml`` from Python."""
    a = args if isinstance(args, AppArgs) else load(AppArgs, args, source="args")
    a = a.resolved()
    if isinstance(deployments, list):
        deployments = check_deployments(deployments)
    elif deployments:
        deployments = check_deployments([{"name": k, **v} for k, v in deployments.items()])
    options = deployments or {}
    retriever = RetrieverDeployment.options(**options.get("Retriever", {})).bind(**a.retriever())
    generator = GeneratorDeployment.options(**options.get("Generator", {})).bind(**a.generator())
    return Ingress.options(**options.get("Ingress", {})).bind(retriever, generator, dataclasses.asdict(a.ingress()))


# --------------------------------------------------------------------------------------------
# clara serve


def build_parser() -> argparse.ArgumentParser:
    from clara.settings import add_flags

    p = argparse.ArgumentParser(
        prog="clara serve",
        description="Run the CLaRa Serve application of a Serve config file (default serve/config.yaml: its args, "
                    "and its deployments' options and user_config, as `serve run` applies them) on a local Ray, or "
                    "on the Ray at --address, until interrupted. The flags below override the file's args; "
                    "--check validates everything (args, each deployment's options against Serve's schema, each "
                    "user_config) and prints it with secrets masked. On a cluster, use `serve deploy` with the "
                    "same file: a change of user_config only is applied to the running replicas.",
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="Serve config file (default: the package's "
                   "serve/config.yaml)")
    p.add_argument("--app", help="application in the config file (default: the first)")
    add_flags(p.add_argument_group("application args (override the file's)"), AppArgs)
    p.add_argument("--host", help="HTTP host (config file's http_options.host, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (config file's http_options.port, else 8000)")
    p.add_argument("--address", help="Ray address to connect to (default: start a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (default: all)")
    p.add_argument("--check", action="store_true", help="validate the settings, print them as JSON and exit")
    return p


def settings_from_args(args: argparse.Namespace) -> tuple[AppArgs, dict[str, dict], dict[str, Any]]:
    """(app args: the file's, then the flags given; deployments' options; serve options: name, route
    prefix, host, port, proxy location)."""
    from clara.settings import from_args

    app = read_config_file(args.config, args.app)
    a = from_args(AppArgs, args, config="", base=app.args, source=str(args.config)).resolved()
    http = app.http_options
    opts = {"name": app.name, "route_prefix": app.route_prefix, "host": args.host or http.get("host", "127.0.0.1"),
            "port": args.port or http.get("port", 8000), "proxy_location": app.proxy_location or "HeadOnly"}
    return a, app.deployments, opts


def main(argv: Sequence[str] | None = None) -> int:
    from clara.settings import ConfigError

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        app_args, deployments, opts = settings_from_args(args)
    except (ConfigError, OSError) as exc:  # a config error is the user's to fix: no traceback
        print(f"clara serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(json.dumps({**redacted(app_args, deployments), "serve": opts}, indent=2))
        return 0
    import ray

    if not ray.is_initialized():
        init: dict[str, Any] = {"address": args.address, "include_dashboard": False}
        if args.num_cpus is not None:
            init["num_cpus"] = args.num_cpus
        ray.init(**init)
    serve.start(http_options={"host": opts["host"], "port": opts["port"]}, proxy_location=opts["proxy_location"])
    serve.run(application(app_args, deployments), name=opts["name"], route_prefix=opts["route_prefix"],
              blocking=False)
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
