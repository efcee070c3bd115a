"""Sweeps: a base config × a grid, submitted as one job array, tracked in a sweep directory, reported as Table 1.

Sweep YAML (configs/sweeps/table1.yaml)::

    name: table1
    model: unet
    base: ../paper/unet.yaml          # relative to the sweep file
    vars: {real: stores/brats18-256, synthetic_full: stores/synthetic-full}   # "${name}" in values below
    set: {data.real: "${real}"}       # overrides for every member
    evaluate: test                    # split each finished member is scored on
    repeats: 1                        # seeds per grid point (mean ± sd in the report)
    grid:                             # axes; the product is the members
      classes: {data.classes: [7, 4, 2]}          # one key with a list of values
      mix:                                         # or labelled override sets
        "26040 + 0": {data.real_n: 26040, data.synthetic: null}
        "26040 + 8960": {data.real_n: 26040, data.synthetic: "${synthetic_full}", data.synthetic_n: 8960}
    report: {columns: classes, rows: mix}
    extras:                           # labelled entries added to axes only when asked for (--with augmentation)
      augmentation: {mix: {"26040 + aug": {data.real_n: 26040, augment: {flip: {p: 0.5}}}}}

The sweep directory holds ``sweep.json`` (the spec and, per member, its labels, overrides, run directory and every
job id it was submitted under), ``runs/<member>/`` and ``logs/`` (submitit, private: it holds pickled jobs). A
member's state comes from its run directory (``DONE`` and the evaluation file, ``ERROR``, checkpoints,
``attempts.jsonl``), from its lock (a live process holding the run directory is running, whatever the controller says)
and, for jobs SLURM still knows, from the controller; never from accounting. While the controller does not answer, a
member that may still be queued is "unknown", and nothing resubmits it.

One writer at a time: submitting and resuming hold the sweep directory's lock (:mod:`toolkit.lock`), on ``local``
until the members have run. Submitting a sweep file to an existing sweep directory resumes it when its definition
(members and their overrides, base config and its content, evaluation split, cluster, profile, report axes) is
unchanged, and is refused naming what differs otherwise.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from jobs.base import ATTEMPTS, ERROR
from jobs.train import TrainJob
from toolkit import config as configs
from toolkit.atomic import write_json
from toolkit.cluster import slurmctl
from toolkit.cluster.executors import ClusterError, Profile, executor, load_profile
from toolkit.lock import WriterLock, holder
from toolkit.provenance import compare, fingerprint
from toolkit.report.tables import table1

log = logging.getLogger(__name__)

SWEEP = "sweep.json"
STATES = ("not started", "pending", "running", "requeued", "preempted", "done", "failed", "unknown")
RESUBMIT = ("not started", "preempted", "failed")  # the states `resume` submits again


@dataclass(frozen=True)
class ReportAxes:
    columns: str = "classes"
    rows: str = "mix"


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep file; ``grid`` maps axis → {label: overrides}, in file order."""

    name: str
    model: str
    base: Path
    grid: dict[str, dict[str, dict[str, Any]]]
    set: dict[str, Any] = field(default_factory=dict)
    evaluate: str = "test"
    repeats: configs.PositiveInt = 1
    report: ReportAxes = field(default_factory=ReportAxes)


def load_spec(path: Path, sets: tuple[str, ...] = (), variables: tuple[str, ...] = (),
              extras: tuple[str, ...] = ()) -> SweepSpec:
    """Read a sweep file, plus ``key=value`` overrides for every member (after the file's own ``set``),
    ``name=value`` variables (over the file's ``vars``) and the named groups of its ``extras`` (their labelled
    entries appended to their axes); every member's config is checked now, so a typo fails before anything is
    submitted."""
    path = Path(path)
    doc = configs.safe_load_text(path.read_text(), str(path))  # duplicate keys refused, naming the line
    if not isinstance(doc, dict) or "grid" not in doc:
        raise configs.ConfigError(f"{path}: a sweep needs a 'grid' mapping")
    names = {**(doc.pop("vars", None) or {}), **_parse_sets(variables)}
    doc["set"] = {**(doc.get("set") or {}), **_parse_sets(sets)}
    doc["set"], doc["grid"] = _substitute(path, doc["set"], names), _substitute(path, doc["grid"], names)
    grid = {axis: _axis(path, axis, values) for axis, values in doc.pop("grid").items()}
    groups = _substitute(path, doc.pop("extras", None) or {}, names)
    for name in extras:
        if name not in groups:
            raise configs.ConfigError(f"{path}: no extras group {name!r} (extras: {sorted(groups)})")
        for axis, values in groups[name].items():
            if axis not in grid:
                raise configs.ConfigError(f"{path}: extras.{name}.{axis} is not a grid axis ({list(grid)})")
            grid[axis] = {**grid[axis], **_axis(path, f"extras.{name}.{axis}", values)}
    doc["base"] = str((path.parent / doc["base"]).resolve())
    spec = configs.from_dict(SweepSpec, {**doc, "grid": {}}, source=str(path))
    spec = SweepSpec(**{**spec.__dict__, "grid": grid})
    if set(grid) != {spec.report.rows, spec.report.columns} and len(grid) == 2:
        raise configs.ConfigError(f"{path}: report axes {spec.report} are not the grid's axes {list(grid)}")
    from toolkit.train.run import trainer

    config_cls, _ = trainer(spec.model)
    for member in members(spec):
        configs.load(config_cls, spec.base, member["overrides"], overrides_source=f"{path}: member {member['name']}")
    return spec


def _substitute(path: Path, value: Any, names: dict[str, Any]) -> Any:
    """``value`` with every string ``"${name}"`` replaced by the variable ``name``."""
    if isinstance(value, dict):
        return {k: _substitute(path, v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(path, v, names) for v in value]
    match = re.fullmatch(r"\$\{(\w+)\}", value) if isinstance(value, str) else None
    if match is None:
        return value
    if match[1] not in names:
        raise configs.ConfigError(f"{path}: unknown variable ${{{match[1]}}} (vars: {sorted(names)})")
    return names[match[1]]


def _parse_sets(sets: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise configs.ConfigError(f"--set: expected key.path=value, got {item!r}")
        out[key.strip()] = configs.safe_load_text(text, f"--set {item}")
    return out


def _axis(path: Path, axis: str, values: Any) -> dict[str, dict[str, Any]]:
    if isinstance(values, dict) and len(values) == 1 and isinstance(next(iter(values.values())), list):
        (key, options), = values.items()
        return {str(v): {key: v} for v in options}
    if isinstance(values, dict) and all(isinstance(v, dict) for v in values.values()):
        return {str(label): dict(overrides) for label, overrides in values.items()}
    raise configs.ConfigError(f"{path}: grid.{axis} must be {{key: [values]}} or {{label: {{key: value}}}}")


def _override(key: str, value: Any) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def members(spec: SweepSpec) -> list[dict[str, Any]]:
    """The grid's product × repeats: name, labels per axis, seed and the ``--set`` overrides of each member."""
    out = []
    axes = list(spec.grid)
    for i, combo in enumerate(itertools.product(*(spec.grid[a].items() for a in axes), range(spec.repeats))):
        *choices, seed = combo
        labels = {axis: label for axis, (label, _) in zip(axes, choices)}
        sets = dict(spec.set)
        for _, overrides in choices:
            sets.update(overrides)
        sets["seed"] = seed
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", "-".join(labels.values())).strip("-")
        out.append({"name": f"{i:03d}-{slug}-s{seed}", "labels": labels, "seed": seed,
                    "overrides": [_override(k, v) for k, v in sets.items()]})
    return out


def _definition(doc: dict[str, Any]) -> dict[str, Any]:
    """What makes a sweep's results, from its ``sweep.json``: compared when a sweep file is submitted again."""
    out = {key: doc.get(key) for key in ("name", "model", "base", "base_fingerprint", "evaluate", "cluster",
                                         "profile", "report")}
    out["members"] = [m["name"] for m in doc["members"]]
    for m in doc["members"]:  # one entry per override, so that a difference names the member and the key
        out[f"{m['name']} labels"] = m["labels"]
        out.update({f"{m['name']} {key}": value for key, _, value in (o.partition("=") for o in m["overrides"])})
    return out


class Sweep:
    """A sweep directory: submit, status, resume, report.

    ``Sweep(root)`` reads it (status, report); :meth:`submit` and :meth:`resume` take its lock for their duration.
    :meth:`create` returns one that holds the lock until :meth:`close` (``with Sweep.create(...) as sweep``).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        path = self.root / SWEEP
        if not path.exists():
            raise FileNotFoundError(f"{path}: not a sweep directory (no {SWEEP})")
        self.doc = json.loads(path.read_text())
        self._lock: WriterLock | None = None

    @classmethod
    def create(cls, spec_path: Path, root: Path, cluster: str, profile: str, sets: tuple[str, ...] = (),
               variables: tuple[str, ...] = (), extras: tuple[str, ...] = ()) -> Sweep:
        """The sweep directory ``root`` for ``spec_path``, locked for writing until :meth:`close`: a new one is
        written; an existing one is reopened as it is when its definition is this one (:meth:`resume` then submits
        only what is neither done nor queued), and refused naming what differs otherwise (``OptionsChanged``).
        A second writer gets :class:`~toolkit.lock.LockedError` naming the one at work."""
        spec = load_spec(spec_path, sets, variables, extras)
        if cluster == "slurm" and not slurmctl.available():  # before anything is written
            raise ClusterError("--cluster slurm: no SLURM controller answers `scontrol ping` (is SLURM_CONF set?)")
        root = Path(root)
        doc = {"spec_file": str(Path(spec_path).resolve()), "name": spec.name, "model": spec.model,
               "base": str(spec.base), "base_fingerprint": fingerprint(spec.base), "evaluate": spec.evaluate,
               "cluster": cluster, "profile": profile,
               "report": {"rows": spec.report.rows, "columns": spec.report.columns},
               "members": [{**m, "run_dir": str((root / "runs" / m["name"]).resolve()), "jobs": []}
                           for m in members(spec)]}
        lock = WriterLock(root, "sweep").acquire()
        try:
            if (root / SWEEP).exists():
                compare(_definition(json.loads((root / SWEEP).read_text())), _definition(doc), root)
                log.info("%s: the same sweep exists; resuming it", root)
            else:
                write_json(root / SWEEP, doc)
            sweep = cls(root)
        except BaseException:
            lock.release()
            raise
        sweep._lock = lock
        return sweep

    def close(self) -> None:
        """Release the lock :meth:`create` took (if any)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Sweep:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the sweep's lock (unless this object already does) and work on ``sweep.json`` as last saved."""
        if self._lock is not None:
            yield
            return
        with WriterLock(self.root, "sweep") as lock:
            self._lock = lock
            try:
                self.doc = json.loads((self.root / SWEEP).read_text())
                yield
            finally:
                self._lock = None

    def _save(self) -> None:
        write_json(self.root / SWEEP, self.doc)

    def _job(self, member: dict[str, Any]) -> TrainJob:
        """A member's job: DDP or Horovod over the profile's tasks on SLURM, one process locally."""
        backend = load_profile(self.doc["profile"]).training_backend(self.doc["cluster"])
        return TrainJob(model=self.doc["model"], config=Path(self.doc["base"]), run_dir=Path(member["run_dir"]),
                        overrides=tuple(member["overrides"]), backend=backend, evaluate=self.doc["evaluate"])

    # --- submission -------------------------------------------------------------------------------------------
    def submit(self, names: list[str] | None = None, *, timeout: float = 24 * 3600,
               after: list[str] | None = None) -> list[str]:
        """Submit the named members (default: all) as one job array; returns their job ids.

        On ``local`` the members run as subprocesses, ``array_parallelism`` at a time, and this call waits for them
        (up to ``timeout`` seconds); on ``slurm`` it returns once the array is queued (after ``after`` succeeded).
        ``sweep.json`` records each job id as soon as it is submitted. Holds the sweep's lock throughout.
        """
        with self._writing():
            chosen = [m for m in self.doc["members"] if names is None or m["name"] in names]
            return self._submit(chosen, timeout, after) if chosen else []

    def _submit(self, chosen: list[dict[str, Any]], timeout: float, after: list[str] | None) -> list[str]:
        profile: Profile = load_profile(self.doc["profile"])
        ex = executor(self.doc["cluster"], profile, self.root / "logs", after=after,
                      tasks=None if self.doc["cluster"] == "slurm" else 1,
                      mpi=profile.training_backend(self.doc["cluster"]) == "horovod")
        if self.doc["cluster"] == "local":
            return self._run_local(ex, chosen, profile.array_parallelism, timeout)
        with ex.batch():  # one sbatch for the whole array: it queues every member or none
            handles = [ex.submit(self._job(m)) for m in chosen]
        for member, handle in zip(chosen, handles):
            member["jobs"].append(str(handle.job_id))
        self._save()
        log.info("%s: submitted %d members as array %s", self.root, len(chosen), handles[0].job_id.split("_")[0])
        return [str(h.job_id) for h in handles]

    def _run_local(self, ex: Any, chosen: list[dict[str, Any]], parallel: int, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        queue, running, ids = list(chosen), [], []
        while queue or running:
            while queue and len(running) < max(1, parallel):
                member = queue.pop(0)
                handle = ex.submit(self._job(member))
                member["jobs"].append(str(handle.job_id))
                ids.append(str(handle.job_id))
                running.append(handle)
                self._save()
            still = [h for h in running if not h.done()]
            if len(still) < len(running):
                log.info("%s: %d of %d members finished", self.root, len(ids) - len(still), len(chosen))
            running = still
            if running:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.root}: local members still running after {timeout:g} s")
                time.sleep(0.5)  # polling local subprocesses for completion
        return ids

    def evaluate(self, split: str) -> list[str]:
        """Score every finished member on ``split`` (``RUN/eval-<split>.json``) as one job array, in parallel."""
        from jobs.evaluate import EvaluateUNetJob

        runs = [Path(m["run_dir"]) for m in self.doc["members"] if (Path(m["run_dir"]) / "DONE").exists()]
        if not runs:
            return []
        profile = load_profile(self.doc["profile"])
        ex = executor(self.doc["cluster"], profile, self.root / "logs" / f"evaluate-{split}", tasks=1)
        with ex.batch():
            handles = [ex.submit(EvaluateUNetJob(run, split)) for run in runs]
        if self.doc["cluster"] == "local":
            for handle in handles:
                handle.result()
        return [str(h.job_id) for h in handles]

    def resume(self, *, timeout: float = 24 * 3600, after: list[str] | None = None) -> list[str]:
        """Submit exactly the members that are neither done nor queued or running (nor of unknown state), as
        :meth:`submit` does; decided and submitted under the sweep's lock."""
        with self._writing():
            todo = [row["name"] for row in self.status() if row["state"] in RESUBMIT]
            return self.submit(todo, timeout=timeout, after=after) if todo else []

    # --- status and report ------------------------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        """One row per member: name, state, job_id, restarts, epoch, best_val, error (``sweep status`` keys)."""
        latest = [m["jobs"][-1] for m in self.doc["members"] if m["jobs"]]
        live = self._controller(latest)
        return [self._member_status(m, live) for m in self.doc["members"]]

    def _controller(self, job_ids: list[str]) -> dict[str, str] | None:
        """SLURM's state of each job it knows; None when the controller does not answer (or no SLURM is here)."""
        if self.doc["cluster"] != "slurm" or not job_ids:
            return {}
        try:
            return slurmctl.job_states(job_ids)
        except RuntimeError as err:
            log.warning("%s: the SLURM controller did not answer (%s); its members' states are unknown", self.root,
                        err)
            return None

    def _member_status(self, member: dict[str, Any], live: dict[str, str] | None) -> dict[str, Any]:
        run = Path(member["run_dir"])
        job_id = member["jobs"][-1] if member["jobs"] else None
        attempts = _lines(run / ATTEMPTS)
        starts = [a for a in attempts if str(a.get("rank", "0")) == "0"]
        metrics = [m for m in _lines(run / "metrics.jsonl") if "val_loss" in m]
        evaluated = (run / f"eval-{self.doc['evaluate']}.json").exists()
        slurm_state = (live or {}).get(job_id or "")
        error = None
        if (run / "DONE").exists() and evaluated:
            state = "done"
        elif holder(run) is not None:  # a live process holds the run directory: whatever the controller says
            state = "running"
        elif live is None and job_id is not None:  # its job may be queued or running: never treat it as gone
            state, error = "unknown", "the SLURM controller did not answer"
        elif slurm_state in ("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"):
            state = "requeued" if starts else "pending"
        elif slurm_state in ("RUNNING", "COMPLETING", "SUSPENDED"):
            state = "running"
        elif (run / ERROR).exists() or slurm_state in ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY",
                                                         "NODE_FAIL"):
            state = "failed"
            error = _last_line(run / ERROR) or f"SLURM state {slurm_state}"
        elif (run / "checkpoints").exists() or starts:
            state = "preempted"
        else:
            state = "not started"
        return {"name": member["name"], "labels": member["labels"], "state": state, "job_id": job_id,
                "restarts": max(0, len(starts) - 1), "epoch": (metrics[-1]["epoch"] + 1) if metrics else 0,
                "best_val": min((m["val_loss"] for m in metrics), default=None), "error": error}

    def report(self) -> dict[str, Any]:
        """Table 1 from the finished members: ``table1.md``, ``table1.csv``, ``table1.png`` in the sweep directory."""
        results = []
        for member, row in zip(self.doc["members"], self.status()):
            if row["state"] == "done":
                evaluation = json.loads((Path(member["run_dir"]) / f"eval-{self.doc['evaluate']}.json").read_text())
                results.append({**member["labels"], "value": evaluation["dice_error_percent"]})
        axes = self.doc["report"]
        order = {a: list(dict.fromkeys(m["labels"][a] for m in self.doc["members"])) for a in axes.values()}
        return table1(results, rows=axes["rows"], columns=axes["columns"], row_order=order[axes["rows"]],
                      column_order=order[axes["columns"]], out=self.root / "table1",
                      title=f"{self.doc['name']}: Dice error % on the real {self.doc['evaluate']} split")


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a kill
    return out


def _last_line(path: Path) -> str | None:
    if not path.exists():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return lines[-1] if lines else None

