"""Load domain data: a directory with one JSONL file per domain (file name = domain) into typed records.

Each line is `{"prompt": "..."}` or `{"messages": [{"role": ..., "content": ...}, ...]}`, optionally with
`"reference"`. Bad lines raise CorpusError naming the file and line. The corpus hash is a sha256 over the
files' names and contents in sorted order, so the same data always gives the same hash.

`routing_text` is the one definition of the text embedded for a prompt: the build embeds each record's
(`Record.text`) and the router each request's (`router.route` re-exports it), so both sides agree.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_DOMAIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ROLES = {"system", "user", "assistant", "tool", "developer"}


def _content_text(content: Any) -> str:
    """OpenAI message content: a string, or a list of parts of which the text parts count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Iterable):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type", "text") == "text":
                parts.append(str(part.get("text", "")))
        return "\n".join(parts)
    return str(content)


def routing_text(prompt: str | None = None, messages: Sequence[Mapping[str, Any] | Any] | None = None) -> str:
    """The text that is embedded: the prompt, or a chat's user turns joined by blank lines.

    A chat with no user turn (unusual; a corpus chat always has one) routes on all its turns. Messages
    may be dicts or objects with `role` and `content` attributes (pydantic request models).
    """
    if messages is None:
        return prompt or ""

    def get(m: Any, name: str) -> Any:
        return m.get(name) if isinstance(m, Mapping) else getattr(m, name, None)

    user = [_content_text(get(m, "content")) for m in messages if get(m, "role") == "user"]
    if not user:
        user = [_content_text(get(m, "content")) for m in messages]
    return "\n\n".join(user)


class CorpusError(ValueError):
    """A corpus file or line is malformed; the message names the file and line."""


@dataclass(frozen=True)
class Record:
    """One prompt of one domain: either a plain prompt or a chat transcript."""

    domain: str
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
    reference: str | None = None
    source: str = ""  # "file:line", for messages

    @property
    def text(self) -> str:
        """The text to embed: the prompt, or a chat's user turns joined by blank lines (`routing_text`,
        as the router embeds a request)."""
        assert self.prompt is not None or self.messages is not None
        # a record is a prompt or a chat (parse_line); were both set, the prompt would count, as it always has
        return routing_text(self.prompt) if self.prompt is not None else routing_text(messages=self.messages)

    def messages_list(self) -> list[dict] | None:
        return [dict(m) for m in self.messages] if self.messages is not None else None


@dataclass(frozen=True)
class Corpus:
    """All records of a data directory, grouped by domain (domains sorted by name)."""

    root: Path
    domains: dict[str, list[Record]]
    hash: str

    @property
    def records(self) -> list[Record]:
        return [r for recs in self.domains.values() for r in recs]

    def __len__(self) -> int:
        return sum(len(v) for v in self.domains.values())


def parse_line(line: str, domain: str, where: str) -> Record:
    """Parse one JSONL line into a Record; `where` ("file:line") goes into every error."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - {"prompt", "messages", "reference"}
    if unknown:
        raise CorpusError(f"{where}: unknown keys {sorted(unknown)} (allowed: prompt, messages, reference)")
    has_p, has_m = "prompt" in obj, "messages" in obj
    if has_p == has_m:
        raise CorpusError(f"{where}: needs exactly one of 'prompt' or 'messages'")
    ref = obj.get("reference")
    if ref is not None and not isinstance(ref, str):
        raise CorpusError(f"{where}: 'reference' must be a string")
    if has_p:
        p = obj["prompt"]
        if not isinstance(p, str) or not p.strip():
            raise CorpusError(f"{where}: 'prompt' must be a non-empty string")
        return Record(domain=domain, prompt=p, reference=ref, source=where)
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise CorpusError(f"{where}: 'messages' must be a non-empty list")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise CorpusError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in _ROLES:
            raise CorpusError(f"{where}: messages[{i}] has unknown role {m['role']!r}")
        clean.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" and m["content"].strip() for m in clean):
        raise CorpusError(f"{where}: 'messages' has no non-empty user turn")
    return Record(domain=domain, messages=tuple(clean), reference=ref, source=where)


def load_file(path: Path, domain: str | None = None) -> list[Record]:
    domain = domain or path.stem
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            out.append(parse_line(line, domain, f"{path}:{n}"))
    return out


def corpus_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(files, key=lambda p: p.name):
        data = p.read_bytes()
        h.update(p.name.encode() + b"\0" + str(len(data)).encode() + b"\0")
        h.update(data)
    return h.hexdigest()


def load_corpus(data_dir: str | Path, min_prompts: int = 1) -> Corpus:
    """Load every `<domain>.jsonl` in `data_dir`; each domain needs at least `min_prompts` records."""
    root = Path(data_dir)
    if not root.is_dir():
        raise CorpusError(f"data directory {root} does not exist")
    files = sorted(root.glob("*.jsonl"))
    if not files:
        raise CorpusError(f"{root} holds no <domain>.jsonl files")
    domains: dict[str, list[Record]] = {}
    for p in files:
        if not _DOMAIN_RE.match(p.stem):
            raise CorpusError(f"{p}: domain name {p.stem!r} must be letters, digits, '_', '-' or '.'")
        recs = load_file(p)
        if len(recs) < min_prompts:
            raise CorpusError(f"{p}: {len(recs)} prompts, need at least {min_prompts}")
        domains[p.stem] = recs
    return Corpus(root=root, domains=domains, hash=corpus_hash(files))
