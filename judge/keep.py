"""Which G of the N sampled answers a group keeps, when its label is known to be true.

A weak model answers a hard prompt right in one sample of ten or fewer. The first G of
N then often hold no right answer at all, and a group whose rewards are all equal teaches
GRPO nothing. When the label is a user's answer or a known one (not the model's own vote,
whose mistakes a biased pick would amplify), the group keeps right answers from all N, up
to half of G, and fills the rest with wrong ones, so a right answer anywhere in the N is
learned from.
"""

from collections.abc import Sequence


def keep_both(rewards: Sequence[float], g: int) -> list[int]:
    """Indices (in sample order) of the G answers to keep: right ones (the top reward) up to
    half of G, then wrong ones, then more right ones; the first G where all rewards match.

    Example:
        >>> keep_both([0, 0, 0, 0, 0, 1, 0, 0], 4)
        [0, 1, 2, 5]
        >>> keep_both([1, 1, 1, 0, 1, 1], 4)
        [0, 1, 2, 3]
    """
    g = min(g, len(rewards))
    if len(set(rewards)) < 2:
        return list(range(g))
    top = max(rewards)
    right = [i for i, r in enumerate(rewards) if r == top]
    wrong = [i for i, r in enumerate(rewards) if r != top]
    n_right = max(g - len(wrong), min(len(right), (g + 1) // 2))
    return sorted(right[:n_right] + wrong[: g - n_right])
