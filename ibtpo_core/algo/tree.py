"""The sampling tree (method.md §1): nodes are steps, root-to-leaf paths are trajectories.

A ``Tree`` holds one prompt's responses as a prefix tree of steps. Each node keeps its step's
token ids, the sampling policy's per-token log-probs and (where the engine exposes them)
per-token entropies; leaves keep the verifier's reward. Inserting a response walks down the
children whose step matches and branches where it differs, so a node is one state shared by
every trajectory through it. Also here: step segmentation, the JSON tree file format, and the
extraction of per-leaf training sequences with per-token advantages and step ids.

Pure: standard library, torch and numpy only. Knows nothing of engines, tokenizers or files
beyond the JSON text it parses.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class Node:
    id: int
    parent: int | None  # None for the root
    tokens: list[int]
    logprobs: list[float]
    entropies: list[float] | None = None
    reward: float | None = None  # leaves only
    final: bool = False  # holds the final answer (no branching inside or after it)
    children: list[int] = field(default_factory=list)

    @property
    def is_leaf(self) -> bool:
        return not self.children and self.parent is not None


@dataclass(frozen=True)
class StepSpec:
    """How a response is cut into steps (method.md §1)."""

    __pydantic_config__ = {"extra": "forbid"}  # config validation: unknown keys fail

    delimiter: str = "\n"
    min_step_tokens: int = 2
    max_step_tokens: int = 256

    def __post_init__(self):
        if self.min_step_tokens < 1:
            raise ValueError(f"min_step_tokens must be >= 1 (got {self.min_step_tokens})")
        if self.max_step_tokens < self.min_step_tokens:
            raise ValueError(f"max_step_tokens ({self.max_step_tokens}) must be >= "
                             f"min_step_tokens ({self.min_step_tokens})")


def split_steps(tokens: list[int], step_end_ids: set[int] | frozenset[int],
                min_tokens: int, max_tokens: int) -> list[tuple[int, int]]:
    """Cut ``tokens`` into step spans ``(start, end)``.

    A step ends after any token in ``step_end_ids`` or after ``max_tokens`` tokens. A step
    shorter than ``min_tokens`` merges into the next one; a short trailing piece (an EOS after
    the last delimiter, say) merges into the step before it.
    """
    spans, start = [], 0
    for i, tok in enumerate(tokens):
        length = i + 1 - start
        if (tok in step_end_ids and length >= min_tokens) or length >= max_tokens:
            spans.append((start, i + 1))
            start = i + 1
    if start < len(tokens):
        if (
            spans
            and len(tokens) - start < min_tokens
            and spans[-1][1] - spans[-1][0] + len(tokens) - start <= max_tokens
        ):
            spans[-1] = (spans[-1][0], len(tokens))
        else:
            spans.append((start, len(tokens)))
    return spans


class Tree:
    """One prompt's prefix tree of steps. ``nodes[0]`` is the root (its tokens: the prompt)."""

    def __init__(self, prompt: list[int], meta: dict | None = None):
        self.nodes: list[Node] = [Node(0, None, list(prompt), [])]
        self.meta = dict(meta or {})

    @property
    def root(self) -> Node:
        return self.nodes[0]

    def leaves(self) -> list[Node]:
        return [n for n in self.nodes if n.is_leaf]

    def path(self, node_id: int) -> list[int]:
        """Node ids from the root's first child down to ``node_id`` (the root excluded)."""
        out = []
        while node_id != 0:
            out.append(node_id)
            node_id = self.nodes[node_id].parent
        return out[::-1]

    def response_tokens(self, node_id: int) -> list[int]:
        """Every step token from the root's child down to and including ``node_id``."""
        return [t for i in self.path(node_id) for t in self.nodes[i].tokens]

    def prefix_tokens(self, node_id: int) -> list[int]:
        """Prompt + every step token down to and including ``node_id``."""
        return list(self.root.tokens) + self.response_tokens(node_id)

    def add_node(self, parent: int, tokens, logprobs, entropies=None, reward=None,
                 final=False) -> int:
        node = Node(len(self.nodes), parent, list(tokens), list(logprobs),
                    None if entropies is None else list(entropies), reward, final)
        self.nodes.append(node)
        self.nodes[parent].children.append(node.id)
        return node.id

    def insert(self, parent: int, tokens: list[int], logprobs: list[float],
               entropies: list[float] | None, reward: float, spans: list[tuple[int, int]],
               final_last: bool = True) -> int:
        """Attach a continuation of ``parent`` cut at ``spans``; returns the new leaf's id.

        Steps equal to an existing internal child's step are merged into it (the same state);
        the rest become new nodes. A continuation that repeats a whole existing path still adds
        its own leaf, so every sampled trajectory counts once.
        """
        if not spans:
            raise ValueError("a continuation needs at least one token to become a step")
        node = parent
        for k, (a, b) in enumerate(spans):
            last = k == len(spans) - 1
            step = tokens[a:b]
            match = None
            if not last:
                for c in self.nodes[node].children:
                    child = self.nodes[c]
                    if child.children and child.tokens == step:
                        match = c
                        break
            if match is not None:
                node = match
                continue
            ent = None if entropies is None else entropies[a:b]
            node = self.add_node(node, step, logprobs[a:b], ent,
                                 reward=reward if last else None, final=last and final_last)
        return node

    def split(self, node_id: int, offset: int) -> tuple[int, dict[int, int]]:
        """Cut node ``node_id``'s step before its token ``offset`` (0 < offset < its length):
        the node keeps the tokens before it and gets one child holding the rest (and the node's
        children, reward and final flag), so a branch can start at that token (a token-level
        fork, TreeRL's). Node ids are renumbered so that parents precede children; returns the
        first part's new id and the old -> new id map (``meta.picks`` is remapped)."""
        n = self.nodes[node_id]
        if not 0 < offset < len(n.tokens):
            raise ValueError(f"offset {offset} must be inside node {node_id}'s "
                             f"{len(n.tokens)} tokens")
        tail = Node(len(self.nodes), node_id, n.tokens[offset:], n.logprobs[offset:],
                    None if n.entropies is None else n.entropies[offset:], n.reward, n.final,
                    n.children)
        for c in tail.children:
            self.nodes[c].parent = tail.id
        self.nodes.append(tail)
        n.tokens, n.logprobs = n.tokens[:offset], n.logprobs[:offset]
        n.entropies = None if n.entropies is None else n.entropies[:offset]
        n.reward, n.final, n.children = None, False, [tail.id]
        remap = self._renumber()
        if "picks" in self.meta:
            self.meta["picks"] = [[r, remap[k]] for r, k in self.meta["picks"]]
        return remap[node_id], remap

    def _renumber(self) -> dict[int, int]:
        """Ids in depth-first preorder (children in order): parents precede children."""
        order, stack = [], [0]
        while stack:
            k = stack.pop()
            order.append(k)
            stack.extend(reversed(self.nodes[k].children))
        remap = {old: new for new, old in enumerate(order)}
        nodes = []
        for old in order:
            n = self.nodes[old]
            n.id = remap[old]
            n.parent = None if n.parent is None else remap[n.parent]
            n.children = [remap[c] for c in n.children]
            nodes.append(n)
        self.nodes = nodes
        return remap

    # --- the JSON tree file format -------------------------------------------------------
    def to_json(self) -> dict:
        nodes = []
        for n in self.nodes:
            d = {"id": n.id, "parent": n.parent, "tokens": n.tokens, "logprobs": n.logprobs}
            if n.entropies is not None:
                d["entropies"] = n.entropies
            if n.is_leaf:
                d["reward"] = n.reward
            if n.final:
                d["final"] = True
            nodes.append(d)
        return {"nodes": nodes, **({"meta": self.meta} if self.meta else {})}

    @classmethod
    def from_json(cls, obj) -> "Tree":  # noqa: C901 - one check per field, each with its message
        """Parse and validate a tree file's content; errors name the offending node."""
        if isinstance(obj, str):
            obj = json.loads(obj)
        raw = obj["nodes"] if isinstance(obj, dict) and "nodes" in obj else obj
        if not isinstance(raw, list) or not raw:
            raise ValueError("a tree file holds a non-empty list of nodes (or {'nodes': [...]})")
        by_id: dict = {}
        for i, d in enumerate(raw):
            if not isinstance(d, dict) or "id" not in d or "tokens" not in d:
                raise ValueError(f"node at position {i} needs at least 'id', 'parent' and 'tokens'")
            if d["id"] in by_id:
                raise ValueError(f"node {d['id']!r} appears twice")
            by_id[d["id"]] = d
        roots = [d["id"] for d in raw if d.get("parent") is None]
        if len(roots) != 1:
            raise ValueError(f"a tree has exactly one root (a node with parent null); found "
                             f"{len(roots)}: {roots[:5]}")
        children: dict = {k: [] for k in by_id}
        for d in raw:
            p = d.get("parent")
            if p is not None:
                if p not in by_id:
                    raise ValueError(f"node {d['id']!r} names parent {p!r}, which does not exist")
                children[p].append(d["id"])
        # walk from the root: nodes not reached sit on a cycle (every node has one parent)
        order, stack = [], [roots[0]]
        while stack:
            k = stack.pop()
            order.append(k)
            stack.extend(reversed(children[k]))
        if len(order) != len(raw):
            stray = sorted(set(by_id) - set(order), key=str)
            raise ValueError(f"nodes {stray[:5]} are not reachable from the root: their parent "
                             f"links form a cycle")
        tree = cls.__new__(cls)
        tree.meta = dict(obj.get("meta", {})) if isinstance(obj, dict) else {}
        tree.nodes = []
        new_id = {}
        for k in order:
            d = by_id[k]
            toks, lps = list(d["tokens"]), list(d.get("logprobs", []))
            ents = d.get("entropies")
            is_root = d.get("parent") is None
            if is_root and not ents:  # a prompt was not sampled: no log-probs, no entropies
                ents = None
            if not is_root and len(lps) != len(toks):
                raise ValueError(f"node {k!r} has {len(toks)} tokens but {len(lps)} logprobs: "
                                 f"give one log-prob per token")
            if ents is not None and len(ents) != len(toks):
                raise ValueError(f"node {k!r} has {len(toks)} tokens but {len(ents)} entropies")
            leaf = not children[k] and not is_root
            if leaf and d.get("reward") is None:
                raise ValueError(f"leaf node {k!r} has no reward: every leaf needs 'reward'")
            new_id[k] = len(tree.nodes)
            tree.nodes.append(
                Node(
                    new_id[k],
                    None if is_root else new_id[d["parent"]],
                    toks,
                    lps,
                    None if ents is None else list(ents),
                    float(d["reward"]) if leaf else None,
                    bool(d.get("final", False)),
                )
            )
        for n in tree.nodes[1:]:
            tree.nodes[n.parent].children.append(n.id)
        tree.meta["original_ids"] = [by_id[k]["id"] for k in order]
        return tree


@dataclass
class TrainingSequence:
    """One leaf's trajectory as a training example."""

    prompt: list[int]
    tokens: list[int]  # the response: every step token root -> leaf
    old_logprobs: list[float]
    advantages: list[float]  # per response token
    step_ids: list[int]  # node id of the step each token belongs to
    reward: float


def training_sequences(tree: Tree, node_advantage: list[float]) -> list[TrainingSequence]:
    """One sequence per leaf; every token of step s carries ``node_advantage[s]``."""
    out = []
    for leaf in tree.leaves():
        toks, lps, adv, sid = [], [], [], []
        for i in tree.path(leaf.id):
            n = tree.nodes[i]
            toks += n.tokens
            lps += n.logprobs
            adv += [float(node_advantage[i])] * len(n.tokens)
            sid += [i] * len(n.tokens)
        out.append(
            TrainingSequence(list(tree.root.tokens), toks, lps, adv, sid, float(leaf.reward))
        )
    return out
