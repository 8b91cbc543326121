"""Cold-start SFT: recipe loading, the completion-only mask, and a short run that lowers the loss and writes a model
directory the GRPO side loads."""

import json

import pytest
import torch

from thinkzero.model import load_model, load_tokenizer
from thinkzero.model.presets import write_random_model
from thinkzero.model.tokenizer import build_char_tokenizer
from thinkzero.rl.arithmetic import Difficulty, make_problems, write_jsonl
from thinkzero.rl.config import ConfigError, load_config
from thinkzero.rl.sft import build_sft_examples, collate, completion_nll, load_sft_config, train_sft


def _recipe(tmp_path, **sections):
    data = write_jsonl(make_problems(8, seed=0, difficulty=Difficulty(num_ops=1, max_value=5)), tmp_path / "sft.jsonl")
    recipe = {
        "model": {"name_or_path": str(tmp_path / "model"), "init_preset": "tiny"},
        "data": {"source": str(data), "prompt_column": "question", "completion_column": "solution",
                 "template": "{prompt}\n"},
        "optim": {"lr": 3e-3},
        "train": {"max_steps": 30, "batch_size": 8, "output_dir": str(tmp_path / "sft"), "seed": 1},
        "logging": {"mode": "disabled", "console": False},
    }
    for key, value in sections.items():
        recipe[key].update(value)
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(recipe))
    return path


def test_unknown_keys_and_bad_values_are_errors(tmp_path):
    recipe = _recipe(tmp_path)
    with pytest.raises(ConfigError, match="did you mean 'train.epochs'"):
        load_sft_config(recipe, ["train.epoch=2"])
    with pytest.raises(ConfigError, match="train.batch_size must be >= 1"):
        load_sft_config(recipe, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match="model.init_preset must be one of"):
        load_sft_config(recipe, ["model.init_preset=huge"])
    cfg = load_sft_config(recipe, ["data.template=Q: {prompt}\nA:", "optim.lr=1e-4"])
    assert cfg.data.template == "Q: {prompt}\nA:" and cfg.optim.lr == 1e-4  # text kept verbatim; numbers parsed


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.eps=0", "optim.eps must be > 0; got 0.0"),
        ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0; got -0.1"),
        ("optim.warmup_steps=-1", "optim.warmup_steps must be >= 0; got -1"),
        ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio must be in [0, 1]; got 1.5"),
        ("optim.max_grad_norm=0", "optim.max_grad_norm must be > 0 or null (no clipping); got 0.0"),
        ("optim.max_consecutive_skips=0", "optim.max_consecutive_skips must be >= 1; got 0"),
        ("optim.schedule=linear", "config 'optim.schedule' must be one of 'constant', 'cosine'; got 'linear'"),
        ("logging.log_every=0", "logging.log_every must be >= 1; got 0"),
        ("data.system_prompt=be brief", "data.system_prompt is only used with data.template: chat"),
        ("data.source=/no/such/sft.jsonl", "data.source: path '/no/such/sft.jsonl' does not exist"),
        ("model.tokenizer=./no/such/tokenizer", "model.tokenizer: path './no/such/tokenizer' does not exist"),
    ],
)
def test_shared_sections_are_checked_as_grpo_checks_them(tmp_path, override, message):
    """SFT's optim, logging and shared model/data fields go through GRPO's checkers: same rule, same words."""
    with pytest.raises(ConfigError) as sft_error:
        load_sft_config(_recipe(tmp_path), [override])
    assert message in str(sft_error.value)
    grpo = ["model.name_or_path=org/model", "data.source=openai/gsm8k", override]  # hub ids: only override's path
    with pytest.raises(ConfigError) as grpo_error:
        load_config(None, grpo)
    assert message in str(grpo_error.value)


def test_an_unknown_key_hint_names_an_sft_key(tmp_path):
    """The hint looks in SFT's recipe, not GRPO's: rollout.max_new_tokens does not exist here."""
    with pytest.raises(ConfigError, match="valid keys here: epochs, max_steps, batch_size, seed, output_dir"):
        load_sft_config(_recipe(tmp_path), ["train.max_new_tokens=3"])
    with pytest.raises(ConfigError, match="did you mean 'optim.lr'"):
        load_sft_config(_recipe(tmp_path), ["train.lr=1e-3"])


def test_only_completion_tokens_are_targets():
    tok = build_char_tokenizer(vocab_size=128)
    rows = [{"q": "ab", "s": "xyz"}, {"q": "abcdef", "s": "w"}]
    examples, dropped = build_sft_examples(rows, tok, prompt_column="q", completion_column="s", template="{prompt}:")
    assert dropped == 0
    # row 0: prompt "ab:" (3 tokens) + "xyz" + <eos> = 7 tokens; positions 2..5 predict x, y, z, <eos>
    assert examples[0]["num_prompt_tokens"] == 3 and len(examples[0]["input_ids"]) == 7
    assert examples[0]["input_ids"][-1] == tok.eos_token_id
    input_ids, attention_mask, loss_mask = collate(examples, pad_token_id=0)
    assert input_ids.shape == (2, 9)  # row 1: "abcdef:" + "w" + <eos> = 9 tokens
    assert attention_mask[0].tolist() == [1] * 7 + [0, 0]  # right padding
    assert loss_mask[0].tolist() == [0, 0, 1, 1, 1, 1, 0, 0, 0]
    assert loss_mask[1].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 0]  # ':' predicts "w", "w" predicts <eos>
    # too long -> dropped and counted
    _, dropped = build_sft_examples(rows, tok, prompt_column="q", completion_column="s", template="{prompt}:",
                                    max_length=7)
    assert dropped == 1


def test_loss_ignores_prompt_tokens(tmp_path):
    """Changing the prompt's *targets* cannot change the loss: only completion positions count. (Changing the
    prompt's tokens changes the context, so we compare against a hand-masked mean instead.)"""
    policy = write_random_model("tiny", tmp_path / "m", seed=0)
    tok = build_char_tokenizer(vocab_size=128)
    examples, _ = build_sft_examples([{"q": "1+2", "s": "3"}], tok, prompt_column="q", completion_column="s",
                                     template="{prompt}=")
    input_ids, attention_mask, loss_mask = collate(examples, pad_token_id=0)
    loss, logprobs = completion_nll(policy, input_ids, attention_mask, loss_mask)
    # positions 3 ('=' -> '3') and 4 ('3' -> <eos>) are the only targets
    expected = -(logprobs[0, 3] + logprobs[0, 4]) / 2
    torch.testing.assert_close(loss, expected)


def test_short_run_lowers_loss_and_writes_a_loadable_model(tmp_path):
    cfg = load_sft_config(_recipe(tmp_path))
    out = train_sft(cfg)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses  # it learns the 8 worked examples
    model = load_model(out)
    tok = load_tokenizer(out)
    assert model.config.vocab_size == 128 and tok.eos_token_id == 2
    assert (out / "sft_config.yaml").is_file() and (tmp_path / "model" / "config.json").is_file()


def test_without_the_console_bar_sft_prints_a_progress_line_every_tenth_of_the_run(tmp_path, capsys):
    cfg = load_sft_config(_recipe(tmp_path, train={"max_steps": 20}))  # console: false
    out = train_sft(cfg)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sft step")]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    # 20 steps // 10 lines = every 2nd step; each line shows the loss logged at that step
    assert [line.split()[2] for line in lines] == [f"{s}/20" for s in range(2, 21, 2)]
    assert [line.split()[4] for line in lines] == [f"{losses[s - 1]:.4g}" for s in range(2, 21, 2)]
    assert all(line.endswith("steps/s") for line in lines)

