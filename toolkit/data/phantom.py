"""Synthetic BraTS-2018-style demo cohort.

This module owns the phantom generator: it deforms the MNI152 2009a tissue templates that nilearn
ships into one anatomy per subject on the BraTS grid, grows one lobulated tumour (necrosis,
enhancing rim, oedema that spreads preferentially through white matter), renders T1, T1ce, T2 and
FLAIR with partial volume, bias field, Rician noise and per-institution scaling, and writes the
subject as BraTS-2018-named NIfTI files, each one atomically.
"""

from __future__ import annotations

import functools
import gzip
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

from toolkit.atomic import write_bytes
from toolkit.parallel import parallel_map

logger = logging.getLogger(__name__)

SHAPE = (240, 240, 155)
BRATS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
MODALITIES = ("t1", "t1ce", "t2", "flair")
INSTITUTIONS = ("2013", "CBICA", "TCIA01", "TCIA02", "TCIA03", "TCIA04", "TCIA05", "TCIA06",
                "TCIA08", "TCIA09", "TCIA10", "TCIA12", "TCIA13")
# Institution scales are a property of the (fictional) scanners, so they use a fixed seed, not the cohort's.
_INSTITUTION_SEED = 2018

# Tissue codes of the `tissue` truth map.
CSF, GM, WM = 1, 2, 3
# Tumour intensity classes (0 = healthy); label 1 covers both necrosis and non-enhancing tumour.
NECROSIS, NON_ENHANCING, OEDEMA, ENHANCING = 1, 2, 3, 4
_SEG_LABEL = np.array([0, 1, 1, 2, 4], np.uint8)
# Relative signal (WM = 1) of CSF, GM, WM and the four tumour classes, one row per modality.
_CONTRAST = np.array([
    [0.30, 0.65, 1.00, 0.35, 0.60, 0.70, 0.75],  # t1: WM > GM > CSF, tumour hypointense
    [0.30, 0.68, 1.00, 0.30, 0.62, 0.72, 1.70],  # t1ce: gadolinium lights up the rim, necrosis stays dark
    [2.40, 1.35, 1.00, 2.10, 1.55, 1.75, 1.45],  # t2: free water bright
    [0.30, 1.25, 1.00, 1.10, 1.45, 1.85, 1.50],  # flair: free water suppressed, oedema is not
])
# Oedema is fluid in otherwise intact tissue, so it only partly replaces the healthy signal.
_TUMOUR_WEIGHT = np.array([0.0, 1.0, 1.0, 0.7, 1.0], np.float32)
_TEXTURE_AMPLITUDE = np.array([0.0, 0.12, 0.08, 0.06, 0.10], np.float32)


@dataclass(frozen=True)
class PhantomConfig:
    """Tunables of the generator; lengths in mm, intensities relative to white matter unless noted."""

    base_scale: float = 0.9  # subject brain size relative to MNI152 (which is larger than most brains)
    scale_jitter: float = 0.07
    rotation_deg: float = 6.0
    translation_mm: float = 4.0
    displacement_mm: float = 1.5  # standard deviation of the smooth non-linear displacement
    core_radius_mm: tuple[float, float] = (8.0, 30.0)
    oedema_reach_mm: tuple[float, float] = (3.0, 28.0)  # how far oedema travels through white matter
    gm_speed: float = 0.15  # oedema front speed in grey matter relative to white matter
    no_necrosis_prob: float = 0.2
    bias_max: float = 0.15
    noise_sigma: tuple[float, float] = (0.015, 0.04)
    max_intensity: int = 20000  # stored values stay within what uint16 readers expect


@dataclass(frozen=True, eq=False)
class PhantomSubject:
    """One synthetic subject on the BraTS grid (240x240x155, 1 mm, `BRATS_AFFINE`)."""

    name: str
    institution: str
    t1: np.ndarray
    t1ce: np.ndarray
    t2: np.ndarray
    flair: np.ndarray
    seg: np.ndarray  # uint8 BraTS labels {0, 1, 2, 4}
    tissue: np.ndarray  # uint8 true tissue, also under the tumour: 0 outside, 1 CSF, 2 GM, 3 WM
    affine: np.ndarray


class _Template(NamedTuple):
    brain: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    affine: np.ndarray
    centre_mm: np.ndarray  # centre of the brain's bounding box, world mm


class _Anatomy(NamedTuple):
    window: tuple[slice, ...]  # part of the BraTS grid that holds the brain; all arrays below live on it
    probs: tuple[np.ndarray, np.ndarray, np.ndarray]  # CSF, GM, WM probabilities, zero outside the brain
    brain: np.ndarray
    tissue: np.ndarray
    mni_x: np.ndarray  # template x in mm: negative in the left hemisphere


@functools.lru_cache(maxsize=1)
def _template() -> _Template:
    """The MNI152 2009a maps nilearn ships (no download), loaded once per process."""
    from nilearn import datasets  # deferred: importing nilearn costs seconds that only generation needs

    brain = datasets.load_mni152_brain_mask(resolution=1)
    maps = [img.get_fdata(dtype=np.float32) for img in (
        brain, datasets.load_mni152_gm_template(resolution=1), datasets.load_mni152_wm_template(resolution=1))]
    inside = np.argwhere(maps[0] > 0.5)
    centre = brain.affine @ np.append((inside.min(0) + inside.max(0)) / 2.0, 1.0)
    return _Template(*maps, brain.affine, centre[:3])


def _smooth_coefficients(rng: np.random.Generator, modes: int) -> np.ndarray:
    """Random cosine coefficients for a zero-mean, unit-variance smooth field (power falls with frequency)."""
    k = np.arange(modes)
    k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    coef = rng.standard_normal((modes,) * 3) / np.sqrt(1.0 + k2)
    coef[0, 0, 0] = 0.0
    # Mean of cos^2 over the domain is 1/2 (1 for the constant mode): normalise the variance exactly.
    w = np.where(k == 0, 1.0, 0.5)
    return coef / np.sqrt(np.sum(coef**2 * w[:, None, None] * w[None, :, None] * w[None, None, :]))


def _smooth_field(coef: np.ndarray, domain: tuple[int, ...], positions: list[np.ndarray]) -> np.ndarray:
    """Evaluate a cosine field defined on `domain` on the grid spanned by per-axis `positions`.

    Separable, so much cheaper than zooming a coarse grid; positions outside the domain are allowed.
    """
    modes = np.arange(coef.shape[0])[:, None]
    bases = [np.cos(np.pi * modes * (p + 0.5) / n) for n, p in zip(domain, positions)]
    return np.einsum("abc,ai,bj,ck->ijk", coef, *bases, optimize=True).astype(np.float32)


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """Rotation by random angles (each within +-max_deg) about the three axes."""
    return Rotation.from_euler("xyz", rng.uniform(-max_deg, max_deg, 3), degrees=True).as_matrix()


def _pull_matrix(rng: np.random.Generator, cfg: PhantomConfig, tmpl: _Template) -> np.ndarray:
    """BraTS voxel -> template voxel: brain centre to grid centre, with the subject's random size and pose."""
    size = cfg.base_scale * (1.0 + rng.uniform(-cfg.scale_jitter, cfg.scale_jitter, 3))
    linear = _rotation(rng, cfg.rotation_deg) / size
    grid_centre = (BRATS_AFFINE @ np.append((np.array(SHAPE) - 1) / 2.0, 1.0))[:3]
    world = np.eye(4)
    world[:3, :3] = linear
    world[:3, 3] = tmpl.centre_mm - linear @ grid_centre
    return np.linalg.inv(tmpl.affine) @ world @ BRATS_AFFINE


def _template_coords(pull: np.ndarray, displacement: list[np.ndarray], amplitude: float,
                     positions: list[np.ndarray]) -> np.ndarray:
    """Template voxel coordinates of the grid spanned by per-axis `positions`: affine plus displacement."""
    index = np.ix_(*(p.astype(np.float32) for p in positions))
    pull = pull.astype(np.float32)  # keeps the full-size sums in float32
    coords = np.empty((3, *(len(p) for p in positions)), np.float32)
    for axis, coef in enumerate(displacement):
        coords[axis] = pull[axis, 0] * index[0] + pull[axis, 1] * index[1] + (pull[axis, 2] * index[2] + pull[axis, 3])
        coords[axis] += amplitude * _smooth_field(coef, SHAPE, positions)
    return coords


def _placement(rng: np.random.Generator, cfg: PhantomConfig, tmpl: _Template, pull: np.ndarray,
               displacement: list[np.ndarray], stride: int = 3) -> tuple[list[np.ndarray], tuple[slice, ...]]:
    """Box around the deformed brain (per-axis positions) and where it goes on the grid.

    A coarse lattice finds the box; the brain is then centred, plus a random shift that never pushes it off
    the grid, since the MNI brain (brainstem included) nearly fills the 155 slices.
    """
    lattice = [np.arange(-4 * stride, n + 4 * stride, stride) for n in SHAPE]
    coarse = ndi.map_coordinates(tmpl.brain, _template_coords(pull, displacement, cfg.displacement_mm, lattice),
                                 order=1)
    hits = np.argwhere(coarse > 0)
    lo = np.array([axis[i] for axis, i in zip(lattice, hits.min(0))]) - stride
    size = np.minimum(np.array([axis[i] for axis, i in zip(lattice, hits.max(0))]) + stride + 1 - lo, SHAPE)
    room = (np.array(SHAPE) - size) // 2
    limit = np.minimum(room, int(cfg.translation_mm))
    start = room + rng.integers(-limit, limit + 1)
    positions = [np.arange(a, a + n) for a, n in zip(lo, size)]
    return positions, tuple(slice(int(a), int(a + n)) for a, n in zip(start, size))


def _deform_anatomy(rng: np.random.Generator, cfg: PhantomConfig) -> _Anatomy:
    """Resample the template probability maps through a random affine plus smooth displacement."""
    tmpl = _template()
    pull = _pull_matrix(rng, cfg, tmpl)
    displacement = [_smooth_coefficients(rng, 4) for _ in range(3)]
    positions, window = _placement(rng, cfg, tmpl, pull, displacement)
    coords = _template_coords(pull, displacement, cfg.displacement_mm, positions)
    brain_p = ndi.map_coordinates(tmpl.brain, coords, order=1, output=np.float32)
    brain = brain_p >= 0.5
    # Tissue maps are only needed inside the brain: sampling them there alone saves most of the work.
    inside = coords[:, brain]
    gm, wm = np.zeros_like(brain_p), np.zeros_like(brain_p)
    gm[brain] = ndi.map_coordinates(tmpl.gm, inside, order=1, output=np.float32)
    wm[brain] = ndi.map_coordinates(tmpl.wm, inside, order=1, output=np.float32)
    csf = np.clip(brain_p - gm - wm, 0.0, 1.0) * brain
    tissue = np.where((wm >= gm) & (wm >= csf), WM, np.where(gm >= csf, GM, CSF)).astype(np.uint8) * brain
    mni_x = coords[0] * tmpl.affine[0, 0] + tmpl.affine[0, 3]
    return _Anatomy(window, (csf, gm, wm), brain, tissue, mni_x)


def _pick_centre(rng: np.random.Generator, anat: _Anatomy) -> np.ndarray:
    """Tumour centre: a white (mostly) or grey matter voxel of one hemisphere, clear of the midline."""
    side = anat.mni_x < -8.0 if rng.random() < 0.5 else anat.mni_x > 8.0
    tissue = WM if rng.random() < 0.7 else GM
    candidates = np.flatnonzero((anat.tissue == tissue) & side)
    return np.array(np.unravel_index(rng.choice(candidates), anat.tissue.shape))


def _radial_coordinate(rng: np.random.Generator, offsets: np.ndarray, radius: float) -> np.ndarray:
    """Distance from the centre in units of a lobulated, anisotropic radius (1 on the core's surface)."""
    axes = np.clip(np.exp(rng.normal(0.0, 0.12, 3)), 0.8, 1.25)
    frame = (_rotation(rng, 180.0).T / axes[:, None]).astype(np.float32)
    local = [sum(frame[i, j] * offsets[j] for j in range(3)) for i in range(3)]
    rho = np.sqrt(local[0] ** 2 + local[1] ** 2 + local[2] ** 2) + np.float32(1e-6)
    # Lobes: smooth noise on the sphere of directions, made of a few random plane waves.
    waves = rng.standard_normal((6, 3))
    waves *= rng.uniform(1.5, 3.5, (6, 1)) / np.linalg.norm(waves, axis=1, keepdims=True)
    unit = [axis / rho for axis in local]
    angular = np.zeros_like(rho)
    for wave, phase in zip(waves.astype(np.float32), rng.uniform(0.0, 2 * np.pi, 6).astype(np.float32)):
        angular += np.cos(wave[0] * unit[0] + wave[1] * unit[1] + wave[2] * unit[2] + phase)
    angular *= np.float32(1.0 / np.sqrt(3.0))  # unit variance
    strength = rng.uniform(0.08, 0.2)
    return rho / (radius * np.exp(strength * np.clip(angular, -2.0, 2.0)))


def _front_arrival(seed: np.ndarray, speed: np.ndarray, steps: int) -> np.ndarray:
    """Step at which a front started at `seed` reaches each voxel, advancing `speed` voxels per step."""
    reached = seed.copy()
    progress = np.zeros(speed.shape, np.float32)
    arrival = np.zeros(speed.shape, np.float32)
    # Alternating 6- and 26-neighbourhoods keep the front much rounder than any single neighbourhood.
    balls = [ndi.generate_binary_structure(3, 1), ndi.generate_binary_structure(3, 3)]
    for step in range(1, steps + 1):
        front = ndi.binary_dilation(reached, balls[step % 2]) & ~reached
        progress[front] += speed[front]
        new = front & (progress >= 1.0)
        arrival[new] = step
        reached |= new
    # Unreached voxels keep their partial progress (steps + 1 almost reached, steps + 2 untouched), so that
    # the upsampled boundary is smooth rather than blocky.
    arrival[~reached] = steps + 2.0 - np.minimum(progress[~reached], 1.0)
    return arrival


def _oedema(core: np.ndarray, speed: np.ndarray, reach: float, texture: np.ndarray) -> np.ndarray:
    """Oedema around `core`: front propagation on a 2 mm grid for `reach` mm at unit `speed`."""
    steps = max(1, round(reach / 2.0))
    pad = [(0, n % 2) for n in core.shape]
    coarse = tuple(n // 2 + n % 2 for n in core.shape)
    blocks = (coarse[0], 2, coarse[1], 2, coarse[2], 2)
    seed = np.pad(core, pad).reshape(blocks).any(axis=(1, 3, 5))
    slow = np.pad(speed, pad).reshape(blocks).mean(axis=(1, 3, 5))
    arrival = ndi.zoom(_front_arrival(seed, slow, steps), 2, order=1, grid_mode=True, mode="nearest")
    arrival = arrival[tuple(slice(0, n) for n in core.shape)]
    # Texture roughens the boundary by up to one step (2 mm) either way.
    return arrival + np.clip(0.5 * texture, -1.0, 1.0) <= steps + 0.5


def _core(rng: np.random.Generator, cfg: PhantomConfig, s: np.ndarray, texture: np.ndarray,
          brain: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Necrosis, non-enhancing patches and the whole core, from the radial coordinate `s` (1 on the surface)."""
    core = (s + 0.08 * texture <= 1.0) & brain
    necrotic = 0.0 if rng.random() < cfg.no_necrosis_prob else rng.uniform(0.4, 0.8)
    # Opposite texture signs on the two surfaces make the rim thickness vary around the tumour.
    necrosis = core & (s - 0.08 * texture <= necrotic)
    # Half of the tumours have patches of rim that do not enhance (label 1, like necrosis).
    patchy = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else np.inf
    return necrosis, core & ~necrosis & (texture > patchy), core


def _tumour(rng: np.random.Generator, cfg: PhantomConfig, anat: _Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Tumour intensity classes (0 healthy .. 4 enhancing) and a texture field, both on the anatomy window."""
    centre = _pick_centre(rng, anat)
    radius = float(np.exp(rng.uniform(*np.log(cfg.core_radius_mm))))
    reach = rng.uniform(*cfg.oedema_reach_mm)
    # Lobes, anisotropy and texture stretch the core to at most about 2.3 radii (see _radial_coordinate);
    # the oedema front moves up to about 1.2 times `reach` along diagonals (see _front_arrival).
    half = int(np.ceil(radius * 2.3 + reach * 1.5 + 3))
    box = tuple(slice(max(c - half, 0), min(c + half + 1, n)) for c, n in zip(centre, anat.brain.shape))
    offsets = np.array(np.meshgrid(*(np.arange(s.start, s.stop) - c for s, c in zip(box, centre)),
                                   indexing="ij"), np.float32)
    # Texture wavelengths scale with the tumour: about ten cosine modes across its box.
    in_cube = [np.arange(s.start, s.stop) - c + half for s, c in zip(box, centre)]
    modes = int(np.clip((2 * half + 1) // 10, 3, 12))
    texture = _smooth_field(_smooth_coefficients(rng, modes), (2 * half + 1,) * 3, in_cube)
    brain = anat.brain[box]
    necrosis, non_enhancing, core = _core(rng, cfg, _radial_coordinate(rng, offsets, radius), texture, brain)
    # Oedema travels fast in white matter, slowly in grey matter, not at all through CSF.
    tissue = anat.tissue[box]
    speed = (tissue == WM) + np.float32(cfg.gm_speed) * (tissue == GM)
    oedema = _oedema(core, speed, reach, texture)
    oedema &= brain & (tissue != CSF) & ~core
    classes = np.zeros(anat.brain.shape, np.uint8)
    classes[box] = np.select([necrosis, non_enhancing, core, oedema],
                             [NECROSIS, NON_ENHANCING, ENHANCING, OEDEMA], 0)
    full_texture = np.zeros(anat.brain.shape, np.float32)
    full_texture[box] = texture
    return classes, full_texture


@functools.lru_cache(maxsize=1)
def _institution_scales() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-institution (gain, offset) per modality; the gain is the stored white-matter level."""
    scales = {}
    for number, institution in enumerate(INSTITUTIONS):
        rng = np.random.default_rng([_INSTITUTION_SEED, number])
        gain = np.exp(rng.uniform(np.log(400.0), np.log(4500.0), len(MODALITIES)))
        scales[institution] = (gain, rng.uniform(0.0, 0.05, len(MODALITIES)) * gain)
    return scales


def _render(rng: np.random.Generator, cfg: PhantomConfig, anat: _Anatomy, classes: np.ndarray,
            texture: np.ndarray, institution: str) -> dict[str, np.ndarray]:
    """Intensities of the four contrasts inside the brain (zero outside), as int16 on the anatomy window."""
    mask = anat.brain
    probs = [p[mask] for p in anat.probs]
    total = probs[0] + probs[1] + probs[2]
    cls = classes[mask]
    weight = _TUMOUR_WEIGHT[cls]
    texture = 1.0 + _TEXTURE_AMPLITUDE[cls] * texture[mask]
    positions = [np.arange(w.start, w.stop) for w in anat.window]
    sigma = np.float32(rng.uniform(*cfg.noise_sigma))
    gains, offsets = _institution_scales()[institution]
    volumes = {}
    for row, name, gain, offset in zip(_CONTRAST.astype(np.float32), MODALITIES, gains, offsets):
        healthy = (row[0] * probs[0] + row[1] * probs[1] + row[2] * probs[2]) / total
        signal = (1.0 - weight) * healthy + weight * row[2 + cls] * texture
        # Multiplicative bias: exp of a field of the lowest cosine modes, peaking at up to +-bias_max.
        log_bias = _smooth_field(_smooth_coefficients(rng, 3), SHAPE, positions)[mask]
        signal *= np.exp(log_bias * np.float32(rng.uniform(0.5, 1.0) * cfg.bias_max / np.abs(log_bias).max()))
        # Rician noise: magnitude of the signal plus complex Gaussian noise.
        noisy = np.hypot(signal + sigma * rng.standard_normal(signal.size, np.float32),
                         sigma * rng.standard_normal(signal.size, np.float32))
        values = np.float32(gain * rng.uniform(0.9, 1.1)) * noisy + np.float32(offset)
        volume = np.zeros(mask.shape, np.int16)
        # At least 1 inside the brain so that "nonzero" recovers the brain mask, as in BraTS.
        volume[mask] = np.clip(np.rint(values), 1, cfg.max_intensity)
        volumes[name] = volume
    return volumes


def _on_grid(crop: np.ndarray, window: tuple[slice, ...]) -> np.ndarray:
    """Place an array of the anatomy window on the zero-filled BraTS grid."""
    grid = np.zeros(SHAPE, crop.dtype)
    grid[window] = crop
    return grid


def _subject_id(index: int, institution: str) -> str:
    """BraTS-style ID, injective in `index`: three or more letters for CBICA, a number elsewhere."""
    if institution != "CBICA":
        return str(index + 1)
    letters = ""
    while len(letters) < 3 or index:
        index, digit = divmod(index, 26)
        letters = chr(ord("A") + digit) + letters
    return letters


def make_subject(index: int, seed: int, config: PhantomConfig | None = None) -> PhantomSubject:
    """Build subject `index` of the cohort `seed` in memory; identical for identical arguments."""
    cfg = config or PhantomConfig()
    # Independent streams per stage, so that changing one stage leaves the others' draws unchanged.
    naming, anatomy, tumour, render = (np.random.default_rng(s)
                                       for s in np.random.SeedSequence([seed, index]).spawn(4))
    institution = INSTITUTIONS[naming.integers(len(INSTITUTIONS))]
    anat = _deform_anatomy(anatomy, cfg)
    classes, texture = _tumour(tumour, cfg, anat)
    volumes = _render(render, cfg, anat, classes, texture, institution)
    return PhantomSubject(
        name=f"Brats18_{institution}_{_subject_id(index, institution)}_1",
        institution=institution,
        **{name: _on_grid(volume, anat.window) for name, volume in volumes.items()},
        seg=_on_grid(_SEG_LABEL[classes], anat.window),
        tissue=_on_grid(anat.tissue, anat.window),
        affine=BRATS_AFFINE.copy(),
    )


def _save_atomic(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI under a temporary name in the same folder, then rename: readers never see half a file."""
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm")
    # gzip level 1, nibabel's own default for .nii.gz: the volumes are mostly zeros, so it compresses well anyway
    write_bytes(path, gzip.compress(image.to_bytes(), compresslevel=1, mtime=0))


def write_subject(subject: PhantomSubject, out: Path) -> Path:
    """Write `subject` as `out/<name>/<name>_{t1,t1ce,t2,flair,seg,tissue_truth}.nii.gz`; returns the folder."""
    folder = Path(out) / subject.name
    folder.mkdir(parents=True, exist_ok=True)
    volumes = {name: getattr(subject, name) for name in MODALITIES}
    volumes.update(seg=subject.seg, tissue_truth=subject.tissue)
    for suffix, data in volumes.items():
        _save_atomic(data, subject.affine, folder / f"{subject.name}_{suffix}.nii.gz")
    logger.info("wrote %s", folder)
    return folder


def _build_and_write(job: tuple[int, int, Path, PhantomConfig | None]) -> Path:
    """One cohort job (module level, so that worker processes can unpickle it)."""
    index, seed, out, config = job
    return write_subject(make_subject(index, seed, config), out)


def write_cohort(out: Path, subjects: int, seed: int = 0, workers: int = 1,
                 config: PhantomConfig | None = None) -> list[Path]:
    """Write subjects 0..subjects-1 of cohort `seed` under `out`; returns their folders in index order.

    The result does not depend on `workers`: each subject draws only from its own (seed, index) stream.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(index, seed, out, config) for index in range(subjects)]
    return list(parallel_map(_build_and_write, jobs, workers, desc="phantom subjects"))
