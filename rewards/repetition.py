"""N-gram repetition penalty."""

from thinkzero.rewards.registry import reward


@reward("repetition")
def repetition(completion: str, ngram_size: int = 3, max_penalty: float = -1.0) -> float:
    """max_penalty * (fraction of word n-grams that repeat an earlier one): 0 for no repetition, max_penalty when
    every n-gram is the same. Words are whitespace-separated, lower-cased."""
    if max_penalty > 0:
        raise ValueError(f"repetition: max_penalty must be <= 0, got {max_penalty}")
    if ngram_size < 1:
        raise ValueError(f"repetition: ngram_size must be >= 1, got {ngram_size}")
    words = completion.lower().split()
    if len(words) < ngram_size:
        return 0.0
    ngrams = [tuple(words[i:i + ngram_size]) for i in range(len(words) - ngram_size + 1)]
    repeated = 1.0 - len(set(ngrams)) / len(ngrams)
    return max_penalty * repeated
