"""The GRPO trainer end to end on a tiny random model, on CPU: a run through scripts/train.py, exact resume, and a
reward function that fails on some samples."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_recipes import arithmetic_recipe, write_recipe

from thinkzero.model import load_model
from thinkzero.rl.config import load_config
from thinkzero.rl.optim import adamw
from thinkzero.rl.trainer import train

ROOT = Path(__file__).resolve().parents[2]
REWARDS = Path(__file__).with_name("rewards_for_tests.py")


def _recipe(tmp_path: Path, **sections) -> Path:
    recipe = arithmetic_recipe(
        tmp_path, 64, "train.jsonl",
        rollout={"num_generations": 4, "prompts_per_step": 2, "max_new_tokens": 16},
        rewards={"functions": [{"name": f"{REWARDS}:digit_fraction"}, {"name": "math_accuracy"}], "num_workers": 1},
        algorithm={"loss_type": "dapo", "beta": 0.04},
        optim={"lr": 1e-3},
        train={"max_steps": 3, "output_dir": str(tmp_path / "out"), "save_every": 2, "seed": 3},
        logging={"mode": "offline", "completions_every": 1},
    )
    for key, value in sections.items():
        recipe[key].update(value)
    return write_recipe(recipe, tmp_path / "recipe.json")


@pytest.mark.slow
def test_three_step_run_through_train_script(tmp_path):
    recipe = _recipe(tmp_path)
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), str(recipe), "train.max_steps=3"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "out"

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("reward", "reward_std", "rewards/digit_fraction/mean", "rewards/math_accuracy/std",
                "frac_reward_zero_std", "completions/mean_length", "completions/max_length",
                "completions/clipped_ratio", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "clip_ratio/region_mean", "policy_loss", "grad_norm", "learning_rate", "moe/expert_load_cv/layer0",
                "timing/rollout_s", "timing/reward_s", "timing/update_s", "throughput/tokens_per_s"):
        assert key in records[-1], key
    assert all(r["grad_norm"] > 0 for r in records)  # digit_fraction varies within groups: real gradients
    assert list((out / "wandb").glob("offline-run-*")), "no W&B offline run directory"
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {1, 2, 3} and "advantage" in rows[0] and "digit_fraction" in rows[0]

    final = out / "checkpoint-000003"
    assert (final / "COMPLETE").is_file() and (out / "checkpoint-000002" / "COMPLETE").is_file()
    start = load_file(str(tmp_path / "model" / "model.safetensors"))
    end = load_file(str(final / "model.safetensors"))
    assert start.keys() == end.keys()
    assert any(not torch.equal(start[k], end[k]) for k in start), "training did not change any parameter"

    ours = load_model(final)
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ids = torch.randint(4, ours.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_resume_gives_identical_weights(tmp_path):
    """4 steps straight == 2 steps, stop, resume: auto, 2 more steps (bitwise, single process on CPU)."""
    common = {"logging": {"mode": "disabled", "completions_every": 0, "console": False}}
    straight = _recipe(tmp_path / "a", **common, train={"max_steps": 4, "save_every": 0})
    train(load_config(straight))
    split = _recipe(tmp_path / "b", **common, train={"max_steps": 2, "save_every": 0})
    train(load_config(split))
    train(load_config(split, ["train.max_steps=4", "train.resume=auto"]))

    a, b = _weights(tmp_path / "a" / "out" / "checkpoint-000004"), _weights(tmp_path / "b" / "out" / "checkpoint-000004")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    first = _weights(tmp_path / "b" / "out" / "checkpoint-000002")
    assert any(not torch.equal(first[k], a[k]) for k in a), "steps 3-4 changed nothing: the test proves nothing"
    metrics_b = [json.loads(x) for x in (tmp_path / "b" / "out" / "metrics.jsonl").read_text().splitlines()]
    metrics_a = [json.loads(x) for x in (tmp_path / "a" / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics_b] == [1, 2, 3, 4]
    assert [m["reward"] for m in metrics_b] == [m["reward"] for m in metrics_a]


def test_failing_reward_is_contained_and_reported(tmp_path):
    recipe = _recipe(tmp_path, rewards={"functions": [{"name": f"{REWARDS}:flaky"}], "num_workers": 1},
                     logging={"mode": "disabled", "console": False}, train={"max_steps": 2, "save_every": 0})
    with pytest.warns(Warning, match="flaky"):
        train(load_config(recipe))
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert records[-1]["rewards/flaky/failures"] > 0
    assert (tmp_path / "out" / "checkpoint-000002" / "COMPLETE").is_file()


def test_moe_options_routing_replay_bias_updates_and_several_iterations(tmp_path):
    """Routing replay with mu=2 updates per rollout and auxiliary-loss-free bias updates run, log their metrics, and
    move the router bias."""
    recipe = _recipe(tmp_path, logging={"mode": "disabled", "console": False}, train={"max_steps": 2, "save_every": 0},
                     algorithm={"num_iterations": 2, "moe": {"routing_replay": True, "router_bias_update_gamma": 0.01,
                                                             "aux_loss_coef": 0.01}})
    trainer = train(load_config(recipe))
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["ratio/mean"] != 1.0  # mu=2: the second iteration is off-policy
    bias = trainer.policy.moe_layers[0].gate.e_score_correction_bias
    assert bias.abs().max() > 0, "bias updates did not move the router bias"
    saved = _weights(tmp_path / "out" / "checkpoint-000002")
    assert torch.equal(saved["model.layers.1.mlp.gate.e_score_correction_bias"], bias.cpu())


def test_old_logprobs_replay_the_rollout_routing_so_the_first_ratio_is_one(tmp_path):
    """mu=2 with routing replay: the old log-probs are the update's first forward (same replayed experts, same
    weights), so iteration 1's ratio is exactly 1 on every token; without replay in the old pass it is not."""
    from thinkzero.rl.trainer import Trainer

    recipe = _recipe(tmp_path, logging={"mode": "disabled", "console": False}, train={"max_steps": 1, "save_every": 0},
                     algorithm={"num_iterations": 2, "beta": 0.0, "moe": {"routing_replay": True}})
    trainer = Trainer(load_config(recipe))
    step, _, _ = trainer.collect()
    rb, micro = step.rollout, trainer.micro
    assert rb.routing is not None
    # The tiny model's own routing rarely differs between decode and a full forward: shift every rollout expert
    # id by one so the replayed routes surely differ from the router's choice, then recompute the old log-probs.
    E = trainer.policy.config.n_routed_experts
    rb.routing = [(r + 1) % E for r in rb.routing]
    trainer._precompute_logprobs(step)
    for s in range(0, rb.completion_ids.shape[0], micro):
        rows = slice(s, s + micro)
        logprobs, _, _ = trainer._completion_logprobs(trainer.model, rb, rows, routing=True, return_routing=True,
                                                      compute_entropy=True)
        mask = rb.completion_mask[rows].bool()
        ratio = torch.exp(logprobs.detach() - step.old_logprobs[rows])
        assert torch.equal(ratio[mask], torch.ones_like(ratio[mask]))
    trainer.scorer.close()
    trainer.tracker.close()


def test_several_mini_batches_per_rollout_clip_off_policy_tokens(tmp_path):
    """num_iterations=1 with two mini-batches: the second is off-policy, so with a tiny epsilon and a large lr its
    ratio leaves [1 - eps, 1 + eps] and clipping fires (issue 13.2: it used to be 0 on every step)."""
    recipe = _recipe(tmp_path, logging={"mode": "disabled", "console": False}, train={"max_steps": 2, "save_every": 0},
                     algorithm={"mini_batch_size": 4, "epsilon": 1e-4, "beta": 0.0}, optim={"lr": 0.01})
    train(load_config(recipe))
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["clip_ratio/region_mean"] > 0 for r in records), [r["clip_ratio/region_mean"] for r in records]


def test_bias_updates_on_a_router_without_bias_fail_at_start(tmp_path):
    from thinkzero.model.presets import write_random_model

    write_random_model("tiny", tmp_path / "v2", model_type="deepseek_v2")
    recipe = _recipe(tmp_path, model={"name_or_path": str(tmp_path / "v2"), "init_preset": None},
                     logging={"mode": "disabled", "console": False},
                     algorithm={"moe": {"router_bias_update_gamma": 0.01}})
    with pytest.raises(ValueError, match="correction bias"):
        train(load_config(recipe))


GRPO_RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts
                      and not p.name.startswith("sft"))


@pytest.mark.parametrize("recipe", GRPO_RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_grpo_recipes_parse(recipe):
    # Beyond parsing (validate already checks the shapes): every reward the recipe names resolves and accepts the
    # recipe's params, and a non-chat template puts the question into the prompt.
    from thinkzero.rewards import registry
    from thinkzero.rl.data import render_prompt

    cfg = load_config(recipe, check_paths=False)
    for spec in cfg.rewards.functions:
        entry = registry.resolve(spec.name)
        registry.bind(entry, dict(spec.params or {}))
    if cfg.data.template != "chat":
        assert "What is 2 + 3?" in render_prompt("What is 2 + 3?", cfg.data.template)


def test_dynamic_sampling_keeps_only_informative_groups(tmp_path):
    recipe = _recipe(tmp_path, rewards={"functions": [{"name": f"{REWARDS}:even_answers_only"}], "num_workers": 0},
                     algorithm={"dynamic_sampling": True, "max_extra_draws": 6, "beta": 0.0},
                     logging={"mode": "disabled", "console": False, "completions_every": 1},
                     train={"max_steps": 3, "save_every": 0})
    train(load_config(recipe))
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["dynamic_sampling/extra_draws"] for r in records) > 0, "no group was ever dropped: test proves nothing"
    for r in records:
        if r["dynamic_sampling/filled_groups"] == 0:
            assert r["frac_reward_zero_std"] == 0.0
    rows = [json.loads(line) for line in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()]
    answers = {ex["question"]: ex["answer"] for ex in map(json.loads, (tmp_path / "train.jsonl").read_text().splitlines())}
    full = {r["step"] for r in records if r["dynamic_sampling/filled_groups"] == 0}  # steps not topped up
    kept = [answers[row["prompt"]] for row in rows if row["step"] in full]
    assert kept and all(int(a) % 2 == 0 for a in kept), "an uninformative (odd-answer) group reached the update"


def test_log_probs_share_each_prompt_across_its_rows_with_the_same_numbers(tmp_path):
    """Micro-batches of whole groups, of part of a group, and misaligned ones: the forward is told to share each
    prompt over gcd(G, rows) rows when the rows allow it, and the log-probs equal the plain forward's."""
    from thinkzero.rl.trainer import Trainer

    recipe = _recipe(tmp_path, rollout={"num_generations": 4, "prompts_per_step": 3, "max_new_tokens": 8},
                     logging={"mode": "disabled", "console": False, "completions_every": 0},
                     train={"max_steps": 1, "save_every": 0})
    trainer = Trainer(load_config(recipe))
    try:
        step, _, _ = trainer.collect()
        rb, policy = step.rollout, trainer.policy.eval()
        calls = []
        forward = policy.forward

        def spy(*args, **kwargs):
            calls.append((kwargs["shared_prefix"], kwargs["group_size"]))
            return forward(*args, **kwargs)

        policy.forward = spy
        Tp = rb.prompt_ids.shape[1]
        with torch.no_grad():
            for rows, expected in [(slice(0, 12), (Tp, 4)), (slice(4, 6), (Tp, 2)), (slice(2, 4), (Tp, 2)),
                                   (slice(8, 16), (Tp, 4)), (slice(1, 3), (0, 1)), (slice(3, 6), (0, 1))]:
                calls.clear()
                lp, _, _ = trainer._completion_logprobs(policy, rb, rows)
                assert calls == [expected], (rows, calls)
                plain = forward(rb.input_ids[rows], rb.attention_mask[rows], target_ids=rb.completion_ids[rows],
                                target_start=Tp - 1).logprobs
                torch.testing.assert_close(lp, plain, rtol=1e-5, atol=1e-5)
    finally:
        trainer.tracker.close()
        trainer.scorer.close()


@pytest.mark.parametrize("coef", [0.0, 0.02])
def test_aux_loss_coef_replaces_the_checkpoints_alpha(tmp_path, coef):
    """The recipe's aux_loss_coef is the balance loss's only weight: a checkpoint's aux_loss_alpha (DeepSeek ships
    0.001) neither adds a loss the recipe turned off nor multiplies the coefficient; the saved config keeps it."""
    from thinkzero.model.presets import write_random_model
    from thinkzero.rl.trainer import Trainer

    write_random_model("tiny", tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps({**config, "aux_loss_alpha": 0.05}))
    recipe = _recipe(tmp_path, algorithm={"moe": {"aux_loss_coef": coef}},
                     logging={"mode": "disabled", "console": False, "completions_every": 0},
                     train={"max_steps": 1, "save_every": 0})
    trainer = Trainer(load_config(recipe))
    try:
        policy = trainer.policy.train()
        assert [m.gate.aux_loss_alpha for m in policy.moe_layers] == [coef] * len(policy.moe_layers)
        aux = policy(torch.randint(4, 20, (2, 12))).aux_loss
        assert (aux.item() > 0) == (coef > 0)
        assert policy.config.aux_loss_alpha == 0.05  # what save_model writes to config.json
    finally:
        trainer.tracker.close()
        trainer.scorer.close()


def test_adamw_is_fused_and_takes_the_plain_update():
    """The trainer's and SFT's optimizer: the fused AdamW kernel on CPU, with the update of torch's plain AdamW."""
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    start = [p.detach().clone() for p in params]
    fused = adamw(params, 1e-2, [0.9, 0.99], 1e-8, 0.1)
    plain = torch.optim.AdamW(twins, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    assert fused.defaults["fused"]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        fused.step()
        plain.step()
    for p, q, p0 in zip(params, twins, start):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert not torch.equal(p, p0)


def test_process_group_has_a_finite_timeout_and_the_right_backend():
    # One process needs no group; several get gloo on CPU, NCCL on GPU, and the recipe's timeout either way, so a
    # collective the ranks do not all reach fails instead of hanging (issue 19).
    import datetime

    from thinkzero.rl.distributed import process_group_kwargs

    assert process_group_kwargs(1, cuda=False, timeout_s=60) == []
    (cpu,) = process_group_kwargs(2, cuda=False, timeout_s=60)
    assert (cpu.backend, cpu.timeout) == ("gloo", datetime.timedelta(seconds=60))
    (gpu,) = process_group_kwargs(8, cuda=True, timeout_s=90.5)
    assert (gpu.backend, gpu.timeout) == ("nccl", datetime.timedelta(seconds=90.5))
