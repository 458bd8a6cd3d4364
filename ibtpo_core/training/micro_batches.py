"""How one mini-batch of training sequences is cut into micro-batches on each rank: by a count of
sequences, or by a budget of padded tokens with sequences grouped by length; every rank runs the
same number of micro-batches. Knows nothing of models or DeepSpeed.
"""
from __future__ import annotations


def rank_micro_batches(mini: list, rank: int, world: int, size: int,
                       max_tokens: int = 0) -> list[tuple[list, float]]:
    """This rank's micro-batches of one mini-batch, each with its loss weight (1 or 0).

    Every rank runs the same number of micro-batches, the number the largest shard needs: each
    step of the DeepSpeed engine is a collective, and a rank with one step fewer (17 sequences
    on 2 ranks at 8 a micro-batch: 9 and 8) left its peer waiting in a reduction and aborted the
    launch. Without ``max_tokens`` a rank's shard is split as evenly as ``size`` sequences
    allow; with it, the shard is sorted by length and packed so that no micro-batch holds more
    than ``max_tokens`` padded tokens (its longest sequence x its count) or ``size`` sequences
    (a sequence longer than the budget goes alone). A rank with fewer micro-batches than the
    others repeats its shortest sequence with weight 0 (it joins the collective and adds
    nothing).
    """
    shards = [mini[r::world] for r in range(world)]
    if max_tokens:
        packed = [_pack_by_tokens(sh, size, max_tokens) for sh in shards]
        count = max(len(p) for p in packed)
        mine, shard = packed[rank], shards[rank]
        filler = min(shard, key=_length, default=None)
        return [(c, 1.0) for c in mine] + [([filler], 0.0)] * (count - len(mine))
    shard = shards[rank]
    per_rank = (len(mini) + world - 1) // world  # ceil(len / world)
    count = (per_rank + size - 1) // size  # micro-batches of every rank
    chunks = [shard[i * len(shard) // count:(i + 1) * len(shard) // count] for i in range(count)]
    return [(c, 1.0) if c else (shard[:1], 0.0) for c in chunks]


def _length(seq) -> int:
    return len(seq.prompt) + len(seq.tokens)


def _pack_by_tokens(shard: list, size: int, max_tokens: int) -> list[list]:
    """``shard`` longest first, cut into micro-batches of at most ``max_tokens`` padded tokens
    and ``size`` sequences."""
    out: list[list] = []
    for seq in sorted(shard, key=_length, reverse=True):
        cur = out[-1] if out else None
        # the first sequence of a micro-batch is its longest: padded size = that x count
        if cur is not None and len(cur) < size and _length(cur[0]) * (len(cur) + 1) <= max_tokens:
            cur.append(seq)
        else:
            out.append([seq])
    return out
