"""deploy/'s Prometheus side in a real Prometheus: the config and rules through promtool, the alert rules'
unit tests (deploy/prometheus/alerts_test.yml) through `promtool test rules`, and a Prometheus server
scraping a real videogen server, evaluating every alert rule and answering every query of the Grafana
dashboard (and the KEDA trigger) with numbers.

Needs Debian's prometheus package (`make test` installs it where apt-get can; skipped elsewhere, saying so).
"""
from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest
import yaml

from ..helpers import ServerThread, collect, request, tiny_config
from ..otlp import Collector

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "videogen.json"
K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "deploy" / "compose" / "docker-compose.yml"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="no prometheus/promtool: apt-get install prometheus (make test does, as root)")

# Dashboard queries that may be empty on this machine, and why. Every other query must return at least one
# finite number once the server has served two rounds of requests.
MAY_BE_EMPTY = {
    "videogen_gpu_memory_used_bytes": "NVML: no GPU here",
    "videogen_gpu_memory_total_bytes": "NVML: no GPU here",
    "videogen_compiles_total": "no compiled model here (tests/integration/test_accel.py checks the counters)",
    "videogen_recompiles_total": "no compiled model here",
    "videogen_eager_fallbacks_total": "no compiled model here",
    "videogen_compile_cache_lookups_total": "no compiled model here",
    # one request of a shape per round here, and an estimate needs 3 runs of it (test_client checks it)
    "videogen_estimated_end_error_seconds": "no Accepted estimate here",
}


def _promtool(*args: str, cwd: Path | None = None) -> str:
    result = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def test_promtool_accepts_the_config_and_both_rule_files(tmp_path: Path) -> None:
    out = _promtool("check", "config", str(PROM_DIR / "prometheus.yml"))
    assert "SUCCESS: 1 rule files found" in out, out
    _promtool("check", "rules", str(PROM_DIR / "alerts.yml"))
    operator_rules = tmp_path / "prometheusrule.yml"  # the PrometheusRule's spec is a rule file
    operator_rules.write_text(yaml.safe_dump(yaml.safe_load((K8S / "prometheusrule.yaml").read_text())["spec"]))
    out = _promtool("check", "rules", str(operator_rules))
    assert re.search(r"SUCCESS: [1-9]\d* rules found", out), out


@pytest.mark.parametrize("rules", ["alerts.yml", "prometheusrule.yaml"])
def test_alert_rules_pass_their_unit_tests(rules: str, tmp_path: Path) -> None:
    """promtool's rule tester: each alert fires on the series it is for, after its `for`, with its
    annotations rendered, and not on its look-alikes (rejections are not errors, warm-up compiles are
    not recompiles, a load under 20 minutes is not an outage)."""
    if rules == "alerts.yml":
        test_dir = PROM_DIR
    else:  # the Operator's copy, under the name the tests' rule_files expects
        test_dir = tmp_path
        spec = yaml.safe_load((K8S / "prometheusrule.yaml").read_text())["spec"]
        (tmp_path / "alerts.yml").write_text(yaml.safe_dump(spec))
        shutil.copy(PROM_DIR / "alerts_test.yml", tmp_path)
    out = _promtool("test", "rules", "alerts_test.yml", cwd=test_dir)
    assert "SUCCESS" in out, out
    alerts = {r["alert"] for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    tested = set(re.findall(r"alertname: (\w+)", (PROM_DIR / "alerts_test.yml").read_text()))
    assert alerts - tested == set(), f"alerts without a unit test in alerts_test.yml: {sorted(alerts - tested)}"


# ---------------------------------------------------------------------------------------------
# A real Prometheus scraping a real server
# ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, base: str, process: subprocess.Popen) -> None:
        self.base, self.process = base, process

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.base}/api/v1/{path}?{query}", timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:  # a bad query: Prometheus says why in the body
            raise AssertionError(f"{path} {params}: HTTP {e.code} {e.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    def wait(self, what: str, check: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert self.process.poll() is None, "prometheus exited"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.25)


def _start_prometheus(tmp_path: Path, metrics_port: int) -> tuple[Prometheus, Callable[[], None]]:
    """deploy/prometheus/prometheus.yml with its videogen job pointed at the server, scraping every second.
    The target also gets the labels the Prometheus Operator's ServiceMonitor gives a pod (namespace, pod),
    so the KEDA trigger's query runs as it would in the cluster."""
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROM_DIR / "alerts.yml")]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    port = _free_port()
    jobs["videogen"]["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"],
                                           "labels": {"namespace": "videogen", "pod": "videogen-0"}}]
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn", *_compose_features()],
        stdout=log, stderr=subprocess.STDOUT)

    def stop() -> None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()

    prom = Prometheus(f"http://127.0.0.1:{port}", process)

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{prom.base}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        prom.wait("prometheus to be ready", ready, timeout=30)
    except AssertionError:
        stop()
        raise AssertionError("prometheus did not start:\n" + (tmp_path / "prometheus.log").read_text())
    return prom, stop


def _compose_features() -> list[str]:
    """The --enable-feature flags deploy/compose gives its Prometheus (exemplar storage)."""
    compose = yaml.safe_load(COMPOSE.read_text())
    return [flag for flag in compose["services"]["prometheus"]["command"] if flag.startswith("--enable-feature=")]


def _panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _scraped_after(prom: Prometheus, metrics_port: int) -> Callable[[], bool]:
    """True once a scrape of the server has started after this call."""
    since = time.time()

    def check() -> bool:
        targets = prom.api("targets")["activeTargets"]
        mine = [t for t in targets if t["scrapeUrl"].startswith(f"http://127.0.0.1:{metrics_port}/")]
        return bool(mine) and mine[0]["health"] == "up" and _epoch(mine[0]["lastScrape"]) > since

    return check


def _regex_in_string(value: str) -> str:
    """A label value as a regex inside a PromQL string, as Grafana writes a selected variable value."""
    return re.escape(value).replace("\\", "\\\\")


def _epoch(rfc3339: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d*", r"\1", rfc3339).replace("Z", "+00:00")).timestamp()


@pytest.fixture
def collector() -> Iterator[Collector]:
    """An OTLP endpoint: the server traces its requests, so the latency histograms carry exemplars."""
    c = Collector()
    yield c
    c.stop()


def test_a_real_prometheus_evaluates_every_rule_and_dashboard_query(make_repo, collector: Collector,
                                                                   tmp_path: Path) -> None:
    model = "svd-tiny"
    tokens = tmp_path / "tokens"
    tokens.write_text("sesame\n")  # (the security panels' series: a token file, reloaded, and a caller without)
    auth = (("authorization", "Bearer sesame"),)
    with ServerThread(make_repo({model: tiny_config(model)}), otlp_endpoint=collector.endpoint,
                      auth_token_file=tokens) as server:
        prom, stop = _start_prometheus(tmp_path, server.server.metrics_port)
        try:
            stub = server.stub()

            def serve_a_round() -> None:
                # a video with frames and MP4, a request refused for a bad field, and one without a token
                collect(stub, request(model=model, num_frames=2, num_inference_steps=2, decode_chunk_size=1,
                                      output={"stream_video": True}), metadata=auth)
                with pytest.raises(grpc.RpcError) as refused:
                    collect(stub, request(model=model, num_frames=2, num_inference_steps=2, fps=0), metadata=auth)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                with pytest.raises(grpc.RpcError) as refused:
                    collect(stub, request(model=model, num_frames=2, num_inference_steps=2))
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                prom.wait("a scrape after the requests", _scraped_after(prom, server.server.metrics_port))

            # two rounds with a scrape between them: every counter and histogram series exists before
            # the second round, so rates over the window are positive and quantiles are numbers
            serve_a_round()
            serve_a_round()

            # the dashboard's variables, as Grafana's label_values() asks for them
            models = prom.api("label/model/values", **{"match[]": 'videogen_model_ready{namespace=~"videogen"}'})
            assert model in models, models
            servers = prom.api("label/instance/values",
                               **{"match[]": f'videogen_model_ready{{namespace=~"videogen", model=~"{model}"}}'})
            # the scrape target, not the model instance the per-instance series carry as their own `instance`
            # (Prometheus renames that one `exported_instance`; the dashboard's memory panels rely on it)
            assert servers == [f"127.0.0.1:{server.server.metrics_port}"], servers
            per_instance = prom.query("videogen_device_memory_allocated_bytes")
            assert per_instance and all(s["metric"].get("exported_instance") == "0" for s in per_instance), per_instance

            dashboard = json.loads(DASHBOARD.read_text())
            # the ServiceMonitor's namespace label (the dashboard's first variable: one fleet apart from another)
            assert prom.api("label/namespace/values", **{"match[]": "videogen_model_ready"}) == ["videogen"]
            substitutions = {"$__rate_interval": "1m", "$namespace": "videogen", "$model": model,
                             "$instance": _regex_in_string(servers[0])}
            empty, not_numbers, checked = [], [], 0
            for panel in _panels(dashboard["panels"]):
                for target in panel.get("targets") or []:
                    expr = target["expr"]
                    for var, value in substitutions.items():
                        expr = expr.replace(var, value)
                    assert "$" not in expr, f"panel {panel['title']!r}: a variable this test does not know: {expr}"
                    result = prom.query(expr)  # a PromQL error fails here
                    checked += 1
                    if not result:
                        if not any(name in expr for name in MAY_BE_EMPTY):
                            empty.append(f"{panel['title']}: {expr}")
                        continue
                    values = [float(s["value"][1]) for s in result]
                    if panel["title"] == "Batch size":  # every batch here held one request: mean and p90 say 1
                        assert values == [1.0], (expr, values)
                    if not all(math.isfinite(v) for v in values):
                        not_numbers.append(f"{panel['title']}: {expr} -> {values}")
            assert checked >= 30, checked
            assert not empty, "dashboard queries with no data after two rounds of requests:\n" + "\n".join(empty)
            assert not not_numbers, "dashboard queries that are not numbers:\n" + "\n".join(not_numbers)

            # the KEDA trigger's query, with the labels the ServiceMonitor gives the target
            scaled = yaml.safe_load((K8S / "keda-scaledobject.yaml").read_text())
            for trigger in scaled["spec"]["triggers"]:
                result = prom.query(trigger["metadata"]["query"])
                assert len(result) == 1 and float(result[0]["value"][1]) == 0, result  # nothing in flight now

            # every alert rule loaded and evaluated against the real series without an error; none fires
            def rules() -> list[dict]:
                return [r for g in prom.api("rules")["groups"] for r in g["rules"]]

            prom.wait("every rule to be evaluated", lambda: all(
                _epoch(r["lastEvaluation"]) > 0 and r["health"] != "unknown" for r in rules()))
            loaded = rules()
            expected = [r["alert"] for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
                        for r in g["rules"]]
            assert sorted(r["name"] for r in loaded) == sorted(expected)
            bad = [(r["name"], r["health"], r.get("lastError")) for r in loaded if r["health"] != "ok"]
            assert not bad, bad
            firing = [(r["name"], r.get("alerts")) for r in loaded if r.get("alerts")]
            assert not firing, f"alerts on a healthy server: {firing}"

            # exemplars (compose's --enable-feature=exemplar-storage): the dashboard's latency panels show
            # the traces of requests, which Grafana links to the tracing backend
            exemplars = {e["labels"]["trace_id"]
                         for series in prom.api("query_exemplars", query="videogen_request_duration_seconds_bucket",
                                                start=str(time.time() - 600), end=str(time.time() + 60))
                         for e in series["exemplars"]}
            assert len(exemplars) == 2, exemplars  # the two successful videos (refusals are not observed)
        finally:
            stop()
    # the server's stop flushed its spans: each exemplar names a trace the tracing backend has
    exported = {s.trace_id.hex() for s in collector.spans}
    assert exemplars <= exported, (exemplars, exported)
