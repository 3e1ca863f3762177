"""Every overlay of deploy/ renders, and every object it renders is valid, offline.

This module also holds what the other tests/unit/test_deploy_*.py share (``make
deploy-check`` runs them alone): rendering, the schemas, walking pod specs. Rendering is
``kubectl kustomize`` (kubectl >= 1.27 carries kustomize v5, which the overlays need);
built-in kinds are validated against the Kubernetes OpenAPI schemas that PyPI's
``kubernetes-validate`` ships, custom resources against the CRD schemas vendored in
deploy/schemas/ (tools/vendor_crd_schemas.py made them). Both strictly: a field the
schema does not define is an error, as a typo would be silently dropped by the API server.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = DEPLOY / "overlays"
SCHEMAS = DEPLOY / "schemas"

# The oldest Kubernetes the manifests are for (native preStop sleep, autoscaling/v2, …).
KUBERNETES_VERSION = "1.30"
KUBECTL_MIN = (1, 27)  # the first kubectl with kustomize v5
KUBECTL_HELP = (
    "deploy-check needs kubectl >= 1.27 (it carries kustomize v5) on PATH. Install one: "
    "https://kubernetes.io/docs/tasks/tools/#kubectl (a single binary), or your package "
    "manager's recent kubectl (Debian's kubernetes-client is 1.20: too old). "
    "Set IMBOT_SKIP_KUBECTL=1 to skip the rendering checks explicitly."
)

Manifest = dict[str, Any]


class KubectlMissing(RuntimeError):
    """No kubectl, or one too old to render the overlays (the message says what to do)."""


def skip_kubectl() -> bool:
    return os.environ.get("IMBOT_SKIP_KUBECTL") == "1"


@functools.cache
def kubectl() -> str:
    """The path of a kubectl new enough, or ``KubectlMissing`` saying how to get one."""
    path = shutil.which("kubectl")
    if path is None:
        raise KubectlMissing(f"kubectl not found. {KUBECTL_HELP}")
    try:
        out = subprocess.run(
            [path, "version", "--client", "-o", "json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        client = json.loads(out)["clientVersion"]
        version = (int(client["major"]), int(re.sub(r"\D.*", "", client["minor"])))
    except (subprocess.SubprocessError, OSError, ValueError, KeyError) as exc:
        raise KubectlMissing(f"{path}: cannot read its version ({exc}). {KUBECTL_HELP}") from None
    if version < KUBECTL_MIN:
        found = ".".join(map(str, version))
        raise KubectlMissing(f"{path} is kubectl {found}, too old. {KUBECTL_HELP}")
    return path


def overlays() -> list[Path]:
    """Every overlay: deploy/overlays/<name> (its migrate/ is rendered apart)."""
    return sorted(p.parent for p in OVERLAYS.glob("*/kustomization.yaml"))


@functools.cache
def render(directory: Path) -> tuple[Manifest, ...]:
    """``kubectl kustomize directory``, parsed; each object once."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@dataclass(frozen=True)
class Rendered:
    """One overlay's output: the services (``apply -k <overlay>``) and the migration Job's
    (``apply -k <overlay>/migrate``, applied first)."""

    name: str
    app: tuple[Manifest, ...]
    migrate: tuple[Manifest, ...]

    @property
    def everything(self) -> tuple[Manifest, ...]:
        return self.app + self.migrate

    def of_kind(self, kind: str) -> list[Manifest]:
        return [m for m in self.everything if m["kind"] == kind]

    def one(self, kind: str, name: str) -> Manifest:
        found = [m for m in self.of_kind(kind) if m["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: {len(found)} {kind} named {name!r}"
        return found[0]

    def generated(self, kind: str, prefix: str) -> Manifest:
        """A generated object (its name has kustomize's hash suffix)."""
        found = [
            m
            for m in self.of_kind(kind)
            if re.fullmatch(rf"{re.escape(prefix)}(-[a-z0-9]{{10}})?", m["metadata"]["name"])
        ]
        assert len(found) == 1, f"{self.name}: {len(found)} {kind} named {prefix}(-hash)"
        return found[0]


def rendered(overlay: Path) -> Rendered:
    migrate = overlay / "migrate"
    return Rendered(
        overlay.name,
        render(overlay),
        render(migrate) if (migrate / "kustomization.yaml").exists() else (),
    )


def kind_name(manifest: Manifest) -> str:
    meta = manifest.get("metadata", {})
    where = f"{meta.get('namespace')}/" if meta.get("namespace") else ""
    return f"{manifest.get('kind')} {where}{meta.get('name')}"


# -- schemas -----------------------------------------------------------------------------


_SUBSCHEMAS = ("items", "additionalProperties", "not")
_SUBSCHEMA_LISTS = ("anyOf", "allOf", "oneOf")


def _strict(schema: Any) -> Any:
    """A CRD schema that refuses undeclared fields where the API server's pruning would
    silently drop them (objects with ``properties``, no ``additionalProperties``, not
    ``x-kubernetes-preserve-unknown-fields``)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {name: _strict(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    for key in _SUBSCHEMAS:
        if isinstance(schema.get(key), dict):
            out[key] = _strict(schema[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            out[key] = [_strict(sub) for sub in schema[key]]
    return out


def crd_schema_path(manifest: Manifest) -> Path:
    group, _, version = str(manifest["apiVersion"]).rpartition("/")
    return SCHEMAS / f"{group}_{version}_{manifest['kind']}.json"


@functools.cache
def _crd_validator(path: Path) -> jsonschema.protocols.Validator:
    schema = _strict(json.loads(path.read_text(encoding="utf-8")))
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    # Against the metaschema without format checks: the CRDs' patterns are Go's regexp
    # syntax (e.g. a "(?i)" after "^"), which Python's re refuses to compile up front.
    invalid = next(cls(cls.META_SCHEMA).iter_errors(schema), None)
    if invalid is not None:
        raise jsonschema.SchemaError.create_from(invalid)
    return cls(schema)


def is_custom(manifest: Manifest) -> bool:
    """A kind of an API group the cluster gets from an operator's CRD, not Kubernetes."""
    group = str(manifest["apiVersion"]).rpartition("/")[0]
    return "." in group and not group.endswith(".k8s.io")


def schema_errors(manifest: Manifest) -> list[str]:
    """Why ``manifest`` is invalid against its kind's schema (empty: valid)."""
    if is_custom(manifest):
        path = crd_schema_path(manifest)
        if not path.exists():
            return [f"no vendored CRD schema {path.name} in deploy/schemas"]
        errors = _crd_validator(path).iter_errors(manifest)
        return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
    try:
        kubernetes_validate.validate(copy.deepcopy(manifest), KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path)) or '<root>'}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [exc.message]
    return []


# -- walking pod specs --------------------------------------------------------------------


def pod_spec(manifest: Manifest) -> Manifest | None:
    """The pod template's spec of a Deployment or Job, else None."""
    if manifest["kind"] not in {"Deployment", "Job"}:
        return None
    spec: Manifest = manifest["spec"]["template"]["spec"]
    return spec


def containers(manifest: Manifest) -> Iterator[Manifest]:
    spec = pod_spec(manifest)
    if spec is not None:
        yield from spec.get("initContainers", [])
        yield from spec["containers"]


def load_yaml_file(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def load_rendered(overlay: Path) -> Rendered:
    """``rendered(overlay)`` for a test: skipped only when IMBOT_SKIP_KUBECTL=1 is set, a
    failure saying how to get kubectl when it is missing or too old."""
    if skip_kubectl():
        pytest.skip("IMBOT_SKIP_KUBECTL=1: the overlays are not rendered")
    try:
        kubectl()
    except KubectlMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    return rendered(overlay)


OVERLAY_NAMES = [p.name for p in overlays()]


@pytest.fixture(params=OVERLAY_NAMES)
def overlay(request: pytest.FixtureRequest) -> Rendered:
    return load_rendered(OVERLAYS / request.param)


# -- the tests ------------------------------------------------------------------------------


def test_the_overlays_are_dev_and_production() -> None:
    assert {"dev", "production"} <= set(OVERLAY_NAMES)
    for name in OVERLAY_NAMES:
        assert (OVERLAYS / name / "migrate" / "kustomization.yaml").exists(), name


def test_kubectl_is_recent_enough() -> None:
    if skip_kubectl():
        pytest.skip("IMBOT_SKIP_KUBECTL=1")
    try:
        kubectl()
    except KubectlMissing as exc:
        pytest.fail(str(exc), pytrace=False)


def test_every_rendered_object_is_valid_against_its_schema(overlay: Rendered) -> None:
    assert len(overlay.app) > 20  # both kustomizations rendered
    assert overlay.migrate
    invalid = {kind_name(m): errors for m in overlay.everything if (errors := schema_errors(m))}
    assert not invalid, f"{overlay.name}: invalid objects:\n" + "\n".join(
        f"  {name}: {'; '.join(errors)}" for name, errors in invalid.items()
    )


def test_the_secret_template_is_valid() -> None:
    secrets = load_yaml_file(DEPLOY / "secrets" / "imbot-secrets.template.yaml")
    assert secrets
    for secret in secrets:
        assert secret["kind"] == "Secret"
        assert not schema_errors(secret), kind_name(secret)


def test_a_misspelt_field_is_refused() -> None:
    # The validation is strict, built-in kinds and custom resources alike (else a typo
    # would pass here and be dropped silently by the API server).
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"app": "x"}},
            "template": {
                "metadata": {"labels": {"app": "x"}},
                "spec": {"containers": [{"name": "x", "image": "x", "comand": ["x"]}]},
            },
        },
    }
    assert any("comand" in e for e in schema_errors(deployment))
    scaled = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "x"},
        "spec": {"scaleTargetRef": {"name": "x"}, "maxReplicas": 3, "triggers": []},
    }
    assert any("maxReplicas" in e for e in schema_errors(scaled))
    unknown = {"apiVersion": "example.com/v1", "kind": "Nothing", "metadata": {"name": "x"}}
    assert schema_errors(unknown) == [
        "no vendored CRD schema example.com_v1_Nothing.json in deploy/schemas"
    ]


def test_every_vendored_schema_is_a_schema_and_has_its_source_recorded() -> None:
    readme = (SCHEMAS / "README.md").read_text(encoding="utf-8")
    files = sorted(SCHEMAS.glob("*.json"))
    assert len(files) >= 6
    for path in files:
        _crd_validator(path)  # check_schema raises on an invalid one
        assert f"`{path.name}`" in readme, f"{path.name}: source not recorded in README.md"
