#!/usr/bin/env python
"""Losslessness, measured: plant named faults in the decoding path one at a time and check that the tests
catch each (mutation testing by hand-picked mutants).

Each mutant is a small source patch (file, exact old snippet, new snippet) in the one table `MUTANTS`
below, with the tests that should catch it, strongest first. The script copies the working tree (tracked
and untracked-but-not-ignored files) to a temporary directory once, checks every snippet still matches its
file exactly once (else it stops before running anything: retarget the table after a refactor), runs the
union of the mutants' tests there unmutated (they must pass, or a "kill" would mean nothing), then for
each mutant patches the copy, runs its tests (`pytest -x`: the first failure kills it; `--all-tests` runs
them all to list every killer) and restores the file. It never touches the working tree.

Prints one line per mutant (killed by which test, or SURVIVED) and last `N mutants, K killed`; exits 1 if
any survived, 2 if the table does not match the source or the unmutated tests fail. Takes 10-20 minutes on
2 cores (the real-model tests dominate); not part of CI, which runs the tests themselves. Heavy: on the
shared machine run it under the lock:

    flock /tmp/knnssd-heavy.lock .venv/bin/python scripts/lossless_mutants.py
    .venv/bin/python scripts/lossless_mutants.py --list            # the table only
    .venv/bin/python scripts/lossless_mutants.py --only bonus-from-wrong-row --all-tests
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Tests, by what they can see. Each mutant lists the ones that should kill it, strongest first.
SAMPLING_REAL = "tests/integration/test_engine_sampling_real.py"  # real model, shipped config, chi-square
SAMPLING_TINY = "tests/unit/test_engine_sampling.py"  # the engine's own path on the tiny model
VERIFY_MATHS = "tests/unit/test_engine_verify.py"  # acceptance maths in isolation
EXACT_REAL = "tests/integration/test_engine_exact_real.py"  # bit-exact verify / batched rows, real model
GREEDY_REAL = "tests/integration/test_engine_real.py::test_greedy_speculative_is_token_identical"
KNOBS_REAL = "tests/integration/test_engine_real.py::test_draft_knobs_are_lossless"
BATCHED_REAL = "tests/integration/test_engine_batched_real.py"
SCHEDULE_TINY = "tests/unit/test_engine_schedule.py"
LEAN_TINY = "tests/unit/test_engine_lean_arch.py"
NATIVE_EXACT = "tests/unit/test_engine_native.py"  # the C++ kernels against torch on small shapes
NATIVE_REAL = "tests/integration/test_engine_native_real.py"  # packed real SmolLM2, every draft kind

# The native attention's key count for one row (positions lo..pos).
NATIVE_ATTN_OLD = """      const int64_t n = p + 1 - lo;
"""
NATIVE_ATTN_NEW = """      const int64_t n = std::max<int64_t>(1, p - lo);  // MUTANT: the newest key left out
"""


@dataclass(frozen=True)
class Mutant:
    name: str
    fault: str  # what the patch breaks, in a line
    file: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids or files, run in this order


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "resample-from-p",
        "after a rejection the recovered token is drawn from p instead of the residual max(0, p - q)",
        "engine/verify.py",
        """    if draft_probs is None:
        residual = p.clone()
        residual[draft_tokens[n]] = 0.0
    else:
        residual = (p - draft_probs[n]).clamp_min(0.0)
""",
        """    residual = p.clone()  # MUTANT: resample from p itself
""",
        (SAMPLING_REAL, SAMPLING_TINY, VERIFY_MATHS),
    ),
    Mutant(
        "distorted-q-to-acceptance",
        "decode hands the acceptance step a distorted draft distribution (sqrt(q), renormalised)",
        "engine/decode.py",
        """            n, pending = rejection_sample(draft.tokens, draft.probs, target, uniforms, self.gen)
""",
        """            q = None if draft.probs is None else draft.probs.sqrt() / draft.probs.sqrt().sum(-1, keepdim=True)
            n, pending = rejection_sample(draft.tokens, q, target, uniforms, self.gen)  # MUTANT
""",
        (SAMPLING_REAL, SAMPLING_TINY),
    ),
    Mutant(
        "draft-samples-other-q",
        "the draft samples its token from q^2 but reports q (the draft distribution is not the one sampled)",
        "engine/draft.py",
        """                picks.append(torch.stack([p.max(), sample(p.unsqueeze(0), j.gen)[0].float()]).unsqueeze(0))
""",
        """                picks.append(torch.stack([p.max(), sample((p * p).unsqueeze(0), j.gen)[0].float()]).unsqueeze(0))  # MUTANT
""",
        (SAMPLING_REAL, SAMPLING_TINY),
    ),
    Mutant(
        "sampled-accept-off-by-one",
        "rejection sampling accepts one draft token past the first rejection",
        "engine/verify.py",
        """    n = int(rejected[0, 0]) if rejected.numel() else k
""",
        """    n = min(int(rejected[0, 0]) + 1, k) if rejected.numel() else k  # MUTANT
""",
        (SAMPLING_REAL, SAMPLING_TINY, VERIFY_MATHS),
    ),
    Mutant(
        "greedy-accept-off-by-one",
        "greedy verification accepts one draft token past the first mismatch",
        "engine/verify.py",
        """    n = int(mismatch[0, 0]) if mismatch.numel() else k
""",
        """    n = min(int(mismatch[0, 0]) + 1, k) if mismatch.numel() else k  # MUTANT
""",
        (EXACT_REAL, GREEDY_REAL, SCHEDULE_TINY, VERIFY_MATHS),
    ),
    Mutant(
        "bonus-from-wrong-row",
        "when every draft token is accepted, the bonus token is drawn from the last draft row, not row k",
        "engine/verify.py",
        """        out.append(int(torch.multinomial(target_probs[k], 1, generator=generator)))
""",
        """        out.append(int(torch.multinomial(target_probs[max(k - 1, 0)], 1, generator=generator)))  # MUTANT
""",
        (SAMPLING_REAL, SAMPLING_TINY, VERIFY_MATHS),
    ),
    Mutant(
        "verify-rows-attended-together",
        "the verify pass attends all its rows in one causal SDPA call (exact=False): rows drift ~1e-5",
        "engine/decode.py",
        """        return Segment(self.cache, self.pos, toks, "argmax" if self.params.greedy else "all", exact=True)
""",
        """        return Segment(self.cache, self.pos, toks, "argmax" if self.params.greedy else "all", exact=False)  # MUTANT
""",
        (EXACT_REAL, GREEDY_REAL, BATCHED_REAL, SCHEDULE_TINY),
    ),
    Mutant(
        "kernel-rows-depend-on-m",
        "the full-precision CPU kernel is MKL's F.linear, whose rows differ with the number of rows",
        "engine/kernels.py",
        """        if cpu and dtype == torch.float32:
            return OneDnnLinear(weight, bias)
""",
        """        if cpu and dtype == torch.float32:
            return DenseLinear(weight, bias, device=device, dtype=dtype)  # MUTANT
""",
        (EXACT_REAL, GREEDY_REAL, BATCHED_REAL, LEAN_TINY),
    ),
    Mutant(
        "rejected-kv-kept",
        "after a rejection the rejected token's K/V slot stays in the context (the cache is not rolled back)",
        "engine/decode.py",
        """        self.history[self.pos + 1 : self.pos + 1 + n] = draft.tokens[:n]
        self.pos += n + 1
""",
        """        self.history[self.pos + 1 : self.pos + 1 + n] = draft.tokens[:n]
        if n < k:  # MUTANT: keep the rejected token's K/V as context
            self.history[self.pos + 1 + n] = int(draft.tokens[n])
            self.pos += 1
        self.pos += n + 1
""",
        (EXACT_REAL, GREEDY_REAL, SCHEDULE_TINY),
    ),
    Mutant(
        "draft-precision-leaks-into-verify",
        "the quantize knob of a drafting request makes the batch's verify pass run on its low-bit weights",
        "engine/schedule.py",
        """            outs = self.model.forward_batch(segs)
""",
        """            lead = next((s.drafter.plan for s in decoding if s.drafter is not None and s.drafter.plan is not None), None)
            outs = self.model.forward_batch(segs, self.model.plan(precision=lead.precision) if lead else None)  # MUTANT
""",
        (EXACT_REAL, KNOBS_REAL, BATCHED_REAL, SCHEDULE_TINY),
    ),
    # The native precision's C++ kernels (engine/csrc/native.cpp): a patch there changes the source hash,
    # so the copy's first kernel load compiles its own build (~1 min, cached under $KNNSSD_CACHE/ext).
    Mutant(
        "native-tile-rows-differ",
        "the int8-activation tile kernel's multi-row calls keep one accumulator where single rows keep two "
        "(even and odd blocks): a row's value depends on how many rows the pass has, so verify rows drift "
        "from plain's",
        "engine/csrc/native.cpp",
        """      V8& acc = (b & 1) ? accO[r] : accE[r];
""",
        """      V8& acc = (b & 1) && R == 1 ? accO[r] : accE[r];  // MUTANT
""",
        (NATIVE_EXACT, EXACT_REAL, NATIVE_REAL),
    ),
    Mutant(
        "native-attention-skips-last-key",
        "the native attention block leaves the newest key out of each row's softmax (a causal-mask off-by-one)",
        "engine/csrc/native.cpp",
        NATIVE_ATTN_OLD,
        NATIVE_ATTN_NEW,
        (NATIVE_EXACT, NATIVE_REAL),
    ),
)


class TableMismatch(Exception):
    """A mutant's snippet does not occur exactly once in its file: the source moved on; retarget MUTANTS."""


def check_table(root: Path, mutants: tuple[Mutant, ...]) -> None:
    names = [m.name for m in mutants]
    if len(set(names)) != len(names):
        raise TableMismatch(f"duplicate mutant names in {names}")
    for m in mutants:
        path = root / m.file
        if not path.is_file():
            raise TableMismatch(f"{m.name}: {m.file} does not exist")
        count = path.read_text().count(m.old)
        if count != 1:
            raise TableMismatch(f"{m.name}: its snippet occurs {count} times in {m.file} (expected once):\n{m.old}")
        mutated = path.read_text().replace(m.old, m.new)
        if path.suffix == ".py":  # C++ patches are compiled by the tests' first kernel load (engine.ext)
            compile(mutated, str(path), "exec")  # a patch that does not parse would be "killed" by a SyntaxError
        for t in m.tests:
            if not (root / t.split("::")[0]).is_file():
                raise TableMismatch(f"{m.name}: test {t} not found")


def copy_tree(src: Path, dst: Path) -> None:
    """Tracked and untracked-but-not-ignored files (the working tree as it is, uncommitted edits included)."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=src, check=True,
        capture_output=True,
    ).stdout.decode().split("\0")
    for f in filter(None, files):
        s = src / f
        if s.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, dst / f)


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    return env


def check_imports_from(tree: Path) -> None:
    """The copy must be what the tests import (not the editable install of the working tree)."""
    out = subprocess.run(
        [sys.executable, "-c", "import engine.verify as v; print(v.__file__)"], cwd=tree, env=_env(tree),
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    if not Path(out).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"the copy's tests would import {out}, not the copy in {tree}: refusing to run")


_FAILED = re.compile(r"^(FAILED|ERROR) (\S+)")


def run_tests(tree: Path, tests: tuple[str, ...], stop_first: bool) -> tuple[int, list[str], str]:
    """(pytest exit code, failing node ids, output tail)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *(["-x"] if stop_first else []),
           *tests]
    p = subprocess.run(cmd, cwd=tree, env=_env(tree), capture_output=True, text=True)
    out = p.stdout + p.stderr
    failed = [m.group(2) for line in out.splitlines() if (m := _FAILED.match(line))]
    return p.returncode, failed, "\n".join(out.splitlines()[-30:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the table and check it matches the source, run nothing")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    ap.add_argument("--all-tests", action="store_true", help="run every listed test of a mutant (report every killer)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the tests (faster; unsound)")
    args = ap.parse_args(argv)

    mutants = MUTANTS
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTANTS}
        if unknown:
            ap.error(f"unknown mutants {sorted(unknown)}; see --list")
        mutants = tuple(m for m in MUTANTS if m.name in args.only)
    try:
        check_table(ROOT, MUTANTS)
    except TableMismatch as exc:
        print(f"mutant table does not match the source: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for m in mutants:
            print(f"{m.name:36} {m.file:20} {m.fault}\n{'':36} tests: {', '.join(m.tests)}")
        return 0

    with tempfile.TemporaryDirectory(prefix="knnssd-mutants-") as tmp:
        tree = Path(tmp)
        copy_tree(ROOT, tree)
        check_imports_from(tree)
        if not args.no_baseline:
            union = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
            t0 = time.monotonic()
            rc, failed, tail = run_tests(tree, union, stop_first=True)
            if rc != 0:
                print(f"the unmutated tests do not pass (pytest exit {rc}; {failed}):\n{tail}", file=sys.stderr)
                return 2
            print(f"baseline: the {len(union)} test targets pass unmutated ({time.monotonic() - t0:.0f} s)", flush=True)
        killed = 0
        for m in mutants:
            path = tree / m.file
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new))
            t0 = time.monotonic()
            try:
                rc, failed, tail = run_tests(tree, m.tests, stop_first=not args.all_tests)
            finally:
                path.write_text(original)
            took = f"({time.monotonic() - t0:.0f} s)"
            if rc == 1 and failed:
                killed += 1
                print(f"{m.name:36} killed by {', '.join(failed)} {took}", flush=True)
            elif rc == 0:
                print(f"{m.name:36} SURVIVED {', '.join(m.tests)} {took}", flush=True)
            else:
                print(f"{m.name:36} NOT RUN: pytest exit {rc} {took}\n{tail}", flush=True)
        print(f"{len(mutants)} mutants, {killed} killed")
    return 0 if killed == len(mutants) else 1


if __name__ == "__main__":
    sys.exit(main())
