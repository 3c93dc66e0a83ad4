"""Random-weight models of real architectures' shapes, built on the device: the engine's correctness and
speed where no real weights can be had (a GPU machine without the model packages or a network, where
no converted model fits what can be sent along).

`Engine.load("random:qwen2.5-coder-0.5b", device="cuda")` builds Qwen2.5-Coder-0.5B's exact shape (24
layers, hidden 896, 14 query / 2 KV heads, QKV biases, a 151,936-token head) with transformers'
own initialisation from a fixed seed, on the device itself. Like `tests/tiny.py` it then rescales
weights so that greedy choices are not near-ties (which the last bits of a bf16 sum would decide), but
not every weight as tiny.py does (at 24 layers that made the random net chaotic: bf16 and fp32 agreed
on 79% of greedy tokens): the head is untied and scaled to logits of standard deviation `LOGIT_STD`, the
embeddings to `EMBED_STD` so each token carries through the layers. Measured on the CPU for the real
shape (one prompt of 97 tokens): bf16 and fp32 greedy tokens agree on 97%, the device-generic and the
oneDNN fp32 paths on 100%, the median top-1 margin is ~1 logit, outputs depend on the context, and
65 distinct next tokens are predicted over the 97 positions. The text is a byte-level stand-in
(`ByteTokenizer`), since the model's own tokenizer is not available either; everything the engine does
is on token ids anyway. Timings from it are the real shape's timings; acceptance rates are a random
model's, not the real one's.

`random:qwen2.5-coder-0.5b-mini` keeps the layer count and head layout at a small width and vocabulary
(the check's draft configs stay valid), for CPU tests of the same paths.
"""

from __future__ import annotations

import hashlib

import torch

PREFIX = "random:"
LOGIT_STD = 8.0
EMBED_STD = 0.4

# name -> (transformers config class name, its arguments). The real shape first (its head is tied to the
# embeddings; here untied, see above: the same compute, 136M more parameters); `-mini` keeps the layer
# count, head counts and biases.
SHAPES: dict[str, tuple[str, dict]] = {
    "qwen2.5-coder-0.5b": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
    )),
    "qwen2.5-coder-0.5b-mini": ("Qwen2Config", dict(
        vocab_size=2048, hidden_size=224, intermediate_size=384, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=2, eos_token_id=1,
    )),
}


def is_random(model: str) -> bool:
    return model.startswith(PREFIX)


def random_config(name: str):
    """The transformers config of a random model (`name` with or without the `random:` prefix)."""
    import transformers

    name = name.removeprefix(PREFIX)
    if name not in SHAPES:
        raise ValueError(f"unknown random model {name!r}; known: {', '.join(PREFIX + n for n in SHAPES)}")
    cls_name, kw = SHAPES[name]
    return getattr(transformers, cls_name)(**kw)


class ByteTokenizer:
    """A stand-in tokenizer for random models: one token per character (ids 3 + code point mod 4093,
    within the vocabulary), decoding any id to a printable ASCII character. 0 is padding, `eos` ends."""

    chat_template = "role: content"  # truthy: prompts are wrapped as chat turns like instruct models'

    def __init__(self, vocab: int, eos: int):
        self.vocab, self.eos_token_id = vocab, eos
        self.span = min(vocab - 3, 4093)

    def _ids(self, text: str) -> list[int]:
        return [3 + ord(c) % self.span for c in text]

    def __call__(self, text: str, add_special_tokens: bool = True):
        class Enc:
            input_ids = self._ids(text)

        return Enc()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._ids(text)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(32 + int(i) % 95) for i in ids if not (skip_special_tokens and (int(i) < 3 or int(i) == self.eos_token_id)))

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = True):
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant: " if add_generation_prompt else "")
        return self._ids(text) if tokenize else text


def build_random_model(name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       seed: int = 0, logit_std: float = LOGIT_STD) -> torch.nn.Module:
    """The transformers model of `name`'s shape with random weights, created on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM

    cfg = random_config(name)
    torch.manual_seed(seed)  # seeds the CUDA generators too: the same weights on every run on a device
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "bias" in pname:  # transformers zeroes biases; random ones exercise the QKV-bias path
                p.normal_(0.0, 0.02)
        # The head sets the logits' spread: std `logit_std` over unit-RMS hidden states.
        head = model.get_output_embeddings().weight
        head.mul_(logit_std / (head.float().std() * cfg.hidden_size**0.5))
        # Embeddings at the init's 0.02 leave every position's final state along one shared direction
        # (mean cosine 0.75-0.92), so greedy output cycles through a few tokens; at EMBED_STD the token
        # carries through (mean cosine 0.16-0.34, ~2/3 of a prompt's distinct tokens predicted).
        emb = model.get_input_embeddings().weight
        emb.mul_(EMBED_STD / emb.float().std())
    return model


def random_engine(model: str, *, max_seq_len: int = 8192, device: str = "cpu", dtype: str = "auto",
                  seed: int = 0, generic: bool = False):
    """An `Engine` over a random model built on the device (`model` is `random:NAME`). Its transformers
    module doubles as the HF `generate` baseline (`Engine.hf_model`)."""
    from engine.generate import Engine, resolve_device
    from engine.lean import LeanModel
    from engine.weights import WeightSource

    name = model.removeprefix(PREFIX)
    dev, dt = resolve_device(device, dtype)
    hf = build_random_model(name, dev, dt, seed)
    cfg = hf.config
    lean = LeanModel(WeightSource.from_module(hf), cfg, max_seq_len=max_seq_len, device=dev, dtype=dt,
                     rotary=_host_rotary(hf), generic=generic)
    digest = hashlib.sha256(f"{name}:{seed}:{LOGIT_STD}:{EMBED_STD}".encode()).hexdigest()[:16]
    eng = Engine(lean, ByteTokenizer(cfg.vocab_size, cfg.eos_token_id), PREFIX + name, digest, None, cfg)
    eng._hf = hf
    return eng


def _host_rotary(hf: torch.nn.Module):
    """transformers' rotary module of `hf` built on the CPU (the engine computes its tables there)."""
    return type(hf.model.rotary_emb)(config=hf.config)


def cpu_reference(engine, max_seq_len: int = 256):
    """An fp32 CPU `LeanModel` (the oneDNN fast path) of a random engine's weights, whatever its device."""
    from engine.lean import LeanModel
    from engine.weights import WeightSource

    hf = engine.hf_model
    src = WeightSource({k: v.detach().float().cpu() for k, v in hf.state_dict().items()})
    return LeanModel(src, hf.config, max_seq_len=max_seq_len, rotary=_host_rotary(hf))
