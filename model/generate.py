"""Batched sampling engine for the policy: G completions for each of P prompts on the latent KV cache.

Each distinct prompt is prefilled once (plain MLA path) into a preallocated `LatentCache`; the cache and the
last-position logits are then copied G ways (rows ordered prompt-major, p*G + g) and all P*G rows decode
together, one token per step, on the absorbed MLA path. Rows that finish (EOS id or stop string) leave the
active batch, so finished sequences stop costing compute; the loop ends when none is left or at
`max_new_tokens`.

Per token we return two log-probs: under the distribution actually sampled from (temperature, top-k, top-p)
and under the untempered, unfiltered policy (what a training forward at temperature 1 computes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from thinkzero.model.cache import LatentCache

# How many tokens past the longest stop string (in characters) we re-decode each step. A token almost always
# decodes to at least one character; the slack covers tokens that decode to nothing (partial UTF-8, specials).
_STOP_WINDOW_SLACK = 4


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature 0 means greedy; top_k 0 and top_p 1.0 mean no filtering."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    pad_token_id: int = 0
    return_routing: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if any(not s for s in self.stop_strings):
            raise ValueError(f"SamplingParams.stop_strings must be non-empty strings, got {self.stop_strings!r}")
        # Accept lists from YAML / callers but keep the dataclass hashable.
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))


@dataclass
class GenerationOutput:
    """N = P * G rows, prompt-major (row p*G + g is generation g of prompt p)."""

    prompt_ids: torch.Tensor  # (N, Tp) left-padded with pad_token_id
    prompt_mask: torch.Tensor  # (N, Tp) 1 real, 0 pad
    completion_ids: torch.Tensor  # (N, Tc) right-padded with pad_token_id; Tc = longest completion
    completion_mask: torch.Tensor  # (N, Tc)
    sampling_logprobs: torch.Tensor  # (N, Tc) log p of each token under the sampling distribution; 0 on pad
    logprobs: torch.Tensor  # (N, Tc) log p under the untempered, unfiltered policy; 0 on pad
    finish_reasons: list[str]  # 'stop' (EOS or stop string) | 'length' (max_new_tokens)
    routing: list[torch.Tensor] | None  # per MoE layer (N, Tp + Tc, k) expert ids, aligned with cat(prompt, completion)


# ----------------------------------------------------------------------------------------------------------
# Sampling: pure functions on a (n, V) block of logits.


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf. Apply to already temperature-scaled logits.

    Top-p keeps the smallest prefix of the sorted distribution whose mass reaches top_p (the most likely token
    is always kept). Ties at the k-th value are all kept.
    """
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (n, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (n, V)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """probs (n, V) >= 0, each row summing to > 0 (need not be normalised); uniform (n,) in [0, 1) -> tokens (n,).

    Row i draws the first token whose cumulative probability exceeds uniform[i] * (row total), so token j is drawn
    for uniform in [cdf[j-1], cdf[j]) / total: with probability p_j, and never when p_j = 0. The cumulative sum is
    float64 so that at large V the tail's small probabilities keep their share.
    """
    cdf = probs.double().cumsum(dim=-1)  # (n, V)
    total = cdf[:, -1:]  # (n, 1)
    x = uniform.double()[:, None] * total
    # Strictly below the total even after rounding, so the draw never runs past the last token with p > 0.
    x = torch.minimum(x, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True)[:, 0]


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    row_generators: Sequence[tuple[torch.Tensor, torch.Generator]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row. logits (n, V) are the raw policy logits.

    `row_generators`, if given, replaces `generator`: a list of (row indices, generator) that together cover the
    rows; each block of rows draws from its own generator.

    Returns (tokens (n,), sampling_logprobs (n,), logprobs (n,)). logprobs are under softmax(logits);
    sampling_logprobs under the distribution sampled from. Greedy (temperature 0) samples from a point mass, which
    has no useful log-prob, so there sampling_logprobs are the policy log-probs (a ratio of 1 to the policy).
    """
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1)  # (n,)
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
        logprobs = logits.gather(-1, tokens[:, None])[:, 0] - log_z
        return tokens, logprobs, logprobs
    scaled = logits / temperature if temperature != 1.0 else logits
    filtered = top_k > 0 or top_p < 1.0
    if filtered:
        scaled = filter_logits(scaled, top_k, top_p)
    log_z_s = torch.logsumexp(scaled, dim=-1) if (filtered or temperature != 1.0) else log_z
    probs = torch.exp(scaled - log_z_s[:, None])  # (n, V)
    # One uniform per row (torch.multinomial spends an exponential draw per vocabulary entry).
    n = probs.shape[0]
    if row_generators is None:
        uniform = torch.rand(n, dtype=torch.float64, device=probs.device, generator=generator)
    else:
        uniform = torch.empty(n, dtype=torch.float64, device=probs.device)
        for idx, gen in row_generators:
            uniform[idx] = torch.rand(len(idx), dtype=torch.float64, device=probs.device, generator=gen)
    tokens = inverse_cdf(probs, uniform)[:, None]  # (n, 1)
    sampling_logprobs = scaled.gather(-1, tokens)[:, 0] - log_z_s
    logprobs = logits.gather(-1, tokens)[:, 0] - log_z
    return tokens[:, 0], sampling_logprobs, logprobs


# ----------------------------------------------------------------------------------------------------------
# Stopping on strings: decode only the tail of each active row.


class StopStringChecker:
    """Finds rows whose newest token completes a stop string.

    Each step decodes only the last `window` tokens of each active row (a stop string may span tokens). A row is
    checked every step, so the first step its tail contains a stop string is the step whose token completed it:
    the completion is cut right after that token.
    """

    def __init__(self, stop_strings: Sequence[str], decode: Callable[[list[int]], str]):
        self.stop_strings = tuple(stop_strings)
        self.decode = decode
        self.window = max(len(s) for s in self.stop_strings) + _STOP_WINDOW_SLACK

    def __call__(self, tails: list[list[int]]) -> list[bool]:
        """tails: per active row, its newest tokens (at most `window`). Returns per row: stop here?"""
        out = []
        for ids in tails:
            text = self.decode(ids)
            out.append(any(s in text for s in self.stop_strings))
        return out


# ----------------------------------------------------------------------------------------------------------
# The engine.


def _left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    Tp = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), Tp), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), Tp), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, Tp - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, Tp - len(p) :] = 1
    return ids, mask


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    num_generations: int,
    params: SamplingParams,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> GenerationOutput:
    """Sample `num_generations` completions for each prompt (token ids). See the module docstring.

    `generator` drives all randomness (same seed -> same completions); it must live on the model's device. A list
    of one generator per prompt gives each prompt its own stream, so a prompt's completions do not depend on which
    other prompts share the batch (data-parallel training samples the same tokens with any number of processes).
    `decode(ids) -> str` is needed only for stop strings.
    """
    with torch.inference_mode():
        out = _generate(model, prompts, num_generations, params, generator, decode)
    # Inference tensors cannot enter autograd later (the training forward embeds these ids); plain copies can.
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "sampling_logprobs", "logprobs"):
        setattr(out, name, getattr(out, name).clone())
    if out.routing is not None:
        out.routing = [r.clone() for r in out.routing]
    return out


def _generate(model, prompts, num_generations, params, generator, decode) -> GenerationOutput:
    if not prompts:
        raise ValueError("generate: prompts is empty")
    if any(len(p) == 0 for p in prompts):
        empty = [i for i, p in enumerate(prompts) if len(p) == 0]
        raise ValueError(f"generate: prompts {empty} are empty; every prompt needs at least one token")
    if num_generations < 1:
        raise ValueError(f"generate: num_generations must be >= 1, got {num_generations}")
    if params.stop_strings and decode is None:
        raise ValueError("generate: params.stop_strings needs a `decode(ids) -> str` callable (e.g. tokenizer.decode)")

    device, dtype = _model_device_dtype(model)
    P, G = len(prompts), num_generations
    per_prompt = generator is not None and not isinstance(generator, torch.Generator)
    if per_prompt and len(generator) != P:
        raise ValueError(f"generate: got {len(generator)} generators for {P} prompts; give one per prompt or a "
                         "single torch.Generator")
    N, T_new = P * G, params.max_new_tokens
    pad = params.pad_token_id

    prompt_ids, prompt_mask = _left_pad(prompts, pad)  # (P, Tp)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    Tp = prompt_ids.shape[1]

    # Prefill each distinct prompt once. The attention mask for the whole run is allocated here: every active row
    # is real at every generated position (finished rows leave the batch), so the decode columns are all ones.
    cache = LatentCache.for_model(model.config, P, Tp + T_new, dtype, device)
    out = model(prompt_ids, attention_mask=prompt_mask, cache=cache, return_routing=params.return_routing)
    logits = out.logits[:, -1].repeat_interleave(G, dim=0)  # (N, V)
    cache = cache.repeat_interleave(G)
    attn_mask = torch.cat([prompt_mask, prompt_mask.new_ones(P, T_new)], dim=1).repeat_interleave(G, dim=0)
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(G, dim=0), prompt_mask.repeat_interleave(G, dim=0)

    routing_prompt = routing_new = None
    if params.return_routing:
        routing_prompt = [r.repeat_interleave(G, dim=0) for r in out.routing]  # per MoE layer (N, Tp, k)
        routing_new = [r.new_zeros(N, T_new, r.shape[-1]) for r in out.routing]
    del out

    # Per original row results, written in place as tokens are drawn.
    tokens = torch.full((N, T_new), pad, dtype=torch.long, device=device)
    sampling_logprobs = torch.zeros((N, T_new), dtype=torch.float32, device=device)
    logprobs = torch.zeros((N, T_new), dtype=torch.float32, device=device)
    lengths = [T_new] * N
    finish_reasons = ["length"] * N

    eos = torch.tensor(params.eos_token_ids, dtype=torch.long, device=device) if params.eos_token_ids else None
    stop_check = StopStringChecker(params.stop_strings, decode) if params.stop_strings else None

    rows = torch.arange(N, device=device)  # active row -> original row
    rows_list = list(range(N))  # same, on the host, for bookkeeping without device syncs
    row_generators = None  # per-prompt streams: (active rows of prompt p, generator p), rebuilt when rows leave
    for step in range(T_new):
        if per_prompt and (row_generators is None or sum(len(i) for i, _ in row_generators) != len(rows_list)):
            row_generators = _rows_by_prompt(rows_list, G, generator, device)
        tok, slp, lp = sample_next(logits, params.temperature, params.top_k, params.top_p,
                                   None if per_prompt else generator, row_generators)
        tokens[rows, step] = tok
        sampling_logprobs[rows, step] = slp
        logprobs[rows, step] = lp

        # Which active rows finished with this token (one host sync per step when stopping is possible).
        done: list[bool] | None = None
        if eos is not None:
            done = torch.isin(tok, eos).tolist()
        if stop_check is not None:
            lo = max(0, step + 1 - stop_check.window)
            hit = stop_check(tokens[rows, lo : step + 1].tolist())
            done = hit if done is None else [a or b for a, b in zip(done, hit)]
        any_done = done is not None and any(done)
        if any_done:
            for i, d in enumerate(done):
                if d:
                    lengths[rows_list[i]] = step + 1
                    finish_reasons[rows_list[i]] = "stop"
        last = step == T_new - 1

        # With routing asked for, every row's newest token is fed before finished rows drop out, so the routing of
        # a row's last token is recorded too; otherwise finished rows drop out first and cost nothing more.
        if params.return_routing:
            out = model(tok[:, None], attention_mask=attn_mask[:, : Tp + step + 1], cache=cache, return_routing=True)
            for buf, r in zip(routing_new, out.routing):
                buf[rows, step] = r[:, 0]
            logits = out.logits[:, -1]
            del out
        if last:
            break
        if any_done:
            keep = [i for i, d in enumerate(done) if not d]
            if not keep:
                break
            if params.return_routing:  # the next logits are already computed: shrink them
                rows, rows_list, cache, attn_mask, logits = _shrink(keep, rows, rows_list, cache, attn_mask, logits)
            else:  # the next input tokens are: shrink them
                rows, rows_list, cache, attn_mask, tok = _shrink(keep, rows, rows_list, cache, attn_mask, tok)
        if not params.return_routing:
            out = model(tok[:, None], attention_mask=attn_mask[:, : Tp + step + 1], cache=cache)
            logits = out.logits[:, -1]
            del out

    Tc = max(lengths)
    lengths_t = torch.tensor(lengths, device=device)
    completion_mask = (torch.arange(Tc, device=device)[None, :] < lengths_t[:, None]).long()  # (N, Tc)
    routing = None
    if params.return_routing:
        routing = [torch.cat([rp, rn[:, :Tc]], dim=1) for rp, rn in zip(routing_prompt, routing_new)]
    return GenerationOutput(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=tokens[:, :Tc].contiguous(),
        completion_mask=completion_mask,
        sampling_logprobs=sampling_logprobs[:, :Tc].contiguous(),
        logprobs=logprobs[:, :Tc].contiguous(),
        finish_reasons=finish_reasons,
        routing=routing,
    )


def _rows_by_prompt(rows_list: list[int], G: int, generators, device) -> list[tuple[torch.Tensor, torch.Generator]]:
    """Active-batch positions grouped by the prompt their original row belongs to, with that prompt's generator."""
    positions: dict[int, list[int]] = {}
    for i, row in enumerate(rows_list):
        positions.setdefault(row // G, []).append(i)
    return [(torch.tensor(idx, dtype=torch.long, device=device), generators[p]) for p, idx in positions.items()]


def _shrink(keep: list[int], rows, rows_list, cache: LatentCache, attn_mask, per_row):
    """Keep only the active rows `keep` (indices into the active batch) in every piece of per-row state."""
    idx = torch.tensor(keep, dtype=torch.long, device=rows.device)
    return (
        rows.index_select(0, idx),
        [rows_list[i] for i in keep],
        cache.index_select(idx),
        attn_mask.index_select(0, idx),
        per_row.index_select(0, idx),
    )
