"""The Kubernetes manifests run every stage of the pipeline table, one Deployment each
(the sender's, ``imbot sender``, runs every row whose process is the sender: the send
stage and the side rows it hosts), and no stage the table does not have: in deploy/base's
files, and in what every overlay renders (the args each Deployment's container runs,
parsed by the real ``imbot`` parser).
Where production scales a stage on consumer lag, the KEDA trigger watches the consumer
group and topic the worker really uses (``streams.worker.build``), bounded by the
topic's partitions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from imbot.cli.main import build_parser
from imbot.core.settings import Settings
from imbot.streams.pipeline import (
    PROCESSING_STAGES,
    ROWS,
    SENDER_STAGES,
    STAGE_NAMES,
    StageSpec,
    spec,
)
from imbot.streams.worker import consumer_group
from tests.unit.test_deploy_schemas import (
    OVERLAY_NAMES,
    OVERLAYS,
    Manifest,
    Rendered,
    containers,
    load_rendered,
)

BASE = Path(__file__).resolve().parents[2] / "deploy" / "base"
# Where the Deployment of a row runs, by the row's process (its imbot command).
MANIFEST = {"worker": "workers.yaml", "sender": "sender.yaml"}


def _stages(args: list[str]) -> list[str] | None:
    """The stages an ``imbot`` command line runs (None: not a pipeline process)."""
    if not args:
        return None
    if args[0] == "sender":
        return list(SENDER_STAGES)
    if args[0] != "worker":
        return None
    named = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--stage"]
    named += [arg.split("=", 1)[1] for arg in args if arg.startswith("--stage=")]
    return named or list(PROCESSING_STAGES)


def _deployments() -> list[tuple[str, str, list[str]]]:
    """(manifest file, Deployment name, stages run) for every pipeline Deployment."""
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    found: list[tuple[str, str, list[str]]] = []
    for file in kustomization["resources"]:
        for doc in yaml.safe_load_all((BASE / file).read_text()):
            if not isinstance(doc, dict) or doc.get("kind") != "Deployment":
                continue
            pod_containers: list[dict[str, Any]] = doc["spec"]["template"]["spec"]["containers"]
            for container in pod_containers:
                stages = _stages([str(a) for a in container.get("args", [])])
                if stages is not None:
                    found.append((file, doc["metadata"]["name"], stages))
    return found


def _runs_with(row: StageSpec) -> list[str]:
    """What the one Deployment that runs ``row`` runs: a worker row alone, a sender row
    with the sender's other rows (``imbot sender`` runs them all)."""
    return list(SENDER_STAGES) if row.process == "sender" else [row.name]


def test_every_stage_has_one_deployment_of_its_own() -> None:
    deployments = _deployments()
    for row in ROWS:
        running = [(file, name) for file, name, stages in deployments if row.name in stages]
        assert len(running) == 1, f"stage {row.name!r} is run by {running or 'no Deployment'}"
        [(file, name)] = running
        assert file == MANIFEST[row.process], f"{name} belongs in {MANIFEST[row.process]}"
        [stages] = [s for f, n, s in deployments if (f, n) == (file, name)]
        assert stages == _runs_with(row), f"{name} runs {stages}, not {_runs_with(row)}"


def test_no_deployment_runs_a_stage_the_table_does_not_have() -> None:
    deployments = _deployments()
    assert deployments  # the manifests were found and parsed
    for file, name, stages in deployments:
        unknown = set(stages) - set(STAGE_NAMES)
        assert not unknown, f"{file}: {name} runs {sorted(unknown)}, not in streams.pipeline"


def test_a_stage_named_in_the_args_is_recognised() -> None:
    assert _stages(["worker", "--stage", "route"]) == ["route"]
    assert _stages(["worker", "--stage=model"]) == ["model"]
    assert _stages(["worker"]) == list(PROCESSING_STAGES)
    assert _stages(["sender"]) == list(SENDER_STAGES)
    assert _stages(["sender"]) == ["send", "feedback", "send-stream"]
    assert _stages(["gateway"]) is None


# -- what the overlays render ---------------------------------------------------------------


@pytest.fixture(params=OVERLAY_NAMES)
def overlay(request: pytest.FixtureRequest) -> Rendered:
    return load_rendered(OVERLAYS / request.param)


def _command(manifest: Manifest) -> list[str]:
    [container] = list(containers(manifest))
    assert not container.get("command"), f"{manifest['metadata']['name']}: the image's entrypoint"
    return [str(arg) for arg in container.get("args", [])]


def _rendered_stages(overlay: Rendered) -> dict[str, list[str]]:
    """Deployment name -> the stages it runs (only pipeline processes)."""
    found = {}
    for deployment in overlay.of_kind("Deployment"):
        stages = _stages(_command(deployment))
        if stages is not None:
            found[deployment["metadata"]["name"]] = stages
    return found


def settings_of(overlay: Rendered, deployment: Manifest) -> Settings:
    """The settings the container of ``deployment`` starts with: its ConfigMaps' data and
    its env values (the Secrets' values are not in the repository)."""
    [container] = list(containers(deployment))
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(overlay.one("ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    fields: dict[str, Any] = {  # strings, as the container's environment gives them
        name.removeprefix("IMBOT_").lower(): value
        for name, value in env.items()
        if name.startswith("IMBOT_")
    }
    unknown = set(fields) - set(Settings.model_fields)
    assert not unknown, f"{deployment['metadata']['name']}: no such settings {sorted(unknown)}"
    return Settings(**fields)


def test_every_deployment_runs_a_real_imbot_command(overlay: Rendered) -> None:
    parser = build_parser()
    commands = {d["metadata"]["name"]: _command(d) for d in overlay.of_kind("Deployment")}
    for name, args in commands.items():
        parsed = parser.parse_args(args)  # exits (SystemExit) on an unknown command or stage
        assert parsed.command in {"gateway", "worker", "sender", "console"}, f"{name}: {args}"
    assert [args for args in commands.values() if args == ["gateway"]] == [["gateway"]]
    for job in overlay.of_kind("Job"):
        assert parser.parse_args(_command(job)).command == "migrate"


def test_every_overlay_runs_each_stage_in_one_deployment_of_its_own(overlay: Rendered) -> None:
    running = _rendered_stages(overlay)
    for row in ROWS:
        owners = [name for name, stages in running.items() if row.name in stages]
        assert len(owners) == 1, f"{overlay.name}: stage {row.name!r} is run by {owners}"
        assert running[owners[0]] == _runs_with(row), f"{overlay.name}: {owners[0]} runs more"
    assert sorted(s for stages in running.values() for s in stages) == sorted(STAGE_NAMES)


def _worker_group(settings: Settings, stages: list[str]) -> tuple[str, str]:
    """(consumer group, broker) of the Faust app ``imbot worker`` builds for ``stages``."""
    return consumer_group(settings, stages), settings.kafka_bootstrap


def _scaled_objects(overlay: Rendered) -> dict[str, Manifest]:
    return {s["spec"]["scaleTargetRef"]["name"]: s for s in overlay.of_kind("ScaledObject")}


def test_production_scales_every_processing_stage_on_its_consumer_lag() -> None:
    production = load_rendered(OVERLAYS / "production")
    scaled = _scaled_objects(production)
    running = _rendered_stages(production)
    by_stage = {stages[0]: name for name, stages in running.items()}
    assert {by_stage[s] for s in PROCESSING_STAGES} == set(scaled)
    # The sender paces at rate / IMBOT_SENDER_REPLICAS: nothing may change its count.
    autoscaled = set(scaled) | {
        h["spec"]["scaleTargetRef"]["name"] for h in production.of_kind("HorizontalPodAutoscaler")
    }
    assert not {by_stage[SENDER_STAGES[0]]} & autoscaled


def test_each_lag_trigger_watches_the_group_and_topic_its_worker_uses() -> None:
    overlay = load_rendered(OVERLAYS / "production")
    assert overlay.of_kind("ScaledObject")
    running = _rendered_stages(overlay)
    topics = {
        t["spec"].get("topicName", t["metadata"]["name"]): t for t in overlay.of_kind("KafkaTopic")
    }
    for target, scaled in _scaled_objects(overlay).items():
        deployment = overlay.one("Deployment", target)
        settings = settings_of(overlay, deployment)
        [stage] = running[target]
        group, bootstrap = _worker_group(settings, [stage])
        [trigger] = scaled["spec"]["triggers"]
        assert trigger["type"] == "kafka"
        meta = trigger["metadata"]
        assert meta["consumerGroup"] == group, f"{target}: the worker's group is {group}"
        assert meta["bootstrapServers"] == bootstrap
        topic = settings.topic(spec(stage).input)
        assert meta["topic"] == topic, f"{target} reads {topic}"
        assert int(meta["lagThreshold"]) > 0
        # Records in flight count as lag: the threshold is below what one replica holds.
        assert int(meta["lagThreshold"]) <= settings.stage_max_in_flight or stage != "model"
        partitions = topics[topic]["spec"]["partitions"]
        assert scaled["spec"]["maxReplicaCount"] <= partitions, f"{target}: idle replicas"
        assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
        # The offsets KEDA assumes for a group with none committed are the worker's own.
        assert meta["offsetResetPolicy"] == "earliest"
