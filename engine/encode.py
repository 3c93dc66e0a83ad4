"""Prompt text to token ids, with the caller's text always tokenised as text, never as control tokens.

A chat template wraps each turn in control tokens (`<|im_start|>user\\n ... <|im_end|>`). A tokenizer that
reads the rendered template would also turn control-token text typed *inside* a message into real control
tokens, so a message could close its own turn and open a system or assistant one. Here the template's
own markers stay control tokens and message content can never produce one:

- content that holds no special-token text, not even part of one at its edges (almost all content), is
  tokenised exactly as the tokenizer's `apply_chat_template` does: the same ids as ever;
- other content is tokenised on its own with special-token text split into ordinary tokens, and placed
  between the template's own pieces (rendered around placeholders), which are tokenised as usual.

`encode_text` does the same for a bare prompt on a model without a chat template. A tokenizer without
added tokens (test fakes) has nothing to forge and is used as is.
"""

from __future__ import annotations

import re
from typing import Any

_MARK = re.compile("\ue000(\\d+)\ue001")  # a private-use placeholder no template or tokenizer treats specially


def special_texts(tokenizer: Any) -> tuple[str, ...]:
    """The text of every special (control) token the tokenizer would match inside text."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return tuple(sorted({t.content for t in added.values() if getattr(t, "special", True) and t.content}))


def holds_special_text(text: str, specials: tuple[str, ...]) -> bool:
    """Whether `text` contains a special token's text, or starts or ends with a piece of one (which the
    template's text next to it could complete)."""
    for s in specials:
        if s in text:
            return True
        for k in range(1, len(s)):
            if text.endswith(s[:k]) or text.startswith(s[k:]):
                return True
    return False


def _as_text(tokenizer: Any, text: str, specials: tuple[str, ...], add_special_tokens: bool = False) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=True).input_ids)
    special_ids = {int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.content in specials}
    start = 1 if add_special_tokens and ids and ids[0] in special_ids else 0  # the tokenizer's own BOS
    if special_ids & set(ids[start:]):  # fail closed: this tokenizer cannot tokenise special text as text
        raise ValueError("the prompt holds control-token text that this model's tokenizer cannot treat as text")
    return ids


def encode_text(tokenizer: Any, prompt: str) -> list[int]:
    """A bare prompt (no chat template), with the tokenizer's own BOS; its text is text."""
    specials = special_texts(tokenizer)
    if not holds_special_text(prompt, specials):
        return list(tokenizer(prompt, add_special_tokens=True).input_ids)
    return _as_text(tokenizer, prompt, specials, add_special_tokens=True)


def encode_chat(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Chat turns through the tokenizer's template, with a generation prompt; content is text."""
    specials = special_texts(tokenizer)
    if not any(holds_special_text(str(m.get("content") or ""), specials) for m in messages):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    placeheld = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
    rendered = tokenizer.apply_chat_template(placeheld, add_generation_prompt=True, tokenize=False)
    ids: list[int] = []
    for n, piece in enumerate(_MARK.split(rendered)):  # template text, message index, template text, ...
        if n % 2:
            ids += _as_text(tokenizer, str(messages[int(piece)].get("content") or ""), specials)
        elif piece:
            ids += [int(i) for i in tokenizer(piece, add_special_tokens=False).input_ids]
    return ids
