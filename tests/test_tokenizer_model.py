"""The built-in tokenizer and the tiny model: saved and loaded through the HF auto classes."""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ibtpo_core.data.prompts import encode_prompt, encode_response
from ibtpo_core.data.tokenizer import build_tokenizer, step_end_token_ids


def test_tokenizer_round_trip_and_specials(tmp_path):
    build_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.eos_token == "<eos>" and tok.pad_token == "<pad>"
    assert tok.eos_token_id != tok.pad_token_id
    text = "nums 4 1 6 6 target 32\n6 * 6 = 36\n36 - 4 = 32\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # nums 4 1 6 6 target 32 \n = 8 tokens, then 6 tokens a step
    assert len(ids) == 8 + 6 + 6
    assert tok.unk_token_id not in ids
    assert tok(tok.decode(ids), add_special_tokens=False)["input_ids"] == ids
    assert tok.decode(ids).split() == text.split()


def test_chat_template_passes_the_prompt_through(tmp_path):
    build_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.chat_template
    prompt = "nums 1 2 3 4 target 10\n"
    assert encode_prompt(tok, prompt) == tok(prompt, add_special_tokens=False)["input_ids"]
    assert encode_response(tok, "1 + 2 = 3\n")[-1] == tok.eos_token_id


def test_step_end_tokens_are_the_newline():
    tok = build_tokenizer()
    assert step_end_token_ids(tok, "\n") == (tok.convert_tokens_to_ids("\n"),)


def test_model_save_load_round_trip(tiny_model_dir, tmp_path):
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert (tmp_path / "x").exists() is False
    m.save_pretrained(tmp_path / "x")
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "x").iterdir())
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in (tmp_path / "x").iterdir())
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "x")
    ids = torch.tensor([[4, 12, 13, 5, 20, 3]])
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, m2(ids).logits)
    n = sum(p.numel() for p in m.parameters())
    assert 10_000 < n < 5_000_000
