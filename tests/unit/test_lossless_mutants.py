"""scripts/lossless_mutants.py: its table of planted faults still matches the source (each snippet once,
each patch parses, each named test exists), so a refactor that moves a snippet fails here, in CI, rather
than when someone next runs the (slow, not in CI) mutant check. The mutants themselves run in that script."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("lossless_mutants", ROOT / "scripts" / "lossless_mutants.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_the_mutant_table_matches_the_source():
    mod = _script()
    assert len(mod.MUTANTS) >= 8
    mod.check_table(ROOT, mod.MUTANTS)


def test_a_stale_snippet_is_refused(tmp_path):
    mod = _script()
    m = mod.MUTANTS[0]
    (tmp_path / Path(m.file).parent).mkdir(parents=True)
    (tmp_path / m.file).write_text("nothing like the snippet\n")
    for t in m.tests:
        (tmp_path / t.split("::")[0]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / t.split("::")[0]).write_text("")
    with pytest.raises(mod.TableMismatch, match="occurs 0 times"):
        mod.check_table(tmp_path, (m,))
