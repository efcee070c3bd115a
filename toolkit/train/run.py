"""Starting a training run: config → run directory → distributed set-up → the shared loop. Used by the CLI and jobs.

A run directory holds the resolved ``config.yaml``; starting a run again with the same config resumes it from its
newest complete checkpoint, and with a different config is refused (naming the keys that differ). ``inputs.json``
holds the fingerprints of the stores the run reads (:mod:`toolkit.provenance`), recorded at the first start: resuming
against a store rebuilt or modified since is refused, naming the store.

One writer per run directory: the main rank holds its :class:`~toolkit.lock.WriterLock` for the run's whole lifetime,
so a second launcher (a requeued job whose old attempt still runs, a user starting the same command twice) stops at
once naming the holder, and touches nothing. Temporary files a killed writer left are removed only under the lock.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from toolkit import config as configs
from toolkit import provenance
from toolkit.atomic import remove_stale_temps
from toolkit.lock import WriterLock
from toolkit.train import distributed
from toolkit.train.errors import ClaimError
from toolkit.train.loop import LoopResult, StopRequest, run

log = logging.getLogger(__name__)

# model name -> (module, run-config class, task class); the module is imported only when that model is trained
TRAINERS = {
    "unet": ("toolkit.train.unet", "UNetRunConfig", "UNetTask"),
    "pgan": ("toolkit.train.pgan", "PGANRunConfig", "PGANTask"),
    "spade": ("toolkit.train.spade", "SPADERunConfig", "SPADETask"),
}


def trainer(model: str) -> tuple[type, type]:
    """The (run config class, task class) of ``model``."""
    if model not in TRAINERS:
        raise ValueError(f"unknown model {model!r} (known: {sorted(TRAINERS)})")
    module_name, config_name, task_name = TRAINERS[model]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, task_name)


def _claim_run_dir(run_dir: Path, cfg: Any) -> None:
    saved = run_dir / "config.yaml"
    resolved = configs.to_dict(cfg)
    if saved.exists():
        previous = yaml.safe_load(saved.read_text())
        if previous != resolved:
            keys = sorted(k for k in set(previous) | set(resolved) if previous.get(k) != resolved.get(k))
            raise configs.ConfigError(f"{saved}: the run was started with a different config (sections {keys}); "
                                      "use a new --run-dir or the same config to resume")
        return
    configs.dump(cfg, saved)


INPUTS = "inputs.json"


def _claim_inputs(run_dir: Path, cfg: Any) -> None:
    """Record the fingerprints of the stores ``cfg`` reads at the first start; refuse a start against other ones."""
    inputs = {}
    for key, store in cfg.input_stores().items():
        try:
            inputs[key] = {"store": str(store), "fingerprint": provenance.fingerprint(store)}
        except FileNotFoundError:
            raise FileNotFoundError(f"{store}: no store here (no manifest.json), named by {key}") from None
    try:
        provenance.claim(run_dir / INPUTS, inputs)
    except provenance.OptionsChanged as err:
        raise provenance.OptionsChanged(f"{err} (an input store was rebuilt or modified since the run started)"
                                        ) from None


@contextlib.contextmanager
def _claimed(run_dir: Path, cfg: Any, dist: distributed.Dist) -> Iterator[None]:
    """Hold ``run_dir`` for the run: the main rank takes its lock, checks or records the config and the inputs, and
    removes stale temporary files; every rank learns the outcome from one collective, so none waits for a main
    rank that gave up."""
    lock = WriterLock(run_dir, "run directory")
    error: Exception | None = None
    if dist.is_main:
        try:
            lock.acquire()
            _claim_run_dir(run_dir, cfg)
            _claim_inputs(run_dir, cfg)
            if removed := remove_stale_temps(run_dir):
                log.info("%s: removed %d temporary files a killed writer left", run_dir, removed)
        except Exception as exc:  # re-raised below, once the other ranks know
            lock.release()
            error = exc
    failed = dist.all_reduce_sum(torch.tensor([float(error is not None)], device=dist.device))
    if error is not None:
        raise error
    if float(failed[0]) > 0:
        raise ClaimError(f"{run_dir}: rank 0 could not claim the run directory (its error says why); rank "
                         f"{dist.rank} stops too")
    try:
        yield
    finally:
        lock.release()


def train(model: str, config_path: Path, overrides: tuple[str, ...] = (), run_dir: Path | None = None,
          backend: str = "none") -> LoopResult:
    """Train ``model`` as configured; resumes when ``run_dir`` already holds a run of the same config."""
    config_cls, task_cls = trainer(model)
    cfg = configs.load(config_cls, config_path, overrides)
    run_dir = Path(run_dir or Path("runs") / f"{model}-{Path(config_path).stem}")
    dist = distributed.init(backend, cfg.runtime.device, timeout_s=cfg.runtime.collective_timeout_s)
    try:
        return _train(task_cls, cfg, run_dir, dist)
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # the frames hold the task: free it before the group, see below
        raise
    finally:
        # The task (with its DDP modules) must be gone before the process group. A DDP reducer holding the group's
        # last reference destroys it with the GIL held, joining gloo's worker thread while that thread waits for the
        # GIL to free the last collective's tensors: a deadlock (seen in ~1 of 40 two-rank runs here). Freed first,
        # the group is destroyed by torch's own holder, which releases the GIL.
        gc.collect()
        dist.close()


def _train(task_cls: type, cfg: Any, run_dir: Path, dist: distributed.Dist) -> LoopResult:
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    with _claimed(run_dir, cfg, dist):
        stop = StopRequest()
        task = task_cls(cfg, dist, run_dir)
        return run(task, task.loop_config(), run_dir, dist, config=configs.to_dict(cfg), stop=stop)
