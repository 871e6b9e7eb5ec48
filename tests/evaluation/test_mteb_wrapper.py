import json
import os
import subprocess
import sys

import datasets
import pytest
import torch
from mteb._create_dataloaders import create_dataloader
from mteb.types import PromptType

from colintern.evaluation import SynthDocsRetrieval
from colintern.model.loading import load_processor
from colintern.model.encoding import encode_pages, encode_queries
from colintern.utils import ColinternError
from mteb_wrappers.colintern3_5_models import (
    COLINTERN3_5_1B_EMBEDDING_PARAMETERS,
    COLINTERN3_5_1B_PARAMETERS,
    ColIntern3_5Wrapper,
    colintern3_5_1b,
)
from tests.conftest import REPO_ROOT
from tests.helpers import build_tiny_adapter, page_in_mode, png_bytes

TASK = SynthDocsRetrieval.metadata

# Run in a new interpreter: load the adapter folder through the wrapper and encode pages/queries through mteb's loaders.
FRESH_PROCESS_SCRIPT = """
import json, pathlib, sys
import datasets, torch
from mteb._create_dataloaders import create_dataloader
from mteb.types import PromptType
from colintern.evaluation import SynthDocsRetrieval
from mteb_wrappers.colintern3_5_models import ColIntern3_5Wrapper

adapter_dir, folder, out = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
wrapper = ColIntern3_5Wrapper(adapter_dir, device="cpu", show_progress=False)
meta = SynthDocsRetrieval.metadata
images = [str(p) for p in sorted(folder.glob("page*.png"))]
corpus = datasets.Dataset.from_dict({"id": [p.stem for p in sorted(folder.glob("page*.png"))], "image": images})
corpus = corpus.cast_column("image", datasets.Image())
texts = json.loads((folder / "queries.json").read_text())
queries = datasets.Dataset.from_dict({"id": [f"q{i}" for i in range(len(texts))], "text": texts})
encoded = {
    kind: wrapper.encode(
        create_dataloader(data, task_metadata=meta, prompt_type=prompt), task_metadata=meta, hf_split="test",
        hf_subset="default",
    )
    for kind, data, prompt in (("pages", corpus, PromptType.document), ("queries", queries, PromptType.query))
}
torch.save(encoded, out)
"""


def corpus_loader(images, ids, batch_size=4):
    """The dataloader mteb builds for a corpus of page images."""
    corpus = datasets.Dataset.from_dict({"id": ids, "image": images}).cast_column("image", datasets.Image())
    return create_dataloader(corpus, task_metadata=TASK, prompt_type=PromptType.document, batch_size=batch_size)


def query_loader(texts, batch_size=4):
    queries = datasets.Dataset.from_dict({"id": [f"q{i}" for i in range(len(texts))], "text": texts})
    return create_dataloader(queries, task_metadata=TASK, prompt_type=PromptType.query, batch_size=batch_size)


@pytest.fixture(scope="module")
def wrapper(tiny_adapter_dir):
    return ColIntern3_5Wrapper(str(tiny_adapter_dir), device="cpu", show_progress=False)


def test_model_meta_matches_the_internvl3_5_1b_architecture():
    from transformers.models.internvl import InternVLConfig

    from colintern.model.modeling import ColIntern3_5
    from colintern.utils import ARCHITECTURES_DIR

    config = InternVLConfig.from_pretrained(ARCHITECTURES_DIR / "InternVL3_5-1B")  # the shipped config, as it is
    with torch.device("meta"):
        model = ColIntern3_5(config)
    n_parameters = sum(p.numel() for p in model.parameters())
    assert n_parameters == COLINTERN3_5_1B_PARAMETERS == colintern3_5_1b.n_parameters
    assert model.get_input_embeddings().weight.numel() == COLINTERN3_5_1B_EMBEDDING_PARAMETERS
    # the published 1.06B counts InternVL3.5's untied LM head, which a retriever does not have
    assert abs(n_parameters + COLINTERN3_5_1B_EMBEDDING_PARAMETERS - 1.06e9) < 0.005e9
    assert colintern3_5_1b.memory_usage_mb == round(n_parameters * 2 / 2**20)
    assert colintern3_5_1b.model_type == ["late-interaction"] and colintern3_5_1b.embed_dim == 128
    assert colintern3_5_1b.similarity_fn_name.value == "MaxSim"


def test_wrapper_merges_the_adapter_and_exposes_the_trained_head(wrapper, tiny_adapter_dir):
    from safetensors.torch import load_file

    saved = load_file(str(tiny_adapter_dir / "adapter_model.safetensors"))
    head = next(v for k, v in saved.items() if k.endswith("custom_text_proj.weight"))
    assert torch.equal(wrapper.mdl.custom_text_proj.weight, head)
    assert not hasattr(wrapper.mdl, "peft_config")  # merged: a plain ColIntern3_5
    meta = wrapper.mteb_model_meta
    assert meta.name == "colintern/tiny-adapter" and meta.revision == wrapper.checkpoint.revision
    assert meta.n_parameters == sum(p.numel() for p in wrapper.mdl.parameters()) and meta.embed_dim == 128


def test_fresh_process_embeddings_equal_the_trained_model_in_memory(tiny_model_dir, tmp_path):
    """The upstream failure: a LoRA checkpoint reloaded with a re-initialised head. Here the wrapper, in a new
    process, must give the embeddings of the (unmerged) model that was trained in memory."""
    adapter_dir = tmp_path / "adapter"
    trained = build_tiny_adapter(tiny_model_dir, adapter_dir, seed=7)
    pages = [page_in_mode("RGB", (128, 176)), page_in_mode("P", (128, 176)), page_in_mode("L", (100, 150))]
    queries = ["report with a red header", "", "blue star logo and a pie chart"]
    processor = load_processor(str(adapter_dir))
    with torch.no_grad():
        in_memory_pages = encode_pages(trained, processor, pages)
        in_memory_queries = encode_queries(trained, processor, queries)
    for i, page in enumerate(pages):
        page.save(tmp_path / f"page{i}.png")

    (tmp_path / "queries.json").write_text(json.dumps(queries))
    out = tmp_path / "embeddings.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-c", FRESH_PROCESS_SCRIPT, str(adapter_dir), str(tmp_path), str(out)]
    subprocess.run(command, check=True, env=env, cwd=REPO_ROOT, timeout=300)
    fresh = torch.load(out)

    for got, expected in zip(fresh["pages"] + fresh["queries"], in_memory_pages + in_memory_queries):
        assert got.dtype == torch.float16 and got.shape == expected.shape
        torch.testing.assert_close(got.float(), expected.float(), atol=2e-3, rtol=0)
    # the check can fail: the base model with its initial head gives other embeddings
    with trained.disable_adapter(), torch.no_grad():
        base_pages = encode_pages(trained, processor, pages[:1])
    assert (base_pages[0].float() - fresh["pages"][0].float()).abs().max() > 0.05


def test_pages_in_every_pil_mode_and_a_truncated_file(wrapper):
    modes = ["RGB", "RGBA", "P", "L", "CMYK", "I;16"]
    pages = [page_in_mode(mode) for mode in modes]
    embeddings = wrapper.encode(
        corpus_loader(pages, [f"doc-{m}" for m in modes]), task_metadata=TASK, hf_split="test", hf_subset="default"
    )
    tokens = wrapper.processor.n_image_tokens(pages[0].size)
    assert [tuple(e.shape) for e in embeddings] == [(tokens, 128)] * len(modes)
    reference = embeddings[0].float()
    for mode, embedding in zip(modes, embeddings):  # same page content in every mode: close to the RGB page
        similarity = torch.nn.functional.cosine_similarity(embedding.float(), reference, dim=-1).mean()
        assert similarity > (0.9 if mode in ("P", "CMYK") else 0.5), mode

    good = png_bytes(page_in_mode("RGB"))
    truncated = png_bytes(page_in_mode("RGB", (300, 420)))[:400]
    images = [{"bytes": good, "path": None}, {"bytes": truncated, "path": None}]
    with pytest.raises(ColinternError, match=r"page 'invoice-17'.*truncated"):
        wrapper.encode(
            corpus_loader(images, ["ok-1", "invoice-17"]), task_metadata=TASK, hf_split="test", hf_subset="default"
        )


def test_empty_queries_and_similarity(wrapper):
    queries = wrapper.encode(query_loader(["", "red header and a pie chart"]), task_metadata=TASK,
                             hf_split="test", hf_subset="default")  # fmt: skip
    pages = wrapper.encode(corpus_loader([page_in_mode("RGB")] * 3, ["a", "b", "c"]), task_metadata=TASK,
                           hf_split="test", hf_subset="default")  # fmt: skip
    scores = wrapper.similarity(queries, pages)
    assert scores.shape == (2, 3) and torch.isfinite(scores).all()
    pairwise = wrapper.similarity_pairwise(queries, pages[:2])
    torch.testing.assert_close(pairwise, torch.stack([scores[0, 0], scores[1, 1]]))
    stats = wrapper.throughput(TASK.name)
    assert stats["queries"] >= 2 and stats["pages"] >= 3 and stats["pages_per_s"] > 0


def test_model_meta_loads_the_same_checkpoint(wrapper):
    reloaded = wrapper.mteb_model_meta.load_model(device="cpu", show_progress=False)
    assert isinstance(reloaded, ColIntern3_5Wrapper)
    assert (reloaded.mteb_model_meta.name, reloaded.mteb_model_meta.revision) == (
        wrapper.mteb_model_meta.name,
        wrapper.mteb_model_meta.revision,
    )
    assert torch.equal(reloaded.mdl.custom_text_proj.weight, wrapper.mdl.custom_text_proj.weight)


def test_untrained_base_model_is_refused_unless_allowed(tiny_model_dir):
    with pytest.raises(ColinternError, match="base model.*--allow-untrained-head"):
        ColIntern3_5Wrapper(str(tiny_model_dir), device="cpu")
    baseline = ColIntern3_5Wrapper(str(tiny_model_dir), device="cpu", allow_untrained_head=True)
    assert baseline.mdl.head_is_untrained()
    assert json.loads(json.dumps(baseline.mteb_model_meta.to_dict(), default=str))["name"].startswith("colintern/")


def test_the_wrapper_attends_as_the_run_was_trained(tiny_adapter_dir, tmp_path):
    """An adapter of a `--attention bidirectional` run: its base model is causal, the run config says otherwise."""
    import shutil

    from colintern.utils import RUN_CONFIG_FILE

    run = tmp_path / "bidirectional-run"
    shutil.copytree(tiny_adapter_dir, run)
    (run / RUN_CONFIG_FILE).write_text(json.dumps({"model": {"attention": "bidirectional"}}))
    causal = ColIntern3_5Wrapper(str(tiny_adapter_dir), device="cpu", show_progress=False)
    bidirectional = ColIntern3_5Wrapper(str(run), device="cpu", show_progress=False)
    assert (causal.mdl.attention, bidirectional.mdl.attention) == ("causal", "bidirectional")
    queries = ["which page has a blue pie chart and a green star?"]
    a = encode_queries(causal.mdl, causal.processor, queries, batch_size=1)[0]
    b = encode_queries(bidirectional.mdl, bidirectional.processor, queries, batch_size=1)[0]
    assert float((a.float() - b.float()).abs().max()) > 1e-3  # same weights, another attention: other embeddings
