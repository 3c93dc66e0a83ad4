"""Where a model's tensors come from, by Hugging Face name, and which names each architecture uses.

`WeightSource` reads tensors by their transformers state-dict name: from the safetensors files of a model
directory (memory-mapped, so nothing is resident until read, and draft weights built later re-read only
what they need), or from an in-memory transformers module (tests with tiny random models).
Per-architecture differences are data (`ARCHS`), not branches in the forward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ArchSpec:
    """How one architecture names and shapes its decoder layer."""

    attn_norm: str  # layer-relative names
    mlp_norm: str
    post_attn_norm: str | None = None  # Gemma 3's extra norms
    post_mlp_norm: str | None = None
    qk_norm: bool = False
    norm_plus_one: bool = False  # RMSNorm multiplies by (1 + w)
    embed_scaled: bool = False  # embeddings times sqrt(hidden)
    act: str = "silu"  # "silu" | "gelu_tanh"
    scale_from: str = "head_dim"  # attention scale: 1/sqrt(head_dim) or 1/sqrt(query_pre_attn_scalar)
    # GGUF stores Llama's q/k rows with each head's RoPE pairs interleaved (llama.cpp's "normal" RoPE, the
    # lean forward's order); Qwen2 and Gemma 3 keep Hugging Face's half-split order (NEOX RoPE).
    gguf_qk_interleaved: bool = False


_LLAMA = ArchSpec(attn_norm="input_layernorm", mlp_norm="post_attention_layernorm", gguf_qk_interleaved=True)
_QWEN2 = ArchSpec(attn_norm="input_layernorm", mlp_norm="post_attention_layernorm")
_GEMMA3 = ArchSpec(
    attn_norm="input_layernorm",
    mlp_norm="pre_feedforward_layernorm",
    post_attn_norm="post_attention_layernorm",
    post_mlp_norm="post_feedforward_layernorm",
    qk_norm=True,
    norm_plus_one=True,
    embed_scaled=True,
    act="gelu_tanh",
    scale_from="query_pre_attn_scalar",
)
ARCHS: dict[str, ArchSpec] = {"llama": _LLAMA, "qwen2": _QWEN2, "gemma3_text": _GEMMA3, "gemma3": _GEMMA3}


class WeightSource:
    """name -> fp32 tensor (on the CPU), plus which names exist."""

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None, files: list[Path] | None = None):
        self._tensors = tensors or {}
        self._where: dict[str, Path] = {}
        for f in files or []:
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    self._where[k] = f
        self._handles: dict[Path, object] = {}

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> WeightSource:
        return cls(tensors={k: v.detach() for k, v in module.state_dict().items()})

    @classmethod
    def from_dir(cls, model_dir: Path) -> WeightSource:
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            files = sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no safetensors weights in {model_dir}")
        return cls(files=files)

    def has(self, name: str) -> bool:
        return name in self._tensors or name in self._where

    def names(self) -> list[str]:
        return sorted(set(self._tensors) | set(self._where))

    def get(self, name: str) -> torch.Tensor:
        if name in self._tensors:
            return self._tensors[name].float()
        f = self._where[name]
        if f not in self._handles:
            from safetensors import safe_open

            self._handles[f] = safe_open(str(f), framework="pt")
        return self._handles[f].get_tensor(name).float()  # type: ignore[attr-defined]

    def prefix(self) -> str:
        """The decoder's name prefix: 'model.' or, for multimodal checkpoints, 'model.language_model.'."""
        for p in ("model.language_model.", "model."):
            if self.has(p + "embed_tokens.weight"):
                return p
        raise KeyError("no embed_tokens.weight found: not a supported decoder checkpoint")


def text_config(config):
    """The text part of a (possibly multimodal) transformers config."""
    return getattr(config, "text_config", None) or config


def rotary_module(config):
    """transformers' own rotary-embedding module for this config, built without loading weights (so
    every RoPE scaling variant matches the reference exactly)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    base = meta.model
    base = getattr(base, "language_model", base)
    return type(base.rotary_emb)(config=text_config(config))
