"""Per-device training memory: model states counted exactly, activations and overhead from stated formulas.

All figures are decimal GB (1e9 bytes). Every term is explained in TERMS (the report prints them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mindprint_ray.planning.registry import ModelArch

GB = 1e9
# bitsandbytes NF4 with double quant: 4-bit codes, an 8-bit absmax per 64 weights, and an fp32 absmax
# (plus offset) per 256 first-level blocks.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
NF4_SINGLE_QUANT_BYTES_PER_PARAM = 0.5 + 4 / 64
MLX_4BIT_BYTES_PER_PARAM = 4.5 / 8  # affine 4-bit, group 64, 16-bit scale and bias per group
# Max RSS of a CPU Ray Train worker with torch, transformers, TRL and PEFT loaded, at the first step of a
# tiny-model run (measured 0.758 GB with a model of a few MB; see docs/estimates.md).
CPU_RUNTIME_BYTES = 0.75 * GB
LOGIT_EXTRA_BYTES = 8  # fp32 upcast for the loss plus its fp32 gradient, per logit element

TERMS = {
    "base_weights": "Frozen base model. NF4 with double quant stores 0.516 B/param for the decoder's linear weights; "
    "embeddings, lm_head, norms and biases stay 16-bit. BF16 stores 2 B/param. MLX 4-bit stores 4.5 bits/param "
    "and quantizes the embeddings too. Sharded across devices (every device of every node) only under ZeRO-3.",
    "lora_weights": "The LoRA A/B matrices of every zone, kept in fp32 (4 B/param).",
    "gradients": "fp32 gradients of the LoRA parameters (sharded under ZeRO-2/3).",
    "optimizer": "AdamW's two fp32 moments per LoRA parameter, 8 B/param (sharded under ZeRO-2/3).",
    "activations": "With gradient checkpointing: one saved hidden state per layer (b*s*H), one layer's recomputed "
    "working set (attention in/out, q/k/v, MLP gate/up/act), the NF4 dequantization buffer of the largest weight, "
    "and the logits over the vocabulary (16-bit logits plus an fp32 copy and its gradient). DPO runs chosen and "
    "rejected in one batch (2x sequences).",
    "overhead": "Framework overhead: CUDA context, cuBLAS workspace and NCCL buffers (~1.5 GB) plus 5% allocator "
    "fragmentation on GPUs; on CPU the whole process's runtime (Python, torch, transformers, TRL: 0.75 GB "
    "measured); the Metal runtime on a Mac.",
}


@dataclass(frozen=True)
class MemoryInputs:
    quant: str  # "nf4" or "bf16"
    backend: str  # "ray" or "mlx"
    trainable_params: int
    seq_len: int
    micro_batch: int
    gradient_checkpointing: bool
    zero_stage: int
    devices: int  # the workers that shard under ZeRO: every device of every node the run trains on
    is_gpu: bool
    sequences_per_example: int = 1  # 2 for DPO (chosen + rejected)
    activation_bytes: int = 2  # 2 for bf16 autocast, 4 for fp32 (CPU)


@dataclass(frozen=True)
class MemoryBudget:
    base_weights: float
    lora_weights: float
    optimizer: float
    gradients: float
    activations: float
    overhead: float

    @property
    def total(self) -> float:
        return (
            self.base_weights + self.lora_weights + self.optimizer + self.gradients + self.activations + self.overhead
        )

    def as_dict(self, digits: int = 3) -> dict:
        d = {k: round(v, digits) for k, v in asdict(self).items()}
        d["total"] = round(self.total, digits)
        return d


def base_weight_bytes(arch: ModelArch, quant: str, backend: str = "ray", double_quant: bool = True) -> float:
    """Bytes of the frozen base model as stored for training."""
    if quant in ("bf16", "fp32"):
        return (2.0 if quant == "bf16" else 4.0) * arch.total_params()
    if backend == "mlx":
        quantized = arch.linear_params() + arch.embedding_params()
        return MLX_4BIT_BYTES_PER_PARAM * quantized + 2.0 * (arch.total_params() - quantized)
    per_param = NF4_BYTES_PER_PARAM if double_quant else NF4_SINGLE_QUANT_BYTES_PER_PARAM
    return per_param * arch.linear_params() + 2.0 * arch.other_params()


def activation_bytes(arch: ModelArch, m: MemoryInputs) -> float:
    """Peak activation memory of one micro-batch (forward saved tensors plus the logits at the loss)."""
    a = m.activation_bytes
    tokens = m.micro_batch * m.sequences_per_example * m.seq_len
    h, kv = arch.hidden_size, arch.num_kv_heads * arch.head_dim
    q = arch.num_heads * arch.head_dim
    layer_working_set = tokens * a * (4 * h + 2 * q + 2 * kv + 3 * arch.intermediate_size)
    if m.gradient_checkpointing:
        saved = arch.num_layers * tokens * h * a + layer_working_set
    else:
        saved = arch.num_layers * layer_working_set
    dequant = (
        max(i * o for i, o in map(arch.module_shape, ("q_proj", "up_proj", "down_proj"))) * 2 if m.quant == "nf4" else 0
    )
    logits = tokens * arch.vocab_size * (a + LOGIT_EXTRA_BYTES)
    return saved + dequant + logits


def estimate_memory(arch: ModelArch, m: MemoryInputs, double_quant: bool = True) -> MemoryBudget:
    """Per-device memory for one training step of SFT (or DPO with sequences_per_example=2)."""
    shard_weights = m.devices if m.zero_stage >= 3 else 1
    shard_states = m.devices if m.zero_stage >= 2 else 1
    base = base_weight_bytes(arch, m.quant, m.backend, double_quant) / shard_weights
    lora = 4.0 * m.trainable_params
    grads = 4.0 * m.trainable_params / shard_states
    optim = 8.0 * m.trainable_params / shard_states
    acts = activation_bytes(arch, m)
    if m.backend == "mlx":
        overhead = 0.5 * GB
    elif m.is_gpu:
        overhead = 1.5 * GB + 0.05 * (base + lora + grads + optim + acts)
    else:
        overhead = CPU_RUNTIME_BYTES
    return MemoryBudget(*(x / GB for x in (base, lora, optim, grads, acts, overhead)))
