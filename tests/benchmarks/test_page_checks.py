import io

from PIL import Image

from colintern.benchmarks.page_checks import summary, write_hub_snapshot
from colintern.data.pairs import check_pages, load_pairs


def test_generated_set_is_a_hub_snapshot_colintern_reads(tmp_path, colintern_home):
    snapshot = write_hub_snapshot(tmp_path / "colpali_train_set", 30, 7, page_size=48)
    train, test = load_pairs(str(snapshot), "train"), load_pairs(str(snapshot), "test")
    assert (len(train), len(test)) == (30, 7)
    assert train.column_names == ["query", "image", "image_filename", "answer", "source"]
    checks = check_pages(train, "image", cache=False)
    assert checks.problems == {} and set(checks.sizes) == {(48, 48)}
    formats = {Image.open(io.BytesIO(train[i]["image"]["bytes"])).format for i in range(2)}
    assert formats == {"PNG", "JPEG"}


def test_summary_names_every_figure():
    runs = {"first-step-cold": {"seconds_to_first_step": 40.0}, "first-step-warm": {"seconds_to_first_step": 20.0},
            "checks-cold": {"rows_per_second": 9000.0}, "checks-cold-1-process": {"rows_per_second": 5000.0},
            "decode-all": {"rows_per_second": 3000.0}, "checks-cached": {"seconds": 0.5}}
    text = summary({"rows": 100, "page_size": 64, "cpus": 2, "runs": runs})
    assert "first-step-warm" in text and "20.0 s" in text and "9000 rows/s" in text and "0.50 s" in text


def test_summary_states_the_rounds_and_conditions_of_the_compared_figures():
    runs = {"first-step-cold": {"seconds_to_first_step": 40.0}, "first-step-warm": {"seconds_to_first_step": 20.0},
            "checks-cold": {"rows_per_second": 9000.0}, "checks-cold-1-process": {"rows_per_second": 5000.0},
            "decode-all": {"rows_per_second": 3000.0}, "checks-cached": {"seconds": 0.5}}
    text = summary({"rows": 100, "page_size": 64, "cpus": 2, "runs": runs, "rounds": 3,
                    "conditions": "under load (load avg 2.10)"})
    assert "medians of 3 rounds, under load (load avg 2.10)" in text.splitlines()[0]


def test_compared_checks_and_decoding_are_interleaved_medians(tmp_path, colintern_home):
    from colintern.benchmarks.page_checks import benchmark_page_checks

    figures = benchmark_page_checks(tmp_path, rows=40, test_rows=8, page_size=32, rounds=2)
    assert figures["timing"]["order"] == ["checks-cold", "checks-cold-1-process", "decode-all",
                                          "decode-all", "checks-cold-1-process", "checks-cold"]
    for name in ("checks-cold", "checks-cold-1-process", "decode-all"):
        run = figures["runs"][name]
        assert len(run["seconds_per_round"]) == 2 and run["rows"] == 40
        assert run["rows_per_second"] == round(40 / run["seconds_median"], 1)
    assert figures["conditions"] == "quiet" or figures["conditions"].startswith("under load (load avg ")
    assert "seconds_to_first_step" in figures["runs"]["first-step-warm"]
