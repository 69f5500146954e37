"""Runs over more than one node: how many nodes a run spans, how Ray should place its workers, the storage every
node must see, and the time the nodes spend sending ZeRO's collectives to each other.

The inter-node time is an assumption until calibrated: ring collectives (NCCL's), so that an all-gather or a
reduce-scatter of S bytes over W workers moves (W - 1) / W x S bytes into each node; through the node's network
(`internode_gbit_s` of the profile, e.g. EFA 3,200 Gbit/s on a p5.48xlarge) at an assumed share of it
(`internode_efficiency`); not overlapped with compute (an upper bound: DeepSpeed prefetches ZeRO-3 parameters
while it computes). What moves, per device and stage:
- ZeRO-3: the sharded weights (the frozen base as stored, plus the fp32 LoRA weights) are all-gathered twice per
  micro-batch (forward, backward; the recompute of gradient checkpointing reuses the backward's gather), DPO's
  reference forward gathers them once more (once per micro-batch of one pass over every pair when the reference
  log-probs are precomputed: dpo_reference.py's rule),
  and the fp32 LoRA gradients are reduce-scattered once per micro-batch.
- ZeRO-2: the LoRA gradients are reduce-scattered per micro-batch and the updated LoRA weights all-gathered per
  optimizer step; the frozen base is on every device and never moves.
- No ZeRO (DDP): one all-reduce (2 x a reduce-scatter) of the LoRA gradients per optimizer step.
Micro-batches per device are the step budget's: ceil(ceil(rows / batch_size) / workers) per pass, times the
passes. Pure Python: no torch, no ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mindprint_ray.errors import UserError
from mindprint_ray.planning.dpo_reference import run_precomputes
from mindprint_ray.planning.memory import base_weight_bytes
from mindprint_ray.planning.run_plan import RunPlan
from mindprint_ray.planning.step_budget import stage_budget
from mindprint_ray.planning.topic_tokens import TopicTokens
from mindprint_ray.runs.storage import is_s3

LORA_BYTES = 4  # fp32 LoRA weights and gradients, as memory.py counts them
WITHIN_NODE = "STRICT_PACK"  # every worker on one node: NVLink between them, or no run at all
ACROSS_NODES = "PACK"  # as few nodes as the workers need, each filled before the next


def nodes_spanned(run: RunPlan) -> int:
    """Nodes the run's workers occupy: a GPU worker holds one GPU, so W workers need ceil(W / devices per node)
    nodes; CPU workers share a node's CPUs, so a CPU profile is as many nodes as it says; MLX is one process."""
    p = run.profile
    if p.backend != "ray":
        return 1
    if not p.use_gpu:
        return p.nodes
    return math.ceil(run.num_workers / p.devices_per_node)


def is_multinode(run: RunPlan) -> bool:
    """A run on a profile of more than one node, or with more GPU workers than one node holds."""
    return run.profile.nodes > 1 or nodes_spanned(run) > 1


def placement_strategy(run: RunPlan) -> str:
    """Ray Train's ScalingConfig(placement_strategy=...) for the run's (or a sweep trial's) worker group.

    STRICT_PACK when every GPU worker fits on one node: the workers share NVLink, and a run never starts split
    over two partly free nodes, where ZeRO's traffic would cross the network; Ray waits (or the autoscaler adds
    a node) instead. PACK when the run needs more than one node: each node is filled before the next, so the
    16 workers of 2x8xh100-80gb sit 8 and 8 (SPREAD would scatter them over more nodes than needed). CPU
    profiles keep Ray's default, PACK: nothing is gained by forcing CPU workers onto one node."""
    if run.profile.use_gpu and run.profile.backend == "ray" and nodes_spanned(run) == 1:
        return WITHIN_NODE
    return ACROSS_NODES


def shared_storage_problem(run: RunPlan) -> UserError | None:
    """The refusal of a multi-node run whose storage.path is a local folder (None when the storage is fine)."""
    path = run.spec.storage.path
    if not is_multinode(run) or is_s3(path):
        return None
    nodes = max(run.profile.nodes, nodes_spanned(run))
    return UserError(
        f"'{path}' is a local folder, but hardware profile '{run.profile.name}' trains on {nodes} nodes "
        f"({run.num_workers} workers): Ray Train writes every node's checkpoints to storage.path, and a local "
        "folder is another folder on each node",
        field="storage.path",
        hint="use S3, which every node reaches: storage.path=s3://BUCKET/PREFIX (e.g. "
        "s3://my-bucket/mindprint-runs); see docs/cluster.md",
    )


def check_shared_storage(run: RunPlan) -> None:
    """Refuse (UserError, exit 2) a run over more than one node with local storage, before anything starts."""
    problem = shared_storage_problem(run)
    if problem:
        raise problem


def check_sweep_storage(run: RunPlan, workers_per_trial: int, trials_at_once: int) -> None:
    """A sweep whose concurrent GPU trials fill more than one node writes trial folders on every node, and the
    sweep driver reads them all: refuse local storage once the concurrency is known (before any trial)."""
    p, path = run.profile, run.spec.storage.path
    if p.backend != "ray" or not p.use_gpu or is_s3(path):
        return
    nodes = math.ceil(workers_per_trial * trials_at_once / p.devices_per_node)
    if nodes > 1:
        raise UserError(
            f"'{path}' is a local folder, but {trials_at_once} trials of {workers_per_trial} workers at once "
            f"take {nodes} nodes of hardware profile '{p.name}': each trial writes its run folder on its own node "
            "and the sweep reads them all",
            field="storage.path",
            hint="use S3: storage.path=s3://BUCKET/PREFIX, or run the trials on one node (tune.max_concurrent)",
        )


# ---- the network between nodes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """One node's network to the others: the vendor's figure and the share of it assumed reached."""

    gbit_s: float
    efficiency: float
    source: str

    @property
    def bytes_per_s(self) -> float:
        return self.gbit_s * 1e9 / 8 * self.efficiency


def link(run: RunPlan) -> Link | None:
    p = run.profile
    if p.internode_gbit_s is None or p.internode_efficiency is None:
        return None
    return Link(p.internode_gbit_s, p.internode_efficiency, p.internode_source)


def ring_share(workers: int) -> float:
    """Bytes each node receives per byte of an all-gather or reduce-scatter over `workers` ring ranks."""
    return (workers - 1) / workers


def micro_batches(run: RunPlan, t: TopicTokens, stage: str) -> tuple[int, float, int]:
    """(micro-batches of one pass per device, passes over the data, optimizer steps) of one topic's stage."""
    b = stage_budget(run, t, stage)
    per_pass = math.ceil(math.ceil(b.rows / run.spec.stage(stage).batch_size) / run.num_workers)
    return per_pass, b.passes, b.steps


def weight_bytes(run: RunPlan) -> float:
    """What ZeRO-3 all-gathers for one forward: the frozen base as stored plus the fp32 LoRA weights."""
    base = base_weight_bytes(run.arch, run.quant, run.profile.backend, run.spec.quantization.double_quant)
    return base + LORA_BYTES * run.zones.trainable_params()


def stage_bytes(run: RunPlan, t: TopicTokens, stage: str) -> float:
    """Bytes each node receives from the others in one topic's SFT or DPO stage (0 on one node)."""
    if nodes_spanned(run) < 2 or (stage == "dpo" and not t.dpo_pairs):
        return 0.0
    share = ring_share(run.num_workers)
    lora = LORA_BYTES * run.zones.trainable_params()  # the gradients, or the updated weights
    per_pass, passes, steps = micro_batches(run, t, stage)
    micro = per_pass * passes
    zero = run.deepspeed_stage
    if zero >= 3:
        gathers = 2 * micro
        if stage == "dpo":  # the reference forward: every micro-batch, or one pass over all pairs when precomputed
            gathers += per_pass if run_precomputes(run, t.dpo_pairs) else micro
        return share * (gathers * weight_bytes(run) + micro * lora)
    if zero == 2:
        return share * (micro * lora + steps * lora)
    return share * steps * 2 * lora


def stage_seconds(run: RunPlan, t: TopicTokens, stage: str) -> float:
    """Seconds of inter-node traffic in one topic's stage (0 on one node, or without the profile's figures)."""
    net = link(run)
    if net is None:
        return 0.0
    return stage_bytes(run, t, stage) / net.bytes_per_s


def traffic(run: RunPlan) -> str:
    zero = run.deepspeed_stage
    if zero >= 3:
        return "ZeRO-3 all-gathers of the sharded weights and reduce-scatters of the LoRA gradients"
    if zero == 2:
        return "ZeRO-2 reduce-scatters of the LoRA gradients and all-gathers of the updated LoRA weights"
    return "all-reduces of the LoRA gradients"


def internode_assumption(run: RunPlan) -> str | None:
    """What the time estimate assumes about the network between nodes (None on one node)."""
    nodes = nodes_spanned(run)
    if nodes < 2:
        return None
    net = link(run)
    if net is None:
        return (
            f"inter-node traffic over {nodes} nodes not estimated: profile '{run.profile.name}' gives no "
            "internode_gbit_s"
        )
    return (
        f"plus inter-node {traffic(run)} over {nodes} nodes at {net.gbit_s:,.0f} Gbit/s per node x "
        f"{net.efficiency:g} efficiency ({net.source}); assumed, not calibrated, not overlapped with compute"
    )
