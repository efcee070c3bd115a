"""`tumorsynth pipeline plan CONFIG [--cluster local|slurm] [--profile P] [--json]`: what `pipeline run` would do.

A dry run: nothing is run, submitted or written. For every step of :func:`~toolkit.cluster.pipeline.steps`, then the
sweep, in the order ``pipeline run`` takes them: its parents, the resources it would ask for (the profile's nodes,
tasks, GPUs, CPUs, memory and time limit on ``slurm``; processes here on ``local``, without a time limit), the job's
options, the resolved training config (the YAML after the pipeline's overrides, as ``train`` would save it; null for
the other steps), its state and an estimate of its GPU-hours.

State, decided as ``pipeline run`` decides it: ``done`` when the step's output is complete (it would be skipped);
on ``slurm``, ``queued`` when ``.pipeline/jobs.json`` records a job for it that the controller still holds pending or
running (the run would keep that job), ``unknown`` when such a job is recorded but the controller does not answer;
else ``to run``. The controller is asked only when job ids are recorded. The sweep is ``done`` when all its members
are, ``queued`` while one is pending or running.

GPU-hours are an **estimate** from FLOP counts and an assumed share of the profile's GPU's peak
(:mod:`toolkit.bench.cost` states both); null when the profile names no GPU of the peak table (``local``), or when
the training-set size a step's count needs cannot be read; ``gpu_hours`` sums the known ones and
``gpu_hours_without`` names the steps left out. Steps that
use no GPU (``prepare``, the z-score filter) count 0 though SLURM gives them the profile's GPUs. Training-set sizes
come from the real store's manifest once it exists, else from the cohort (selected subjects × 155 slices, split
80/10/10, empty slices counted: an upper bound for trainings that drop them).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from jobs.evaluate import EvaluateSWDJob
from jobs.filter import FilterJob
from jobs.generate import GenerateImagesJob, GenerateMasksJob
from jobs.train import TrainJob
from toolkit import config as configs
from toolkit.bench import cost
from toolkit.cluster.executors import ClusterError, Profile, load_profile
from toolkit.cluster.pipeline import PipelineConfig, Step, _ranks, _still_queued, _uses_mpi, steps, sweep_variables
from toolkit.data.store import Manifest, Store, modality_list

log = logging.getLogger(__name__)

SLICES_PER_SUBJECT = 155  # BraTS volumes are 240 × 240 × 155: one slice per axial plane
STATES = ("done", "queued", "unknown", "to run")


def plan(cfg: PipelineConfig, cluster: str = "local") -> dict[str, Any]:
    """The plan of ``pipeline run`` for ``cfg`` on ``cluster`` (see the module docstring; DESIGN §3 keys)."""
    profile = load_profile(cfg.profile)
    chosen = steps(cfg, cluster)
    states, job_ids = _states(cfg, cluster, chosen)
    rows = training_rows(cfg)
    gpu = cost.gpu_of(profile.constraint, profile.name)
    resolved = {step.name: _resolve(step.job) for step in chosen if isinstance(step.job, TrainJob)}
    by_run = {Path(step.job.run_dir): resolved[step.name] for step in chosen if isinstance(step.job, TrainJob)}
    entries = []
    for step in chosen:
        run = resolved.get(step.name)
        flops, tp = _step_cost(step, run, by_run, rows, cfg, gpu)
        entries.append({
            "name": step.name, "after": list(step.after), "resources": _resources(step, profile, cluster),
            "state": states[step.name], "job_id": job_ids.get(step.name),
            "config": None if run is None else configs.to_dict(run), "job": {"kind": type(step.job).__name__,
                                                                          **configs.to_dict(step.job)},
            "what": _what(step, run, cfg), **_estimate(flops, tp)})
    entries.append(_sweep_entry(cfg, cluster, profile, rows, gpu))
    unknown = [e["name"] for e in entries if e["estimate_gpu_hours"] is None]
    return {"cluster": cluster, "profile": profile.name, "out": str(cfg.out), "cohort": str(cfg.cohort),
            "subjects": cfg.subjects, "gpu": gpu, "rows": rows, "steps": entries,
            "gpu_hours": None if gpu is None else sum(e["estimate_gpu_hours"] or 0.0 for e in entries),
            "gpu_hours_without": unknown,  # steps whose estimate is unknown, left out of gpu_hours
            "estimate": {"gpu": gpu, "tensor_utilisation": cost.TENSOR_UTILISATION,
                         "fp32_utilisation": cost.FP32_UTILISATION,
                         "basis": "FLOP counts × assumed utilisation of the GPU's dense peak (toolkit/bench/cost.py); "
                                  "an estimate, not a measurement"}}


# --- state ------------------------------------------------------------------------------------------------------------
def _states(cfg: PipelineConfig, cluster: str, chosen: list[Step]) -> tuple[dict[str, str], dict[str, str]]:
    """Each step's state and, for those queued or unknown, the recorded job id (see the module docstring)."""
    state = Path(cfg.out) / ".pipeline"  # read only: never created here
    queued: dict[str, str] = {}
    unanswered: dict[str, str] = {}
    if cluster == "slurm":
        try:
            queued = _still_queued(state)
        except ClusterError as err:
            log.warning("pipeline plan: %s", err)
            recorded = json.loads((state / "jobs.json").read_text())
            unanswered = {k: v for k, v in recorded.items() if k != "sweep" and v not in ("done", "ran")}
    states, ids = {}, {}
    for step in chosen:
        if step.done():
            states[step.name] = "done"
        elif step.name in queued or step.name in unanswered:
            states[step.name] = "queued" if step.name in queued else "unknown"
            ids[step.name] = queued.get(step.name) or unanswered[step.name]
        else:
            states[step.name] = "to run"
    return states, ids


def _sweep_state(root: Path) -> tuple[str, int, int]:
    """(state, members done, members) of the sweep directory ``root``; ``to run`` with 0 of 0 before it exists."""
    from toolkit.cluster.sweep import SWEEP, Sweep

    if not (root / SWEEP).exists():
        return "to run", 0, 0
    rows = Sweep(root).status()  # asks the controller only about the job ids the sweep recorded
    states = [row["state"] for row in rows]
    done = states.count("done")
    if done == len(states):
        return "done", done, len(states)
    if any(s in ("pending", "running", "requeued") for s in states):
        return "queued", done, len(states)
    return ("unknown" if "unknown" in states else "to run"), done, len(states)


# --- resources, configs, descriptions ---------------------------------------------------------------------------------
def _resources(step: Step, profile: Profile, cluster: str, *, tasks: int | None = None) -> dict[str, Any]:
    """What the step's job asks for: the executor's parameters on ``slurm``; processes here on ``local``."""
    if cluster == "local":
        processes = tasks or _ranks(step)
        return {"nodes": 1, "tasks_per_node": processes, "tasks": processes, "gpus_per_node": None, "gpus": None,
                "cpus_per_task": 1, "mem_gb": None, "time_limit_min": None, "partition": None,
                "mpi": processes > 1, "where": "here"}
    per_node = tasks or step.tasks
    return {"nodes": profile.nodes, "tasks_per_node": per_node, "tasks": per_node * profile.nodes,
            "gpus_per_node": profile.gpus_per_node, "gpus": profile.gpus_per_node * profile.nodes,
            "cpus_per_task": profile.cpus_per_task, "mem_gb": profile.mem_gb, "time_limit_min": profile.timeout_min,
            "partition": profile.partition, "mpi": per_node > 1 and _uses_mpi(step.job), "where": "slurm"}


def _resolve(job: TrainJob) -> Any:
    """The training config ``job`` would train with (its YAML after the pipeline's overrides)."""
    from toolkit.train.run import trainer

    config_cls, _ = trainer(job.model)
    return configs.load(config_cls, Path(job.config), tuple(job.overrides),
                        overrides_source=f"pipeline overrides of {job.run_dir.name}")


def _what(step: Step, run: Any, cfg: PipelineConfig) -> str:
    """One line saying what the step does, with the settings a reader checks first."""
    job = step.job
    if step.name == "prepare":
        return f"{cfg.subjects or 'every subject'} of {cfg.cohort} → {cfg.size}² store"
    if isinstance(job, TrainJob):
        data = "reduced prefix" if run.data.reduced else "full train split"
        if job.model == "pgan":
            return f"PGAN, {run.schedule.total_kimg} kimg, {data}"
        return f"SPADE, {run.loop.epochs} epochs, {data}"
    if isinstance(job, EvaluateSWDJob):
        real = {True: f"reduced prefix repeated to {job.images}", False: "full train split",
                None: "the run's training set"}[job.reduced]
        return f"SWD of every snapshot, {job.images} images vs {real}"
    if isinstance(job, GenerateMasksJob):
        return f"{job.n} masks from the best snapshot"
    if isinstance(job, FilterJob) and job.method == "dscore":
        return (f"D score ≥ {job.threshold:g}" if job.threshold is not None else
                f"D score ≥ the {job.real_quantile:g}-quantile of the real validation masks'")
    if isinstance(job, FilterJob):
        return f"z-score ≤ {job.threshold:g} vs {'reduced prefix' if job.reduced else 'full train split'}"
    if isinstance(job, GenerateImagesJob):
        return "SPADE images for the kept masks"
    return type(job).__name__


# --- estimates --------------------------------------------------------------------------------------------------------
def training_rows(cfg: PipelineConfig) -> dict[str, Any] | None:
    """Rows of the real store's splits: ``train``, ``reduced``, ``val``, ``test`` and the non-empty ``train_masks``
    and ``reduced_masks``, with their ``source``; from the manifest once the store exists, else estimated from the
    cohort; None if neither can be read."""
    store = Path(cfg.out) / "store"
    if (store / "manifest.json").exists():
        m = Store(store).manifest
        train = m.splits["train"]
        empty, start = 0.0, 0  # empty rows within the reduced prefix, from the per-shard counts (rows are in order)
        for shard in train.shards:
            inside = max(0, min(shard.n, m.reduced - start))
            empty += shard.empty * inside / shard.n if shard.n else 0
            start += shard.n
        return {"source": "store", "train": train.n, "reduced": m.reduced, "train_masks": train.n - train.empty,
                "reduced_masks": m.reduced - round(empty), **{k: m.splits[k].n for k in ("val", "test")
                                                              if k in m.splits}}
    subjects = _cohort_subjects(cfg)
    if subjects is None:
        return None
    from toolkit.data.split import split_counts

    counts = split_counts(subjects * SLICES_PER_SUBJECT)
    reduced = round(Manifest.reduced_fraction * counts["train"])
    return {"source": f"cohort: {subjects} subjects × {SLICES_PER_SUBJECT} slices", **counts, "reduced": reduced,
            "train_masks": counts["train"], "reduced_masks": reduced}


def _cohort_subjects(cfg: PipelineConfig) -> int | None:
    """How many subjects ``prepare`` would ingest (its own discovery and selection), None if it cannot tell."""
    from toolkit.cluster.pipeline import prepare_config
    from toolkit.data.nifti import NiftiError, discover_cohort
    from toolkit.data.prepare import PrepareError, select_subjects

    options = prepare_config(cfg, Path(cfg.out) / "store")
    try:
        return len(select_subjects(discover_cohort(Path(cfg.cohort)).subjects, options.include, Path(cfg.cohort)))
    except (NiftiError, PrepareError, OSError) as err:
        log.warning("pipeline plan: cannot count the cohort's subjects (%s); training estimates left out", err)
        return None


def _step_cost(step: Step, run: Any, by_run: dict[Path, Any], rows: dict[str, Any] | None, cfg: PipelineConfig,
               gpu: str | None) -> tuple[float | None, cost.Throughput | None]:
    """The step's FLOPs (None if unknown) and the throughput it is assumed to run at."""
    job = step.job
    if isinstance(job, TrainJob) and job.model == "pgan":
        tp = cost.throughput(gpu, run.runtime.precision, allow_fp16=False)
        return cost.pgan_train_flops(run.model, run.schedule), tp
    if isinstance(job, TrainJob) and job.model == "spade":
        if rows is None:
            return None, None
        key = ("reduced" if run.data.reduced else "train") + ("_masks" if run.data.drop_empty else "")
        tp = cost.throughput(gpu, run.runtime.precision)
        return cost.spade_train_flops(run.model, rows[key], run.loop.epochs), tp
    if isinstance(job, EvaluateSWDJob):  # generation runs without autocast: fp32 (TF32 where there is bf16)
        pgan = by_run[Path(job.run_dir)]
        return cost.swd_flops(pgan.model, pgan.schedule, job.images), cost.throughput(gpu, "fp32")
    if isinstance(job, GenerateMasksJob):
        return cost.pgan_generate_flops(by_run[Path(job.run_dir)].model, job.n), cost.throughput(gpu, "fp32")
    if isinstance(job, GenerateImagesJob):  # at most every generated mask is kept
        spade = by_run[Path(job.run_dir)]
        return cost.spade_generate_flops(spade.model, cfg.masks), cost.throughput(gpu, spade.runtime.precision)
    if isinstance(job, FilterJob) and job.method == "dscore":  # D forwards of every mask and the real validation set
        pgan = by_run[Path(cfg.out) / "runs" / f"pgan-{'reduced' if job.reduced else 'full'}"]
        images = cfg.masks + (rows["val"] if rows else 0)
        return images * cost.pgan_forward(pgan.model, 0.0)[1], cost.throughput(gpu, "fp32")
    return 0.0, cost.throughput(gpu)  # prepare, the z-score filter: CPU work


def _estimate(flops: float | None, tp: cost.Throughput | None) -> dict[str, Any]:
    hours = None if flops is None or tp is None else (0.0 if flops == 0 else tp.gpu_hours(flops))
    return {"estimate_gpu_hours": hours, "estimate_pflop": None if flops is None else flops / 1e15,
            "estimate_basis": None if tp is None or not flops else tp.describe()}


def _sweep_entry(cfg: PipelineConfig, cluster: str, profile: Profile, rows: dict[str, Any] | None,
                 gpu: str | None) -> dict[str, Any]:
    """The sweep as the plan's last step: one job array of U-Net trainings after every branch's images."""
    from toolkit.cluster.sweep import load_spec, members
    from toolkit.train.unet import UNetRunConfig, network_config

    variables = tuple(f"{k}={v}" for k, v in sweep_variables(cfg).items())
    spec = load_spec(Path(cfg.sweep), tuple(cfg.sweep_set), variables, tuple(cfg.sweep_with))
    state, done, _ = _sweep_state(Path(cfg.out) / "sweep")
    chosen = members(spec)
    flops: float | None = 0.0
    tp = None
    for member in chosen:
        run = configs.load(UNetRunConfig, spec.base, member["overrides"])
        tp = cost.throughput(gpu, run.runtime.precision)
        if rows is None:
            flops = None
            continue
        real = rows["train"] if run.data.real_n is None else run.data.real_n
        synthetic = 0 if run.data.synthetic is None else (cfg.masks if run.data.synthetic_n is None
                                                          else run.data.synthetic_n)
        if flops is not None:
            flops += cost.unet_train_flops(network_config(run, len(modality_list(cfg.modality))), cfg.size,
                                           real + synthetic, rows.get("val", 0), run.loop.epochs)
    step = Step("sweep", TrainJob(spec.model, spec.base, Path(cfg.out) / "sweep"), (), lambda: False)
    resources = _resources(step, profile, cluster, tasks=1 if cluster == "local" else profile.tasks_per_node)
    resources.update(array=len(chosen), array_parallelism=profile.array_parallelism if cluster == "slurm"
                     else cfg.parallel)
    return {"name": "sweep", "after": [f"images-{b}" for b in cfg.branches], "resources": resources, "state": state,
            "job_id": None, "config": None,
            "job": {"kind": "Sweep", "file": str(cfg.sweep), "members": len(chosen), "members_done": done},
            "what": f"{len(chosen)} {spec.model} trainings ({spec.name}), each evaluated on {spec.evaluate}",
            **_estimate(flops, tp)}


# --- text -------------------------------------------------------------------------------------------------------------
def table(doc: dict[str, Any]) -> str:
    """The plan as one readable table, then the totals and what the estimate assumes."""
    head = ("step", "after", "state", "nodes×tasks", "GPUs", "limit", "GPU-h (est.)", "what")
    lines = []
    for s in doc["steps"]:
        r = s["resources"]
        limit = "—" if r["time_limit_min"] is None else f"{r['time_limit_min'] / 60:g} h"
        hours = "?" if s["estimate_gpu_hours"] is None else f"{s['estimate_gpu_hours']:.1f}"
        tasks = f"{r['nodes']}×{r['tasks_per_node']}" + (" mpi" if r["mpi"] else "")
        if "array" in r:
            tasks += f" ×{r['array']}"
        lines.append((s["name"], ", ".join(s["after"]) or "—", s["state"] + (f" ({s['job_id']})" if s["job_id"]
                      else ""), tasks, "—" if r["gpus"] is None else str(r["gpus"]), limit, hours, s["what"]))
    widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [head, *lines]]
    total, missing = doc["gpu_hours"], doc["gpu_hours_without"]
    if total is None:
        hours = f"n/a (profile {doc['profile']} names no GPU of the peak table)"
    else:
        e = doc["estimate"]
        hours = (f"{total:.0f} on {doc['gpu']}{' without ' + ', '.join(missing) if missing else ''}, at "
                 f"{e['tensor_utilisation']:.0%} of a tensor-core peak or {e['fp32_utilisation']:.0%} of a plain "
                 "fp32 peak (from FLOP counts, not measurements)")
    text += ["", f"{doc['cluster']}, profile {doc['profile']}; cohort {doc['cohort']}, subjects "
                 f"{doc['subjects'] or 'all'}; training rows: " + _rows_text(doc["rows"]),
             "GPU-hours (estimate): " + hours]
    return "\n".join(text)


def _rows_text(rows: dict[str, Any] | None) -> str:
    if rows is None:
        return "unknown (no store, cohort not readable)"
    return (f"train {rows['train']}, reduced {rows['reduced']}, non-empty masks {rows['train_masks']} / "
            f"{rows['reduced_masks']} ({rows['source']})")
