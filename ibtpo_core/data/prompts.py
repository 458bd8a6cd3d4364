"""Prompt and response encoding shared by warm-up, rollouts and evaluation."""
from __future__ import annotations


def encode_prompt(tokenizer, text: str, use_chat_template: bool = True) -> list[int]:
    """Token ids of a user prompt, through the tokenizer's chat template when it has one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_response(tokenizer, text: str) -> list[int]:
    """Token ids of a response followed by EOS (the supervised target)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
