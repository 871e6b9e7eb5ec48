"""`--attention bidirectional` in training: the trained model attends bidirectionally, the run records it, and a
fresh load of the adapter (whose base model is causal) computes exactly what training ended with."""

import json

import torch
from transformers import TrainerCallback

from colintern.model.encoding import encode_queries
from colintern.model.loading import load_retriever
from colintern.training.trainer import train
from colintern.utils import RUN_CONFIG_FILE
from tests.training.test_trainer import small_run

QUERIES = ["which report has a cyan header and a purple triangle?", "a line chart"]


def test_a_bidirectional_run_trains_records_and_reloads_its_attention(colintern_home, small_synthdocs_dir, tmp_path):
    captured = {}

    class Capture(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
            captured["model"], captured["processor"] = model, processing_class

    config = small_run(tmp_path, small_synthdocs_dir, max_steps=2)
    config.model.attention = "bidirectional"
    result = train(config, callbacks=[Capture()])
    assert json.loads((result.output_dir / RUN_CONFIG_FILE).read_text())["model"]["attention"] == "bidirectional"
    trained = captured["model"].eval()
    assert trained.get_base_model().attention == "bidirectional"
    in_memory = encode_queries(trained, captured["processor"], QUERIES, storage_dtype=torch.float32)

    for folder in (result.output_dir, result.output_dir / "checkpoint-2"):
        reloaded, processor = load_retriever(str(folder), device="cpu")
        assert reloaded.attention == "bidirectional"
        for expected, got in zip(in_memory, encode_queries(reloaded, processor, QUERIES, storage_dtype=torch.float32)):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    causal, processor = load_retriever(str(result.output_dir), device="cpu", attention="causal")
    assert float((encode_queries(causal, processor, QUERIES[:1], storage_dtype=torch.float32)[0]
                  - in_memory[0]).abs().max()) > 1e-3  # the mode matters for these weights
