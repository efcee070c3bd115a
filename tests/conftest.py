"""Shared fixtures: a small phantom cohort and its prepared store, built once per test session."""

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import png
import pytest
import torch

from toolkit.data.phantom import write_cohort
from toolkit.data.prepare import PrepareConfig, prepare
from toolkit.mpi import clean_environment


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


@pytest.fixture(scope="session")
def store_64_two(cohort, tmp_path_factory) -> Path:
    """The cohort prepared as ``store_64``, with two image channels: T1ce and FLAIR."""
    out = tmp_path_factory.mktemp("stores") / "real64-t1ce-flair"
    prepare(PrepareConfig(src=cohort, out=out, size=64, shard_size=128, workers=2, modality="t1ce,flair"))
    return out


def _latest_task_state(run_dir: Path) -> dict:
    folder = Path(run_dir) / "checkpoints"
    return torch.load(folder / (folder / "latest").read_text().strip(), weights_only=True)["task"]


def _launch_ranks(cmd: list[str], ranks: int = 2, timeout: float = 300) -> list[tuple[int, str]]:
    """Run ``cmd`` as ``ranks`` real processes of one gloo group on localhost (torchrun's variables); each rank's (exit
    status, stderr). A rank that dies leaves the others waiting in collectives, so at ``timeout`` every rank still
    running is killed (status −9)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = clean_environment()  # an MPI singleton of this test process must not leak into the ranks
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(r),
                                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(ranks)]
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
    return [(proc.returncode, proc.communicate()[1]) for proc in procs]


def _launch_ddp(cmd: list[str], ranks: int = 2, timeout: float = 300) -> None:
    """:func:`_launch_ranks`, asserting that every rank succeeded (all their error output is reported if not)."""
    results = _launch_ranks(cmd, ranks, timeout)
    failed = [(r, code) for r, (code, _) in enumerate(results) if code != 0]
    assert not failed, f"ranks failed {failed}:\n" + "\n".join(f"--- rank {r}\n{e}" for r, (_, e) in enumerate(results))


def _horovod_missing() -> str | None:
    """Why Horovod for PyTorch cannot be used here (None when it can): checked in a child process, which also proves
    its library loads. `make horovod` leaves the reason a build failed in the venv (``.horovod-unavailable``)."""
    check = subprocess.run([sys.executable, "-c", "import horovod.torch as h; assert h.mpi_built() and h.gloo_built()"],
                           env=clean_environment(), capture_output=True, text=True, timeout=120)
    if check.returncode == 0:
        return None
    status = Path(sys.prefix) / ".horovod-unavailable"
    why = status.read_text().strip() if status.exists() else check.stderr.strip().splitlines()[-1]
    return f"Horovod for PyTorch is not usable ({why}); `make horovod` builds it (make test runs it)"


@pytest.fixture(scope="session")
def horovod() -> Path:
    """The ``horovodrun`` launcher of this Python; skips, saying why, where Horovod could not be built."""
    missing = _horovod_missing()
    if missing:
        pytest.skip(missing)
    return Path(sys.executable).parent / "horovodrun"


@pytest.fixture(scope="session")
def keras():
    """Keras 3 on TensorFlow; skips, naming the install command, where TensorFlow is not installed."""
    import importlib.util

    from toolkit.models.unet_keras import INSTALL_HINT, keras_module

    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip(f"TensorFlow is not installed: {INSTALL_HINT} (make test installs it)")
    module = keras_module()
    # absl (TensorFlow's logging) binds its handler to the sys.stderr of import time, here pytest's capture file, and
    # closes that stream whenever a later logging.config.dictConfig (submitit's import does one) shuts handlers down,
    # which breaks pytest's capture for the rest of the session. absl never closes the real stderr.
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__
    return module


def _interrupt(cmd: list[str], run_dir: Path, sig: int, timeout: float = 300) -> subprocess.CompletedProcess:
    """Start a run, wait until it has written two periodic checkpoints, send ``sig``, and wait for it to end."""
    proc = subprocess.Popen(cmd, env=clean_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = Path(run_dir) / "checkpoints"
    deadline = time.monotonic() + timeout
    while len(list(folder.glob("ckpt-*.pt"))) < 2:
        assert proc.poll() is None, f"run ended before it could be interrupted: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for checkpoints"
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_at(cmd: list[str], run_dir: Path, checkpoint: str, timeout: float = 300) -> dict:
    """Start a run, SIGKILL it once its ``latest`` checkpoint is ``checkpoint`` or newer, and return that
    checkpoint's state (what a resume starts from)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latest = Path(run_dir) / "checkpoints" / "latest"
    deadline = time.monotonic() + timeout
    while not latest.exists() or latest.read_text().strip() < checkpoint:
        assert proc.poll() is None, f"run ended before the kill: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {checkpoint}"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return torch.load(latest.parent / latest.read_text().strip(), weights_only=True)


@pytest.fixture
def kill_at():
    """``kill_at(cmd, run_dir, "ckpt-000000080.pt")``: kill the run once it checkpointed that far; its state then."""
    return _kill_at


@pytest.fixture
def interrupt():
    """``interrupt(cmd, run_dir, sig)``: run ``cmd``, signal it once two checkpoints exist, return the finished run."""
    return _interrupt


@pytest.fixture
def latest_task_state():
    """``latest_task_state(run_dir)``: the task state of a run's newest checkpoint."""
    return _latest_task_state


def _assert_same_state(a, b, path: str = "") -> None:
    """Two nested states (dicts, lists, tuples of tensors and plain values) are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path}: max |Δ| {float((a.double() - b.double()).abs().max())}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            _assert_same_state(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), path
        for k, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{path}/{k}")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def _conv_flops(model: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs (a multiply-add is 2) of one forward of ``model`` on ``inputs``, counted by hand from the shapes each
    convolution sees: ``2 · out elements · in_channels/groups · k²`` (transposed: per *input* element)."""
    counts: list[int] = []

    def count(module, args, out):
        k = module.kernel_size[0] * module.kernel_size[1]
        if isinstance(module, torch.nn.ConvTranspose2d):
            counts.append(2 * args[0].numel() * module.out_channels // module.groups * k)
        else:
            counts.append(2 * out.numel() * module.in_channels // module.groups * k)

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Linear)], "count linear layers too"
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return sum(counts)


def _unet_initial_state(config: Path) -> dict:
    """The weights every U-Net run of ``config`` starts from (seeded construction)."""
    from toolkit import config as configs
    from toolkit.train.unet import UNetRunConfig, build_model

    cfg = configs.load(UNetRunConfig, config)
    torch.manual_seed(cfg.seed)
    return build_model(cfg).state_dict()


def _bias_before_batchnorm(key: str, state: dict) -> bool:
    """Conv biases that BatchNorm cancels (and the running means that track them): their true gradient is exactly 0,
    so Adam turns rounding noise of ~1e-7 into ±lr steps that differ between any two summation orders."""
    if key.endswith("running_mean"):
        return True
    if key.endswith(".0.bias"):
        return key[: -len(".0.bias")] + ".1.running_var" in state
    return key.endswith("up.conv.bias")


def _update_difference(config: Path, reference: dict, state: dict) -> float:
    """How far U-Net weights ``state`` are from ``reference`` (both trained from ``config``'s initial weights): the
    norm of their difference relative to the norm of the reference's update, over the floating-point tensors whose
    gradient is not exactly 0. (A largest-element bound does not work: Adam's early steps are nearly ±lr for any
    gradient, so one near-zero gradient whose sign rounding flips moves its weight by 2·lr.)"""
    initial = _unet_initial_state(config)
    keys = [k for k in reference if reference[k].is_floating_point() and not _bias_before_batchnorm(k, reference)]
    diff = sum(float(((state[k] - reference[k]) ** 2).sum()) for k in keys)
    update = sum(float(((reference[k] - initial[k]) ** 2).sum()) for k in keys)
    return (diff / update) ** 0.5


@pytest.fixture
def unet_initial_state():
    """``unet_initial_state(config)``: the seeded initial weights of a U-Net config."""
    return _unet_initial_state


@pytest.fixture
def update_difference():
    """``update_difference(config, reference, state)``: the relative difference of trained U-Net weights."""
    return _update_difference


@pytest.fixture
def conv_flops():
    """``conv_flops(model, *inputs)``: a forward's convolution FLOPs, counted from layer shapes (not by torch)."""
    return _conv_flops


@pytest.fixture
def assert_same_state():
    """``assert_same_state(a, b)``: every tensor and value of two nested states is identical."""
    return _assert_same_state


@pytest.fixture
def launch_ranks():
    """``launch_ranks(cmd, ranks=2, timeout=300)``: run a command as DDP ranks; each rank's (exit status, stderr)."""
    return _launch_ranks


@pytest.fixture
def launch_ddp():
    """``launch_ddp(cmd)``: run a command as 2 DDP ranks and wait for both."""
    return _launch_ddp


# matplotlib's tab10 palette as published (not read from matplotlib): the colours the figures give classes 0-9
# (label panels are drawn with cmap tab10, vmin 0, vmax 9, nearest interpolation, so each class keeps its exact colour).
TAB10 = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
         (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def _bands(occupied: np.ndarray, min_size: int) -> list[tuple[int, int]]:
    """[start, stop) runs of True at least ``min_size`` long."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], occupied.astype(np.int8), [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2]) if b - a >= min_size]


class Figure:
    """A figure PNG decoded with pypng (independently of matplotlib): its RGB pixels, the grid of panels (blocks of
    non-white pixels at least ``min_size`` wide and high: text lines and tick labels are smaller) and the classes
    whose tab10 colour a region holds."""

    def __init__(self, path: Path, min_size: int = 40) -> None:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
        width, height, rows, _ = png.Reader(filename=str(path)).asRGBA8()
        self.rgb = np.vstack([np.asarray(row, np.uint8) for row in rows]).reshape(height, width, 4)[..., :3]
        self.width, self.height = width, height
        ink = (self.rgb < 250).any(axis=2)
        self.panels = [[self.rgb[top:bottom, left:right]
                        for left, right in _bands(ink[top:bottom].any(axis=0), min_size)]
                       for top, bottom in _bands(ink.any(axis=1), min_size)]

    @staticmethod
    def classes(pixels: np.ndarray, below: int = 7) -> set[int]:
        """The classes < ``below`` whose exact tab10 colour occurs in ``pixels`` (class 7's grey is left out by
        default: grey images hold it too)."""
        flat = pixels.reshape(-1, 3)
        return {c for c in range(below) if (flat == TAB10[c]).all(axis=1).any()}

    @staticmethod
    def has_colour(pixels: np.ndarray, rgb: tuple[int, int, int]) -> bool:
        """Whether the exact colour ``rgb`` occurs in ``pixels``."""
        return bool((pixels.reshape(-1, 3) == rgb).all(axis=1).any())

    @staticmethod
    def cells(panel: np.ndarray, n: int) -> np.ndarray:
        """The panel's colours at the centres of an ``n``×``n`` grid: an n² image drawn over the panel, read back."""
        rows = ((np.arange(n) + 0.5) * panel.shape[0] / n).astype(int)
        cols = ((np.arange(n) + 0.5) * panel.shape[1] / n).astype(int)
        return panel[rows[:, None], cols[None, :]]

    @classmethod
    def agreement(cls, panel: np.ndarray, labels: np.ndarray) -> float:
        """Fraction of the cells of the label array ``labels`` [S,S] that ``panel`` shows in their class colour.

        The image lies inside the axes' spines at a sub-pixel offset that the PNG does not record, so the cell grid
        is fitted: each side's inset (0-2 px in quarter pixels) is searched, rows then columns, twice. A panel of
        other labels cannot reach a high agreement by any inset (measured: a drawn random label map is read back
        exactly at the best inset, at 86-100 % with none, and other random maps at 15 %)."""
        n, classes = labels.shape[-1], cls.labels(panel)
        insets = np.arange(0, 2.01, 0.25)

        def centres(size: int, lo: float, hi: float) -> np.ndarray:
            return np.minimum(np.floor(lo + (np.arange(n) + 0.5) * (size - lo - hi) / n).astype(int), size - 1)

        rows, cols, best = centres(panel.shape[0], 1, 1), centres(panel.shape[1], 1, 1), 0.0
        for _ in range(2):
            for axis in (0, 1):
                for lo in insets:
                    for hi in insets:
                        grid = centres(panel.shape[axis], lo, hi)
                        r, c = (grid, cols) if axis == 0 else (rows, grid)
                        score = float((classes[r[:, None], c[None, :]] == labels).mean())
                        if score > best:
                            best, rows, cols = score, r, c
        return best

    @staticmethod
    def labels(cells: np.ndarray) -> np.ndarray:
        """Class id of each tab10-coloured pixel of ``cells`` [..., 3], -1 where the colour is no class's."""
        match = (cells[..., None, :] == np.asarray(TAB10, np.uint8)).all(axis=-1)
        return np.where(match.any(axis=-1), match.argmax(axis=-1), -1)


@pytest.fixture
def figure():
    """``figure(path)``: the decoded PNG figure at ``path`` (:class:`Figure`)."""
    return Figure
