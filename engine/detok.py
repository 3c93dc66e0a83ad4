"""Token ids to text, incrementally, with stop strings. Per request; pure Python over a tokenizer.

Re-decoding the whole output at every step is quadratic in its length. `TextStream` decodes only a
short window: the text of ids[prefix:] minus the text of ids[prefix:read] is what the new ids add
(the prefix gives tokenizers that drop a leading space at the start of a decode the context they
need), the window moves on whenever the new text is whole, and a trailing U+FFFD (a UTF-8 character
split across tokens) waits for the next token.

Stop strings: text that could still be the start of a stop string is held back; when one appears the
stream ends just before it.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tok = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self._prefix = 0  # ids before this are only context
        self._read = 0  # ids before this are in `text`
        self.text = ""  # decoded so far (whole characters only)
        self.sent = 0  # characters of `text` already returned
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, new_ids: list[int]) -> str:
        """Add ids; return text that is now safe to send ('' while held back). Sets `stopped` when a
        stop string appears (the text is then cut just before it)."""
        if self.stopped:
            return ""
        self.ids.extend(new_ids)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        if self.stop:
            cut = self._find_stop()
            if cut is not None:
                self.stopped = True
                self.text = self.text[:cut]
                return self._take(len(self.text))
            return self._take(len(self.text) - self.hold)
        return self._take(len(self.text))

    def flush(self) -> str:
        """Everything not yet sent (at the end of the stream), including a held-back tail."""
        if not self.stopped:
            tail = self._decode(self.ids[self._prefix :])
            before = self._decode(self.ids[self._prefix : self._read])
            if len(tail) > len(before):
                self.text += tail[len(before) :]
                self._prefix = self._read = len(self.ids)
            cut = self._find_stop()
            if cut is not None:
                self.stopped = True
                self.text = self.text[:cut]
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        upto = max(upto, self.sent)
        out = self.text[self.sent : upto]
        self.sent = upto
        return out

    def _find_stop(self) -> int | None:
        """Start of the earliest stop string in text not yet sent (plus an overlap with sent text)."""
        best = None
        for s in self.stop:
            i = self.text.find(s, max(self.sent - len(s) + 1, 0))
            if i != -1 and (best is None or i < best):
                best = i
        return best
