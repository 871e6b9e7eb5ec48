import pytest

from colintern.benchmarks.measure import PeakMemory, format_table, reset_peak_rss


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
