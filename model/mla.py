"""Multi-head latent attention (DeepSeek-V2/V3).

Per token, keys and values come from one compressed latent c = RMSNorm(W_dkv x) (kv_lora_rank wide) plus one
decoupled rotary key k_pe shared by all heads; queries come from x directly (q_proj) or through a low-rank
bottleneck (q_a_proj -> q_a_layernorm -> q_b_proj). Shapes: B batch, T new tokens, S keys, H heads,
Dn/Dr/Dv = qk_nope/qk_rope/v head dims, C = kv_lora_rank.

Two ways to attend, same result:
  plain     expands the latent with kv_b_proj into per-head keys/values and runs SDPA; best for training and
            prefill, where T is about S.
  absorbed  never expands: q_nope is folded through the key half of kv_b_proj into latent space
            (q_lat = q_nope W_uk, (B, T, H, C)), scores are [q_lat | q_pe] . [c | k_pe] against the cache
            directly, and the weighted latent is mapped out through the value half (W_uv) per head. Every
            head shares the latent, so all T*H query rows hit the cache in one matmul. Best for decoding
            (T small, S large).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .cache import LatentCache
from .norm import RMSNorm
from .rope import apply_rope, softmax_scale


class MLA(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads = H = cfg.num_attention_heads
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        D, bias = cfg.hidden_size, cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(
                cfg.q_lora_rank
            )  # eps 1e-6 regardless of rms_norm_eps, as in DeepSeek
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, D, bias=bias)
        self.softmax_scale = softmax_scale(qk_head_dim, cfg.rope_scaling)
        self.rope_interleaved = cfg.rope_interleave

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: LatentCache | None = None,
        layer_idx: int = 0,
        absorb: bool = False,
    ) -> torch.Tensor:
        """x (B, T, D); cos/sin (B, T, Dr/2); mask (B, 1, T, S) bool, True = may attend, or None for plain
        causal attention without a cache. With a cache, this layer's new latents are written at its length."""
        B, T, _ = x.shape
        H, Dn, Dr, C = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, H, Dn + Dr)
        q_nope, q_pe = q.split([Dn, Dr], dim=-1)  # (B, T, H, Dn), (B, T, H, Dr)
        q_pe = apply_rope(q_pe, cos, sin, self.rope_interleaved)

        kv, k_pe = self.kv_a_proj_with_mqa(x).split([C, Dr], dim=-1)  # (B, T, C), (B, T, Dr)
        kv = self.kv_a_layernorm(kv)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin, self.rope_interleaved).squeeze(2)

        if cache is not None:
            latent = cache.update_latent(layer_idx, kv, k_pe).to(q.dtype)  # (B, S, C + Dr), S = cached + T
        else:
            latent = torch.cat((kv, k_pe), dim=-1) if absorb else None
        if absorb:
            out = self._absorbed(q_nope, q_pe, latent, mask)
        else:
            if latent is not None:
                kv, k_pe = latent[..., :C], latent[..., C:]
            out = self._plain(q_nope, q_pe, kv, k_pe, mask)
        return self.o_proj(out.reshape(B, T, H * self.v_head_dim))

    def _plain(self, q_nope, q_pe, kv, k_pe, mask) -> torch.Tensor:
        """Expands the latent into per-head keys/values. Returns (B, T, H, Dv)."""
        B, S, _ = kv.shape
        H, Dn, Dv, Dr = self.num_heads, self.qk_nope_head_dim, self.v_head_dim, self.qk_rope_head_dim
        k_nope, v = self.kv_b_proj(kv).view(B, S, H, Dn + Dv).split([Dn, Dv], dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(B, S, H, Dr)), dim=-1)  # (B, S, H, Dn + Dr)
        q = torch.cat((q_nope, q_pe), dim=-1)  # (B, T, H, Dn + Dr)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),  # (B, H, T|S, D)
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.softmax_scale,
        )  # (B, H, T, Dv)
        return out.transpose(1, 2)

    def _absorbed(self, q_nope, q_pe, latent, mask) -> torch.Tensor:
        """Attends on the latent directly. latent (B, S, C + Dr). Returns (B, T, H, Dv)."""
        B, T, H, _ = q_nope.shape
        S, C, Dn = latent.shape[1], self.kv_lora_rank, self.qk_nope_head_dim
        w = self.kv_b_proj.weight.view(H, Dn + self.v_head_dim, C)
        w_uk, w_uv = w[:, :Dn], w[:, Dn:]  # (H, Dn, C), (H, Dv, C): views, nothing copied
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # (B, T, H, C)
        q_cat = (
            torch.cat((q_lat, q_pe), dim=-1).reshape(B, T * H, -1) * self.softmax_scale
        )  # (B, T*H, C + Dr)
        scores = torch.matmul(q_cat, latent.transpose(1, 2)).view(B, T, H, S)  # (B, T, H, S)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, 0, :, None, :], torch.finfo(scores.dtype).min)
        probs = scores.float().softmax(dim=-1).to(latent.dtype)
        out_lat = torch.matmul(probs.view(B, T * H, S), latent[..., :C])  # (B, T*H, C)
        return torch.einsum("bthc,hvc->bthv", out_lat.view(B, T, H, C), w_uv)  # (B, T, H, Dv)
