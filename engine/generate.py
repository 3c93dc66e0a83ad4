"""The engine's public face: load a model, turn prompts into ids, stream text with decode stats.

`Engine.stream` wraps the token-level loop of `engine.decode` with incremental detokenisation and stop
strings (text is held back while it could still be the start of a stop string). One Engine decodes one
request at a time (it owns one KV cache); a serving replica holds one Engine per process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.config import DecodeStats, DraftConfig, SamplingParams
from engine.decode import decode
from engine.draft import draft_pass_args
from engine.lean import LeanModel
from engine.load import LoadedModel, load_model

DEFAULT_MAX_SEQ_LEN = 8192


@dataclass
class StepOutput:
    token_ids: list[int]
    text: str  # new text since the previous StepOutput
    finish_reason: str | None  # None until the last chunk: "stop" or "length"
    stats: DecodeStats


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: DecodeStats = field(default_factory=DecodeStats)


class Engine:
    def __init__(self, loaded: LoadedModel, max_seq_len: int = DEFAULT_MAX_SEQ_LEN):
        self.hf_model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_id = loaded.model_id
        self.weights_hash = loaded.weights_hash
        self.lean = LeanModel(loaded.model, max_seq_len=max_seq_len)
        self.num_layers = self.lean.n_layers
        self.context_length = self.lean.max_len
        self.eos_token_ids = self._eos_ids()

    @classmethod
    def load(cls, model: str = "smollm2", max_seq_len: int = DEFAULT_MAX_SEQ_LEN, threads: int | None = None) -> Engine:
        if threads:
            torch.set_num_threads(threads)
        return cls(load_model(model), max_seq_len=max_seq_len)

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for src in (getattr(self.hf_model, "generation_config", None), self.hf_model.config):
            e = getattr(src, "eos_token_id", None) if src is not None else None
            if isinstance(e, int):
                ids.add(e)
            elif e:
                ids.update(int(x) for x in e)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return frozenset(ids)

    # ---- prompts ----------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        """Chat messages go through the tokenizer's chat template; a bare prompt is wrapped as one user
        turn when the model has a template (instruct models), else tokenised as is (base models)."""
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt or messages")
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if messages is None and not has_template:
            return list(self.tokenizer(prompt, add_special_tokens=True).input_ids)
        if not has_template:
            raise ValueError(f"model {self.model_id} has no chat template; send a plain prompt instead")
        msgs = messages if messages is not None else [{"role": "user", "content": prompt}]
        ids = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    # ---- decoding ---------------------------------------------------------------------------------

    def stream(
        self, prompt_ids: list[int], params: SamplingParams, draft: DraftConfig | None = None
    ) -> Iterator[StepOutput]:
        draft = draft or DraftConfig.plain()
        stats = DecodeStats()
        ids: list[int] = []
        sent = 0  # characters of text already yielded
        hold = max((len(s) for s in params.stop), default=1) - 1
        t0 = time.perf_counter()
        gen = decode(self.lean, prompt_ids, params, draft, self.eos_token_ids, stats)
        try:
            for new in gen:
                ids.extend(new)
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                cut = _find_stop(text, params.stop, sent)
                if cut is not None:
                    stats.finish_reason = "stop"
                    self._close_stats(stats, t0)
                    yield StepOutput(new, text[sent:cut], "stop", stats)
                    return
                # Hold back a trailing partial UTF-8 char and anything that may begin a stop string.
                safe = len(text) - hold if params.stop else len(text)
                if text.endswith("\ufffd"):
                    safe = min(safe, len(text) - 1)
                delta = text[sent:max(safe, sent)]
                sent += len(delta)
                yield StepOutput(new, delta, None, stats)
        finally:
            gen.close()
        self._close_stats(stats, t0)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        yield StepOutput([], text[sent:], stats.finish_reason or "length", stats)

    @staticmethod
    def _close_stats(stats: DecodeStats, t0: float) -> None:
        wall = time.perf_counter() - t0
        stats.time_other = max(wall - stats.time_prefill - stats.time_draft - stats.time_verify, 0.0)

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, draft: DraftConfig | None = None
    ) -> GenerationResult:
        ids: list[int] = []
        parts: list[str] = []
        last = None
        for out in self.stream(prompt_ids, params, draft):
            ids.extend(out.token_ids)
            parts.append(out.text)
            last = out
        assert last is not None and last.finish_reason is not None
        return GenerationResult(ids, "".join(parts), last.finish_reason, last.stats)

    # ---- analysis helpers used by the index search -------------------------------------------------

    def draft_agreement(self, prompt_ids: list[int], continuation_ids: list[int], draft: DraftConfig) -> float:
        """Teacher-forced matchness (SWIFT): fraction of continuation positions where the draft's argmax,
        run over prompt + continuation in one pass, equals the given continuation. 1.0 for no skips."""
        if not continuation_ids:
            return 0.0
        seq = torch.tensor(prompt_ids + continuation_ids[:-1])
        n_prompt = len(prompt_ids)
        args = draft_pass_args(self.lean, draft)
        with torch.inference_mode():
            logits = self.lean.forward(seq, 0, **args)
        pred = logits[n_prompt - 1 :].argmax(dim=-1)  # [C]
        return float((pred == torch.tensor(continuation_ids)).float().mean())

    def embed_hidden(self, prompt_ids: list[int]) -> np.ndarray:
        """Mean-pooled final hidden state (after the final norm) of the full model: [hidden] float32."""
        with torch.inference_mode():
            h = self.lean.hidden(torch.tensor(prompt_ids), 0)  # [M, hidden]
        return h.mean(dim=0).float().numpy()


def _find_stop(text: str, stops: tuple[str, ...], sent: int) -> int | None:
    """Index where the earliest stop string starts (searching only text not yet sent, plus overlap)."""
    best = None
    for s in stops:
        i = text.find(s, max(sent - len(s) + 1, 0))
        if i != -1 and (best is None or i < best):
            best = i
    return best
