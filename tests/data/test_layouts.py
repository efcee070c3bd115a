"""The cohort layouts users have (BraTS 2018–2021, BraTS 2023+, BraTS 2024 with resection cavity, the Decathlon's
Task01_BrainTumour) and orientations other than BraTS': one phantom subject gives the same slices in each; the label
convention follows the layout (or --labels), and labels outside it are refused naming the file.

The layouts are built from phantom subjects with nibabel by the helpers below, cropped to a slab of axial slices
around each tumour so that the built-in tissue segmentation stays quick.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from toolkit.cli import main
from toolkit.data.nifti import discover_cohort
from toolkit.data.prepare import PrepareConfig, PrepareError, prepare, result_json
from toolkit.data.slicing import axial_slices
from toolkit.data.store import Store

DEPTH = 20  # axial slices per slab
SUBJECTS = 2
MODALITIES = ("t1", "t1ce", "t2", "flair")
SUFFIX_2023 = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
MSD_NAMES = {"flair": "FLAIR", "t1": "T1w", "t1ce": "t1gd", "t2": "T2w"}
MSD_ORDER = ("flair", "t1", "t1ce", "t2")  # Task01_BrainTumour's channel order
# BraTS 2018 label → BraTS 2023 and MSD labels of the same tissue
TO_2023 = np.array([0, 1, 2, 0, 3], np.uint8)
TO_MSD = np.array([0, 2, 1, 0, 3], np.uint8)
FAST_CLASS = np.array([0, 6, 5, 4], np.uint8)  # FAST label (0 outside, 1 CSF, 2 GM, 3 WM) → stored class


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)


@pytest.fixture(scope="module")
def slabs(cohort) -> list[dict[str, np.ndarray]]:
    """The first phantom subjects cropped to DEPTH axial slices around the tumour: volumes by suffix (t1, t1ce, t2,
    flair, seg, tissue) and ``affine``, the BraTS affine moved to the slab."""
    out = []
    for folder in sorted(cohort.iterdir())[:SUBJECTS]:
        volumes = {s: np.asanyarray(nib.load(folder / f"{folder.name}_{s}.nii.gz").dataobj)
                   for s in (*MODALITIES, "seg", "tissue_truth")}
        affine = nib.load(folder / f"{folder.name}_seg.nii.gz").affine
        z = int(np.argwhere(volumes["seg"] == 4)[:, 2].mean())
        z0 = min(max(z - DEPTH // 2, 0), volumes["seg"].shape[2] - DEPTH)
        slab = {s: np.ascontiguousarray(v[:, :, z0:z0 + DEPTH]) for s, v in volumes.items()}
        slab["tissue"] = slab.pop("tissue_truth")
        assert set(np.unique(slab["seg"])) == {0, 1, 2, 4}, "the slab must hold every tumour label"
        slab["affine"] = affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, z0], [0, 0, 0, 1.0]])
        out.append(slab)
    return out


def _name_2018(index: int) -> str:
    return f"Brats18_TCIA01_{100 + index}_1"


def write_2018(slabs, root: Path, fast: bool = False, orient=None) -> Path:
    """BraTS 2018 layout; ``fast`` adds the true tissue map as FAST output; ``orient(data, affine)`` re-stores each
    volume (another orientation)."""
    for index, slab in enumerate(slabs):
        name = _name_2018(index)
        volumes = {s: slab[s] for s in (*MODALITIES, "seg")}
        if fast:
            volumes["fast_seg"] = slab["tissue"]
        for suffix, data in volumes.items():
            data, affine = orient(data, slab["affine"]) if orient else (data, slab["affine"])
            _save(data, affine, root / name / f"{name}_{suffix}.nii.gz")
    return root


def write_2023(slabs, root: Path, cavity: list[np.ndarray] | None = None, tissue: list[np.ndarray] | None = None,
               timepoint: str = "000") -> Path:
    """BraTS 2023 layout (BraTS-GLI-NNNNN-TTT, t1n/t1c/t2w/t2f, labels 1 NETC, 2 SNFH, 3 ET); ``cavity`` masks are
    relabelled 4 (BraTS 2024 resection cavity); ``tissue`` maps are written as FAST output."""
    for index, slab in enumerate(slabs):
        name = f"BraTS-GLI-{index:05d}-{timepoint}"
        seg = TO_2023[slab["seg"]]
        if cavity is not None:
            seg = np.where(cavity[index], 4, seg).astype(np.uint8)
        volumes = {SUFFIX_2023[s]: slab[s] for s in MODALITIES} | {"seg": seg}
        if tissue is not None:
            volumes["fast_seg"] = tissue[index]
        for suffix, data in volumes.items():
            _save(data, slab["affine"], root / name / f"{name}-{suffix}.nii.gz")
    return root


def write_msd(slabs, root: Path, order=MSD_ORDER, unlabelled: bool = False) -> Path:
    """Task01_BrainTumour layout: dataset.json naming the channels in ``order``, imagesTr/BRATS_NNN.nii.gz as 4-D
    float32 under the identity affine the Decathlon wrote over BraTS' arrays, labelsTr with 1 edema, 2 non-enhancing
    tumour, 3 enhancing tumour. ``unlabelled`` adds an imagesTr case without a label, an imagesTs case and a macOS
    ``._`` file."""
    training = []
    for index, slab in enumerate(slabs):
        case = f"BRATS_{index + 1:03d}.nii.gz"
        _save(np.stack([slab[m] for m in order], axis=-1).astype(np.float32), np.eye(4), root / "imagesTr" / case)
        _save(TO_MSD[slab["seg"]], np.eye(4), root / "labelsTr" / case)
        training.append({"image": f"./imagesTr/{case}", "label": f"./labelsTr/{case}"})
    test = []
    if unlabelled:
        image = np.stack([slabs[0][m] for m in order], axis=-1).astype(np.float32)
        _save(image, np.eye(4), root / "imagesTr" / "BRATS_099.nii.gz")
        _save(image, np.eye(4), root / "imagesTs" / "BRATS_900.nii.gz")
        (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 resource fork")
        test = ["./imagesTs/BRATS_900.nii.gz"]
    meta = {"name": "BRATS", "modality": {str(i): MSD_NAMES[m] for i, m in enumerate(order)},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
            "numTraining": len(training), "training": training, "test": test}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same volume stored RAS: x and y reversed, the affine moved so every voxel keeps its world position."""
    nx, ny = data.shape[:2]
    flip = np.array([[-1, 0, 0, nx - 1], [0, -1, 0, ny - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    return np.ascontiguousarray(data[::-1, ::-1]), affine @ flip


def to_slp(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same volume with its axes permuted to (z, x, y): the first voxel axis runs inferior → superior."""
    swap = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])  # old index = swap @ new index
    return np.ascontiguousarray(np.transpose(data, (2, 0, 1))), affine @ swap


def rows(store: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every split's image, label and slice arrays, and the subject names in the order they first appear."""
    s = Store(store)
    out = {}
    for split in s.manifest.splits:
        r = s.read(split, fields=("image", "label", "slice", "subject"))
        subjects = [x.decode() if isinstance(x, bytes) else x for x in r["subject"]]
        out[split] = {"image": r["image"], "label": r["label"], "slice": r["slice"],
                      "subject": np.unique(subjects, return_inverse=True)[1]}
    return out


def assert_same_rows(a: Path, b: Path) -> None:
    ra, rb = rows(a), rows(b)
    assert ra.keys() == rb.keys()
    for split in ra:
        for field in ("image", "label", "slice", "subject"):
            np.testing.assert_array_equal(ra[split][field], rb[split][field], err_msg=f"{split}/{field}")


def _prepare(src: Path, out: Path, **options) -> Store:
    prepare(PrepareConfig(src=src, out=out, size=256, png=False, **options))
    return Store(out)


def test_brats2023_and_msd_copies_give_the_same_seven_class_and_image_slices_as_brats2018(slabs, tmp_path):
    stores = {}
    for layout, write in (("brats2018", write_2018), ("brats2023", write_2023), ("msd", write_msd)):
        stores[layout] = _prepare(write(slabs, tmp_path / layout), tmp_path / f"store-{layout}", tissue="hmrf")
        assert stores[layout].manifest.provenance["labels"] == {"convention": layout, "from": "layout"}
        assert stores[layout].manifest.classes == 7
    reference = rows(stores["brats2018"].root)
    assert {int(c) for split in reference.values() for c in np.unique(split["label"])} == set(range(7))
    for layout in ("brats2023", "msd"):
        assert_same_rows(stores["brats2018"].root, stores[layout].root)
    # the Decathlon's identity affine is read as BraTS' layout, not flipped as a RAS header would be
    assert stores["msd"].manifest.provenance["orientation"]["identity_header_read_as_brats"] == SUBJECTS
    assert stores["brats2018"].manifest.provenance["orientation"]["source"] == {"LPS": SUBJECTS}


def test_ras_and_axis_permuted_copies_give_the_same_slices_and_record_their_orientation(slabs, tmp_path):
    reference = _prepare(write_2018(slabs, tmp_path / "lps", fast=True), tmp_path / "store-lps")
    for codes, orient in (("RAS", to_ras), ("SLP", to_slp)):
        src = write_2018(slabs, tmp_path / codes, fast=True, orient=orient)
        first = next((src / _name_2018(0)).glob("*_t1ce.nii.gz"))
        assert "".join(nib.aff2axcodes(nib.load(first).affine)) == codes  # the helper made what it says
        store = _prepare(src, tmp_path / f"store-{codes}")
        assert_same_rows(reference.root, store.root)
        orientation = store.manifest.provenance["orientation"]
        assert orientation["source"] == {codes: SUBJECTS} and orientation["target"] == "LPS"
        assert orientation["reoriented"] == [_name_2018(i) for i in range(SUBJECTS)]
    assert reference.manifest.provenance["orientation"]["reoriented"] == []


def test_brats2024_resection_cavity_takes_the_tissue_underneath_and_is_counted(slabs, tmp_path, caplog):
    """Label 4 of a 2024-named subject is a resection cavity, not ET: its voxels get the FAST tissue class there, or
    background where the tissue map has none, and the manifest counts them."""
    cavity, tissue = [], []
    for slab in slabs:
        tumour = np.argwhere(slab["seg"] > 0)
        x_mid = int(np.median(tumour[:, 0]))
        rc = (slab["seg"] > 0) & (np.arange(slab["seg"].shape[0])[:, None, None] < x_mid)  # half of the tumour
        t = slab["tissue"].copy()
        t[rc & (np.arange(t.shape[1])[None, :, None] % 3 == 0)] = 0  # some of the cavity without tissue
        cavity.append(rc)
        tissue.append(t)
    src = write_2023(slabs, tmp_path / "brats2024", cavity=cavity, tissue=tissue, timepoint="100")
    with caplog.at_level(logging.WARNING, logger="toolkit.data.prepare"):
        store = _prepare(src, tmp_path / "store", split="subject")
    expected_count = sum(int(rc.sum()) for rc in cavity)
    assert expected_count > 0
    assert store.manifest.provenance["resection_cavity_voxels"] == expected_count
    assert store.manifest.provenance["resection_cavity_subjects"] == {
        f"BraTS-GLI-{i:05d}-100": int(rc.sum()) for i, rc in enumerate(cavity)}
    assert any("resection-cavity" in r.getMessage() and str(expected_count) in r.getMessage() for r in caplog.records)
    got = {}
    for split in store.manifest.splits:
        r = store.read(split, fields=("label", "slice", "subject"))
        for label, z, subject in zip(r["label"], r["slice"], r["subject"]):
            got[(subject.decode() if isinstance(subject, bytes) else subject, int(z))] = label
    for index, (slab, rc, t) in enumerate(zip(slabs, cavity, tissue)):
        # expected classes, built here from the 2018 labels: tumour 1→1, 2→2, 4→3; elsewhere the FAST tissue class
        tumour_class = np.array([0, 1, 2, 0, 3], np.uint8)[slab["seg"]]
        expected = np.where((tumour_class > 0) & ~rc, tumour_class, FAST_CLASS[t])
        assert (expected[rc] == 0).any() and (expected[rc] >= 4).any()  # both outcomes of a cavity voxel occur
        slices = axial_slices(expected.astype(np.uint8), 256, labels=True)
        for z in range(DEPTH):
            np.testing.assert_array_equal(got[(f"BraTS-GLI-{index:05d}-100", z)], slices[z], err_msg=f"slice {z}")


def test_brats2023_cohort_under_labels_brats2018_is_refused_naming_the_seg_file(slabs, tmp_path):
    src = write_2023(slabs[:1], tmp_path / "brats2023")
    with pytest.raises(PrepareError, match=r"BraTS-GLI-00000-000-seg\.nii\.gz: labels \[3\] not allowed under the "
                                           r"brats2018 label convention"):
        prepare(PrepareConfig(src=src, out=tmp_path / "store", size=32, tissue="none", labels="brats2018"))
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(("layout", "label"), [("brats2018", 3), ("brats2023", 5), ("msd", 4)])
def test_a_label_outside_the_inferred_convention_is_refused_naming_the_file_and_convention(tmp_path, layout, label):
    seg = np.zeros((8, 8, 4), np.uint8)
    seg[2:4, 2:4, 1] = label
    image = np.full(seg.shape, 100, np.int16)
    if layout == "msd":
        write_msd([{m: image for m in MODALITIES} | {"seg": np.zeros_like(seg)}], tmp_path / "src")
        bad = tmp_path / "src" / "labelsTr" / "BRATS_001.nii.gz"
        _save(seg, np.eye(4), bad)
    else:
        name, sep = ("Brats18_2013_1_1", "_") if layout == "brats2018" else ("BraTS-MET-00001-000", "-")
        for suffix in ("t1", "t1ce", "t2", "flair") if layout == "brats2018" else ("t1n", "t1c", "t2w", "t2f"):
            _save(image, np.eye(4), tmp_path / "src" / name / f"{name}{sep}{suffix}.nii.gz")
        bad = tmp_path / "src" / name / f"{name}{sep}seg.nii.gz"
        _save(seg, np.eye(4), bad)
    with pytest.raises(PrepareError, match=rf"{bad.name}: labels \[{label}\] not allowed under the {layout} label "
                                           r"convention.*--labels") as err:
        prepare(PrepareConfig(src=tmp_path / "src", out=tmp_path / "store", size=16, tissue="none"))
    assert str(bad) in str(err.value)
    assert not (tmp_path / "store").exists()


def test_msd_channels_follow_dataset_json_and_unlabelled_cases_are_skipped_and_listed(slabs, tmp_path, caplog):
    order = ("t2", "t1ce", "flair", "t1")  # not the usual order: the channels are found by dataset.json's names
    # SRC holds the dataset one level down, beside a BraTS cohort that --include leaves out
    write_msd(slabs, tmp_path / "data" / "Task01_BrainTumour", order=order, unlabelled=True)
    reference = write_2018(slabs, tmp_path / "data" / "brats2018")
    for modality in ("flair", "t1ce"):
        with caplog.at_level(logging.WARNING, logger="toolkit.data.prepare"):
            result = prepare(PrepareConfig(src=tmp_path / "data", out=tmp_path / f"msd-{modality}", size=256,
                                           png=False, tissue="none", modality=modality,
                                           include=("Task01_BrainTumour",)))
        _prepare(reference, tmp_path / f"ref-{modality}", tissue="none", modality=modality)
        assert_same_rows(tmp_path / f"ref-{modality}", tmp_path / f"msd-{modality}")
    listed = result.manifest.provenance["unlabelled"]
    assert [case["subject"] for case in listed] == ["BRATS_099", "BRATS_900"]
    assert [Path(case["file"]).parent.name for case in listed] == ["imagesTr", "imagesTs"]
    assert result_json(result)["unlabelled"] == ["BRATS_099", "BRATS_900"]
    assert result.manifest.provenance["subjects"] == SUBJECTS
    assert any("2 cases without a label" in r.getMessage() for r in caplog.records)


MSD_PROBLEMS = {
    "no modality": ("dataset.json", r"missing field 'modality'"),
    "unknown modality": ("dataset.json", r"field 'modality\.1' = 'PD'"),
    "three channels": ("BRATS_001.nii.gz", r"expected a 4-D volume of 4 channels \(dataset\.json field 'modality'\)"),
    "missing label file": ("BRATS_001.nii.gz", r"field 'training\[0\]\.label' but missing"),
    "other labels": ("dataset.json", r"field 'labels' = .* is not Task01_BrainTumour's"),
}


@pytest.mark.parametrize("problem", sorted(MSD_PROBLEMS))
def test_a_bad_msd_dataset_is_refused_naming_the_file_and_field(tmp_path, problem):
    volume = np.full((8, 8, 4), 100, np.int16)
    src = write_msd([{m: volume for m in MODALITIES} | {"seg": np.zeros((8, 8, 4), np.uint8)}], tmp_path / "src")
    meta = json.loads((src / "dataset.json").read_text())
    if problem == "no modality":
        del meta["modality"]
    elif problem == "unknown modality":
        meta["modality"]["1"] = "PD"
    elif problem == "three channels":
        _save(np.zeros((8, 8, 4, 3), np.float32), np.eye(4), src / "imagesTr" / "BRATS_001.nii.gz")
    elif problem == "missing label file":
        (src / "labelsTr" / "BRATS_001.nii.gz").unlink()
    elif problem == "other labels":
        meta["labels"] = {"0": "background", "1": "NCR", "2": "ED", "3": "ET"}
    (src / "dataset.json").write_text(json.dumps(meta))
    file, message = MSD_PROBLEMS[problem]
    with pytest.raises(PrepareError, match=message) as err:
        prepare(PrepareConfig(src=src, out=tmp_path / "store", size=16, tissue="none"))
    assert f"{file}:" in str(err.value)
    assert not (tmp_path / "store").exists()


def _tiny_brats(root: Path, name: str, sep: str = "_") -> None:
    seg = np.zeros((8, 8, 3), np.uint8)
    seg[2:4, 2:4, 1] = 2
    suffixes = ("t1", "t1ce", "t2", "flair") if sep == "_" else ("t1n", "t1c", "t2w", "t2f")
    for suffix in suffixes:
        _save(np.full(seg.shape, 50, np.int16), np.eye(4), root / name / f"{name}{sep}{suffix}.nii.gz")
    _save(seg, np.eye(4), root / name / f"{name}{sep}seg.nii.gz")


@pytest.mark.parametrize(("pattern", "src"), [("HGG", "Training"), ("HGG/*", "Training"),
                                              ("Brats18_2013_1*", "Training"), ("HGG", "."), ("*/HGG/*", ".")])
def test_include_keeps_only_the_subjects_a_pattern_selects(tmp_path, pattern, src):
    for folder, name in (("HGG", "Brats18_2013_10_1"), ("HGG", "Brats18_2013_11_1"), ("LGG", "Brats18_2013_0_1"),
                         ("LGG", "Brats18_TCIA09_1_1")):
        _tiny_brats(tmp_path / "Training" / folder, name)
    result = prepare(PrepareConfig(src=tmp_path / src, out=tmp_path / "store", size=16, tissue="none",
                                   include=(pattern,), png=False))
    store = Store(tmp_path / "store")
    names = {s.decode() for split in store.manifest.splits for s in store.read(split, fields=("subject",))["subject"]}
    assert names == {"Brats18_2013_10_1", "Brats18_2013_11_1"}
    assert result.manifest.provenance["options"]["include"] == [pattern]


def test_include_matching_no_subject_is_refused_naming_the_pattern(tmp_path):
    _tiny_brats(tmp_path / "src" / "HGG", "Brats18_2013_10_1")
    with pytest.raises(PrepareError, match=r"option --include 'HGGG' matches no subject"):
        prepare(PrepareConfig(src=tmp_path / "src", out=tmp_path / "store", size=16, include=("HGG", "HGGG")))
    assert not (tmp_path / "store").exists()


def test_mixed_release_layouts_are_refused_unless_labels_says_what_they_mean(tmp_path):
    _tiny_brats(tmp_path / "src", "Brats18_2013_10_1")
    _tiny_brats(tmp_path / "src", "BraTS-GLI-00001-000", sep="-")
    assert [s.layout for s in discover_cohort(tmp_path / "src").subjects] == ["brats2023", "brats2018"]
    with pytest.raises(PrepareError, match=r"more than one release layout: brats2018 \(e\.g\. Brats18_2013_10_1\), "
                                           r"brats2023 \(e\.g\. BraTS-GLI-00001-000\)"):
        prepare(PrepareConfig(src=tmp_path / "src", out=tmp_path / "store", size=16, tissue="none"))
    assert not (tmp_path / "store").exists()
    result = prepare(PrepareConfig(src=tmp_path / "src", out=tmp_path / "store", size=16, tissue="none",
                                   labels="brats2023", png=False))
    assert result.manifest.provenance["labels"] == {"convention": "brats2023", "from": "--labels"}


def test_default_options_record_what_older_stores_recorded_so_their_reruns_still_match(tmp_path):
    old_keys = {"src", "size", "shard_size", "png", "split", "seed", "modality", "tissue"}
    assert set(PrepareConfig(src=tmp_path, out=tmp_path / "s").identity()) == old_keys
    both = PrepareConfig(src=tmp_path, out=tmp_path / "s", labels="msd", include="HGG").identity()
    assert both["labels"] == "msd" and both["include"] == ["HGG"]
    with pytest.raises(PrepareError, match=r"option --labels = 'brats2021'"):
        PrepareConfig(src=tmp_path, out=tmp_path / "s", labels="brats2021")


def test_cli_prepare_passes_labels_and_include(tmp_path, capsys):
    _tiny_brats(tmp_path / "src" / "HGG", "BraTS-GLI-00001-000", sep="-")
    _tiny_brats(tmp_path / "src" / "LGG", "BraTS-GLI-00002-000", sep="-")
    code = main(["prepare", str(tmp_path / "src"), str(tmp_path / "store"), "--size", "16", "--tissue", "none",
                 "--no-png", "--labels", "brats2023", "--include", "HGG/*", "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert sum(doc["splits"].values()) == 3 and doc["unlabelled"] == []
    options = Store(tmp_path / "store").manifest.provenance["options"]
    assert options["labels"] == "brats2023" and options["include"] == ["HGG/*"]
