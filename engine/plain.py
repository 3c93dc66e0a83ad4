"""Whether a request, or one step of it, decodes plainly (one full pass per token, no draft): the one
place that decides. Speculation never changes the output, only the speed, so each reason to skip it is a
speed decision, and every site asks here:

- "request": the request turned speculation off (`speculative: false`); asked before routing, so such a
  request is not routed at all (services.replica `ModelReplica.route`).
- "config": the config it decodes with is plain: the route's (a domain's, or the fallback's for a prompt far
  from every domain, which a build may leave plain) or plain because routing failed; asked by the engine's
  request (`engine.decode.Sequence`) and the drafter (`engine.draft.draft_plan`).
- "load": the load-aware cap is 0 this step: at this batch size drafts cost more than they save
  (`engine.costs.speculation_cap`); asked per step by the scheduler (`engine.schedule`).

Not plain, and decided where the draft is made: a step whose lookup finds nothing when the config drafts by
lookup alone, or whose model draft online correction has paused (`engine.draft.Drafter`); lookup may still
draft there.
"""

from __future__ import annotations

from engine.config import DraftConfig

REQUEST, CONFIG, LOAD = "request", "config", "load"


def plain_reason(config: DraftConfig | None = None, *, speculative: bool = True, cap: int | None = None) -> str | None:
    """Why this request (or, with `cap`, this step of it) decodes plainly; None when it may draft.
    `config` None: not known yet (before routing); `cap`: the load-aware draft-length cap of this step
    (None: no cap decided)."""
    if not speculative:
        return REQUEST
    if config is not None and not config.enabled:
        return CONFIG
    if cap == 0:
        return LOAD
    return None
