"""Reports: where a model stands against the published retrievers, and whether its training run was healthy.

* `colintern.reports.results`: evaluation results as mteb writes them (`TaskResult` files under a `ResultCache`
  root or any folder), the reference scores in `results/leaderboard/`, and the lookup of a command-line name.
* `colintern.reports.leaderboard`: rebuilds `results/leaderboard/` from a clone or snapshot of the public mteb
  results repository.
* `colintern.reports.compare`: the comparison table (tasks x models, per-benchmark averages, ranks, deltas), as
  text, Markdown and a grouped bar chart; with bootstrap intervals and paired tests from `intervals`.
* `colintern.reports.intervals`: bootstrap confidence intervals and paired tests from per-query scores.
* `colintern.reports.submission`: a leaderboard submission bundle (results-repository layout + mteb ModelMeta
  module), checked by loading it back with mteb.
* `colintern.reports.training`: a diagnosis of a transformers `trainer_state.json`, with a plot.
"""
