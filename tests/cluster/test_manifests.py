"""The manifests in cluster/: they parse, they hold to the KubeRay v1 and Kubernetes schemas of the fields
they use, everything they name exists, and they agree with each other and with serve/config.yaml.

No Ray is started and no cluster is needed: ~30-60 s, most of it the ``--help`` subprocesses (each
entrypoint imports torch). The pod templates and the plain Kubernetes objects are validated against the
Kubernetes OpenAPI schemas bundled by ``kubernetes-validate`` (strict: unknown fields fail) when it is
installed; KubeRay's CRDs are not bundled anywhere installable, so the Ray resources are checked against
the field lists below, taken from the ray.io/v1 API reference (KubeRay 1.6+, RayCronJob alpha).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
SERVE_CONFIG = ROOT / "serve" / "config.yaml"

RAY_JOB_FILES = ("rayjob-synth.yaml", "rayjob-train-stage1.yaml", "rayjob-train-stage2.yaml",
                 "rayjob-train-stage3.yaml", "rayjob-index.yaml", "rayjob-evaluate.yaml")
EXPECTED_FILES = (*RAY_JOB_FILES, "raycluster.yaml", "rayservice.yaml", "raycronjob-reindex.yaml",
                  "cronjob-reindex.yaml", "cluster-launcher.yaml", "runtime_env.yaml", "serve-site.yaml",
                  "Dockerfile", "README.md", "SCALE.md")
#: Files that are not Kubernetes resources.
PLAIN_FILES = ("runtime_env.yaml", "cluster-launcher.yaml", "serve-site.yaml")

# ---- KubeRay ray.io/v1: the fields of each spec (allowed) and the ones these manifests must set (required)
RAY_CLUSTER_SPEC = ({"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
                     "workerGroupSpecs", "headServiceAnnotations", "suspend", "managedBy",
                     "gcsFaultToleranceOptions", "authOptions"},
                    {"rayVersion", "headGroupSpec", "workerGroupSpecs"})
HEAD_GROUP = ({"rayStartParams", "template", "serviceType", "headService", "enableIngress"},
              {"rayStartParams", "template"})
WORKER_GROUP = ({"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template", "numOfHosts",
                 "scaleStrategy", "suspend", "idleTimeoutSeconds"},
                {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"})
RAY_JOB_SPEC = ({"entrypoint", "runtimeEnvYAML", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
                 "activeDeadlineSeconds", "backoffLimit", "submissionMode", "rayClusterSpec", "clusterSelector",
                 "submitterPodTemplate", "submitterConfig", "metadata", "suspend", "entrypointNumCpus",
                 "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "deletionStrategy"},
                {"entrypoint", "submissionMode", "shutdownAfterJobFinishes",
                 "ttlSecondsAfterFinished", "rayClusterSpec"})
RAY_SERVICE_SPEC = ({"serveConfigV2", "rayClusterConfig", "upgradeStrategy", "serviceUnhealthySecondThreshold",
                     "deploymentUnhealthySecondThreshold", "serveService", "excludeHeadPodFromServeSvc"},
                    {"serveConfigV2", "rayClusterConfig"})
RAY_CRON_JOB_SPEC = ({"schedule", "jobTemplate", "suspend"}, {"schedule", "jobTemplate"})
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
RUNTIME_ENV_KEYS = {"working_dir", "py_modules", "pip", "uv", "conda", "env_vars", "excludes", "config",
                    "py_executable", "image_uri", "worker_process_setup_hook"}

#: The registry placeholder of the project's images, and their variants (cluster/Dockerfile's header).
REGISTRY = "YOUR-REGISTRY"
IMAGE_VARIANTS = ("cpu", "gpu", "serve", "serve-gpu")

# The Serve application settings a site changes in cluster/rayservice.yaml; everything else in its
# serveConfigV2 equals serve/config.yaml (see test_rayservice_serve_config_is_produced_from_serve_config_yaml).
SITE_APP_ARGS = ("model", "index_uri")


# -------------------------------------------------------------------------------------------------
# loading


def _load(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@cache
def documents() -> dict[str, list[Any]]:
    """``{file name: [YAML documents]}`` of every cluster/*.yaml (raises on a file that does not parse)."""
    return {p.name: _load(p) for p in sorted(CLUSTER.glob("*.yaml"))}


def resources(kind: str) -> list[tuple[str, dict]]:
    return [(f, d) for f, docs in documents().items() if f not in PLAIN_FILES for d in docs if d.get("kind") == kind]


def one(file: str, kind: str) -> dict:
    found = [d for d in documents()[file] if d.get("kind") == kind]
    assert len(found) == 1, f"{file}: expected one {kind}, found {len(found)}"
    return found[0]


def configmap_rayjobs() -> list[tuple[str, dict]]:
    """RayJobs kept as templates in ConfigMaps (the plain-CronJob reindex)."""
    out = []
    for f, cm in resources("ConfigMap"):
        for key, text in (cm.get("data") or {}).items():
            doc = yaml.safe_load(text)
            if isinstance(doc, dict) and doc.get("kind") == "RayJob":
                out.append((f"{f}:ConfigMap/{cm['metadata']['name']}/{key}", doc))
    return out


def job_specs() -> list[tuple[str, dict]]:
    """``(where, RayJob spec)`` of every RayJob: the rayjob-*.yaml, RayCronJob templates, ConfigMap templates."""
    specs = [(f"{f}:RayJob", d["spec"]) for f, d in resources("RayJob")]
    specs += [(f"{f}:RayCronJob.jobTemplate", d["spec"]["jobTemplate"]) for f, d in resources("RayCronJob")]
    specs += [(w, d["spec"]) for w, d in configmap_rayjobs()]
    return specs


def shared_runtime_env() -> dict:
    return documents()["runtime_env.yaml"][0]


def serve_config_v2() -> dict:
    return yaml.safe_load(one("rayservice.yaml", "RayService")["spec"]["serveConfigV2"])


def pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def ray_pin() -> str:
    """The Ray version pinned in pyproject.toml (``ray[...]==X``)."""
    for dep in pyproject()["project"]["dependencies"]:
        m = re.fullmatch(r"ray(\[[^\]]*\])?==([\w.]+)", dep.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError("pyproject.toml pins no ray==X")


# -------------------------------------------------------------------------------------------------
# commands named in manifests (and in cluster/README.md)


def split_commands(text: str) -> list[list[str]]:
    """A shell command line as a list of simple commands (split on ``&&``, ``||`` and ``;``)."""
    words = shlex.split(text.replace("\\\n", " "), comments=False)
    out, cur = [], []
    for w in words:
        if w in ("&&", "||", ";"):
            out.append(cur)
            cur = []
        else:
            cur.append(w)
    out.append(cur)
    return [c for c in out if c]


def module_commands(text: str) -> list[tuple[str, list[str]]]:
    """``(module, argv)`` of every ``python -m module argv...`` in a shell command line."""
    out = []
    for cmd in split_commands(text):
        for i in range(len(cmd) - 2):
            if re.fullmatch(r"python[\d.]*", cmd[i]) and cmd[i + 1] == "-m":
                out.append((cmd[i + 2], cmd[i + 3:]))
                break
    return out


def manifest_commands() -> list[tuple[str, str, list[str]]]:
    """``(where, module, argv)`` of every ``python -m`` command in a manifest's entrypoint."""
    return [(where, m, argv) for where, spec in job_specs() for m, argv in module_commands(spec["entrypoint"])]


def readme_commands() -> list[tuple[str, str, list[str]]]:
    """``python -m`` commands in the shell code blocks of cluster/README.md (``ray job submit ... -- python -m``
    included), continuation lines joined."""
    text = (CLUSTER / "README.md").read_text()
    out = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if "python -m" in line:
                out += [("cluster/README.md", m, argv) for m, argv in module_commands(line)]
    return out


def argv_of(module: str, where_filter: str) -> list[list[str]]:
    return [argv for where, m, argv in manifest_commands() if m == module and where_filter in where]


def flag(argv: list[str], name: str) -> str:
    """The value of ``--name`` in an argv (``--name value`` or ``--name=value``)."""
    for i, a in enumerate(argv):
        if a == name:
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


def overrides(argv: list[str]) -> dict[str, str]:
    """The ``key=value`` pairs after ``--override`` in a pipelines.train argv."""
    i = argv.index("--override")
    out = {}
    for a in argv[i + 1:]:
        if a.startswith("--"):
            break
        k, _, v = a.partition("=")
        out[k] = v
    return out


# -------------------------------------------------------------------------------------------------
# schema checks


def _check_keys(obj: Any, schema: tuple[set, set], where: str, errors: list[str]) -> bool:
    allowed, required = schema
    if not isinstance(obj, dict):
        errors.append(f"{where}: expected a mapping, got {type(obj).__name__}")
        return False
    errors += [f"{where}: unknown field {k!r}" for k in sorted(set(obj) - allowed)]
    errors += [f"{where}: missing field {k!r}" for k in sorted(required - set(obj))]
    return True


def _str_map(obj: Any, where: str, errors: list[str]) -> None:
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in obj.items()):
        errors.append(f"{where}: must map strings to strings (KubeRay's map[string]string), got {obj!r}")


@cache
def _pod_template_validator():
    kv = pytest.importorskip("kubernetes_validate.utils")
    import jsonschema
    from referencing import Registry, Resource

    version = "1.30.0"  # the oldest Kubernetes these manifests target (CronJob.timeZone is GA since 1.27)
    base = f"kubernetes-json-schema/v{version}-local-strict"
    schema = kv.schema_contents(f"{base}/podtemplatespec-v1.json", version)
    defs = kv.schema_contents(f"{base}/_definitions.json", version)
    registry = Resource.from_contents(schema) @ Registry()
    registry = Resource.from_contents(defs) @ registry
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def project_image(variant: str) -> str:
    """The project's image of one role (``cpu``, ``gpu``, ``serve``, ``serve-gpu``; cluster/Dockerfile)."""
    return f"{REGISTRY}/clara-on-ray:{pyproject()['project']['version']}-{variant}"


def _check_container(c: dict, where: str, errors: list[str], ray_image: bool) -> None:
    image = c.get("image", "")
    if ray_image:
        if image not in {project_image(v) for v in IMAGE_VARIANTS}:
            errors.append(f"{where}: image {image!r} is not one of the project's images "
                          f"{project_image('{' + ','.join(IMAGE_VARIANTS) + '}')} (cluster/Dockerfile)")
    elif not re.fullmatch(r"[\w./-]+:v?\d[\w.-]*(@sha256:[0-9a-f]{64})?", image):
        errors.append(f"{where}: image {image!r} is not pinned to a version tag")
    res = c.get("resources") or {}
    for part in ("requests", "limits"):
        missing = {"cpu", "memory"} - set(res.get(part) or {})
        if missing:
            errors.append(f"{where}: resources.{part} lacks {sorted(missing)}")
    if ray_image and (res.get("requests") != res.get("limits")):
        errors.append(f"{where}: a Ray container's requests should equal its limits (Ray sizes itself by them)")
    gpus = (res.get("limits") or {}).get("nvidia.com/gpu")
    if ray_image and gpus and not image.endswith("-gpu"):
        errors.append(f"{where}: asks for GPUs but runs the CPU image {image!r}")
    if ray_image and image.endswith("-gpu") and not gpus:
        errors.append(f"{where}: runs the GPU image without asking for a GPU")


def _check_pod_template(t: Any, where: str, errors: list[str], ray: bool = True) -> None:
    if not isinstance(t, dict) or not isinstance(t.get("spec"), dict) or not t["spec"].get("containers"):
        errors.append(f"{where}: a pod template needs spec.containers")
        return
    try:
        validator = _pod_template_validator()
    except pytest.skip.Exception:
        validator = None
    if validator is not None:
        errors += [f"{where}.{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(t)]
    for i, c in enumerate(t["spec"]["containers"]):
        _check_container(c, f"{where}.spec.containers[{i}]", errors, ray_image=ray and i == 0)


def check_ray_cluster_spec(spec: Any, where: str, errors: list[str]) -> None:
    if not _check_keys(spec, RAY_CLUSTER_SPEC, where, errors):
        return
    if str(spec.get("rayVersion")) != ray_pin():
        errors.append(f"{where}.rayVersion: {spec.get('rayVersion')!r} != the pinned Ray {ray_pin()}")
    head = spec.get("headGroupSpec")
    if _check_keys(head, HEAD_GROUP, f"{where}.headGroupSpec", errors):
        _str_map(head.get("rayStartParams"), f"{where}.headGroupSpec.rayStartParams", errors)
        _check_pod_template(head.get("template"), f"{where}.headGroupSpec.template", errors)
    groups = spec.get("workerGroupSpecs") or []
    names = [g.get("groupName") for g in groups if isinstance(g, dict)]
    if len(set(names)) != len(names):
        errors.append(f"{where}.workerGroupSpecs: duplicate groupName in {names}")
    for i, g in enumerate(groups):
        w = f"{where}.workerGroupSpecs[{i}]"
        if not _check_keys(g, WORKER_GROUP, w, errors):
            continue
        _str_map(g.get("rayStartParams"), f"{w}.rayStartParams", errors)
        counts = [g.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        if not all(isinstance(n, int) and n >= 0 for n in counts) or not counts[0] <= counts[1] <= counts[2]:
            errors.append(f"{w}: need 0 <= minReplicas <= replicas <= maxReplicas, got {counts}")
        _check_pod_template(g.get("template"), f"{w}.template", errors)


def check_runtime_env_yaml(text: Any, where: str, errors: list[str]) -> None:
    from ray.runtime_env import RuntimeEnv

    if not isinstance(text, str):
        errors.append(f"{where}: runtimeEnvYAML must be a string (a YAML document), got {type(text).__name__}")
        return
    env = yaml.safe_load(text)
    if not isinstance(env, dict):
        errors.append(f"{where}: runtimeEnvYAML must hold a mapping")
        return
    errors += [f"{where}: unknown runtime_env field {k!r}" for k in sorted(set(env) - RUNTIME_ENV_KEYS)]
    try:
        RuntimeEnv(**env)  # Ray's own validation (types, working_dir URI form)
    except Exception as exc:  # any validation failure is the finding
        errors.append(f"{where}: not a valid runtime_env: {exc}")


def check_ray_job_spec(spec: Any, where: str, errors: list[str]) -> None:
    if not _check_keys(spec, RAY_JOB_SPEC, where, errors):
        return
    if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
        errors.append(f"{where}.entrypoint: must be a non-empty string")
    if spec.get("submissionMode") not in SUBMISSION_MODES:
        errors.append(f"{where}.submissionMode: {spec.get('submissionMode')!r} not in {sorted(SUBMISSION_MODES)}")
    if not isinstance(spec.get("shutdownAfterJobFinishes"), bool):
        errors.append(f"{where}.shutdownAfterJobFinishes: must be a boolean")
    for k in ("ttlSecondsAfterFinished", "backoffLimit", "activeDeadlineSeconds"):
        v = spec.get(k, 0 if k != "activeDeadlineSeconds" else 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if k == "activeDeadlineSeconds" else 0):
            errors.append(f"{where}.{k}: must be a {'positive' if k == 'activeDeadlineSeconds' else 'non-negative'} "
                          f"integer, got {v!r}")
    if "runtimeEnvYAML" in spec:
        check_runtime_env_yaml(spec["runtimeEnvYAML"], f"{where}.runtimeEnvYAML", errors)
    check_ray_cluster_spec(spec.get("rayClusterSpec"), f"{where}.rayClusterSpec", errors)


def check_metadata(doc: dict, where: str, errors: list[str], generate_name_ok: bool = False) -> None:
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        errors.append(f"{where}: missing metadata")
        return
    name = meta.get("name") or (meta.get("generateName") if generate_name_ok else None)
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?-?", name) or len(name) > 63:
        errors.append(f"{where}: metadata.name {name!r} is not a DNS-1123 label")


# -------------------------------------------------------------------------------------------------
# tests: files and parsing


def test_every_expected_manifest_exists():
    missing = [f for f in EXPECTED_FILES if not (CLUSTER / f).is_file()]
    assert not missing, f"missing in cluster/: {missing}"


def test_every_manifest_parses():
    docs = documents()  # raises naming the file if one does not parse
    assert set(docs) >= {f for f in EXPECTED_FILES if f.endswith(".yaml")}
    for f, ds in docs.items():
        assert ds, f"{f}: empty"
        if f in PLAIN_FILES:
            assert len(ds) == 1 and isinstance(ds[0], dict), f"{f}: expected one mapping"
            continue
        for d in ds:
            assert isinstance(d, dict) and d.get("apiVersion") and d.get("kind"), f"{f}: a document lacks a kind"
    # the YAML embedded in strings parses too
    for where, spec in job_specs():
        assert "runtimeEnvYAML" not in spec or isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict), where
    assert isinstance(serve_config_v2(), dict)


# -------------------------------------------------------------------------------------------------
# tests: schemas


def test_ray_resources_follow_the_kuberay_v1_schema():
    errors: list[str] = []
    kinds = {"RayCluster": 0, "RayJob": 0, "RayService": 0, "RayCronJob": 0}
    for f, docs in documents().items():
        if f in PLAIN_FILES:
            continue
        for d in docs:
            kind = d.get("kind")
            if kind not in kinds:
                continue
            kinds[kind] += 1
            where = f"{f}:{kind}"
            if d.get("apiVersion") != "ray.io/v1":
                errors.append(f"{where}: apiVersion {d.get('apiVersion')!r} != ray.io/v1")
            check_metadata(d, where, errors)
            spec = d.get("spec")
            if kind == "RayCluster":
                check_ray_cluster_spec(spec, f"{where}.spec", errors)
            elif kind == "RayJob":
                check_ray_job_spec(spec, f"{where}.spec", errors)
            elif kind == "RayService" and _check_keys(spec, RAY_SERVICE_SPEC, f"{where}.spec", errors):
                if not isinstance(spec.get("serveConfigV2"), str):
                    errors.append(f"{where}.spec.serveConfigV2: must be a string (a YAML document)")
                check_ray_cluster_spec(spec.get("rayClusterConfig"), f"{where}.spec.rayClusterConfig", errors)
            elif kind == "RayCronJob" and _check_keys(spec, RAY_CRON_JOB_SPEC, f"{where}.spec", errors):
                fields = str(spec.get("schedule", "")).split()
                if len(fields) != 5 or not all(re.fullmatch(r"[\d*,/-]+", x) for x in fields):
                    errors.append(f"{where}.spec.schedule: {spec.get('schedule')!r} is not a 5-field cron schedule")
                check_ray_job_spec(spec.get("jobTemplate"), f"{where}.spec.jobTemplate", errors)
    for where, doc in configmap_rayjobs():
        if doc.get("apiVersion") != "ray.io/v1":
            errors.append(f"{where}: apiVersion {doc.get('apiVersion')!r} != ray.io/v1")
        check_metadata(doc, where, errors, generate_name_ok=True)
        check_ray_job_spec(doc.get("spec"), f"{where}.spec", errors)
    assert kinds == {"RayCluster": 1, "RayJob": len(RAY_JOB_FILES), "RayService": 1, "RayCronJob": 1}, kinds
    assert not errors, "\n".join(errors)


def test_the_cluster_has_a_head_a_cpu_group_and_a_gpu_group():
    spec = one("raycluster.yaml", "RayCluster")["spec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    limits = {n: g["template"]["spec"]["containers"][0]["resources"]["limits"] for n, g in groups.items()}
    assert "nvidia.com/gpu" not in limits["cpu"] and int(limits["gpu"]["nvidia.com/gpu"]) >= 1
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"  # drivers only on the head


def test_plain_kubernetes_objects_validate_against_the_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    checked = []
    for f, docs in documents().items():
        if f in PLAIN_FILES:
            continue
        for d in docs:
            if d["apiVersion"].startswith("ray.io/"):
                continue
            kv.validate(d, "1.30.0", strict=True)  # raises with the path of the bad field
            checked.append(d["kind"])
    assert sorted(checked) == ["ConfigMap", "CronJob", "NetworkPolicy", "Role", "RoleBinding", "ServiceAccount"]


def test_what_the_manifests_expose():
    """The API tokens reach every pod an ingress replica can run on, from a required Secret; the
    interactive cluster keeps the dashboard (job submission) on the pod; the Serve head is fenced."""
    service = one("rayservice.yaml", "RayService")["spec"]["rayClusterConfig"]
    for group in service["workerGroupSpecs"]:
        refs = [e["secretRef"] for c in group["template"]["spec"]["containers"] for e in c.get("envFrom", [])]
        assert {"name": "clara-serve-tokens"} in refs, group["groupName"]  # not optional: never open by accident
    assert service["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # so no ingress replica on the head
    assert one("raycluster.yaml", "RayCluster")["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] \
        == "127.0.0.1"
    assert "--dashboard-host=127.0.0.1" in (CLUSTER / "cluster-launcher.yaml").read_text()
    policy = one("rayservice.yaml", "NetworkPolicy")["spec"]
    head_labels = {**service["headGroupSpec"]["template"]["metadata"]["labels"], "ray.io/node-type": "head"}
    assert policy["podSelector"]["matchLabels"].items() <= head_labels.items()
    open_ports = [r for r in policy["ingress"] if "from" not in r]
    assert [p["port"] for r in open_ports for p in r["ports"]] == [8000]


def test_the_plain_cronjob_may_create_rayjobs_and_nothing_more():
    f = "cronjob-reindex.yaml"
    sa, role, binding = one(f, "ServiceAccount"), one(f, "Role"), one(f, "RoleBinding")
    cron, cm = one(f, "CronJob"), one(f, "ConfigMap")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"]}]
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list"]}]
    # the pod creates the RayJob kept in the ConfigMap it mounts
    (container,) = pod["containers"]
    mounts = {v["name"]: v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] in mounts]
    assert mounts[mount["name"]] == cm["metadata"]["name"]
    (key,) = cm["data"]
    assert container["command"] + container["args"] == ["kubectl", "create", "-f", f"{mount['mountPath']}/{key}"]
    assert yaml.safe_load(cm["data"][key])["metadata"]["generateName"]  # a fresh RayJob per run


# -------------------------------------------------------------------------------------------------
# tests: the manifests agree with each other and with the project


def test_the_scheduled_reindex_runs_exactly_the_index_job():
    index = one("rayjob-index.yaml", "RayJob")["spec"]
    cron = one("raycronjob-reindex.yaml", "RayCronJob")["spec"]
    plain = one("cronjob-reindex.yaml", "CronJob")["spec"]
    (template,) = [doc for _, doc in configmap_rayjobs()]
    assert cron["jobTemplate"] == index
    assert template["spec"] == index
    assert cron["schedule"] == plain["schedule"]
    argv = argv_of("pipelines.index", "rayjob-index.yaml")[0]
    assert "--delete-missing" in argv  # documents gone from the corpus leave the index
    assert index.get("activeDeadlineSeconds", 0) < 24 * 3600  # a stuck run ends before the next nightly one


def _images(template: dict) -> list[tuple[str, bool]]:
    """``(image, asks for a GPU)`` of a pod template's Ray container."""
    c = template["spec"]["containers"][0]
    return [(c["image"], bool((c.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu")))]


def _cluster_images(spec: dict) -> list[tuple[str, bool]]:
    out = _images(spec["headGroupSpec"]["template"])
    for g in spec["workerGroupSpecs"]:
        out += _images(g["template"])
    return out


def test_the_manifests_run_the_project_images_and_install_nothing_at_start():
    """Jobs run the -cpu / -gpu images (training stack included), the RayService the -serve ones (without
    it); no manifest pip-installs or uploads code at start; every image is one cluster/Dockerfile builds."""
    clusters = [(w, spec["rayClusterSpec"], ("cpu", "gpu")) for w, spec in job_specs()]
    clusters.append(("raycluster.yaml", one("raycluster.yaml", "RayCluster")["spec"], ("cpu", "gpu")))
    clusters.append(("rayservice.yaml", one("rayservice.yaml", "RayService")["spec"]["rayClusterConfig"],
                     ("serve", "serve-gpu")))
    used = set()
    for where, spec, (cpu, gpu) in clusters:
        for image, wants_gpu in _cluster_images(spec):
            assert image == project_image(gpu if wants_gpu else cpu), f"{where}: {image}"
            used.add(image)
    assert used == {project_image(v) for v in IMAGE_VARIANTS}
    for where, spec in job_specs():
        env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
        assert not {"pip", "uv", "conda", "working_dir"} & set(env), f"{where}: installs at start: {sorted(env)}"
    for app in serve_config_v2()["applications"]:
        assert not {"pip", "uv", "conda", "working_dir"} & set(app.get("runtime_env") or {}), app["name"]

    # each image is built by a command in the Dockerfile's header, the serve images without the training stack
    text = (CLUSTER / "Dockerfile").read_text()
    builds = {}
    for command in re.findall(r"docker build (.+?)(?<!\\)$", re.sub(r"\\\n#\s*", " ", text), re.M):
        tag = re.search(r"-t (\S+)", command).group(1)
        extras = re.search(r"EXTRAS=(\S*)", command)
        base = re.search(r"BASE=(\S+)", command)
        builds[tag] = (extras.group(1) if extras else re.search(r"^ARG EXTRAS=(\S*)", text, re.M).group(1),
                       base.group(1) if base else re.search(r"^ARG BASE=(\S+)", text, re.M).group(1))
    assert set(builds) == {project_image(v) for v in IMAGE_VARIANTS}, sorted(builds)
    for variant in IMAGE_VARIANTS:
        extras, base = builds[project_image(variant)]
        assert base.endswith("-gpu") == variant.endswith("gpu"), (variant, base)
        roles = set(filter(None, extras.split(",")))
        if variant.startswith("serve"):
            assert not roles & {"all", "train"}, f"the {variant} image carries the training stack: {extras}"
        else:
            assert "all" in roles, f"the {variant} image lacks the jobs' extras: {extras}"


def test_the_shared_runtime_env_is_the_project_dependencies_for_stock_ray_clusters():
    """cluster/runtime_env.yaml serves `ray job submit --runtime-env` on a cluster of plain Ray images."""
    shared = shared_runtime_env()
    assert "working_dir" not in shared  # `ray job submit --working-dir .` supplies it from a checkout
    deps = pyproject()["project"]["dependencies"]
    assert sorted(shared["pip"]) == sorted(d for d in deps if not re.match(r"ray\b", d)), \
        "cluster/runtime_env.yaml's pip list is not pyproject.toml's dependencies (Ray left out)"
    errors: list[str] = []
    check_runtime_env_yaml(yaml.safe_dump(shared), "runtime_env.yaml", errors)
    assert not errors, errors


def test_recipes_resolve_from_any_directory(tmp_path, monkeypatch):
    """The image has no checkout: a job's `--config pipelines/recipes/X.yaml` finds the shipped recipe."""
    from pipelines.train import TrainJobConfig, recipe_path

    monkeypatch.chdir(tmp_path)
    for name in ("pipelines/recipes/stage1_scp.yaml", "stage1_scp", "stage1_scp.yaml"):
        assert recipe_path(name) == ROOT / "pipelines" / "recipes" / "stage1_scp.yaml", name
        assert TrainJobConfig.from_yaml(name).stage == "scp"
    mine = tmp_path / "pipelines" / "recipes" / "stage1_scp.yaml"
    mine.parent.mkdir(parents=True)
    mine.write_text("stage: scp\ndata: mine.jsonl\nmodel: {base_model: tiny}\n")
    assert TrainJobConfig.from_yaml("pipelines/recipes/stage1_scp.yaml").data == ["mine.jsonl"]  # the user's wins
    assert recipe_path("missing.yaml") == Path("missing.yaml")


def test_manifests_name_one_object_store_bucket():
    text = "\n".join(p.read_text() for p in CLUSTER.glob("*.yaml"))
    buckets = set(re.findall(r"\b(s3|gs)://([\w.-]+)", text))
    assert buckets == {("s3", "YOUR-BUCKET")}, buckets  # one placeholder to replace (see README.md)
    registries = set(re.findall(r"image: ([\w.-]+)/clara-on-ray:", text))
    assert registries == {REGISTRY}, registries


def test_the_jobs_are_wired_into_one_pipeline():
    """Each stage reads what the previous one wrote; index, evaluation and Serve use the stage-3 model."""
    synth = argv_of("pipelines.synth", "rayjob-synth.yaml")[0]
    records = f"{flag(synth, '--out')}/records.jsonl"
    train = {f"stage{i}": overrides(argv_of("pipelines.train", f"rayjob-train-stage{i}.yaml")[0]) for i in (1, 2, 3)}
    derive = {s: argv_of("pipelines.derive", f"rayjob-train-{s}.yaml")[0] for s in ("stage2", "stage3")}
    assert train["stage1"]["data"] == records
    for s in ("stage2", "stage3"):
        assert flag(derive[s], "--input") == records
        assert train[s]["data"] == flag(derive[s], "--out")
    assert train["stage2"]["init"] == train["stage1"]["export_dir"]
    assert train["stage3"]["init"] == train["stage2"]["export_dir"]
    assert len({t["storage_path"] for t in train.values()}) == 1  # one checkpoint store
    model = train["stage3"]["export_dir"]
    index = argv_of("pipelines.index", "rayjob-index.yaml")[0]
    evaluate = argv_of("pipelines.evaluate", "rayjob-evaluate.yaml")[0]
    assert flag(index, "--model") == model and flag(evaluate, "--model") == model
    assert flag(evaluate, "--data") == flag(derive["stage3"], "--holdout-out")
    (app,) = serve_config_v2()["applications"]
    assert app["args"]["model"] == model
    assert app["args"]["index_uri"] == flag(index, "--table-uri")
    assert app["args"].get("table", "chunks") == (flag(index, "--table-name") if "--table-name" in index else "chunks")


def test_the_cluster_launcher_describes_a_head_and_cpu_and_gpu_workers():
    cfg = documents()["cluster-launcher.yaml"][0]
    for k in ("cluster_name", "provider", "available_node_types", "head_node_type", "docker", "setup_commands",
              "head_start_ray_commands", "worker_start_ray_commands"):
        assert k in cfg, k
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and {"cpu", "gpu"} <= set(types)
    for name, t in types.items():
        assert "node_config" in t and "resources" in t, name
        if name != cfg["head_node_type"]:
            assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], name
    images = [cfg["docker"]["image"], cfg["docker"].get("head_image")] + [
        t.get("docker", {}).get("worker_image") for t in types.values()]
    pin = re.escape(ray_pin())
    for image in filter(None, images):
        assert re.fullmatch(rf"rayproject/ray:{pin}-py311(-gpu)?", image), image


def test_readme_covers_every_manifest_and_job():
    text = (CLUSTER / "README.md").read_text()
    for f in EXPECTED_FILES:
        if f != "README.md":
            assert f in text, f"cluster/README.md does not mention {f}"
    modules = {m for _, m, _ in readme_commands()}
    assert modules >= {m for _, m, _ in manifest_commands()}, "README.md lacks a `ray job submit` for some job"
    for phrase in ("ray job submit --working-dir .", "storage_path", "rollback", "versions", "index_refresh_s"):
        assert phrase in text, phrase


# -------------------------------------------------------------------------------------------------
# tests: what the manifests name exists


def _modules() -> list[str]:
    try:
        return sorted({m for _, m, _ in manifest_commands()})
    except Exception:  # test_every_manifest_parses reports it
        return []


def test_manifests_name_every_job():
    assert set(_modules()) == {"pipelines.synth", "pipelines.train", "pipelines.derive", "pipelines.index",
                               "pipelines.evaluate"}


@pytest.mark.parametrize("module", _modules())
def test_every_entrypoint_answers_help(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout


# Runs in a subprocess: for each (module, argv) run the module as `python -m module argv` up to the point
# where its argparse parser has accepted the arguments, then stop (nothing is executed); a training command's
# recipe and overrides are also loaded into the job's typed config.
_ARGV_CHECKER = textwrap.dedent("""
    import argparse, contextlib, io, json, runpy, sys

    class Parsed(Exception):
        pass

    real = argparse.ArgumentParser.parse_known_args
    depth = 0

    def parse_known_args(self, args=None, namespace=None):
        # parse_args calls this; stop the program once the outermost parser has accepted its arguments
        global depth
        depth += 1
        try:
            ns, extras = real(self, args, namespace)
        finally:
            depth -= 1
        if depth == 0:
            raise Parsed(ns, extras)
        return ns, extras

    argparse.ArgumentParser.parse_known_args = parse_known_args
    results = []
    for module, argv in json.load(sys.stdin):
        sys.argv = [module, *argv]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            results.append(f"{module}: ran without parsing its arguments")
        except Parsed as p:
            ns, extras = p.args
            if extras:
                results.append(f"{module} {' '.join(argv)}: unrecognized arguments: {' '.join(extras)}")
                continue
            if module == "pipelines.train":
                from pipelines.train import TrainJobConfig
                try:
                    TrainJobConfig.from_yaml(ns.config, ns.override)
                except Exception as exc:
                    results.append(f"{module} {' '.join(argv)}: {exc}")
                    continue
            results.append("")
        except SystemExit as exc:
            results.append(f"{module} {' '.join(argv)}: exit {exc.code}: {err.getvalue()[-1500:]}")
    print(json.dumps(results))
""")


def test_every_command_in_the_manifests_and_readme_parses():
    commands = [(w, m, a) for w, m, a in manifest_commands() + readme_commands() if m.startswith("pipelines.")]
    assert len(commands) >= 8
    proc = subprocess.run([sys.executable, "-c", _ARGV_CHECKER], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, input=json.dumps([[m, a] for _, m, a in commands]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = [f"{w}: {r}" for (w, _, _), r in zip(commands, results) if r]
    assert not errors, "\n".join(errors)


def test_rayservice_import_path_imports_and_builds():
    from ray.serve import Application

    for app in serve_config_v2()["applications"]:
        module_name, _, attr = app["import_path"].partition(":")
        assert (ROOT / Path(*module_name.split("."))).with_suffix(".py").is_file(), app["import_path"]
        import importlib

        target = getattr(importlib.import_module(module_name), attr)
        built = target if isinstance(target, Application) else target(app.get("args") or {})
        assert isinstance(built, Application), f"{app['import_path']} gave {type(built).__name__}"


def test_rayservice_serve_config_is_produced_from_serve_config_yaml():
    """serveConfigV2 is serve/config.yaml + cluster/serve-site.yaml + the shared runtime_env, written by
    `python -m serve.rayservice` (one source); the site changes only what a cluster must change."""
    proc = subprocess.run([sys.executable, "-m", "serve.rayservice", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    from serve.config import check_deployments

    cluster = serve_config_v2()
    assert cluster["proxy_location"] == "EveryNode" and cluster["http_options"]["host"] == "0.0.0.0"
    (app,) = cluster["applications"]
    for k in SITE_APP_ARGS:
        assert str(app["args"][k]).startswith(("/", "s3://", "gs://")), f"{k}: {app['args'][k]!r} is relative"
    deployments = check_deployments(app["deployments"])  # Serve's schema and our user_config, checked
    assert deployments["Generator"]["ray_actor_options"]["num_gpus"] >= 1  # the generator takes a GPU
    local = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]
    assert {k: v for k, v in app["args"].items() if k not in SITE_APP_ARGS} == \
           {k: v for k, v in local["args"].items() if k not in SITE_APP_ARGS}
    for name in ("Ingress", "Retriever"):
        assert deployments[name] == check_deployments(local["deployments"])[name]


def test_the_dockerfile_builds_on_the_pinned_ray_image_with_the_project_extras():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=(\S+)", text, re.M).group(1)
    assert base == f"rayproject/ray:{ray_pin()}-py311" and re.search(r"^FROM \$\{BASE\}", text, re.M)
    assert re.search(r"torch==2\.13\.0", text) and "download.pytorch.org/whl/cpu" in text  # a CPU torch by default
    extras = set(pyproject()["project"]["optional-dependencies"])
    default = re.search(r"^ARG EXTRAS=(\S*)", text, re.M).group(1)
    named = set(default.split(",")) | {e for m in re.findall(r"EXTRAS=([\w,]+)", text) for e in m.split(",")}
    assert named <= extras, named - extras
    for path in re.findall(r"^COPY \S+ (\S+)", text, re.M):  # the package's folders, not the tests
        assert not path.startswith("tests")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)
