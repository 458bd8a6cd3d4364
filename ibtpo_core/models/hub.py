"""A model given by hub id (``Qwen/Qwen3-1.7B-Base``) resolved to a local snapshot folder, so the
pipeline always loads, digests and reloads checkpoints from disk.

Downloads only the files a checkpoint needs (config, weights as safetensors, tokenizer, chat
template). With ``HF_HUB_OFFLINE=1`` only the local hub cache is read.
"""
from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt", "*.model"]


def resolve_model_path(path: str) -> str:
    """``path`` itself if it is a folder; else the local snapshot of the hub model ``path``."""
    if Path(path).exists() or not HUB_ID.match(path):
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=path, allow_patterns=PATTERNS)
    except Exception as err:  # noqa: BLE001 - offline, missing or gated: one message with the fix
        raise FileNotFoundError(
            f"model.path {path!r} is neither a local folder nor a hub model that can be "
            f"fetched ({type(err).__name__}: {str(err)[:200]}); download it first "
            f"(`hf download {path}` with HF_HUB_OFFLINE unset) or pass a local folder") from None
