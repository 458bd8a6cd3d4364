"""The built-in word-level tokenizer for the countdown task, saved as a HF tokenizer directory.

Every number 0..max_number, operator, ``=``, the newline (the step delimiter) and the two prompt
words are one token each, so one step ``a op b = r\\n`` is six tokens and a tiny model learns
arithmetic as a lookup rather than digit by digit. Spaces separate tokens and are not tokens;
``decode`` joins tokens with single spaces (``"5 + 3 = 8 \\n"``), which the verifier reads.
Saved with ``save_pretrained`` and loaded anywhere with ``AutoTokenizer.from_pretrained(dir)``.
"""
from __future__ import annotations

SPECIALS = ("<pad>", "<eos>", "<unk>")
WORDS = ("\n", "nums", "target", "+", "-", "*", "/", "=")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{% endif %}"
)


def build_tokenizer(max_number: int = 255):
    """A ``PreTrainedTokenizerFast`` with EOS, PAD, UNK and a chat template (the prompt passes
    as is)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        t: i for i, t in enumerate(SPECIALS + WORDS + tuple(str(i) for i in range(max_number + 1)))
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"[-+*/=]"), behavior="isolated"),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 4096
    return fast


def step_end_token_ids(tokenizer, delimiter: str) -> tuple[int, ...]:
    """Ids of every vocabulary token whose text contains the step delimiter.

    Works for BPE vocabularies too, where a delimiter may be merged into a longer token.
    """
    ids = []
    for tok_id in range(len(tokenizer)):
        if delimiter in tokenizer.decode([tok_id]):
            ids.append(tok_id)
    if not ids:
        raise ValueError(f"no token of the tokenizer contains the step delimiter {delimiter!r}: "
                         f"set algo.tree.steps.delimiter to text the model can emit (e.g. '\\n' or "
                         f"'\\n\\n')")
    return tuple(ids)


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """Every id that ends a response of this checkpoint: the tokenizer's EOS and each
    ``eos_token_id`` its ``generation_config.json`` and ``config.json`` declare (a folder
    ``tokenizer.name_or_path`` names). Qwen3 Base tokenizers name ``<|im_end|>`` while the model
    ends text with ``<|endoftext|>``: stopping on the tokenizer's alone runs every response to
    its length cap."""
    import json
    from pathlib import Path

    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if not path.is_file():
            continue
        declared = json.loads(path.read_text()).get("eos_token_id")
        for i in declared if isinstance(declared, list) else [declared]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    if not ids:
        raise ValueError(f"the checkpoint in {folder} declares no EOS token (tokenizer, "
                         f"generation_config.json, config.json): responses could never end; "
                         f"set eos_token in its tokenizer_config.json")
    return tuple(ids)


def before_stop(token_ids: list[int], stop_ids) -> list[int]:
    """``token_ids`` before the first stop token: the text a verifier reads (the stop token is
    trained on, never scored)."""
    for n, t in enumerate(token_ids):
        if t in stop_ids:
            return token_ids[:n]
    return token_ids
