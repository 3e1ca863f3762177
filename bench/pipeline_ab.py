"""Pipeline overhead, this tree against an earlier commit, alternated in one run.

``bench.pipeline_floor``'s PostgreSQL run (100 AI messages/s, zero-latency demo model, callback to
delivered reply) on a ``git worktree`` of REV and on this tree, in turns, so a machine that
is slower today than on another day (or busier for a minute) weighs on both alike. Each run
is a separate process tree importing only its own tree's code.

    python -m bench.pipeline_ab 877e2cb --pairs 3
"""

from __future__ import annotations

import argparse
import ast
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.report import write_section

REPO = Path(__file__).resolve().parent.parent

_RUN = """
import os, sys
sys.path.insert(0, {tree!r})
os.chdir({tree!r})
os.environ["PYTHONPATH"] = {tree!r}
try:
    from bench import pipeline_floor as pipeline
except ImportError:  # a tree from before the floor was moved beside the realistic bench
    from bench import pipeline
try:
    from imbot.devtools.broker import EmbeddedBroker
except ImportError:  # a tree from before the one imbot namespace
    from devtools.broker import EmbeddedBroker
with EmbeddedBroker() as broker:
    pipeline.run(broker, "RESULT", 10, "postgresql")
"""


def _one(tree: Path) -> tuple[dict[str, float], dict[str, float]]:
    out = subprocess.run(
        [sys.executable, "-c", _RUN.format(tree=str(tree))],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    rest = line.removeprefix("RESULT ")
    split = rest.index("} {") + 1
    return ast.literal_eval(rest[:split]), ast.literal_eval(rest[split + 1 :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("rev", help="the earlier commit to compare with")
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="imbot-ab-") as folder:
        old = Path(folder) / "old"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", str(old), args.rev], cwd=REPO, check=True
        )
        try:
            runs: dict[str, list[tuple[dict[str, float], dict[str, float]]]] = {
                args.rev: [],
                head: [],
            }
            for _ in range(args.pairs):
                runs[args.rev].append(_one(old))
                runs[head].append(_one(REPO))
                print({k: [round(r["p99"], 1) for r, _ in v] for k, v in runs.items()}, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, check=True)
    rows = [
        f"{args.pairs} pairs of runs, alternated: 100 AI messages/s for the bench's duration,"
        " PostgreSQL, fetch wait 10 ms. Medians over the runs (each run's own figures in brackets).",
        "",
        "| tree | p50 ms | p99 ms | send hop ms | CPU ms/message |",
        "|---|---|---|---|---|",
    ]
    for name, results in runs.items():
        p50 = [r["p50"] for r, _ in results]
        p99 = [r["p99"] for r, _ in results]
        send = [h.get("send", float("nan")) for _, h in results]
        cpu = [sum(v for k, v in r.items() if k.startswith("cpu_")) for r, _ in results]
        rows.append(
            f"| {name} | {statistics.median(p50):.1f} ({', '.join(f'{v:.0f}' for v in p50)})"
            f" | {statistics.median(p99):.1f} ({', '.join(f'{v:.0f}' for v in p99)})"
            f" | {statistics.median(send):.1f} | {statistics.median(cpu):.2f} |"
        )
    body = "\n".join(rows)
    print(body)
    write_section(
        "pipeline-ab",
        f"Pipeline overhead, HEAD ({head}) against {args.rev}",
        f"python -m bench.pipeline_ab {args.rev} --pairs {args.pairs}",
        body,
    )


if __name__ == "__main__":
    main()
