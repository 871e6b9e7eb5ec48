"""One search worker in its own process, for tests/tuning/test_search.py: `run_search` on the tiny model over a shared
storage. With a gate folder, it pauses after the first training step of its first trial (writing
`paused-<pid>` there) until the test creates `go`, so that the test can kill a worker in the middle of a trial.

    python -m tests.tuning.search_worker '{"dataset": ..., "storage": ..., "study": ..., "output_dir": ..., ...}'
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from transformers import TrainerCallback


class PauseInFirstTrial(TrainerCallback):
    def __init__(self, gate: Path):
        self.gate, self.trials = gate, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.trials += 1

    def on_step_end(self, args, state, control, **kwargs):
        if self.trials != 1 or state.global_step != 1:
            return
        (self.gate / f"paused-{os.getpid()}").touch()
        deadline = time.monotonic() + 300
        while not (self.gate / "go").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {self.gate / 'go'} after 300 s")
            time.sleep(0.05)


def main(spec: dict) -> None:
    from colintern.tuning.search import SearchSettings, run_search
    from tests.tuning.test_search import space, tiny_base

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s: %(message)s")
    base = tiny_base(spec["dataset"], max_steps=spec["max_steps"], eval_steps=spec["eval_steps"])
    settings = SearchSettings(output_dir=spec["output_dir"], study_name=spec["study"], storage=spec["storage"],
                              objectives=("eval_loss",), n_trials=spec["n_trials"], pruner="none")
    callbacks = [PauseInFirstTrial(Path(spec["gate"]))] if spec.get("gate") else []
    result = run_search(base, space(**spec["space"]), settings, enqueue=spec.get("enqueue"), callbacks=callbacks)
    print(json.dumps({"ran_trials": result.ran_trials}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
