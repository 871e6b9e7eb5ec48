"""Peak training memory of ColIntern3.5 as a sum of named parts.

A training step (colpali-engine's ContrastiveTrainer) embeds a batch of B queries, then B pages, computes the in-batch
ColBERT InfoNCE loss and runs one backward through both, then the optimizer step. The memory model follows that
step tensor by tensor:

    static       frozen weights (their dtype), trainable weights, AdamW states (exp_avg, exp_avg_sq in the
                 parameter's dtype: 16 bytes/param for peft's fp32 LoRA weights with their gradients), and under
                 autocast the compute-dtype copies of the LoRA weights
    inputs       token ids, attention masks, float32 pixel values
    activations  what autograd saves for the backward pass, per token and per layer, for the language model on the
                 queries and on the pages (see `lm_layer_saved_bytes`); with gradient checkpointing only each layer's
                 input (2*s*b*h bytes in 16-bit, as Korthikanti et al. 2022, arXiv 2205.05198, "full recomputation")
    vision       a frozen vision tower runs under no_grad: no stored activations, only a transient working set
    loss         the MaxSim score tensor (B, B, Lq, Ld) that colpali-engine's ColbertLoss materialises
                 (`einsum("bnd,csd->bcns")`), kept for amax's backward, plus its mask and gradient there
    backward     the recomputed layer (gradient checkpointing) and activation gradients; parameter gradients
    headroom     CUDA caching-allocator fragmentation and the CUDA context (GPU only)

The peak is the largest of the step's moments (`PHASES`): the vision forward (query activations stored), the start of
the backward pass (all activations + the loss tensors), the backward through the last page layer, through a trainable
vision tower, through the queries (page activations freed, gradients accumulated), and the optimizer step. Autograd
runs the page branch first (its nodes are newer), so the query activations live until the end.

Validated against measured steps on the CPU (every tensor counted, `colintern.benchmarks.memory`): within -4% ... +9.4%
for the tiny model and for 1B-length pages (results/benchmarks/memory-cpu*.json); the GPU path
(`scripts/benchmark.py memory --full-size`) compares with torch.cuda.max_memory_allocated.

Why not the textbook s*b*h*34 bytes per layer: that figure (Korthikanti et al.) is for a GPT block with a 4h GELU MLP
trained in full 16-bit. A Qwen3 block differs (SwiGLU MLP, fp32 RMSNorm inputs, q/k norms, grouped KV heads), and
LoRA changes what is saved: frozen linears store nothing, while each peft LoRA branch stores its own copy of the
input (cast to the adapter's float32 unless autocast casts it back) and a dropout mask. `lm_layer_saved_bytes`
derives the saved tensors op by op; tests check it against autograd's saved tensors of a real layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
FINETUNING_MODES = ("lora", "full")
ATTENTION_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
# The CUDA context, cuBLAS/cuDNN workspaces and kernels live outside PyTorch's allocator (nvidia-smi shows them,
# torch.cuda.max_memory_allocated does not): about 0.5 GiB on an H100 with torch 2.x.
CUDA_CONTEXT_BYTES = int(0.5 * GIB)
# The caching allocator rounds blocks up and fragments: reserved memory runs some 5-15% above allocated at the peak.
ALLOCATOR_FRAGMENTATION = 0.10
# bytes per quantised language-model linear weight (bitsandbytes NF4 + double-quantised constants; LLM.int8)
QUANTIZED_BYTES_PER_WEIGHT: dict[str | None, float] = {None: 0.0, "4bit": 0.5 + 0.127 / 8, "8bit": 1.0}


@dataclass(frozen=True)
class TrainingMemorySetup:
    """Everything about a training step that changes its memory, besides the model.

    Args:
        per_device_batch_size: query-page pairs per device and micro-step (B).
        query_tokens: padded query length Lq ("Query: " + text + 10 augmentation tokens).
        page_tokens: padded page length Ld in the language model; None: the most the tile budget allows.
        tiles_per_page: tiles per page fed to the vision tower; None: the most the tile budget allows.
        finetuning: "lora" (LM linears + a trainable copy of the head; vision tower frozen, run under no_grad) or
            "full" (every parameter trainable, vision tower included: training from scratch).
        lora_rank: None: the architecture summary's rank.
        lora_dropout: peft LoRA dropout (colpali-engine recipes use 0.1); > 0 stores a mask per adapted input.
        dtype: weights and activations ("bfloat16", "float16", "float32").
        autocast: mixed precision as transformers' Trainer runs it (accelerate wraps forward in torch.autocast and
            converts the outputs to float32, so the loss runs in float32). Ignored for float32.
        gradient_checkpointing: recompute each layer in the backward pass; only layer inputs are stored.
        attn_implementation: "sdpa", "flash_attention_2" (no (s, s) tensors) or "eager" (stores attention weights).
        device: "cuda" or "cpu" (dropout keeps a 1-byte mask on CUDA, a full-precision one on the CPU; headroom).
        queries_padded / pages_padded: a padded batch gets a (B, 1, s, s) attention mask, and SDPA then repeats the
            grouped KV heads (transformers uses SDPA's native GQA only without a mask).
        optimizer: "adamw_fused" (as colintern's trainer and transformers' Trainer build it: no temporaries) or
            "adamw" (torch.optim.AdamW's default: the multi-tensor implementation on CUDA, whose step allocates a
            temporary the size of the trainable parameters; a loop over parameters on the CPU).
        quantize: None, "4bit" or "8bit" (QLoRA, `--quantize`): the language model's linear weights are stored in
            NF4 with double quantisation (0.5 bytes + 0.127 bits of constants per weight) or LLM.int8 (1 byte + a
            float32 scale per row); `prepare_model_for_kbit_training` casts every other frozen weight (embeddings,
            norms, vision tower, projector) to float32. Layers dequantise one weight at a time (a compute-dtype
            copy of the largest linear). LoRA only.
        world_size: data-parallel ranks. The trainer gathers every rank's pages as in-batch negatives, so each
            device scores its B queries against B * world_size pages.
        compact_pages: the trainer drops the prompt positions from page embeddings before the loss (MaxSim then runs
            over the image tokens only).
        cache_chunk_size: gradient cache (`--cache-chunk-size`, colintern.training.grad_cache): activations live for
            this many rows at a time, while the inputs, the loss (full B x B*world score tensor) and the batch's
            embeddings with their cached gradients stay per batch. None (or >= B): a plain step.
    """

    per_device_batch_size: int = 8
    query_tokens: int = 64
    page_tokens: int | None = None
    tiles_per_page: int | None = None
    finetuning: str = "lora"
    lora_rank: int | None = None
    lora_dropout: float = 0.1
    dtype: str = "bfloat16"
    autocast: bool = True
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    device: str = "cuda"
    queries_padded: bool = True
    pages_padded: bool = True
    optimizer: str = "adamw_fused"
    quantize: str | None = None
    world_size: int = 1
    compact_pages: bool = True
    cache_chunk_size: int | None = None

    def __post_init__(self):
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(set(DTYPE_BYTES))}, got {self.dtype!r}")
        if self.finetuning not in FINETUNING_MODES:
            raise ValueError(f"finetuning must be one of {FINETUNING_MODES}, got {self.finetuning!r}")
        if self.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {ATTENTION_IMPLEMENTATIONS}")
        if self.optimizer not in ("adamw", "adamw_fused"):
            raise ValueError(f"optimizer must be 'adamw' or 'adamw_fused', got {self.optimizer!r}")
        if self.quantize not in QUANTIZED_BYTES_PER_WEIGHT:
            raise ValueError(f"quantize must be None, '4bit' or '8bit', got {self.quantize!r}")
        if self.quantize and self.finetuning != "lora":
            raise ValueError("quantize needs finetuning='lora': quantized weights are not trained")
        if self.per_device_batch_size < 1 or self.query_tokens < 1 or self.world_size < 1:
            raise ValueError("per_device_batch_size, query_tokens and world_size must be at least 1")
        if self.cache_chunk_size is not None and self.cache_chunk_size < 1:
            raise ValueError("cache_chunk_size must be at least 1 (or None)")

    def replace(self, **changes) -> TrainingMemorySetup:
        return dataclasses.replace(self, **changes)

    @property
    def compute_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def uses_autocast(self) -> bool:
        return self.autocast and self.compute_bytes < 4


@dataclass(frozen=True)
class MemoryPart:
    """One named contribution to training memory, in bytes, and the moments of the step at which it is live."""

    name: str
    bytes: int
    phases: tuple[str, ...]
    note: str = ""

    @property
    def gib(self) -> float:
        return self.bytes / GIB


PHASES = {
    "vision": "vision forward of the pages (query activations stored)",
    "loss": "start of the backward pass (all activations + the MaxSim score tensor)",
    "backward": "backward through the last page layer",
    "vision_backward": "backward through a trainable vision tower",
    "late_backward": "backward through the queries (page activations freed, gradients accumulated)",
    "optimizer": "optimizer step",
}
HEADROOM = "allocator headroom + CUDA context"


@dataclass
class MemoryEstimate:
    """Peak training memory: `tensor_peak_bytes` is what `torch.cuda.max_memory_allocated` measures;
    `peak_bytes` adds allocator headroom and the CUDA context, i.e. what the GPU must hold."""

    setup: TrainingMemorySetup
    parts: list[MemoryPart]
    phase_bytes: dict[str, int]
    peak_phase: str
    tensor_peak_bytes: int
    headroom_bytes: int
    tokens: dict[str, int] = field(default_factory=dict)

    @property
    def peak_bytes(self) -> int:
        return self.tensor_peak_bytes + self.headroom_bytes

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def part(self, name: str) -> MemoryPart:
        return next(part for part in self.parts if part.name == name)

    def to_dict(self) -> dict:
        return {
            "setup": dataclasses.asdict(self.setup),
            "tokens": self.tokens,
            "parts_gib": {part.name: round(part.gib, 4) for part in self.parts},
            "peak_phase": self.peak_phase,
            "phase_gib": {phase: round(value / GIB, 4) for phase, value in self.phase_bytes.items()},
            "tensor_peak_gib": round(self.tensor_peak_bytes / GIB, 4),
            "headroom_gib": round(self.headroom_bytes / GIB, 4),
            "estimated_peak_gib": round(self.peak_gib, 4),
        }

    def format_table(self) -> str:
        """The breakdown as printed by the advisor: parts live at the peak, then the total."""
        width = max(len(part.name) for part in self.parts) + 2
        lines = [f"Peak at: {PHASES[self.peak_phase]}"]
        for part in self.parts:
            if part.bytes <= 0:
                continue
            live = self.peak_phase in part.phases
            marker = " " if live else "*"
            note = f"  ({part.note})" if part.note else ""
            lines.append(f" {marker}{part.name:<{width}}{part.gib:9.3f} GiB{note}")
        lines.append(f"  {'tensor peak (max_memory_allocated)':<{width}}{self.tensor_peak_bytes / GIB:9.3f} GiB")
        lines.append(f"  {'estimated peak':<{width}}{self.peak_gib:9.3f} GiB")
        if any(self.peak_phase not in p.phases and p.bytes > 0 for p in self.parts):
            lines.append("  * not live at the peak (shown for reference)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- saved tensors
class _Ledger:
    """Saved tensors by name, bytes per token; a tensor saved by several ops (shared storage) is counted once."""

    def __init__(self):
        self.items: dict[str, float] = {}

    def add(self, name: str, nbytes: float) -> None:
        self.items.setdefault(name, nbytes)

    def total(self) -> float:
        return sum(self.items.values())


def _lora_input(ledger: _Ledger, key: str, in_features: int, shared_name: str, setup: TrainingMemorySetup, rank: int):
    """What one peft LoRA branch `lora_B(lora_A(dropout(x))) * scaling` saves, per token.

    peft keeps LoRA weights in float32 (autocast_adapter_dtype) and casts x to float32 first. lora_A saves its input:
    the dropout output, or the (cast) x itself without dropout. Under autocast, F.linear casts that input back to the
    compute dtype, and the cast copy is what is saved. Dropout keeps its mask: 1 byte (CUDA's fused kernel) or a
    tensor of the input's dtype (the CPU kernel multiplies by a scaled noise tensor). lora_B saves lora_A's output.
    """
    c = setup.compute_bytes
    adapter_input_bytes = c if setup.uses_autocast else 4
    if setup.lora_dropout > 0:
        ledger.add(f"{key}.dropout_mask", in_features * (1 if setup.device == "cuda" else 4))
        ledger.add(f"{key}.lora_in", adapter_input_bytes * in_features)
    elif c < 4:
        ledger.add(f"{key}.lora_in", adapter_input_bytes * in_features)  # a private cast of the shared input
    else:
        ledger.add(shared_name, c * in_features)  # float32 throughout: lora_A saves the layer's own tensor
    ledger.add(f"{key}.lora_mid", adapter_input_bytes * rank)


def lm_layer_saved_bytes(
    text, setup: TrainingMemorySetup, seq_len: int, masked: bool, rank: int, input_requires_grad: bool = True
) -> float:
    """Bytes autograd saves per token in one Qwen3 decoder layer (transformers' Qwen3DecoderLayer), op by op.

    Args:
        text: `TextDims` (hidden h, q_dim, kv_dim, intermediate I, heads).
        seq_len: the padded sequence length s (eager attention stores (heads, s) weights per token; SDPA with a
            mask stores an (s, s) additive mask per sequence and layer).
        masked: the batch is padded, so attention gets a 4-D mask. SDPA then receives repeat_kv'ed keys/values
            (transformers uses SDPA's native GQA only without a mask), stored at q_dim, and converts the boolean
            mask to an additive one in every layer, which its backward keeps.
        rank: LoRA rank.
        input_requires_grad: False for the first layer under LoRA without checkpointing (frozen embeddings): ops
            on the input alone (input RMSNorm, the q/k/v dropouts) then save nothing.
    """
    c = setup.compute_bytes
    full = setup.finetuning == "full"
    h, qd, kvd, inter = text.hidden, text.q_dim, text.kv_dim, text.intermediate
    ledger = _Ledger()

    def linear_input(key: str, in_features: int, shared_name: str):
        if full:
            ledger.add(shared_name, c * in_features)  # a trainable weight needs its input for the weight gradient
        else:
            _lora_input(ledger, key, in_features, shared_name, setup, rank)  # a frozen base weight saves nothing

    def rms_norm(key: str, width: int, rows: int = 1):
        # Qwen3RMSNorm: x.to(float32) is saved by pow and mul (float32 copy, or x itself in float32), rsqrt saves
        # its float32 output (one per row); the normalised x (before the weight) only when the weight trains.
        ledger.add(f"{key}.x32", 4 * width)
        ledger.add(f"{key}.rsqrt", 4 * rows)
        if full:
            ledger.add(f"{key}.xn", c * width)

    if input_requires_grad:
        rms_norm("input_layernorm", h)
    for proj in ("q", "k", "v"):
        linear_input(proj, h, "attn_in")
    if not input_requires_grad:  # dropout of an input without gradient keeps no mask
        for proj in ("q", "k", "v"):
            ledger.items.pop(f"{proj}.dropout_mask", None)
    rms_norm("q_norm", qd, rows=text.heads)
    rms_norm("k_norm", kvd, rows=text.kv_heads)
    # RoPE's cos/sin are shared by all layers (counted once per forward, not here).
    sdpa = setup.attn_implementation == "sdpa"
    kv_stored = qd if ((masked and sdpa) or setup.attn_implementation == "eager") else kvd
    if masked and sdpa:
        ledger.add("attn_bias", c * seq_len)  # the (s, s) additive mask of a sequence, per token
    ledger.add("q_rot", c * qd)
    ledger.add("k_rot", c * kv_stored)
    ledger.add("v", c * kv_stored)
    if setup.attn_implementation == "eager":
        heads = text.heads
        ledger.add("attn_probs_fp32", 4 * heads * seq_len)  # softmax in float32, saved by its backward
        if c < 4:
            ledger.add("attn_probs", c * heads * seq_len)  # cast back, saved by the second matmul
        o_input = "o_in"  # eager's transpose().contiguous() is a new tensor
    else:
        ledger.add("attn_out", c * qd)  # flash/efficient kernels save their output (laid out as o_proj's input)
        ledger.add("attn_lse", 4 * text.heads)
        o_input = "attn_out"
    linear_input("o", qd, o_input)
    rms_norm("post_attention_layernorm", h)
    for proj in ("gate", "up"):
        linear_input(proj, h, "mlp_in")
    # SwiGLU: silu saves its input, the product saves both factors.
    ledger.add("gate_out", c * inter)
    ledger.add("silu_out", c * inter)
    ledger.add("up_out", c * inter)
    linear_input("down", inter, "down_in")
    return ledger.total()


def lm_model_saved_bytes(text, embedding_dim: int, setup: TrainingMemorySetup) -> float:
    """Bytes saved per token outside the decoder layers: final norm, projection head, normalisation, output mask.
    (RoPE's cos/sin tables are per position, shared by the batch and the layers: see `estimate_peak_memory`.)"""
    c = setup.compute_bytes
    out = 4 if setup.uses_autocast else c  # autocast: F.normalize's norm runs in float32, outputs are float32
    saved = 4 * text.hidden + c * text.hidden  # final RMSNorm (float32 input) + the head's input (the head trains)
    if setup.finetuning == "full":
        saved += c * text.hidden  # final norm weight
    saved += c * embedding_dim + out * embedding_dim  # head output (normalize), normalised embeddings (loss input)
    saved += c  # the attention-mask multiplier of the output
    return saved


def vision_layer_saved_bytes(vision, setup: TrainingMemorySetup) -> float:
    """Bytes saved per vision token in one trainable InternViT layer (full fine-tuning only)."""
    c = setup.compute_bytes
    hv, iv = vision.hidden, vision.intermediate
    ledger = _Ledger()
    # LayerNorm keeps mean and rstd per token: float32 on CUDA, the input's dtype on the CPU
    stat_bytes = 4 if (setup.device == "cuda" or c == 4) else c

    def rms_norm(key: str):  # as Qwen3's: float32 input, rsqrt per token, normalised input for the weight
        ledger.add(f"{key}.x32", 4 * hv)
        ledger.add(f"{key}.rsqrt", 4)
        ledger.add(f"{key}.xn", c * hv)

    for key in ("layernorm_before", "layernorm_after"):
        if vision.norm_type == "rms_norm":
            rms_norm(key)
        else:
            ledger.add(f"{key}.input", c * hv)
            ledger.add(f"{key}.stats", 2 * stat_bytes)
    ledger.add("attn_in", c * hv)  # layernorm_before output, shared by q/k/v
    if vision.use_qk_norm:
        rms_norm("q_norm")
        rms_norm("k_norm")
    for key in ("q", "k", "v", "attn_out"):
        ledger.add(key, c * hv)  # SDPA's inputs and output; the output is also projection_layer's input
    ledger.add("attn_lse", 4 * vision.heads)
    ledger.add("proj_out", c * hv)  # lambda_1 * x saves x
    ledger.add("mlp_in", c * hv)  # layernorm_after output
    ledger.add("fc1_out", c * iv)  # GELU input
    ledger.add("gelu_out", c * iv)  # fc2 input
    ledger.add("fc2_out", c * hv)  # lambda_2 * x saves x
    return ledger.total()


# ---------------------------------------------------------------------------------------------- the estimate
def _attention_mask_bytes(batch: int, seq_len: int, padded: bool, setup: TrainingMemorySetup) -> float:
    """The (B, 1, s, s) boolean mask of a padded batch, built once per forward (the per-layer additive copies SDPA
    makes are in `lm_layer_saved_bytes`)."""
    if not padded or setup.attn_implementation == "flash_attention_2":
        return 0.0
    return batch * seq_len * seq_len


def estimate_peak_memory(arch, setup: TrainingMemorySetup) -> MemoryEstimate:
    """Peak memory of one steady-state training step (AdamW states exist) of the model `arch` under `setup`.

    Args:
        arch: an `ArchitectureSummary` (colintern.tuning.advisor.analyze_architecture).
        setup: batch, sequence lengths, precision, checkpointing, fine-tuning mode.
    """
    text, vision = arch.text, arch.vision
    c = setup.compute_bytes
    b = setup.per_device_batch_size
    # rows whose activations live at once: the chunk under the gradient cache, else the batch
    ab = min(setup.cache_chunk_size or b, b)
    cached = ab < b
    full = setup.finetuning == "full"
    rank = setup.lora_rank or arch.lora_rank
    tiles = setup.tiles_per_page or arch.tiles_per_page
    lq = setup.query_tokens
    ld = setup.page_tokens or (tiles * arch.image_seq_length + arch.page_tokens - arch.image_tokens_per_page)
    tokens = {
        "query_tokens": b * lq,
        "page_tokens": b * ld,
        "vision_tokens": b * tiles * vision.tokens_per_tile,
        "tiles": b * tiles,
    }
    every_phase = tuple(PHASES)

    # -- static: weights and AdamW states (in the parameter's dtype, as torch.optim.AdamW keeps them). Whatever trains
    # keeps float32 master weights (colintern.training.trainer.upcast_trainable_parameters; peft upcasts LoRA itself).
    lora_params = arch.lora_params * rank // arch.lora_rank
    if full:
        frozen_params, trainable = 0, [(arch.total_params, 4)]
        embeddings = text.vocab * text.hidden
        layer_trainable = (arch.language_params - embeddings - text.hidden) // text.layers * 4
    else:
        frozen_params = arch.total_params  # the head's original stays beside peft's trainable copy
        trainable = [(lora_params, 4), (arch.head_params, 4)]
        layer_trainable = lora_params // text.layers * 4
    trainable_bytes = sum(n * nbytes for n, nbytes in trainable)
    frozen_bytes, frozen_note = frozen_params * c, setup.dtype
    dequantized = 0
    if setup.quantize:
        linear_shapes = [  # (out, in) of every LM linear, per layer
            (text.q_dim, text.hidden), (text.kv_dim, text.hidden), (text.kv_dim, text.hidden), (text.hidden, text.q_dim),
            (text.intermediate, text.hidden), (text.intermediate, text.hidden), (text.hidden, text.intermediate),
        ]
        quantized = text.layers * sum(o * i for o, i in linear_shapes)
        row_scales = text.layers * sum(o for o, _ in linear_shapes) * 4 if setup.quantize == "8bit" else 0
        frozen_bytes = quantized * QUANTIZED_BYTES_PER_WEIGHT[setup.quantize] + row_scales + (frozen_params - quantized) * 4
        frozen_note = f"{setup.quantize} LM linears, the rest float32"
        dequantized = max(o * i for o, i in linear_shapes) * c
    # a trainable vision tower's gradients appear during its backward, as its activations are released
    vision_gradients = (arch.vision_params + arch.projector_params) * 4 if full else 0
    head_bytes = arch.head_params * 4
    # Under autocast, each float32 trained weight is cast to the compute dtype once per forward; linear saves the copy.
    autocast_copies = ((arch.total_params if full else lora_params + arch.head_params) * c) if setup.uses_autocast else 0

    # -- inputs: ids and masks (int64), pixel values (float32 as the processor returns them)
    pixel_elements = b * tiles * 3 * vision.image_size**2
    inputs = 16 * b * (lq + ld) + 4 * pixel_elements

    # -- language-model activations
    first_layer_input_grad = full or setup.gradient_checkpointing  # checkpointing makes the embeddings require grad

    def lm_activations(seq_len: int, padded: bool) -> float:
        per_token = lm_model_saved_bytes(text, arch.embedding_dim, setup)
        if setup.gradient_checkpointing:
            per_token += text.layers * c * text.hidden  # each checkpointed layer keeps only its input
        else:
            per_token += (text.layers - 1) * lm_layer_saved_bytes(text, setup, seq_len, padded, rank)
            per_token += lm_layer_saved_bytes(text, setup, seq_len, padded, rank, first_layer_input_grad)
        rope_tables = 2 * c * text.head_dim * seq_len  # cos and sin per position, shared by batch and layers
        return ab * seq_len * per_token + rope_tables + _attention_mask_bytes(ab, seq_len, padded, setup)

    out_bytes = 4 if setup.uses_autocast else c
    query_activations = lm_activations(lq, setup.queries_padded)
    page_activations = lm_activations(ld, setup.pages_padded)
    # Pages scored in the loss: compacted to their image tokens; every rank's pages (all-gathered) as negatives.
    loss_page_tokens = tiles * arch.image_seq_length if setup.compact_pages else ld
    scored_pages = b * setup.world_size
    # The loss keeps the pages it scores (compacted: a new tensor, the model's output is then released), the other
    # ranks' gathered pages, and einsum's reshaped copy of all of them.
    embedding_bytes = out_bytes * arch.embedding_dim
    loss_inputs = embedding_bytes * loss_page_tokens * (2 * scored_pages - b + b * setup.compact_pages)
    cache_bytes = 0.0
    if cached:
        # pass 1 keeps every row's raw embeddings (queries, pages) as leaves, then their gradients for pass 2
        cache_bytes = 2 * embedding_bytes * b * (lq + ld)
    else:
        if setup.compact_pages:
            page_activations -= embedding_bytes * b * ld
        page_activations += loss_inputs
        loss_inputs = 0.0

    # -- vision tower
    vision_tokens = ab * tiles * vision.tokens_per_tile
    pixel_cast = c * ab * tiles * 3 * vision.image_size**2 if c < 4 else 0  # the patch embedding casts float32 pixels to the weights' dtype
    # Live at once in a layer's MLP: residual stream, LayerNorm output, the hidden state before and after GELU.
    vision_working_set = vision_tokens * c * (2 * vision.hidden + 2 * vision.intermediate)
    if full:
        if setup.gradient_checkpointing:
            per_vision_token = vision.layers * c * vision.hidden
        else:
            per_vision_token = vision.layers * vision_layer_saved_bytes(vision, setup)
        image_tokens = ab * tiles * arch.image_seq_length
        # pixel-shuffled features into the projector's LayerNorm, its output, linear_1's output (GELU), GELU's output
        projector = image_tokens * (c * (8 * vision.hidden + 2 * text.hidden) + 8)
        vision_activations = vision_tokens * per_vision_token + pixel_cast + projector
    else:
        vision_activations = 0.0
        vision_working_set += pixel_cast  # run under no_grad: nothing is kept

    # -- loss: ColbertLoss's (B, B * world, Lq, Ld) scores, saved for amax; amax's backward adds a bool mask and a
    # gradient of the same size.
    score_bytes = 4 if setup.uses_autocast else c
    loss = b * scored_pages * lq * loss_page_tokens * (2 * score_bytes + 1)

    # -- backward through a layer: on top of the activations still saved, the gradients of the layer's output and
    # input (2h) and of the SwiGLU's three hidden states (3I) - in float32 under LoRA, whose float32 branch promotes
    # the sum base + LoRA to float32; under checkpointing, plus the layer's recomputed activations.
    hidden_gradient_bytes = 4 if not full else c

    def backward_working_set(seq_len: int, padded: bool) -> float:
        working = ab * seq_len * (c * 2 * text.hidden + hidden_gradient_bytes * 3 * text.intermediate)
        if setup.gradient_checkpointing:
            working += ab * seq_len * lm_layer_saved_bytes(text, setup, seq_len, padded, rank)
        return working

    vision_backward = 0.0
    if full:  # the same for a trainable vision tower, after the page LM's backward
        vision_backward = vision_tokens * c * (vision.intermediate + 2 * vision.hidden)
        if setup.gradient_checkpointing:
            vision_backward += vision_tokens * vision_layer_saved_bytes(vision, setup)

    checkpointed = ", checkpointed" if setup.gradient_checkpointing else ""
    parts = [
        MemoryPart("frozen weights", frozen_bytes, every_phase, frozen_note),
        MemoryPart(
            "trainable weights", trainable_bytes, every_phase, "all parameters" if full else "LoRA float32 + head"
        ),
        MemoryPart("optimizer states (AdamW)", 2 * trainable_bytes, every_phase, "exp_avg + exp_avg_sq"),
        MemoryPart(
            "autocast weight copies",
            autocast_copies,
            ("vision", "loss", "backward", "vision_backward", "late_backward"),
        ),
        MemoryPart("input batch", inputs, every_phase, "ids, masks, float32 pixels"),
        MemoryPart(
            "LM activations: queries",
            query_activations,
            ("vision", "loss", "backward", "vision_backward", "late_backward"),
            f"{b} x {lq} tokens{checkpointed}",
        ),
        MemoryPart("LM activations: pages", page_activations, ("loss", "backward"), f"{b} x {ld} tokens{checkpointed}"),
        MemoryPart(
            "vision activations: pages",
            vision_activations,
            ("loss", "backward", "vision_backward"),
            f"the vision tower trains{checkpointed}",
        ),
        MemoryPart(
            "vision tower working set",
            vision_working_set,
            ("vision",),
            f"{ab * tiles} tiles" + ("" if full else ", no_grad"),
        ),
        MemoryPart(
            "gradient cache: embeddings + gradients",
            cache_bytes,
            tuple(phase for phase in PHASES if phase != "optimizer"),
            f"{b} rows, activations of {ab} at a time" if cached else "-",
        ),
        MemoryPart("loss inputs (cached pass)", loss_inputs, ("loss",), "compacted + gathered pages" if cached else "-"),
        MemoryPart(
            "MaxSim score tensor (loss)",
            loss,
            ("loss",),
            f"({b}, {scored_pages}, {lq}, {loss_page_tokens}) + mask + gradient",
        ),
        MemoryPart(
            "backward working set: pages",
            backward_working_set(ld, setup.pages_padded),
            ("backward",),
            "recomputed layer + gradients" if setup.gradient_checkpointing else "activation gradients",
        ),
        MemoryPart(
            "gradients: head + last layer",
            head_bytes + layer_trainable,
            ("backward", "vision_backward", "late_backward", "optimizer"),
        ),
        MemoryPart(
            "gradients: language model",
            max(trainable_bytes - head_bytes - layer_trainable - vision_gradients, 0),
            ("vision_backward", "late_backward", "optimizer"),
        ),
        MemoryPart("gradients: vision tower", vision_gradients, ("late_backward", "optimizer")),
        MemoryPart("backward working set: vision", vision_backward, ("vision_backward",)),
        MemoryPart("backward working set: queries", backward_working_set(lq, setup.queries_padded), ("late_backward",)),
        MemoryPart(
            "optimizer step temporaries",
            trainable_bytes if (setup.optimizer == "adamw" and setup.device == "cuda") else 0,
            ("optimizer",),
        ),
        MemoryPart(
            "dequantised weight",
            dequantized,
            tuple(phase for phase in PHASES if phase != "optimizer"),
            "largest LM linear" if dequantized else "-",
        ),
    ]
    parts = [dataclasses.replace(part, bytes=int(part.bytes)) for part in parts]
    phase_bytes = {phase: sum(part.bytes for part in parts if phase in part.phases) for phase in PHASES}
    peak_phase = max(phase_bytes, key=phase_bytes.get)
    tensor_peak = phase_bytes[peak_phase]
    headroom = int(ALLOCATOR_FRAGMENTATION * tensor_peak + CUDA_CONTEXT_BYTES) if setup.device == "cuda" else 0
    parts.append(MemoryPart(HEADROOM, headroom, every_phase, "10% + 0.5 GiB" if headroom else "none on the CPU"))
    return MemoryEstimate(
        setup=setup,
        parts=parts,
        phase_bytes=phase_bytes,
        peak_phase=peak_phase,
        tensor_peak_bytes=tensor_peak,
        headroom_bytes=headroom,
        tokens=tokens,
    )


def max_batch_size(arch, setup: TrainingMemorySetup, budget_bytes: int, limit: int = 1024) -> int:
    """The largest per-device batch whose estimated peak (headroom included) fits `budget_bytes`; 0 if none does.

    Peak memory grows with the batch (every part is non-decreasing in B), so a binary search is exact.
    """

    def fits(batch: int) -> bool:
        return estimate_peak_memory(arch, setup.replace(per_device_batch_size=batch)).peak_bytes <= budget_bytes

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
