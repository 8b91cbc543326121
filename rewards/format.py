"""Format rewards: does the completion use the <think>…</think><answer>…</answer> layout?"""

import re

from rewards.registry import reward

_STRICT_RE = re.compile(r"<think>\n(.*?)\n</think>\n<answer>\n(.*?)\n</answer>\n?", re.DOTALL)
_SOFT_RE = re.compile(r"<think>(.*?)</think>\s*<answer>(.*?)</answer>", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


@reward("format")
def format_reward(completion: str, strict: bool = True) -> float:
    """1.0 for the layout, else 0.0.

    strict: the whole completion is exactly `<think>\\n…\\n</think>\\n<answer>\\n…\\n</answer>` (one optional trailing
    newline), each tag once. soft (strict=False): a think block followed by an answer block anywhere in the text."""
    if strict:
        if any(completion.count(tag) != 1 for tag in _TAGS):
            return 0.0
        return 1.0 if _STRICT_RE.fullmatch(completion) else 0.0
    return 1.0 if _SOFT_RE.search(completion) else 0.0


@reward("tag_count")
def tag_count(completion: str) -> float:
    """0.25 for each of <think>, </think>, <answer>, </answer> that appears exactly once (partial credit)."""
    return sum(0.25 for tag in _TAGS if completion.count(tag) == 1)
