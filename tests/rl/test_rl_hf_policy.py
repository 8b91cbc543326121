"""Transformers models as the policy (rl.hf_policy): the forward contract ours has, shared-prefix parity in values and
gradients, chunked log-probs, the loader's choice and its errors, sampling through transformers' generate, and the
trainer on a tiny Qwen: the CPU recipe, checkpoints transformers opens, exact resume, MoE, ZeRO-3 with 2 processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_recipes import arithmetic_recipe, write_recipe

from thinkzero.model.generate import SamplingParams
from thinkzero.model.presets import write_random_model
from thinkzero.model.transformer import DeepseekForCausalLM
from thinkzero.rl.config import ConfigError, load_config
from thinkzero.rl.hf_policy import (
    HF_PRESETS,
    HFCausalLM,
    HFGenerateEngine,
    PolicyError,
    check_engine,
    check_moe_options,
    load_policy,
    load_policy_tokenizer,
    policy_kind,
    save_policy,
    write_random_hf_model,
)
from thinkzero.rl.hf_policy import generate as hf_generate
from thinkzero.rl.rollout import _unhooked_twin
from thinkzero.rl.trainer import train

transformers = pytest.importorskip("transformers")
REWARDS = Path(__file__).with_name("rewards_for_tests.py")


def tiny(name: str, seed: int = 0) -> HFCausalLM:
    fields = dict(HF_PRESETS[name])
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(seed)
    return HFCausalLM(config)


def grouped_batch(P=2, G=3, Tp=6, Tc=5, V=128, seed=1):
    """P prompts (the first left-padded by 2) with G right-padded completions each, prompt-major."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(4, V, (P, Tp), generator=g).repeat_interleave(G, dim=0)
    prompt_mask = torch.ones(P, Tp, dtype=torch.long)
    prompt_mask[0, :2] = 0
    prompt_mask = prompt_mask.repeat_interleave(G, dim=0)
    completion = torch.randint(4, V, (P * G, Tc), generator=g)
    completion_mask = torch.ones(P * G, Tc, dtype=torch.long)
    completion_mask[1, 3:] = 0
    completion_mask[4, 1:] = 0
    return torch.cat([prompt, completion], 1), torch.cat([prompt_mask, completion_mask], 1), completion, \
        completion_mask


def assert_grads_close(actual: dict, expected: dict, rel: float = 2e-6) -> None:
    """Every gradient within rel * (its largest entry) of the expected one: fp32 sums in another order, no more."""
    assert set(actual) == set(expected)
    for n, g in expected.items():
        err = float((actual[n] - g).abs().max())
        assert err <= rel * float(g.abs().max()), f"{n}: max error {err} vs max {float(g.abs().max())}"


def logprobs_and_grads(model, ids, mask, completion, completion_mask, **kwargs):
    model.zero_grad(set_to_none=True)
    Tp = ids.shape[1] - completion.shape[1]
    out = model(ids, mask, target_ids=completion, target_start=Tp - 1, compute_entropy=True,
                return_routing=bool(model.moe_layers), **kwargs)
    loss = (out.logprobs * completion_mask).sum() + 0.1 * (out.entropy * completion_mask).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("name", ["tiny_qwen2", "tiny_qwen3_moe"])
def test_shared_prefix_logprobs_and_gradients_equal_the_plain_forward(name):
    model = tiny(name).train()
    ids, mask, completion, completion_mask = grouped_batch()
    plain, plain_grads = logprobs_and_grads(model, ids, mask, completion, completion_mask)
    shared, shared_grads = logprobs_and_grads(model, ids, mask, completion, completion_mask,
                                              shared_prefix=6, group_size=3)
    torch.testing.assert_close(shared.logprobs, plain.logprobs, rtol=0, atol=2e-6)
    torch.testing.assert_close(shared.entropy, plain.entropy, rtol=0, atol=2e-6)
    assert len(plain_grads) == len(list(model.parameters()))
    assert_grads_close(shared_grads, plain_grads)
    # The prompt's keys and values carry gradient: without them the first layer's k/v projections get none from
    # the completions' targets, and their gradient would differ from the plain forward's.
    assert plain_grads["hf.model.layers.0.self_attn.k_proj.weight"].abs().sum() > 0
    if name == "tiny_qwen3_moe":
        assert len(plain.routing) == 2 and plain.routing[0].shape == (6, 11, 2)
        for a, b in zip(shared.routing, plain.routing):
            assert torch.equal(a, b)
        for a, b in zip(shared.expert_counts, plain.expert_counts):
            assert torch.equal(a, b) and int(a.sum()) == 6 * 11 * 2


def test_gradient_checkpointing_gives_the_same_logprobs_and_gradients():
    """Checkpointed layers run twice, which a cache would see twice: the shared prefix then takes the plain path,
    with the same numbers."""
    model = tiny("tiny_qwen2").train()
    ids, mask, completion, completion_mask = grouped_batch()
    plain, plain_grads = logprobs_and_grads(model, ids, mask, completion, completion_mask)
    model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.hf.model.layers)
    shared, shared_grads = logprobs_and_grads(model, ids, mask, completion, completion_mask,
                                              shared_prefix=6, group_size=3)
    torch.testing.assert_close(shared.logprobs, plain.logprobs, rtol=0, atol=2e-6)
    assert_grads_close(shared_grads, plain_grads)


@pytest.mark.parametrize("name", ["tiny_qwen2", "tiny_qwen3_moe"])
def test_logprobs_are_transformers_own_and_ignore_left_padding(name):
    """Our target log-probs and entropy equal a log-softmax over transformers' own logits, and a left-padded row
    scores exactly what the same row without padding does (positions count real tokens only)."""
    model = tiny(name).eval()
    ids, mask, completion, _ = grouped_batch()
    with torch.no_grad():
        out = model(ids, mask, target_ids=completion, target_start=5, compute_entropy=True, temperature=0.7)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model.hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, 5:-1].float() / 0.7
        expected = logits.log_softmax(-1).gather(-1, completion[..., None])[..., 0]
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        alone = model(ids[:1, 2:], target_ids=completion[:1], target_start=3, temperature=0.7).logprobs  # 2 pads
    torch.testing.assert_close(out.logprobs, expected, rtol=0, atol=2e-6)
    torch.testing.assert_close(out.entropy, entropy, rtol=0, atol=2e-5)
    torch.testing.assert_close(out.logprobs[:1], alone, rtol=0, atol=2e-6)


def test_chunked_logprobs_never_hold_the_whole_sequence_of_logits():
    """With a budget of one row's logits per chunk, lm_head sees one position at a time and the numbers (and the
    gradients, recomputed per chunk) equal those of a single chunk."""
    model = tiny("tiny_qwen2").train()
    ids, mask, completion, completion_mask = grouped_batch()
    whole, whole_grads = logprobs_and_grads(model, ids, mask, completion, completion_mask)
    widths = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: widths.append(out.shape[1]))
    model.logprob_chunk_elems = ids.shape[0] * model.config.vocab_size  # one position per chunk
    chunked, chunked_grads = logprobs_and_grads(model, ids, mask, completion, completion_mask)
    hook.remove()
    assert set(widths) == {1} and len(widths) >= completion.shape[1]
    torch.testing.assert_close(chunked.logprobs, whole.logprobs, rtol=0, atol=1e-6)
    assert_grads_close(chunked_grads, whole_grads)


def test_routing_replay_and_a_cache_are_refused_with_a_reason():
    model = tiny("tiny_qwen3_moe")
    ids = torch.randint(4, 128, (2, 5))
    with pytest.raises(PolicyError, match="routing replay needs our own MoE.*routing_replay to false"):
        model(ids, routing=[torch.zeros(2, 5, 2, dtype=torch.long)] * 2)
    with pytest.raises(PolicyError, match="router_bias_update_gamma to 0"):
        model.update_router_bias([torch.ones(8)] * 2, 0.01)
    with pytest.raises(PolicyError, match="takes no cache"):
        model(ids, cache=object())


def test_load_policy_picks_ours_for_deepseek_and_transformers_otherwise(tmp_path):
    write_random_model("tiny", tmp_path / "ds")
    saved = write_random_hf_model("tiny_qwen2", tmp_path / "qwen", seed=3)
    assert isinstance(load_policy(tmp_path / "ds"), DeepseekForCausalLM)
    assert policy_kind(tmp_path / "ds", "transformers") == "transformers"
    qwen = load_policy(tmp_path / "qwen", torch.float32)
    assert isinstance(qwen, HFCausalLM) and not qwen.training
    ids = torch.randint(4, 128, (2, 7))
    with torch.no_grad():
        assert torch.equal(qwen(ids).logits, saved.eval()(ids).logits)
        # and the directory is a plain transformers checkpoint
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qwen", dtype=torch.float32)
        assert torch.equal(theirs(ids).logits, qwen(ids).logits)
    with pytest.raises(PolicyError, match="'thinkzero' implements deepseek_v2, deepseek_v3 only; this model is "
                                          "'qwen2': use model.policy auto or transformers"):
        load_policy(tmp_path / "qwen", policy="thinkzero")
    with pytest.raises(PolicyError, match="must be auto, thinkzero or transformers; got 'hf'"):
        load_policy(tmp_path / "qwen", policy="hf")


def _config_only(path, **config):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


def _remote_code_model(path):
    """A model directory whose model_type only its own shipped code implements (a renamed Qwen2)."""
    (path).mkdir()
    (path / "configuration_custom.py").write_text(
        "from transformers import Qwen2Config\n\n\nclass CustomConfig(Qwen2Config):\n    model_type = 'custom_lm'\n")
    (path / "modeling_custom.py").write_text(
        "from transformers import Qwen2ForCausalLM\n\nfrom .configuration_custom import CustomConfig\n\n\n"
        "class CustomLM(Qwen2ForCausalLM):\n    config_class = CustomConfig\n")
    write_random_hf_model("tiny_qwen2", path / "weights")
    config = json.loads((path / "weights" / "config.json").read_text())
    config.update(model_type="custom_lm", architectures=["CustomLM"],
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomLM"})
    (path / "config.json").write_text(json.dumps(config))
    (path / "weights" / "model.safetensors").rename(path / "model.safetensors")
    return path


def test_unknown_model_types_and_remote_code_get_one_clear_message(tmp_path):
    unknown = _config_only(tmp_path / "unknown", model_type="no_such_model")
    with pytest.raises(PolicyError, match="'no_such_model' is not known to transformers .* ships no code"):
        load_policy(unknown)
    remote = _remote_code_model(tmp_path / "remote")
    with pytest.raises(PolicyError, match="shipped with the checkpoint; running it needs "
                                          r"model.trust_remote_code: true \(only for code you trust\)"):
        load_policy(remote)
    # Opting in runs the shipped code, and says so; ZeRO-3's sampling twin finds the same class.
    with pytest.warns(UserWarning, match="running the model code shipped with the checkpoint"):
        model = load_policy(remote, trust_remote_code=True)
    assert type(model.hf).__name__ == "CustomLM"
    ids = torch.randint(4, 128, (1, 6))
    with torch.no_grad():
        assert torch.equal(_unhooked_twin(model)(ids).logits, model(ids).logits)
    with pytest.raises(PolicyError, match="no config.json"):
        load_policy(tmp_path)


def test_transformers_tokenizer_renders_the_chat_template_with_a_system_prompt(tmp_path):
    write_random_hf_model("tiny_qwen2", tmp_path)
    ours, theirs = load_policy_tokenizer(tmp_path, "thinkzero"), load_policy_tokenizer(tmp_path, "transformers")
    messages = [{"role": "system", "content": "Think first."}, {"role": "user", "content": "2+3?"}]
    text = theirs.apply_chat_template(messages)
    assert text == ours.apply_chat_template(messages) == "<bos>system: Think first.\nuser: 2+3?\nassistant: "
    assert theirs.encode(text) == ours.encode(text)
    assert (theirs.eos_token_id, theirs.pad_token_id, theirs.vocab_size) == (2, 0, 128)
    assert theirs.decode(theirs.encode("7*8"), skip_special_tokens=True) == "7*8"


def test_generate_engine_samples_per_prompt_streams_with_the_policys_logprobs(tmp_path):
    write_random_hf_model("tiny_qwen2", tmp_path)
    model, tokenizer = load_policy(tmp_path), load_policy_tokenizer(tmp_path, "transformers")
    engine = HFGenerateEngine(model, tokenizer, torch.device("cpu"))
    params = SamplingParams(max_new_tokens=10, temperature=0.8, top_k=40, eos_token_ids=(2,), stop_strings=("5",),
                            pad_token_id=0)
    prompts = [tokenizer.encode("12+3="), tokenizer.encode("what is 7*8?")]
    batch = engine.sample(prompts, 3, params, seeds=[11, 12])
    assert batch.completion_ids.shape[0] == 6 and batch.group_index.tolist() == [0, 0, 0, 1, 1, 1]
    # A prompt's completions do not depend on what else is in the batch.
    alone = engine.sample(prompts[1:], 3, params, seeds=[12])
    n = alone.completion_ids.shape[1]
    assert torch.equal(batch.completion_ids[3:, :n], alone.completion_ids)
    # Cut right after a stop string, and 'stop' then; otherwise max_new_tokens and 'length'.
    for row, reason, length in zip(batch.completion_ids, batch.finish_reasons, batch.lengths.tolist()):
        text = tokenizer.decode(row[:length])
        assert (reason == "stop") == ("5" in text or 2 in row[:length].tolist())
        assert reason == "stop" or length == 10
    # Sampling log-probs are the tempered, top-k filtered policy's: at top_k = V they equal the forward's.
    full = SamplingParams(max_new_tokens=6, temperature=0.8, top_k=0, pad_token_id=0)
    batch = engine.sample(prompts, 2, full, seeds=[1, 2])
    with torch.no_grad():
        out = model(batch.input_ids, batch.attention_mask, target_ids=batch.completion_ids,
                    target_start=batch.prompt_ids.shape[1] - 1, temperature=0.8)
    torch.testing.assert_close(out.logprobs * batch.completion_mask, batch.sampling_logprobs, rtol=0, atol=1e-5)


def test_save_policy_writes_a_directory_transformers_and_we_load_alike(tmp_path):
    model = tiny("tiny_qwen3_moe", seed=5).eval()
    save_policy(model, tmp_path)
    ids = torch.randint(4, 128, (2, 7))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, model(ids).logits)
        assert torch.equal(load_policy(tmp_path)(ids).logits, model(ids).logits)


def test_engine_and_moe_options_that_cannot_work_are_refused_by_name():
    with pytest.raises(PolicyError, match="'thinkzero' samples DeepSeek-V2/V3 models only .* set rollout.engine to "
                                          "vllm, or to transformers"):
        check_engine("transformers", "thinkzero")
    with pytest.raises(PolicyError, match="'transformers' samples transformers policies"):
        check_engine("thinkzero", "transformers")
    for kind, engine in (("transformers", "vllm"), ("transformers", "transformers"), ("thinkzero", "thinkzero")):
        check_engine(kind, engine)
    moe, dense = tiny("tiny_qwen3_moe"), tiny("tiny_qwen2")
    with pytest.raises(PolicyError, match="algorithm.moe.aux_loss_coef and algorithm.moe.routing_replay: supported "
                                          "for our DeepSeek MoE only; this qwen3_moe model"):
        check_moe_options(moe, 0.01, 0.0, True)
    check_moe_options(moe, 0.0, 0.0, False)
    check_moe_options(dense, 0.01, 0.01, True)  # no MoE layers: nothing these options would touch


def test_greedy_generate_takes_the_policys_argmax_and_logs_its_logprobs(tmp_path):
    write_random_hf_model("tiny_qwen2", tmp_path, seed=4)
    model = load_policy(tmp_path)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, pad_token_id=0)
    batch = hf_generate(model, [[1, 20, 30, 40], [1, 50]], 1, params)
    with torch.no_grad():
        logits = model(batch.input_ids, batch.attention_mask).logits[:, batch.prompt_ids.shape[1] - 1:-1].float()
    assert batch.lengths.tolist() == [8, 8] and batch.finish_reasons == ["length", "length"]
    assert torch.equal(batch.completion_ids, logits.argmax(-1))
    expected = logits.log_softmax(-1).gather(-1, batch.completion_ids[..., None])[..., 0]
    torch.testing.assert_close(batch.sampling_logprobs, expected, rtol=0, atol=1e-5)


# ---- the trainer on a transformers policy ------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def _qwen_recipe(root: Path, preset: str = "tiny_qwen2", **train) -> Path:
    recipe = arithmetic_recipe(
        root, 32, model={"name_or_path": str(root / "model"), "init_preset": preset, "dtype": "float32"},
        rollout={"num_generations": 4, "prompts_per_step": 2, "max_new_tokens": 12, "engine": "transformers"},
        rewards={"functions": [{"name": f"{REWARDS}:digit_fraction"}], "num_workers": 0},
        algorithm={"loss_type": "dapo", "beta": 0.04},
        optim={"lr": 1e-3},
        train={"max_steps": 3, "output_dir": str(root / "out"), "save_every": 0, "seed": 3, **train},
        logging={"mode": "disabled", "completions_every": 0, "console": False})
    return write_recipe(recipe, root / "recipe.json")


@pytest.mark.slow
def test_tiny_qwen_recipe_trains_three_steps_through_the_train_script(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), str(ROOT / "recipes" / "tiny-qwen-cpu.yaml"),
         "train.max_steps=3", "train.eval_every=3", f"train.output_dir={tmp_path / 'out'}",
         f"model.name_or_path={tmp_path / 'model'}", "logging.mode=offline"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "transformers' generate" in proc.stdout and "slow path" in proc.stdout
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "policy_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "rewards/math_accuracy/mean",
                "completions/mean_length", "completions/clipped_ratio", "kl", "entropy", "clip_ratio/region_mean",
                "mismatch/kl", "grad_norm", "learning_rate", "timing/rollout_s", "throughput/tokens_per_s"):
        assert key in steps[-1], key
    assert all(r["grad_norm"] > 0 for r in steps)
    assert [r["step"] for r in records if "eval/reward" in r] == [3]  # greedy evaluation through generate too
    start = load_file(str(tmp_path / "model" / "model.safetensors"))
    end = load_file(str(tmp_path / "out" / "checkpoint-000003" / "model.safetensors"))
    assert start.keys() == end.keys()
    assert any(not torch.equal(start[k], end[k]) for k in start), "training did not change any parameter"


def test_checkpoint_opens_in_transformers_with_the_trained_models_logits(tmp_path):
    trainer = train(load_config(_qwen_recipe(tmp_path)))
    final = tmp_path / "out" / "checkpoint-000003"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, trainer.policy.eval().hf(ids).logits)
    assert isinstance(load_policy_tokenizer(final, "transformers").hf, transformers.PreTrainedTokenizerBase)


def test_resume_on_a_transformers_policy_is_exact(tmp_path):
    """4 steps straight == 2 steps, stop, resume: auto, 2 more steps (bitwise)."""
    train(load_config(_qwen_recipe(tmp_path / "a", max_steps=4)))
    split = _qwen_recipe(tmp_path / "b", max_steps=2)
    train(load_config(split))
    train(load_config(split, ["train.max_steps=4", "train.resume=auto"]))
    a = load_file(str(tmp_path / "a" / "out" / "checkpoint-000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "out" / "checkpoint-000004" / "model.safetensors"))
    mid = load_file(str(tmp_path / "b" / "out" / "checkpoint-000002" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(mid[k], a[k]) for k in a), "steps 3-4 changed nothing: the test proves nothing"


def test_a_transformers_moe_policy_trains_and_reports_expert_load(tmp_path):
    trainer = train(load_config(_qwen_recipe(tmp_path, "tiny_qwen3_moe", max_steps=2)))
    assert trainer.moe_layers == 2
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["moe/expert_load_cv/layer0"] > 0 and r["grad_norm"] > 0 for r in records)


def test_our_engine_for_a_transformers_model_is_a_recipe_error(tmp_path):
    recipe = json.loads(_qwen_recipe(tmp_path).read_text())
    recipe["rollout"]["engine"] = "thinkzero"
    with pytest.raises(ConfigError, match="rollout.engine 'thinkzero' samples DeepSeek-V2/V3 models only"):
        load_config(write_recipe(recipe, tmp_path / "bad.json"))


@pytest.mark.slow
def test_zero3_with_two_processes_learns_what_one_process_learns(tmp_path):
    """As tests/rl/test_rl_distributed.py for our model: same tokens sampled (per-prompt streams), float rounding
    only (measured: metrics 2e-6 relative, final weights 1.4e-5 of how far training moved them)."""
    recipe = _qwen_recipe(tmp_path, max_steps=4)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("WORLD_SIZE", None)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    zero3 = ["-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes" / "accelerate" / "zero3-cpu.yaml"),
             "--main_process_port", str(_free_port())]
    runs = {}
    for name, launch in (("single", []), ("zero3", zero3)):
        cmd = [sys.executable, *launch, str(ROOT / "scripts" / "train.py"), str(recipe),
               f"train.output_dir={tmp_path / name}", "algorithm.micro_batch_size=2"]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-6000:]
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    for want, have in zip(runs["single"], runs["zero3"], strict=True):
        for key in ("reward", "policy_loss", "kl", "entropy", "grad_norm", "completions/mean_length"):
            assert have[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), f"step {want['step']} {key}"
    start = load_file(str(tmp_path / "model" / "model.safetensors"))
    single, zero3 = (load_file(str(tmp_path / n / "checkpoint-000004" / "model.safetensors")) for n in runs)
    moved = torch.sqrt(sum(((single[k] - start[k]).double() ** 2).sum() for k in start))
    differ = torch.sqrt(sum(((single[k] - zero3[k]).double() ** 2).sum() for k in start))
    assert moved > 1e-3 and differ < 0.02 * moved, (float(moved), float(differ))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
