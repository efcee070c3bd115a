"""The local scheduler of `pipeline run --cluster local` on cheap real jobs (tests/cluster/cheap_jobs.py) run as
real ``python -m jobs`` processes, its progress lines and the config fields that drive them."""

import importlib
import logging
import os
import re
import shutil
from pathlib import Path

import pytest

from toolkit.cluster.pipeline import PipelineConfig, Progress, Step, schedule
from toolkit.cluster.private import private_dir
from toolkit.config import from_dict

HERE = Path(__file__).resolve().parent


@pytest.fixture
def cheap(monkeypatch):
    """tests/cluster/cheap_jobs.py, importable here and in the job processes by its own name."""
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv("PYTHONPATH", str(HERE), prepend=os.pathsep)
    return importlib.import_module("cheap_jobs")


def _step(cheap, folder, name, after=(), tasks=1, **job):
    return Step(name, cheap.Mark(name, folder, **job), tuple(after), lambda: False, tasks=tasks)


def _journal(folder):
    """The journal's lines as (event, step, pid)."""
    return [(e, n, int(p)) for e, n, p in (line.split() for line in (folder / "journal").read_text().splitlines())]


def _run(steps, parallel, folder):
    finished = []
    schedule(steps, parallel, private_dir(folder / ".pipeline"), finished=lambda name, seconds: finished.append(name))
    return finished


def test_two_independent_steps_run_at_the_same_time_in_their_own_processes(cheap, tmp_path):
    # each waits for the other to have started: both end only if they ran side by side
    steps = [_step(cheap, tmp_path, "a", wait_for="b.started"), _step(cheap, tmp_path, "b", wait_for="a.started")]
    assert sorted(_run(steps, 2, tmp_path)) == ["a", "b"]
    journal = _journal(tmp_path)
    assert [e for e, _, _ in journal] == ["start", "start", "end", "end"]
    assert len({pid for _, _, pid in journal} | {os.getpid()}) == 3  # two job processes, neither this one
    assert (tmp_path / ".pipeline" / "logs" / "a.log").exists()


def test_a_step_starts_only_once_its_parent_finished_though_a_slot_is_free(cheap, tmp_path):
    # p runs until d has ended, so a slot is free while p still runs: c (after p) must wait for p all the same
    steps = [_step(cheap, tmp_path, "p", wait_for="d.ended"), _step(cheap, tmp_path, "c", after=["p"]),
             _step(cheap, tmp_path, "d")]
    assert sorted(_run(steps, 2, tmp_path)) == ["c", "d", "p"]
    events = [(e, n) for e, n, _ in _journal(tmp_path)]
    assert events.index(("end", "d")) < events.index(("end", "p")) < events.index(("start", "c"))


def test_parallel_1_runs_the_steps_in_their_order_one_at_a_time_in_this_process(cheap, tmp_path):
    # z depends on nothing, yet runs last: the order of the list, as `pipeline run` has always done
    steps = [_step(cheap, tmp_path, "x"), _step(cheap, tmp_path, "y", after=["x"]), _step(cheap, tmp_path, "z")]
    assert _run(steps, 1, tmp_path) == ["x", "y", "z"]
    assert _journal(tmp_path) == [(e, n, os.getpid()) for n in "xyz" for e in ("start", "end")]
    assert not (tmp_path / ".pipeline" / "logs").exists()  # nothing ran as a process of its own


def test_a_failed_step_raises_naming_it_and_its_log_the_running_finish_and_its_children_never_start(cheap,
                                                                                                     tmp_path):
    # h runs until f has failed: the scheduler must wait for it (and record it) before raising
    steps = [_step(cheap, tmp_path, "f", fail=True), _step(cheap, tmp_path, "g", after=["f"]),
             _step(cheap, tmp_path, "h", wait_for="f.failed")]
    finished = []
    log = tmp_path / ".pipeline" / "logs" / "f.log"
    with pytest.raises(RuntimeError, match=rf"step f failed \(exit 1\); the end of its log {re.escape(str(log))}:\n"
                                           r"(.*\n)*.*f: failing as asked"):
        schedule(steps, 2, private_dir(tmp_path / ".pipeline"), finished=lambda name, seconds: finished.append(name))
    assert finished == ["h"]
    assert sorted((e, n) for e, n, _ in _journal(tmp_path)) == [("end", "h"), ("start", "f"), ("start", "h")]


@pytest.mark.mpi
def test_a_step_with_more_ranks_than_parallel_runs_alone(cheap, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("needs OpenMPI's mpirun (make test installs openmpi-bin as root)")
    steps = [_step(cheap, tmp_path, "wide", tasks=3), _step(cheap, tmp_path, "b")]
    assert _run(steps, 2, tmp_path) == ["wide", "b"]
    journal = _journal(tmp_path)
    wide = [(e, pid) for e, n, pid in journal if n == "wide"]
    assert len({pid for e, pid in wide if e == "start"}) == 3 and len(wide) == 6  # three ranks, each to the end
    assert [n for _, n, _ in journal] == ["wide"] * 6 + ["b", "b"]  # b only once every rank of wide had ended


class Clock:
    """A clock the test moves: what Progress reads as the time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_count_the_steps_and_scale_the_estimates_by_the_time_taken(caplog):
    clock = Clock()
    progress = Progress(["a", "b", "sweep"], (("a", 10.0), ("b", 30.0), ("sweep", 20.0)), clock)
    with caplog.at_level(logging.INFO, logger="toolkit.cluster.pipeline"):
        progress.started("a")
        clock.now += 20.0
        progress.done("a", 20.0)  # twice the estimate: the run is expected to take 2 × 60 s, 20 of them gone
        progress.skipped("b")  # complete already: nothing of it is left
    assert re.fullmatch(r"pipeline \[1/3\] a: started \(elapsed 0:00\)", caplog.messages[0])
    assert re.fullmatch(r"pipeline \[1/3\] a: done in 0:20 \(elapsed 0:20; about 1:40 left\)", caplog.messages[1])
    assert caplog.messages[2] == "pipeline [2/3] b: complete, skipped"
    assert progress.left() == pytest.approx(40.0)  # 2 × (60 − b's 30) − the 20 s elapsed


def test_a_total_estimate_accounts_for_overlap_and_without_estimates_nothing_is_guessed(caplog):
    clock = Clock()
    overlapping = Progress(["a", "b"], (("a", 60.0), ("b", 60.0), ("total", 90.0)), clock)  # a and b overlap
    clock.now += 30.0
    overlapping.done("a", 30.0)
    assert overlapping.left() == pytest.approx(15.0)  # 90 × 30/60 − 30 elapsed
    overlapping.done("b", 30.0)
    assert overlapping.left() == 0.0  # all done: nothing is left, whatever the total said
    with caplog.at_level(logging.INFO, logger="toolkit.cluster.pipeline"):
        Progress(["a"]).done("a", 75.0)
    assert re.fullmatch(r"pipeline \[1/1\] a: done in 1:15 \(elapsed 0:00\)", caplog.messages[0])


def test_parallel_and_estimates_load_from_a_pipeline_config():
    doc = {"out": "x", "cohort": "c", "pgan": {"config": "p.yaml"}, "spade": {"config": "s.yaml"}, "sweep": "w.yaml"}
    cfg = from_dict(PipelineConfig, {**doc, "parallel": 2, "estimates": [["pgan-full", 240], ["total", 600.5]]})
    assert cfg.parallel == 2 and cfg.estimates == (("pgan-full", 240.0), ("total", 600.5))
    assert from_dict(PipelineConfig, doc).parallel == 1
    with pytest.raises(ValueError, match="parallel"):
        from_dict(PipelineConfig, {**doc, "parallel": 0})
