"""The decode loop: prefill, then plain steps or draft-and-verify steps, yielding committed token ids.

The engine knows nothing about text here: token ids in, token ids out. Cache bookkeeping: after each
step the KV cache holds every committed token except the last one (`cur`), which the next pass feeds.
A speculative step drafts d_1..d_k with the draft (the same weights, some sub-layers skipped), verifies
[cur, d_1..d_k] in one full pass (which rewrites K/V of every layer for those positions), and commits
n accepted tokens plus one recovered/bonus token. Rejected positions are just overwritten later.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from engine.config import DecodeStats, DraftConfig, SamplingParams
from engine.draft import Draft, Drafter
from engine.lean import LeanModel
from engine.sampling import make_generator, probs_for, sample
from engine.verify import greedy_verify, rejection_sample


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


def decode(
    model: LeanModel,
    prompt: list[int],
    params: SamplingParams,
    draft: DraftConfig,
    eos_ids: frozenset[int],
    stats: DecodeStats | None = None,
) -> Iterator[list[int]]:
    """Yields lists of newly committed token ids (EOS excluded). `stats` is filled as it goes and its
    finish_reason set to "stop" (EOS) or "length" (max_new_tokens or context) when the loop ends by
    itself; a caller that stops early (stop strings) sets its own."""
    stats = stats if stats is not None else DecodeStats()
    limit = model.max_len
    if len(prompt) == 0:
        raise ValueError("prompt is empty")
    if len(prompt) >= limit:
        raise PromptTooLongError(len(prompt), limit)
    draft.check_layers(model.n_layers)
    gen = make_generator(params.seed)
    speculative = draft.enabled
    drafter = Drafter(model, draft, params, gen) if speculative else None
    # prompt + committed tokens, for prompt lookup; preallocated so a step appends without copying
    history = torch.empty(limit, dtype=torch.long)
    history[: len(prompt)] = torch.tensor(prompt)
    stats.prompt_tokens = len(prompt)

    def pick(logits: torch.Tensor) -> int:  # logits [1, V]
        if params.greedy:
            return int(logits[0].argmax())
        return int(sample(probs_for(logits, params), gen)[0])

    with torch.inference_mode():
        t0 = time.perf_counter()
        cur = pick(model.forward(torch.tensor(prompt), 0, last_only=True))
        stats.time_prefill += time.perf_counter() - t0
        pos = len(prompt)  # position of `cur`; cache holds [0, pos)
        produced = 0
        pending = [cur]
        while True:
            # Commit `pending`, honouring EOS and the token budget.
            out = []
            for t in pending:
                if t in eos_ids:
                    stats.finish_reason = "stop"
                    break
                out.append(t)
                produced += 1
                if produced >= params.max_new_tokens:
                    stats.finish_reason = "length"
                    break
            stats.new_tokens = produced
            if out:
                yield out
            if stats.finish_reason:
                return
            if pos >= limit - 1:  # `cur` sits in the last slot: nothing more fits
                stats.finish_reason = "length"
                return
            budget = min(params.max_new_tokens - produced, limit - 1 - pos)
            t1 = time.perf_counter()
            d = Draft(torch.empty(0, dtype=torch.long), None)
            if drafter is not None and budget > 1:
                history[pos] = cur
                d = drafter.propose(cur, pos, min(draft.max_draft, budget - 1), history[: pos + 1])
            t2 = time.perf_counter()
            k = d.tokens.shape[0]
            seq = torch.cat([torch.tensor([cur]), d.tokens])  # [k+1]
            logits = model.forward(seq, pos)  # [k+1, V]
            if params.greedy:
                n, pending = greedy_verify(d.tokens, logits)
            else:
                target = probs_for(logits, params)  # [k+1, V]
                uniforms = torch.rand(k, generator=gen)
                n, pending = rejection_sample(d.tokens, d.probs, target, uniforms, gen)
            t3 = time.perf_counter()
            if drafter is not None:
                drafter.observe(d, n)
                stats.observe_step(k, n)
            else:
                stats.steps += 1
            stats.time_draft += t2 - t1
            stats.time_verify += t3 - t2
            history[pos + 1 : pos + 1 + n] = d.tokens[:n]
            pos += n + 1
            cur = pending[-1]
