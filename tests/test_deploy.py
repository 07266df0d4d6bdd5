"""deploy/: the Dockerfile, docker-compose, Kubernetes manifests, alerts and dashboard are
consistent with each other and with what a running worker and API export. No container
engine runs here, so files are checked statically and, where a real tool exists, for real."""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import SecretStr

from producer.settings import read_config_file
from tests.conftest import (
    REPO,
    Receiver,
    RunWorker,
    endpoint,
    eventually,
    make_settings,
    publish_events,
    registry_sections,
)
from tests.helpers import as_async
from worker.exceptions import ConfigError
from worker.secretbox import SecretBox
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
# The Compose Specification's own schema (its source and commit are in its $comment).
COMPOSE_SCHEMA = SCHEMAS / "compose-spec.json"
METRIC_RE = re.compile(r"\b(webhook_[a-z_]+)\b")
# Labels the Prometheus Operator gives every target of a ServiceMonitor. With honorLabels,
# a series' own label of the same name wins, so the worker must export none but endpoint.
OPERATOR_TARGET_LABELS = {"job", "instance", "namespace", "service", "pod", "container", "endpoint"}
WORKER = "hookline-worker"
API = "hookline-api"
CONFIG_PATH = "/etc/hookline/config.yaml"
API_COMMAND = ["python", "-m", "api", "--config", CONFIG_PATH]
# ${NAME}, ${NAME:?message}, ${NAME:-default}: Compose's interpolation, as far as used here.
INTERPOLATION_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?([?-])([^}]*))?\}")
# What tests substitute for the compose file's secrets (never committed anywhere).
COMPOSE_TEST_ENV = {
    "HOOKLINE_SECRET_KEY": base64.b64encode(b"c" * 32).decode(),
    "HOOKLINE_POSTGRES_PASSWORD": "composetestpassword",
}

KubeObjects = dict[tuple[str, str], dict[str, Any]]


def custom_schema(key: tuple[str, str]) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMAS / CUSTOM_SCHEMAS[key]).read_text())
    return schema


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kubernetes_objects() -> KubeObjects:
    """Every object the kustomization lists, by (kind, name), each once."""
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    objects: KubeObjects = {}
    for name in kustomization["resources"]:
        for document in load_yaml_documents(KUBERNETES / name):
            key = (document["kind"], document["metadata"]["name"])
            assert key not in objects
            objects[key] = document
    return objects


def secret_environment(objects: KubeObjects) -> dict[str, str]:
    """Every listed Secret's variables, as envFrom gives them to a pod."""
    environ: dict[str, str] = {}
    for (kind, _), document in objects.items():
        if kind == "Secret":
            assert not environ.keys() & document["stringData"].keys()
            environ.update(document["stringData"])
    return environ


def kubernetes_settings(objects: KubeObjects, tmp_path: Path) -> Settings:
    """The ConfigMap's config.yaml as the workers and the API load it, with the Secrets'
    variables as the environment (HOOKLINE_DATABASE_URL included)."""
    path = tmp_path / "config.yaml"
    path.write_text(objects[("ConfigMap", "hookline-config")]["data"]["config.yaml"])
    environ = secret_environment(objects)
    return settings_from_document(read_config_file(path, environ), path, environ)


def pod_spec(objects: KubeObjects, deployment: str) -> dict[str, Any]:
    spec: dict[str, Any] = objects[("Deployment", deployment)]["spec"]["template"]["spec"]
    return spec


def mount_paths(container: dict[str, Any], spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The container's mounts by path, each with the volume it mounts."""
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    return {mount["mountPath"]: volumes[mount["name"]] for mount in container["volumeMounts"]}


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


def test_image_installs_every_package_with_the_api_migrations() -> None:
    """The build stage copies every package pyproject.toml installs (the API's included)
    before `pip install .`, nothing keeps them out of the build context, and the API's
    SQL migrations are package data, so the image can run `python -m api migrate`."""
    dockerfile = (REPO / "Dockerfile").read_text()
    build = dockerfile.split(" AS build")[1].split(" AS runtime")[0]
    copies = {
        source: target for source, target in re.findall(r"^COPY (\S+) (\S+)$", build, re.MULTILINE)
    }
    install = build.index("pip install .")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]
    assert "api" in packages
    ignored = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    # Subpackages (api.migrations) come with their top-level directory.
    for package in {package.split(".")[0] for package in packages}:
        assert copies.get(package) == f"./{package}", f"the image lacks {package}/"
        assert build.index(f"COPY {package} ") < install
        assert package not in ignored
    assert "api.migrations" in packages
    assert "*.sql" in pyproject["tool"]["setuptools"]["package-data"]["api.migrations"]
    assert sorted(path.name for path in (REPO / "api" / "migrations").glob("*.sql"))


def compose_file() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return compose


def interpolate(value: str, environ: dict[str, str]) -> str:
    """Compose's variable interpolation of ``value``; a missing required one fails."""

    def substitute(match: re.Match[str]) -> str:
        name, operator, argument = match.groups()
        if environ.get(name):
            return environ[name]
        assert operator != "?", f"{name} is required: {argument}"
        return argument if operator == "-" else ""

    return INTERPOLATION_RE.sub(substitute, value)


def service_environment(service: dict[str, Any], environ: dict[str, str]) -> dict[str, str]:
    return {key: interpolate(str(value), environ) for key, value in service["environment"].items()}


def test_compose_file_fits_the_compose_specification() -> None:
    """deploy/docker-compose.yml against the Compose Specification's schema (no `docker
    compose` here): unknown keys, a misspelt depends_on condition or a wrong type fail."""
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    # Its $schema names draft 7 by an address jsonschema does not recognise.
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(compose_file())


def test_compose_services_ports_mounts_and_worker_config() -> None:
    """RabbitMQ with the management and Prometheus plugins, PostgreSQL, the migration, the
    API, two workers, the receiver, Prometheus scraping the workers and Grafana
    provisioned; every mounted file exists; the workers' config loads and points at the
    receiver with the receiver's secret."""
    compose = compose_file()
    services = compose["services"]
    assert set(services) == {
        "rabbitmq",
        "postgres",
        "migrate",
        "api",
        "worker",
        "receiver",
        "publisher",
        "prometheus",
        "grafana",
    }
    assert services["worker"]["deploy"]["replicas"] == 2
    assert services["publisher"]["profiles"] == ["tools"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{source} is mounted but missing"
            else:
                assert source in compose["volumes"], f"{source} is not a declared volume"
    assert "./compose/config.yaml:/etc/hookline/config.yaml:ro" in services["worker"]["volumes"]
    assert {"5672:5672", "15672:15672"} <= set(services["rabbitmq"]["ports"])
    assert "9090:9090" in services["prometheus"]["ports"]
    assert "3000:3000" in services["grafana"]["ports"]
    plugins = (DEPLOY / "compose" / "enabled_plugins").read_text()
    assert "rabbitmq_management" in plugins and "rabbitmq_prometheus" in plugins

    environ = service_environment(services["worker"], COMPOSE_TEST_ENV)
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


def test_compose_control_plane_postgres_migration_and_api() -> None:
    """PostgreSQL 15 with a healthcheck and a volume; a one-shot migration once it is
    healthy; the API from the workers' image once the migration succeeded, on 127.0.0.1:8080
    only, checked on /readyz; workers start after the migration too. The API, the migration
    and the workers load the same config with the same environment, whose registry URL
    names the postgres service, its user and database."""
    services = compose_file()["services"]
    postgres, migrate, api, worker = (
        services[name] for name in ("postgres", "migrate", "api", "worker")
    )

    assert postgres["image"] == "postgres:15"
    assert "pg_isready" in postgres["healthcheck"]["test"]
    assert "postgres-data:/var/lib/postgresql/data" in postgres["volumes"]
    assert "ports" not in postgres  # only the compose network reaches it

    for service in (migrate, api):
        assert service["image"] == worker["image"]
        assert "build" not in service  # the worker's build makes the image
        assert service["volumes"] == worker["volumes"]
        assert service["environment"] == worker["environment"]
    assert [*migrate["entrypoint"], *migrate["command"]] == [*API_COMMAND, "migrate"]
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert migrate["restart"] == "no"
    assert [*api["entrypoint"], *api["command"]] == API_COMMAND
    completed = {"condition": "service_completed_successfully"}
    assert api["depends_on"]["migrate"] == completed
    assert api["depends_on"]["rabbitmq"] == {"condition": "service_healthy"}
    assert worker["depends_on"]["migrate"] == completed

    environ = service_environment(api, COMPOSE_TEST_ENV)
    settings = load_settings(DEPLOY / "compose" / "config.yaml", environ)
    assert settings.registry.enabled
    SecretBox.from_setting(settings.registry.secret_key)
    assert settings.api.host == "0.0.0.0"
    assert api["ports"] == [f"127.0.0.1:{settings.api.port}:{settings.api.port}"]
    probe = " ".join(api["healthcheck"]["test"])
    assert f"http://127.0.0.1:{settings.api.port}/readyz" in probe
    assert settings.registry.database_url is not None
    url = urlsplit(settings.registry.database_url.get_secret_value())
    database = service_environment(postgres, COMPOSE_TEST_ENV)
    assert (url.hostname, url.port) == ("postgres", 5432)
    assert (url.username, url.password) == (
        database["POSTGRES_USER"],
        database["POSTGRES_PASSWORD"],
    )
    assert url.path == f"/{database['POSTGRES_DB']}"
    # The publisher needs the broker only.
    assert set(services["publisher"]["environment"]) == {"HOOKLINE_BROKER_URL"}


def test_compose_secrets_come_from_the_environment() -> None:
    """The secret key and the database password are required variables (deploy/.env, which
    git ignores), never values in the file; without them Compose refuses to start."""
    services = compose_file()["services"]
    text = (DEPLOY / "docker-compose.yml").read_text()
    for service in ("worker", "api", "migrate"):
        environment = services[service]["environment"]
        assert re.fullmatch(
            r"\$\{HOOKLINE_SECRET_KEY:\?[^}]*\}", environment["HOOKLINE_SECRET_KEY"]
        )
        assert "${HOOKLINE_POSTGRES_PASSWORD:?" in environment["HOOKLINE_DATABASE_URL"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith(
        "${HOOKLINE_POSTGRES_PASSWORD:?"
    )
    assert "generate-secret-key" in text
    with pytest.raises(AssertionError, match="HOOKLINE_SECRET_KEY is required"):
        service_environment(services["api"], {"HOOKLINE_POSTGRES_PASSWORD": "x"})
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_validate_against_schemas(version: str) -> None:
    """Core objects against the Kubernetes schemas (strict: unknown fields fail); KEDA and
    Prometheus Operator objects against schemas of the fields they use."""
    checked = set()
    for key, document in kubernetes_objects().items():
        api_kind = (document["apiVersion"], document["kind"])
        # Both raise on the first field that does not fit its schema.
        if api_kind in CUSTOM_SCHEMAS:
            jsonschema.validate(document, custom_schema(api_kind))
        else:
            kubernetes_validate.validate(document, version, strict=True)
        checked.add(key)
    assert checked == {
        ("ConfigMap", "hookline-config"),
        ("Secret", "hookline-secrets"),
        ("Secret", "hookline-registry"),
        ("Deployment", WORKER),
        ("Service", WORKER),
        ("ServiceMonitor", WORKER),
        ("PodDisruptionBudget", WORKER),
        ("ScaledObject", WORKER),
        ("Deployment", API),
        ("Service", API),
        ("PodDisruptionBudget", API),
    }


def test_kustomize_builds_the_listed_objects() -> None:
    """`kubectl kustomize` (offline) builds the base into exactly the listed objects, each
    with the part-of label, and they still validate strictly."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    built = [document for document in yaml.safe_load_all(result.stdout) if document]
    assert {(d["kind"], d["metadata"]["name"]) for d in built} == set(kubernetes_objects())
    for document in built:
        assert document["metadata"]["labels"]["app.kubernetes.io/part-of"] == "hookline"
        if (document["apiVersion"], document["kind"]) not in CUSTOM_SCHEMAS:
            kubernetes_validate.validate(document, KUBERNETES_VERSIONS[-1], strict=True)


def test_kubernetes_objects_fit_together(tmp_path: Path) -> None:
    """Probes, ports, selectors, grace period and secrets agree with the config in the
    ConfigMap."""
    objects = kubernetes_objects()
    settings = kubernetes_settings(objects, tmp_path)
    pod = objects[("Deployment", WORKER)]["spec"]["template"]
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
    assert container["args"] == ["run", "--config", CONFIG_PATH]
    assert container["volumeMounts"][0]["mountPath"] == "/etc/hookline"
    assert pod["spec"]["volumes"][0]["configMap"]["name"] == "hookline-config"
    assert [source["secretRef"]["name"] for source in container["envFrom"]] == [
        "hookline-secrets",
        "hookline-registry",
    ]
    for kind in ("Service", "PodDisruptionBudget"):
        selector = objects[(kind, WORKER)]["spec"]["selector"]
        assert selector.get("matchLabels", selector).items() <= labels.items()
    service_port = objects[("Service", WORKER)]["spec"]["ports"][0]["name"]
    assert objects[("ServiceMonitor", WORKER)]["spec"]["endpoints"][0]["port"] == service_port
    scale_target = objects[("ScaledObject", WORKER)]["spec"]["scaleTargetRef"]
    assert scale_target["name"] == WORKER
    # registry.snapshot_path is on a writable emptyDir (the root filesystem is read-only).
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert settings.registry.snapshot_path is not None
    mounts = mount_paths(container, pod["spec"])
    assert "emptyDir" in mounts[str(settings.registry.snapshot_path.parent)]


def test_kubernetes_api_fits_together(tmp_path: Path) -> None:
    """The API Deployment: the workers' image, security context and Secrets; its port is
    api.port from the ConfigMap (on every interface), probed on /readyz and /healthz; the
    migration runs first as an init container with the same image, environment and config;
    the Service and the PodDisruptionBudget select its pods and no worker's."""
    objects = kubernetes_objects()
    settings = kubernetes_settings(objects, tmp_path)
    assert settings.registry.enabled
    assert settings.api.host == "0.0.0.0"
    worker_spec = pod_spec(objects, WORKER)
    spec = pod_spec(objects, API)
    template = objects[("Deployment", API)]["spec"]["template"]
    labels = template["metadata"]["labels"]
    [worker] = worker_spec["containers"]
    [api] = spec["containers"]
    [migrate] = spec["initContainers"]

    assert spec["securityContext"] == worker_spec["securityContext"]
    assert spec["automountServiceAccountToken"] is False
    assert [*api["command"], *api["args"]] == API_COMMAND
    assert [*migrate["command"], *migrate["args"]] == [*API_COMMAND, "migrate"]
    for container in (api, migrate):
        assert container["image"] == worker["image"]
        assert container["securityContext"] == worker["securityContext"]
        assert container["envFrom"] == worker["envFrom"]
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
        assert container["volumeMounts"] == [
            mount for mount in worker["volumeMounts"] if mount["name"] != "state"
        ]
    assert spec["volumes"] == [
        volume for volume in worker_spec["volumes"] if volume["name"] != "state"
    ]

    assert api["ports"] == [{"name": "http", "containerPort": settings.api.port, "protocol": "TCP"}]
    assert api["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert api["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # The API stops within 10 s of SIGTERM (api/server.py).
    assert spec["terminationGracePeriodSeconds"] > 10

    worker_labels = objects[("Deployment", WORKER)]["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        selector = objects[(kind, API)]["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items()
        assert not selector.items() <= worker_labels.items()
    [port] = objects[("Service", API)]["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (settings.api.port, "http")
    assert objects[("Deployment", API)]["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_kubernetes_registry_secret_is_a_placeholder_and_the_ca_is_mounted(tmp_path: Path) -> None:
    """The committed hookline-registry Secret holds no usable key (the API and the workers
    refuse to start with it) and no real password; its URL verifies the server with a CA
    file where both Deployments mount the optional hookline-postgres-ca ConfigMap."""
    objects = kubernetes_objects()
    registry = objects[("Secret", "hookline-registry")]["stringData"]
    assert set(registry) == {"HOOKLINE_DATABASE_URL", "HOOKLINE_SECRET_KEY"}
    with pytest.raises(ConfigError, match="generate-secret-key"):
        SecretBox.from_setting(SecretStr(registry["HOOKLINE_SECRET_KEY"]))
    try:
        key = base64.b64decode(registry["HOOKLINE_SECRET_KEY"], validate=True)
    except (binascii.Error, ValueError):
        key = b""
    assert len(key) != 32
    settings = kubernetes_settings(objects, tmp_path)
    assert settings.registry.database_url is not None
    url = urlsplit(settings.registry.database_url.get_secret_value())
    assert url.password == "CHANGE-ME"
    query = parse_qs(url.query)
    assert query["sslmode"] == ["verify-full"]
    [ca_file] = query["sslrootcert"]
    for deployment in (WORKER, API):
        spec = pod_spec(objects, deployment)
        for container in spec["containers"] + spec.get("initContainers", []):
            volume = mount_paths(container, spec)[str(Path(ca_file).parent)]
            assert volume["configMap"] == {"name": "hookline-postgres-ca", "optional": True}
    assert (
        "kubectl create secret generic hookline-registry" in (KUBERNETES / "README.md").read_text()
    )


def servicemonitor_job(objects: KubeObjects) -> str:
    """The job label the Prometheus Operator gives the workers' series: the Service's
    label named by jobLabel, else the Service's name."""
    service = objects[("Service", WORKER)]
    job_label = objects[("ServiceMonitor", WORKER)]["spec"].get("jobLabel")
    if job_label is None:
        return str(service["metadata"]["name"])
    return str(service["metadata"]["labels"][job_label])


def test_keda_scales_on_one_prometheus_trigger_over_the_backlog_gauge(tmp_path: Path) -> None:
    """One Prometheus trigger, whatever the number of endpoints: the largest of the
    workers' total backlogs, on the job the ServiceMonitor produces. No queue, endpoint or
    TriggerAuthentication is named anywhere."""
    objects = kubernetes_objects()
    settings = kubernetes_settings(objects, tmp_path)
    scaled = objects[("ScaledObject", WORKER)]["spec"]
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
    [scrape] = objects[("ServiceMonitor", WORKER)]["spec"]["endpoints"]
    assert scrape["honorLabels"] is True
    queries = [rule["expr"] for rule in alert_rules()] + dashboard_queries()
    queries.append(objects[("ScaledObject", WORKER)]["spec"]["triggers"][0]["metadata"]["query"])
    assert not [query for query in queries if "exported_endpoint" in query]


def test_keda_query_takes_one_workers_total_not_the_sum_over_pods(tmp_path: Path) -> None:
    """Evaluated by promtool on series as the ServiceMonitor scrapes them: two workers that
    see the same queues (one not done polling every queue yet), notable endpoints and _other,
    and another job's series with the same name. The result is the fuller worker's total."""
    objects = kubernetes_objects()
    query = objects[("ScaledObject", WORKER)]["spec"]["triggers"][0]["metadata"]["query"]
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
    exchange_name: str, receiver: Receiver, run_worker: RunWorker, registry_db: str
) -> None:
    """Scraped from a real worker (following a registry) during real deliveries: every
    webhook_* name that an alert or a dashboard panel queries is a series the worker
    exports."""
    receiver.script("/ok", 200)
    receiver.script("/gone", 410)
    settings = make_settings(
        exchange_name,
        [
            endpoint("ok", receiver.url("/ok"), ["e.#"], rate_limit_per_s=1000),
            endpoint("gone", receiver.url("/gone"), ["e.#"]),
        ],
        metrics={"queue_poll_s": 0.2},
        **registry_sections(registry_db),
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
