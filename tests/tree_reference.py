"""A plain per-node loop over one Tree: the oracle the vectorised code is tested against.
Written straight from method.md §2 and §4, one node at a time, no tensors."""
import math


def reference(tree, beta=1.0, estimator="token_entropy", local="log_ratio", alpha=1.0):  # noqa: C901 - a plain loop on purpose
    nodes = tree.nodes
    out = {}

    def leaves(i):
        ch = nodes[i].children
        return [i] if not ch and nodes[i].parent is not None else [l for c in ch for l in leaves(c)]

    for node in nodes:
        ls = leaves(node.id)
        n = len(ls)
        c = sum(nodes[l].reward for l in ls)
        out[node.id] = {"n": n, "c": c, "V": c / n if n else 0.0}
    for node in nodes:
        ch = node.children
        if not ch:
            out[node.id].update(H=None, I=None, IB=None)
            continue
        means = []
        for k in ch:
            vals = (nodes[k].entropies if estimator == "token_entropy"
                    else [-x for x in nodes[k].logprobs])
            if vals:
                means.append(sum(vals) / len(vals))
        H = sum(means) / len(means) if means else 0.0
        V = out[node.id]["V"]
        I = 0.0
        if len(ch) >= 2 and V > 0:
            tot = sum(out[k]["n"] for k in ch)
            for k in ch:
                r = out[k]["V"] / V
                if r > 0:
                    I += out[k]["n"] / tot * r * math.log(r)
        out[node.id].update(H=H, I=max(I, 0.0), IB=H + beta * max(I, 0.0))
    for node in nodes:
        if node.parent is None:
            out[node.id].update(A_GL=None, A_IB=None, A=None)
            continue
        V, Vp, Vr = out[node.id]["V"], out[node.parent]["V"], out[0]["V"]
        a_gl = V - Vr
        if local == "diff":
            a_ib = V - Vp
        elif Vp == 0:
            a_ib = 0.0
        elif V == 0:
            a_ib = -2.0
        else:
            a_ib = max(-2.0, min(2.0, math.log(V / Vp)))
        out[node.id].update(
            A_GL=a_gl, A_IB=a_ib, A=(a_gl + alpha * a_ib) / math.sqrt(out[node.id]["n"])
        )
    return out
