"""The render benchmark interleaves the hand-written loop and a cold prepare_dataset over rounds and writes its JSON."""

import json

from scripts.benchmark import build_parser
from scripts.benchmark import main as benchmark_main


def test_render_benchmark_reports_medians_of_interleaved_cold_rounds(tmp_path, colintern_home):
    args = build_parser().parse_args([
        "render", "--documents", "1", "--pages", "2", "--dpi", "20", "--rounds", "2", "--output-dir", str(tmp_path),
    ])
    assert benchmark_main(args) == 0
    result = json.loads((tmp_path / "render.json").read_text())
    timing = result["timing"]
    assert timing["order"] == ["reference", "colintern", "colintern", "reference"]
    ours = timing["implementations"]["colintern"]
    assert len(ours["seconds_per_round"]) == 2
    assert result["colintern"]["seconds"] == round(ours["seconds_median"], 2)
    assert result["speedup_vs_reference"] == round(
        timing["implementations"]["reference"]["seconds_median"] / ours["seconds_median"], 2)
    assert result["conditions"] == "quiet" or result["conditions"].startswith("under load (load avg ")
    assert result["pages"] == 2 and result["colintern"]["megabytes"] > 0
    assert len(result["load_average"]["start"]) == 3
    assert result["size_ratio_vs_reference"] > 0
