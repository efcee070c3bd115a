"""The `tumorsynth` command: parses arguments, calls the library, prints results.

Every subcommand is a small ``_cmd_*`` function over library calls. ``--json`` prints exactly one JSON object on stdout;
logs and errors go to stderr, and any error exits non-zero with a message that names the file or option at fault.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from toolkit import __version__

log = logging.getLogger("tumorsynth")


def _emit(args: argparse.Namespace, doc: dict[str, Any], text: Callable[[dict[str, Any]], str]) -> None:
    print(json.dumps(doc) if getattr(args, "json", False) else text(doc))


def _cmd_phantom(args: argparse.Namespace) -> int:
    from toolkit.data.phantom import write_cohort

    folders = write_cohort(Path(args.out), args.subjects, seed=args.seed, workers=args.workers)
    print(f"wrote {len(folders)} subjects to {args.out}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from toolkit.data.prepare import PrepareConfig, prepare, result_json

    config = PrepareConfig(
        src=Path(args.src), out=Path(args.out), size=args.size, shard_size=args.shard_size, png=args.png,
        split=args.split, seed=args.seed, modality=args.modality, tissue=args.tissue, intensity=args.intensity,
        workers=args.workers,
        skip_bad=args.skip_bad, labels=args.labels, include=tuple(args.include), compression=args.compression,
    )
    result = prepare(config)

    def text(doc: dict[str, Any]) -> str:
        if doc["already_complete"]:
            return f"{doc['store']}: store is already complete; nothing to do"
        counts = ", ".join(f"{k} {v}" for k, v in doc["splits"].items())
        skipped = f"; skipped {len(doc['skipped'])} bad subjects" if doc["skipped"] else ""
        if doc.get("unlabelled"):
            skipped += f"; skipped {len(doc['unlabelled'])} cases without labels"
        return f"{doc['store']}: {counts} slices in {doc['seconds']} s{' (resumed)' if doc['resumed'] else ''}{skipped}"

    _emit(args, result_json(result), text)
    return 0


def _cmd_store(args: argparse.Namespace) -> int:
    from toolkit.data.store import Store, summary, verify

    if {args.out is not None, args.compression is not None} != {args.action == "convert"}:
        raise ValueError("store convert needs OUT and --compression; store info|verify take neither")
    if args.action == "convert":
        from toolkit.data.convert import convert

        doc = convert(Path(args.store), Path(args.out), args.compression).to_json()
        _emit(args, doc, lambda d: f"{d['store']}: {d['shards']} shards of {d['source']} rewritten with "
              f"{d['compression']} (was {d['source_compression']}) and verified, {d['pngs']} PNGs copied; "
              f"{d['bytes'] / 2**20:.1f} MiB of shards (was {d['source_bytes'] / 2**20:.1f} MiB)")
        return 0
    store = Store(args.store)
    if args.action == "verify":
        problems = verify(store)
        doc = {"store": str(store.root), "ok": not problems, "problems": problems}
        _emit(args, doc, lambda d: "\n".join(d["problems"]) or f"{d['store']}: all shards verified")
        return 1 if problems else 0
    _emit(args, summary(store), _store_text)
    return 0


def _store_text(doc: dict[str, Any]) -> str:
    lines = [f"{doc['kind']} store, {doc['format']}, {doc['compression']}, {doc['image_size']}², "
             f"{doc['classes']} classes, modality {doc['modality']}, intensity max {doc['intensity_max']}"]
    for split, n in doc["splits"].items():
        lines.append(f"  {split:5s} {n:7d} slices ({doc['empty'][split]} empty masks)")
    lines.append(f"  reduced {doc['reduced']} (prefix of train)")
    for split, freqs in doc["class_frequencies"].items():
        lines.append(f"  {split:5s} classes: " + ", ".join(f"{k} {v:.4f}" for k, v in freqs.items()))
    lines.extend(f"  skipped {s['subject']}: {s['error']}" for s in doc["skipped"])
    return "\n".join(lines)


def _cmd_dice(args: argparse.Namespace) -> int:
    from toolkit.data.labelio import load_labels
    from toolkit.metrics.dice import dice_report

    pred, gt = (load_labels(Path(p), split=args.split, classes=args.classes) for p in (args.pred, args.gt))
    report = dice_report(pred, gt, args.classes)
    _emit(args, report, lambda d: "per-class Dice: " + ", ".join(f"{v:.4f}" for v in d["per_class"])
          + f"\nweighted Dice: {d['weighted']:.4f}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.batch is None and args.target != "spade":  # spade's default depends on the device (bench/spade.py)
        args.batch = 8
    if args.target == "unet":
        from dataclasses import replace

        from toolkit.bench.unet import bench_trainer, bench_unet, trainer_config
        from toolkit.config import load
        from toolkit.train import distributed
        from toolkit.train.unet import ModelConfig, UNetRunConfig, network_config

        # without -c: the paper's network (the defaults of UNetConfig), 7 classes, the default runtime
        run = load(UNetRunConfig, args.config) if args.config else trainer_config(ModelConfig())
        cuda = args.device == "cuda"
        runtime = replace(run.runtime, precision=args.precision or run.runtime.precision,
                          compile="default" if args.compile else run.runtime.compile)
        workers = args.workers if args.workers is not None else (4 if cuda else 0)  # GPUs need the loader ahead
        run = replace(run, runtime=runtime, optim=replace(run.optim, batch=args.batch),
                      data=replace(run.data, workers=workers))
        model = network_config(run)
        dist = distributed.init(args.dist, args.device)
        try:
            doc = bench_unet(model, batch=args.batch, size=args.size, steps=args.steps, compile=args.compile,
                             precision=runtime.precision, channels_last=runtime.channels_last, dist=dist,
                             peak_tflops=args.peak_tflops)
            if args.trainer:
                doc |= bench_trainer(run, dist=dist, size=args.size, steps=args.steps, peak_tflops=args.peak_tflops)
        finally:
            dist.close()
        doc = doc if dist.is_main else {}  # under a launcher, rank 0 reports
    elif args.target == "pgan":
        import torch

        from toolkit.bench.pgan import bench_pgan
        from toolkit.config import load
        from toolkit.train.pgan import PGANRunConfig

        # the config's networks, schedule (its minibatches, its kimg) and precision; without -c the paper's defaults
        if args.config:
            run = load(PGANRunConfig, args.config)
            if run.runtime.threads:  # as the trainer runs
                torch.set_num_threads(run.runtime.threads)
            doc = bench_pgan(run.model, run.schedule, optim=run.optim, precision=run.runtime.precision,
                             device=args.device, steps=args.steps, runtime=run.runtime)
        else:
            doc = bench_pgan(device=args.device, steps=args.steps)
    elif args.target == "spade":
        from toolkit.bench.spade import bench_spade
        from toolkit.config import load
        from toolkit.models.spade import SPADEConfig
        from toolkit.train.spade import SPADERunConfig

        run = load(SPADERunConfig, args.config) if args.config else None
        doc = bench_spade(run.model if run else SPADEConfig(), device=args.device, batch=args.batch, steps=args.steps,
                          compile=args.compile, precision=args.precision or (run.runtime.precision if run else "auto"))
    elif args.target == "zscore":
        from toolkit.bench.zscore import bench_zscore

        doc = bench_zscore(masks=args.images, size=args.size)
    elif args.target == "swd":
        from toolkit.bench.swd import bench_swd

        doc = bench_swd(images=args.images, size=args.size, device=args.device)
    elif args.target == "ingest":
        from toolkit.bench.ingest import bench_ingest

        doc = bench_ingest(subjects=args.subjects, size=args.size, workers=args.workers or 1, tissue=args.tissue)
    else:
        from toolkit.bench.loader import bench_loader

        doc = bench_loader(Path(args.store), seconds=args.seconds, batch=args.batch, workers=args.workers or 0)
    if doc:  # under a launcher (bench zscore, bench unet --dist), rank 0 only
        _emit(args, doc, lambda d: "\n".join(f"{k}: {v}" for k, v in d.items()))
    return 0


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: the run checkpointed on a signal; run the same command again to continue


def _cmd_train(args: argparse.Namespace) -> int:
    from toolkit.train.run import train

    if args.dry_schedule:
        return _dry_schedule(args)
    result = train(args.model, Path(args.config), tuple(args.set), Path(args.run_dir) if args.run_dir else None,
                   args.dist)
    print(json.dumps({"status": result.status, **result.metrics}))
    return 0 if result.status == "done" else PREEMPTED_EXIT


def _dry_schedule(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from toolkit.config import load
    from toolkit.train.pgan import PGANRunConfig
    from toolkit.train.pgan_schedule import dry_schedule

    if args.model != "pgan":
        raise ValueError("--dry-schedule applies to `train pgan` only")
    cfg = load(PGANRunConfig, args.config, args.set)
    doc = dry_schedule(replace(cfg.schedule, resolution=cfg.model.resolution))

    def text(d: dict[str, Any]) -> str:
        lines = [f"{d['ticks']} ticks, {d['total_kimg']} kimg", "  res  ticks    kimg  minibatch"]
        lines += [f"{int(r):5d} {v['ticks']:6d} {v['kimg']:7g} {v['minibatch']:10d}"
                  for r, v in d["per_resolution"].items()]
        return "\n".join(lines)

    _emit(args, doc, text)
    return 0


def _swd_text(doc: dict[str, Any]) -> str:
    lines = [f"{doc['snapshots']} snapshots scored ({doc['scored_now']} now, {doc['ranks']} ranks); best "
             f"{doc['best']} with SWD {doc['best_swd_avg']:.3f}"]
    lines += [f"  bin {r['bin']} (slices {r['first_slice']}–{r['last_slice']}, {r['real']} real): SWD "
              + (f"{r['swd_avg']:.3f}" if r["real"] else "— (no real masks)") for r in doc.get("swd_bins", ())]
    return "\n".join(lines)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    if args.model == "swd":
        from toolkit.train.pgan_eval import evaluate_snapshots

        doc = evaluate_snapshots(Path(args.run), real=Path(args.real) if args.real else None, images=args.images,
                                 seed=args.seed, device=args.device, per_bin=args.per_bin)
        if doc:  # rank 0 only: the other MPI ranks print nothing
            _emit(args, doc, _swd_text)
        return 0
    from toolkit.train.unet_eval import evaluate_run

    doc = evaluate_run(Path(args.run), store=Path(args.store) if args.store else None, split=args.split,
                       device=args.device)

    def text(d: dict[str, Any]) -> str:
        lines = [f"{d['split']} ({d['slices']} slices): Dice error {d['dice_error_percent']:.2f} %",
                 "per-class Dice: " + ", ".join(f"{v:.4f}" for v in d["per_class_dice"])]
        if "regions" in d:
            lines.append("regions: " + ", ".join(f"{k} {v:.4f}" for k, v in d["regions"].items()))
        return "\n".join(lines)

    _emit(args, doc, text)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from toolkit.train.export import export_unet

    doc = export_unet(Path(args.run), args.format, Path(args.out), image_size=args.size)

    def text(d: dict[str, Any]) -> str:
        check = d["validation"]
        return (f"{d['path']}: {d['format']} model, input {d['input']['name']} {d['input']['shape']} "
                f"({d['input']['layout']}, raw intensities), output {d['classes']}-class probabilities; "
                f"max abs diff {check['max_abs_diff']:.2g} vs torch on {check['images']} images ({check['source']})")

    _emit(args, doc, text)
    return 0


def _cmd_export_nnunet(args: argparse.Namespace) -> int:
    from toolkit.export.nnunet import export_nnunet

    doc = export_nnunet(Path(args.store), Path(args.out), dataset_id=args.id, name=args.name, classes=args.classes,
                        synthetic=Path(args.synthetic) if args.synthetic else None, synthetic_n=args.synthetic_n)
    _emit(args, doc, lambda d: f"{d['dataset']}: {d['numTraining']} training cases ({d['real']} real + "
          f"{d['synthetic']} synthetic), {d['test']} test cases, {d['classes']} classes; next: "
          f"nnUNetv2_plan_and_preprocess -d {d['id']} --verify_dataset_integrity")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.kind == "images":
        from toolkit.train.synthesis import generate_images

        if not args.masks:
            raise ValueError("generate images needs --masks STORE")
        manifest = generate_images(Path(args.run), Path(args.masks), Path(args.out), batch=args.batch,
                                   device=args.device, png=args.png)
        if manifest:  # rank 0 only: the other MPI ranks print nothing
            counts = ", ".join(f"{k} {v.n}" for k, v in manifest.splits.items())
            print(f"{args.out}: synthetic MR for {counts} masks (epoch {manifest.provenance.get('epoch')})")
        return 0
    from toolkit.train.generate import generate_masks

    if args.n is None:
        raise ValueError("generate masks needs --n N")
    manifest = generate_masks(Path(args.run), args.n, Path(args.out), snapshot=args.snapshot, seed=args.seed,
                              shard_size=args.shard_size, batch=args.batch, device=args.device, png=args.png)
    if manifest:  # rank 0 only
        print(f"{args.out}: {manifest.splits['train'].n} synthetic masks from {manifest.provenance.get('snapshot')}")
    return 0


def _cmd_filter(args: argparse.Namespace) -> int:
    real, synthetic, out = Path(args.real), Path(args.synthetic), Path(args.out)
    given = {"zscore": ("real_quantile", "batch", "device"), "dscore": ("reduced", "min_std")}[args.method]
    wrong = [name for name in given if getattr(args, name) not in (None, False)]
    if wrong:
        raise ValueError(f"filter {args.method}: --{wrong[0].replace('_', '-')} is not an option of this filter")
    if args.method == "zscore":
        from toolkit.filter import zscore as method

        options = {"reduced": args.reduced, "min_std": args.min_std or 0.0}
        threshold = 500.0 if args.threshold is None else args.threshold
    else:
        from toolkit.filter import dscore as method

        quantile = method.DEFAULT_QUANTILE if args.real_quantile is None else args.real_quantile
        options = {"batch": args.batch or 64, "device": args.device, "real_quantile": quantile}
        threshold = args.threshold
    if args.calibrate:
        doc = method.calibrate(real, synthetic, out, **options)
        text = "suggested threshold {suggested_threshold} (drops {synthetic_dropped_at_suggested} of synthetic masks)"
    else:
        doc = method.filter_store(real, synthetic, out, threshold=threshold, **options)
        text = ("store is already complete: " if doc.get("already_complete") else "") + (
            "kept {kept}, dropped {dropped} ({dropped_percent:.3f} %) at threshold {threshold}; details in {csv}")
    if doc:  # rank 0 only: the other MPI ranks print nothing
        _emit(args, doc, lambda d: text.format(**d))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from toolkit.atomic import write_bytes
    from toolkit.report.pgan import compare, render

    doc = compare([Path(r) for r in args.runs], [Path(f) for f in args.filtered])
    text = render(doc)
    if args.out:
        write_bytes(Path(args.out), text.encode())
    _emit(args, doc, lambda _: text if not args.out else f"wrote {args.out}")
    return 0


def _cmd_swd(args: argparse.Namespace) -> int:
    from toolkit.metrics.swd import load_images, swd

    real, fake = (load_images(Path(p), args.images) for p in (args.real, args.fake))
    n = min(len(real), len(fake))
    doc = swd(real[:n], fake[:n], seed=args.seed, device=args.device)
    _emit(args, doc, lambda d: ", ".join(f"{k}² {v:.3f}" for k, v in d["swd_x1e3"].items())
          + f"; average {d['swd_x1e3_avg']:.3f} (SWD ×1e3, {d['images']} images)")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from collections import Counter

    from toolkit.cluster.sweep import Sweep

    if args.action == "submit":
        out = Path(args.out or Path("sweeps") / Path(args.target).stem)
        # an existing sweep directory of the same definition is resumed: nothing done, queued or running again
        with Sweep.create(Path(args.target), out, args.cluster, args.profile, tuple(args.set),
                          tuple(args.var), tuple(args.extras)) as sweep:
            ids = sweep.resume()
        print(f"{out}: {len(ids)} members {'ran' if args.cluster == 'local' else 'submitted'} "
              f"({ids[0].split('_')[0] if ids else 'none'})")
        return 0
    sweep = Sweep(Path(args.target))
    if args.action == "resume":
        ids = sweep.resume()
        print(f"{args.target}: resubmitted {len(ids)} members")
        return 0
    if args.action == "evaluate":
        ids = sweep.evaluate(args.split)
        print(f"{args.target}: {len(ids)} finished members scored on {args.split} ({ids[0] if ids else 'none'}…)")
        return 0
    if args.action == "report":
        doc = sweep.report()
        _emit(args, doc, lambda d: d["markdown"] + "\nwritten: " + ", ".join(d["paths"]))
        return 0
    rows = sweep.status()

    def text(d: dict[str, Any]) -> str:
        lines = [f"{'member':40s} {'state':12s} {'job':>12s} {'restarts':>8s} {'epoch':>5s} {'best val':>9s}  error"]
        for r in d["members"]:
            best = "" if r["best_val"] is None else f"{r['best_val']:.4f}"
            lines.append(f"{r['name'][:40]:40s} {r['state']:12s} {r['job_id'] or '':>12s} {r['restarts']:8d} "
                         f"{r['epoch']:5d} {best:>9s}  {r['error'] or ''}")
        counts = Counter(r["state"] for r in d["members"])
        return "\n".join([*lines, ", ".join(f"{n} {s}" for s, n in counts.items())])

    _emit(args, {"members": rows}, text)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from toolkit.demo import DemoConfig, run_demo

    report = run_demo(DemoConfig(out=Path(args.out), subjects=args.subjects, workers=args.workers, seed=args.seed,
                                 cluster=args.cluster, profile=args.profile))
    print(report)
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from toolkit.cluster.pipeline import PipelineConfig, run_pipeline
    from toolkit.config import load

    cfg = load(PipelineConfig, Path(args.config), tuple(args.set))
    if args.profile:
        cfg = replace(cfg, profile=args.profile)
    if args.action == "plan":  # a dry run: nothing is run, submitted or written
        from toolkit.cluster.plan import plan, table

        _emit(args, plan(cfg, args.cluster), table)
        return 0
    result = run_pipeline(cfg, args.cluster)
    _emit(args, result, lambda d: "\n".join(f"{k}: {v}" for k, v in d["jobs"].items()))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    import tempfile

    from toolkit.check.gpu import check_gpu, cuda_missing, table

    missing = cuda_missing()
    if missing:
        print(f"tumorsynth: error: check gpu needs a CUDA device: {missing}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="tumorsynth-gpu-check-"))
    doc = check_gpu(out, budget_s=args.budget)
    (out / "check.json").write_text(json.dumps(doc, indent=1))
    _emit(args, doc, table)
    return 0 if doc["ok"] else 1


def _number(tp: Any) -> Callable[[str], Any]:
    """An argparse ``type`` for an int or float annotation of toolkit.config (``PositiveInt``, ``Threshold``, …): a
    value out of its range or not finite is argparse's own error, naming the option (exit 2)."""
    from toolkit.config import ConfigError, parse_number

    def parse(text: str) -> Any:
        try:
            return parse_number(tp, text)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used by the README's CLI reference)."""
    from typing import Annotated

    from toolkit.config import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range

    # ints ≥ 1, ints ≥ 0 (seeds, DataLoader workers), floats > 0
    count, natural, positive = (_number(t) for t in (PositiveInt, NonNegativeInt, PositiveFloat))
    parser = argparse.ArgumentParser(prog="tumorsynth", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tumorsynth {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write a BraTS-2018-layout demo cohort")
    p.add_argument("out")
    p.add_argument("--subjects", type=count, required=True)
    p.add_argument("--seed", type=natural, default=0)
    p.add_argument("--workers", type=count, default=1)
    p.set_defaults(fn=_cmd_phantom)

    p = sub.add_parser("prepare", help="ingest a BraTS cohort into a sharded HDF5 store with PNG export")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--size", type=count, default=256, help="slice side, a power of two (default 256)")
    p.add_argument("--shard-size", type=count, default=1024)
    p.add_argument("--png", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--split", choices=("slice", "subject"), default="slice")
    p.add_argument("--seed", type=natural, default=0)
    p.add_argument("--modality", default="t1ce",
                   help="t1, t1ce, t2 or flair, or several comma-separated: one image channel each (default t1ce)")
    p.add_argument("--tissue", choices=("auto", "fast", "hmrf", "none"), default="auto")
    p.add_argument("--intensity", choices=("raw", "volume"), default="raw",
                   help="raw: the volumes' values (the paper); volume: each volume scaled to a brain median of 1000")
    p.add_argument("--workers", type=count, default=1)
    p.add_argument("--skip-bad", action="store_true", help="skip invalid subjects (listed in the manifest)")
    p.add_argument("--labels", choices=("brats2018", "brats2023", "msd"), default=None,
                   help="what the seg labels mean (default: inferred from the cohort's layout)")
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="keep only subjects whose name or folder under SRC matches (repeatable), e.g. HGG")
    p.add_argument("--compression", choices=("blosc-lz4", "gzip", "none"), default="blosc-lz4",
                   help="shard codec (default blosc-lz4: fastest, needs hdf5plugin; gzip: any HDF5 tool reads it)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_prepare)

    p = sub.add_parser("store", help="summarise, verify or convert a store")
    p.add_argument("action", choices=("info", "verify", "convert"))
    p.add_argument("store")
    p.add_argument("out", nargs="?", help="convert: the new store (must not exist)")
    p.add_argument("--compression", choices=("gzip", "blosc-lz4", "none"),
                   help="convert: the new store's shard codec (gzip: any HDF5 tool reads it)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_store)

    p = sub.add_parser("dice", help="per-class and weighted Dice between two label arrays")
    p.add_argument("pred")
    p.add_argument("gt")
    p.add_argument("--classes", type=_number(Annotated[int, Range(ge=2)]), required=True)
    p.add_argument("--split", default="test", help="split to read when PRED/GT are stores")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_dice)

    p = sub.add_parser("train", help="train a model from a YAML config (resumes an existing run directory)")
    p.add_argument("model", choices=("unet", "pgan", "spade"))
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--dry-schedule", action="store_true", help="pgan: print the tick table and exit")
    p.add_argument("--json", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--run-dir")
    p.add_argument("--dist", choices=("none", "ddp", "horovod"), default="none",
                   help="ddp: under torchrun or srun; horovod: under mpirun, srun --mpi=pmix or horovodrun")
    p.set_defaults(fn=_cmd_train)

    p = sub.add_parser("evaluate", help="unet: score a run's best checkpoint; swd: score every PGAN snapshot (MPI)")
    p.add_argument("model", choices=("unet", "swd"))
    p.add_argument("run")
    p.add_argument("--real", help="swd: real store (default: the one the PGAN trained on)")
    p.add_argument("--images", type=count, default=16384, help="swd: images per set (official protocol: 16,384)")
    p.add_argument("--per-bin", action="store_true", help="swd: also score the best snapshot of a slice-conditioned "
                   "run per slice bin (RUN/swd-bins.csv)")
    p.add_argument("--seed", type=natural, default=0)
    p.add_argument("--store", help="store to evaluate on (default: the run's real store)")
    p.add_argument("--split", default="test")
    p.add_argument("--device")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_evaluate)

    p = sub.add_parser("export", help="unet: a run's best model as a standalone Keras, ONNX or TorchScript file; "
                       "nnunet: a store's training mix as an nnU-Net v2 raw dataset")
    exports = p.add_subparsers(dest="model", required=True)
    p = exports.add_parser("nnunet", help="real (+ synthetic) store rows as OUT/DatasetNNN_NAME for nnU-Net v2")
    p.add_argument("store", help="the real store: train + val become imagesTr/labelsTr, test imagesTs/labelsTs")
    p.add_argument("out", help="nnU-Net's raw folder ($nnUNet_raw)")
    p.add_argument("--synthetic", help="synthetic store whose train rows join the training cases")
    p.add_argument("--synthetic-n", type=natural, help="only its first N pairs (default: all)")
    p.add_argument("--id", type=_number(Annotated[int, Range(ge=1, le=999)]), required=True,
                   help="nnU-Net dataset id, 1…999 (custom datasets: 500 and up)")
    p.add_argument("--name", required=True, help="dataset name (letters, digits, '_', '-')")
    p.add_argument("--classes", type=int, choices=(7, 4, 2), required=True, help="class view of the labels")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_export_nnunet)
    p = exports.add_parser("unet", help="a run's best model as a standalone Keras, ONNX or TorchScript file")
    p.add_argument("run")
    p.add_argument("--format", required=True, choices=("keras", "onnx", "torchscript"))
    p.add_argument("--out", required=True, help="output file (keras: must end in .keras)")
    p.add_argument("--size", type=count, help="image size (default: the run store's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_export)

    p = sub.add_parser("generate", help="masks: a PGAN snapshot → mask store; images: SPADE × mask store → pairs "
                       "(MPI-parallel over shards)")
    p.add_argument("kind", choices=("masks", "images"))
    p.add_argument("run")
    p.add_argument("--n", type=count, help="masks: how many to generate")
    p.add_argument("--masks", help="images: the (filtered) mask store to synthesise MR for")
    p.add_argument("--out", required=True)
    p.add_argument("--snapshot", default="best", help="best (after evaluate swd), tick-NNNN, or a .pt path")
    p.add_argument("--seed", type=natural, default=0)
    p.add_argument("--shard-size", type=count, default=1024)
    p.add_argument("--batch", type=count, default=64)
    p.add_argument("--device")
    p.add_argument("--png", action=argparse.BooleanOptionalAction, default=False, help="also export PNGs")
    p.set_defaults(fn=_cmd_generate)

    p = sub.add_parser("filter", help="drop corrupt synthetic masks by their Z-score norm or the PGAN discriminator's "
                       "score (MPI-parallel)")
    p.add_argument("method", choices=("zscore", "dscore"))
    p.add_argument("--real", required=True, help="the real store the PGAN learned")
    p.add_argument("--synthetic", required=True)
    p.add_argument("--out", required=True, help="output store (or, with --calibrate, a folder for the curve)")
    p.add_argument("--threshold", type=_number(Annotated[float, Range(inf=True)]),
                   help="zscore: drop norms above it (default 500); dscore: drop scores below it (default: from "
                        "--real-quantile)")
    p.add_argument("--reduced", action="store_true", help="zscore: statistics over the reduced training prefix")
    p.add_argument("--min-std", type=_number(NonNegativeFloat),
                   help="zscore: floor σ at this value (default 0: a σ = 0 pixel that differs from μ drops the mask)")
    p.add_argument("--real-quantile", type=_number(Annotated[float, Range(ge=0, lt=1)]),
                   help="dscore: threshold at this quantile of the real validation masks' scores (default 0.01)")
    p.add_argument("--batch", type=count, help="dscore: masks per discriminator call (default 64)")
    p.add_argument("--device", help="dscore: cpu, cuda or cuda:N (default: this rank's GPU if any)")
    p.add_argument("--calibrate", action="store_true", help="drop fractions versus threshold and a suggestion")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_filter)

    p = sub.add_parser("compare", help="pgan: scored PGAN runs side by side (SWD, filter drop rates, per slice bin)")
    p.add_argument("model", choices=("pgan",))
    p.add_argument("runs", nargs="+", metavar="RUN", help="PGAN run directories scored by `evaluate swd`")
    p.add_argument("--filtered", action="append", default=[], metavar="STORE",
                   help="a filter's output store of each run's masks, in the runs' order (repeat once per run)")
    p.add_argument("--out", help="write the Markdown here (default: print it)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_compare)

    p = sub.add_parser("swd", help="sliced Wasserstein distance between two image sets (.npy or stores)")
    p.add_argument("real")
    p.add_argument("fake")
    p.add_argument("--images", type=count, help="use the first N images of each set")
    p.add_argument("--seed", type=natural, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_swd)

    p = sub.add_parser("sweep", help="submit a grid of trainings as a job array; status, resume, Table-1 report")
    p.add_argument("action", choices=("submit", "status", "resume", "report", "evaluate"))
    p.add_argument("target", help="submit: the sweep YAML; otherwise the sweep directory")
    p.add_argument("--split", default="test", help="evaluate: the split to score every finished member on")
    p.add_argument("--cluster", choices=("local", "slurm"), default="local")
    p.add_argument("--profile", default="local", help="slurm/profiles/<name>.yaml or a path")
    p.add_argument("--out", help="sweep directory (default: sweeps/<sweep file name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every member")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="a sweep variable (${NAME})")
    p.add_argument("--with", dest="extras", action="append", default=[], metavar="GROUP",
                   help="submit: add the sweep file's extras group (e.g. augmentation; repeatable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_sweep)

    p = sub.add_parser("demo", help="run the pipeline on the demo cohort and write OUT/report.md")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--subjects", type=count, default=6)
    p.add_argument("--workers", type=count, default=2)
    p.add_argument("--seed", type=natural, default=0,
                   help="seed of the phantom cohort, the split and the generated masks (trainings keep theirs)")
    p.add_argument("--cluster", choices=("local", "slurm"), default="local")
    p.add_argument("--profile", default="local", help="slurm: slurm/profiles/<name>.yaml or a path")
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("pipeline", help="the whole data flow as dependent jobs (local: run here; slurm: queue); "
                       "plan: what run would do, without running or submitting anything")
    p.add_argument("action", choices=("run", "plan"))
    p.add_argument("config", help="configs/pipeline/*.yaml")
    p.add_argument("--cluster", choices=("local", "slurm"), default="local")
    p.add_argument("--profile", help="override the config's profile")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_pipeline)

    p = sub.add_parser("bench", help="throughput benchmarks")
    p.add_argument("target", choices=("unet", "pgan", "spade", "swd", "zscore", "ingest", "loader"))
    p.add_argument("--images", type=count, default=1024, help="images per set (swd) or masks to filter (zscore)")
    p.add_argument("-c", "--config", help="run config whose model to benchmark (unet, pgan, spade; default: the "
                   "paper's)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--steps", type=count, default=5,
                   help="timed training steps (unet, spade; pgan: per resolution and phase)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (unet, spade)")
    p.add_argument("--dist", choices=("none", "ddp", "horovod"), default="none",
                   help="unet: train over the launcher's ranks (global --batch split between them)")
    p.add_argument("--trainer", action="store_true",
                   help="unet: also time the real trainer step (loader, weighted Dice, SyncBN) and report mfu")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"),
                   help="unet, spade: the precision policy (default: the config's runtime.precision, else auto)")
    p.add_argument("--peak-tflops", type=positive, help="unet: the device's dense peak for mfu (default: known GPUs)")
    p.add_argument("--store", help="store to read (loader)")
    p.add_argument("--subjects", type=count, default=4, help="phantom subjects to ingest (ingest)")
    p.add_argument("--size", type=count, default=256)
    p.add_argument("--tissue", choices=("hmrf", "none"), default="hmrf")
    p.add_argument("--workers", type=natural, help="ingest processes (default 1) or DataLoader workers (default 0; "
                   "unet --trainer on cuda: 4)")
    p.add_argument("--batch", type=count, help="global batch (default 8; spade: 16 on cuda, 1 on cpu)")
    p.add_argument("--seconds", type=positive, default=5.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_bench)

    p = sub.add_parser("check", help="gpu: run every GPU path for real (~8 min) and print each against its target")
    p.add_argument("target", choices=("gpu",))
    p.add_argument("--out", help="empty folder for the check's store and runs (default: a new temporary folder)")
    p.add_argument("--budget", type=positive, default=480.0, help="seconds for all paths together (default 480)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tumorsynth` console script."""
    from toolkit.atomic import DiskError
    from toolkit.cluster.executors import ClusterError
    from toolkit.data.labelio import LabelIOError
    from toolkit.data.nifti import NiftiError
    from toolkit.data.prepare import PrepareError
    from toolkit.data.store import StoreError
    from toolkit.lock import LockedError
    from toolkit.train.errors import TrainingError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "bench" and args.target == "loader" and not args.store:
        build_parser().error("bench loader needs --store")
    try:
        return args.fn(args)
    except (PrepareError, StoreError, NiftiError, LabelIOError, ValueError, FileNotFoundError, FileExistsError,
            TimeoutError, ClusterError, LockedError, DiskError, TrainingError) as err:
        print(f"tumorsynth: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
