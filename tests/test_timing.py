"""tools.timing: side-by-side rounds, paired ratios and their wording (a fake clock: exact, not timed)."""

import pytest

from tools import timing


@pytest.fixture
def clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(timing, "tree_cpu_seconds", lambda: now[0] / 2)
    return now


def test_side_by_side_rotates_the_order_and_pairs_rounds(clock):
    order = []
    # the host gets slower every round: a job's time is its own cost times the round's load
    load = {"off": [1, 1, 2, 2, 3, 3], "on": [1, 1, 2, 2, 3, 3]}
    cost = {"off": 0.010, "on": 0.011}

    def job(name):
        def run():
            i = sum(1 for o in order if o == name)
            order.append(name)
            clock[0] += cost[name] * load[name][min(i, 5)] * (1 if i else 0) + (0.5 if not i else 0)
            return 100
        return run

    t = timing.measure_side_by_side({"off": job("off"), "on": job("on")}, repeats=5)
    assert order == ["off", "on", "off", "on", "on", "off", "off", "on", "on", "off", "off", "on"]
    assert t["off"].items == 100 and len(t["on"].walls) == 5
    assert t["off"].walls == pytest.approx([0.010, 0.020, 0.020, 0.030, 0.030])
    assert t["off"].cpus == pytest.approx([w / 2 for w in t["off"].walls])
    mid, lo, hi = timing.paired(t["on"], t["off"])
    assert (mid, lo, hi) == pytest.approx((1 / 1.1, 1 / 1.1, 1 / 1.1))  # the load cancels round by round
    assert timing.cost_in_words(t["on"], t["off"]).startswith("9.1% (per round 9.1 to 9.1%)")


def test_cost_in_words_says_when_the_rounds_disagree_on_the_sign():
    off = timing.Timing([1.0, 1.0, 1.0], [1, 1, 1], 100)
    on = timing.Timing([0.9, 1.1, 1.02], [1, 1, 1], 100)
    words = timing.cost_in_words(on, off)
    assert "inside the noise" in words and words.startswith("2.0%")
    assert "inside the noise" not in timing.cost_in_words(timing.Timing([1.2, 1.1, 1.3], [1, 1, 1], 100), off)
    with pytest.raises(ValueError, match="same rounds"):
        timing.paired(timing.Timing([1.0], [1], 1), off)


def test_cost_in_words_will_not_judge_one_or_two_rounds():
    one = timing.Timing([1.0], [1], 100)
    assert "too few to tell it from noise" in timing.cost_in_words(timing.Timing([2.0], [1], 100), one)


def test_tree_cpu_counts_this_process_finer_than_clock_ticks():
    """A 3 ms busy loop shows in the tree's CPU time: os.times() alone counts 10 ms ticks, so most such
    loops read as 0 there (a memory-path epoch is ~0.25 CPU-s: ticks quantised its rate to +-4 %)."""
    import time

    grew = 0
    for _ in range(5):
        before = timing.tree_cpu_seconds()
        end = time.perf_counter() + 0.003
        while time.perf_counter() < end:
            pass
        grew += timing.tree_cpu_seconds() > before
    assert grew == 5
