"""`tumorsynth export unet`: each format, loaded back in its own runtime, gives evaluate's probabilities on real store
images from raw intensities; the JSON states the I/O contract; bad input fails naming the path and writes nothing."""

import importlib.util
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from toolkit import config as configs
from toolkit.cli import main
from toolkit.data.dataset import SliceDataset, Source
from toolkit.train import export
from toolkit.train.precision import Precision
from toolkit.train.unet import UNetRunConfig, build_model, forward

CLASSES = 7
TOLERANCE = 1e-4
CONTRACT_KEYS = {"format", "path", "input", "output", "classes", "normalisation", "validation"}
# Third-party deprecations the tests cannot act on: loading TorchScript is what its users do, Keras 3.15 saves
# weights through numpy's old __array__ protocol, and torch 2.13's ONNX exporter uses a deprecated pytree check.
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning"),
              pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning")]


def _needs(*modules: str, hint: str) -> pytest.MarkDecorator:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed: {hint}")


KERAS = [pytest.mark.keras]  # the `runtime` fixture skips through the session's `keras` fixture
ONNX = [pytest.mark.onnx, _needs("onnxruntime", "onnxscript", "onnx", hint="pip install -e '.[onnx]'")]


@pytest.fixture(scope="module")
def run_dir(store_64, tmp_path_factory):
    """A one-epoch U-Net run (16 real slices, narrow widths): a real config.yaml and best.pt."""
    root = tmp_path_factory.mktemp("export-run")
    config = {"data": {"real": str(store_64), "real_n": 16, "classes": CLASSES},
              "model": {"widths": [4, 8, 16, 32], "bridge": 32}, "optim": {"lr": 1e-3, "batch": 8},
              "loop": {"epochs": 1, "checkpoint_every_steps": 0, "checkpoint_every_minutes": 0.0},
              "runtime": {"threads": 1}, "seed": 0}
    (root / "unet.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "toolkit.cli", "train", "unet", "-c", str(root / "unet.yaml"),
                           "--run-dir", str(root / "run")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return root / "run"


@pytest.fixture(scope="module")
def evaluated(run_dir):
    """Raw test images of the run's store (6, more than the export checks) and their probabilities from evaluate's
    torch path (``toolkit.train.unet.forward`` on the loaded best checkpoint)."""
    cfg = configs.load(UNetRunConfig, run_dir / "config.yaml")
    best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    model = build_model(cfg)
    model.load_state_dict(best["model"])
    model.eval()
    batch = SliceDataset.collate(SliceDataset([Source(cfg.data.real, "test", n=6)]).__getitems__(list(range(6))))
    with torch.no_grad():
        probs, _ = forward(model, batch, best["stats"], CLASSES, torch.device("cpu"),
                           Precision.for_device("fp32", torch.device("cpu")))
    return batch["image"].numpy().astype(np.float32), probs.numpy(), best["stats"]


@pytest.fixture
def runtime(fmt, request):
    """The format's runtime, imported before the export (Keras through the session's ``keras`` fixture)."""
    if fmt == "keras":
        request.getfixturevalue("keras")
    return RUNTIMES[fmt]


def _run_torchscript(path, images):
    with torch.no_grad():
        return torch.jit.load(str(path)).eval()(torch.from_numpy(images)).numpy()


def _run_onnx(path, images):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    return session.run(["probabilities"], {"image": images})[0]


def _run_keras(path, images):
    import keras

    model = keras.saving.load_model(path, compile=False)
    return np.asarray(model.predict(images.transpose(0, 2, 3, 1), verbose=0)).transpose(0, 3, 1, 2)


RUNTIMES = {"torchscript": _run_torchscript, "onnx": _run_onnx, "keras": _run_keras}


def _export(capsys, *argv):
    code = main(["export", "unet", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("fmt", [
    "torchscript", pytest.param("onnx", marks=ONNX), pytest.param("keras", marks=KERAS)])
def test_export_runs_in_its_own_runtime_like_evaluate(run_dir, evaluated, tmp_path, capsys, fmt, runtime):
    out = tmp_path / f"unet.{fmt}"
    code, stdout, err = _export(capsys, run_dir, "--format", fmt, "--out", out, "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert set(doc) >= CONTRACT_KEYS and doc["format"] == fmt and doc["path"] == str(out)
    assert doc["classes"] == CLASSES and doc["input"]["dtype"] == "float32"
    images, expected, stats = evaluated
    assert doc["normalisation"]["max"] == stats["max"] and doc["normalisation"]["mean"] == stats["mean"]
    check = doc["validation"]
    assert "test rows" in check["source"] and check["max_abs_diff"] <= check["tolerance"]
    assert out.exists() and doc["bytes"] == out.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporaries left beside it
    got = runtime(out, images)  # raw intensities in, a batch size the export never saw
    nchw = [len(images) if d is None else d for d in doc["output"]["shape"]]
    if doc["output"]["layout"] == "NHWC":
        nchw = [nchw[0], nchw[3], nchw[1], nchw[2]]
    assert list(got.shape) == nchw == list(expected.shape)
    diff = float(np.abs(got - expected).max())
    print(f"{fmt}: export check {check['max_abs_diff']:.3g}, vs evaluate's torch path {diff:.3g}")
    assert diff < TOLERANCE, diff
    # the comparison can fail: the network is not constant over images and classes
    assert float(np.abs(expected - expected.mean(0, keepdims=True)).max()) > 1e-2


def test_text_output_names_file_and_contract(run_dir, tmp_path, capsys):
    out = tmp_path / "unet.pt"
    code, stdout, err = _export(capsys, run_dir, "--format", "torchscript", "--out", out)
    assert code == 0, err
    assert stdout.startswith(f"{out}: torchscript model") and "[None, 1, 64, 64]" in stdout


def test_missing_run_names_the_path(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    code, _, err = _export(capsys, missing, "--format", "torchscript", "--out", tmp_path / "m.pt")
    assert code != 0 and f"{missing}: no such run directory" in err
    assert not (tmp_path / "m.pt").exists()


def test_run_without_best_checkpoint_names_it(run_dir, tmp_path, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(run_dir / "config.yaml", partial / "config.yaml")
    code, _, err = _export(capsys, partial, "--format", "torchscript", "--out", tmp_path / "m.pt")
    assert code != 0 and str(partial / "best.pt") in err
    (partial / "config.yaml").unlink()
    code, _, err = _export(capsys, partial, "--format", "torchscript", "--out", tmp_path / "m.pt")
    assert code != 0 and str(partial / "config.yaml") in err
    assert not (tmp_path / "m.pt").exists()


def test_unknown_format_and_bad_keras_name_are_refused(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "unet", str(run_dir), "--format", "tflite", "--out", str(tmp_path / "m.tflite")])
    assert exit_info.value.code != 0 and "invalid choice: 'tflite'" in capsys.readouterr().err
    code, _, err = _export(capsys, run_dir, "--format", "keras", "--out", tmp_path / "m.h5")
    assert code != 0 and f"{tmp_path / 'm.h5'}: a Keras model file must end in .keras" in err
    assert list(tmp_path.iterdir()) == []


def test_failed_validation_leaves_out_untouched(run_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "unet.pt"
    out.write_bytes(b"previous export")
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # no difference can pass: the check must refuse the file
    code, _, err = _export(capsys, run_dir, "--format", "torchscript", "--out", out)
    assert code != 0 and f"{out}: exported torchscript model differs" in err
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_without_the_store_it_needs_a_size_then_checks_on_random_images(run_dir, tmp_path, capsys):
    moved = tmp_path / "moved-run"
    moved.mkdir()
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["data"]["real"] = str(tmp_path / "gone-store")
    (moved / "config.yaml").write_text(yaml.safe_dump(cfg))
    shutil.copy(run_dir / "best.pt", moved / "best.pt")
    code, _, err = _export(capsys, moved, "--format", "torchscript", "--out", tmp_path / "m.pt")
    assert code != 0 and "gone-store" in err and "--size" in err
    code, stdout, err = _export(capsys, moved, "--format", "torchscript", "--out", tmp_path / "m.pt",
                                "--size", "32", "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["input"]["shape"] == [None, 1, 32, 32] and doc["validation"]["source"].startswith("seeded random")


def test_keras_export_without_tensorflow_names_the_install_command(run_dir, tmp_path, capsys, monkeypatch):
    for name in ("keras", "tensorflow"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError, installed or not
    code, _, err = _export(capsys, run_dir, "--format", "keras", "--out", tmp_path / "m.keras")
    assert code != 0 and "pip install -e '.[keras]'" in err
    assert list(tmp_path.iterdir()) == []
