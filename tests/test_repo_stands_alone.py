"""The repository stands alone: no file a user's clone runs or reads points outside it, such as
the sibling directory that the developers' checkouts have next to them (not part of the
product)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("src", "tests", "benchmarks", "scripts", "docs", "deploy", "config")
# The sibling's name is put together here, so that this file does not name the path it forbids.
SIBLING = "sha" + "red"
OUTSIDE = re.compile(rf"\.\./{SIBLING}\b|/\s*\"{SIBLING}\"|parents\[2\]")


def test_nothing_reads_or_links_outside_the_repository():
    files = [ROOT / "README.md", ROOT / "docker-compose.yml", ROOT / "Dockerfile"]
    files += [p for folder in CHECKED for p in (ROOT / folder).rglob("*") if p.is_file()]
    me = Path(__file__).resolve()
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        if path.resolve() != me and path.suffix not in {".pyc", ".db"}
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert found == []
