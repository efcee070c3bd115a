"""Tests of the BraTS-2018-style phantom cohort generator (toolkit.data.phantom), on real arrays and files."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from toolkit.data.phantom import (
    BRATS_AFFINE,
    CSF,
    GM,
    MODALITIES,
    SHAPE,
    WM,
    PhantomSubject,
    make_subject,
    write_cohort,
)

SEED = 7
COUNT = 4
VOLUMES = (*MODALITIES, "seg", "tissue")
SUFFIXES = (*MODALITIES, "seg", "tissue_truth")


@pytest.fixture(scope="module")
def subjects() -> list[PhantomSubject]:
    return [make_subject(index, SEED) for index in range(COUNT)]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_cohort(tmp_path_factory.mktemp("serial"), 2, SEED, workers=1)


def _load(folder: Path, suffix: str) -> nib.Nifti1Image:
    return nib.load(folder / f"{folder.name}_{suffix}.nii.gz")


def test_same_seed_gives_identical_subject(subjects: list[PhantomSubject]) -> None:
    again = make_subject(1, SEED)
    assert again.name == subjects[1].name and again.institution == subjects[1].institution
    for name in VOLUMES:
        np.testing.assert_array_equal(getattr(again, name), getattr(subjects[1], name))


def test_different_seed_gives_different_subject(subjects: list[PhantomSubject]) -> None:
    other = make_subject(1, SEED + 1)
    assert not np.array_equal(other.t1, subjects[1].t1)
    assert not np.array_equal(other.seg, subjects[1].seg)
    assert not np.array_equal(other.tissue, subjects[1].tissue)


def test_geometry_dtypes_and_background(subjects: list[PhantomSubject]) -> None:
    for subject in subjects:
        np.testing.assert_array_equal(subject.affine, BRATS_AFFINE)
        brain = subject.tissue > 0
        for name in MODALITIES:
            volume = getattr(subject, name)
            assert volume.shape == SHAPE and volume.dtype == np.int16
            assert volume.min() == 0 and volume.max() <= 20000
            # Skull-stripped: zero exactly outside the brain, positive inside.
            assert not volume[~brain].any() and volume[brain].min() > 0
        assert subject.seg.dtype == np.uint8 and subject.tissue.dtype == np.uint8
        # Brain volume of an adult, inside the grid, spanning most of the 155 slices.
        assert 1.0e6 < brain.sum() < 2.0e6
        for axis, size in enumerate(SHAPE):
            occupied = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))
            assert occupied[0] > 0 and occupied[-1] < size - 1
        assert np.ptp(np.flatnonzero(brain.any(axis=(0, 1)))) > 120


def test_labels_follow_brats(subjects: list[PhantomSubject]) -> None:
    complete = 0
    for subject in subjects:
        labels = set(np.unique(subject.seg).tolist())
        assert labels <= {0, 1, 2, 4}
        assert set(np.unique(subject.tissue).tolist()) == {0, CSF, GM, WM}
        assert not (subject.seg[subject.tissue == 0]).any()
        complete += labels == {0, 1, 2, 4}
    assert complete >= COUNT - 1


def test_tumours_vary_in_size_and_position(subjects: list[PhantomSubject]) -> None:
    tumours = [subject.seg > 0 for subject in subjects]
    volumes = np.array([tumour.sum() for tumour in tumours])
    assert volumes.min() > 1000 and volumes.max() > 2 * volumes.min()
    centroids = np.array([np.argwhere(tumour).mean(0) for tumour in tumours])
    distances = np.linalg.norm(centroids[:, None] - centroids[None], axis=-1)
    assert distances[np.triu_indices(COUNT, 1)].min() > 10.0


def test_oedema_prefers_white_matter(subjects: list[PhantomSubject]) -> None:
    oedema_in_wm = oedema = wm = brain = 0
    for subject in subjects:
        tissue = subject.tissue
        oedema_in_wm += np.count_nonzero(tissue[subject.seg == 2] == WM)
        oedema += np.count_nonzero(subject.seg == 2)
        wm += np.count_nonzero(tissue == WM)
        brain += np.count_nonzero(tissue)
    assert oedema_in_wm / oedema > wm / brain + 0.1


def test_contrast_ordering(subjects: list[PhantomSubject]) -> None:
    for subject in subjects:
        healthy = subject.seg == 0
        csf, gm, wm = (healthy & (subject.tissue == code) for code in (CSF, GM, WM))
        t1, t2, flair = ({region: getattr(subject, name)[mask].mean() for region, mask in
                          (("csf", csf), ("gm", gm), ("wm", wm), ("oedema", subject.seg == 2))}
                         for name in ("t1", "t2", "flair"))
        assert t1["wm"] > t1["gm"] > t1["csf"]
        assert t2["csf"] > t2["gm"] > t2["wm"]
        assert flair["gm"] > flair["wm"] > flair["csf"]
        assert flair["oedema"] > flair["wm"] and t2["oedema"] > t2["wm"]
        assert subject.t1ce[subject.seg == 4].mean() > subject.t1ce[wm].mean()


def test_files_use_brats_names_and_match_memory(cohort: list[Path], subjects: list[PhantomSubject]) -> None:
    assert [folder.name for folder in cohort] == [subject.name for subject in subjects[:2]]
    assert all(folder.name.startswith("Brats18_") and folder.name.endswith("_1") for folder in cohort)
    for folder, subject in zip(cohort, subjects):
        # Exactly the six final files: no temporary left behind.
        assert sorted(p.name for p in folder.iterdir()) == sorted(f"{folder.name}_{s}.nii.gz" for s in SUFFIXES)
        for suffix, name in zip(SUFFIXES, VOLUMES):
            image = _load(folder, suffix)
            np.testing.assert_array_equal(image.affine, BRATS_AFFINE)
            assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
            data = np.asanyarray(image.dataobj)
            assert data.dtype == getattr(subject, name).dtype
            np.testing.assert_array_equal(data, getattr(subject, name))


def test_parallel_cohort_equals_serial(cohort: list[Path], tmp_path: Path) -> None:
    parallel = write_cohort(tmp_path, 2, SEED, workers=2)
    assert [folder.name for folder in parallel] == [folder.name for folder in cohort]
    for serial_folder, parallel_folder in zip(cohort, parallel):
        for suffix in SUFFIXES:
            np.testing.assert_array_equal(np.asanyarray(_load(parallel_folder, suffix).dataobj),
                                          np.asanyarray(_load(serial_folder, suffix).dataobj))
