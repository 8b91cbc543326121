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
        """x (B, T, D); cos/sin (B, T, Dr/2). mask: for the plain path (B, 1, T, S) bool, True = may attend, or
        None for causal attention without a cache; for the absorbed path the additive bias of `absorbed_bias`
        (built once per forward, shared by the layers) or None. With a cache, this layer's new latents are
        written at its length."""
        B, T, _ = x.shape
        C = self.kv_lora_rank
        q_nope, q_pe, kv, k_pe = self._project(x, cos, sin)
        if cache is not None:
            latent = _as(cache.update_latent(layer_idx, kv, k_pe), q_nope.dtype)  # (B, S, C + Dr), S = cached + T
        else:
            latent = torch.cat((kv, k_pe), dim=-1) if absorb else None
        if absorb:
            out = self._absorbed(q_nope, q_pe, latent, mask)
        else:
            if latent is not None:
                kv, k_pe = latent[..., :C], latent[..., C:]
            k, v = self._expand(kv, k_pe)
            out = self._attend(torch.cat((q_nope, q_pe), dim=-1), k, v, mask)
        return self.o_proj(out.reshape(B, T, self.num_heads * self.v_head_dim))

    def forward_shared(
        self,
        x_prefix: torch.Tensor,
        x: torch.Tensor,
        rope_prefix: tuple[torch.Tensor, torch.Tensor],
        rope: tuple[torch.Tensor, torch.Tensor],
        mask_prefix: torch.Tensor,
        mask: torch.Tensor,
        group_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows in groups of `group_size` that share their first Tp tokens, given once per group.

        x_prefix (P, Tp, D) the shared tokens; x (P*G, Tc, D) each row's own tokens; rope_* their (cos, sin);
        mask_prefix (P, 1, Tp, Tp) and mask (P*G, 1, Tc, Tp + Tc) bool. The prefix is projected and its keys and
        values expanded once per group; each row's queries attend to [its group's prefix | its own tokens].
        Returns the attention outputs for x_prefix (P, Tp, D) and x (P*G, Tc, D).
        """
        (P, Tp, _), (N, Tc, _) = x_prefix.shape, x.shape
        HDv = self.num_heads * self.v_head_dim
        q_nope_p, q_pe_p, kv_p, k_pe_p = self._project(x_prefix, *rope_prefix)
        q_nope, q_pe, kv, k_pe = self._project(x, *rope)
        k_p, v_p = self._expand(kv_p, k_pe_p)  # (P, Tp, H, Dn + Dr), (P, Tp, H, Dv)
        out_p = self._attend(torch.cat((q_nope_p, q_pe_p), dim=-1), k_p, v_p, mask_prefix)
        k_own, v_own = self._expand(kv, k_pe)  # (N, Tc, H, .)
        k = torch.cat((k_p.repeat_interleave(group_size, dim=0), k_own), dim=1)  # (N, Tp + Tc, H, Dn + Dr)
        v = torch.cat((v_p.repeat_interleave(group_size, dim=0), v_own), dim=1)
        out = self._attend(torch.cat((q_nope, q_pe), dim=-1), k, v, mask)
        return self.o_proj(out_p.reshape(P, Tp, HDv)), self.o_proj(out.reshape(N, Tc, HDv))

    def _project(self, x, cos, sin):
        """x (B, T, D) -> q_nope (B, T, H, Dn), roped q_pe (B, T, H, Dr), normalised latent kv (B, T, C), roped
        shared key k_pe (B, T, Dr)."""
        B, T, _ = x.shape
        H, Dn, Dr, C = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, H, Dn + Dr)
        q_nope, q_pe = q.split([Dn, Dr], dim=-1)  # (B, T, H, Dn), (B, T, H, Dr)
        kv, k_pe = self.kv_a_proj_with_mqa(x).split([C, Dr], dim=-1)  # (B, T, C), (B, T, Dr)
        kv = self.kv_a_layernorm(kv)
        # The shared key rides along as head H: one rotation for queries and key (fewer kernels per layer).
        pe = apply_rope(torch.cat((q_pe, k_pe.unsqueeze(2)), dim=2), cos, sin, self.rope_interleaved)
        return q_nope, pe[:, :, :H], kv, pe[:, :, H]

    def _expand(self, kv, k_pe) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent kv (B, S, C), k_pe (B, S, Dr) -> per-head keys (B, S, H, Dn + Dr) and values (B, S, H, Dv)."""
        B, S, _ = kv.shape
        H, Dn, Dv, Dr = self.num_heads, self.qk_nope_head_dim, self.v_head_dim, self.qk_rope_head_dim
        k_nope, v = self.kv_b_proj(kv).view(B, S, H, Dn + Dv).split([Dn, Dv], dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(B, S, H, Dr)), dim=-1)
        return k, v

    def _attend(self, q, k, v, mask) -> torch.Tensor:
        """q (B, T, H, Dq), k (B, S, H, Dq), v (B, S, H, Dv); mask (B, 1, T, S) bool or None (causal).
        Returns (B, T, H, Dv)."""
        Dv = v.shape[-1]
        if v.device.type == "cpu" and Dv < q.shape[-1]:
            # PyTorch's fused CPU attention kernel needs equal head dims (else the slower math path runs):
            # zero-pad the values, drop the padded outputs.
            v = F.pad(v, (0, q.shape[-1] - Dv))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),  # (B, H, T|S, D)
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.softmax_scale,
        )  # (B, H, T, Dv)
        return out.transpose(1, 2)[..., :Dv]

    def _absorbed(self, q_nope, q_pe, latent, bias) -> torch.Tensor:
        """Attends on the latent directly. latent (B, S, C + Dr); bias from `absorbed_bias`. Returns (B, T, H, Dv).

        Decoding runs this once per layer and token with tiny T, so it is written as few kernels as possible:
        bmm on views instead of einsum (no permuted copies), the mask and softmax scale fused into one baddbmm.
        """
        B, T, H, _ = q_nope.shape
        C, Dn, Dv = self.kv_lora_rank, self.qk_nope_head_dim, self.v_head_dim
        w = self.kv_b_proj.weight.view(H, Dn + Dv, C)
        w_uk, w_uv = w[:, :Dn], w[:, Dn:]  # (H, Dn, C), (H, Dv, C): views, nothing copied
        q_lat = torch.bmm(q_nope.reshape(B * T, H, Dn).transpose(0, 1), w_uk)  # (H, B*T, C)
        q_cat = torch.cat((q_lat.transpose(0, 1).view(B, T, H, C), q_pe), dim=-1)  # (B, T, H, C + Dr)
        q_cat = q_cat.view(B, T * H, C + self.qk_rope_head_dim)
        latent_t = latent.transpose(1, 2)  # (B, C + Dr, S)
        if bias is None:
            scores = torch.bmm(q_cat, latent_t) * self.softmax_scale
        else:  # bias + scale * q.k in one kernel
            scores = torch.baddbmm(_as(bias, q_cat.dtype), q_cat, latent_t, alpha=self.softmax_scale)  # (B, T*H, S)
        probs = _as(scores.softmax(dim=-1, dtype=torch.float32), latent.dtype)
        out_lat = torch.bmm(probs, latent[..., :C])  # (B, T*H, C)
        out = torch.bmm(out_lat.view(B * T, H, C).transpose(0, 1), w_uv.transpose(1, 2))  # (H, B*T, Dv)
        return out.transpose(0, 1).view(B, T, H, Dv)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype; a no-op `.to` still costs a dispatch, and decoding makes hundreds of calls per token."""
    return t if t.dtype == dtype else t.to(dtype)


def absorbed_bias(allowed: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """allowed (B, T, S) bool, True = may attend -> the additive mask of the absorbed path: 0 where allowed, the
    dtype's most negative finite value elsewhere (finite, so no inf - inf), laid out to match its score rows
    (t, h): (B, 1, S), broadcast over the heads, when T == 1, else (B, T*H, S)."""
    B, T, S = allowed.shape
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    if T == 1:
        return bias
    return bias[:, :, None, :].expand(B, T, num_heads, S).reshape(B, T * num_heads, S)
