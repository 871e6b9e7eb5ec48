import pytest

from colintern.benchmarks.measure import (
    QUIET_LOAD_PER_CORE,
    PeakMemory,
    RoundStats,
    conditions,
    format_table,
    interleaved_order,
    interleaved_rounds,
    reset_peak_rss,
)


def test_peak_memory_counts_what_the_work_allocates_and_not_what_came_before():
    if not reset_peak_rss():
        pytest.skip("this kernel does not allow resetting the resident-set high-water mark")
    before = bytearray(300 * 2**20)  # touched before the measurement: must not count
    with PeakMemory("cpu") as idle:
        pass
    with PeakMemory("cpu") as busy:
        block = bytearray(200 * 2**20)  # zero-filled, so every page is touched
        del block
    del before
    assert idle.peak_bytes < 50 * 2**20
    assert 190 * 2**20 <= busy.peak_bytes < 300 * 2**20


def test_format_table_is_a_markdown_table():
    table = format_table(["name", "value"], [["a", 1.23456], ["bb", None]])
    lines = table.splitlines()
    assert lines[0].startswith("| name") and set(lines[1]) <= {"|", "-"} and "1.235" in lines[2] and "-" in lines[3]


# ---------------------------------------------------------------------------------------------- interleaved rounds


def test_rounds_alternate_the_order_abba():
    ran: list[str] = []
    result = interleaved_rounds(
        {"a": lambda: ran.append("a"), "b": lambda: ran.append("b"), "c": lambda: ran.append("c")}, rounds=4,
        load_reader=lambda: (0.0, 0.0, 0.0), cores=2,
    )
    assert ran == ["a", "b", "c", "c", "b", "a", "a", "b", "c", "c", "b", "a"]
    assert result.order == ran
    assert interleaved_order(["a", "b"], 3) == [["a", "b"], ["b", "a"], ["a", "b"]]
    assert all(len(s.seconds) == 4 for s in result.stats.values())


def test_median_min_max_spread_and_ratios_of_sleeping_callables():
    import time

    result = interleaved_rounds(
        {"fast": lambda: time.sleep(0.02), "slow": lambda: time.sleep(0.06)}, rounds=3, reference="slow",
        load_reader=lambda: (0.0, 0.0, 0.0), cores=2,
    )
    fast, slow = result.stats["fast"], result.stats["slow"]
    assert len(fast.seconds) == len(slow.seconds) == 3
    assert 0.02 <= fast.min <= fast.median <= fast.max and 0.06 <= slow.min
    assert fast.median == sorted(fast.seconds)[1]
    assert fast.spread == (fast.max - fast.min) / fast.median
    # the sleeps can overrun on a busy machine, but not by enough to bring 20 ms near 60 ms
    assert 1.5 < result.ratios()["fast"] < 3.5 and result.ratios()["slow"] == 1.0
    summary = result.to_dict()
    assert summary["implementations"]["fast"]["seconds_median"] == fast.median
    assert summary["speedup_vs_reference_of_medians"]["fast"] == slow.median / fast.median


def test_exact_arithmetic_with_an_injected_clock_and_self_timed_callables():
    ticks = iter(range(100))
    times = iter([3.0, 1.0, 2.0, 5.0])  # self-timed: returned seconds win over the clock
    result = interleaved_rounds(
        {"a": lambda: next(times), "b": lambda: None}, rounds=2, reference="a",
        load_reader=lambda: (0.0, 0.0, 0.0), cores=1, clock=lambda: float(next(ticks)),
    )
    # round 1: a (3.0), b (clock 1 tick); round 2: b (1 tick), a (1.0)
    assert result.stats["a"].seconds == [3.0, 1.0] and result.stats["b"].seconds == [1.0, 1.0]
    assert result.stats["a"].median == 2.0 and result.stats["a"].spread == 1.0
    assert result.ratios() == {"a": 1.0, "b": 2.0}
    stats = RoundStats(seconds=[1.0, 4.0, 2.0])
    assert (stats.median, stats.min, stats.max, stats.spread) == (2.0, 1.0, 4.0, 1.5)


def test_quiet_or_under_load_from_the_injected_load_reader():
    quiet_readings = iter([(0.1, 0.1, 0.1)] * 8)
    quiet = interleaved_rounds({"a": lambda: None, "b": lambda: None}, rounds=2,
                               load_reader=lambda: next(quiet_readings), cores=4)
    assert quiet.conditions == "quiet" and quiet.stats["a"].conditions == "quiet"
    assert quiet.quiet_below == QUIET_LOAD_PER_CORE * 4 + 1.0
    assert quiet.stats["a"].load_before == [(0.1, 0.1, 0.1)] * 2

    # the load rises during b's second round only: b's figure and the comparison are under load, a's is quiet
    readings = iter([(0.2, 0, 0)] * 4 + [(3.5, 0, 0)] * 2 + [(0.2, 0, 0)] * 2)
    loaded = interleaved_rounds({"a": lambda: None, "b": lambda: None}, rounds=2,
                                load_reader=lambda: next(readings), cores=4)
    assert loaded.order == ["a", "b", "b", "a"]
    assert loaded.stats["a"].conditions == "quiet"  # order a b b a: readings 5-6 are b's second round
    assert loaded.stats["b"].conditions == "under load (load avg 3.50)"
    assert loaded.conditions == "under load (load avg 3.50)"
    assert loaded.to_dict()["conditions"] == "under load (load avg 3.50)"

    assert conditions([0.4], cores=2) == "quiet"  # 0.25 x 2 cores + the benchmark's own 1.0
    assert conditions([1.6], cores=2) == "under load (load avg 1.60)"
    assert conditions([1.6], cores=2, own_load=2.0) == "quiet"
