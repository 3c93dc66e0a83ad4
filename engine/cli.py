"""CLI command of the engine stage: `knnssd generate` (mounted by deploy.cli; `knnssd bench engine`, which
also routes prompts, lives on the top floor in deploy/bench_engine.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from engine.config import DraftConfig

_DEFAULTS = DraftConfig.model_fields  # the flags' defaults are the config's, never a second copy


def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt (sent as one user turn when the model has a chat template).")],
    model: Annotated[str, typer.Option(help="Bundled model name or a local Hugging Face model directory.")] = "smollm2",
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0: all).")] = 0,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop string (repeatable).")] = None,
    skip_attn: Annotated[str, typer.Option(help="Draft: layers whose attention is skipped, e.g. '20,22-25'.")] = "",
    skip_mlp: Annotated[str, typer.Option(help="Draft: layers whose MLP is skipped.")] = "",
    max_draft: Annotated[int, typer.Option(help="Most draft tokens per verify pass.")] = _DEFAULTS["max_draft"].default,
    confidence: Annotated[float, typer.Option(help="Stop drafting below this top-1 probability.")] = _DEFAULTS["confidence"].default,
    draft: Annotated[Optional[list[str]], typer.Option(help="Draft knob as KNOB=VALUE, any DraftConfig field (e.g. quantize=int8, prompt_lookup=3, skip_mlp=20-23); repeatable, overrides the flags above.")] = None,
    speculative: Annotated[bool, typer.Option(help="Use self-speculative decoding.")] = True,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto (fp32 on CPU, bf16 on GPU).")] = "auto",
    precision: Annotated[str, typer.Option(help="auto, reference, native or native-f32 (auto: native on a CPU for a GGUF model).")] = "auto",
) -> None:
    """Generate text for one prompt, streaming it, then print the decode stats."""
    from engine.config import SamplingParams
    from engine.generate import Engine

    # the named flags are the common knobs; --draft reaches every other one without a flag of its own
    flags = [f"skip_attn={skip_attn}", f"skip_mlp={skip_mlp}", f"max_draft={max_draft}", f"confidence={confidence}"]
    try:
        config = DraftConfig.from_options([*flags, *(draft or [])]) if speculative else DraftConfig.plain()
    except ValueError as e:  # pydantic's ValidationError is one too
        raise typer.BadParameter(str(e), param_hint="--draft") from None
    try:
        eng = Engine.load(model, device=device, dtype=dtype, precision=precision)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--precision") from None
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        stop=tuple(stop or ()),
    )
    last = None
    for out in eng.stream(eng.encode_prompt(prompt=prompt), params, config):
        sys.stdout.write(out.text)
        sys.stdout.flush()
        last = out
    sys.stdout.write("\n")
    assert last is not None
    stats = last.stats.to_dict() | {"precision": eng.precision, "config_id": config.config_id, "tokens_per_s": round(
        last.stats.new_tokens / last.stats.time_total, 2) if last.stats.time_total else 0.0}
    typer.echo(json.dumps(stats, indent=2), err=True)
