"""DeepSeek-V2/V3 decoder-only language model: embeddings -> N x (MLA, dense MLP or MoE) -> norm -> lm_head.

Parameter names are exactly those of transformers' DeepseekV2/V3ForCausalLM checkpoints, so state dicts move
between the two without renaming. The forward takes an explicit LatentCache for decoding, derives positions
from a left-padded attention mask, and can return per-token log-probs of given targets without ever holding
the whole (B, T, V) float32 log-softmax.
"""

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .cache import LatentCache
from .config import ModelConfig
from .mla import MLA, absorbed_bias
from .moe import MLP, Experts, MoE, MoEStats, update_bias
from .norm import RMSNorm
from .rope import RotaryEmbedding

__all__ = ["CausalLMOutput", "DecoderLayer", "DeepseekForCausalLM", "RMSNorm"]


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None = None  # (B, T, V), None when target_ids were given
    logprobs: torch.Tensor | None = None  # (B, n) float32 log p(target_ids) at `temperature`
    entropy: torch.Tensor | None = None  # (B, T) float32, when compute_entropy
    routing: list[torch.Tensor] | None = None  # per MoE layer (B, T, k) expert ids, when return_routing
    aux_loss: torch.Tensor | None = None  # scalar: sum of the MoE layers' balance losses (0 when disabled)
    expert_counts: list[torch.Tensor] = field(default_factory=list)  # per MoE layer (n_routed_experts,) long


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = MLA(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoE)

    def forward(self, h, cos, sin, mask, cache=None, topk_idx=None, absorb=False, token_mask=None):
        """h (B, T, D) -> (h (B, T, D), MoEStats or None for a dense layer). token_mask (B, T): real tokens."""
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, self.layer_idx, absorb)
        x = self.post_attention_layernorm(h)
        if self.is_moe:
            y, stats = self.mlp(x, topk_idx, token_mask)
            return h + y, stats
        return h + self.mlp(x), None

    def forward_shared(self, h_prefix, h, rope_prefix, rope, mask_prefix, mask, group_size, topk_prefix, topk):
        """Rows in groups sharing a prefix (see MLA.forward_shared): h_prefix (P, Tp, D) once per group, h (P*G,
        Tc, D) per row. Returns (h_prefix, h, MoEStats over the full rows or None for a dense layer)."""
        a_prefix, a = self.self_attn.forward_shared(self.input_layernorm(h_prefix), self.input_layernorm(h),
                                                    rope_prefix, rope, mask_prefix, mask, group_size)
        h_prefix, h = h_prefix + a_prefix, h + a
        x_prefix, x = self.post_attention_layernorm(h_prefix), self.post_attention_layernorm(h)
        if not self.is_moe:
            return h_prefix + self.mlp(x_prefix), h + self.mlp(x), None
        # One MoE call over every token: the prefix tokens once, then the rows' own tokens.
        (P, Tp, D), (N, Tc, _) = x_prefix.shape, x.shape
        flat = torch.cat((x_prefix.reshape(1, P * Tp, D), x.reshape(1, N * Tc, D)), dim=1)
        replay = None
        if topk is not None:
            replay = torch.cat((topk_prefix.reshape(1, P * Tp, -1), topk.reshape(1, N * Tc, -1)), dim=1)
        y, stats = self.mlp(flat, replay)
        idx_prefix, idx = stats.topk_idx[0].split([P * Tp, N * Tc])
        idx_prefix = idx_prefix.view(P, Tp, -1)
        # Per full row, as the plain forward reports them: the prefix counts once for each row of its group.
        counts = stats.expert_counts + (group_size - 1) * torch.bincount(
            idx_prefix.flatten(), minlength=stats.expert_counts.numel())
        stats = MoEStats(
            topk_idx=torch.cat((idx_prefix.repeat_interleave(group_size, dim=0), idx.view(N, Tc, -1)), dim=1),
            expert_counts=counts, aux_loss=stats.aux_loss)
        y_prefix, y = y[0].split([P * Tp, N * Tc])
        return h_prefix + y_prefix.view(P, Tp, D), h + y.view(N, Tc, D), stats


class DeepseekModel(nn.Module):
    """The `model.` prefix of the checkpoint names: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekForCausalLM(nn.Module):
    # Cached steps of up to this many new tokens use absorbed attention (~T*S*C work, not S*C*H*D).
    absorb_max_tokens: int = 32
    # Target log-probs are computed over chunks of the sequence holding about this many logits each.
    logprob_chunk_elems: int = 1 << 24

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DeepseekModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(
            cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings
        )
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, Experts):
            for view in module.projections():
                nn.init.normal_(view, 0.0, std)
        elif isinstance(module, MoE):
            nn.init.normal_(module.gate.weight, 0.0, std)

    @property
    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers if layer.is_moe]

    def gradient_checkpointing_enable(self) -> None:
        self.gradient_checkpointing = True

    @torch.no_grad()
    def update_router_bias(self, expert_counts: list[torch.Tensor], gamma: float) -> None:
        """Auxiliary-loss-free balancing: per MoE layer, bias += gamma * sign(mean_load - load)."""
        moe_layers = self.moe_layers
        if len(expert_counts) != len(moe_layers):
            raise ValueError(
                f"expert_counts has {len(expert_counts)} entries; the model has {len(moe_layers)} MoE layers"
            )
        for moe, counts in zip(moe_layers, expert_counts):
            update_bias(moe.gate, counts, gamma)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        *,
        target_ids: torch.Tensor | None = None,
        target_start: int = 0,
        temperature: float = 1.0,
        routing: list[torch.Tensor] | None = None,
        return_routing: bool = False,
        compute_entropy: bool = False,
        absorb: bool | None = None,
        shared_prefix: int = 0,
        group_size: int = 1,
    ) -> "CausalLMOutput":
        """input_ids (B, T); attention_mask (B, cached + T), 1 real / 0 pad (left padding), None: all real.

        target_ids (B, n): instead of logits, return logprobs[:, j] = log p(target_ids[:, j]) under the prediction
        made at position target_start + j (so target_ids = input_ids[:, 1:] with target_start 0 scores a sequence).

        shared_prefix, group_size: the rows come in consecutive groups of `group_size` whose first `shared_prefix`
        columns (ids and mask) are identical, e.g. a prompt and its G completions. The shared columns then go
        through the model once per group instead of once per row; every output is what the plain forward gives.
        (Not with a cache, and not while a sequence-wise MoE balance loss is being trained: it needs whole rows.)
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if absorb is None:
            absorb = cache is not None and T <= self.absorb_max_tokens
        moe_layers = self.moe_layers
        if routing is not None and len(routing) != len(moe_layers):
            raise ValueError(
                f"routing has {len(routing)} entries; the model has {len(moe_layers)} MoE layers"
            )
        share = group_size > 1 and shared_prefix > 0
        if share:
            _check_shared_prefix(input_ids, attention_mask, cache, shared_prefix, group_size)
            # The sequence-wise balance loss is a statistic of whole rows: compute those the plain way.
            share = not (self.training and any(m.gate.aux_loss_alpha > 0 for m in moe_layers))
        if attention_mask is not None:
            if attention_mask.shape != (B, past + T):
                raise ValueError(
                    f"attention_mask must cover cached + new tokens: expected {(B, past + T)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            attention_mask = attention_mask.to(input_ids.device)

        positions = _positions(attention_mask, past, B, T, input_ids.device)  # (B, T)
        mask = None  # None: plain causal attention over exactly the T new tokens
        if attention_mask is not None or past > 0 or absorb or share:
            mask = self._layer_mask(_allowed_keys(attention_mask, past, B, T, input_ids.device), absorb)
        cos, sin = self.rotary(positions)  # (B, T, Dr/2) each
        rope = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, T, 1, Dr/2): broadcast over the heads in every layer
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        if share:
            h, stats = self._shared_layers(input_ids, rope, mask, routing, shared_prefix, group_size, checkpointed)
        else:
            token_mask = attention_mask[:, past:] if attention_mask is not None else None  # (B, T) balance loss
            h, stats = self._layers(input_ids, rope, mask, cache, routing, absorb, token_mask, checkpointed)
        if cache is not None:
            cache.advance(T)
        out = CausalLMOutput(
            routing=[s.topk_idx for s in stats] if return_routing else None,
            aux_loss=sum((s.aux_loss for s in stats), h.new_zeros((), dtype=torch.float32)),
            expert_counts=[s.expert_counts for s in stats],
        )
        out.logits, out.logprobs, out.entropy = self._head(self.model.norm(h), target_ids, target_start, temperature,
                                                           compute_entropy)
        return out

    def _layer_mask(self, allowed: torch.Tensor, absorb: bool) -> torch.Tensor:
        """allowed (B, T, S) bool -> the mask in the form the layers' attention path takes: absorbed_bias's additive
        mask, or (B, 1, T, S) bool for the plain path. Built once per forward, shared by every layer."""
        if absorb:
            return absorbed_bias(allowed, self.config.num_attention_heads, self.model.embed_tokens.weight.dtype)
        return allowed.unsqueeze(1)

    def _layers(self, input_ids, rope, mask, cache, routing, absorb: bool, token_mask, checkpointed: bool):
        """The decoder layers over the full rows. Returns the last hidden states (B, T, D) and the MoE layers'
        stats."""
        cos, sin = rope
        h = self.model.embed_tokens(input_ids)
        stats: list[MoEStats] = []
        for layer in self.model.layers:
            topk_idx = routing[len(stats)] if routing is not None and layer.is_moe else None
            if checkpointed:
                h, s = checkpoint(layer, h, cos, sin, mask, None, topk_idx, absorb, token_mask, use_reentrant=False)
            else:
                h, s = layer(h, cos, sin, mask, cache, topk_idx, absorb, token_mask)
            if s is not None:
                stats.append(s)
        return h, stats

    def _shared_layers(self, input_ids, rope, mask, routing, Tp: int, G: int, checkpointed: bool):
        """The decoder layers with the first Tp columns computed once per group of G rows. Returns the final
        hidden states of the full rows (B, T, D), the prefix part repeated over each group, and the layer stats."""
        rope_prefix = tuple(t[::G, :Tp] for t in rope)  # (P, Tp, 1, Dr/2) each
        rope_own = tuple(t[:, Tp:] for t in rope)
        mask_prefix, mask_own = mask[::G, :, :Tp, :Tp], mask[:, :, Tp:]  # (P, 1, Tp, Tp), (B, 1, Tc, T)
        h_prefix, h = self.model.embed_tokens(input_ids[::G, :Tp]), self.model.embed_tokens(input_ids[:, Tp:])
        stats: list[MoEStats] = []
        for layer in self.model.layers:
            topk_prefix = topk = None
            if routing is not None and layer.is_moe:
                topk_prefix, topk = routing[len(stats)][::G, :Tp], routing[len(stats)][:, Tp:]
            args = (h_prefix, h, rope_prefix, rope_own, mask_prefix, mask_own, G, topk_prefix, topk)
            if checkpointed:
                h_prefix, h, s = checkpoint(layer.forward_shared, *args, use_reentrant=False)
            else:
                h_prefix, h, s = layer.forward_shared(*args)
            if s is not None:
                stats.append(s)
        return torch.cat((h_prefix.repeat_interleave(G, dim=0), h), dim=1), stats

    def _head(self, h, target_ids, target_start: int, temperature: float, compute_entropy: bool):
        """Final hidden states (B, T, D) -> (logits (B, T, V) or None, log p(target_ids) (B, n) or None, entropy
        or None): the logits without target_ids, else only the target log-probs."""
        if target_ids is None:
            logits = self.lm_head(h)
            entropy = _chunk_logprobs(self.lm_head, h, None, temperature, True)[1] if compute_entropy else None
            return logits, None, entropy
        n, T = target_ids.shape[1], h.shape[1]
        if target_start < 0 or target_start + n > T:
            raise ValueError(f"target_ids ({n} positions from target_start={target_start}) must fit in the "
                             f"{T} input positions")
        # Only the positions whose next token is asked for reach lm_head (prompts are often long).
        logprobs, entropy = self.target_logprobs(h[:, target_start : target_start + n], target_ids, temperature,
                                                 compute_entropy)
        return None, logprobs, entropy

    def target_logprobs(
        self,
        h: torch.Tensor,
        target_ids: torch.Tensor,
        temperature: float = 1.0,
        compute_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h (B, T, D) final hidden states -> log p(target) (B, T) [, entropy (B, T)], chunked over T.

        Each chunk calls lm_head as a module (so ZeRO-3 gathers its weight) and, when gradients flow, is
        checkpointed: only h is kept for backward and the chunk's logits are recomputed there.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
        B, T, _ = h.shape
        if target_ids.shape != (B, T):
            raise ValueError(f"target_ids must have shape {(B, T)}, got {tuple(target_ids.shape)}")
        chunk = max(1, self.logprob_chunk_elems // (B * self.config.vocab_size))
        fn = partial(_chunk_logprobs, self.lm_head, temperature=temperature, compute_entropy=compute_entropy)
        grad = torch.is_grad_enabled() and h.requires_grad
        logprobs, entropy = [], []
        for s in range(0, T, chunk):
            args = (h[:, s : s + chunk], target_ids[:, s : s + chunk])
            lp, ent = checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args)
            logprobs.append(lp)
            entropy.append(ent)
        return torch.cat(logprobs, dim=1), torch.cat(entropy, dim=1) if compute_entropy else None


def _positions(attention_mask, past: int, B: int, T: int, device) -> torch.Tensor:
    """Positions (B, T) of the T new tokens after `past` cached ones. They count real tokens only, so a left-padded
    row gets the positions of the same row without padding."""
    if attention_mask is None:
        return torch.arange(past, past + T, device=device).expand(B, T)
    # The cached columns only matter through their count: one sum, not a cumsum over all S (decoding).
    new = attention_mask[:, past:].long().cumsum(-1)  # (B, T)
    if past > 0:
        new = new + attention_mask[:, :past].sum(-1, keepdim=True, dtype=torch.long)
    return (new - 1).clamp(min=0)


def _allowed_keys(attention_mask, past: int, B: int, T: int, device) -> torch.Tensor:
    """(B, T, S) bool, S = past + T: may new token t attend to key s? Causal, and never to padding keys."""
    S = past + T
    q_pos = torch.arange(past, S, device=device)
    k_pos = torch.arange(S, device=device)
    allowed = k_pos[None, :] <= q_pos[:, None]  # (T, S) causal
    if attention_mask is not None:
        # A padding query still sees itself, so its (ignored) row stays finite: no NaN in backward.
        allowed = (allowed & attention_mask.bool()[:, None, :]) | (k_pos[None, :] == q_pos[:, None])
    return allowed.expand(B, T, S)


def _check_shared_prefix(input_ids, attention_mask, cache, shared_prefix: int, group_size: int) -> None:
    B, T = input_ids.shape
    if cache is not None:
        raise ValueError("shared_prefix cannot be used with a cache (prefill the prompt once and copy the cache)")
    if not 0 < shared_prefix < T or B % group_size:
        raise ValueError(f"shared_prefix={shared_prefix}, group_size={group_size}: need 0 < shared_prefix < "
                         f"{T} columns and a batch of whole groups ({B} rows is not a multiple of {group_size})")
    parts = [input_ids] if attention_mask is None else [input_ids, attention_mask]
    for t in parts:
        grouped = t[:, :shared_prefix].view(B // group_size, group_size, shared_prefix)
        differs = (grouped != grouped[:, :1]).any(dim=2).any(dim=1)  # (P,)
        if differs.any():
            raise ValueError(f"shared_prefix: the rows of group {int(differs.nonzero()[0])} (rows of "
                             f"group_size={group_size}) do not share their first {shared_prefix} columns")


def _chunk_logprobs(lm_head: nn.Module, h, targets, temperature: float, compute_entropy: bool):
    logits = lm_head(h).float() / temperature  # (B, t, V)
    logz = logits.logsumexp(dim=-1)  # (B, t)
    logprobs = None
    if targets is not None:
        logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    entropy = None
    if compute_entropy:
        entropy = logz - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
    return logprobs, entropy
