"""Training time from FLOPs: tokens per topic from the curriculum, FLOPs per token, and an MFU assumption.

Forward ~2N FLOPs per token (N = matmul parameters: decoder linears, lm_head, LoRA); LoRA training ~4N (the
backward pass computes activation gradients only: the base weights are frozen) or 6N with gradient
checkpointing (one more forward); plus causal attention. DPO runs the policy on chosen and rejected (padded to
the longer of the two) and a reference forward (2N) unless reference log-probs are precomputed.
A run over more than one node adds the seconds its nodes spend on ZeRO's collectives over the network
(multinode.py: an assumption, stated in the MFU note, unless the MFU was measured, which includes them).
Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from mindprint_ray.planning.calibration import lookup
from mindprint_ray.planning.dpo_reference import reference_pairs, run_precomputes
from mindprint_ray.planning.multinode import internode_assumption, stage_seconds
from mindprint_ray.planning.registry import ModelArch
from mindprint_ray.planning.run_plan import RunPlan
from mindprint_ray.planning.step_budget import global_batch, stage_budget
from mindprint_ray.planning.topic_tokens import TRAINING_STAGES, TopicTokens


@dataclass(frozen=True)
class StageTime:
    tokens: float  # real tokens trained in this stage (DPO: chosen + rejected, without pair padding)
    flops: float
    seconds: float  # compute (FLOPs at the MFU) plus internode_seconds
    internode_seconds: float = 0.0  # ZeRO's collectives between nodes (0 on one node)


@dataclass(frozen=True)
class TopicTime:
    topic: str
    sft: StageTime
    dpo: StageTime | None

    @property
    def hours(self) -> float:
        return (self.sft.seconds + (self.dpo.seconds if self.dpo else 0.0)) / 3600


@dataclass(frozen=True)
class Mfu:
    sft: float
    dpo: float
    source: str  # spec | calibration | profile | measured
    note: str

    @property
    def assumed(self) -> bool:
        """An assumed MFU counts compute only: the inter-node traffic is added to it. A measured one (a
        calibration, a timed throughput) already includes whatever the nodes spent on the network."""
        return self.source in ("spec", "profile")


def _with_network(run: RunPlan, note: str) -> str:
    """The MFU note, with what the time estimate assumes about the network when the run spans nodes."""
    extra = internode_assumption(run)
    return f"{note}; {extra}" if extra else note


def matmul_params(arch: ModelArch, trainable: int) -> int:
    """Parameters that cost 2 FLOPs per token in the forward pass (the embedding lookup costs none)."""
    return arch.linear_params() + arch.vocab_size * arch.hidden_size + trainable


def attention_flops_forward(arch: ModelArch, seq_len: float) -> float:
    """Causal QK^T and AV per token: 2 matmuls x 2 FLOPs x (seq/2 mean context) x q width x layers."""
    return 2 * arch.num_layers * arch.num_heads * arch.head_dim * seq_len


def train_flops_per_token(arch: ModelArch, trainable: int, seq_len: float, checkpointing: bool) -> float:
    """LoRA training: forward + activation backward (4N), + recompute (6N); attention 3x (4x) its forward."""
    passes = 3 if checkpointing else 2  # forward-equivalents of the linears: fwd, bwd, (recompute)
    attn = attention_flops_forward(arch, seq_len) * (passes + 1)  # attention backward is 2x its forward
    return passes * 2 * matmul_params(arch, trainable) + attn


def forward_flops_per_token(arch: ModelArch, trainable: int, seq_len: float) -> float:
    return 2 * matmul_params(arch, trainable) + attention_flops_forward(arch, seq_len)


def sft_stage_tokens(run: RunPlan, t: TopicTokens) -> float:
    """Tokens trained in SFT: the step budget's passes over the data (epochs, or max_steps) x one epoch."""
    return t.sft_tokens * stage_budget(run, t, "sft").passes


def dpo_pairs_seen(run: RunPlan) -> int:
    return run.spec.dpo.steps_per_topic * global_batch(run, "dpo")


def stage_flops(run: RunPlan, t: TopicTokens, stage: str) -> tuple[float, float]:
    """(real tokens trained, FLOPs) of one topic's SFT or DPO stage (DPO FLOPs include the pair padding)."""
    arch, trainable = run.arch, run.zones.trainable_params()
    if stage == "sft":
        tokens = sft_stage_tokens(run, t)
        per = train_flops_per_token(arch, trainable, t.mean_sft_length, run.spec.stage("sft").gradient_checkpointing)
        return tokens, tokens * per
    if not t.dpo_pairs:
        return 0.0, 0.0
    seen = dpo_pairs_seen(run)
    padded = seen * t.dpo_padded_tokens / t.dpo_pairs
    checkpointing = run.spec.stage("dpo").gradient_checkpointing
    policy = padded * train_flops_per_token(arch, trainable, t.mean_dpo_length, checkpointing)
    # precomputed (dpo_reference's rule): one reference forward over the pairs it covers, whatever the steps
    ref_pairs = reference_pairs(run, t.dpo_pairs, seen) if run_precomputes(run, t.dpo_pairs) else seen
    ref_tokens = ref_pairs * t.dpo_padded_tokens / t.dpo_pairs
    flops = policy + ref_tokens * forward_flops_per_token(arch, trainable, t.mean_dpo_length)
    return seen * t.dpo_tokens / t.dpo_pairs, flops


def resolve_mfu(run: RunPlan, calibration: dict | None = None) -> Mfu:
    """The MFU to use: the spec's hardware.mfu, else a calibration for this profile, else the profile's."""
    if run.spec.hardware.mfu and run.spec.hardware.profile == run.profile.name:
        note = _with_network(run, "hardware.mfu in the spec")
        return Mfu(run.spec.hardware.mfu, run.spec.hardware.mfu, "spec", note)
    if calibration is None:
        calibration = lookup(run.profile.name, run.quant)
    if calibration:
        m = calibration["mfu"]
        sft, dpo = m.get("sft") or m.get("dpo"), m.get("dpo") or m.get("sft")
        return Mfu(
            sft,
            dpo,
            "calibration",
            f"measured by run {calibration.get('run')} ({calibration.get('model')}, {calibration.get('date')})",
        )
    table = run.profile.mfu
    value = table.get(run.quant) or table.get("bf16") or min(table.values())
    note = _with_network(run, f"assumed for {run.profile.name} with {run.quant} (hardware.yaml)")
    return Mfu(value, value, "profile", note)


def throughput_mfu(run: RunPlan, tokens: list[TopicTokens], tokens_per_s: dict[str, float], note: str) -> Mfu:
    """The MFU at which topic_times reproduces a measured throughput (real tokens trained per second, per stage;
    DPO falls back to SFT's): hours for a run whose own model was timed on this machine, from the same model."""
    mfu = {}
    for stage in TRAINING_STAGES:
        rate = tokens_per_s.get(stage) or tokens_per_s["sft"]
        per_topic = [stage_flops(run, t, stage) for t in tokens]
        trained, flops = sum(n for n, _ in per_topic), sum(f for _, f in per_topic)
        mfu[stage] = rate * flops / trained / peak_flops(run) if trained else None
    sft = mfu["sft"] or mfu["dpo"] or 0.0
    return Mfu(sft, mfu["dpo"] or sft, "measured", note)


def peak_flops(run: RunPlan) -> float:
    """Dense BF16 FLOP/s of all devices that train together."""
    return run.profile.peak_tflops * 1e12 * run.num_workers


def stage_time(run: RunPlan, t: TopicTokens, stage: str, mfu: Mfu) -> StageTime:
    """One topic's stage: FLOPs at the MFU, plus the inter-node seconds when the MFU is an assumption."""
    n, f = stage_flops(run, t, stage)
    network = stage_seconds(run, t, stage) if mfu.assumed else 0.0
    return StageTime(n, f, f / (peak_flops(run) * getattr(mfu, stage)) + network, network)


def topic_times(run: RunPlan, tokens: list[TopicTokens], mfu: Mfu) -> list[TopicTime]:
    out = []
    for t in tokens:
        dpo = stage_time(run, t, "dpo", mfu) if run.spec.dpo.enabled else None
        out.append(TopicTime(t.topic, stage_time(run, t, "sft", mfu), dpo))
    return out
