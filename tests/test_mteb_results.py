"""The one reader of mteb result files, shared by the evaluation and the reports."""

import pytest

from colintern.mteb_results import TaskScores, read_task_result, task_main_metric, task_scores
from colintern.utils import ColinternError
from tests.mteb_results import scored_task_result, write_results

SUBSETS = {"english": 0.60, "french": 0.50, "spanish": 0.40, "german": 0.30}


def test_scores_are_averaged_over_subsets_with_the_task_main_metric():
    result = scored_task_result("Vidore2ESGReportsRetrieval", SUBSETS)
    scores = task_scores(result, source="x.json")
    assert isinstance(scores, TaskScores) and scores.task == "Vidore2ESGReportsRetrieval" and scores.split == "test"
    assert scores.scores["ndcg_at_5"] == pytest.approx(0.45, abs=0.01)
    assert scores.main_metric == task_main_metric("Vidore2ESGReportsRetrieval") == "ndcg_at_5"
    assert scores.get("main_score") == scores.scores["ndcg_at_5"] == scores.main_score
    assert scores.as_dict()["ndcg_at_5"] == scores.scores["ndcg_at_5"] and scores.source == "x.json"
    assert scores.get("no_such_metric") is None
    with pytest.raises(KeyError, match="no results for the validation split"):
        task_scores(result, "validation")


def test_a_broken_file_is_an_error_that_names_it(tmp_path):
    broken = tmp_path / "VidoreArxivQARetrieval.json"
    broken.write_text('{"task_name": "VidoreArxivQARetrieval", "scores": 3}')
    with pytest.raises(ColinternError, match="VidoreArxivQARetrieval.json is not a readable mteb result file"):
        read_task_result(broken)


def test_evaluation_and_reports_read_the_same_scores(tmp_path):
    from colintern.evaluation import results_table
    from colintern.reports.results import load_result_folder

    folder = write_results(tmp_path, "me/model", "r1", {"VidoreArxivQARetrieval": 0.7,
                                                         "Vidore2ESGReportsRetrieval": SUBSETS})
    rows, _ = results_table(folder)
    (result_set,) = load_result_folder(folder)
    assert {row.task: row.scores for row in rows} == {name: t.scores for name, t in result_set.tasks.items()}
