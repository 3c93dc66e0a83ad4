"""Corpus loading: records, chat text, hash stability, and errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from index.corpus import CorpusError, load_corpus

REPO = Path(__file__).resolve().parents[2]


def _write(d: Path, name: str, lines: list) -> Path:
    p = d / f"{name}.jsonl"
    p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return p


def test_load_prompts_and_chat(tmp_path):
    _write(tmp_path, "math", [{"prompt": "2+2?", "reference": "4"}, "", {"prompt": "3*3?"}])
    _write(
        tmp_path,
        "chat",
        [
            {
                "messages": [
                    {"role": "system", "content": "Be kind."},
                    {"role": "user", "content": "Hi there."},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Tell me a joke."},
                ]
            }
        ],
    )
    c = load_corpus(tmp_path)
    assert list(c.domains) == ["chat", "math"]
    assert len(c) == 3
    m = c.domains["math"]
    assert m[0].prompt == "2+2?" and m[0].reference == "4" and m[0].text == "2+2?"
    assert m[1].source.endswith("math.jsonl:3")  # blank lines are skipped but still counted
    chat = c.domains["chat"][0]
    assert chat.prompt is None
    assert chat.text == "Hi there.\n\nTell me a joke."  # user turns only
    assert chat.messages_list()[0] == {"role": "system", "content": "Be kind."}
    assert len(c.hash) == 64


def test_hash_depends_on_content_only(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for d in (a, b):
        _write(d, "x", [{"prompt": "one"}])
        _write(d, "y", [{"prompt": "two"}])
    assert load_corpus(a).hash == load_corpus(b).hash
    _write(b, "y", [{"prompt": "two!"}])
    assert load_corpus(a).hash != load_corpus(b).hash


@pytest.mark.parametrize(
    "line, msg",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"prompt": "a", "messages": []}, "exactly one of"),
        ({"text": "a"}, "unknown keys"),
        ({"prompt": "  "}, "non-empty string"),
        ({"messages": [{"role": "user"}]}, r"messages\[0\]"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role"),
        ({"messages": [{"role": "system", "content": "x"}]}, "no non-empty user turn"),
        ({"prompt": "a", "reference": 3}, "'reference' must be a string"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, msg):
    _write(tmp_path, "qa", [{"prompt": "fine"}, line])
    with pytest.raises(CorpusError, match=msg) as ei:
        load_corpus(tmp_path)
    assert f"{tmp_path / 'qa.jsonl'}:2" in str(ei.value)


def test_directory_errors(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(tmp_path / "nope")
    with pytest.raises(CorpusError, match="no <domain>.jsonl"):
        load_corpus(tmp_path)
    _write(tmp_path, "math", [{"prompt": "a"}])
    with pytest.raises(CorpusError, match="need at least 2"):
        load_corpus(tmp_path, min_prompts=2)


def test_shipped_corpus_loads():
    for split, least in (("default", 40), ("heldout", 5)):
        c = load_corpus(REPO / "index" / "data" / split)
        assert len(c.domains) >= 6
        assert all(len(v) >= least for v in c.domains.values()), {k: len(v) for k, v in c.domains.items()}
