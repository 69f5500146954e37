"""The benchmarks run: `bench/gpu_step.py --smoke` (tiny shapes on CPU, FLOPs accounting checked), a quick
`bench/packing.py`, and `bench/ray_overhead.py --help`. Behaviour only, never speed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADER = "| model | layers | quant | attn | stage | batch | ckpt | seq | step s | tok/s | TFLOP/s | MFU % | pad % |"


def run_bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def table_rows(out: str, header: str) -> list[list[str]]:
    """The body rows of the last Markdown table that starts with `header`."""
    lines = out.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.fixture(scope="module")
def smoke() -> subprocess.CompletedProcess:
    return run_bench("bench/gpu_step.py", "--smoke")


@pytest.mark.slow
def test_gpu_step_smoke_runs_every_case(smoke):
    assert smoke.returncode == 0, smoke.stdout[-3000:] + smoke.stderr[-3000:]
    assert "SMOKE OK: 7 cases" in smoke.stdout
    rows = table_rows(smoke.stdout, HEADER)
    stages = {(r[2], r[4], r[6]) for r in rows}
    assert {("fp32", s, g) for s in ("sft-packed", "sft-padded", "dpo") for g in ("on", "off")} <= stages
    assert ("nf4", "sft-packed", "on") in stages
    for r in rows:
        assert r[-1] == "ok"
        assert float(r[9].replace(",", "")) > 0 and float(r[10].replace(",", "")) > 0  # tok/s, TFLOP/s
        assert r[11] == "-"  # no MFU without a known peak (CPU)
        assert float(r[14]) > 0  # the memory estimate is there
    packed = [r for r in rows if r[4] == "sft-packed"]
    assert all(float(r[12]) == 0 for r in packed)  # padding-free packing: no pad tokens


@pytest.mark.slow
def test_gpu_step_smoke_checks_the_flops_accounting(smoke):
    checks = [line for line in smoke.stdout.splitlines() if line.startswith("ACCOUNTING OK:")]
    assert len(checks) == 7
    n = re.search(r"live model = registry = (\d+)", smoke.stdout)
    assert n and int(n.group(1)) > 0
    forward = re.search(r"forward FLOPs counted by torch (\d+) = .* (\d+)$", smoke.stdout, re.M)
    assert forward and forward.group(1) == forward.group(2)
    assert sum("= time_model" in line for line in checks) == 4


def test_flops_accounting_by_hand():
    """72B, 4096 tokens, checkpointing on: 6N + 4 x attention, with N from the registry's exact shapes."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_step

    from mindprint_ray.planning.registry import get_arch
    from mindprint_ray.planning.zones import build_plan

    arch = get_arch("qwen2.5-72b")
    trainable = build_plan(arch, "conservative").trainable_params()
    n = arch.linear_params() + arch.vocab_size * arch.hidden_size + trainable
    attention = 2 * 80 * 64 * 128 * 4096
    assert gpu_step.flops_per_token(n, arch, 4096, True, "sft", True) == 6 * n + 4 * attention
    assert gpu_step.flops_per_token(n, arch, 4096, False, "sft", True) == 4 * n + 3 * attention
    assert gpu_step.flops_per_token(n, arch, 4096, False, "dpo", True) == 6 * n + 4 * attention
    assert gpu_step.flops_per_token(n, arch, 4096, False, "dpo", False) == 4 * n + 3 * attention
    assert gpu_step.step_flops(n, arch, [100, 300], True, "sft", True) == (
        100 * gpu_step.flops_per_token(n, arch, 100, True, "sft", True)
        + 300 * gpu_step.flops_per_token(n, arch, 300, True, "sft", True)
    )


def test_layers_that_fit_follow_the_memory_estimate():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_step

    from mindprint_ray.planning.registry import get_arch

    arch = get_arch("qwen2.5-72b")
    k_bf16 = gpu_step.layers_that_fit(arch, "bf16", 4096, 1, True, 85.52)
    k_nf4 = gpu_step.layers_that_fit(arch, "nf4", 4096, 1, True, 85.52)
    assert 0 < k_bf16 < k_nf4 <= 80 and k_bf16 % 4 == 0
    assert gpu_step.layers_that_fit(arch, "bf16", 4096, 1, True, 1.0) == 0


@pytest.mark.slow
def test_packing_bench_quick():
    done = run_bench("bench/packing.py", "--batch", "1", "--steps", "3", "--rounds", "1", "--warmup", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"PACKING RATIO batch 1 \(real tokens/s, packed / unpacked\): \d+\.\d\d", done.stdout)
    assert "PACKED REAL SHARE batch 1: 100.0%" in done.stdout


def test_ray_overhead_bench_help():
    done = run_bench("bench/ray_overhead.py", "--help", timeout=120)
    assert done.returncode == 0 and "Ray Train" in done.stdout and "--steps" in done.stdout


@pytest.mark.parametrize(
    "script,option",
    [
        ("bench/peer_trl.py", "--profile"),
        ("bench/reference_logprobs.py", "--steps"),
        ("bench/logits_memory.py", "--kinds"),
        ("bench/mlx_compile.py", "--models"),
        ("bench/mlx_logits_memory.py", "--cases"),
    ],
)
def test_issue_15_benches_start(script, option):
    """Each benchmark of issue 15 imports what it needs from the project and parses its options."""
    done = run_bench(script, "--help", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert option in done.stdout
