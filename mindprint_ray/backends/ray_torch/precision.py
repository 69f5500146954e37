"""Whether a worker's device computes in bf16 natively, the half of the precision rule that needs torch (the spec's
half is trainer_args.mixed_bf16).

TRL's configs turn bf16 mixed precision on everywhere; on a CPU without bf16 instructions autocast emulates it,
slower than fp32, and on a GPU before Ampere transformers refuses it. So the worker trains bf16 where the device
has it: a CUDA GPU that supports bf16 without emulation, or a CPU with AVX512-BF16 or AMX tiles.
"""

from __future__ import annotations


def native_bf16(gpu: bool) -> bool:
    """True where bf16 matmuls run natively on the worker's device (CUDA GPU when `gpu`, else the CPU)."""
    import torch

    if gpu:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own CPUID probes
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def precision_name(bf16: bool) -> str:
    """The precision a topic records (summary.json topics[].precision)."""
    return "bf16 mixed" if bf16 else "fp32"
