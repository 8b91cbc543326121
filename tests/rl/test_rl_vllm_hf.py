"""A transformers policy (a random tiny Qwen2) samples through the vLLM engine: vLLM's sampled-token log-probs equal
the trainer's forward, before and after a weight sync (issue 18 on the vLLM engine of issue 16). Its own module, so
its engine starts after test_rl_vllm.py's has closed."""

import os

import pytest
import torch

from thinkzero.model.generate import SamplingParams
from thinkzero.rl.config import Config

if os.environ.get("THINKZERO_SKIP_VLLM") == "1":
    pytest.skip("THINKZERO_SKIP_VLLM=1: vLLM tests skipped on request", allow_module_level=True)


def _forward_logprobs(policy, batch, temperature: float) -> torch.Tensor:
    Tp = batch.prompt_ids.shape[1]
    with torch.no_grad():
        out = policy(batch.input_ids, batch.attention_mask, target_ids=batch.completion_ids, target_start=Tp - 1,
                     temperature=temperature)
    return out.logprobs * batch.completion_mask


def test_qwen2_policy_samples_through_vllm_and_follows_its_weights(tmp_path):
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        pytest.fail(f"vllm does not import ({e}); set THINKZERO_SKIP_VLLM=1 to skip these tests")
    from thinkzero.rl.hf_policy import load_policy, load_policy_tokenizer, write_random_policy
    from thinkzero.rl.vllm_engine import VLLMEngine

    write_random_policy("tiny_qwen2", tmp_path / "model", seed=0)
    policy = load_policy(tmp_path / "model", torch.float32, "cpu").eval()
    tokenizer = load_policy_tokenizer(tmp_path / "model", "transformers")
    cfg = Config()
    cfg.data.max_prompt_length, cfg.rollout.max_new_tokens = 32, 24
    engine = VLLMEngine.from_config(cfg, policy, tokenizer, torch.device("cpu"))
    try:
        params = SamplingParams(max_new_tokens=24, temperature=1.0)
        prompts = [[5, 6, 7, 8], [9, 10, 11]]
        batch = engine.sample(prompts, 2, params, seeds=[1, 2])
        assert batch.completion_ids.shape[0] == 4 and int(batch.lengths.min()) > 0
        diff = (_forward_logprobs(policy, batch, 1.0) - batch.sampling_logprobs).abs().max()
        assert diff < 1e-3, diff
        with torch.no_grad():  # a different policy: vLLM must follow it after the sync, and not before
            for p in policy.parameters():
                p.add_(0.05 * torch.randn_like(p))
        stale = (_forward_logprobs(policy, batch, 1.0) - _resample_logprobs(engine, batch)).abs().max()
        engine.sync_weights(policy)
        synced = (_forward_logprobs(policy, batch, 1.0) - _resample_logprobs(engine, batch)).abs().max()
        assert stale > 1e-2 and synced < 1e-3, (stale, synced)
    finally:
        engine.close()


def _resample_logprobs(engine, batch) -> torch.Tensor:
    """vLLM's log-probs of the batch's own completions: each row's completion scored as prompt logprobs."""
    import test_rl_vllm

    return test_rl_vllm._vllm_logprobs(engine, batch)
