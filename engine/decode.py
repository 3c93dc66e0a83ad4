"""One request's decoding: prefill in fixed chunks, then plain steps or draft-and-verify steps.

`Sequence` holds a request's state and the per-request half of every step; `engine.schedule.Scheduler`
batches the passes of many sequences. Cache bookkeeping: after each step the KV cache holds every
committed token except the last one (`cur`), which the next pass feeds. A speculative step verifies
[cur, d_1..d_k] in one full pass (which rewrites K/V of every layer for those positions) and commits n
accepted tokens plus one recovered/bonus token; rejected positions are overwritten later.

Prefill chunks start at multiples of the chunk size, so how a prompt is split depends on the prompt
alone: a request's K/V, and so its output, is the same whatever else the runtime is doing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.config import DecodeStats, DraftConfig, SamplingParams
from engine.detok import TextStream
from engine.draft import Draft, Drafter, draft_plan
from engine.lean import LeanModel, Segment
from engine.plain import plain_reason
from engine.sampling import make_generator, probs_for, sample
from engine.verify import greedy_verify_ids, rejection_sample


class PromptTooLongError(ValueError):
    """The prompt leaves no room to generate within the model's context (or the configured cap)."""

    def __init__(self, prompt_tokens: int, limit: int):
        self.prompt_tokens, self.limit = prompt_tokens, limit
        super().__init__(
            f"prompt is {prompt_tokens} tokens but this model's context allows at most {limit - 1} prompt "
            f"tokens (context length {limit}); shorten the prompt"
        )

    def __reduce__(self):  # crosses process boundaries (Ray) intact
        return (PromptTooLongError, (self.prompt_tokens, self.limit))


@dataclass
class StepOutput:
    token_ids: list[int]
    text: str  # new text since the previous StepOutput
    finish_reason: str | None  # None until the last output: "stop", "length" (or "cancelled")
    stats: DecodeStats


_ids = itertools.count()


class Sequence:
    """A request inside the runtime. Not thread-safe except `cancel()`; the scheduler's thread owns it."""

    def __init__(
        self,
        model: LeanModel,
        prompt: list[int],
        params: SamplingParams,
        draft: DraftConfig | None,
        eos_ids: frozenset[int],
        text: TextStream | None = None,
        emit: Callable[[StepOutput], None] | None = None,
        rid: str | None = None,
    ):
        limit = model.max_len
        if len(prompt) == 0:
            raise ValueError("prompt is empty")
        if len(prompt) >= limit:
            raise PromptTooLongError(len(prompt), limit)
        draft = draft or DraftConfig.plain()
        self.rid = rid or f"seq-{next(_ids)}"
        self.model, self.prompt, self.params, self.config = model, list(prompt), params, draft
        self.eos_ids, self.text = eos_ids, text
        self.emit = emit
        self.outbox: list[StepOutput] = []  # outputs when no `emit` callback is given
        self.limit = limit
        self.stats = DecodeStats(prompt_tokens=len(prompt))
        self.gen = make_generator(params.seed, model.device)
        plan = draft_plan(model, draft)
        self.drafter = Drafter(draft, params, plan) if plain_reason(draft) is None else None
        # prompt + committed tokens, for prompt lookup; preallocated so a step appends without copying
        self.history = torch.empty(limit, dtype=torch.long)
        self.history[: len(prompt)] = torch.tensor(prompt)
        need = len(prompt) + params.max_new_tokens + (draft.max_draft if self.drafter is not None else 0) + 1
        self.cache = model.new_cache(capacity=min(need, limit))
        self.prefilled = 0
        self.pos = 0  # position of `cur`; the cache holds [0, pos)
        self.cur = -1
        self.produced = 0
        self.alpha = 0.7  # running acceptance of this request's drafts (load-aware cap)
        self.finish_reason: str | None = None
        self.cancelled = False

    # ---- state -------------------------------------------------------------------------------------

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def deterministic_drafts(self) -> bool:
        """Seeded sampling must draw the same samples whatever else runs, so its drafts may not depend on
        load or timing; greedy output cannot change, whatever the drafts."""
        return not self.params.greedy

    def cancel(self) -> None:
        self.cancelled = True  # read by the scheduler at its next iteration

    def draft_limit(self) -> int:
        """Most tokens this step may draft: within the config, the token budget and the context."""
        if self.drafter is None:
            return 0
        budget = min(self.params.max_new_tokens - self.produced, self.limit - 1 - self.pos)
        return max(min(self.config.max_draft, budget - 1), 0)

    # ---- passes --------------------------------------------------------------------------------------

    def prefill_segment(self, chunk: int) -> Segment:
        start = self.prefilled
        end = min((start // chunk + 1) * chunk, len(self.prompt))
        toks = torch.tensor(self.prompt[start:end], device=self.model.device)
        last = end == len(self.prompt)
        want = ("argmax_last" if self.params.greedy else "last") if last else "none"
        return Segment(self.cache, start, toks, want, exact=False)

    def after_prefill(self, seg: Segment, logits: torch.Tensor | None, seconds: float) -> None:
        self.prefilled = seg.start + seg.tokens.shape[0]
        self.stats.time_prefill += seconds
        if self.prefilling:
            return
        assert logits is not None
        self.cur = self._pick(logits)
        self.pos = len(self.prompt)
        self.history[self.pos] = self.cur
        self._commit([self.cur])

    def lookup_draft(self, limit: int) -> Draft | None:
        if self.drafter is None or limit <= 0:
            return None
        return self.drafter.lookup(self.history[: self.pos + 1], limit)

    def verify_tokens(self, draft: Draft) -> torch.Tensor:
        """[cur, d_1..d_k] on the CPU: the rows of this step's full pass."""
        return torch.cat([torch.tensor([self.cur]), draft.tokens])

    def verify_segment(self, draft: Draft, tokens: torch.Tensor | None = None) -> Segment:
        """The full pass's segment; `tokens` are `verify_tokens(draft)` already on the device (the
        scheduler moves every request's in one transfer), else they are moved here."""
        toks = self.verify_tokens(draft).to(self.model.device) if tokens is None else tokens
        return Segment(self.cache, self.pos, toks, "argmax" if self.params.greedy else "all", exact=True)

    def after_verify(self, draft: Draft, logits: torch.Tensor, draft_s: float, verify_s: float, step_cost: float) -> None:
        """Accept or reject the draft against the full pass's output (greedy tokens [k+1], or logits
        [k+1, V] when sampling), then commit."""
        k = draft.tokens.shape[0]
        if self.params.greedy:
            n, pending = greedy_verify_ids(draft.tokens, logits)
        else:
            target = probs_for(logits, self.params)  # [k+1, V]
            uniforms = torch.rand(k, generator=self.gen, device=self.gen.device)
            n, pending = rejection_sample(draft.tokens, draft.probs, target, uniforms, self.gen)
        if self.drafter is not None:
            self.drafter.observe(draft, n, step_cost if not self.deterministic_drafts else 0.0)
        if k:
            self.stats.observe_step(k, n)
            self.alpha = 0.7 * self.alpha + 0.3 * (n / k)
        else:
            self.stats.steps += 1
        self.stats.time_draft += draft_s
        self.stats.time_verify += verify_s
        self.history[self.pos + 1 : self.pos + 1 + n] = draft.tokens[:n]
        self.pos += n + 1
        self.cur = pending[-1]
        if self.pos < self.limit:
            self.history[self.pos] = self.cur
        self._commit(pending)

    def _pick(self, logits: torch.Tensor) -> int:  # greedy token [1], or logits [1, V] when sampling
        if self.params.greedy:
            return int(logits[0])
        return int(sample(probs_for(logits, self.params), self.gen)[0])

    # ---- output --------------------------------------------------------------------------------------

    def _commit(self, pending: list[int]) -> None:
        """Commit `pending`, honouring EOS, the token budget, stop strings and the context end."""
        out: list[int] = []
        reason = None
        for t in pending:
            if t in self.eos_ids:
                reason = "stop"
                break
            out.append(t)
            self.produced += 1
            if self.produced >= self.params.max_new_tokens:
                reason = "length"
                break
        self.stats.new_tokens = self.produced
        delta = ""
        if self.text is not None:
            delta = self.text.push(out)
            if self.text.stopped:
                reason = "stop"
        if reason is None and self.pos >= self.limit - 1:  # `cur` sits in the last slot: nothing more fits
            reason = "length"
        if reason is not None:
            self.finish(reason, out, delta)
        elif out or delta:
            self._emit(StepOutput(out, delta, None, self.stats))

    def finish(self, reason: str, tokens: list[int] | None = None, delta: str = "") -> None:
        if self.finished:
            return
        self.finish_reason = reason
        self.stats.finish_reason = reason
        if self.drafter is not None:
            self.stats.paused_steps = self.drafter.paused_steps
        if self.text is not None and reason != "cancelled":
            delta += self.text.flush()
        self._emit(StepOutput(tokens or [], delta, reason, self.stats))

    def _emit(self, out: StepOutput) -> None:
        if self.emit is not None:
            self.emit(out)
        else:
            self.outbox.append(out)
