"""Train/val/test splits: fractions, disjointness, subject grouping, determinism."""

import numpy as np

from toolkit.data.split import plan_split, split_counts


def test_slice_split_is_80_10_10_disjoint_and_complete():
    plan = plan_split([155] * 10, "slice", seed=3)
    sizes = {k: len(v) for k, v in plan.items()}
    assert sizes == {"train": 1240, "val": 155, "test": 155}
    everything = np.concatenate(list(plan.values()))
    assert np.array_equal(np.sort(everything), np.arange(1550))


def test_split_is_shuffled_and_deterministic():
    a, b, c = (plan_split([155] * 4, "slice", seed=s) for s in (0, 0, 1))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["train"], c["train"])
    assert not np.array_equal(a["train"], np.sort(a["train"]))


def test_subject_split_keeps_each_subject_in_one_split():
    depths = [155, 150, 155, 140, 155, 155, 155, 155, 155, 130]
    plan = plan_split(depths, "subject", seed=0)
    owner = np.repeat(np.arange(len(depths)), depths)
    subjects = {k: set(owner[v].tolist()) for k, v in plan.items()}
    assert subjects["train"].isdisjoint(subjects["val"]) and subjects["train"].isdisjoint(subjects["test"])
    assert subjects["val"].isdisjoint(subjects["test"])
    assert sum(len(s) for s in subjects.values()) == len(depths)
    assert (len(subjects["train"]), len(subjects["val"]), len(subjects["test"])) == (8, 1, 1)
    # every slice of a subject follows it
    assert sum(len(v) for v in plan.values()) == sum(depths)


def test_small_cohorts_still_get_a_val_and_test_subject():
    assert split_counts(3, at_least_one=True) == {"train": 1, "val": 1, "test": 1}
    assert split_counts(20) == {"train": 16, "val": 2, "test": 2}
