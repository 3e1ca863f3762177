"""Write one benchmark's results into its own section of docs/benchmarks.md.

Each benchmark owns the text between ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->``; running it again replaces only that section.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Every figure below was produced by the command shown with it, on the machine it
names, with the baseline measured in the same run. Re-run the command to refresh
its section (`make bench` runs them all).
"""


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_section(name: str, title: str, command: str, body: str) -> None:
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = f"{start}\n## {title}\n\n`{command}` — {stamp}, {machine()}\n\n{body.strip()}\n{end}"
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else HEADER
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + section + after
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text, encoding="utf-8")


IMG_DIR = DOC.parent / "img"


def image_path(name: str) -> Path:
    """Where a benchmark's plot goes (docs/img/NAME), the folder made if need be."""
    IMG_DIR.mkdir(parents=True, exist_ok=True)
    return IMG_DIR / name


def image_link(path: Path, alt: str) -> str:
    """A Markdown image of ``path`` as docs/benchmarks.md reaches it (a relative link)."""
    return f"![{alt}]({path.relative_to(DOC.parent).as_posix()})"
