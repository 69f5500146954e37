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
# The log-probs at the loss. On the Ray backend no (tokens x vocab) logits ever exist: TRL 1.16's SFTTrainer and
# DPOTrainer both project the last hidden states through the lm_head tile by tile (trl.trainer.utils
# add_fused_lm_head, trl.kernels.ChunkedLogProbFunction: an online log-sum-exp over vocabulary tiles, the backward
# recomputing each tile). On CUDA its Triton kernels work in place on one tile of TRL's size in the compute dtype.
TRL_TOKEN_TILE = 4096  # tokens per tile, trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE (tests check it)
TRL_VOCAB_TILE = 32768  # vocabulary columns per tile, trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
# Off Triton (CPU), TRL folds a tile with torch ops that hold several fp32 copies of it: at TRL's size that is more
# than the full logits (docs/benchmarks.md). The worker's trainers (backends/ray_torch/chunked_logprobs.py) feed
# TRL's kernel smaller tiles there: CPU_TOKEN_TILE tokens x CPU_VOCAB_TILE columns, 64 MiB in fp32. Not smaller:
# glibc serves buffers of up to 32 MiB from its heap, and with such tiles the measured peak grew with the number
# of tiles (21-22 tile sizes instead of ~9); larger ones are mapped and returned whole.
CPU_TOKEN_TILE = 1024
CPU_VOCAB_TILE = 16384
# fp32 tile-sized buffers alive at the peak of TRL's torch fold, its backward (trl/kernels/chunked_logprob.py
# _backward_tile): the projection, y, z, log p, p, the gradient and two temporaries of its update, plus a boolean
# mask (a quarter): 8.25, rounded up
CPU_TILE_COPIES = 9
# MLX (local_mlx/losses.py): the logits of LOGITS_CHUNK positions at a time, each chunk checkpointed (its backward
# recomputes them), so one chunk's logits are held: 16-bit, an fp32 upcast for the loss and its fp32 gradient.
MLX_LOGITS_CHUNK = 128  # local_mlx.losses.LOGITS_CHUNK (tests check it)
LOGIT_EXTRA_BYTES = 8  # the fp32 upcast for the loss plus its fp32 gradient, per logit element

TERMS = {
    "base_weights": "Frozen base model. NF4 with double quant stores 0.516 B/param for the decoder's linear weights; "
    "embeddings, lm_head, norms and biases stay 16-bit. BF16 stores 2 B/param. MLX 4-bit stores 4.5 bits/param "
    "and quantizes the embeddings too. Sharded across devices (every device of every node) only under ZeRO-3.",
    "lora_weights": "The LoRA A/B matrices of every zone, kept in fp32 (4 B/param); in DPO against the sft "
    "reference also TRL's frozen copy of them, unless the reference log-probs are precomputed (the copy is freed "
    "once they are; with precompute auto it is counted, as a topic whose pairs are not revisited keeps it).",
    "gradients": "fp32 gradients of the LoRA parameters (sharded under ZeRO-2/3).",
    "optimizer": "AdamW's two fp32 moments per LoRA parameter, 8 B/param (sharded under ZeRO-2/3).",
    "activations": "With gradient checkpointing: one saved hidden state per layer (b*s*H), one layer's recomputed "
    "working set (attention in/out, q/k/v, MLP gate/up/act), the NF4 dequantization buffer of the largest weight, "
    "and the log-probs at the loss: on Ray, TRL's fused lm_head never holds the tokens x vocab logits, only one "
    "tile of them (4,096 tokens x 32,768 vocab in the compute dtype on GPUs; on CPU 9 fp32 copies of a 1,024 x "
    "16,384 tile) plus the hidden states and their fp32 gradient; on MLX the logits of one checkpointed chunk of "
    "128 positions (16-bit, an fp32 copy and its gradient). DPO runs chosen and rejected in one batch (2x "
    "sequences).",
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
    reference_adapter: bool = False  # DPO keeps TRL's frozen fp32 copy of the adapter (the sft reference)
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
    return saved + dequant + logits_bytes(arch, m)


def logits_bytes(arch: ModelArch, m: MemoryInputs) -> float:
    """Peak bytes of the log-probs at the loss of one micro-batch, as each backend computes them."""
    tokens = m.micro_batch * m.sequences_per_example * m.seq_len
    if m.backend == "mlx":  # one chunk of positions of every row: 16-bit logits, an fp32 copy and its gradient
        rows = m.micro_batch * m.sequences_per_example
        chunk = rows * min(m.seq_len, MLX_LOGITS_CHUNK) * arch.vocab_size * (m.activation_bytes + LOGIT_EXTRA_BYTES)
        return chunk + tokens * arch.hidden_size * (m.activation_bytes + 4)
    if m.is_gpu:  # TRL's Triton kernels, in place on one tile in the compute dtype
        tile = min(tokens, TRL_TOKEN_TILE) * min(arch.vocab_size, TRL_VOCAB_TILE) * m.activation_bytes
    else:  # TRL's torch fold on the worker's smaller tiles
        tile = CPU_TILE_COPIES * min(tokens, CPU_TOKEN_TILE) * min(arch.vocab_size, CPU_VOCAB_TILE) * 4
    # plus the hidden states fed to the head (a copy in the compute dtype) and their fp32 gradient
    return tile + tokens * arch.hidden_size * (m.activation_bytes + 4)


def estimate_memory(arch: ModelArch, m: MemoryInputs, double_quant: bool = True) -> MemoryBudget:
    """Per-device memory for one training step of SFT (or DPO with sequences_per_example=2)."""
    shard_weights = m.devices if m.zero_stage >= 3 else 1
    shard_states = m.devices if m.zero_stage >= 2 else 1
    base = base_weight_bytes(arch, m.quant, m.backend, double_quant) / shard_weights
    lora = 4.0 * m.trainable_params * (2 if m.reference_adapter else 1)
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
