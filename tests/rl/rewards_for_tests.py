"""Reward functions used by the trainer tests (loaded by path, as a user's own file would be)."""


def digit_fraction(completion: str) -> float:
    """Fraction of characters that are digits: varies between random completions, so groups carry signal."""
    return sum(c.isdigit() for c in completion) / max(1, len(completion))


def flaky(completion: str) -> float:
    """Raises on roughly a third of the samples."""
    if len(completion) % 3 == 0:
        raise RuntimeError("flaky reward failed on purpose")
    return float(len(completion) % 2)


def even_answers_only(completion: str, answer: str) -> float:
    """Informative (varies with the completion) only for problems whose answer is even; constant 0 otherwise, so
    dynamic sampling has groups to drop."""
    return float(len(completion) % 2) if int(answer) % 2 == 0 else 0.0
