"""deploy/: the Dockerfile, docker-compose, Kubernetes manifests, alerts and dashboard are
consistent with each other and with what a running worker exports. No container engine
runs here, so files are checked statically and, where a real tool exists, for real."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import (
    REPO,
    Receiver,
    RunWorker,
    endpoint,
    eventually,
    make_settings,
    publish_events,
)
from tests.helpers import as_async
from worker.settings import Settings, load_settings, settings_from_document
from worker.topology import endpoint_queue

DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")  # oldest commonly supported, newest known
SCHEMAS = Path(__file__).parent / "schemas"
CUSTOM_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject.keda.sh.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.monitoring.coreos.com.json",
}
METRIC_RE = re.compile(r"\b(webhook_[a-z_]+)\b")
# Labels the Prometheus Operator gives every target of a ServiceMonitor. With honorLabels,
# a series' own label of the same name wins, so the worker must export none but endpoint.
OPERATOR_TARGET_LABELS = {"job", "instance", "namespace", "service", "pod", "container", "endpoint"}


def custom_schema(key: tuple[str, str]) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMAS / CUSTOM_SCHEMAS[key]).read_text())
    return schema


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kubernetes_objects() -> dict[str, dict[str, Any]]:
    """Every object the kustomization lists, by kind (each kind appears once)."""
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    objects: dict[str, dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for document in load_yaml_documents(KUBERNETES / name):
            assert document["kind"] not in objects
            objects[document["kind"]] = document
    return objects


def kubernetes_settings(objects: dict[str, dict[str, Any]]) -> Settings:
    """The ConfigMap's config.yaml as the worker would load it, with the Secret's env."""
    document = yaml.safe_load(objects["ConfigMap"]["data"]["config.yaml"])
    environ = objects["Secret"]["stringData"]
    return settings_from_document(document, Path("configmap/config.yaml"), environ)


def test_dockerfile_is_multi_stage_slim_non_root_with_healthcheck() -> None:
    """Build and runtime stages on a slim Python, a numeric non-root user, HEALTHCHECK on
    /healthz, the config at /etc/hookline/config.yaml, and the worker image built by default."""
    dockerfile = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\S+))?", dockerfile, re.MULTILINE)
    assert [alias for _, alias in stages] == ["build", "runtime", "receiver", ""]
    assert all("-slim" in image for image, alias in stages if alias in ("build", "runtime"))
    assert stages[-1][0] == "runtime"
    runtime = dockerfile.split(" AS runtime")[1].split(" AS receiver")[0]
    assert re.search(r"^USER 10001:10001$", runtime, re.MULTILINE)
    assert "HEALTHCHECK" in runtime and "/healthz" in runtime
    assert 'CMD ["run", "--config", "/etc/hookline/config.yaml"]' in runtime
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests", "bench", "docs"} <= set(ignored)


def test_compose_services_ports_mounts_and_worker_config() -> None:
    """RabbitMQ with the management and Prometheus plugins, two workers, the receiver,
    Prometheus scraping both and Grafana provisioned; every mounted file exists; the
    workers' config loads and points at the receiver with the receiver's secret."""
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"rabbitmq", "worker", "receiver", "publisher", "prometheus", "grafana"}
    assert services["worker"]["deploy"]["replicas"] == 2
    assert services["publisher"]["profiles"] == ["tools"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{source} is mounted but missing"
    assert "./compose/config.yaml:/etc/hookline/config.yaml:ro" in services["worker"]["volumes"]
    assert {"5672:5672", "15672:15672"} <= set(services["rabbitmq"]["ports"])
    assert "9090:9090" in services["prometheus"]["ports"]
    assert "3000:3000" in services["grafana"]["ports"]
    plugins = (DEPLOY / "compose" / "enabled_plugins").read_text()
    assert "rabbitmq_management" in plugins and "rabbitmq_prometheus" in plugins

    environ = services["worker"]["environment"]
    settings = load_settings(DEPLOY / "compose" / "config.yaml", environ)
    grace = services["worker"]["stop_grace_period"]
    assert int(grace.rstrip("s")) > settings.worker.shutdown_timeout_s
    assert settings.broker.masked_url.startswith("amqp://hookline:****@rabbitmq:5672")
    receiver = services["receiver"]["command"]
    route, secret = receiver[receiver.index("--route") + 1].split("=", 1)
    assert secret == environ["ORDERS_WEBHOOK_SECRET"]
    port = receiver[receiver.index("--port") + 1]
    assert {e.url for e in settings.endpoints} == {f"http://receiver:{port}{route}"}

    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["hookline"]["dns_sd_configs"][0] == {
        "names": ["worker"],
        "type": "A",
        "port": settings.metrics.port,
        "refresh_interval": "15s",
    }
    assert jobs["rabbitmq"]["static_configs"][0]["targets"] == ["rabbitmq:15692"]
    assert prometheus["rule_files"] == ["/etc/prometheus/alerts.yml"]
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text()
    )["datasources"][0]
    assert (datasource["uid"], datasource["url"]) == ("prometheus", "http://prometheus:9090")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_validate_against_schemas(version: str) -> None:
    """Core objects against the Kubernetes schemas (strict: unknown fields fail); KEDA and
    Prometheus Operator objects against schemas of the fields they use."""
    checked = set()
    for document in kubernetes_objects().values():
        key = (document["apiVersion"], document["kind"])
        # Both raise on the first field that does not fit its schema.
        if key in CUSTOM_SCHEMAS:
            jsonschema.validate(document, custom_schema(key))
        else:
            kubernetes_validate.validate(document, version, strict=True)
        checked.add(document["kind"])
    assert checked == {
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "ServiceMonitor",
        "PodDisruptionBudget",
        "ScaledObject",
    }


def test_kubernetes_objects_fit_together() -> None:
    """Probes, ports, selectors, grace period and secrets agree with the config in the
    ConfigMap."""
    objects = kubernetes_objects()
    settings = kubernetes_settings(objects)
    pod = objects["Deployment"]["spec"]["template"]
    labels = pod["metadata"]["labels"]
    [container] = pod["spec"]["containers"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > settings.worker.shutdown_timeout_s
    assert container["ports"][0] == {
        "name": "metrics",
        "containerPort": settings.metrics.port,
        "protocol": "TCP",
    }
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["resources"]["requests"] == {"cpu": "250m", "memory": "128Mi"}
    assert container["args"] == ["run", "--config", "/etc/hookline/config.yaml"]
    assert container["volumeMounts"][0]["mountPath"] == "/etc/hookline"
    assert (
        pod["spec"]["volumes"][0]["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    )
    assert container["envFrom"][0]["secretRef"]["name"] == objects["Secret"]["metadata"]["name"]
    for kind in ("Service", "PodDisruptionBudget"):
        selector = objects[kind]["spec"]["selector"]
        assert selector.get("matchLabels", selector).items() <= labels.items()
    service_port = objects["Service"]["spec"]["ports"][0]["name"]
    assert objects["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == service_port
    scale_target = objects["ScaledObject"]["spec"]["scaleTargetRef"]
    assert scale_target["name"] == objects["Deployment"]["metadata"]["name"]


def servicemonitor_job(objects: dict[str, dict[str, Any]]) -> str:
    """The job label the Prometheus Operator gives the workers' series: the Service's
    label named by jobLabel, else the Service's name."""
    service = objects["Service"]
    job_label = objects["ServiceMonitor"]["spec"].get("jobLabel")
    if job_label is None:
        return str(service["metadata"]["name"])
    return str(service["metadata"]["labels"][job_label])


def test_keda_scales_on_one_prometheus_trigger_over_the_backlog_gauge() -> None:
    """One Prometheus trigger, whatever the number of endpoints: the largest of the
    workers' total backlogs, on the job the ServiceMonitor produces. No queue, endpoint or
    TriggerAuthentication is named anywhere."""
    objects = kubernetes_objects()
    settings = kubernetes_settings(objects)
    scaled = objects["ScaledObject"]["spec"]
    [trigger] = scaled["triggers"]
    assert trigger["type"] == "prometheus"
    assert "authenticationRef" not in trigger
    metadata = trigger["metadata"]
    query = metadata["query"]
    assert METRIC_RE.findall(query) == ["webhook_backlog_messages"]
    assert re.fullmatch(r"max\(sum by \(pod\) \(webhook_backlog_messages\{(.*)\}\)\)", query)
    assert f'job="{servicemonitor_job(objects)}"' in query
    assert "endpoint" not in query and "queue" not in query
    for endpoint_settings in settings.endpoints:
        assert endpoint_settings.name not in query
        assert endpoint_queue(settings.broker.exchange, endpoint_settings.name) not in query
    assert metadata["serverAddress"].startswith("http")
    assert float(metadata["threshold"]) > 0
    assert float(metadata["activationThreshold"]) >= 0
    assert metadata["ignoreNullValues"] == "false"
    # The metric comes from the workers: with none running, nothing would wake one.
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    assert (scaled["pollingInterval"], scaled["cooldownPeriod"]) == (15, 300)


def test_no_trigger_authentication_is_left_dangling() -> None:
    """No (Cluster)TriggerAuthentication in deploy/kubernetes, listed or not, and no trigger
    refers to one."""
    kinds = {
        document["kind"]
        for path in KUBERNETES.glob("*.yaml")
        for document in load_yaml_documents(path)
    }
    assert not kinds & {"TriggerAuthentication", "ClusterTriggerAuthentication"}
    for path in KUBERNETES.glob("*.yaml"):
        assert "authenticationRef" not in path.read_text(), path.name


def test_servicemonitor_keeps_the_workers_endpoint_label() -> None:
    """The Prometheus Operator labels every target endpoint="<port name>"; honorLabels
    keeps the worker's own endpoint label instead of renaming it exported_endpoint."""
    objects = kubernetes_objects()
    [scrape] = objects["ServiceMonitor"]["spec"]["endpoints"]
    assert scrape["honorLabels"] is True
    queries = [rule["expr"] for rule in alert_rules()] + dashboard_queries()
    queries.append(objects["ScaledObject"]["spec"]["triggers"][0]["metadata"]["query"])
    assert not [query for query in queries if "exported_endpoint" in query]


def test_keda_query_takes_one_workers_total_not_the_sum_over_pods(tmp_path: Path) -> None:
    """Evaluated by promtool on series as the ServiceMonitor scrapes them: two workers that
    see the same queues (one not done polling every queue yet), notable endpoints and _other,
    and another job's series with the same name. The result is the fuller worker's total."""
    objects = kubernetes_objects()
    query = objects["ScaledObject"]["spec"]["triggers"][0]["metadata"]["query"]
    job = servicemonitor_job(objects)
    backlog = {
        ("hookline-worker-a", "billing"): 300,
        ("hookline-worker-a", "_other"): 700,
        ("hookline-worker-b", "billing"): 300,
        ("hookline-worker-b", "_other"): 600,
    }
    series = [
        {
            "series": f'webhook_backlog_messages{{job="{job}",namespace="hookline",pod="{pod}",'
            f'instance="{pod}:9100",endpoint="{endpoint_name}"}}',
            "values": f"{value}x10",
        }
        for (pod, endpoint_name), value in backlog.items()
    ]
    series.append(
        {
            "series": 'webhook_backlog_messages{job="elsewhere",pod="other-0",endpoint="_other"}',
            "values": "50000x10",
        }
    )
    rules = tmp_path / "none.yml"
    rules.write_text("groups: []\n")
    tests = {
        "rule_files": [rules.name],
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": query,
                        "eval_time": "5m",
                        "exp_samples": [{"labels": "{}", "value": 1000}],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "keda_test.yml"
    path.write_text(yaml.safe_dump(tests))
    result = subprocess.run(
        [promtool(), "test", "rules", path.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_retries_are_queried_by_tier_and_circuits_counted() -> None:
    """Retries wait in delay tiers shared by every endpoint, so no query of
    webhook_retry_waiting_messages uses endpoint; the dashboard shows them by tier, and the
    circuit counts per state (webhook_circuits)."""
    queries = [rule["expr"] for rule in alert_rules()] + dashboard_queries()
    retry_queries = [query for query in queries if "webhook_retry_waiting_messages" in query]
    assert retry_queries
    assert not [query for query in retry_queries if "endpoint" in query]
    assert any("by (tier)" in query for query in dashboard_queries() if query in retry_queries)
    assert any("webhook_circuits" in query for query in dashboard_queries())


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing; .ci/run installs Debian's prometheus")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


@pytest.mark.parametrize(
    "command", [["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]]
)
def test_alert_rules_pass_promtool(command: list[str]) -> None:
    """promtool accepts the rules, and every alert's unit tests pass."""
    result = subprocess.run(
        [promtool(), *command],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_alert_is_unit_tested_and_has_a_runbook() -> None:
    """Each alert appears in alerts_test.yml and links to a heading of docs/operations.md."""
    tests = (DEPLOY / "prometheus" / "alerts_test.yml").read_text()
    headings = {
        "#" + re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in (REPO / "docs" / "operations.md").read_text().splitlines()
        if line.startswith("#")
    }
    for rule in alert_rules():
        assert f"alertname: {rule['alert']}" in tests
        anchor = "#" + rule["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor in headings, f"{rule['alert']}: no runbook heading {anchor}"


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "hookline.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queries += [
        variable["definition"]
        for variable in dashboard["templating"]["list"]
        if variable["type"] == "query"
    ]
    return queries


async def test_every_metric_queried_is_exported_by_a_running_worker(
    exchange_name: str, receiver: Receiver, run_worker: RunWorker
) -> None:
    """Scraped from a real worker during real deliveries: every webhook_* name that an
    alert or a dashboard panel queries is a series the worker exports."""
    receiver.script("/ok", 200)
    receiver.script("/gone", 410)
    settings = make_settings(
        exchange_name,
        [
            endpoint("ok", receiver.url("/ok"), ["e.#"], rate_limit_per_s=1000),
            endpoint("gone", receiver.url("/gone"), ["e.#"]),
        ],
        metrics={"queue_poll_s": 0.2},
    )
    worker = await run_worker(settings)
    await publish_events(exchange_name, 3, "e.event", "scrape")
    await receiver.wait_for(lambda: len(receiver.on("/gone")) == 3)
    # The depth gauges exist once the first poll of queue depths is done.
    await eventually(as_async(lambda: worker.depths.polled_at is not None))
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{worker.health.port}/metrics") as response,
    ):
        exported_text = await response.text()
    samples = [line for line in exported_text.splitlines() if line and not line.startswith("#")]
    exported = {line.split("{")[0].split(" ")[0] for line in samples}
    labels = {
        name for line in samples for name in re.findall(r'[{,]([a-z_]+)="', line.split(" ")[0])
    }
    # honorLabels (servicemonitor.yaml) must override no label of Prometheus' own.
    assert labels & OPERATOR_TARGET_LABELS == {"endpoint"}
    queried = {
        name
        for query in [rule["expr"] for rule in alert_rules()] + dashboard_queries()
        for name in METRIC_RE.findall(query)
    }
    assert len(queried) >= 12
    missing = sorted(queried - exported)
    assert missing == [], f"queried but not exported: {missing}"


def test_dashboard_panels_are_laid_out_and_their_queries_parse(tmp_path: Path) -> None:
    """Unique panel ids, no overlapping panels, every panel on the provisioned datasource,
    and every query valid PromQL (checked by promtool as recording rules, with Grafana's
    variables replaced by what Grafana would substitute)."""
    dashboard = json.loads((DEPLOY / "grafana" / "hookline.json").read_text())
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert grid["x"] + grid["w"] <= 24 and not area & cells, panel["title"]
        cells |= area
        assert panel["datasource"]["uid"] == "${datasource}"
    queries = [target["expr"] for panel in panels for target in panel["targets"]]
    substituted = [q.replace("$__rate_interval", "1m").replace("$endpoint", ".*") for q in queries]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{n}", "expr": query}
                    for n, query in enumerate(substituted)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
