"""The benchmark's built-in mixed prompt set: a few prompts of each kind, or a JSONL file of the user's.

A JSONL line is {"prompt": "..."} or {"messages": [...]}, with an optional "kind" (default "custom") and
an optional "domain" (the index domain this kind corresponds to, for the bench's `oracle` method; default:
the kind itself). Other keys ("reference", ...) are ignored. A directory is read as one `<kind>.jsonl`
per kind, as the index's data directories are laid out (e.g. index/data/heldout).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchPrompt:
    kind: str
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
    domain: str | None = None  # the index domain of this kind when it is named differently

    @property
    def messages_list(self) -> list[dict] | None:
        return [dict(m) for m in self.messages] if self.messages else None


BUILTIN: dict[str, list[str]] = {
    "math": [
        "A shop sells pencils at 3 for $1. Maria buys 18 pencils and pays with a $10 bill. How much change "
        "does she get? Explain step by step.",
        "Tom reads 12 pages a day. His book has 240 pages and he has already read 60. How many more days "
        "does he need to finish it? Show your work.",
    ],
    "code": [
        "Write a Python function `is_palindrome(s)` that ignores case and punctuation, with a docstring "
        "and two examples.",
        "Write a Python class `Stack` with push, pop, peek and is_empty methods, and explain each briefly.",
    ],
    "summarize": [
        "Summarize the following passage in two sentences.\n\nThe town of Millbrook opened its first public "
        "library in 1904 with just 300 books donated by local families. Over the next century it grew into "
        "a regional centre with more than 80,000 volumes, a children's wing and a small museum of local "
        "history. Last year the library added a maker space with 3D printers and sewing machines, which "
        "doubled the number of teenage visitors. The council now plans to extend opening hours on weekends.",
        "Give the key points of this text.\n\nResearchers at a coastal university tracked 40 sea turtles "
        "with satellite tags for three years. They found that the turtles travelled up to 2,000 kilometres "
        "between feeding and nesting sites and that warmer water shifted their routes north. The team warns "
        "that fishing nets along the new routes are a growing danger and asks for seasonal closures.",
    ],
    "translate": [
        "Translate into French: The train to the airport leaves every twenty minutes from platform four.",
        "Translate into German: My sister is a doctor and she works at the hospital near the river.",
    ],
    "qa": [
        "Why do leaves change colour in autumn?",
        "How does a refrigerator keep food cold?",
    ],
}


def builtin_prompts() -> list[BenchPrompt]:
    return [BenchPrompt(kind, prompt=p) for kind, ps in BUILTIN.items() for p in ps]


def load_prompts(path: Path) -> list[BenchPrompt]:
    """Prompts of a JSONL file, or of every `<kind>.jsonl` in a directory (kind = file name)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise ValueError(f"{path}: no <kind>.jsonl files")
        return [p for f in files for p in _load_file(f, default_kind=f.stem)]
    return _load_file(path, default_kind="custom")


def _load_file(path: Path, default_kind: str) -> list[BenchPrompt]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from e
        kind = str(rec.get("kind", default_kind))
        domain = str(rec["domain"]) if rec.get("domain") else None
        if "prompt" in rec:
            out.append(BenchPrompt(kind, prompt=str(rec["prompt"]), domain=domain))
        elif "messages" in rec:
            out.append(BenchPrompt(kind, messages=tuple(rec["messages"]), domain=domain))
        else:
            raise ValueError(f"{path}:{n}: needs a 'prompt' or 'messages' field")
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out
