"""ColIntern3.5 in mteb: a late-interaction encoder (`AbsEncoder`) and its `ModelMeta`.

    import mteb
    from mteb_wrappers.colintern3_5_models import ColIntern3_5Wrapper

    model = ColIntern3_5Wrapper("experiments/run/")            # adapter folder, full checkpoint or Hub id
    results = mteb.evaluate(model, mteb.get_benchmark("ViDoRe(v1)"), cache=mteb.ResultCache("results/mteb_evaluation"))

Pages are encoded in batches of equal tile count (no padding), queries in batches of equal token count; embeddings are
kept on the CPU in float16 as a ragged list of (tokens, 128) tensors and scored with `colintern.model.scoring.max_sim`.
Corpus rows that carry both a page image and its text (ViDoRe(v3.1), "t2it" tasks) are encoded by the `corpus_text`
mode: "ignore" embeds the page image alone; "prompt" places the text in the page prompt after the image and keeps the
text tokens' embeddings beside the image tokens' (at most `corpus_text_max_tokens` text tokens per page).
Each instance carries its own `mteb_model_meta` (name, content-hash revision, parameter count, training data), so
results land in `{cache}/results/{name}/{revision}/{Task}.json` and two different checkpoints never share a folder.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import OutputDType

from colintern.model.architecture import INTERNVL3_5_1B
from colintern.model.checkpoints import CheckpointInfo, check_trained_head, describe_checkpoint, training_datasets
from colintern.model.compression import (
    CompressionConfig,
    StorageStats,
    compress_pages,
    is_compressed,
    prepare_queries,
    score,
)
from colintern.model.encoding import encode_pages, encode_queries
from colintern.model.scoring import max_sim

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.types import Array, BatchedInput, PromptType
    from torch.utils.data import DataLoader

logger = logging.getLogger(__name__)

COLINTERN_CITATION = None  # no article yet; mteb asks to leave the citation out rather than cite a model card
CORPUS_TEXT_MODES = ("ignore", "prompt")
DEFAULT_CORPUS_TEXT_MAX_TOKENS = 1024


@dataclass
class EncodeStats:
    """Items encoded and seconds spent, for one (task, split, kind)."""

    items: int = 0
    seconds: float = 0.0

    @property
    def per_second(self) -> float | None:
        return self.items / self.seconds if self.seconds > 0 else None


class _DatasetColumn(Sequence):
    """A lazy, indexable view of one column of a `datasets.Dataset` (rows are read only when asked for)."""

    def __init__(self, dataset, column: str):
        self.dataset = dataset
        self.column = column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[int(index)][self.column]


class ColIntern3_5Wrapper(AbsEncoder):  # noqa: N801 - the model family's published name
    """mteb encoder for a ColIntern3.5 retriever.

    Args:
        model_path: an adapter folder (base + PEFT adapter, merged with `merge_and_unload`), a full checkpoint folder,
            a Hub id, or an `embedded:` alias.
        device: default CUDA when available, else CPU.
        dtype: default bf16 on GPUs that support it, float32 on the CPU.
        allow_untrained_head: evaluate a model whose projection head is untrained (refused by default: see
            `colintern.model.checkpoints.check_trained_head`).
        model_name: mteb model name for the result folder (default `colintern/<folder name>` or the Hub id).
        max_num_visual_tokens: override the processor's per-page visual-token budget.
        storage_dtype: dtype of the stored embeddings (float16: half the memory, ~1e-3 relative error).
        corpus_text: for corpus rows with an image and a text: "ignore" (the image alone) or "prompt" (the text in
            the page prompt after the image, its tokens embedded too).
        corpus_text_max_tokens: the text tokens kept per page in "prompt" mode.
        show_progress: progress bars while encoding.
        checkpoint: `describe_checkpoint(model_path)` when the caller has it already (saves hashing the weights).
        compression: pool, truncate and quantize page vectors and score them so (`colintern.model.compression`);
            the settings go to the ModelMeta's `experiment_kwargs`, so mteb files the results under
            `experiments/<settings>/` and records them in model_meta.json. Bytes per page: `storage(task)`.
        revision: accepted for mteb's loader protocol; a local checkpoint's revision is the hash of its files, a Hub
            model's the commit it was loaded from.
    """

    def __init__(
        self,
        model_path: str,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        *,
        allow_untrained_head: bool = False,
        model_name: str | None = None,
        max_num_visual_tokens: int | None = None,
        attn_implementation: str | None = None,
        storage_dtype: torch.dtype = torch.float16,
        show_progress: bool = True,
        checkpoint: CheckpointInfo | None = None,
        revision: str | None = None,
        corpus_text: str = "ignore",
        corpus_text_max_tokens: int = DEFAULT_CORPUS_TEXT_MAX_TOKENS,
        compression: CompressionConfig | None = None,
    ):
        from colintern.model.loading import default_device, load_retriever

        _check_corpus_text(corpus_text, corpus_text_max_tokens)

        info = checkpoint or describe_checkpoint(str(model_path), model_name=model_name)
        check_trained_head(None, info, allow_untrained_head=allow_untrained_head)  # from the files, before loading
        self.device = torch.device(device or default_device())
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        model, processor = load_retriever(
            str(model_path),
            device=self.device,
            dtype=dtype,
            attn_implementation=attn_implementation,
            merge=True,
            max_num_visual_tokens=max_num_visual_tokens,
        )
        check_trained_head(model, info, allow_untrained_head=allow_untrained_head)
        self._setup(model.eval(), processor, model_meta_for(model, info), storage_dtype, show_progress)
        self.checkpoint = info
        self.corpus_text, self.corpus_text_max_tokens = corpus_text, int(corpus_text_max_tokens)
        self.set_compression(compression)

    @classmethod
    def from_model(
        cls,
        model,
        processor,
        model_name: str = "colintern/in-memory",
        revision: str = "in-memory",
        storage_dtype: torch.dtype = torch.float16,
        show_progress: bool = False,
        corpus_text: str = "ignore",
        corpus_text_max_tokens: int = DEFAULT_CORPUS_TEXT_MAX_TOKENS,
    ) -> ColIntern3_5Wrapper:
        """Wrap a model already in memory, e.g. a PeftModel during training (adapters stay active, nothing is
        merged), to score a validation split. No head check: the caller knows what it trains."""
        wrapper = cls.__new__(cls)
        info = CheckpointInfo(str(model_name), "in-memory", None, None, model_name, revision)
        wrapper.device = next(model.parameters()).device
        _check_corpus_text(corpus_text, corpus_text_max_tokens)
        wrapper._setup(model, processor, model_meta_for(model, info), storage_dtype, show_progress)
        wrapper.checkpoint = info
        wrapper.corpus_text, wrapper.corpus_text_max_tokens = corpus_text, int(corpus_text_max_tokens)
        return wrapper

    def _setup(self, model, processor, meta: ModelMeta, storage_dtype: torch.dtype, show_progress: bool) -> None:
        self.mdl = model
        self.model = model
        self.processor = processor
        self.mteb_model_meta = meta
        self.storage_dtype = storage_dtype
        self.show_progress = show_progress
        self.encode_stats: dict[tuple[str, str, str], EncodeStats] = defaultdict(EncodeStats)
        self.compression: CompressionConfig | None = None
        self.storage_stats: dict[tuple[str, str], StorageStats] = defaultdict(StorageStats)

    def set_compression(self, compression: CompressionConfig | None) -> None:
        """Score with page vectors compressed as `compression` says (None or the identity: as encoded)."""
        self.compression = None if compression is None or compression.is_identity else compression
        kwargs = self.compression.experiment_kwargs() if self.compression else None
        self.mteb_model_meta = self.mteb_model_meta.model_copy(update={"experiment_kwargs": kwargs}, deep=True)

    # ------------------------------------------------------------------ mteb API
    def encode(
        self,
        inputs: DataLoader[BatchedInput],
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> Array:
        """Embed a corpus (an "image" column, and a "text" column on t2it tasks) or queries (a "text" column).

        Returns:
            a list of (tokens, dim) `storage_dtype` CPU tensors, in input order (pages: image tokens, then the text
            tokens in the "prompt" corpus-text mode; queries: every attended token).
        """
        dataset = inputs.dataset
        columns = set(getattr(dataset, "column_names", []) or [])
        batch_size = int(kwargs.get("batch_size") or inputs.batch_size or 16)
        progress = bool(kwargs.get("show_progress_bar", True)) and self.show_progress
        if "image" in columns and "text" in columns and prompt_type is not None and prompt_type.value == "query":
            raise ValueError(f"{task_metadata.name}: queries with an image are not supported by ColIntern3.5.")
        start = time.perf_counter()
        if "image" in columns:
            kind = "pages"
            ids = list(dataset["id"]) if "id" in columns else None
            texts = list(dataset["text"]) if "text" in columns and self.corpus_text == "prompt" else None
            embeddings = encode_pages(
                self.mdl,
                self.processor,
                _DatasetColumn(_undecoded(dataset), "image"),
                batch_size=batch_size,
                progress=progress,
                storage_dtype=self.storage_dtype,
                page_ids=ids,
                texts=texts,
                max_text_tokens=self.corpus_text_max_tokens,
            )
        elif "text" in columns:
            kind = "queries"
            embeddings = encode_queries(
                self.mdl,
                self.processor,
                list(dataset["text"]),
                batch_size=batch_size,
                progress=progress,
                storage_dtype=self.storage_dtype,
            )
        else:  # not a datasets.Dataset: collect the batches mteb's collate function built
            images, texts = [], []
            for batch in inputs:
                images.extend(batch.get("image") or [])
                texts.extend(batch.get("text") or [])
            if images and texts and len(images) != len(texts):
                raise ValueError(f"{task_metadata.name}: mixed text and image inputs are not supported.")
            kind = "pages" if images else "queries"
            if images:
                page_texts = texts if texts and self.corpus_text == "prompt" else None
                embeddings = encode_pages(
                    self.mdl, self.processor, images, batch_size, progress, self.storage_dtype,
                    texts=page_texts, max_text_tokens=self.corpus_text_max_tokens,
                )  # fmt: skip
            else:
                embeddings = encode_queries(self.mdl, self.processor, texts, batch_size, progress, self.storage_dtype)
        embeddings = self._compressed(embeddings, kind, task_metadata.name, hf_split)
        stats = self.encode_stats[(task_metadata.name, hf_split, kind)]
        stats.items += len(embeddings)
        stats.seconds += time.perf_counter() - start
        return embeddings

    def _compressed(self, embeddings: list[torch.Tensor], kind: str, task: str, split: str) -> list:
        """Pages compressed (and their bytes counted), queries cut to the pages' dimension."""
        if kind == "queries":
            return prepare_queries(embeddings, self.compression) if self.compression else embeddings
        if kind != "pages":
            return embeddings
        pages = compress_pages(embeddings, self.compression) if self.compression else embeddings
        self.storage_stats[(task, split)].add(embeddings, pages)
        return pages

    def similarity(self, embeddings1: Array, embeddings2: Array) -> torch.Tensor:
        """MaxSim of every query against every page: (n_queries, n_pages) float32."""
        if is_compressed(embeddings2):
            return score(_as_list(embeddings1), list(embeddings2), self.compression, device=self.device)
        return max_sim(_as_list(embeddings1), _as_list(embeddings2), device=self.device)

    def similarity_pairwise(self, embeddings1: Array, embeddings2: Array) -> torch.Tensor:
        """MaxSim of query i against page i: (n,) float32."""
        queries = _as_list(embeddings1)
        pages = list(embeddings2) if is_compressed(embeddings2) else _as_list(embeddings2)
        if len(queries) != len(pages):
            raise ValueError(f"{len(queries)} queries but {len(pages)} pages")
        return torch.stack([self.similarity([q], [p])[0, 0] for q, p in zip(queries, pages)])

    # ------------------------------------------------------------------ throughput and storage
    def storage(self, task_name: str) -> dict[str, Any]:
        """Bytes per page of `task_name`'s corpus as scored (all splits together), against the float16 baseline
        (vectors x dim x 2); see `colintern.model.compression.StorageStats`."""
        total = StorageStats()
        for (task, _split), stats in self.storage_stats.items():
            if task == task_name:
                for name in vars(total):
                    setattr(total, name, getattr(total, name) + getattr(stats, name))
        return {"compression": (self.compression or CompressionConfig()).to_dict(), **total.to_dict()}

    def throughput(self, task_name: str) -> dict[str, float | None]:
        """pages/s and queries/s measured while encoding `task_name` (all splits together)."""
        totals = {"pages": EncodeStats(), "queries": EncodeStats()}
        for (task, _split, kind), stats in self.encode_stats.items():
            if task == task_name:
                totals[kind].items += stats.items
                totals[kind].seconds += stats.seconds
        return {
            "pages": totals["pages"].items,
            "pages_per_s": totals["pages"].per_second,
            "queries": totals["queries"].items,
            "queries_per_s": totals["queries"].per_second,
        }


def load_colintern3_5(model_name: str, revision: str | None = None, model_path: str | None = None, **kwargs: Any):
    """The `ModelMeta.loader`: mteb calls it with the model name (and revision); `model_path` (in `loader_kwargs`)
    says where a local checkpoint lies, otherwise the name is a Hub id."""
    return ColIntern3_5Wrapper(model_path or model_name, model_name=model_name, **kwargs)


def _check_corpus_text(mode: str, max_tokens: int) -> None:
    if mode not in CORPUS_TEXT_MODES:
        raise ValueError(f"corpus_text must be one of {', '.join(CORPUS_TEXT_MODES)}, got {mode!r}")
    if int(max_tokens) < 1:
        raise ValueError(f"corpus_text_max_tokens must be at least 1, got {max_tokens}")


def _undecoded(dataset):
    """The dataset with its image column left as bytes/paths, so pages are decoded (and checked) one batch at a time."""
    import datasets

    feature = dataset.features.get("image")
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column("image", datasets.Image(decode=False))
    return dataset


def _as_list(embeddings) -> list[torch.Tensor]:
    if isinstance(embeddings, torch.Tensor):
        return list(embeddings.unbind(0)) if embeddings.ndim == 3 else [embeddings]
    return [torch.as_tensor(e) for e in embeddings]


# ---------------------------------------------------------------------------------------------------- metadata
# The released model: OpenGVLab/InternVL3_5-1B-HF + custom_text_proj (128), trained on vidore/colpali_train_set.
# Parameter counts of ColIntern3_5 built from the shipped InternVL3.5-1B config on the meta device
# (tests/evaluation/test_mteb_wrapper.py recomputes them): InternViT-300M 304,012,288 (with its q/k/v biases) +
# projector 5,253,120 + Qwen3-0.6B body 596,049,920 + head 131,200 = 905,446,528.
#   The published "1.06B" of InternVL3.5-1B includes its untied LM head (155,582,464), which a retriever drops.
COLINTERN3_5_1B_PARAMETERS = 905_446_528
COLINTERN3_5_1B_EMBEDDING_PARAMETERS = 155_582_464  # token embeddings, 151,936 x 1,024
MB = 1024**2

colintern3_5_1b = ModelMeta(
    loader=load_colintern3_5,
    loader_kwargs={},
    name="colintern/colintern3_5-1b",
    revision=None,
    release_date=None,
    languages=["eng-Latn"],
    n_parameters=COLINTERN3_5_1B_PARAMETERS,
    n_embedding_parameters=COLINTERN3_5_1B_EMBEDDING_PARAMETERS,
    memory_usage_mb=round(COLINTERN3_5_1B_PARAMETERS * 2 / MB),  # bf16 weights, as evaluated on GPU
    max_tokens=40_960,  # Qwen3 context; a page uses at most max_num_visual_tokens (1536 by default)
    embed_dim=128,
    license="apache-2.0",  # InternVL3.5 and Qwen3 are Apache-2.0
    open_weights=True,
    public_training_code=None,
    public_training_data="https://huggingface.co/datasets/vidore/colpali_train_set",
    framework=["PyTorch", "Transformers", "safetensors"],
    reference=f"https://huggingface.co/{INTERNVL3_5_1B}",
    similarity_fn_name=ScoringFunction.MAX_SIM,
    use_instructions=True,  # queries carry the "Query: " prefix and augmentation tokens
    training_datasets=None,  # set per checkpoint from its colintern_run.json (see model_meta_for)
    adapted_from=INTERNVL3_5_1B,
    citation=COLINTERN_CITATION,
    model_type=["late-interaction"],
    modalities=["image", "text"],
    output_dtypes=OutputDType.FLOAT16,
)


def _run_config_base(run_config: dict | None) -> str | None:
    """The base model a full checkpoint was trained from, as its colintern_run.json records it."""
    model = (run_config or {}).get("model")
    if isinstance(model, dict):
        model = model.get("name_or_path")
    return model if isinstance(model, str) else None


def model_meta_for(model, info: CheckpointInfo) -> ModelMeta:
    """`colintern3_5_1b` with the values of this checkpoint: name, revision, sizes, training data."""
    n_parameters = sum(p.numel() for p in model.parameters())
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    text_config = model.config.text_config
    base = info.base_model if info.kind == "adapter" else _run_config_base(info.run_config)
    return colintern3_5_1b.model_copy(
        update={
            "name": info.name,
            "revision": info.revision,
            "release_date": info.release_date(),
            "loader_kwargs": {"model_path": info.source},
            "n_parameters": n_parameters,
            "n_embedding_parameters": embeddings.weight.numel() if embeddings is not None else None,
            "memory_usage_mb": round(n_bytes / MB, 1),
            "max_tokens": getattr(text_config, "max_position_embeddings", None),
            "embed_dim": int(model.config.embedding_dim),
            "training_datasets": training_datasets(info),
            "adapted_from": base if isinstance(base, str) else None,
            "reference": f"https://huggingface.co/{info.source}" if info.kind == "hub" else None,
        },
        deep=True,
    )
