"""The policy on a CUDA device: the same numbers as on the CPU (fp32), a sane bf16 path, and the GPU-side pieces
(batched experts, shared-prefix forward, the sampling engine with per-prompt generators). Skipped without CUDA;
`scripts/gpu_check.sh` runs these and the GPU benchmarks on a machine that has one."""

import pytest
import torch

from thinkzero.model.generate import SamplingParams, generate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 matmuls would differ from the CPU by ~1e-3; these tests compare fp32 to fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def batch(B: int = 4, T: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 40, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # one left-padded row
    return ids, mask


def test_fp32_forward_and_logprobs_match_the_cpu(tiny_model):
    cpu = tiny_model()
    gpu = tiny_model().cuda()
    ids, mask = batch()
    with torch.no_grad():
        expected = cpu(ids, mask).logits
        got = gpu(ids.cuda(), mask.cuda()).logits.cpu()
        lp_cpu = cpu(ids, mask, target_ids=ids[:, 1:]).logprobs
        lp_gpu = gpu(ids.cuda(), mask.cuda(), target_ids=ids[:, 1:].cuda()).logprobs.cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lp_gpu, lp_cpu, rtol=1e-4, atol=1e-4)


def test_bf16_logprobs_close_to_fp32_and_finite(tiny_model):
    fp32 = tiny_model().cuda()
    bf16 = tiny_model().cuda().to(torch.bfloat16)
    ids, mask = batch()
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        lp32 = fp32(ids, mask, target_ids=ids[:, 1:]).logprobs
        lp16 = bf16(ids, mask, target_ids=ids[:, 1:]).logprobs
    assert lp16.dtype == torch.float32 and torch.isfinite(lp16).all()
    real = mask[:, 1:].bool()
    assert (lp16 - lp32)[real].abs().mean() < 0.05


def test_shared_prefix_and_batched_experts_on_cuda(tiny_model):
    model = tiny_model().cuda().train()
    P, G, Tp, Tc = 2, 4, 6, 5
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(4, 40, (P, Tp), generator=g).repeat_interleave(G, 0)
    ids = torch.cat([prompts, torch.randint(4, 40, (P * G, Tc), generator=g)], dim=1).cuda()
    mask = torch.ones_like(ids)
    targets = ids[:, Tp:]
    plain = model(ids, mask, target_ids=targets, target_start=Tp - 1)
    shared = model(ids, mask, target_ids=targets, target_start=Tp - 1, shared_prefix=Tp, group_size=G)
    torch.testing.assert_close(shared.logprobs, plain.logprobs, rtol=1e-5, atol=1e-5)
    experts = model.moe_layers[0].experts
    sizes = [3, 0, 1, 7, 0, 2, 2, 1]  # the tiny preset's 8 experts, some idle
    assert experts.num_experts == len(sizes)
    xs = torch.randn(sum(sizes), model.config.hidden_size, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(experts._batched(xs, torch.tensor(sizes, device="cuda"), max(sizes)),
                                   experts._looped(xs, sizes), rtol=1e-5, atol=1e-5)


def test_generate_on_cuda_greedy_matches_cpu_and_seeds_repeat(tiny_model):
    cpu = tiny_model()
    gpu = tiny_model().cuda()
    prompts = [[5, 9, 13, 17], [6, 7], [20, 21, 22]]
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    out_cpu = generate(cpu, prompts, 2, greedy)
    out_gpu = generate(gpu, prompts, 2, greedy)
    same = (out_gpu.completion_ids.cpu() == out_cpu.completion_ids).float().mean()
    assert same > 0.9, f"only {same:.0%} of greedy tokens agree between CUDA and CPU"

    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9)

    def draw(seed):
        gens = [torch.Generator(device="cuda").manual_seed(seed + i) for i in range(len(prompts))]
        return generate(gpu, prompts, 4, sampled, generator=gens)

    a, b = draw(0), draw(0)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert not torch.equal(a.completion_ids, draw(100).completion_ids)
    with torch.no_grad():  # the sampler's log-probs are what a full forward gives
        full = gpu(torch.cat([a.prompt_ids, a.completion_ids], 1), torch.cat([a.prompt_mask, a.completion_mask], 1),
                   target_ids=a.completion_ids, target_start=a.prompt_ids.shape[1] - 1).logprobs
    real = a.completion_mask.bool()
    torch.testing.assert_close(a.logprobs[real], full[real], rtol=1e-4, atol=1e-4)
