"""Create the tiny causal LM of the embedded default and save it as a HF checkpoint.

A Llama-architecture ``transformers`` model of about 1M parameters, saved with
``save_pretrained`` (safetensors). From then on every stage loads it only through
``AutoModelForCausalLM.from_pretrained(path)``, the path a Qwen3 checkpoint takes too.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TinyModelSpec:

    __pydantic_config__ = {"extra": "forbid"}  # config validation: unknown keys fail

    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    max_positions: int = 128


def create_tiny_model(tokenizer, spec: TinyModelSpec, seed: int, out_dir: str) -> int:
    """Initialise the model with ``seed``, save it (and the tokenizer) to ``out_dir``; returns
    the parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())
