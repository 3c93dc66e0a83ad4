"""Drafting: propose the next few tokens cheaply. The verify pass decides what is kept, so nothing here
can change the output, only the speed.

Two sources, per step:
- prompt lookup (n-gram): if the last n tokens occurred earlier in prompt + output, propose what followed
  them there. Free (no model pass); pays on copy-heavy prompts (summaries, code edits, RAG answers).
- the model itself as a `DraftPlan` (sub-layers skipped, low-bit weights, a vocabulary-subset head),
  stopping early below a confidence threshold (adaptive if asked). Requests that share a plan draft in
  one batched pass per draft position (`draft_batch`).
A proposal's draft distribution: the processed draft softmax when the model sampled it, one-hot (None)
when it was chosen greedily or copied by lookup.

Online correction (`Drafter`): the routed config is only a prior. Each request keeps, per source, what
its recent proposals bought (committed tokens per unit of step cost, from the measured pass costs); a
model draft that stops paying is switched off for a while (then probed again, with a doubling pause),
so a routing mistake costs a few steps, not the request.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import DraftConfig, SamplingParams
from engine.lean import DraftPlan, LeanModel, Segment
from engine.plain import plain_reason
from engine.sampling import probs_for, sample


@dataclass
class Draft:
    tokens: torch.Tensor  # [k] int64 (CPU)
    probs: torch.Tensor | None  # [k, V] draft distributions when sampled from the model, else None (one-hot)
    source: str = "model"  # "model" | "lookup" | "none"


NO_DRAFT = Draft(torch.empty(0, dtype=torch.long), None, "none")


def lookup_ngram(history: torch.Tensor, max_n: int, limit: int) -> torch.Tensor:
    """history [L] int64 -> up to `limit` tokens that followed the latest earlier occurrence of the
    longest suffix n-gram (n = max_n down to 1); empty [0] when nothing matches."""
    length = history.shape[0]
    for n in range(min(max_n, length - 1), 0, -1):
        suffix = history[-n:]
        windows = history[:-1].unfold(0, n, 1)  # [L-n, n]: every n-gram that has a token after it
        hits = (windows == suffix).all(dim=1).nonzero().flatten()
        if hits.numel():
            start = int(hits[-1]) + n
            return history[start : start + limit].clone()
    return torch.empty(0, dtype=torch.long)


def draft_plan(model: LeanModel, cfg: DraftConfig) -> DraftPlan | None:
    """The model-draft pass `cfg` describes, or None when it drafts without the model. Raises ValueError
    when `cfg` does not fit the model (`DraftConfig.check`: the knobs' bounds)."""
    cfg.check(model.n_layers)  # not the vocabulary: a larger draft vocabulary is clamped to the model's
    if plain_reason(cfg) is not None or not cfg.model_draft:  # plain, or drafts by lookup alone
        return None
    return model.plan(**cfg.plan_args())


def draft_pass_args(model: LeanModel, cfg: DraftConfig) -> dict:
    """`LeanModel.forward` keyword arguments that make a pass the draft `cfg` describes."""
    plan = draft_plan(model, cfg)
    return {} if plan is None else {"plan": plan}


class Drafter:
    """Per-request drafting state: the adaptive threshold, the lookup length, online correction."""

    PAUSE_MIN = 4  # steps a non-paying model draft stays off before it is probed again (doubles)
    PAUSE_MAX = 64
    JUDGE_AFTER = 3  # model-drafted steps observed (since the last pause) before judging the draft

    def __init__(self, cfg: DraftConfig, params: SamplingParams, plan: DraftPlan | None):
        self.cfg, self.params, self.plan = cfg, params, plan
        self.threshold = cfg.confidence
        # DEL-style length for lookup proposals: how many copied tokens recent steps kept, plus one.
        # A wrong copy of k tokens makes the verify pass cost as much as k + 1 tokens do.
        self.lookup_len = float(cfg.max_draft)
        self.model_value = 1.2  # EMA of committed tokens per unit of step cost, model-drafted steps
        self.paused = 0  # steps left with model drafting off
        self.pause_len = self.PAUSE_MIN
        self.model_steps = self.paused_steps = 0
        self._since_pause = 0

    def lookup(self, history: torch.Tensor, limit: int) -> Draft | None:
        if not self.cfg.prompt_lookup or limit <= 0:
            return None
        n = min(limit, max(1, round(self.lookup_len))) if self.cfg.adaptive else limit
        toks = lookup_ngram(history, self.cfg.prompt_lookup, n)
        return Draft(toks, None, "lookup") if toks.numel() else None

    def wants_model(self) -> bool:
        """Whether this step should draft with the model (online correction may have paused it)."""
        if self.plan is None:
            return False
        if self.paused > 0:
            self.paused -= 1
            self.paused_steps += 1
            return False
        return True

    def observe(self, draft: Draft, accepted: int, step_cost: float = 0.0) -> None:
        """After a verify: adapt the threshold (Draft&Verify) and lookup length (DEL), and judge the model
        draft by what it bought: committed tokens / step cost (in units of a 1-token full pass)."""
        k = draft.tokens.shape[0]
        if draft.source == "model" and step_cost > 0:
            self.model_steps += 1
            self._since_pause += 1
            self.model_value = 0.7 * self.model_value + 0.3 * (accepted + 1) / step_cost
            if self.model_value < 0.95 and self._since_pause >= self.JUDGE_AFTER:
                # slower than plain decoding: stop drafting for a while, then probe again
                self.paused, self.pause_len = self.pause_len, min(self.pause_len * 2, self.PAUSE_MAX)
                self.model_value, self._since_pause = 1.0, 0
            elif self.model_value > 1.1:
                self.pause_len = self.PAUSE_MIN
        if not self.cfg.adaptive:
            return
        if k == 0:
            if draft.source == "model":  # nothing cleared the threshold: a pass paid for nothing
                self.threshold = max(self.threshold - 0.05, 0.0)
            return
        if draft.source == "lookup":
            kept = accepted + 1 if accepted < k else k + 2  # all kept: a longer copy might have held too
            self.lookup_len = 0.5 * self.lookup_len + 0.5 * kept
            return
        step = 0.05
        if accepted / k < self.cfg.target_acceptance:
            self.threshold = min(self.threshold + step, 0.95)
        else:
            self.threshold = max(self.threshold - step, 0.0)


@dataclass
class DraftJob:
    """One sequence's model draft in a batched drafting round."""

    cache: object  # SeqCache
    pos: int  # position of `cur`
    cur: int
    limit: int  # most tokens to draft
    threshold: float
    params: SamplingParams
    gen: torch.Generator
    tokens: list[int] | None = None
    probs: list[torch.Tensor] | None = None


def draft_batch(model: LeanModel, plan: DraftPlan, jobs: list[DraftJob]) -> int:
    """Draft for every job with `plan`, one batched pass per draft position; each job stops at its
    limit or below its confidence threshold. Fills job.tokens / job.probs; returns the passes run."""
    dev = model.device
    for j in jobs:
        j.tokens, j.probs = [], []
    active = [j for j in jobs if j.limit > 0]
    step = 0
    while active:
        # one transfer in and one out per draft position for the whole group (not per job)
        inputs = torch.tensor([j.tokens[-1] if j.tokens else j.cur for j in active]).to(dev)
        segs = [Segment(j.cache, j.pos + step, inputs[i : i + 1]) for i, j in enumerate(active)]
        logits = model.forward_batch(segs, plan)
        picks, probs = [], []
        greedy = [i for i, j in enumerate(active) if j.params.greedy]
        if greedy:  # top-1 probability = exp(max - logsumexp), without materialising a softmax per job
            lg = torch.cat([logits[i] for i in greedy]).float()  # [G, V]
            top, tok = lg.max(dim=-1)
            conf = torch.exp(top - torch.logsumexp(lg, dim=-1))
            picks.append(torch.stack([conf, tok.float()], dim=1))
        for i, j in enumerate(active):
            if not j.params.greedy:
                p = probs_for(logits[i], j.params)[0]  # [V]
                probs.append(p)
                picks.append(torch.stack([p.max(), sample(p.unsqueeze(0), j.gen)[0].float()]).unsqueeze(0))
        host = torch.cat(picks).cpu().tolist()  # [(conf, token)] greedy jobs first, then sampled ones
        order = greedy + [i for i, j in enumerate(active) if not j.params.greedy]
        by_job = dict(zip(order, host))
        sampled = iter(probs)
        still = []
        for i, j in enumerate(active):
            conf, tok = by_job[i]
            p = None if j.params.greedy else next(sampled)
            if conf < j.threshold:
                continue
            j.tokens.append(int(tok))
            if p is not None:
                j.probs.append(p)
            if len(j.tokens) < j.limit:
                still.append(j)
        active = still
        step += 1
    return step


def job_draft(job: DraftJob) -> Draft:
    toks = torch.tensor(job.tokens or [], dtype=torch.long)
    probs = torch.stack(job.probs) if job.probs else None
    return Draft(toks, probs, "model")
