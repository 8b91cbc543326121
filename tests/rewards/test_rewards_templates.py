"""Every shipped prompt template and the format rewards agree: a completion that continues the rendered prompt in
the layout it asks for earns the full format reward, one that leaves out the answer block earns none.

Scored as the trainer scores: examples from rl.data.prepare_examples, every column but the token ids, through
rewards.Scorer (the same door as any user reward)."""

import pytest

from thinkzero.model.tokenizer import build_char_tokenizer
from thinkzero.rewards import RewardSpec, Scorer
from thinkzero.rl.data import prepare_examples, render_prompt

# A DeepSeek-R1-style chat template: the generation prompt opens the think block itself.
R1_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|User|>{{ m['content'] }}{% endfor %}"
                    "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}")
THINK = "2 + 3 = 5"
ANSWER = "<answer>\n5\n</answer>"

# template, chat template of the tokenizer, what the completion writes before the reasoning
TEMPLATES = {
    "r1_zero": ("r1_zero", None, "\n"),                  # the prompt ends "Assistant: <think>"
    "demo": ("{prompt}\n", None, "<think>\n"),          # recipes/demo: the model writes every tag
    "chat": ("chat", None, "<think>\n"),                # the char tokenizer's template ends "assistant: "
    "chat_r1": ("chat", R1_CHAT_TEMPLATE, ""),          # the template ends "<think>\n"
}


def score(template, chat_template, completion):
    tokenizer = build_char_tokenizer(**({"chat_template": chat_template} if chat_template else {}))
    examples, _ = prepare_examples([{"question": "What is 2 + 3?", "answer": "5"}], tokenizer,
                                   prompt_column="question", template=template)
    columns = sorted(k for k in examples[0] if k != "prompt_ids")
    scorer = Scorer([RewardSpec("format"), RewardSpec("format", params={"strict": False}, alias="soft"),
                     RewardSpec("tag_count")], num_workers=0, columns=columns)
    result = scorer.score([completion], columns={c: [examples[0][c]] for c in columns},
                          facts={"prompt": [examples[0]["prompt"]]})
    return {name: values[0] for name, values in result.per_function.items()}


@pytest.mark.parametrize("name", TEMPLATES)
def test_completion_following_the_template_earns_the_format_rewards(name):
    template, chat_template, opening = TEMPLATES[name]
    completion = f"{opening}{THINK}\n</think>\n{ANSWER}"
    assert score(template, chat_template, completion) == {"format": 1.0, "soft": 1.0, "tag_count": 1.0}


@pytest.mark.parametrize("name", TEMPLATES)
def test_completion_without_its_answer_block_earns_no_format_reward(name):
    template, chat_template, opening = TEMPLATES[name]
    completion = f"{opening}{THINK}\n</think>\n5"
    # tag_count: <think> and </think> once each, no answer tags -> 2 * 0.25
    assert score(template, chat_template, completion) == {"format": 0.0, "soft": 0.0, "tag_count": 0.5}


def test_repeating_the_think_the_prompt_opened_breaks_the_layout():
    completion = f"<think>\n{THINK}\n</think>\n{ANSWER}"
    # <think> is now there twice (prompt + completion): strict fails, tag_count loses its 0.25; soft still finds
    # a think block followed by an answer block
    assert score("r1_zero", None, completion) == {"format": 0.0, "soft": 1.0, "tag_count": 0.75}


def test_r1_zero_prompt_reads_as_one_sentence():
    assert render_prompt("What is 2 + 3?", "r1_zero").endswith("User: What is 2 + 3? Assistant: <think>")
    assert render_prompt("Compute 2 + 3", "r1_zero").endswith("User: Compute 2 + 3. Assistant: <think>")
    assert render_prompt("Compute 2 + 3.", "r1_zero").endswith("User: Compute 2 + 3. Assistant: <think>")


def test_the_trainer_gives_the_format_rewards_the_rendered_prompt(tmp_path):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parents[1] / "rl"))
    from tiny_recipes import arithmetic_recipe, write_recipe

    from thinkzero.rl.config import load_config
    from thinkzero.rl.trainer import Trainer

    recipe = arithmetic_recipe(tmp_path, 8, rollout={"num_generations": 2, "prompts_per_step": 2},
                               rewards={"functions": [{"name": "format"}, {"name": "tag_count"}], "num_workers": 0},
                               train={"output_dir": str(tmp_path / "out")}, logging={"mode": "disabled"})
    recipe["data"].update(template="r1_zero", max_prompt_length=512)
    trainer = Trainer(load_config(write_recipe(recipe, tmp_path / "recipe.json")))
    ex = trainer.examples[0]
    completion = f"\n{ex['question']} = {ex['answer']}\n</think>\n<answer>\n{ex['answer']}\n</answer>"
    scores = trainer.scorer.score([completion], columns={c: [ex.get(c)] for c in trainer.columns},
                                  facts={"prompt": [ex["prompt"]]})
    assert {name: values[0] for name, values in scores.per_function.items()} == {"format": 1.0, "tag_count": 1.0}
