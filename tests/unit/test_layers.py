"""No import runs up a floor: engine < index < router < services < deploy (README: Layout).

Every import in the packages' sources counts, including those inside functions (the CLIs import lazily).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FLOORS = ["engine", "index", "router", "services", "deploy"]
# Upward imports not yet removed, by file (none left).
KNOWN: set[tuple[str, str]] = set()


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_no_import_runs_up_a_floor():
    upward = []
    for floor, package in enumerate(FLOORS):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for top in _imports(path):
                if top in FLOORS and FLOORS.index(top) > floor and (rel, top) not in KNOWN:
                    upward.append(f"{rel} imports {top}")
    assert upward == []
