"""What every overlay renders is operable: hardened pods, probes on endpoints that exist,
requests and limits, shutdown that fits the grace period, a disruption budget for every
Deployment, network policies, secrets only by reference, topics that match the settings.

The figures checked against come from the code: the gateway's and the console's routes,
the settings each container starts with, the model entry's default timeout, the topics
of ``core.topics``, the Secret-typed settings and the providers' key variables.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

from imbot.console.app import create_app as create_console
from imbot.core import catalog as model_config
from imbot.core import topics
from imbot.core.settings import Settings, load_policy
from imbot.gateway.app import create_app
from imbot.streams.health import health_app
from imbot.streams.pipeline import PROCESSING_STAGES, ROWS
from tests.unit.test_deploy_matches_pipeline import settings_of
from tests.unit.test_deploy_schemas import (
    DEPLOY,
    OVERLAY_NAMES,
    OVERLAYS,
    Manifest,
    Rendered,
    containers,
    load_rendered,
    load_yaml_file,
    pod_spec,
)

DAY_MS = 24 * 3600 * 1000
DOCKERFILE = DEPLOY / "Dockerfile"
SECRET_TEMPLATE = DEPLOY / "secrets" / "imbot-secrets.template.yaml"


@pytest.fixture(params=OVERLAY_NAMES)
def overlay(request: pytest.FixtureRequest) -> Rendered:
    return load_rendered(OVERLAYS / request.param)


@pytest.fixture
def production() -> Rendered:
    return load_rendered(OVERLAYS / "production")


def _name(m: Manifest) -> str:
    return str(m["metadata"]["name"])


def _pods(overlay: Rendered) -> list[Manifest]:
    return [m for m in overlay.everything if pod_spec(m) is not None]


def _labels(deployment: Manifest) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions In/NotIn/Exists)."""
    match = selector.get("matchLabels", {})
    if any(labels.get(k) != v for k, v in match.items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value, op = labels.get(expr["key"]), expr["operator"]
        if op == "In" and value not in expr["values"]:
            return False
        if op == "NotIn" and value in expr["values"]:
            return False
        if op == "Exists" and value is None:
            return False
        if op == "DoesNotExist" and value is not None:
            return False
    return True


def _component(m: Manifest) -> str:
    return _labels(m)["app.kubernetes.io/component"] if m["kind"] == "Deployment" else "migrate"


def _image_user() -> int:
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE.read_text(encoding="utf-8"), re.MULTILINE)
    return int(users[-1].split(":")[0])


# -- pods ------------------------------------------------------------------------------------


def test_every_pod_is_hardened(overlay: Rendered) -> None:
    pods = _pods(overlay)
    # One per worker stage, the sender, the gateway, the console, the migration Job.
    assert len(pods) == len(PROCESSING_STAGES) + 4
    for pod in pods:
        name, spec = _name(pod), pod_spec(pod)
        assert spec is not None
        security = spec["securityContext"]
        assert security["runAsNonRoot"] is True, name
        assert security["runAsUser"] == _image_user(), f"{name}: the image's user"
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        # Each kustomization brings it: the Job is applied before the services exist.
        objects = overlay.app if pod["kind"] == "Deployment" else overlay.migrate
        accounts = [m for m in objects if m["kind"] == "ServiceAccount"]
        assert [_name(a) for a in accounts] == [spec["serviceAccountName"]], name
        emptydirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for container in containers(pod):
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, name
            assert ctx["readOnlyRootFilesystem"] is True, name
            assert ctx["capabilities"] == {"drop": ["ALL"]}, name
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert [m["name"] for m in tmp] == [m["name"] for m in tmp if m["name"] in emptydirs]
            assert tmp, f"{name}: /tmp is writable (an emptyDir)"


def test_every_container_has_requests_and_limits(overlay: Rendered) -> None:
    for pod in _pods(overlay):
        for container in containers(pod):
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), f"{_name(pod)}: {kind}"


def _port(container: Manifest, ref: str | int) -> int:
    for port in container.get("ports", []):
        if ref in (port.get("name"), port["containerPort"]):
            return int(port["containerPort"])
    raise AssertionError(f"{container['name']}: probe on undeclared port {ref!r}")


def test_every_deployment_has_probes_on_ports_and_paths_that_exist(overlay: Rendered) -> None:
    routes_of = {
        "gateway": {r.canonical for r in create_app(Settings()).router.resources()},
        "console": {r.canonical for r in create_console(Settings()).router.resources()},
    }
    worker_routes = {r.canonical for r in health_app(lambda: True).router.resources()}
    for deployment in overlay.of_kind("Deployment"):
        [container] = list(containers(deployment))
        settings = settings_of(overlay, deployment)
        command = _command(container)
        routes = routes_of.get(command, worker_routes)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            handler = container[probe]
            if "httpGet" in handler:
                assert handler["httpGet"]["path"] in routes, f"{_name(deployment)}: {probe}"
                port = _port(container, handler["httpGet"]["port"])
            else:
                port = _port(container, handler["tcpSocket"]["port"])
            served = {"gateway": settings.gateway_port, "console": settings.console_port}.get(
                command, settings.worker_metrics_port
            )
            assert port == served, f"{_name(deployment)}: {probe} probes {port}, serves {served}"
        if command == "console":
            assert settings.console_host == "0.0.0.0"  # its Service reaches it
        elif command != "gateway":
            # A worker's metrics server must listen beyond loopback for probes and Prometheus.
            assert settings.worker_metrics_host == "0.0.0.0"
        else:
            assert settings.gateway_host == "0.0.0.0"
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def _command(container: Manifest) -> str:
    return str(container["args"][0])


def test_stopping_fits_the_grace_period(overlay: Rendered) -> None:
    model_timeout = model_config.OpenAIConfig.model_fields["timeout_s"].default
    for deployment in overlay.of_kind("Deployment"):
        name, spec = _name(deployment), pod_spec(deployment)
        assert spec is not None
        grace = spec["terminationGracePeriodSeconds"]
        [container] = list(containers(deployment))
        settings = settings_of(overlay, deployment)
        if _command(container) == "gateway":
            # Out of the endpoints before SIGTERM; then the requests in flight finish.
            sleep = container["lifecycle"]["preStop"]["sleep"]["seconds"]
            assert sleep >= 5, f"{name}: endpoints and the ingress need seconds to forget it"
            assert sleep + settings.gateway_body_timeout_s + 5 <= grace, name
            continue
        if _command(container) == "console":
            assert grace >= 10, f"{name}: aiohttp's shutdown timeout (5 s) and a margin"
            continue
        # Handlers in flight get the stop grace, then commit, close, leave the group.
        assert settings.stage_stop_grace_s + 5 <= grace, f"{name}: stop grace {grace}"
        assert settings.kafka_rebalance_timeout_s is not None, name
        assert settings.stage_revoke_grace_s < settings.kafka_rebalance_timeout_s
        if container["args"][-1] == "model":
            # A model attempt at its default timeout is not cut short (and paid twice).
            assert settings.stage_stop_grace_s >= model_timeout, name


def test_every_deployment_has_one_disruption_budget_that_allows_a_drain(overlay: Rendered) -> None:
    budgets = overlay.of_kind("PodDisruptionBudget")
    for deployment in overlay.of_kind("Deployment"):
        mine = [b for b in budgets if _selects(b["spec"]["selector"], _labels(deployment))]
        assert len(mine) == 1, f"{_name(deployment)}: {len(mine)} PodDisruptionBudgets"
        spec = mine[0]["spec"]
        # minAvailable equal to a single replica would block every node drain.
        assert spec.get("maxUnavailable", 0) >= 1, f"{_name(deployment)}: use maxUnavailable"
    assert len(budgets) == len(overlay.of_kind("Deployment"))


def test_autoscaled_deployments_leave_their_replica_count_to_the_autoscaler(
    overlay: Rendered,
) -> None:
    targets = [
        h["spec"]["scaleTargetRef"]["name"] for h in overlay.of_kind("HorizontalPodAutoscaler")
    ]
    targets += [s["spec"]["scaleTargetRef"]["name"] for s in overlay.of_kind("ScaledObject")]
    assert "imbot-gateway" in targets
    for name in targets:
        deployment = overlay.one("Deployment", name)
        assert "replicas" not in deployment["spec"], f"{name}: an apply would reset the count"
    [hpa] = overlay.of_kind("HorizontalPodAutoscaler")
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_the_sender_paces_for_its_replica_count(overlay: Rendered) -> None:
    [sender] = [
        d for d in overlay.of_kind("Deployment") if _command(next(containers(d))) == "sender"
    ]
    assert settings_of(overlay, sender).sender_replicas == sender["spec"]["replicas"]


def test_every_config_reference_resolves(overlay: Rendered) -> None:
    for pod in _pods(overlay):
        spec = pod_spec(pod)
        assert spec is not None
        objects = overlay.app if pod["kind"] == "Deployment" else overlay.migrate
        configmaps = {_name(m) for m in objects if m["kind"] == "ConfigMap"}
        for volume in spec["volumes"]:
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, _name(pod)
        for container in containers(pod):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps, _name(pod)


def test_the_policy_is_mounted_where_the_settings_look(overlay: Rendered) -> None:
    for deployment in overlay.of_kind("Deployment"):
        [container] = list(containers(deployment))
        policy = settings_of(overlay, deployment).policy_file
        mounts = [m for m in container["volumeMounts"] if m["mountPath"] == str(policy.parent)]
        assert len(mounts) == 1, f"{_name(deployment)}: nothing mounted at {policy.parent}"
        spec = pod_spec(deployment)
        assert spec is not None
        [volume] = [v for v in spec["volumes"] if v["name"] == mounts[0]["name"]]
        configmap = overlay.one("ConfigMap", volume["configMap"]["name"])
        assert policy.name in configmap["data"]


def test_the_image_is_the_same_for_the_services_and_the_migration(overlay: Rendered) -> None:
    images = {c["image"] for pod in _pods(overlay) for c in containers(pod)}
    assert len(images) == 1, f"{overlay.name}: {images}"
    namespaces = {m["metadata"].get("namespace") for m in _pods(overlay)}
    assert len(namespaces) == 1, f"{overlay.name}: the Job runs where the services do"


# -- secrets ---------------------------------------------------------------------------------


def _secret_readers(overlay: Rendered) -> dict[str, set[str]]:
    """Secret name -> the names of the pods that read it."""
    readers: dict[str, set[str]] = {}
    for pod in _pods(overlay):
        for container in containers(pod):
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    readers.setdefault(source["secretRef"]["name"], set()).add(_name(pod))
            assert not [
                e for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})
            ]
    return readers


def _template() -> dict[str, dict[str, str]]:
    return {_name(s): s["stringData"] for s in load_yaml_file(SECRET_TEMPLATE)}


def _secret_settings() -> set[str]:
    """The IMBOT_ variables of the Secret-typed settings, and the database URL (it carries
    the password)."""
    names = {"IMBOT_DATABASE_URL"}
    for field, info in Settings.model_fields.items():
        if "SecretStr" in str(info.annotation) or info.annotation is SecretStr:
            names.add(f"IMBOT_{field.upper()}")
    return names


def _provider_key_variables() -> set[str]:
    """The key variables the providers read by default, and those the default policy names."""
    names: set[str] = set()
    for value in vars(model_config).values():
        if isinstance(value, type) and issubclass(value, BaseModel):
            for field, info in value.model_fields.items():
                if field.endswith("_env") and isinstance(info.default, str):
                    names.add(info.default)
    policy = load_policy(Settings().policy_file)
    for entry in policy.models.values():
        names |= {str(v) for k, v in entry.model_dump().items() if k.endswith("_env") and v}
    return names


def test_the_secret_template_has_every_secret_and_no_value() -> None:
    template = _template()
    keys = {key for data in template.values() for key in data}
    assert _secret_settings() <= keys
    assert _provider_key_variables() <= keys
    assert {"IMBOT_EASEMOB_CLIENT_ID", "IMBOT_EASEMOB_CLIENT_SECRET"} <= keys
    for name, data in template.items():
        assert all(value == "" for value in data.values()), f"{name}: a value in the repository"
    # Nothing secret is rendered: the Secrets are created apart, from the template.
    for overlay_name in OVERLAY_NAMES:
        assert not load_rendered(OVERLAYS / overlay_name).of_kind("Secret")


def test_each_pod_reads_only_the_secrets_it_needs(overlay: Rendered) -> None:
    readers = _secret_readers(overlay)
    assert set(readers) == set(_template()), "every Secret of the template is read, none else"
    deployments = {_name(d): d for d in overlay.of_kind("Deployment")}
    for secret, pods in readers.items():
        for pod in pods - {"imbot-migrate"}:
            args = next(containers(deployments[pod]))["args"]
            row = next(
                (r for r in ROWS if r.name == args[-1] or r.process == args[0] == "sender"),
                None,
            )
            if secret == "imbot-callback":
                assert args == ["gateway"], f"{pod} reads the callback secret"
            if secret == "imbot-console":
                assert args == ["console"], f"{pod} reads the console's logins"
            if secret == "imbot-providers":
                assert row is not None
                assert "catalog" in row.needs, f"{pod} reads provider keys"
            if secret == "imbot-easemob":
                assert row is not None
                assert row.needs & {"sender", "easemob"}, f"{pod} reads Easemob's"
    assert "imbot-migrate" in readers["imbot-database"]


# -- network ---------------------------------------------------------------------------------


def _policies(overlay: Rendered, kind: str, labels: dict[str, str]) -> list[Manifest]:
    return [
        p
        for p in overlay.of_kind("NetworkPolicy")
        if kind in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], labels)
    ]


def _kafka_address(overlay: Rendered) -> tuple[str, int]:
    [kafka] = overlay.of_kind("Kafka")
    [listener] = [x for x in kafka["spec"]["kafka"]["listeners"] if x["tls"] is False]
    return str(kafka["metadata"]["namespace"]), int(listener["port"])


def test_network_policies_deny_by_default_and_allow_what_each_pod_uses(overlay: Rendered) -> None:
    deny = [p for p in overlay.of_kind("NetworkPolicy") if p["spec"]["podSelector"] == {}]
    assert any(
        set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
        for p in deny
    )
    kafka_namespace, kafka_port = _kafka_address(overlay)
    for deployment in overlay.of_kind("Deployment"):
        labels, name = _labels(deployment), _name(deployment)
        egress = [
            r for p in _policies(overlay, "Egress", labels) for r in p["spec"].get("egress", [])
        ]
        ports = {(port.get("protocol", "TCP"), port["port"]) for r in egress for port in r["ports"]}
        assert {("UDP", 53), ("TCP", 5432), ("TCP", kafka_port)} <= ports, name
        to_kafka = [
            peer
            for r in egress
            if any(port["port"] == kafka_port for port in r["ports"])
            for peer in r["to"]
        ]
        assert any(
            peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            == kafka_namespace
            for peer in to_kafka
        ), f"{name}: egress to Kafka's namespace {kafka_namespace}"
        needs_https = (
            _component(deployment) == "sender"
            or next(containers(deployment))["args"][-1] == "model"
        )
        assert (("TCP", 443) in ports) == needs_https, f"{name}: HTTPS out only where it is used"
        ingress = [
            r for p in _policies(overlay, "Ingress", labels) for r in p["spec"].get("ingress", [])
        ]
        [container] = list(containers(deployment))
        served = {p["containerPort"] for p in container["ports"]}
        allowed = {port["port"] for r in ingress for port in r["ports"]}
        assert served <= allowed, f"{name}: {served - allowed} unreachable (Prometheus, ingress)"
        if _command(container) != "gateway":
            assert all("namespaceSelector" in peer for r in ingress for peer in r["from"])


def _ingress(overlay: Rendered, name: str) -> tuple[Manifest, Manifest]:
    """The Ingress ``name`` and the one path of its one rule."""
    ingress = overlay.one("Ingress", name)
    [rule] = ingress["spec"]["rules"]
    [path] = rule["http"]["paths"]
    [tls] = ingress["spec"]["tls"]
    assert rule["host"] in tls["hosts"]
    assert tls["secretName"]
    return ingress, path


def test_the_gateway_is_reached_from_the_ingress_controller_only(overlay: Rendered) -> None:
    gateway = overlay.one("Deployment", "imbot-gateway")
    [container] = list(containers(gateway))
    http = _port(container, "http")
    sources = [
        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for p in _policies(overlay, "Ingress", _labels(gateway))
        for r in p["spec"].get("ingress", [])
        if any(port["port"] == http for port in r["ports"])
        for peer in r["from"]
    ]
    assert sorted(set(sources)) == ["ingress-nginx", "monitoring"]
    _, path = _ingress(overlay, "imbot-gateway")
    assert path["path"] == Settings().callback_path
    assert path["pathType"] == "Exact"
    service = overlay.one("Service", path["backend"]["service"]["name"])
    assert _selects({"matchLabels": service["spec"]["selector"]}, _labels(gateway))
    assert {_name(i) for i in overlay.of_kind("Ingress")} == {"imbot-gateway", "imbot-console"}


def test_the_console_is_reached_from_the_ingress_controller_on_a_host_of_its_own(
    overlay: Rendered,
) -> None:
    console = overlay.one("Deployment", "imbot-console")
    [container] = list(containers(console))
    http = _port(container, "http")
    sources = {
        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for p in _policies(overlay, "Ingress", _labels(console))
        for r in p["spec"].get("ingress", [])
        if any(port["port"] == http for port in r["ports"])
        for peer in r["from"]
    }
    assert sources == {"ingress-nginx"}
    ingress, path = _ingress(overlay, "imbot-console")
    gateway, _ = _ingress(overlay, "imbot-gateway")
    assert ingress["spec"]["rules"][0]["host"] != gateway["spec"]["rules"][0]["host"]
    service = overlay.one("Service", path["backend"]["service"]["name"])
    assert _selects({"matchLabels": service["spec"]["selector"]}, _labels(console))


def test_production_gets_its_certificate_from_cert_manager(production: Rendered) -> None:
    for ingress in production.of_kind("Ingress"):
        assert ingress["metadata"]["annotations"]["cert-manager.io/cluster-issuer"]


def test_prometheus_scrapes_every_metrics_port(production: Rendered) -> None:
    monitors = production.of_kind("ServiceMonitor")
    services = production.of_kind("Service")
    for deployment in production.of_kind("Deployment"):
        [container] = list(containers(deployment))
        if _command(container) == "console":
            continue  # no metrics of its own: it reads the others' (IMBOT_PROMETHEUS_URL)
        port_names = {p["name"] for p in container["ports"]}
        scraped = [
            endpoint
            for monitor in monitors
            for service in services
            if _selects(monitor["spec"]["selector"], service["metadata"].get("labels", {}))
            and _selects({"matchLabels": service["spec"]["selector"]}, _labels(deployment))
            for endpoint in monitor["spec"]["endpoints"]
            if endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
            and any(p["targetPort"] in port_names for p in service["spec"]["ports"])
        ]
        assert scraped, f"{_name(deployment)}: no ServiceMonitor reaches its metrics"
        assert all(e.get("path", "/metrics") == "/metrics" for e in scraped)


# -- Kafka -----------------------------------------------------------------------------------


def _topic_config(overlay: Rendered) -> dict[str, Manifest]:
    return {t["spec"]["topicName"]: t["spec"] for t in overlay.of_kind("KafkaTopic")}


def test_one_kafka_topic_per_topic_with_the_settings_figures(overlay: Rendered) -> None:
    declared = _topic_config(overlay)
    settings = settings_of(overlay, overlay.one("Deployment", "imbot-gateway"))
    assert set(declared) == {settings.topic(t) for t in (*topics.ALL, *topics.TOOLS)}
    [broker_pool] = [p for p in overlay.of_kind("KafkaNodePool") if "broker" in p["spec"]["roles"]]
    for name, spec in declared.items():
        assert spec["partitions"] == settings.topic_partitions, name
        assert spec["replicas"] == settings.topic_replication, name
        assert spec["replicas"] <= broker_pool["spec"]["replicas"], name
        assert 1 <= spec["config"]["min.insync.replicas"] <= spec["replicas"], name
    namespace, port = _kafka_address(overlay)
    [kafka] = overlay.of_kind("Kafka")
    service = f"{kafka['metadata']['name']}-kafka-bootstrap"
    same_namespace = (
        namespace == overlay.one("Deployment", "imbot-gateway")["metadata"]["namespace"]
    )
    expected = f"{service}:{port}" if same_namespace else f"{service}.{namespace}:{port}"
    assert settings.kafka_bootstrap == expected


def test_production_topics_survive_a_broker_and_keep_a_week_for_replay(
    production: Rendered,
) -> None:
    declared = _topic_config(production)
    for name, spec in declared.items():
        assert spec["replicas"] == 3, name
        assert spec["config"]["min.insync.replicas"] == 2, name
        assert spec["config"]["retention.ms"] >= 7 * DAY_MS, name
    dlq = declared[topics.DLQ]["config"]["retention.ms"]
    others = [
        s["config"]["retention.ms"]
        for n, s in declared.items()
        if n != topics.DLQ and n not in topics.TOOLS
    ]
    assert dlq > max(others), "DLQ records wait for a person: they are kept longer"
    # A requeue mark outlives the record it marks, or the record could be requeued twice.
    assert declared[topics.DLQ_REQUEUED]["config"]["retention.ms"] > dlq
    [kafka] = production.of_kind("Kafka")
    config = kafka["spec"]["kafka"]["config"]
    assert config["min.insync.replicas"] == 2
    assert config["default.replication.factor"] == 3
    assert config["auto.create.topics.enable"] is False
    # Committed offsets outlive the records they point into.
    assert config["offsets.retention.minutes"] * 60_000 >= min(others)


def test_the_dockerfile_copies_what_the_dockerignore_lets_in() -> None:
    ignore = (DEPLOY.parent / ".dockerignore").read_text(encoding="utf-8").split()
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(encoding="utf-8"), re.M)
    sources = {src.rstrip("/") for line in copied for src in line.split()}
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert sources == {"pyproject.toml", "README.md", "imbot"}
    assert sources <= allowed
    assert Path(DEPLOY.parent / "imbot" / "__init__.py").exists()
