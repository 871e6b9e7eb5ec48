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
