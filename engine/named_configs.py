"""Named draft configs: the bench's default and ablation sets, from which the index build also takes its
general candidates (`index.select.GENERAL_CANDIDATES`, by name), so each named config is written once.

No torch here: the index imports this without loading a model.
"""

from __future__ import annotations

from engine.config import KNOBS, DraftConfig

# The 4-MLP skip draft (hand-picked for SmolLM2, 30 layers: late layers are the most redundant); knobs
# that do not cut the draft's cost on their own ride on it in the ablation.
SKIP_DRAFT = ("skip-mlp4", DraftConfig(skip_mlp=(22, 24, 26, 27), max_draft=4, confidence=0.6))

DEFAULT_CONFIGS: dict[str, DraftConfig] = {
    # Hand-picked for SmolLM2 (30 layers): late layers are the most redundant.
    SKIP_DRAFT[0]: SKIP_DRAFT[1],
    "skip-both6": DraftConfig(skip_attn=(20, 23, 26), skip_mlp=(21, 24, 27), max_draft=4, confidence=0.6),
    "skip-both12": DraftConfig(
        skip_attn=(6, 10, 14, 18, 22, 26), skip_mlp=(8, 12, 16, 20, 24, 27), max_draft=5, confidence=0.7
    ),
}


# One knob each (issue: "each measurable on its own"), then the best combination found by hand and by
# the index search. A draft of the full fp32 model would cost a whole pass per token, so knobs that do
# not cut the draft's cost on their own (vocab subset, adaptive threshold) ride on the 4-MLP skip draft;
# the others draft alone. Which knobs, their values and names come from `engine.config.KNOBS`.
def knob_ablation() -> dict[str, DraftConfig]:
    """The skip draft, each knob that rides on it, then each knob that drafts alone (KNOBS order)."""
    base_name, base = SKIP_DRAFT
    out = {base_name: base}
    for name, space in KNOBS.items():
        if space.alone is not None and space.alone_with is None:
            out[f"{base_name}+{space.label or name}"] = DraftConfig(**{**base.model_dump(), name: space.alone})
    for name, space in KNOBS.items():
        if space.alone is not None and space.alone_with is not None:
            out[space.label or name] = DraftConfig(**{**space.alone_with, name: space.alone})
    return out


ABLATION_CONFIGS: dict[str, DraftConfig] = knob_ablation() | {
    "lookup2+adaptive": DraftConfig(prompt_lookup=2, model_draft=False, max_draft=8, adaptive=True),
    "int8+vocab8k+lookup": DraftConfig(quantize="int8", draft_vocab=8192, prompt_lookup=3, max_draft=8, confidence=0.3),
    "int8+vocab8k+lookup2+adaptive": DraftConfig(
        quantize="int8", draft_vocab=8192, prompt_lookup=2, max_draft=8, confidence=0.3, adaptive=True,
        target_acceptance=0.8,
    ),
    # the same on int4 weights (the engine's cheaper draft precision)
    "int4+vocab8k+lookup2+adaptive": DraftConfig(
        quantize="int4", draft_vocab=8192, prompt_lookup=2, max_draft=8, confidence=0.3, adaptive=True,
        target_acceptance=0.8,
    ),
}
