"""Train/val/test splits: shuffle slices (the paper's method) or subjects, then split 80/10/10.

Rows are global slice ids over the subjects in name order (subject k's slices occupy a contiguous range). Each split
is returned in shuffled order, so the reduced training set ("the first 20 %") is a prefix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
MODES = ("slice", "subject")


def split_counts(n: int, *, at_least_one: bool = False) -> dict[str, int]:
    """Sizes of val and test (rounded fractions of ``n``); train takes the rest.

    With ``at_least_one`` (subject mode) val and test each get one item whenever ``n`` ≥ 3, so that a small cohort
    still has a test subject.
    """
    minimum = 1 if at_least_one and n >= 3 else 0
    val = max(minimum, round(FRACTIONS["val"] * n))
    test = max(minimum, round(FRACTIONS["test"] * n))
    return {"train": n - val - test, "val": val, "test": test}


def plan_split(slices_per_subject: Sequence[int], mode: str, seed: int) -> dict[str, np.ndarray]:
    """Global row ids per split, each in shuffled order; deterministic for ``seed``."""
    if mode not in MODES:
        raise ValueError(f"--split must be one of {MODES}, got {mode!r}")
    rng = np.random.default_rng(seed)
    counts = np.asarray(slices_per_subject, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    if mode == "slice":
        items = rng.permutation(int(counts.sum()))
        sizes = split_counts(len(items))
    else:
        items = rng.permutation(len(counts))
        sizes = split_counts(len(items), at_least_one=True)
    bounds = np.cumsum([0, sizes["train"], sizes["val"], sizes["test"]])
    plan = {}
    for k, name in enumerate(FRACTIONS):
        chosen = items[bounds[k]:bounds[k + 1]]
        if mode == "subject":
            rows = [np.arange(starts[s], starts[s] + counts[s]) for s in chosen]
            chosen = rng.permutation(np.concatenate(rows)) if rows else np.empty(0, dtype=np.int64)
        plan[name] = chosen
    return plan
