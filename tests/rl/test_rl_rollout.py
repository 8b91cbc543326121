"""The rollout's hook-free twin of a policy (what ZeRO-3 sampling runs on) computes exactly what the policy does."""

import pytest
import torch

from thinkzero.model.config import ModelConfig
from thinkzero.model.presets import preset
from thinkzero.model.transformer import DeepseekForCausalLM
from thinkzero.rl.rollout import _unhooked_twin


@pytest.mark.parametrize("tied", [False, True])
def test_twin_shares_every_tensor_and_gives_the_same_logits(tied):
    torch.manual_seed(0)
    policy = DeepseekForCausalLM(ModelConfig.from_dict({**preset("tiny"), "tie_word_embeddings": tied})).eval()
    with torch.no_grad():
        for moe in policy.moe_layers:
            moe.gate.e_score_correction_bias.normal_()
    twin = _unhooked_twin(policy)
    assert not any(t.is_meta for t in list(twin.parameters()) + list(twin.buffers()))
    ours = dict(policy.state_dict(keep_vars=True))
    for name, t in twin.state_dict(keep_vars=True).items():
        assert t.data_ptr() == ours[name].data_ptr(), f"{name} is a copy, not shared"
    assert (twin.lm_head.weight is twin.model.embed_tokens.weight) == tied
    ids = torch.randint(4, policy.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, policy(ids).logits)
