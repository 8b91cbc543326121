"""Evaluating a policy on problems with gold answers: pure estimators, then the loop that samples and grades.

Estimators (pure, no torch), per problem with n sampled completions of which c are correct:
    pass@k   unbiased estimate of P(at least one of k samples is correct) = 1 - C(n-c, k) / C(n, k)
             (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"); needs k <= n.
    maj@k    whether the most frequent final answer among the k samples is correct (ties: the answer seen first).
    pass@1   (sampled) c / n, the k = 1 case of pass@k.
A benchmark number is the mean of the per-problem values.

`evaluate_policy` samples with model.generate (one greedy completion and `num_samples` sampled ones per problem) and
grades with the reward package: rewards.math.verify for correctness, the strict `format` reward for the
<think>…</think><answer>…</answer> layout (given the rendered prompt, so a <think> the template opened counts). It returns a summary dict and one record per problem (the completions the
numbers were computed from). `score_greedy` is the trainer's periodic evaluation: greedy completions scored with
the training rewards.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: n samples, c correct. 1 - C(n-c, k)/C(n, k), computed as a product
    (1 - C(n-c,k)/C(n,k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i)) so large n never builds huge binomials."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n; got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n (k samples out of the n drawn); got n={n}, k={k}")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def majority_index(answers: Sequence[str | None]) -> int | None:
    """Index of the first sample carrying the most frequent answer (None answers do not vote); None if none voted."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        counts[answer] = counts.get(answer, 0) + 1
        first.setdefault(answer, i)
    if not counts:
        return None
    best = max(counts.values())
    return min(first[a] for a, n in counts.items() if n == best)


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool]) -> float:
    """1.0 if the majority answer of these samples is correct, else 0.0 (also when no sample gave an answer)."""
    if len(answers) != len(correct):
        raise ValueError(f"maj_at_k: {len(answers)} answers but {len(correct)} correctness flags")
    i = majority_index(answers)
    return float(i is not None and correct[i])


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


def final_answer(completion: str) -> str | None:
    """The answer a completion commits to, for voting: the <answer>/\\boxed one, else its last number."""
    from thinkzero.rewards.math import extract_answer

    answer = extract_answer(completion)
    if answer is None:
        numbers = _NUMBER_RE.findall(completion)
        answer = numbers[-1] if numbers else None
    return None if answer is None else " ".join(answer.split())


def grade(completion: str, gold: str, prompt_text: str = "") -> dict[str, Any]:
    """{'correct', 'formatted', 'answer'} for one completion; `prompt_text` is the rendered prompt it continues (a
    <think> the template opened counts towards the format, as in training)."""
    from thinkzero.rewards.format import format_reward
    from thinkzero.rewards.math import verify

    return {"correct": bool(verify(gold, completion)),
            "formatted": format_reward(completion, prompt_text) == 1.0,
            "answer": final_answer(completion)}


def ks_for(n: int) -> list[int]:
    """The k values reported for n samples: powers of two below n, and n."""
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k < n]
    return ks + [n]


def summarize(records: list[dict], num_samples: int) -> dict[str, float]:
    """Benchmark numbers from per-problem records (see evaluate_policy)."""
    out: dict[str, float] = {"num_problems": float(len(records))}
    greedy = [r["greedy"] for r in records]
    out["greedy/pass@1"] = mean([float(g["correct"]) for g in greedy])
    out["greedy/format"] = mean([float(g["formatted"]) for g in greedy])
    out["greedy/mean_length"] = mean([float(g["num_tokens"]) for g in greedy])
    if num_samples:
        samples = [r["samples"] for r in records]
        n = num_samples
        out["sampled/pass@1"] = mean([mean([float(s["correct"]) for s in ss]) for ss in samples])
        out["sampled/format"] = mean([mean([float(s["formatted"]) for s in ss]) for ss in samples])
        out["sampled/mean_length"] = mean([mean([float(s["num_tokens"]) for s in ss]) for ss in samples])
        for k in ks_for(n):
            out[f"pass@{k}"] = mean([pass_at_k(n, sum(s["correct"] for s in ss), k) for ss in samples])
        out[f"maj@{n}"] = mean([maj_at_k([s["answer"] for s in ss], [s["correct"] for s in ss]) for ss in samples])
    return out


def evaluate_policy(
    model: Any,
    tokenizer: Any,
    examples: list[dict],
    *,
    num_samples: int = 8,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    stop_strings: Sequence[str] = ("</answer>",),
    batch_size: int = 32,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Greedy and sampled completions for every example (dicts with 'prompt_ids', 'answer' and 'prompt', as
    rl.data.prepare_examples makes them), graded. Returns (summary, records); record i holds example i's prompt,
    gold answer, greedy completion and samples, each with its text, token count, finish reason and grades."""
    import torch

    from thinkzero.model.generate import SamplingParams, generate

    eos = tuple(i for i in (tokenizer.eos_token_id,) if i is not None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    common = {"max_new_tokens": max_new_tokens, "eos_token_ids": eos, "stop_strings": tuple(stop_strings),
              "pad_token_id": pad}
    greedy_params = SamplingParams(temperature=0.0, **common)
    sample_params = SamplingParams(temperature=temperature, top_p=top_p, **common)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)

    def completions(chunk: list[dict], G: int, params: SamplingParams) -> list[dict]:
        out = generate(model, [ex["prompt_ids"] for ex in chunk], G, params, generator=generator,
                       decode=tokenizer.decode)
        rows = []
        for i, (ids, mask) in enumerate(zip(out.completion_ids.cpu(), out.completion_mask.cpu())):
            text = tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
            rows.append({"text": text, "num_tokens": int(mask.sum()), "finish_reason": out.finish_reasons[i],
                         **grade(text, chunk[i // G]["answer"], chunk[i // G].get("prompt_text", ""))})
        return rows

    was_training = model.training
    model.eval()
    records: list[dict] = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            greedy = completions(chunk, 1, greedy_params)
            sampled = completions(chunk, num_samples, sample_params) if num_samples else []
            for i, ex in enumerate(chunk):
                records.append({"prompt": ex["prompt"], "answer": ex["answer"], "greedy": greedy[i],
                                "samples": sampled[i * num_samples:(i + 1) * num_samples]})
            if progress is not None:
                progress(len(records), len(examples))
    finally:
        model.train(was_training)
    return summarize(records, num_samples), records


def score_greedy(policy, examples: list[dict], params, tokenizer, scorer, columns: list[str],
                 chunk: int = 32) -> dict[str, list[float]]:
    """One greedy completion per example (`params` at temperature 0), scored with the training rewards `scorer`.
    Returns the values to average: "reward" (the weighted totals) and "<name>/mean" per reward function (the
    samples it could judge). `chunk` prompts per generate call."""
    from thinkzero.model.generate import generate as generate_ours
    from thinkzero.rl import hf_policy
    from thinkzero.rl.batch import decode_completions

    generate = hf_policy.generate if isinstance(policy, hf_policy.HFCausalLM) else generate_ours

    totals: dict[str, list[float]] = {"reward": [], **{f"{name}/mean": [] for name in scorer.names}}
    for s in range(0, len(examples), chunk):
        part = examples[s:s + chunk]
        out = generate(policy, [ex["prompt_ids"] for ex in part], 1, params, decode=tokenizer.decode)
        ids, texts = decode_completions(out, tokenizer)
        scores = scorer.score(texts, columns={c: [ex.get(c) for ex in part] for c in columns},
                              facts={"prompt": [ex["prompt"] for ex in part], "completion_ids": ids,
                                     "num_tokens": out.completion_mask.sum(1).tolist(),
                                     "finish_reason": list(out.finish_reasons)})
        totals["reward"].extend(scores.total)
        for name, values in scores.per_function.items():
            totals[f"{name}/mean"].extend(v for v in values if v is not None)
    return totals
