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
