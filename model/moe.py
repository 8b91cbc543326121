"""Mixture-of-experts feed-forward for DeepSeek-V2/V3: SwiGLU experts, the router (gate) and the dispatch.

The router follows the Hugging Face / DeepSeek math exactly:
  scores   = softmax(logits) (V2) or sigmoid(logits) (V3), computed in float32
  choice   = scores (+ e_score_correction_bias for 'noaux_tc'; the bias only picks experts, never weights them)
  groups   = experts split into n_group groups; keep the topk_group best groups, scored by their max
             ('group_limited_greedy', V2) or by the sum of their top-2 biased scores ('noaux_tc', V3)
  topk_idx = top-k of choice within the kept groups
  weights  = scores[topk_idx] (normalised to sum 1 if norm_topk_prob) * routed_scaling_factor

The routed experts of a layer are stacked in two tensors (`Experts`): gate_up_proj (E, 2I, D) and down_proj
(E, D, I), transformers 5's in-memory layout (checkpoints on disk keep one tensor per expert and projection;
model/checkpoint.py converts). Dispatch sorts the (token, slot) pairs by expert id, then either
  - runs each expert once on its contiguous slice (a loop over experts, never over tokens), when gradients flow
    or some expert has many tokens (training, prefill, log-prob passes); or, when no gradient is needed and every
    expert has only a few tokens (decoding), runs all experts in one call per projection: then the cost is
    reading the weights, so one call beats E small ones (and splits across threads). That call is a grouped
    matmul over the sorted slices on CPU (no padding); elsewhere two batched matmuls over a zero-padded
    (E, capacity, D) block (CUDA's grouped matmul is bf16-only).
The weighted outputs go back with a single index_add.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import router_errors


@dataclass
class MoEStats:
    topk_idx: torch.Tensor  # (B, T, k) long: experts each token was sent to
    expert_counts: torch.Tensor  # (E,) long: token-slots routed to each expert in this call
    aux_loss: torch.Tensor  # scalar: sequence/batch-wise balance loss times its coefficient (0 when disabled)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); used for dense layers, experts and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    """Router: picks `top_k` experts per token and their mixing weights (see the module docstring for the math)."""

    def __init__(
        self,
        hidden_size: int,
        n_routed_experts: int,
        top_k: int,
        *,
        scoring_func: str = "softmax",
        topk_method: str = "greedy",
        n_group: int | None = None,
        topk_group: int | None = None,
        norm_topk_prob: bool = False,
        routed_scaling_factor: float = 1.0,
        aux_loss_alpha: float = 0.0,
        seq_aux: bool = True,
    ):
        super().__init__()
        errors = router_errors(n_routed_experts, top_k, scoring_func, topk_method, n_group, topk_group)
        if errors:
            raise ValueError("invalid MoE router:\n  " + "\n  ".join(errors))
        grouped = topk_method != "greedy"
        self.n_routed_experts = n_routed_experts
        self.top_k = top_k
        self.scoring_func = scoring_func
        self.topk_method = topk_method
        self.n_group = n_group if grouped else 1
        self.topk_group = topk_group if grouped else 1
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux
        self.weight = nn.Parameter(torch.empty(n_routed_experts, hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        if topk_method == "noaux_tc":
            # A buffer, not a parameter: it is moved by update_bias from observed load, never by gradients.
            self.register_buffer("e_score_correction_bias", torch.zeros(n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    @classmethod
    def from_config(cls, cfg) -> "MoEGate":
        return cls(
            cfg.hidden_size,
            cfg.n_routed_experts,
            cfg.num_experts_per_tok,
            scoring_func=cfg.scoring_func,
            topk_method=cfg.topk_method,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor,
            aux_loss_alpha=getattr(cfg, "aux_loss_alpha", 0.0) or 0.0,
            seq_aux=getattr(cfg, "seq_aux", True),
        )

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Per-expert affinities in float32. x (..., D) -> (..., E)."""
        logits = F.linear(x.float(), self.weight.float())
        return logits.softmax(dim=-1) if self.scoring_func == "softmax" else logits.sigmoid()

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Expert ids chosen for each token. scores (N, E) float32 -> (N, k) long."""
        choice = scores
        if self.e_score_correction_bias is not None:
            choice = scores + self.e_score_correction_bias.float()
        if self.n_group > 1:
            N, E = choice.shape
            grouped = choice.view(N, self.n_group, E // self.n_group)  # (N, G, E/G)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
            else:
                group_scores = grouped.amax(dim=-1)  # (N, G)
            keep = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices  # (N, topk_group)
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(N, E)
            choice = choice.masked_fill(~expert_mask, float("-inf"))
        return choice.topk(self.top_k, dim=-1, sorted=False).indices

    def weights(self, scores: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
        """Mixing weights from the unbiased scores at the chosen experts. (N, E), (N, k) -> (N, k) float32."""
        w = scores.gather(-1, topk_idx)
        if self.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.routed_scaling_factor

    def forward(
        self, x: torch.Tensor, topk_idx: torch.Tensor | None = None, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D); topk_idx (B, T, k) replays a previous routing instead of choosing; token_mask (B, T), 1 for
        real tokens, keeps padding out of the balance loss.

        Returns topk_idx (B, T, k) long, topk_weights (B, T, k) float32, aux_loss scalar.
        """
        B, T, _ = x.shape
        scores = self.scores(x.reshape(B * T, -1))  # (N, E)
        if topk_idx is None:
            idx = self.select(scores)  # (N, k)
        else:
            if topk_idx.shape != (B, T, self.top_k):
                raise ValueError(
                    f"routing replay expects topk_idx of shape {(B, T, self.top_k)}, got {tuple(topk_idx.shape)}"
                )
            idx = topk_idx.reshape(B * T, self.top_k).to(device=scores.device, dtype=torch.long)
            if idx.numel() and not 0 <= int(idx.min()) <= int(idx.max()) < self.n_routed_experts:
                raise ValueError(f"routing replay has expert ids outside [0, {self.n_routed_experts})")
        weights = self.weights(scores, idx)
        aux_loss = scores.new_zeros(())
        if self.training and self.aux_loss_alpha > 0:
            aux_loss = self.balance_loss(scores.view(B, T, -1), idx.view(B, T, -1), token_mask)
        return idx.view(B, T, self.top_k), weights.view(B, T, self.top_k), aux_loss

    def balance_loss(
        self, scores: torch.Tensor, topk_idx: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """alpha * sum_i f_i * P_i, per sequence (seq_aux, then averaged over sequences) or over the whole batch.

        f_i = E / (k * T) * (slots routed to expert i); P_i = mean over tokens of the affinity normalised over
        experts (a no-op for softmax; sigmoid scores are divided by their sum, as in the DeepSeek-V3 paper).
        scores (B, T, E) float32, topk_idx (B, T, k); token_mask (B, T): only real tokens count (T = their number),
        so padding neither dilutes nor skews the balance; rows without any are left out.
        """
        B, T, E = scores.shape
        k = topk_idx.shape[-1]
        real = scores.new_ones(B, T) if token_mask is None else token_mask.to(scores.dtype)  # (B, T)
        probs = scores / scores.sum(dim=-1, keepdim=True) if self.scoring_func == "sigmoid" else scores
        if not self.seq_aux:
            probs, topk_idx, real = probs.reshape(1, B * T, E), topk_idx.reshape(1, B * T, k), real.reshape(1, -1)
            B = 1
        count = real.sum(dim=1)  # (B,) real tokens per row
        hits = torch.zeros(B, E, device=scores.device, dtype=scores.dtype)
        hits.scatter_add_(1, topk_idx.reshape(B, -1), real.unsqueeze(-1).expand(-1, -1, k).reshape(B, -1))
        f = hits * E / (k * count.clamp(min=1)).unsqueeze(-1)  # (B, E): 1.0 everywhere when perfectly balanced
        P = (probs * real.unsqueeze(-1)).sum(dim=1) / count.clamp(min=1).unsqueeze(-1)  # (B, E)
        has_tokens = (count > 0).to(scores.dtype)
        per_row = (f * P).sum(dim=-1) * has_tokens  # (B,)
        return per_row.sum() / has_tokens.sum().clamp(min=1) * self.aux_loss_alpha


class Experts(nn.Module):
    """The routed experts of one MoE layer as two stacked tensors.

    gate_up_proj (E, 2I, D): rows [:I] are expert e's gate projection, rows [I:] its up projection.
    down_proj (E, D, I). Expert e computes down_proj[e] @ (silu(gate_e x) * up_e x), a SwiGLU MLP.
    """

    # Without gradients, one call for all experts runs when no expert gets more than this many rows. Padded batched
    # matmuls: a matmul that small costs about what reading its weights does, so the padding is free; with more
    # rows the padding's wasted work outweighs the saved calls and the loop wins (timed on CPU, w1 experts).
    batched_capacity: int = 16
    # CPU grouped matmul (no padding): beats the loop while each expert has a few dozen rows at most (timed as
    # above); with many rows per expert the loop's per-expert matmuls are faster.
    grouped_capacity: int = 32

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        # nn.Linear's default init, one projection at a time in the order separate Linear modules would draw it.
        for view in self.projections():
            nn.init.kaiming_uniform_(view, a=5**0.5)

    def projections(self) -> list[torch.Tensor]:
        """Views of every expert's (gate, up, down) weights, expert by expert: what separate Linears would hold."""
        I = self.intermediate_size
        views = []
        for e in range(self.num_experts):
            views += [self.gate_up_proj[e, :I], self.gate_up_proj[e, I:], self.down_proj[e]]
        return views

    def forward(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs (n, D) token copies sorted by expert; counts (E,) slots per expert. Returns (n, D): each row through
        its expert."""
        sizes = counts.tolist()  # the one host sync: slice sizes
        cap = max(sizes)
        needs_grad = torch.is_grad_enabled() and (xs.requires_grad or self.gate_up_proj.requires_grad)
        if not needs_grad:
            if xs.device.type == "cpu" and xs.dtype in _GROUPED_DTYPES and cap <= self.grouped_capacity:
                return self._grouped(xs, counts)
            if cap <= self.batched_capacity:
                return self._batched(xs, counts, cap)
        return self._looped(xs, sizes)

    def _looped(self, xs: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        # unbind, not indexing: its backward stacks the per-expert gradients once (zeros for unused experts)
        # instead of one full-size zero-filled gradient per expert. split keeps the input's backward a single cat.
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        outs = [
            F.linear(_swiglu(F.linear(chunk, gate_up[e])), down[e])
            for e, chunk in enumerate(xs.split(sizes))
            if sizes[e]
        ]
        return torch.cat(outs)

    def _grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # Slice e of xs (rows offs[e-1]:offs[e]) times expert e's weight, transposed as a view: (n, D) @ (E, D, 2I).
        offs = counts.cumsum(0).to(torch.int32)  # (E,) end of each expert's rows
        gate_up = _grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs=offs)  # (n, 2I)
        return _grouped_mm(_swiglu(gate_up), self.down_proj.transpose(1, 2), offs=offs)  # (n, D)

    def _batched(self, xs: torch.Tensor, counts: torch.Tensor, cap: int) -> torch.Tensor:
        E, n = self.num_experts, xs.shape[0]
        # (n,) expert of each row; output_size keeps it free of a host sync on GPU.
        expert_of_slot = torch.repeat_interleave(torch.arange(E, device=xs.device), counts, output_size=n)
        starts = counts.cumsum(0) - counts  # (E,) first slot of each expert
        row = torch.arange(n, device=xs.device) - starts[expert_of_slot]  # (n,) position within its expert
        block = xs.new_zeros(E, cap, xs.shape[1])
        block[expert_of_slot, row] = xs  # (E, cap, D)
        # Weights on the left: (E, 2I, D) @ (E, D, cap) reads each weight in its stored layout (a transposed
        # weight operand makes bmm much slower on CPU).
        gate, up = torch.bmm(self.gate_up_proj, block.transpose(1, 2)).chunk(2, dim=1)  # (E, I, cap) each
        out = torch.bmm(self.down_proj, F.silu(gate) * up)  # (E, D, cap)
        return out.transpose(1, 2)[expert_of_slot, row]  # (n, D)


# Row slices of a 2-D matrix times the matching matrices of a 3-D stack. On a torch without it, or for float64
# (which it does not take), the padded batched path runs instead.
_grouped_mm = getattr(F, "grouped_mm", None)
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16) if _grouped_mm is not None else ()


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """(..., 2I) = [gate | up] -> silu(gate) * up (..., I)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class MoE(nn.Module):
    """Routed experts + shared experts. forward(x, topk_idx=None) -> (y, MoEStats)."""

    def __init__(self, cfg):
        super().__init__()
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={cfg.hidden_act!r} is not supported; only 'silu' (SwiGLU)")
        self.n_routed_experts = cfg.n_routed_experts
        self.gate = MoEGate.from_config(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        n_shared = cfg.n_shared_experts or 0
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * n_shared) if n_shared else None

    def forward(
        self, x: torch.Tensor, topk_idx: torch.Tensor | None = None, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MoEStats]:
        """x (B, T, D); topk_idx (B, T, k) to replay a routing; token_mask (B, T) real tokens, for the balance loss."""
        B, T, D = x.shape
        topk_idx, topk_weights, aux_loss = self.gate(x, topk_idx, token_mask)  # (B, T, k) each
        routed, counts = self.dispatch(x.reshape(B * T, D), topk_idx.reshape(B * T, -1), topk_weights)
        y = routed.view(B, T, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y, MoEStats(topk_idx=topk_idx, expert_counts=counts, aux_loss=aux_loss)

    def dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D), topk_idx (N, k), topk_weights (N, k) -> (sum_k w * expert(x) (N, D), counts (E,) long)."""
        k = topk_idx.shape[1]
        flat_idx = topk_idx.reshape(-1)  # (N*k,)
        counts = torch.bincount(flat_idx, minlength=self.n_routed_experts)  # (E,)
        if flat_idx.numel() == 0:
            return torch.zeros_like(x), counts
        order = flat_idx.argsort(stable=True)  # slots grouped by expert
        token_of_slot = order // k  # (N*k,)
        xs = x.index_select(0, token_of_slot)  # (N*k, D) contiguous per expert; backward is an index_add
        ws = topk_weights.reshape(-1).index_select(0, order).to(x.dtype)  # (N*k,)
        # Experts with no tokens are never called.
        ys = self.experts(xs, counts) * ws.unsqueeze(-1)  # (N*k, D)
        return torch.zeros_like(x).index_add_(0, token_of_slot, ys), counts


@torch.no_grad()
def update_bias(gate: MoEGate, expert_counts: torch.Tensor, gamma: float) -> None:
    """Auxiliary-loss-free balancing (DeepSeek-V3): raise the bias of under-loaded experts, lower over-loaded ones.

    bias += gamma * sign(mean_load - load). expert_counts (E,) are the tokens routed to each expert (summed over
    whatever window / data-parallel ranks the caller wants to balance).
    """
    if gate.e_score_correction_bias is None:
        raise ValueError(f"update_bias needs topk_method='noaux_tc' (a router with a bias); got {gate.topk_method!r}")
    load = expert_counts.to(device=gate.e_score_correction_bias.device, dtype=torch.float32)
    if load.shape != gate.e_score_correction_bias.shape:
        raise ValueError(f"expert_counts has shape {tuple(load.shape)}, expected ({gate.n_routed_experts},)")
    gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
