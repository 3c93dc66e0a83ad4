"""The engine's public face: load a model, turn prompts into ids, stream text with decode stats.

`Engine.stream` runs one request to the end on a private `Scheduler` (the same step code that batches
many requests in a serving replica, so a request decodes the same way alone and in company);
`Engine.sequence` makes a `Sequence` for a shared scheduler. The engine keeps only its own weights
(read from safetensors); the transformers model is loaded on demand for baselines (`hf_model`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.config import DecodeStats, DraftConfig, RuntimeSettings, SamplingParams
from engine.costs import PassCosts
from engine.decode import Sequence, StepOutput
from engine.detok import TextStream
from engine.draft import draft_pass_args
from engine.encode import encode_chat, encode_text
from engine.lean import ENGINE_PRECISIONS, LeanModel
from engine.load import load_hf_model, packed_weights, resolve_model_dir, weights_hash
from engine.schedule import Scheduler

DEFAULT_MAX_SEQ_LEN = 8192
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

__all__ = ["DEFAULT_MAX_SEQ_LEN", "PRECISIONS", "Engine", "GenerationResult", "StepOutput", "resolve_device", "resolve_precision"]

PRECISIONS = ("auto", *ENGINE_PRECISIONS)
# What `auto` picks on a CPU for a model with GGUF blocks: int8 activations measured fastest on both CPU
# kinds seen (README, "Precision"); fp32 activations (`native-f32`) are the closer-to-reference choice.
AUTO_NATIVE = "native"


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: DecodeStats = field(default_factory=DecodeStats)


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """'auto' picks CUDA with bf16 when a GPU is visible, else the CPU in fp32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', not {dtype!r}")
    return dev, DTYPES[dtype]


def resolve_precision(precision: str, device: torch.device, dtype: torch.dtype, has_blocks: bool) -> str:
    """'auto' is the native kernels on a CPU in fp32 when the model has GGUF blocks, else `reference`
    (GPUs, other dtypes, Hugging Face directories). An explicit native precision on a model without GGUF
    blocks packs its fp32 weights as Q8_0 at load (llama.cpp's default quantisation)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision != "auto":
        return precision
    return AUTO_NATIVE if device.type == "cpu" and dtype == torch.float32 and has_blocks else "reference"


class Engine:
    def __init__(self, lean: LeanModel, tokenizer, model_id: str, weights_hash: str, path: Path | None = None, config=None):
        self.lean = lean
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.weights_hash = weights_hash
        self.path = path
        self.config = config
        self.num_layers = lean.n_layers
        self.context_length = lean.max_len
        self.device = lean.device
        self.dtype = lean.dtype
        self.precision = lean.precision
        self.eos_token_ids = self._eos_ids()
        self.costs = PassCosts()  # measured pass costs, shared by every scheduler of this engine
        self._hf = None

    @classmethod
    def load(
        cls,
        model: str = "smollm2",
        max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
        threads: int | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        precision: str = "auto",
    ) -> Engine:
        from transformers import AutoConfig, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        if model.startswith("random:"):  # a random-weight model of a real shape, built on the device
            from engine.random_model import random_engine

            return random_engine(model, max_seq_len=max_seq_len, device=device, dtype=dtype)
        path, model_id = resolve_model_dir(model)
        dev, dt = resolve_device(device, dtype)
        config = AutoConfig.from_pretrained(path)
        packed = None
        if precision != "reference" and dev.type == "cpu" and dt == torch.float32:
            packed = packed_weights(path, model_id)
        precision = resolve_precision(precision, dev, dt, packed is not None)
        lean = LeanModel.from_pretrained(path, max_seq_len=max_seq_len, device=dev, dtype=dt, precision=precision, packed=packed)
        tok = AutoTokenizer.from_pretrained(path)
        return cls(lean, tok, model_id, weights_hash(path), path, config)

    @property
    def hf_model(self) -> torch.nn.Module:
        """The transformers model of the same weights, loaded on first use (baselines and tests only)."""
        if self._hf is None:
            if self.path is None:
                raise RuntimeError("this engine was not loaded from a model directory")
            self._hf = load_hf_model(self.path).to(device=self.device, dtype=self.dtype)
        return self._hf

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        sources = [self.config]
        if self.path is not None:
            try:
                from transformers import GenerationConfig

                sources.append(GenerationConfig.from_pretrained(self.path))
            except OSError:  # no generation_config.json
                pass
        for src in sources:
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
        turn when the model has a template (instruct models), else tokenised as is (base models). Their
        text is always text: control-token text in it never becomes a control token (`engine.encode`)."""
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt or messages")
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if messages is None and not has_template:
            return encode_text(self.tokenizer, prompt)
        if not has_template:
            raise ValueError(f"model {self.model_id} has no chat template; send a plain prompt instead")
        msgs = messages if messages is not None else [{"role": "user", "content": prompt}]
        return encode_chat(self.tokenizer, msgs)  # content is text: it never becomes a control token

    # ---- decoding ---------------------------------------------------------------------------------

    def sequence(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        draft: DraftConfig | None = None,
        emit: Callable[[StepOutput], None] | None = None,
        rid: str | None = None,
    ) -> Sequence:
        """A request for a scheduler (raises PromptTooLongError / ValueError for unusable input)."""
        return Sequence(self.lean, prompt_ids, params, draft, self.eos_token_ids, TextStream(self.tokenizer, params.stop), emit, rid)

    def scheduler(self, settings: RuntimeSettings | None = None) -> Scheduler:
        return Scheduler(self.lean, settings, self.costs)

    def stream(
        self, prompt_ids: list[int], params: SamplingParams, draft: DraftConfig | None = None
    ) -> Iterator[StepOutput]:
        """One request alone, output by output; the last has finish_reason set."""
        t0 = time.perf_counter()
        seq = self.sequence(prompt_ids, params, draft)
        sched = Scheduler(self.lean, RuntimeSettings(max_running=1, max_waiting=1), self.costs)
        sched.submit(seq)
        while True:
            if not seq.finished:
                sched.step()
            while seq.outbox:
                out = seq.outbox.pop(0)
                if out.finish_reason is not None:
                    _close_stats(out.stats, t0)
                yield out
                if out.finish_reason is not None:
                    return

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
        cache = self.lean.new_cache(len(seq))
        with torch.inference_mode():
            logits = self.lean.forward(seq, 0, cache=cache, **args)
        pred = logits[n_prompt - 1 :].argmax(dim=-1).cpu()  # [C]
        return float((pred == torch.tensor(continuation_ids)).float().mean())

    def embed_hidden(self, prompt_ids: list[int]) -> np.ndarray:
        """Mean-pooled final hidden state (after the final norm) of the full model: [hidden] float32."""
        with torch.inference_mode():
            h = self.lean.hidden(torch.tensor(prompt_ids), 0, cache=self.lean.new_cache(len(prompt_ids)))
        return h.mean(dim=0).float().cpu().numpy()


def _close_stats(stats: DecodeStats, t0: float) -> None:
    wall = time.perf_counter() - t0
    stats.time_other = max(wall - stats.time_prefill - stats.time_draft - stats.time_verify, 0.0)
