"""The repository stands alone: no file a user's clone runs or reads points outside it (the
directory `../shared` that some checkouts have next to them is not part of the product)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("src", "tests", "benchmarks", "scripts", "docs", "deploy", "config")
OUTSIDE = re.compile(r"\.\./shared\b|/\s*\"shared\"|parents\[2\]")


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
