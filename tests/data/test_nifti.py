"""Cohort discovery and validation: every bad input names its file, and a fresh prepare leaves no store behind."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from toolkit.data.nifti import NiftiError, discover, load_subject
from toolkit.data.prepare import PrepareConfig, PrepareError, prepare

SHAPE = (12, 12, 6)
AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1, 0, 11], [0, 0, 1, 0], [0, 0, 0, 1]])


def write_subject(root, name, sep="_", suffixes=("t1", "t1ce", "t2", "flair", "seg"), seed=0):
    """A tiny subject with a tumour blob; returns its folder."""
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir(parents=True)
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[4:8, 4:8, 2:4] = 2
    seg[5:7, 5:7, 2:4] = 4
    seg[5, 5, 2] = 1
    for suffix in suffixes:
        data = seg if suffix == "seg" else rng.integers(1, 3000, size=SHAPE).astype(np.int16)
        nib.save(nib.Nifti1Image(data, AFFINE), folder / f"{name}{sep}{suffix}.nii.gz")
    return folder


def test_discovers_brats_naming_variants_at_any_depth(tmp_path):
    write_subject(tmp_path / "HGG", "Brats18_TCIA01_131_1")
    write_subject(tmp_path / "LGG", "BraTS20_Training_001")
    write_subject(tmp_path, "BraTS-GLI-00000-000", sep="-", suffixes=("t1n", "t1c", "t2w", "t2f", "seg"))
    (tmp_path / "notes.nii.gz").write_bytes(b"")  # not inside a subject folder: ignored
    subjects = discover(tmp_path)
    assert [s.name for s in subjects] == ["BraTS-GLI-00000-000", "BraTS20_Training_001", "Brats18_TCIA01_131_1"]
    assert all(set(s.files) == {"t1", "t1ce", "t2", "flair", "seg"} for s in subjects)


def test_empty_folder_is_an_error_naming_it(tmp_path):
    with pytest.raises(NiftiError, match="no BraTS subjects found") as err:
        discover(tmp_path)
    assert err.value.file == tmp_path


def _break(folder, problem):
    name = folder.name
    if problem == "truncated":
        path = folder / f"{name}_t1ce.nii.gz"
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif problem == "shape":
        path = folder / f"{name}_t2.nii.gz"
        nib.save(nib.Nifti1Image(np.ones((12, 12, 5), np.int16), AFFINE), path)
    elif problem == "nan":
        path = folder / f"{name}_t1ce.nii.gz"
        data = np.ones(SHAPE, np.float32)
        data[3, 3, 3] = np.nan
        nib.save(nib.Nifti1Image(data, AFFINE), path)
    elif problem == "label3":
        path = folder / f"{name}_seg.nii.gz"
        data = np.zeros(SHAPE, np.uint8)
        data[1, 1, 1] = 3
        nib.save(nib.Nifti1Image(data, AFFINE), path)
    elif problem == "missing":
        path = folder / f"{name}_t1ce.nii.gz"
        path.unlink()
    elif problem == "affine":
        path = folder / f"{name}_flair.nii.gz"
        nib.save(nib.Nifti1Image(np.ones(SHAPE, np.int16), np.eye(4)), path)
    elif problem == "4d":
        path = folder / f"{name}_t1.nii.gz"
        nib.save(nib.Nifti1Image(np.ones((*SHAPE, 2), np.int16), AFFINE), path)
    return path


PROBLEMS = {
    "truncated": "unreadable image data",
    "shape": "shape",
    "nan": "non-finite",
    "label3": r"labels \[3\] not allowed",
    "missing": "missing t1ce volume",
    "affine": "affine differs",
    "4d": "expected a 3-D volume",
}


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_each_validation_error_names_the_file(tmp_path, problem):
    folder = write_subject(tmp_path, "Brats18_2013_2_1")
    path = _break(folder, problem)
    (subject,) = discover(tmp_path)
    with pytest.raises(NiftiError, match=PROBLEMS[problem]) as err:
        load_subject(subject, ["t1ce", "seg", "t1"])
    assert err.value.file == path


@pytest.mark.parametrize("problem", ["truncated", "label3", "missing"])
def test_prepare_stops_on_a_bad_subject_and_leaves_no_store(tmp_path, problem):
    src = tmp_path / "cohort"
    write_subject(src, "Brats18_2013_1_1", seed=1)
    path = _break(write_subject(src, "Brats18_2013_2_1", seed=2), problem)
    out = tmp_path / "store"
    with pytest.raises(PrepareError, match=path.name):
        prepare(PrepareConfig(src=src, out=out, size=16, tissue="none"))
    assert not out.exists()


def test_failed_fresh_prepare_into_a_given_empty_folder_keeps_the_folder_and_nothing_else(tmp_path):
    src = tmp_path / "cohort"
    write_subject(src, "Brats18_2013_1_1", seed=1)
    _break(write_subject(src, "Brats18_2013_2_1", seed=2), "nan")
    out = tmp_path / "store"
    out.mkdir()
    with pytest.raises(PrepareError, match="non-finite"):
        prepare(PrepareConfig(src=src, out=out, size=16, tissue="none"))
    assert [p.name for p in out.iterdir()] == [".lock"]


def test_partial_store_of_the_older_layout_is_refused_saying_so(tmp_path):
    write_subject(tmp_path / "cohort", "Brats18_2013_1_1")
    (tmp_path / "store" / ".work").mkdir(parents=True)
    (tmp_path / "store" / ".work" / "options.json").write_text("{}")
    with pytest.raises(PrepareError, match=r"older tumorsynth \(\.work/options\.json\)"):
        prepare(PrepareConfig(src=tmp_path / "cohort", out=tmp_path / "store", size=16, tissue="none"))
    assert [p.name for p in (tmp_path / "store").iterdir()] == [".work"]


def test_skip_bad_lists_the_subject_in_the_manifest(tmp_path):
    src = tmp_path / "cohort"
    for i in range(3):
        write_subject(src, f"Brats18_2013_{i}_1", seed=i)
    _break(src / "Brats18_2013_1_1", "nan")
    result = prepare(PrepareConfig(src=src, out=tmp_path / "store", size=16, tissue="none", skip_bad=True))
    assert result.manifest is not None
    assert [s["subject"] for s in result.manifest.skipped] == ["Brats18_2013_1_1"]
    assert "non-finite" in result.manifest.skipped[0]["error"]
    assert sum(s.n for s in result.manifest.splits.values()) == 2 * SHAPE[2]


def test_prepare_refuses_a_foreign_output_folder(tmp_path):
    write_subject(tmp_path / "cohort", "Brats18_2013_1_1")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "thesis.tex").write_text("precious")
    with pytest.raises(PrepareError, match="not an incomplete tumorsynth store"):
        prepare(PrepareConfig(src=tmp_path / "cohort", out=tmp_path / "store", size=16, tissue="none"))
    assert (tmp_path / "store" / "thesis.tex").read_text() == "precious"


def test_gzip_truncation_really_breaks_the_stream(tmp_path):
    # guards the 'truncated' fixture: the file must be an invalid gzip stream, not merely shorter
    folder = write_subject(tmp_path, "Brats18_2013_3_1")
    path = _break(folder, "truncated")
    with pytest.raises((EOFError, OSError)):
        gzip.decompress(path.read_bytes())
