"""A token trie over sequences whose key/value tensors are kept, for prefix reuse.

When the tree sampler branches from a node, the prefix (prompt + path) was already fed through
the model while sampling an earlier trajectory. The store finds the longest stored sequence that
shares the prefix and hands back its key/value tensors, so only the rest is recomputed.
Key/values at position p depend only on tokens 0..p (causal attention), so a stored sequence's
first m positions serve any prefix that matches it for m tokens.
Knows nothing of models: it stores whatever tensors the engine gives it.
"""
from __future__ import annotations

import torch


class PrefixStore:
    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.tokens = 0
        self.clear()

    def clear(self) -> None:
        self._root: dict = {}
        self._kv: list[torch.Tensor] = []
        self.tokens = 0

    def insert(self, seq: list[int], kv: torch.Tensor) -> None:
        """Keep ``kv`` (any tensor whose dim 0 indexes the positions of ``seq``)."""
        if len(seq) == 0 or len(seq) > self.max_tokens:
            return
        if self.tokens + len(seq) > self.max_tokens:
            self.clear()  # cheap and rare; a bounded LRU is not worth its bookkeeping here
        entry = len(self._kv)
        self._kv.append(kv)
        self.tokens += len(seq)
        node = self._root
        for tok in seq:
            child = node.get(tok)
            if child is None:
                child = node[tok] = {None: entry}
            node = child

    def lookup(self, prefix: list[int]) -> tuple[torch.Tensor | None, int]:
        """``(kv, m)``: kv of a stored sequence matching ``prefix[:m]``, m as large as possible."""
        node, m, entry = self._root, 0, None
        for tok in prefix:
            child = node.get(tok)
            if child is None:
                break
            node, m, entry = child, m + 1, child[None]
        if entry is None:
            return None, 0
        return self._kv[entry], m
