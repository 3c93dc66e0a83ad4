"""A tiny random Llama with a one-character-per-token tokenizer: the real engine and scheduler in
milliseconds, without any download (fast unit tests of decoding, batching and the replica)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from engine.generate import Engine
from engine.lean import LeanModel

VOCAB = 128
EOS = 1


class CharTokenizer:
    """Token i is the character chr(32 + i % 90); 0 and 1 are special (pad, EOS)."""

    eos_token_id = EOS
    chat_template = "user/assistant"

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(32 + i % 90) for i in ids if not (skip_special_tokens and i < 2))

    def __call__(self, text, add_special_tokens=True):
        class Enc:
            input_ids = [2 + (ord(c) - 32) % (VOCAB - 2) for c in text]

        return Enc()

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        if any(m["role"] == "tool" for m in messages):
            raise ValueError("no tool turns in this template")
        return self("|".join(m["content"] for m in messages) + ">").input_ids


def tiny_engine(seed: int = 0, max_seq_len: int = 256, **lean_kw) -> Engine:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_seq_len, head_dim=16, tie_word_embeddings=True,
        eos_token_id=EOS,
    )
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # larger logits than the default init, so greedy choices are not near-ties
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(3.0)
    lean = LeanModel(model, max_seq_len=max_seq_len, **lean_kw)
    return Engine(lean, CharTokenizer(), "tiny-llama", "tiny", None, cfg)
