"""The model of the GPU check: a randomly initialised Qwen3-architecture checkpoint with Qwen3's
real vocabulary (151,936 rows), so the update's memory is what a Qwen3 run's would be per token,
over the built-in tokenizer (ids past its 267 tokens decode to nothing). Its
generation_config.json declares a second end-of-text id, as Qwen3 Base does. Needs no download.

    python bench/check_model.py OUT_DIR [--hidden 1024] [--layers 8]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

VOCAB = 151_936


def make(out: str, hidden: int, layers: int, max_len: int = 16384) -> int:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ibtpo_core.data.tokenizer import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    heads = max(2, hidden // 128)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=3 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 2), head_dim=hidden // heads,
                      max_position_embeddings=max_len, tie_word_embeddings=False,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None)
    model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tok.model_max_length = max_len
    tok.save_pretrained(out)
    gen = Path(out) / "generation_config.json"
    declared = json.loads(gen.read_text()) if gen.is_file() else {}
    declared["eos_token_id"] = [tok.eos_token_id, VOCAB - 1]  # the model's own end of text
    gen.write_text(json.dumps(declared, indent=1))
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    n = make(args.out, args.hidden, args.layers)
    print(f"check model: {n / 1e6:.0f}M parameters, vocabulary {VOCAB}, in {args.out}")


if __name__ == "__main__":
    main()
