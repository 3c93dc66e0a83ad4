"""Drafting: propose the next few tokens cheaply. The verify pass decides what is kept, so nothing here
can change the output, only the speed.

Two sources, per step:
- prompt lookup (n-gram): if the last n tokens occurred earlier in prompt + output, propose what followed
  them there. Free (no model pass); pays on copy-heavy prompts (summaries, code edits, RAG answers).
- the model itself with attention/MLP sub-layers skipped, optionally on int8 weight copies and a
  vocabulary-subset LM head, stopping early below a confidence threshold (adaptive if asked).
A proposal's draft distribution: the processed draft softmax when the model sampled it, one-hot (None)
when it was chosen greedily or copied by lookup.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import DraftConfig, SamplingParams
from engine.lean import LeanModel
from engine.sampling import probs_for, sample


@dataclass
class Draft:
    tokens: torch.Tensor  # [k] int64
    probs: torch.Tensor | None  # [k, V] draft distributions when sampled from the model, else None (one-hot)
    source: str = "model"  # "model" | "lookup"


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


def draft_pass_args(model: LeanModel, cfg: DraftConfig) -> dict:
    """`LeanModel.forward` keyword arguments that make a pass the draft `cfg` describes: its skipped
    sub-layers, int8 weight copies and subset head (built on first use and kept on the model)."""
    int8 = cfg.quantize == "int8"
    if int8:
        model.prepare_int8()
    return {
        "skip_attn": frozenset(cfg.skip_attn),
        "skip_mlp": frozenset(cfg.skip_mlp),
        "int8": int8,
        "head": model.draft_head(cfg.draft_vocab, int8),
    }


class Drafter:
    """Per-request drafting state (the adaptive threshold lives here)."""

    def __init__(self, model: LeanModel, cfg: DraftConfig, params: SamplingParams, gen: torch.Generator):
        self.model, self.cfg, self.params, self.gen = model, cfg, params, gen
        self.pass_args = draft_pass_args(model, cfg)
        self.threshold = cfg.confidence
        # DEL-style length for lookup proposals: how many copied tokens recent steps kept, plus one.
        # A wrong copy of k tokens makes the verify pass cost as much as k + 1 tokens do.
        self.lookup_len = float(cfg.max_draft)

    def propose(self, cur: int, pos: int, limit: int, history: torch.Tensor) -> Draft:
        """Draft at most `limit` tokens after `cur` (which sits at position `pos`)."""
        if self.cfg.prompt_lookup and limit > 0:
            n = min(limit, max(1, round(self.lookup_len))) if self.cfg.adaptive else limit
            toks = lookup_ngram(history, self.cfg.prompt_lookup, n)
            if toks.numel():
                return Draft(toks, None, "lookup")
        if not self.cfg.model_draft:
            return Draft(torch.empty(0, dtype=torch.long), None, "lookup")
        return self._model_draft(cur, pos, limit)

    def _model_draft(self, cur: int, pos: int, limit: int) -> Draft:
        toks: list[int] = []
        probs: list[torch.Tensor] = []
        x = cur
        for j in range(limit):
            logits = self.model.forward(torch.tensor([x]), pos + j, **self.pass_args)  # [1, V]
            if self.params.greedy:
                conf, tok = torch.softmax(logits[0], dim=-1).max(dim=-1)
            else:
                p = probs_for(logits, self.params)[0]  # [V]
                conf, tok = p.max(), sample(p.unsqueeze(0), self.gen)[0]
            if float(conf) < self.threshold:
                break
            x = int(tok)
            toks.append(x)
            if not self.params.greedy:
                probs.append(p)
        return Draft(torch.tensor(toks, dtype=torch.long), torch.stack(probs) if probs else None)

    def observe(self, draft: Draft, accepted: int) -> None:
        """Adaptive drafting: Draft&Verify's confidence threshold for model drafts (draft less eagerly after
        poor acceptance, more after good), and a running proposal length for lookup drafts."""
        k = draft.tokens.shape[0]
        if not self.cfg.adaptive or k == 0:
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
