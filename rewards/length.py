"""Length rewards: cosine-scaled length reward and DAPO's soft overlong punishment (both by token count)."""

import math

from thinkzero.rewards.math import gold_answer, verify
from thinkzero.rewards.registry import reward


@reward("cosine_length")
def cosine_length(completion: str, answer: str, num_tokens: int, max_length: int,
                  min_value_correct: float = 0.5, max_value_correct: float = 1.0,
                  min_value_wrong: float = -0.5, max_value_wrong: float = 0.0) -> float | None:
    """Correct answers score from max_value_correct (0 tokens) down to min_value_correct (max_length tokens);
    wrong ones from min_value_wrong (0 tokens) up to max_value_wrong (max_length tokens): short correct answers are
    best and long wrong answers are penalised least. Cosine schedule between the two ends; None if the gold is
    unusable."""
    if max_length <= 0:
        raise ValueError(f"cosine_length: max_length must be positive, got {max_length}")
    try:
        gold_answer(answer)
    except ValueError:
        return None
    progress = min(num_tokens, max_length) / max_length
    cosine = math.cos(progress * math.pi)  # 1 at 0 tokens, -1 at max_length
    if verify(answer, completion):
        lo, hi = min_value_correct, max_value_correct
    else:
        lo, hi = max_value_wrong, min_value_wrong
    return lo + 0.5 * (hi - lo) * (1.0 + cosine)


@reward("soft_overlong")
def soft_overlong(completion: str, num_tokens: int, max_length: int, buffer: int) -> float:
    """DAPO overlong punishment: 0 up to max_length - buffer tokens, then falling linearly to -1 at max_length,
    -1 beyond."""
    if not 0 < buffer <= max_length:
        raise ValueError(f"soft_overlong: need 0 < buffer <= max_length, got buffer={buffer}, max_length={max_length}")
    free = max_length - buffer
    if num_tokens <= free:
        return 0.0
    if num_tokens <= max_length:
        return (free - num_tokens) / buffer
    return -1.0
