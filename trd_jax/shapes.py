"""Padded shapes: lengths and batch sizes rounded up to a few buckets, so that jit-compiled functions see few
distinct shapes (each new one compiles again) at the cost of at most a third of padding."""


def bucket(n: int, minimum: int = 1) -> int:
    """Rounds up to the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5x): at most
    a third of padding, and few distinct compiled shapes."""
    n = max(n, minimum)
    p = 1
    while p < n:
        if p >= 2 and p + p // 2 >= n:
            return p + p // 2
        p *= 2
    return p
