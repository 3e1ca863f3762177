"""Every metric is defined in its room's one list (``imbot/<room>/metrics.py``), names are
unique, and the README's table of metrics is the code's (run this file to print the table)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

ROOT = Path(__file__).resolve().parents[2]
ROOMS = ("gateway", "streams", "adapters", "moderation", "sender")
START, END = "<!-- metrics -->", "<!-- /metrics -->"


def defined() -> dict[str, tuple[str, str, str]]:
    """name → (room, type, help) of every metric in the rooms' metrics modules."""
    found: dict[str, tuple[str, str, str]] = {}
    for room in ROOMS:
        module = importlib.import_module(f"imbot.{room}.metrics")
        for value in vars(module).values():
            if isinstance(value, MetricWrapperBase):
                name = value._name + ("_total" if value._type == "counter" else "")
                assert name not in found, f"{name} defined twice"
                labels = ",".join(value._labelnames)
                assert value._type, f"{name} has no type"
                kind = value._type + (f" {{{labels}}}" if labels else "")
                found[name] = (room, kind, value._documentation)
    return found


def table() -> str:
    rows = ["| metric | room | type {labels} | meaning |", "|---|---|---|---|"]
    for name, (room, kind, doc) in sorted(defined().items(), key=lambda kv: (kv[1][0], kv[0])):
        rows.append(f"| `{name}` | {room} | {kind} | {doc} |")
    return "\n".join(rows)


def test_every_metric_lives_in_its_room_s_metrics_module() -> None:
    """No ``Counter(``/``Histogram(``/``Gauge(`` outside the metrics modules."""
    stray = []
    for path in sorted((ROOT / "imbot").rglob("*.py")):
        if path.name == "metrics.py" or "devtools" in path.parts:
            continue
        if re.search(r"\b(Counter|Histogram|Gauge|Summary)\(\s*\"imbot_", path.read_text()):
            stray.append(str(path.relative_to(ROOT)))
    assert stray == []


def test_every_registered_imbot_metric_is_in_a_metrics_module() -> None:
    ours = set(defined())
    for room in ROOMS:
        importlib.import_module(f"imbot.{room}.metrics")
    registered = {
        m.name + ("_total" if m.type == "counter" else "")
        for m in REGISTRY.collect()
        if m.name.startswith("imbot_")
    }
    assert registered <= ours | {n.removesuffix("_total") for n in ours}


def test_the_readme_lists_exactly_the_code_s_metrics() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert START in readme, "README needs the metrics table markers"
    assert END in readme, "README needs the metrics table markers"
    listed = readme.split(START, 1)[1].split(END, 1)[0].strip()
    assert listed == table(), "README metrics table is stale; replace it with:\n" + table()


if __name__ == "__main__":
    print(table())
