"""`tumorsynth export unet RUN`: a trained U-Net as a self-contained inference model (Keras, ONNX or TorchScript).

Owns the export of a U-Net run's ``best.pt`` and its check. The exported model needs nothing from this toolkit:

- input: the raw image as stored, float32 (the store's uint16 values cast, not rescaled), ``[N, C, S, S]`` (NCHW,
  ONNX input name ``image``; TorchScript) or ``[N, S, S, C]`` (NHWC, Keras), one channel per modality of the run's
  store in its order (C = 1 for a one-modality store). The batch size is free; ``S`` is the run's image size (its
  store's ``image_size``).
- inside: the run's normalisation (``x / max − mean`` with constants from ``best.pt["stats"]``, or per slice and
  channel, :func:`toolkit.train.unet.normalise`), the U-Net in inference mode (BatchNorm with its running
  statistics), and the softmax over classes. Keras takes the paper's normalisation only (a ``Rescaling`` layer).
- output: class probabilities, float32, ``[N, C, S, S]`` (ONNX output name ``probabilities``; TorchScript) or
  ``[N, S, S, C]`` (Keras); ``argmax`` over the class axis gives the label map in the run's class scheme.

The same contract is returned as a dict (and printed by ``--json``). Every export is loaded back in its own runtime
(torch.jit.load, onnxruntime, keras.saving.load_model) and run on a few images — the first rows of the run store's
test split, or seeded random intensities when the store is not readable — and compared with the torch model; the file
appears at ``OUT`` only if the difference is within :data:`TOLERANCE` (written beside it, fsynced, renamed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from toolkit import config as configs
from toolkit.atomic import atomic_path
from toolkit.data.store import Store, StoreError, as_channels
from toolkit.models.unet import UNet
from toolkit.models.unet_keras import build_keras_unet, copy_weights, keras_module
from toolkit.train.unet import UNetRunConfig, build_model, normalise

log = logging.getLogger(__name__)

Format = Literal["keras", "onnx", "torchscript"]
ONNX_HINT = "pip install -e '.[onnx]'"
TOLERANCE = 1e-4  # max abs difference in probability between the exported file and the torch model
VALIDATION_IMAGES = 4
ONNX_OPSET = 18

Runner = Callable[[np.ndarray], np.ndarray]  # float32 NCHW raw images -> float32 NCHW probabilities


class ExportError(ValueError):
    """A run cannot be exported as asked (missing files, missing runtime, failed validation)."""


class InferenceUNet(nn.Module):
    """Raw images ``[N, C_in, S, S]`` → probabilities ``[N, C, S, S]``: the run's normalisation, the U-Net, the
    softmax."""

    def __init__(self, unet: UNet, stats: dict[str, Any]) -> None:
        super().__init__()
        self.unet = unet.eval()
        # plain floats: baked in as constants
        self.stats = {"max": float(stats["max"]), "mean": float(stats["mean"]),
                      "normalise": str(stats.get("normalise", "max"))}
        self.eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.unet(normalise(image, self.stats)), dim=1)


def load_run(run_dir: Path) -> tuple[UNetRunConfig, UNet, dict[str, Any]]:
    """The run's config, its best U-Net (eval mode, CPU) and normalisation stats; errors name the missing file."""
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: no such run directory")
    config_path, best_path = run_dir / "config.yaml", run_dir / "best.pt"
    if not config_path.exists():
        raise ExportError(f"{config_path}: missing; {run_dir} is not a U-Net run directory")
    cfg = configs.load(UNetRunConfig, config_path)
    if not best_path.exists():
        raise ExportError(f"{best_path}: no best checkpoint yet (the run has not finished an epoch)")
    best = torch.load(best_path, map_location="cpu", weights_only=True)
    model = build_model(cfg, int(best.get("in_channels", 1)))
    model.load_state_dict(best["model"], strict=True)
    return cfg, model.eval(), dict(best["stats"])


def validation_images(store_path: Path, image_size: int | None, peak: float,
                      channels: int = 1) -> tuple[np.ndarray, str, int]:
    """``(images [n, C, S, S] float32, source description, S)``: the store's first test rows, else seeded random."""
    try:
        store = Store(store_path)
        manifest = store.manifest
    except StoreError as exc:
        if image_size is None:
            raise ExportError(f"{exc}; pass the image size (--size) to export without the run's store") from exc
        manifest = None
    size = image_size or manifest.image_size
    test = manifest.splits.get("test") if manifest else None
    if (manifest and manifest.has_image and manifest.image_size == size and manifest.channels == channels and test
            and test.n):
        rows = as_channels(store.read("test", 0, VALIDATION_IMAGES, fields=("image",))["image"])
        return rows.astype(np.float32), f"{store_path} test rows 0-{len(rows) - 1}", size
    generator = np.random.default_rng(0)
    images = (generator.random((VALIDATION_IMAGES, channels, size, size)) * peak).astype(np.float32)
    return images, "seeded random intensities in [0, max]", size


@contextlib.contextmanager
def staged_path(out: Path) -> Iterator[Path]:
    """Like :func:`toolkit.atomic.atomic_path`, but the temporary name ends in ``out``'s suffix (Keras reads and
    writes only ``*.keras`` names)."""
    with atomic_path(out) as tmp:
        staged = tmp.with_name(tmp.name + out.suffix)
        try:
            yield staged
            os.replace(staged, tmp)
        finally:
            staged.unlink(missing_ok=True)


def _torchscript(model: InferenceUNet, example: torch.Tensor, path: Path) -> Runner:
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export, but TorchScript is the format asked for; the shape guard
        # in UNet.forward is Python control flow that tracing records as a constant, which is right for a fixed S.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # check_trace re-runs the trace (seconds on CPU); export_unet checks the saved file on more images instead
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return loaded(torch.from_numpy(x)).numpy()

    return run


def _onnx(model: InferenceUNet, example: torch.Tensor, path: Path) -> Runner:
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as exc:
        raise ExportError(f"ONNX export needs onnxscript and onnxruntime ({exc}): {ONNX_HINT}") from exc
    program = torch.onnx.export(model, (example,), input_names=["image"], output_names=["probabilities"],
                                dynamic_shapes={"image": {0: torch.export.Dim("batch")}}, opset_version=ONNX_OPSET,
                                dynamo=True, verbose=False)
    program.save(path, external_data=False)  # one self-contained file (our largest model is far below 2 GB)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(["probabilities"], {"image": x})[0]


def _keras(model: InferenceUNet, example: torch.Tensor, path: Path) -> Runner:
    try:
        keras = keras_module()
    except ImportError as exc:
        raise ExportError(str(exc)) from exc
    keras_model = build_keras_unet(model.unet.config, example.shape[-1],
                                   normalisation=(model.stats["max"], model.stats["mean"]))
    copy_weights(model.unet, keras_model)
    keras_model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    return lambda x: np.asarray(loaded(x.transpose(0, 2, 3, 1), training=False)).transpose(0, 3, 1, 2)


EXPORTERS: dict[str, Callable[[InferenceUNet, torch.Tensor, Path], Runner]] = {
    "keras": _keras, "onnx": _onnx, "torchscript": _torchscript}


def contract(fmt: str, size: int, classes: int, stats: dict[str, Any], channels: int = 1) -> dict[str, Any]:
    """The I/O contract of an exported model (see the module docstring)."""
    nhwc = fmt == "keras"
    per_slice = stats.get("normalise", "max") == "slice"
    formula = "x / mean of x > 0, per slice and channel" if per_slice else "x / max - mean"
    return {
        "input": {"name": "image", "dtype": "float32", "layout": "NHWC" if nhwc else "NCHW",
                  "shape": [None, size, size, channels] if nhwc else [None, channels, size, size],
                  "values": "raw stored intensities (uint16 cast to float32, not rescaled)"},
        "output": {"name": "probabilities", "dtype": "float32", "layout": "NHWC" if nhwc else "NCHW",
                   "shape": [None, size, size, classes] if nhwc else [None, classes, size, size],
                   "values": "softmax class probabilities; argmax over the class axis is the label map"},
        "classes": classes,
        "normalisation": {"formula": formula, **({} if per_slice else {"max": stats["max"], "mean": stats["mean"]}),
                          "applied": "inside the exported model"},
    }


def export_unet(run_dir: Path, fmt: Format, out: Path, *, image_size: int | None = None) -> dict[str, Any]:
    """Export the best U-Net of ``run_dir`` to ``out`` as ``fmt`` and check it; returns the contract and the check.

    ``image_size`` defaults to the run store's; give it to export a run whose store is not readable here.
    """
    run_dir, out = Path(run_dir), Path(out)
    if fmt not in EXPORTERS:
        raise ExportError(f"unknown export format {fmt!r} (known: {', '.join(EXPORTERS)})")
    if fmt == "keras" and out.suffix != ".keras":
        raise ExportError(f"{out}: a Keras model file must end in .keras (Keras refuses to load other names)")
    cfg, unet, stats = load_run(run_dir)
    if fmt == "keras" and stats.get("normalise", "max") != "max":
        raise ExportError(f"{run_dir}: Keras export takes the paper's normalisation (data.normalise: max) only, this "
                          f"run's is {stats['normalise']!r}: export it as onnx or torchscript")
    channels = unet.config.in_channels
    images, source, size = validation_images(cfg.data.real, image_size, stats["max"], channels)
    model = InferenceUNet(unet, stats)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    # Trace/export on a smaller batch than the check uses, so the check also proves the batch axis is free.
    example = torch.from_numpy(images[: max(1, len(images) // 2)])
    with staged_path(out) as path:
        got = EXPORTERS[fmt](model, example, path)(images)
        if got.shape != expected.shape:
            raise ExportError(f"{out}: exported model returned shape {got.shape}, expected {expected.shape}")
        diff = float(np.abs(got - expected).max())
        if not diff <= TOLERANCE:
            raise ExportError(f"{out}: exported {fmt} model differs from the torch model by {diff:.3g} "
                              f"(> {TOLERANCE:g}) on {source}; nothing written")
    log.info("exported %s as %s to %s (max abs diff %.3g on %s)", run_dir, fmt, out, diff, source)
    return {"format": fmt, "path": str(out), "run": str(run_dir), "bytes": out.stat().st_size,
            **contract(fmt, size, cfg.data.classes, stats, channels),
            "validation": {"images": len(images), "source": source, "max_abs_diff": diff, "tolerance": TOLERANCE}}
