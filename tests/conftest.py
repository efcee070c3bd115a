"""Shared fixtures: a small phantom cohort and its prepared store, built once per test session."""

from pathlib import Path

import pytest

from toolkit.data.phantom import write_cohort
from toolkit.data.prepare import PrepareConfig, prepare


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """Four phantom subjects in BraTS 2018 layout."""
    out = tmp_path_factory.mktemp("cohort")
    write_cohort(out, 4, seed=0, workers=2)
    return out


@pytest.fixture(scope="session")
def store_64(cohort, tmp_path_factory) -> Path:
    """The cohort prepared at 64² with the built-in tissue segmentation, slice split, PNGs."""
    out = tmp_path_factory.mktemp("stores") / "real64"
    prepare(PrepareConfig(src=cohort, out=out, size=64, shard_size=128, workers=2))
    return out
