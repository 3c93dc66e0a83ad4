"""Summarise `knnssd bench engine --routed` reports: geometric-mean speedup over plain decoding per method and
kind, where the prompts were routed, and issue 11's acceptance checks.

    .venv/bin/python scripts/eval_summary.py out/eval-ood.json out/eval-heldout.json [--static NAME ...]

Checks, per report: routed >= general overall; general within 3% of the best static config; no kind
where routed is more than 3% below general; every output identical to plain decoding. The static
configs are the report's fixed-config methods (all of them unless --static names some).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PER_PROMPT = ("routed", "general", "oracle", "per-kind")


def summarise(path: Path, static: list[str] | None) -> tuple[list[str], bool]:
    rep = json.loads(path.read_text())
    table = rep["table"]
    kinds = [k for k in table["plain"] if k != "overall"]
    methods = [m for m in table if m != "hf-generate"]
    lines = [f"== {path} (index {rep.get('index_version', '?')}, {rep['max_new_tokens']} tokens, geometric mean of per-prompt speedups over plain)"]
    w = max(len(m) for m in methods)
    lines.append(f"{'method':{w}s} {'overall':>8s} " + " ".join(f"{k[:12]:>12s}" for k in kinds) + "  identical")
    for m in methods:
        row = table[m]
        lines.append(f"{m:{w}s} {row['overall']['geomean_vs_plain']:8.3f} " + " ".join(f"{row[k]['geomean_vs_plain']:12.3f}" for k in kinds)
                     + f"  {'yes' if all(row[k]['identical'] for k in row) else 'NO'}")  # fmt: skip
    if "route_domains" in rep:
        lines.append(f"routes: {json.dumps(rep['route_domains'])}")
        for kind, counts in rep.get("route_by_kind", {}).items():
            lines.append(f"  {kind}: {json.dumps(counts)}")
    ok = True
    if "routed" in table and "general" in table:
        g = lambda m, k="overall": table[m][k]["geomean_vs_plain"]  # noqa: E731
        statics = [m for m in methods if m not in ("plain", *PER_PROMPT)] if static is None else static
        best = max(statics, key=g) if statics else None
        checks = [(f"routed {g('routed'):.3f} >= general {g('general'):.3f}", g("routed") >= g("general"))]
        if best:
            checks.append((f"general {g('general'):.3f} within 3% of the best static ({best} {g(best):.3f})", g("general") >= 0.97 * g(best)))
        worst = min(kinds, key=lambda k: g("routed", k) / g("general", k))
        checks.append((f"no kind with routed > 3% below general (worst: {worst} {g('routed', worst) / g('general', worst):.3f})",
                       g("routed", worst) >= 0.97 * g("general", worst)))  # fmt: skip
        checks.append(("all outputs identical to plain", all(table[m][k]["identical"] for m in methods for k in table[m])))
        for text, passed in checks:
            lines.append(f"  [{'pass' if passed else 'FAIL'}] {text}")
            ok &= passed
    return lines, ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--static", nargs="*", default=None, help="static config methods to compare the general config with (default: all fixed configs)")
    args = ap.parse_args()
    all_ok = True
    for p in args.reports:
        lines, ok = summarise(p, args.static)
        print("\n".join(lines) + "\n")
        all_ok &= ok
    print("all checks pass" if all_ok else "some checks FAILED")


if __name__ == "__main__":
    main()
