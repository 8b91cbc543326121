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

    def cut(self, ids: list[int]) -> int | None:
        """For a finished completion (an engine that cannot stop mid-sampling): the length this engine would keep,
        through the first token whose tail holds a stop string; None if none does."""
        for step in range(len(ids)):
            if self([ids[max(0, step + 1 - self.window): step + 1]])[0]:
                return step + 1
        return None


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
    _check_inputs(prompts, num_generations, params, generator, decode)
    P, G, T_new = len(prompts), num_generations, params.max_new_tokens
    prompt_ids, prompt_mask = _left_pad(prompts, params.pad_token_id)  # (P, Tp)
    device, _ = _model_device_dtype(model)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    Tp = prompt_ids.shape[1]
    # One generator for every row, or one per prompt (then each block of a prompt's rows draws from its own).
    per_prompt = generator is not None and not isinstance(generator, torch.Generator)
    shared_generator, prompt_generators = (None, generator) if per_prompt else (generator, None)
    logits, active, routing_prompt = _prefill(model, prompt_ids, prompt_mask, G, T_new, params.return_routing,
                                              prompt_generators)
    results = _Completions.empty(P * G, T_new, params.pad_token_id, device, routing_prompt)
    eos = torch.tensor(params.eos_token_ids, dtype=torch.long, device=device) if params.eos_token_ids else None
    stop_check = StopStringChecker(params.stop_strings, decode) if params.stop_strings else None

    for step in range(T_new):
        tok, slp, lp = sample_next(logits, params.temperature, params.top_k, params.top_p,
                                   shared_generator, active.row_generators)
        results.record(active, step, tok, slp, lp)
        done = _finished(tok, results.tokens, active, step, eos, stop_check)
        results.finish(active, step, done)
        keep = [i for i, d in enumerate(done) if not d]
        width = Tp + step + 1  # attention-mask columns once this step's token is in the cache
        if params.return_routing:
            # Every row's newest token goes through the model before finished rows leave, so the routing of a
            # row's last token is recorded too; the logits of the rows that stay are then already computed.
            logits = _decode_one(model, tok, active, width, results.routing_new, step)
            if step == T_new - 1 or not keep:
                break
            active, logits = _drop_finished(active, keep, logits, G, prompt_generators)
        else:
            # Finished rows leave first and cost nothing more; the last step needs no forward at all.
            if step == T_new - 1 or not keep:
                break
            active, tok = _drop_finished(active, keep, tok, G, prompt_generators)
            logits = _decode_one(model, tok, active, width)
    return results.output(prompt_ids.repeat_interleave(G, dim=0), prompt_mask.repeat_interleave(G, dim=0))


def _check_inputs(prompts, num_generations: int, params: SamplingParams, generator, decode) -> None:
    if not prompts:
        raise ValueError("generate: prompts is empty")
    if any(len(p) == 0 for p in prompts):
        empty = [i for i, p in enumerate(prompts) if len(p) == 0]
        raise ValueError(f"generate: prompts {empty} are empty; every prompt needs at least one token")
    if num_generations < 1:
        raise ValueError(f"generate: num_generations must be >= 1, got {num_generations}")
    if params.stop_strings and decode is None:
        raise ValueError("generate: params.stop_strings needs a `decode(ids) -> str` callable (e.g. tokenizer.decode)")
    if generator is not None and not isinstance(generator, torch.Generator) and len(generator) != len(prompts):
        raise ValueError(f"generate: got {len(generator)} generators for {len(prompts)} prompts; give one per "
                         "prompt or a single torch.Generator")


@dataclass
class _Active:
    """The rows still generating and their per-row decoding state; finished rows leave it."""

    rows: torch.Tensor  # (n,) active row -> original row, on the device, for writing results
    rows_list: list[int]  # the same on the host, for bookkeeping without device syncs
    cache: LatentCache  # n rows
    attn_mask: torch.Tensor  # (n, Tp + T_new): every active row is real at every generated position
    row_generators: list[tuple[torch.Tensor, torch.Generator]] | None  # per-prompt streams, else None


def _prefill(model, prompt_ids, prompt_mask, G: int, T_new: int, return_routing: bool, generators):
    """Runs each distinct prompt once into a fresh cache, then copies the cache and the last logits G ways.

    Returns the next-token logits (P*G, V), the active batch (all P*G rows), and the prompts' routing repeated
    over the generations (per MoE layer (P*G, Tp, k)) or None. The attention mask for the whole run is
    allocated here: the decode columns are all ones.
    """
    P, Tp = prompt_ids.shape
    device, dtype = _model_device_dtype(model)
    cache = LatentCache.for_model(model.config, P, Tp + T_new, dtype, device)
    out = model(prompt_ids, attention_mask=prompt_mask, cache=cache, return_routing=return_routing)
    logits = out.logits[:, -1].repeat_interleave(G, dim=0)  # (N, V)
    attn_mask = torch.cat([prompt_mask, prompt_mask.new_ones(P, T_new)], dim=1).repeat_interleave(G, dim=0)
    routing = [r.repeat_interleave(G, dim=0) for r in out.routing] if return_routing else None
    rows_list = list(range(P * G))
    active = _Active(rows=torch.arange(P * G, device=device), rows_list=rows_list,
                     cache=cache.repeat_interleave(G), attn_mask=attn_mask,
                     row_generators=_rows_by_prompt(rows_list, G, generators, device))
    return logits, active, routing


def _decode_one(model, tok: torch.Tensor, active: _Active, width: int, routing_new=None,
                step: int | None = None) -> torch.Tensor:
    """Feeds each active row's newest token tok (n,) through the model on its cache; returns the next logits
    (n, V). With routing_new (per MoE layer (N, T_new, k)), records the token's routing at column `step`."""
    out = model(tok[:, None], attention_mask=active.attn_mask[:, :width], cache=active.cache,
                return_routing=routing_new is not None)
    if routing_new is not None:
        for buf, r in zip(routing_new, out.routing):
            buf[active.rows, step] = r[:, 0]
    return out.logits[:, -1]


def _finished(tok, tokens, active: _Active, step: int, eos, stop_check) -> list[bool]:
    """Per active row: did this step's token end it (an EOS id, or completing a stop string in the row's tail)?
    One host sync per step when stopping is possible, none otherwise."""
    done = torch.isin(tok, eos).tolist() if eos is not None else [False] * len(active.rows_list)
    if stop_check is not None:
        lo = max(0, step + 1 - stop_check.window)
        hit = stop_check(tokens[active.rows, lo : step + 1].tolist())
        done = [a or b for a, b in zip(done, hit)]
    return done


def _drop_finished(active: _Active, keep: list[int], per_row: torch.Tensor, G: int, generators):
    """Keeps only the active rows `keep` (indices into the active batch) in the active batch and in per_row,
    the one other per-row tensor the next step needs (its input tokens, or its already computed logits)."""
    if len(keep) == len(active.rows_list):
        return active, per_row
    device = active.rows.device
    idx = torch.tensor(keep, dtype=torch.long, device=device)
    rows_list = [active.rows_list[i] for i in keep]
    shrunk = _Active(rows=active.rows.index_select(0, idx), rows_list=rows_list,
                     cache=active.cache.index_select(idx), attn_mask=active.attn_mask.index_select(0, idx),
                     row_generators=_rows_by_prompt(rows_list, G, generators, device))
    return shrunk, per_row.index_select(0, idx)


@dataclass
class _Completions:
    """Per original row results, written in place as tokens are drawn."""

    tokens: torch.Tensor  # (N, T_new) pad where nothing was drawn
    sampling_logprobs: torch.Tensor  # (N, T_new) float32
    logprobs: torch.Tensor  # (N, T_new) float32
    lengths: list[int]
    finish_reasons: list[str]
    routing_prompt: list[torch.Tensor] | None  # per MoE layer (N, Tp, k)
    routing_new: list[torch.Tensor] | None  # per MoE layer (N, T_new, k)

    @classmethod
    def empty(cls, N: int, T_new: int, pad: int, device, routing_prompt) -> _Completions:
        return cls(
            tokens=torch.full((N, T_new), pad, dtype=torch.long, device=device),
            sampling_logprobs=torch.zeros((N, T_new), dtype=torch.float32, device=device),
            logprobs=torch.zeros((N, T_new), dtype=torch.float32, device=device),
            lengths=[T_new] * N,
            finish_reasons=["length"] * N,
            routing_prompt=routing_prompt,
            routing_new=None if routing_prompt is None else [r.new_zeros(N, T_new, r.shape[-1])
                                                              for r in routing_prompt],
        )

    def record(self, active: _Active, step: int, tok, sampling_logprobs, logprobs) -> None:
        self.tokens[active.rows, step] = tok
        self.sampling_logprobs[active.rows, step] = sampling_logprobs
        self.logprobs[active.rows, step] = logprobs

    def finish(self, active: _Active, step: int, done: list[bool]) -> None:
        for i, d in enumerate(done):
            if d:
                self.lengths[active.rows_list[i]] = step + 1
                self.finish_reasons[active.rows_list[i]] = "stop"

    def output(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> GenerationOutput:
        """Cut to the longest completion; prompt_ids / prompt_mask (N, Tp) as repeated for the rows."""
        Tc = max(self.lengths)
        device = self.tokens.device
        lengths = torch.tensor(self.lengths, device=device)
        completion_mask = (torch.arange(Tc, device=device)[None, :] < lengths[:, None]).long()  # (N, Tc)
        routing = None
        if self.routing_prompt is not None:
            routing = [torch.cat([rp, rn[:, :Tc]], dim=1) for rp, rn in zip(self.routing_prompt, self.routing_new)]
        return GenerationOutput(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=self.tokens[:, :Tc].contiguous(),
            completion_mask=completion_mask,
            sampling_logprobs=self.sampling_logprobs[:, :Tc].contiguous(),
            logprobs=self.logprobs[:, :Tc].contiguous(),
            finish_reasons=self.finish_reasons,
            routing=routing,
        )


def _rows_by_prompt(rows_list: list[int], G: int, generators,
                    device) -> list[tuple[torch.Tensor, torch.Generator]] | None:
    """Active-batch positions grouped by the prompt their original row belongs to, with that prompt's generator
    (None without per-prompt generators)."""
    if generators is None:
        return None
    positions: dict[int, list[int]] = {}
    for i, row in enumerate(rows_list):
        positions.setdefault(row // G, []).append(i)
    return [(torch.tensor(idx, dtype=torch.long, device=device), generators[p]) for p, idx in positions.items()]
