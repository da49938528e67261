"""The deployment assets in deploy/ hang together with the server and with each other.

Offline and quick: every YAML and the dashboard parse; every metric the dashboard, the alert rules
and the autoscaler query is one the server really exports (read from `videogen_server.metrics`, not
from a list kept here); the Kubernetes manifests agree on labels, ports, probes and the drain; and,
when `kubernetes-validate` is installed, the built-in kinds validate strictly against the API schema.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import types
import urllib.parse
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "videogen.json"
DASHBOARD_PROVIDER = DEPLOY / "grafana" / "provisioning" / "dashboards" / "videogen.yml"

#: The Kubernetes version whose schemas (shipped inside kubernetes-validate) the manifests must meet:
#: the oldest minor we support (grpc probes are GA from 1.27, unhealthyPodEvictionPolicy from 1.27).
K8S_VERSION = "1.30.0"
GRPC_PORT = 8001
METRICS_PORT = 8002
HEALTH_PORT = 8003  # --health-port: plaintext grpc.health.v1 for the probes

METRIC_REF = re.compile(r"(?<![A-Za-z0-9_:])videogen_[a-z0-9_]*[a-z0-9]")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml") and p.is_file())


def _load_all(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _load(path: Path) -> Any:
    docs = _load_all(path)
    assert len(docs) == 1, f"{_rel(path)}: expected one YAML document, found {len(docs)}"
    return docs[0]


# ---------------------------------------------------------------------------------------------
# Everything parses
# ---------------------------------------------------------------------------------------------

def test_deploy_tree_has_the_expected_files() -> None:
    for path in (COMPOSE, PROMETHEUS, ALERTS, DASHBOARD, DASHBOARD_PROVIDER,
                 DEPLOY / "docker" / "Dockerfile",
                 DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml",
                 K8S / "kustomization.yaml"):
        assert path.is_file(), f"missing {_rel(path)}"


@pytest.mark.parametrize("path", _yaml_files(), ids=_rel)
def test_yaml_parses(path: Path) -> None:
    docs = _load_all(path)
    assert docs, f"{_rel(path)} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{_rel(path)}: a document is a {type(doc).__name__}, not a mapping"


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _panels(dashboard: dict) -> Iterator[dict]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def test_dashboard_parses_and_every_panel_queries_prometheus() -> None:
    dashboard = _dashboard()
    assert dashboard.get("uid") and dashboard.get("title")
    assert dashboard.get("schemaVersion", 0) >= 36
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    assert variables.get("datasource", {}).get("type") == "datasource", "no `datasource` variable"
    panels = [p for p in _panels(dashboard) if p.get("type") != "row"]
    assert len(panels) >= 10
    ids = [p.get("id") for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        title = panel.get("title")
        assert panel.get("datasource", {}).get("uid") == "${datasource}", f"panel {title!r}: datasource not templated"
        targets = panel.get("targets") or []
        assert targets, f"panel {title!r} has no targets"
        for target in targets:
            assert target.get("expr", "").strip(), f"panel {title!r}: target {target.get('refId')} has no expr"


# ---------------------------------------------------------------------------------------------
# Metric names: only what the server exports
# ---------------------------------------------------------------------------------------------

def _fake_pynvml() -> types.ModuleType:
    """Just enough of nvidia-ml-py for NvmlReader to report one device without a GPU."""
    mod = types.ModuleType("pynvml")
    mod.nvmlInit = lambda: None
    mod.nvmlDeviceGetCount = lambda: 1
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(used=1, free=1, total=2)
    return mod


def _series_names(family: Any) -> set[str]:
    """The names under which one collected family appears in the text exposition."""
    name, kind = family.name, family.type
    if kind == "counter":
        # prometheus_client names the family without `_total` (0.4+) and exposes `<name>_total`.
        return {name if name.endswith("_total") else name + "_total"}
    if kind == "histogram":
        return {name + suffix for suffix in HISTOGRAM_SUFFIXES}
    if kind == "summary":
        return {name, name + "_sum", name + "_count"}
    if kind == "info":
        return {name if name.endswith("_info") else name + "_info"}
    return {name}  # gauge, stateset, unknown


@pytest.fixture(scope="module")
def exported() -> tuple[set[str], set[str]]:
    """(every series name the server exposes, the histogram base names) read from the real code."""
    from videogen_server.metrics import InstanceCollector, Metrics, NvmlReader

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "pynvml", _fake_pynvml())
        nvml = NvmlReader()
        families = list(Metrics().registry.collect())
        families += list(InstanceCollector(lambda: [], nvml=nvml).collect())
    names: set[str] = set()
    histograms: set[str] = set()
    for family in families:
        names |= _series_names(family)
        if family.type == "histogram":
            histograms.add(family.name)
    return names, histograms


def test_exported_metric_discovery_sees_every_kind(exported: tuple[set[str], set[str]]) -> None:
    names, histograms = exported
    # One of each way a name is built, so a change in prometheus_client cannot empty the check.
    for expected in ("videogen_requests_total", "videogen_request_duration_seconds_bucket", "videogen_build_info",
                     "videogen_queue_depth", "videogen_device_memory_allocated_bytes",
                     "videogen_gpu_memory_used_bytes"):
        assert expected in names, f"{expected} not found among the exported metrics: {sorted(names)}"
    assert "videogen_request_duration_seconds" in histograms


def _exprs_in(obj: Any, keys: tuple[str, ...]) -> Iterator[str]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in keys and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, dict) and isinstance(value.get("query"), str):
                yield value["query"]  # a query variable's {"query": "label_values(...)"}
            else:
                yield from _exprs_in(value, keys)
    elif isinstance(obj, list):
        for value in obj:
            yield from _exprs_in(value, keys)


def _referenced_metrics() -> dict[str, set[str]]:
    """{metric name: {where it is referenced}} over every PromQL expression in deploy/."""
    sources: list[tuple[str, str]] = []
    sources += [("dashboard", e) for e in _exprs_in(_dashboard(), ("expr", "query", "definition"))]
    for rule in _rules(_load(ALERTS)):
        sources.append((f"{_rel(ALERTS)} {rule.get('alert') or rule.get('record')}", rule["expr"]))
    prometheus_rule = _k8s_docs().get("PrometheusRule")
    if prometheus_rule:
        for rule in _rules(prometheus_rule["spec"]):
            sources.append((f"PrometheusRule {rule.get('alert') or rule.get('record')}", rule["expr"]))
    scaled = _k8s_docs().get("ScaledObject")
    if scaled:
        for trigger in scaled["spec"]["triggers"]:
            if trigger.get("type") == "prometheus":
                sources.append(("ScaledObject", trigger["metadata"]["query"]))
    refs: dict[str, set[str]] = {}
    for where, expr in sources:
        for name in METRIC_REF.findall(expr):
            refs.setdefault(name, set()).add(where)
    return refs


def _rules(doc: dict) -> list[dict]:
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_every_referenced_metric_is_exported(exported: tuple[set[str], set[str]]) -> None:
    names, histograms = exported
    refs = _referenced_metrics()
    assert len(refs) >= 15, f"suspiciously few metric references found: {sorted(refs)}"
    unknown = {}
    for name, where in refs.items():
        if name in names:
            continue
        base = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
        if base in histograms:
            continue
        hint = " (a histogram: query _bucket/_sum/_count)" if name in histograms else ""
        unknown[name] = f"{sorted(where)}{hint}"
    assert not unknown, "metrics the server does not export: " + "; ".join(
        f"{name} in {where}" for name, where in sorted(unknown.items()))


def test_prometheus_rule_matches_alerts_yml() -> None:
    rule = _k8s_docs()["PrometheusRule"]
    assert rule["spec"]["groups"] == _load(ALERTS)["groups"], (
        "deploy/k8s/prometheusrule.yaml and deploy/prometheus/alerts.yml differ: keep their groups identical")


def test_alert_rules_are_complete() -> None:
    for rule in _rules(_load(ALERTS)):
        name = rule.get("alert")
        assert name and rule.get("expr"), f"rule without alert/expr: {rule}"
        assert rule.get("labels", {}).get("severity"), f"{name}: no severity label"
        assert rule.get("annotations", {}).get("summary"), f"{name}: no summary annotation"


# ---------------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------------

def _kustomization() -> dict:
    return _load(K8S / "kustomization.yaml")


def _k8s_resources() -> list[tuple[Path, dict]]:
    out = []
    for name in _kustomization()["resources"]:
        path = K8S / name
        out += [(path, doc) for doc in _load_all(path)]
    return out


def _k8s_docs() -> dict[str, dict]:
    """The objects by kind, PersistentVolumeClaims by `PersistentVolumeClaim/<name>` (there are two)."""
    docs: dict[str, dict] = {}
    for path, doc in _k8s_resources():
        key = doc["kind"] + (f"/{doc['metadata']['name']}" if doc["kind"] == "PersistentVolumeClaim" else "")
        assert key not in docs, f"two {key} objects; the checks assume one of each"
        docs[key] = doc
    return docs


def _flag(args: list[str], flag: str) -> Optional[str]:
    """The value of `--flag=value` or `--flag value` in a container's args (the last one wins)."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
        elif arg == flag and i + 1 < len(args):
            value = args[i + 1]
    return value


def _subset(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    return _k8s_docs()


@pytest.fixture(scope="module")
def server(k8s: dict[str, dict]) -> dict:
    containers = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_kustomization_lists_every_manifest() -> None:
    listed = _kustomization()["resources"]
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization.yaml lists {name}, which does not exist"
    on_disk = {p.name for p in K8S.iterdir() if p.suffix in (".yml", ".yaml") and p.name != "kustomization.yaml"}
    assert on_disk - set(listed) == set(), f"manifests not in kustomization.yaml: {sorted(on_disk - set(listed))}"
    assert len(listed) == len(set(listed))


def test_k8s_has_every_kind(k8s: dict[str, dict]) -> None:
    for kind in ("Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget", "PersistentVolumeClaim/videogen-models",
                 "PersistentVolumeClaim/videogen-compile-cache", "ServiceMonitor", "ScaledObject"):
        assert kind in k8s, f"no {kind} in deploy/k8s"


def test_deployment_requests_one_gpu(server: dict) -> None:
    limits = server["resources"]["limits"]
    assert int(limits.get("nvidia.com/gpu", 0)) == 1, "the server container must limit nvidia.com/gpu: 1"


def test_deployment_ports_match_the_server_args(server: dict) -> None:
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports.get("grpc") == GRPC_PORT and ports.get("metrics") == METRICS_PORT
    assert ports.get("health") == HEALTH_PORT and _flag(server.get("args", []), "--health-port") == str(HEALTH_PORT)
    args = server.get("args", [])
    for flag, expected in (("--port", GRPC_PORT), ("--metrics-port", METRICS_PORT), ("--health-port", HEALTH_PORT)):
        value = _flag(args, flag)
        assert value is None or int(value) == expected, f"{flag}={value} disagrees with the container port {expected}"


@pytest.mark.parametrize("probe", ["startupProbe", "readinessProbe", "livenessProbe"])
def test_deployment_probes_grpc_health(server: dict, probe: str) -> None:
    spec = server.get(probe)
    assert spec, f"no {probe}"
    assert "grpc" in spec, f"{probe} must be a native grpc probe (grpc.health.v1)"
    # the health-only plaintext port: the kubelet's grpc probe has no TLS, the gRPC port may have it
    assert spec["grpc"]["port"] == HEALTH_PORT, f"{probe} probes port {spec['grpc']['port']}, not {HEALTH_PORT}"
    # startup and readiness: service "", the overall status, SERVING only when every model is warm. Liveness:
    # the API's name, SERVING while the server takes calls (a restart mends lost instances, not a broken
    # model: on "" one model failing after start-up restarted every pod, in a loop; lifecycle audit)
    expected = "videogen.v1.VideoGen" if probe == "livenessProbe" else ""
    assert spec["grpc"].get("service", "") == expected, f"{probe} checks service {spec['grpc'].get('service')!r}"


def test_startup_probe_covers_a_slow_model_load(server: dict) -> None:
    startup, liveness = server["startupProbe"], server["livenessProbe"]
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert budget >= 600, f"startupProbe allows only {budget}s for load, warm-up and compile"
    # Liveness only starts after the startup probe succeeded, so it may stay tighter.
    assert liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3) < budget


def test_a_rollout_is_not_reported_failed_while_its_pods_may_still_start(k8s: dict[str, dict], server: dict) -> None:
    """Kubernetes reports a rollout failed (ProgressDeadlineExceeded) when no new pod is ready within
    progressDeadlineSeconds, 600 s by default: a cold start takes longer (deploy review)."""
    startup = server["startupProbe"]
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert k8s["Deployment"]["spec"].get("progressDeadlineSeconds", 600) > budget


def test_not_ready_alert_waits_out_a_start_the_probes_allow(server: dict) -> None:
    """videogen_model_ready is 0 from the start of a load, so VideoGenModelNotReady must not page
    critical during a start the kubelet (startupProbe) and compose (start_period) still accept."""
    startup = server["startupProbe"]
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    start_period = _seconds(_load(COMPOSE)["services"]["videogen"]["healthcheck"]["start_period"])
    for rules in (_load(ALERTS)["groups"], _load(DEPLOY / "k8s" / "prometheusrule.yaml")["spec"]["groups"]):
        (rule,) = [r for g in rules for r in g["rules"] if r.get("alert") == "VideoGenModelNotReady"]
        assert _seconds(rule["for"]) >= max(budget, start_period), \
            f"VideoGenModelNotReady fires after {rule['for']}, within the {budget}s start the probes allow"


def test_termination_grace_exceeds_the_drain(k8s: dict[str, dict], server: dict) -> None:
    drain = _flag(server.get("args", []), "--drain-grace-seconds")
    assert drain is not None, "pass --drain-grace-seconds explicitly in the container args"
    grace = k8s["Deployment"]["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    assert grace > float(drain), f"terminationGracePeriodSeconds {grace} must exceed --drain-grace-seconds {drain}"


def test_deployment_runs_as_non_root(k8s: dict[str, dict], server: dict) -> None:
    pod_ctx = k8s["Deployment"]["spec"]["template"]["spec"].get("securityContext", {})
    ctx = {**pod_ctx, **server.get("securityContext", {})}
    assert ctx.get("runAsNonRoot") is True
    assert ctx.get("runAsUser", 1) != 0


def test_models_come_read_only_from_the_pvc(k8s: dict[str, dict], server: dict) -> None:
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    repository = _flag(server.get("args", []), "--model-repository") or "/models"
    mount = mounts.get(repository)
    assert mount and mount.get("readOnly") is True, f"{repository} must be mounted read-only"
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = volume.get("persistentVolumeClaim", {}).get("claimName")
    assert claim == "videogen-models" and "ReadOnlyMany" in k8s[f"PersistentVolumeClaim/{claim}"]["spec"]["accessModes"]


def test_compile_cache_outlives_the_pod_where_readme_puts_it(k8s: dict[str, dict], server: dict) -> None:
    """README's compile_cache_dir lies on a claim every replica can write (the root filesystem is
    read-only and /tmp an emptyDir: a cache there is lost with the pod), in compose on a named volume."""
    cache = re.search(r'"compile_cache_dir" value \{ string_value: "([^"]+)"', (ROOT / "README.md").read_text()).group(1)
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    mount = next(m for m in server["volumeMounts"] if cache.startswith(m["mountPath"].rstrip("/") + "/"))
    assert not mount.get("readOnly")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = k8s[f"PersistentVolumeClaim/{volume['persistentVolumeClaim']['claimName']}"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    assert pod["securityContext"].get("fsGroup") == pod["securityContext"]["runAsUser"]
    volumes = _load(COMPOSE)["services"]["videogen"]["volumes"]
    assert any(v.split(":")[0] in _load(COMPOSE)["volumes"] and cache.startswith(v.split(":")[1] + "/") for v in volumes)
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert f"chown 10001:10001 {mount['mountPath']}" in dockerfile, "a new named volume copies the owner"


JOBS = K8S / "jobs"


def mounts_of(container: dict) -> dict[str, str]:
    """mountPath -> volume name."""
    return {m["mountPath"]: m["name"] for m in container["volumeMounts"]}


def test_compile_artifacts_job_compiles_on_the_servers_image_gpu_and_repository(k8s: dict[str, dict],
                                                                                server: dict) -> None:
    """The one-off Job writes compile artifacts the servers can use: the same image (kustomize `images`,
    namespace), a GPU like theirs, the same repository path, mounted writable (the servers' read-only),
    and the same user, so the files are theirs to read; then the CLI that writes them takes its args."""
    jobs = _load(JOBS / "kustomization.yaml")
    base = _kustomization()
    assert jobs["images"] == base["images"] and jobs["namespace"] == base["namespace"]
    assert jobs["resources"] == ["compile-artifacts.yaml"]
    job = _load(JOBS / "compile-artifacts.yaml")
    assert job["kind"] == "Job"
    pod = job["spec"]["template"]["spec"]
    server_pod = k8s["Deployment"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["image"] == server["image"] and container["command"][:2] == server["command"][:2]
    assert container["command"][2:] == ["videogen-server", "compile-artifacts"]
    args = container["args"]
    assert _flag(args, "--model-repository") == _flag(server["args"], "--model-repository")
    assert _flag(args, "--model")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == server["resources"]["limits"]["nvidia.com/gpu"]
    assert pod["tolerations"] == server_pod["tolerations"]
    assert pod["securityContext"] == server_pod["securityContext"]
    assert container["securityContext"] == server["securityContext"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    models = mounts[_flag(args, "--model-repository")]
    assert not models.get("readOnly")
    volume = next(v for v in pod["volumes"] if v["name"] == models["name"])
    server_volume = next(v for v in server_pod["volumes"] if v["name"] == mounts_of(server)[models["mountPath"]])
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert claim == server_volume["persistentVolumeClaim"]["claimName"]  # the repository the servers read
    assert f"PersistentVolumeClaim/{claim}" in k8s, f"the Job's claim {claim} is defined nowhere"
    assert not volume["persistentVolumeClaim"].get("readOnly")
    # with a read-only root, every path the server writes is a volume: /tmp and where README's
    # compile_cache_dir points
    server_paths = {m["mountPath"] for m in server["volumeMounts"]} - {_flag(server["args"], "--model-repository")}
    assert server_paths <= set(mounts), f"not mounted in the Job: {server_paths - set(mounts)}"

    from videogen_server.cli import _parser

    parsed = _parser().parse_args(container["command"][3:] + args)
    assert parsed.command == "compile-artifacts" and parsed.model and parsed.output is None
    tool = _kubernetes_validate()
    if tool is None:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    result = subprocess.run([tool, "--strict", "-k", K8S_VERSION, str(JOBS / "compile-artifacts.yaml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "passed" in result.stdout + result.stderr, result.stdout + result.stderr


def test_selectors_match_the_pod_template(k8s: dict[str, dict]) -> None:
    deployment = k8s["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _subset(deployment["spec"]["selector"]["matchLabels"], pod_labels)

    service = k8s["Service"]
    assert _subset(service["spec"]["selector"], pod_labels), "the Service does not select the server pods"
    assert _subset(k8s["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"], pod_labels), \
        "the PodDisruptionBudget does not select the server pods"

    # ServiceMonitor -> Service (by the Service's labels) -> pods (by the Service's selector).
    monitor = k8s["ServiceMonitor"]
    assert _subset(monitor["spec"]["selector"]["matchLabels"], service["metadata"].get("labels", {})), \
        "the ServiceMonitor does not select the Service"
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports, f"ServiceMonitor scrapes port {endpoint['port']!r}, not in the Service"
    assert service_ports[monitor["spec"]["endpoints"][0]["port"]]["port"] == METRICS_PORT

    # ScaledObject -> Deployment by name.
    target = k8s["ScaledObject"]["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target["name"] == deployment["metadata"]["name"], "the ScaledObject scales another workload"


def test_network_policy_admits_callers_and_prometheus_only(k8s: dict[str, dict], server: dict) -> None:
    policy = k8s["NetworkPolicy"]["spec"]
    pod_labels = k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert _subset(policy["podSelector"]["matchLabels"], pod_labels), "the NetworkPolicy does not select the server pods"
    assert policy["policyTypes"] == ["Ingress"], "egress stays open (DNS, the OTLP collector)"
    container_ports = {p["name"] for p in server["ports"]}
    admitted: dict[str, list] = {}
    for rule in policy["ingress"]:
        for port in rule["ports"]:
            assert port["port"] in container_ports, f"the NetworkPolicy names port {port['port']!r}, not the container's"
            admitted[port["port"]] = rule.get("from")  # None: from anywhere
    assert set(admitted) == container_ports, f"ports the NetworkPolicy leaves closed: {container_ports - set(admitted)}"
    # /metrics (unauthenticated) from Prometheus' namespace only; the API from any namespace
    assert admitted["metrics"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert admitted["grpc"] == [{"namespaceSelector": {}}]
    assert admitted["health"] is None  # external load balancers' checks come from outside the cluster


def test_service_is_headless_for_client_side_balancing(k8s: dict[str, dict]) -> None:
    spec = k8s["Service"]["spec"]
    assert spec.get("clusterIP") == "None", "the Service must be headless (clusterIP: None) for dns:/// round_robin"
    ports = {p["name"]: p for p in spec["ports"]}
    assert "grpc" in ports and ports["grpc"]["port"] == GRPC_PORT
    assert "metrics" in ports


def test_autoscaler_owns_the_replica_count(k8s: dict[str, dict]) -> None:
    assert "replicas" not in k8s["Deployment"]["spec"], "with a ScaledObject, leave Deployment replicas unset"
    scaled = k8s["ScaledObject"]["spec"]
    assert 1 <= scaled.get("minReplicaCount", 0) <= scaled["maxReplicaCount"]
    namespace = _kustomization().get("namespace")
    for trigger in scaled["triggers"]:
        query = trigger["metadata"].get("query", "")
        # in flight (queued + running), not queue depth: that settles at `threshold` queued per replica
        assert "videogen_inflight_requests" in query
        match = re.search(r'namespace="([^"]*)"', query)
        if namespace and match:
            assert match.group(1) == namespace, f"the KEDA query filters namespace {match.group(1)!r}, " \
                                                f"kustomization.yaml deploys to {namespace!r}"


def _builtin(api_version: str) -> bool:
    group = api_version.split("/")[0] if "/" in api_version else ""
    return group == "" or "." not in group or group.endswith(".k8s.io")


def _kubernetes_validate() -> Optional[str]:
    # Also next to the interpreter: a venv's scripts are there even when the venv is not activated.
    return shutil.which("kubernetes-validate") or shutil.which("kubernetes-validate",
                                                              path=str(Path(sys.executable).parent))


def test_builtin_kinds_validate_strictly() -> None:
    files = sorted({path for path, doc in _k8s_resources() if _builtin(doc["apiVersion"])})
    kinds = {doc["kind"] for path, doc in _k8s_resources() if _builtin(doc["apiVersion"])}
    assert {"Deployment", "Service", "PodDisruptionBudget", "PersistentVolumeClaim", "NetworkPolicy"} <= kinds
    assert not any(not _builtin(doc["apiVersion"]) for path in files for doc in _load_all(path)), \
        "keep CRD objects (ServiceMonitor, ScaledObject, ...) out of the files with built-in kinds"
    tool = _kubernetes_validate()
    if tool is None:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    result = subprocess.run([tool, "--strict", "-k", K8S_VERSION, *map(str, files)], capture_output=True,
                            text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"kubernetes-validate --strict -k {K8S_VERSION} failed:\n{output}"
    assert "Couldn't find schema" not in output, output
    objects = [doc for path, doc in _k8s_resources() if _builtin(doc["apiVersion"])]
    assert output.count("passed") == len(objects), output


# ---------------------------------------------------------------------------------------------
# Compose, Prometheus and Grafana wiring
# ---------------------------------------------------------------------------------------------

def _seconds(duration: str | int | float) -> float:
    if isinstance(duration, (int, float)):
        return float(duration)
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(number) * units[unit]
    return total


def test_compose_wiring() -> None:
    compose = _load(COMPOSE)
    here = COMPOSE.parent
    services = compose["services"]
    server = services["videogen"]
    build = server["build"]
    assert (here / build["context"] / build["dockerfile"]).is_file()
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    drain = _flag(server.get("command", []), "--drain-grace-seconds") or "30"
    assert _seconds(server.get("stop_grace_period", "10s")) > float(drain), \
        "compose stop_grace_period must exceed --drain-grace-seconds"
    # nothing asks who calls (no tokens, /metrics, anonymous Grafana): published on loopback unless the
    # server's port is opened on purpose (VIDEOGEN_BIND, with tokens and TLS)
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith(("127.0.0.1:", "${VIDEOGEN_BIND:-127.0.0.1}:")), (name, port)
        assert "--web.enable-lifecycle" not in service.get("command", []), name
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (here / source).exists(), f"compose service {name} mounts missing {source}"


def test_compose_traces_go_to_jaeger_and_exemplars_open_them() -> None:
    from videogen_server.tracing import EXEMPLAR_LABEL

    services = _load(COMPOSE)["services"]
    endpoint = urllib.parse.urlsplit(_flag(services["videogen"]["command"], "--otlp-endpoint"))
    assert endpoint.scheme == "http" and endpoint.hostname in services, endpoint
    collector = services[endpoint.hostname]
    assert f"receivers.otlp.protocols.grpc.endpoint=0.0.0.0:{endpoint.port}" in collector["command"], \
        "the collector's OTLP/gRPC receiver must listen on the compose network at the server's port"
    assert _flag(services["prometheus"]["command"], "--enable-feature") == "exemplar-storage"

    datasources = {d["uid"]: d for d in _load(DEPLOY / "grafana" / "provisioning" / "datasources" /
                                               "prometheus.yml")["datasources"]}
    for uid, source in datasources.items():
        host = urllib.parse.urlsplit(source["url"]).hostname
        assert host in services, f"datasource {uid} points at {host}, not a compose service"
    links = datasources["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert [(link["name"], datasources[link["datasourceUid"]]["type"]) for link in links] == \
        [(EXEMPLAR_LABEL, "jaeger")]
    assert urllib.parse.urlsplit(datasources["jaeger"]["url"]).hostname == endpoint.hostname


def test_prometheus_rule_files_exist() -> None:
    config = _load(PROMETHEUS)
    for rule_file in config.get("rule_files", []):
        assert (PROMETHEUS.parent / rule_file).is_file(), f"prometheus.yml loads missing {rule_file}"
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    # The alert rules match up{job="videogen"}: the job must have that name.
    assert "videogen" in jobs


def test_grafana_provisioning_points_at_the_mounted_dashboards() -> None:
    compose = _load(COMPOSE)
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("."))
    target = mounts.get("../grafana/dashboards")
    assert target, "the compose stack does not mount deploy/grafana/dashboards into Grafana"
    paths = [p["options"]["path"] for p in _load(DASHBOARD_PROVIDER)["providers"]]
    assert target in paths, f"the dashboard provider reads {paths}, the dashboards are mounted at {target}"


# ---------------------------------------------------------------------------------------------
# The image
# ---------------------------------------------------------------------------------------------

def _dockerfile() -> str:
    return (DEPLOY / "docker" / "Dockerfile").read_text()


def test_the_image_runs_the_torch_the_gpu_figures_were_measured_with() -> None:
    """The image shipped torch 2.7.1 (its base's) while CI tests 2.13 and every device figure is 2.11:
    a compiled VAE test aborted the process on 2.7.1 (review)."""
    pinned = re.search(r"^ARG TORCH_VERSION=(\S+)$", _dockerfile(), re.M)
    assert pinned, "the Dockerfile pins torch with ARG TORCH_VERSION"
    measured = {json.loads(p.read_text())["meta"].get("torch") for p in sorted((ROOT / "docs" / "perf").glob("*-h*.json"))}
    assert pinned.group(1) in measured, f"torch {pinned.group(1)} in the image, device runs measured {measured}"
    assert '"torch==${TORCH_VERSION}"' in _dockerfile() and "--constraint" in _dockerfile()


def test_pid_1_is_an_init_in_the_image_and_the_pod(server: dict) -> None:
    """The server as PID 1 ignored a SIGTERM arriving during its imports and never reaped the compiler
    processes Inductor spawns (review): tini runs first, in the image and in the pod's command."""
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", _dockerfile(), re.M).group(1))
    assert entrypoint[:2] == ["/usr/bin/tini", "--"] and entrypoint[2] == "videogen-server", entrypoint
    assert re.search(r"apt-get install [^\n]*\btini\b", _dockerfile())
    assert server["command"][:3] == ["/usr/bin/tini", "--", "videogen-server"], server["command"]
