"""A lean incremental forward pass over the weights of a Hugging Face Llama-family model.

Llama, Qwen2/2.5, Qwen3, Mistral (without sliding window) and SmolLM2 share one decoder block:
RMSNorm -> attention with rotary positions (Qwen3 adds per-head q/k RMSNorm) -> residual ->
RMSNorm -> gated MLP -> residual. This module runs that block over the HF model's own modules
and weights, with a preallocated key/value buffer and per-row positions, so that rows with
different prefix lengths (ragged, no padding shifts) decode together. It skips what
``model.generate`` spends time on (cache objects, mask builders, logits processors) and fuses the
q/k/v and gate/up projections. The rotary tables come from the model's own ``rotary_emb``, so any
rope scaling the config asks for is honoured. Matches the HF forward to float rounding.

Knows nothing of sampling, stop conditions or trees: it maps (tokens, positions, cache) to logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")


class KVBuffer:
    """Keys and values of every layer, ``(L, B, H_kv, T_cap, D)`` each: a slice over positions
    is a strided batch of contiguous rows, which ``bmm`` reads without a copy."""

    def __init__(self, layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (layers, batch, kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def expand_rows(self, index: torch.Tensor) -> None:
        """Reorder / repeat rows: row b becomes old row ``index[b]``."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)

    def rows(self, b: int, length: int) -> torch.Tensor:
        """Row b's first ``length`` positions as one ``(length, 2, L, H_kv, D)`` tensor."""
        kv = torch.stack(
            (self.k[:, b, :, :length], self.v[:, b, :, :length]), 0
        )  # (2, L, H, len, D)
        return kv.permute(3, 0, 1, 2, 4).clone()

    def load_rows(self, b: int, kv: torch.Tensor, length: int) -> None:
        """Write a stored ``(len, 2, L, H_kv, D)`` tensor's first ``length`` positions into
        row b."""
        part = kv[:length].permute(1, 2, 3, 0, 4)  # (2, L, H, length, D)
        self.k[:, b, :, :length] = part[0]
        self.v[:, b, :, :length] = part[1]


class LeanDecoder:
    """Incremental forward of a Llama-family ``*ForCausalLM`` using its own modules."""

    def __init__(self, model: torch.nn.Module):
        cfg = model.config
        if cfg.model_type not in SUPPORTED:
            raise ValueError(
                f"the hf engine's fast path supports model types {', '.join(SUPPORTED)}; "
                f"{cfg.model_type!r} is not one of them: use engine: vllm for other architectures")
        if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
            raise ValueError("sliding-window attention is not supported by the hf engine's fast "
                             "path: set use_sliding_window: false or use engine: vllm")
        self.model = model
        self.cfg = cfg
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.qk_norm = hasattr(model.model.layers[0].self_attn, "q_norm")
        act = getattr(cfg, "hidden_act", "silu")
        self.act = F.silu if act in ("silu", "swish") else None  # None: the model's own act_fn
        # rotary tables for every position, computed once by the model's own rotary module
        # (rope scaling honoured); a dynamic rope type recomputes them per call instead
        rot = model.model.rotary_emb
        self.dynamic_rope = "dynamic" in str(getattr(rot, "rope_type", "default"))
        self.cos_table = self.sin_table = None
        if not self.dynamic_rope:
            p = model.model.embed_tokens.weight
            pos = torch.arange(cfg.max_position_embeddings, device=p.device)[None]
            with torch.no_grad():
                cos, sin = rot(p[:1, None].expand(1, pos.shape[1], -1), pos)
            self.cos_table, self.sin_table = cos[0], sin[0]  # (T_max, D)
        self.refresh()

    @property
    def num_layers(self) -> int:
        return len(self.model.model.layers)

    def refresh(self) -> None:
        """Rebuild the fused weights from the model's current parameters (after a weight load)."""
        self.fused = []
        m = self.model.model
        self.norm_w = [
            (
                l.input_layernorm.weight.detach(),
                _eps(l.input_layernorm),
                l.post_attention_layernorm.weight.detach(),
                _eps(l.post_attention_layernorm),
            )
            for l in m.layers
        ]
        self.final_norm = (m.norm.weight.detach(), _eps(m.norm))
        d = self.head_dim
        for layer in self.model.model.layers:
            at, mlp = layer.self_attn, layer.mlp
            ws = [at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]
            bs = [at.q_proj.bias, at.k_proj.bias, at.v_proj.bias]
            if not self.qk_norm:
                # rotate_half(W x) = (P W) x for a signed permutation P of each head's rows, so
                # the rotated q and k come out of the same matmul (exact)
                ws += [_rotate_rows(at.q_proj.weight, d), _rotate_rows(at.k_proj.weight, d)]
                if at.q_proj.bias is not None:
                    bs += [_rotate_rows(at.q_proj.bias, d), _rotate_rows(at.k_proj.bias, d)]
            w_qkv = torch.cat(ws, 0).detach()
            b_qkv = torch.cat(bs, 0).detach() if at.q_proj.bias is not None else None
            w_gu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 0).detach()
            o_b = None if at.o_proj.bias is None else at.o_proj.bias.detach()
            self.fused.append((w_qkv, b_qkv, w_gu, at.o_proj.weight.detach(), o_b,
                               mlp.down_proj.weight.detach()))

    def new_buffer(self, batch: int, capacity: int) -> KVBuffer:
        p = self.model.model.embed_tokens.weight
        return KVBuffer(
            self.num_layers, batch, capacity, self.n_kv, self.head_dim, p.dtype, p.device
        )

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, buf: KVBuffer,
                last_index: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ``tokens`` (B, S) at absolute ``positions`` (B, S); write their keys/values.

        Every row must already hold keys/values for all positions before its first one.
        Returns logits (B, vocab) at column ``last_index[b]`` of each row (default: the last
        column).
        """
        m = self.model.model
        B, S = tokens.shape
        x = m.embed_tokens(tokens)  # (B, S, E)
        if self.dynamic_rope:
            cos, sin = m.rotary_emb(x, positions)  # (B, S, D)
        else:
            cos, sin = self.cos_table[positions], self.sin_table[positions]
        cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)  # (B, S, 1, D)
        t_cur = int(positions.max()) + 1
        key_pos = torch.arange(t_cur, device=tokens.device)
        mask = (key_pos.view(1, 1, 1, t_cur) <= positions.view(B, 1, S, 1))  # (B, 1, S, T)
        rows = torch.arange(B, device=tokens.device).unsqueeze(1).expand(B, S)
        hq, hk, d = self.n_heads, self.n_kv, self.head_dim
        E = x.shape[-1]
        decode = S == 1
        if decode:  # additive mask for the plain-matmul attention below
            neg = torch.zeros(B, 1, 1, t_cur, dtype=x.dtype, device=x.device)
            neg.masked_fill_(~mask, float("-inf"))
        for li, layer in enumerate(m.layers):
            w_qkv, b_qkv, w_gu, w_o, b_o, w_down = self.fused[li]
            w_in, eps_in, w_post, eps_post = self.norm_w[li]
            at = layer.self_attn
            h = F.rms_norm(x, (E,), w_in, eps_in)
            qkv = F.linear(h, w_qkv, b_qkv)
            n_qk = (hq + hk) * d
            qk = qkv[..., :n_qk].view(B, S, hq + hk, d)
            v = qkv[..., n_qk: n_qk + hk * d].view(B, S, hk, d)
            if self.qk_norm:
                qk = torch.cat(
                    (
                        F.rms_norm(qk[:, :, :hq], (d,), at.q_norm.weight, _eps(at.q_norm)),
                        F.rms_norm(qk[:, :, hq:], (d,), at.k_norm.weight, _eps(at.k_norm)),
                    ),
                    2,
                )
                qk = qk * cos + _rotate_half(qk) * sin
            else:
                qk_rot = qkv[..., n_qk + hk * d:].view(B, S, hq + hk, d)
                qk = qk * cos + qk_rot * sin
            q, k = qk[:, :, :hq], qk[:, :, hq:]
            buf.k[li][rows, :, positions] = k  # (B, S, Hk, D) into (B, Hk, T, D)
            buf.v[li][rows, :, positions] = v
            keys = buf.k[li, :, :, :t_cur]  # (B, Hk, T, D)
            vals = buf.v[li, :, :, :t_cur]
            if decode:
                if hq != hk:
                    keys = keys.repeat_interleave(hq // hk, dim=1)
                    vals = vals.repeat_interleave(hq // hk, dim=1)
                att = torch.matmul(q.transpose(1, 2), keys.transpose(2, 3)) * self.scale + neg
                out = torch.matmul(torch.softmax(att, dim=-1), vals)  # (B, Hq, 1, D)
            else:
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), keys, vals, attn_mask=mask, scale=self.scale,
                    enable_gqa=hq != hk)  # (B, Hq, S, D)
            x = x + F.linear(out.transpose(1, 2).reshape(B, S, hq * d), w_o, b_o)
            h = F.rms_norm(x, (E,), w_post, eps_post)
            gate, up = F.linear(h, w_gu).chunk(2, dim=-1)
            gate = self.act(gate) if self.act is not None else layer.mlp.act_fn(gate)
            x = x + F.linear(gate * up, w_down)
        if last_index is None:
            x = x[:, -1]
        else:
            x = x[torch.arange(B, device=x.device), last_index]
        w_n, eps_n = self.final_norm
        return self.model.lm_head(F.rms_norm(x, (E,), w_n, eps_n)).float()  # (B, vocab)


def _eps(norm: torch.nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _rotate_rows(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a projection (or bias) permuted and signed so that its output is
    ``rotate_half`` of the original projection's output, head by head."""
    shape = w.shape
    w = w.reshape(-1, head_dim, *shape[1:])  # (H, D, ...)
    half = head_dim // 2
    return torch.cat((-w[:, half:], w[:, :half]), 1).reshape(shape)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
