"""Format rewards: does the completion use the <think>…</think><answer>…</answer> layout?

A prompt may open the think block itself: the r1_zero template ends `Assistant: <think>` and DeepSeek-R1-style chat
templates end `<think>\n`, so the policy's completion starts inside it. The rewards take the rendered prompt
(`prompt_text`, a column of every prepared example) and judge the completion with that opening put back in front; a
completion that repeats the <think> then has it twice. Prefilling the tag (rather than ending r1_zero at
`Assistant:`) keeps what the template asks for and what the rewards check one layout, whatever template is used."""

import re

from thinkzero.rewards.registry import reward

_STRICT_RE = re.compile(r"<think>\n(.*?)\n</think>\n<answer>\n(.*?)\n</answer>\n?", re.DOTALL)
_SOFT_RE = re.compile(r"<think>(.*?)</think>\s*<answer>(.*?)</answer>", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_OPENED_THINK_RE = re.compile(r"<think>\s*\Z")  # a <think> the prompt leaves open at its very end


def as_written(completion: str, prompt_text: str = "") -> str:
    """The completion with the think opening its prompt ended on (tag and whitespace) put back in front."""
    opened = _OPENED_THINK_RE.search(prompt_text[-256:])
    return opened.group(0) + completion if opened else completion


@reward("format")
def format_reward(completion: str, prompt_text: str = "", strict: bool = True) -> float:
    """1.0 for the layout, else 0.0 (judged on `as_written(completion, prompt_text)`).

    strict: the whole completion is exactly `<think>\\n…\\n</think>\\n<answer>\\n…\\n</answer>` (one optional trailing
    newline), each tag once. soft (strict=False): a think block followed by an answer block anywhere in the text."""
    completion = as_written(completion, prompt_text)
    if strict:
        if any(completion.count(tag) != 1 for tag in _TAGS):
            return 0.0
        return 1.0 if _STRICT_RE.fullmatch(completion) else 0.0
    return 1.0 if _SOFT_RE.search(completion) else 0.0


@reward("tag_count")
def tag_count(completion: str, prompt_text: str = "") -> float:
    """0.25 for each of <think>, </think>, <answer>, </answer> that appears exactly once (partial credit), counted
    in `as_written(completion, prompt_text)`."""
    completion = as_written(completion, prompt_text)
    return sum(0.25 for tag in _TAGS if completion.count(tag) == 1)
