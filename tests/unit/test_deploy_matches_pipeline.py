"""The Kubernetes manifests run every stage of the pipeline table, one Deployment each,
and no stage the table does not have."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from imbot.streams.pipeline import PIPELINE, PROCESSING_STAGES, SENDER_STAGES, STAGE_NAMES

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
            containers: list[dict[str, Any]] = doc["spec"]["template"]["spec"]["containers"]
            for container in containers:
                stages = _stages([str(a) for a in container.get("args", [])])
                if stages is not None:
                    found.append((file, doc["metadata"]["name"], stages))
    return found


def test_every_stage_has_one_deployment_of_its_own() -> None:
    deployments = _deployments()
    for row in PIPELINE:
        running = [(file, name) for file, name, stages in deployments if row.name in stages]
        assert len(running) == 1, f"stage {row.name!r} is run by {running or 'no Deployment'}"
        [(file, name)] = running
        assert file == MANIFEST[row.process], f"{name} belongs in {MANIFEST[row.process]}"
        [stages] = [s for f, n, s in deployments if (f, n) == (file, name)]
        assert stages == [row.name], f"{name} runs {stages}, not exactly {row.name!r}"


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
    assert _stages(["sender"]) == ["send"]
    assert _stages(["gateway"]) is None
