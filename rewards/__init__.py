"""Reward functions for GRPO: a registry users extend, built-in rule-based rewards, and an isolating scorer.

    from rewards import reward

    @reward("my_reward")
    def my_reward(completion: str, answer: str) -> float | None: ...

Built-ins: math_accuracy, format, tag_count, cosine_length, soft_overlong, repetition.
"""

from rewards.registry import get, list_rewards, load_function, reward
from rewards.scorer import RewardSpec, RewardWarning, Scorer, ScoreResult

# Importing the built-in modules registers them.
from rewards import format as _format  # noqa: E402,F401
from rewards import length as _length  # noqa: E402,F401
from rewards import math as _math  # noqa: E402,F401
from rewards import repetition as _repetition  # noqa: E402,F401

__all__ = ["reward", "get", "list_rewards", "load_function", "RewardSpec", "RewardWarning", "Scorer", "ScoreResult"]
