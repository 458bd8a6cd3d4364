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
    """Keys and values of every layer, ``(L, B, T_cap, H_kv, D)`` each."""

    def __init__(self, layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (layers, batch, capacity, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def expand_rows(self, index: torch.Tensor) -> None:
        """Reorder / repeat rows: row b becomes old row ``index[b]``."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)

    def rows(self, b: int, length: int) -> torch.Tensor:
        """Row b's first ``length`` positions as one ``(length, 2, L, H_kv, D)`` tensor."""
        return torch.stack((self.k[:, b, :length], self.v[:, b, :length]), 0).permute(2, 0, 1, 3, 4).clone()

    def load_rows(self, b: int, kv: torch.Tensor, length: int) -> None:
        """Write a stored ``(len, 2, L, H_kv, D)`` tensor's first ``length`` positions into row b."""
        part = kv[:length].permute(1, 2, 0, 3, 4)  # (2, L, length, H, D)
        self.k[:, b, :length] = part[0]
        self.v[:, b, :length] = part[1]


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
        self.refresh()

    @property
    def num_layers(self) -> int:
        return len(self.model.model.layers)

    def refresh(self) -> None:
        """Rebuild the fused weights from the model's current parameters (after a weight load)."""
        self.fused = []
        for layer in self.model.model.layers:
            at, mlp = layer.self_attn, layer.mlp
            w_qkv = torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight], 0)
            b_qkv = (torch.cat([at.q_proj.bias, at.k_proj.bias, at.v_proj.bias], 0)
                     if at.q_proj.bias is not None else None)
            w_gu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 0)
            self.fused.append((w_qkv.detach(), None if b_qkv is None else b_qkv.detach(),
                               w_gu.detach()))

    def new_buffer(self, batch: int, capacity: int) -> KVBuffer:
        p = self.model.model.embed_tokens.weight
        return KVBuffer(self.num_layers, batch, capacity, self.n_kv, self.head_dim, p.dtype, p.device)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, buf: KVBuffer,
                last_index: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ``tokens`` (B, S) at absolute ``positions`` (B, S); write their keys/values.

        Every row must already hold keys/values for all positions before its first one.
        Returns logits (B, V) at column ``last_index[b]`` of each row (default: the last column).
        """
        m = self.model.model
        B, S = tokens.shape
        x = m.embed_tokens(tokens)  # (B, S, E)
        cos, sin = m.rotary_emb(x, positions)  # (B, S, D)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, S, 1, D)
        t_cur = int(positions.max()) + 1
        key_pos = torch.arange(t_cur, device=tokens.device)
        mask = (key_pos.view(1, 1, 1, t_cur) <= positions.view(B, 1, S, 1))  # (B, 1, S, T)
        rows = torch.arange(B, device=tokens.device).unsqueeze(1).expand(B, S)
        hq, hk, d = self.n_heads, self.n_kv, self.head_dim
        for li, layer in enumerate(m.layers):
            w_qkv, b_qkv, w_gu = self.fused[li]
            at = layer.self_attn
            h = layer.input_layernorm(x)
            qkv = F.linear(h, w_qkv, b_qkv)
            q = qkv[..., : hq * d].view(B, S, hq, d)
            k = qkv[..., hq * d: (hq + hk) * d].view(B, S, hk, d)
            v = qkv[..., (hq + hk) * d:].view(B, S, hk, d)
            if hasattr(at, "q_norm"):
                q, k = at.q_norm(q), at.k_norm(k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            buf.k[li][rows, positions] = k
            buf.v[li][rows, positions] = v
            keys = buf.k[li, :, :t_cur].transpose(1, 2)  # (B, Hk, T, D)
            vals = buf.v[li, :, :t_cur].transpose(1, 2)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys, vals, attn_mask=mask, scale=self.scale,
                enable_gqa=hq != hk)  # (B, Hq, S, D)
            x = x + at.o_proj(out.transpose(1, 2).reshape(B, S, hq * d))
            h = layer.post_attention_layernorm(x)
            gate, up = F.linear(h, w_gu).chunk(2, dim=-1)
            x = x + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
        if last_index is None:
            x = x[:, -1]
        else:
            x = x[torch.arange(B, device=x.device), last_index]
        return self.model.lm_head(m.norm(x)).float()  # (B, V)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
