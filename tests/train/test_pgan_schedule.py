"""The official PGAN schedule: state at an image count, the replayed main loop (205 ticks for the paper), the
run-length-encoded iterations, optimiser resets and the dry-schedule table."""

import itertools
import time

import pytest

from toolkit.train.pgan_schedule import ScheduleConfig, dry_schedule, optimizer_reset, state_at, ticks

PAPER = ScheduleConfig()
DEMO = ScheduleConfig(resolution=32, total_kimg=6, lod_training_kimg=1, lod_transition_kimg=1, minibatch={},
                      tick_kimg={}, minibatch_default=16, tick_kimg_default=1)


def _main_loop(config: ScheduleConfig) -> list[tuple[int, int, list[tuple[int, float, int]]]]:
    """The official loop, one iteration at a time: (tick start, tick end, iterations) per tick."""
    nimg, tick_start, result, its = 0, 0, [], []
    while nimg < config.total_kimg * 1000:
        state = state_at(nimg, config)
        its.append((nimg, state.lod, state.minibatch))
        nimg += config.minibatch_repeats * state.minibatch
        if nimg >= tick_start + state.tick_kimg * 1000 or nimg >= config.total_kimg * 1000:
            result.append((tick_start, nimg, its))
            tick_start, its = nimg, []
    return result


def test_paper_has_205_ticks_and_is_fast():
    start = time.perf_counter()
    result = ticks(PAPER)
    assert time.perf_counter() - start < 1.0
    assert len(result) == 205


@pytest.mark.parametrize("config", [PAPER, DEMO, ScheduleConfig(resolution=64, total_kimg=50, lod_training_kimg=3,
                                                                 lod_transition_kimg=5, tick_kimg={8: 7, 64: 2})])
def test_ticks_match_the_iteration_by_iteration_loop(config):
    fast, slow = ticks(config), _main_loop(config)
    assert [(t.start_nimg, t.end_nimg) for t in fast] == [(a, b) for a, b, _ in slow]
    first = 0
    for tick, (_, _, its) in zip(fast, slow):
        assert tick.first_iteration == first and len(tick.iterations) == len(its)
        assert list(tick.iterations) == its
        first += len(its)
    # the tick that covers the fades is checked element by element through indexing
    tick = fast[len(fast) // 3]
    its = slow[len(fast) // 3][2]
    assert [tick.iterations[i] for i in range(-len(its), len(its))] == its + its
    assert tick.iterations[1:4] == its[1:4]
    with pytest.raises(IndexError):
        tick.iterations[len(its)]


def test_paper_lod_sequence():
    lods = [lod for t in ticks(PAPER) for _, lod, _ in t.iterations]
    assert lods[0] == 6.0 and lods[-1] == 0.0
    assert all(a >= b for a, b in itertools.pairwise(lods))  # never increases
    fractional = [x for x in lods if x != int(x)]
    assert fractional and min(fractional) > 0 and max(fractional) < 6
    for k in range(6):  # each fade passes through intermediate values between k + 1 and k
        assert any(k + 0.4 < x < k + 0.6 for x in fractional)


@pytest.mark.parametrize(("kimg", "lod", "resolution", "minibatch", "tick_kimg"), [
    (0, 6.0, 4, 128, 160),
    (600, 6.0, 4, 128, 160),  # end of the stable 4² phase
    (900, 5.5, 8, 128, 140),  # fading in 8²: the new resolution's values
    (1200, 5.0, 8, 128, 140),
    (3000, 4.0, 16, 128, 120),
    (3300, 3.5, 32, 64, 100),
    (4500, 2.5, 64, 32, 80),
    (5700, 1.5, 128, 16, 60),
    (6600, 1.0, 128, 16, 60),
    (6900, 0.5, 256, 8, 40),
    (7200, 0.0, 256, 8, 40),
    (11_999.992, 0.0, 256, 8, 40),  # clamped at 0 after the last fade
])
def test_state_at(kimg, lod, resolution, minibatch, tick_kimg):
    state = state_at(round(kimg * 1000), PAPER)
    assert (state.lod, state.resolution, state.minibatch, state.tick_kimg) == (lod, resolution, minibatch, tick_kimg)


def test_fade_uses_the_new_resolution():
    after = state_at(600_008, PAPER)  # one image past the stable 4² phase
    assert 5.99 < after.lod < 6.0 and after.resolution == 8 and after.tick_kimg == 140
    state = state_at(3_000_064, PAPER)
    assert 3.99 < state.lod < 4.0 and state.resolution == 32 and state.minibatch == 64


def test_total_images_and_last_tick():
    for config in (PAPER, DEMO):
        result = ticks(config)
        total = config.total_kimg * 1000
        assert result[-1].end_nimg >= total > result[-1].start_nimg
        assert result[0].start_nimg == 0
        assert all(a.end_nimg == b.start_nimg for a, b in itertools.pairwise(result))
        assert [t.index for t in result] == list(range(len(result)))


def test_tick_ends_at_the_first_iteration_past_its_length():
    """Each iteration checks the tick length of *its own* state, so a tick that crosses into a resolution with shorter
    ticks (128² → 256²: 60 → 40 kimg) ends right after the first iteration at the new resolution when already past."""
    crossing = 0
    for tick in ticks(PAPER)[:-1]:
        ends = [nimg + PAPER.minibatch_repeats * mb for nimg, _, mb in tick.iterations]
        lengths = [state_at(nimg, PAPER).tick_kimg * 1000 for nimg, _, _ in tick.iterations]
        assert all(end < tick.start_nimg + length for end, length in zip(ends[:-1], lengths[:-1]))
        assert ends[-1] == tick.end_nimg >= tick.start_nimg + lengths[-1]
        crossing += lengths[0] != lengths[-1]
    assert crossing > 0


def test_optimizer_reset():
    assert optimizer_reset(-1.0, 6.0)
    assert not optimizer_reset(6.0, 6.0)
    assert optimizer_reset(6.0, 5.99)  # a fade starts
    assert not optimizer_reset(5.99, 5.5)
    assert optimizer_reset(5.01, 5.0)  # a fade ends
    lods = [-1.0] + [lod for t in ticks(PAPER) for _, lod, _ in t.iterations]
    resets = [i for i, (prev, lod) in enumerate(itertools.pairwise(lods)) if optimizer_reset(prev, lod)]
    assert len(resets) == 1 + 2 * 6  # start, then the start and the end of each of the six fades


def test_dry_schedule_paper():
    doc = dry_schedule(PAPER)
    assert {"ticks", "total_kimg", "per_resolution"} <= doc.keys()
    assert doc["ticks"] == 205 and doc["total_kimg"] == 12000
    per = doc["per_resolution"]
    assert list(per) == ["4", "8", "16", "32", "64", "128", "256"]
    assert {r: v["minibatch"] for r, v in per.items()} == {str(r): m for r, m in PAPER.minibatch.items()}
    assert sum(v["ticks"] for v in per.values()) == 205
    assert sum(v["kimg"] for v in per.values()) == pytest.approx(doc["images"] / 1000)
    assert per["4"]["kimg"] == pytest.approx(600, abs=1) and per["256"]["kimg"] == pytest.approx(5400, abs=1)
    for res in ("8", "16", "32", "64", "128"):  # one fade in + one stable phase each
        assert per[res]["kimg"] == pytest.approx(1200, abs=1)


def test_demo_schedule_table():
    doc = dry_schedule(DEMO)
    per = doc["per_resolution"]
    assert list(per) == ["4", "8", "16", "32"]
    assert all(v["minibatch"] == 16 for v in per.values())
    assert doc["ticks"] == 6 and doc["images"] >= 6000
    result = ticks(DEMO)
    lods = [lod for t in result for _, lod, _ in t.iterations]
    assert lods[0] == 3.0 and lods[-1] < 0.1 and any(0 < x < 3 and x != int(x) for x in lods)


def test_config_keys_from_yaml_strings_and_validation():
    config = ScheduleConfig(minibatch={"4": 32}, tick_kimg={"4": 10})
    assert config.minibatch == {4: 32} and state_at(0, config).minibatch == 32
    with pytest.raises(ValueError, match=r"schedule\.minibatch"):
        ScheduleConfig(minibatch={"four": 32})
    with pytest.raises(ValueError, match=r"schedule\.resolution"):
        ScheduleConfig(resolution=100)
    with pytest.raises(ValueError, match=r"schedule\.total_kimg"):
        ScheduleConfig(total_kimg=0)
