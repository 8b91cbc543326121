"""Reward functions for GRPO: a registry users extend, built-in rule-based rewards, and an isolating scorer.

    from thinkzero.rewards import reward

    @reward("my_reward")
    def my_reward(completion: str, answer: str) -> float | None: ...

Built-ins: math_accuracy, format, tag_count, cosine_length, soft_overlong, repetition.
"""

# Importing the built-in modules registers them.
from thinkzero.rewards import format as _format  # noqa: F401
from thinkzero.rewards import length as _length  # noqa: F401
from thinkzero.rewards import math as _math  # noqa: F401
from thinkzero.rewards import repetition as _repetition  # noqa: F401
from thinkzero.rewards.registry import get, list_rewards, load_function, load_module, reward
from thinkzero.rewards.scorer import RewardSpec, RewardWarning, Scorer, ScoreResult

__all__ = ["RewardSpec", "RewardWarning", "ScoreResult", "Scorer", "get", "list_rewards", "load_function", "load_module", "reward"]
