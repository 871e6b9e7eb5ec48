"""Merged export: base model + PEFT adapter -> one standalone ColIntern3_5 checkpoint that loads without peft.

The output folder holds `model.safetensors` + `config.json` (architectures: ColIntern3_5, embedding_dim), the
processor files, and a model card (README.md) with the training configuration and, when results exist, the
evaluation table. `ColIntern3_5.from_pretrained`, `load_retriever` and `ColIntern3_5Wrapper` load it directly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from colintern.utils import ADAPTER_CONFIG_FILE, RUN_CONFIG_FILE, ColinternError, prepare_output_dir, read_run_config

logger = logging.getLogger(__name__)


def merge_adapter(
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    base_model: str | None = None,
    dtype: torch.dtype | None = None,
    results: list[dict] | None = None,
    overwrite: bool = False,
) -> Path:
    """Merge the adapter into its base model and write a standalone checkpoint to `output_dir`.

    `output_dir` must be new or empty and outside the adapter and base model folders; with `overwrite`, a non-empty
    folder is used and only files an earlier merge_adapter wrote there are replaced (`colintern.utils.
    prepare_output_dir`). The files are built in a hidden folder inside it and moved into place once all are written.
    """
    from colintern.model.embedded import resolve_embedded
    from colintern.model.loading import AdapterInfo, is_adapter_dir, load_retriever

    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    if not is_adapter_dir(adapter_dir):
        raise ColinternError(f"{adapter_dir} is not a PEFT adapter folder (no {ADAPTER_CONFIG_FILE})")
    base = resolve_embedded(base_model or AdapterInfo.read(adapter_dir).base_model)
    output = prepare_output_dir(output_dir, command="merge_adapter", overwrite=overwrite,
                                inputs={"--adapter": adapter_dir, "--base-model": base})
    try:
        model, processor = load_retriever(str(adapter_dir), device="cpu", dtype=dtype or torch.float32, merge=True,
                                          base_model=base_model)
        if model.head_is_untrained():
            raise ColinternError(f"{adapter_dir}: the projection head is untrained; merging would export a useless model")
        model.config.architectures = ["ColIntern3_5"]
        run_config = read_run_config(adapter_dir)
        with output.staged() as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            processor.save_pretrained(tmp)
            (tmp / "README.md").write_text(model_card(adapter_dir, run_config, results))
            if run_config:
                (tmp / RUN_CONFIG_FILE).write_text(json.dumps(run_config, indent=2))
    except BaseException:
        output.discard_if_unused()
        raise
    logger.info("Merged %s into a standalone checkpoint at %s", adapter_dir, output_dir)
    return output_dir


def model_card(adapter_dir: Path, run_config: dict | None, results: list[dict] | None) -> str:
    """A Hugging Face model card: what the model is, how it was trained, how it scores, how to load it."""
    from colintern.model.loading import AdapterInfo

    base = AdapterInfo.read(adapter_dir).base_model
    lines = [
        "---",
        "library_name: colintern",
        "pipeline_tag: visual-document-retrieval",
        "tags: [colpali, late-interaction, internvl3_5, multi-vector]",
        f"base_model: {base}" if not str(base).startswith("embedded:") else "base_model: null",
        "---",
        "",
        f"# {adapter_dir.name} (ColIntern3.5, merged)",
        "",
        f"A ColPali-style multi-vector retriever: `{base}` with a 128-dim `custom_text_proj` head, fine-tuned with",
        "LoRA on the language model and merged into standalone weights (no peft needed to load it).",
        "",
        "```python",
        "from colintern import load_retriever",
        'model, processor = load_retriever("path/to/this/folder")',
        "```",
        "",
    ]
    if run_config:
        from colintern.training.arguments import upgrade_training_keys

        training, lora = upgrade_training_keys(run_config.get("training", {})), run_config.get("lora", {})
        data = run_config.get("data", {})
        lines += [
            "## Training",
            "",
            "| setting | value |",
            "|---|---|",
            f"| data | {data.get('dataset')} |",
            f"| epochs / max steps | {training.get('num_train_epochs')} / {training.get('max_steps')} |",
            f"| batch x accumulation | {training.get('per_device_train_batch_size')} x "
            f"{training.get('gradient_accumulation_steps')} |",
            f"| learning rate | {training.get('learning_rate')} (warm-up {training.get('warmup_steps')}, "
            f"{training.get('lr_scheduler_type')}) |",
            f"| LoRA | r={lora.get('rank')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')} |",
            f"| loss | {training.get('loss')} |",
            "",
        ]
    if results:
        lines += ["## Evaluation", "", "| task | NDCG@5 | NDCG@10 | Recall@100 |", "|---|---|---|---|"]
        for row in results:
            lines.append(
                f"| {row['task']} | {row.get('ndcg_at_5', float('nan')):.4f} | {row.get('ndcg_at_10', float('nan')):.4f}"
                f" | {row.get('recall_at_100', float('nan')):.4f} |"
            )
        lines.append("")
    return "\n".join(lines)
