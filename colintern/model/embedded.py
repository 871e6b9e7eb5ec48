"""The embedded default: a tiny InternVL-architecture checkpoint and the SynthDocs corpus, built locally.

Nothing here downloads anything. The checkpoint is saved with `save_pretrained` in the Hub's layout
(`InternVLForConditionalGeneration` weights with `model.`-prefixed keys, a Qwen2 tokenizer, `InternVLProcessor`
with `GotOcr2ImageProcessor`), so it loads through exactly the `from_pretrained` path of OpenGVLab/InternVL3_5-1B-HF.

Aliases understood wherever a model or dataset path is expected:
    embedded:tiny-internvl3_5   the tiny base checkpoint (random weights, seed 0)
    embedded:synthdocs          the SynthDocs corpus (seed 0); embedded:synthdocs-a / -b its two domains
Those are built on first use under `$COLINTERN_HOME` (default ~/.cache/colintern) and reused afterwards.
    embedded:tiny-internvl3_5-pretrained   the tiny model trained on SynthDocs domain A, shipped in the package
                                           (colintern/embedded/README.md says how it was made)
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from colintern.data.synthdocs import DOMAIN_DATASETS, EMBEDDED_DATASET, is_embedded_dataset, resolve_dataset
from colintern.utils import ColinternError, atomic_directory, cache_dir, file_lock, manifest_matches

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:tiny-internvl3_5"
# The tiny model trained in full on SynthDocs domain A (package data; how it was made: its colintern_embedded.json)
PRETRAINED_MODEL = "embedded:tiny-internvl3_5-pretrained"
PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "embedded" / "tiny-internvl3_5-pretrained"
IMAGE_SPECIAL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
BUILD_FORMAT_VERSION = 3  # bump when what `build_tiny_checkpoint` writes changes


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the embedded checkpoint: ~1M parameters, measured to learn SynthDocs in minutes on 2 CPU cores.

    A 128px tile, 16px patches: 8 x 8 patches, pixel shuffle 0.5 -> 16 image tokens per tile.
    """

    seed: int = 0
    image_size: int = 128
    patch_size: int = 16
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    intermediate_factor: int = 2
    tokenizer_vocab_size: int = 640
    max_num_visual_tokens: int = 16  # one tile per page

    @property
    def image_seq_length(self) -> int:
        return (self.image_size // self.patch_size) ** 2 // 4


def _tokenizer_training_text() -> list[str]:
    """Words the demo's queries and prompts use, so that each becomes one token (bytes cover everything else)."""
    from colintern.data import synthdocs

    words = set()
    for phrase in [*synthdocs.COLOURS, *synthdocs.SHAPES, *synthdocs.CHARTS, *synthdocs.DOC_WORDS]:
        words.update(phrase.split())
    for template in synthdocs.QUERY_TEMPLATES:
        words.update(w.strip("{},?") for w in template.split() if not w.startswith("{"))
    words.update("Query: query Describe the image user page document".split())
    words.discard("")
    words = sorted(words)
    return [w for w in words for _ in range(30)] + [" " + w for w in words for _ in range(30)]


def build_tiny_tokenizer(vocab_size: int = 640):
    """A byte-level BPE tokenizer trained in memory, wrapped as the Qwen2 tokenizer InternVL3.5 uses."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", *CHAT_TOKENS, *IMAGE_SPECIAL_TOKENS.values()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tokenizer_training_text(), trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = {token: index for token, index in model["vocab"].items() if token not in specials}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, extra_special_tokens=dict(IMAGE_SPECIAL_TOKENS))
    tokenizer.add_tokens(CHAT_TOKENS, special_tokens=True)
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_internvl_config(spec: TinyModelConfig, vocab_size: int, image_token_id: int, pad_token_id: int | None = None):
    from transformers import Qwen3Config
    from transformers.models.internvl import InternVLConfig, InternVLVisionConfig

    vision = InternVLVisionConfig(
        hidden_size=spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        intermediate_size=spec.vision_hidden * spec.intermediate_factor,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        norm_type="layer_norm",
        use_mean_pooling=True,
    )
    text = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_hidden * spec.intermediate_factor,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        head_dim=spec.text_hidden // spec.text_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=pad_token_id,
        eos_token_id=pad_token_id,
        pad_token_id=pad_token_id,
    )
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=spec.image_seq_length,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )


def build_tiny_checkpoint(output_dir: str | Path, spec: TinyModelConfig = TinyModelConfig()) -> Path:
    """Write the tiny base checkpoint (random weights from `spec.seed`) in the Hub's InternVL layout."""
    import torch
    from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor
    from transformers.models.internvl import InternVLForConditionalGeneration
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    from colintern.model.processing import ColIntern3_5Processor

    output_dir = Path(output_dir)
    tokenizer = build_tiny_tokenizer(spec.tokenizer_vocab_size)
    config = tiny_internvl_config(spec, len(tokenizer), tokenizer.context_image_token_id, tokenizer.pad_token_id)
    tile = {"height": spec.image_size, "width": spec.image_size}
    # Saved as InternVLProcessor's files plus the model's visual-token budget (one tile: the tiny model was made
    # for it); InternVLProcessor.from_pretrained reads the same folder.
    processor = ColIntern3_5Processor(
        image_processor=GotOcr2ImageProcessor(size=tile, crop_to_patches=True, max_patches=12),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size=tile),
        image_seq_length=spec.image_seq_length,
        max_num_visual_tokens=spec.max_num_visual_tokens,
    )
    # Seeded in a fork of the RNG: building the checkpoint on first use must not change the random stream of the run
    # that asked for it (a seeded run would otherwise start differently the first time).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = InternVLForConditionalGeneration(config).eval()
    with atomic_directory(output_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        manifest = {"name": "tiny-internvl3_5", "format_version": BUILD_FORMAT_VERSION, "spec": asdict(spec)}
        (tmp / "colintern_embedded.json").write_text(json.dumps(manifest, indent=2))
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("Built tiny InternVL checkpoint (%.2fM parameters) in %s", n_params / 1e6, output_dir)
    return output_dir


def _expected_model_manifest() -> dict:
    return {"format_version": BUILD_FORMAT_VERSION, "spec": asdict(TinyModelConfig())}


def ensure_embedded_model(root: str | Path | None = None) -> Path:
    """Path of the embedded checkpoint, building it on first use (safe under concurrent callers)."""
    path = Path(root or cache_dir()) / "tiny-internvl3_5"
    if manifest_matches(path, "colintern_embedded.json", _expected_model_manifest()):
        return path
    with file_lock(path.parent / ".tiny-internvl3_5.lock"):
        if not manifest_matches(path, "colintern_embedded.json", _expected_model_manifest()):
            build_tiny_checkpoint(path)
    return path


PRETRAINED_MANIFEST = "colintern_pretrained.json"
# what a finished full-training run folder holds that a checkpoint needs (weights, config, processor); the rest
# (trainer state, optimizer, checkpoints) stays in the run folder
_CHECKPOINT_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt")
_RUN_ONLY_FILES = {"trainer_state.json", "all_results.json", "train_results.json", "eval_results.json",
                   "colintern_run.json", "data_report.json"}


def install_pretrained(run_dir: str | Path, output_dir: str | Path, manifest: dict) -> Path:
    """Copy a finished full-training run's checkpoint files (not its trainer state) into `output_dir`, atomically,
    with `manifest` (how it was made, its held-out scores) as PRETRAINED_MANIFEST."""
    import shutil

    run_dir = Path(run_dir)
    if not (run_dir / "model.safetensors").is_file():
        raise ColinternError(f"{run_dir} holds no finished full-training run (no model.safetensors).")
    with atomic_directory(output_dir) as tmp:
        for item in sorted(run_dir.iterdir()):
            run_only = item.name in _RUN_ONLY_FILES or item.name.startswith("data_report")
            if item.is_file() and item.suffix in _CHECKPOINT_SUFFIXES and not run_only:
                shutil.copy2(item, tmp / item.name)
        (tmp / PRETRAINED_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(output_dir)


def pretrained_model_path() -> Path:
    """The shipped pretrained backbone (a checkpoint folder inside the package, read in place)."""
    if not (PRETRAINED_DIR / "model.safetensors").is_file():
        raise ColinternError(
            f"{PRETRAINED_MODEL} is missing from this installation ({PRETRAINED_DIR}); rebuild it with "
            "`python scripts/build_pretrained.py` (see colintern/embedded/README.md)."
        )
    return PRETRAINED_DIR


def resolve_embedded(name_or_path: str) -> str:
    """Turn an `embedded:` alias (model or dataset) into a local path, building it if needed; others pass through."""
    if name_or_path == EMBEDDED_MODEL:
        return str(ensure_embedded_model())
    if name_or_path == PRETRAINED_MODEL:
        return str(pretrained_model_path())
    if name_or_path.startswith("embedded:") and not is_embedded_dataset(name_or_path):
        known = ", ".join([EMBEDDED_MODEL, PRETRAINED_MODEL, EMBEDDED_DATASET, *DOMAIN_DATASETS])
        raise ValueError(f"Unknown embedded asset {name_or_path!r}; known: {known}")
    return resolve_dataset(name_or_path)
