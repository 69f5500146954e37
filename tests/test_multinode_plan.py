"""Multi-node profiles, estimates, placement, the shared-storage refusal and the multi-node cluster files (pure:
no Ray, no torch)."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from conftest import ROOT, run_cli
from pydantic import ValidationError

from mindprint_ray.errors import UserError
from mindprint_ray.planning.estimates import memory_for_run, remedies
from mindprint_ray.planning.hardware import HardwareFile, load_prices, load_profiles
from mindprint_ray.planning.memory import GB
from mindprint_ray.planning.multinode import (
    check_shared_storage,
    check_sweep_storage,
    internode_assumption,
    nodes_spanned,
    placement_strategy,
    stage_bytes,
    stage_seconds,
)
from mindprint_ray.planning.run_plan import load_run
from mindprint_ray.planning.step_budget import global_batch
from mindprint_ray.planning.time_model import Mfu, peak_flops, resolve_mfu, stage_flops, topic_times
from mindprint_ray.planning.topic_tokens import TopicTokens

BF16_1X8 = "configs/qwen72b-bf16-8xh100.yaml"
BF16_2X8 = "configs/qwen72b-bf16-2x8xh100.yaml"
TWO_NODES = "hardware.profile=2x8xh100-80gb"
S3 = "storage.path=s3://bucket/runs"
EFA_BYTES_PER_S = 3200e9 / 8 * 0.5  # the profile's 3,200 Gbit/s at the assumed efficiency 0.5


@pytest.fixture(autouse=True)
def private_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("MINDPRINT_CALIBRATION", str(tmp_path / "calibration.json"))


def run_of(config: str, *overrides: str):
    return load_run(ROOT / config, list(overrides))


# ---- profiles -----------------------------------------------------------------------------------------------


def test_multinode_profile_loads_with_all_its_devices_and_nodes_price():
    profiles = load_profiles()
    p, one = profiles["2x8xh100-80gb"], profiles["8xh100-80gb"]
    assert (p.nodes, p.devices_per_node, p.devices) == (2, 8, 16)
    assert (p.memory_gb, p.peak_tflops, p.device) == (one.memory_gb, one.peak_tflops, one.device)
    assert p.deepspeed == "zero3" and p.use_gpu and p.backend == "ray"
    node = load_prices()["aws-p5.48xlarge"]
    assert p.price.on_demand == 2 * node.on_demand and p.price.spot == 2 * node.spot
    assert p.price.previous_list_price == 2 * node.previous_list_price
    assert p.price.key == "2 x aws-p5.48xlarge" and p.price.date == node.date
    assert p.internode_gbit_s == 3200 and p.internode_efficiency == 0.5 and "EFA" in p.internode_source


def test_single_node_profiles_keep_their_figures():
    expected = {"8xh100-80gb": 8, "4xa100-80gb": 4, "8xa100-80gb": 8, "1xh100-80gb": 1, "cpu-2": 2, "cpu": 1}
    profiles = load_profiles()
    for name, devices in expected.items():
        p = profiles[name]
        assert (p.nodes, p.devices, p.devices_per_node) == (1, devices, devices), name
        assert p.price == load_prices()[p.price.key], name  # the node's own price
    assert profiles["mac-studio-m2-ultra-64gb"].devices == 1


def test_a_multinode_profile_needs_the_network_between_nodes():
    entry = {
        "description": "x",
        "backend": "ray",
        "device": "H100",
        "nodes": 2,
        "devices": 8,
        "memory_gb": 80.0,
        "peak_tflops": 989.0,
        "use_gpu": True,
        "cpus_per_worker": 8,
        "deepspeed": "zero3",
        "price": "aws-p5.48xlarge",
        "mfu": {"bf16": 0.4},
    }
    with pytest.raises(ValidationError, match="internode_gbit_s"):
        HardwareFile.model_validate({"profiles": {"x": entry}})
    ok = {**entry, "internode_gbit_s": 3200.0, "internode_efficiency": 0.5}
    assert HardwareFile.model_validate({"profiles": {"x": ok}}).profiles["x"].nodes == 2


# ---- memory -------------------------------------------------------------------------------------------------


def test_zero3_shards_over_every_device_of_both_nodes():
    one, two = run_of(BF16_1X8), run_of(BF16_1X8, TWO_NODES)
    assert (one.num_workers, two.num_workers) == (8, 16) and one.deepspeed_stage == two.deepspeed_stage == 3
    for phase in ("sft", "dpo"):
        a, b = memory_for_run(one, phase), memory_for_run(two, phase)
        # the sharded terms halve; the replicated ones stay
        assert b.base_weights == pytest.approx(a.base_weights / 2)
        assert b.gradients == pytest.approx(a.gradients / 2) and b.optimizer == pytest.approx(a.optimizer / 2)
        assert b.lora_weights == a.lora_weights and b.activations == a.activations
        # GPU overhead: 1.5 GB + 5% of the other terms, recomputed on the halved terms
        rest = b.base_weights + b.lora_weights + b.gradients + b.optimizer + b.activations
        assert b.overhead == pytest.approx(1.5 + 0.05 * rest)
        assert b.total < a.total
    bf16_base = 2 * one.arch.total_params() / GB
    assert memory_for_run(two).base_weights == pytest.approx(bf16_base / 16)


def test_plan_json_counts_16_devices_and_the_shipped_config_keeps_the_global_batch():
    r = run_cli("plan", BF16_2X8, "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert p["hardware"]["devices"] == 16 and p["hardware"]["deepspeed_stage"] == 3
    one = run_of(BF16_1X8)
    assert p["memory"]["per_device_gb"]["base_weights"] == pytest.approx(memory_for_run(one).base_weights / 2, abs=1e-3)
    two = run_of(BF16_2X8)
    for stage in ("sft", "dpo"):
        assert global_batch(two, stage) == global_batch(one, stage)
    assert p["time"]["price"]["per_hour"] == pytest.approx(2 * load_prices()["aws-p5.48xlarge"].on_demand)


def test_the_more_devices_remedy_names_the_nodes():
    run = run_of(BF16_1X8, "hardware.deepspeed=zero2")
    assert any(r["remedy"] == "ZeRO-3 over 16 devices (2 nodes of 8)" and r["fits"] for r in remedies(run))


# ---- nodes and placement ------------------------------------------------------------------------------------


def test_nodes_spanned_and_placement():
    assert nodes_spanned(run_of(BF16_1X8)) == 1 and placement_strategy(run_of(BF16_1X8)) == "STRICT_PACK"
    assert nodes_spanned(run_of(BF16_2X8)) == 2 and placement_strategy(run_of(BF16_2X8)) == "PACK"
    # a GPU worker holds one GPU: 16 workers of an 8-GPU profile need 2 nodes, 8 of the 2-node one fit in one
    assert nodes_spanned(run_of(BF16_1X8, "hardware.num_workers=16")) == 2
    assert placement_strategy(run_of(BF16_2X8, "hardware.num_workers=8")) == "STRICT_PACK"
    # a sweep trial is a run with hardware.num_workers = tune.workers_per_trial (sweep.make_trial)
    trial = run_of("configs/sweep-rank-lr-node-per-trial.yaml", "hardware.num_workers=8")
    assert placement_strategy(trial) == "STRICT_PACK" and nodes_spanned(trial) == 1
    cpu = run_of("configs/tiny-cpu.yaml")
    assert nodes_spanned(cpu) == 1 and placement_strategy(cpu) == "PACK"
    assert nodes_spanned(run_of("configs/tiny-cpu.yaml", "hardware.num_workers=4")) == 1  # CPU workers share
    assert nodes_spanned(run_of("configs/qwen72b-mac-studio.yaml")) == 1


# ---- the inter-node term ------------------------------------------------------------------------------------

TOPIC = TopicTokens(
    "t", sft_examples=40, sft_tokens=40 * 500, dpo_pairs=20, dpo_tokens=20 * 800, dpo_padded_tokens=20 * 900
)
# SFT without packing, 1 row per micro-batch, no accumulation, 2 epochs: on 16 workers each device reads
# ceil(40 / 16) = 3 micro-batches per pass, 3 steps per pass, 6 steps, 6 micro-batches.
# DPO: 20 pairs, 1 per micro-batch, no accumulation, 10 steps: ceil(20 / 16) = 2 per pass, 5 passes, 10 micro-batches.
PINNED = [
    "sft.packing=false",
    "sft.batch_size=1",
    "sft.gradient_accumulation=1",
    "sft.epochs_per_topic=2",
    "dpo.batch_size=1",
    "dpo.gradient_accumulation=1",
    "dpo.steps_per_topic=10",
]


def test_internode_bytes_follow_the_ring_formula():
    # the reference forward at every step (auto would precompute: 10 steps x 16 workers revisit the pairs)
    run = run_of(BF16_1X8, TWO_NODES, *PINNED, "dpo.precompute_ref_log_probs=false")
    share = 15 / 16  # ring all-gather / reduce-scatter over 16 ranks: (W - 1) / W of the bytes into each node
    lora = 4 * run.zones.trainable_params()
    weights = 2 * run.arch.total_params() + lora  # BF16 base + fp32 LoRA, all sharded under ZeRO-3
    # ZeRO-3 SFT: 2 gathers of the weights and 1 reduce-scatter of the gradients per micro-batch
    assert stage_bytes(run, TOPIC, "sft") == pytest.approx(share * (2 * 6 * weights + 6 * lora))
    # DPO: plus the reference forward's gather per micro-batch
    assert stage_bytes(run, TOPIC, "dpo") == pytest.approx(share * (3 * 10 * weights + 10 * lora))
    pre = run_of(BF16_1X8, TWO_NODES, *PINNED, "dpo.precompute_ref_log_probs=true")
    assert stage_bytes(pre, TOPIC, "dpo") == pytest.approx(share * ((2 * 10 + 2) * weights + 10 * lora))
    # ZeRO-2: gradients per micro-batch, updated LoRA weights per step; the frozen base never moves
    z2 = run_of(BF16_1X8, TWO_NODES, *PINNED, "hardware.deepspeed=zero2")
    assert stage_bytes(z2, TOPIC, "sft") == pytest.approx(share * (6 * lora + 6 * lora))
    ddp = run_of(BF16_1X8, TWO_NODES, *PINNED, "hardware.deepspeed=none")
    assert stage_bytes(ddp, TOPIC, "sft") == pytest.approx(share * 6 * 2 * lora)
    assert stage_seconds(run, TOPIC, "sft") == pytest.approx(stage_bytes(run, TOPIC, "sft") / EFA_BYTES_PER_S)


def test_internode_term_is_zero_on_one_node_and_positive_on_two():
    one, two = run_of(BF16_1X8, *PINNED), run_of(BF16_1X8, TWO_NODES, *PINNED)
    for stage in ("sft", "dpo"):
        assert stage_bytes(one, TOPIC, stage) == 0.0 and stage_seconds(one, TOPIC, stage) == 0.0
        assert stage_seconds(two, TOPIC, stage) > 0
    t1 = topic_times(one, [TOPIC], resolve_mfu(one))[0]
    assert t1.sft.internode_seconds == 0.0
    assert t1.sft.seconds == stage_flops(one, TOPIC, "sft")[1] / (peak_flops(one) * resolve_mfu(one).sft)
    mfu = resolve_mfu(two)
    t2 = topic_times(two, [TOPIC], mfu)[0]
    for stage, st in (("sft", t2.sft), ("dpo", t2.dpo)):
        compute = stage_flops(two, TOPIC, stage)[1] / (peak_flops(two) * getattr(mfu, stage))
        assert st.internode_seconds == pytest.approx(stage_seconds(two, TOPIC, stage))
        assert st.seconds == pytest.approx(compute + st.internode_seconds)
    # 16 workers on the 8-GPU profile cross nodes too, over that profile's EFA figure
    assert stage_seconds(run_of(BF16_1X8, "hardware.num_workers=16", *PINNED), TOPIC, "sft") > 0


def test_a_measured_mfu_already_includes_the_network():
    two = run_of(BF16_1X8, TWO_NODES, *PINNED)
    measured = Mfu(0.3, 0.3, "calibration", "measured by run r")
    t = topic_times(two, [TOPIC], measured)[0]
    assert t.sft.internode_seconds == 0.0
    assert t.sft.seconds == stage_flops(two, TOPIC, "sft")[1] / (peak_flops(two) * 0.3)


def test_the_assumption_is_stated_only_for_more_than_one_node():
    assert internode_assumption(run_of(BF16_1X8)) is None
    assert "inter-node" not in resolve_mfu(run_of(BF16_1X8)).note
    text = internode_assumption(run_of(BF16_2X8))
    assert "3,200 Gbit/s" in text and "0.5 efficiency" in text and "not calibrated" in text and "2 nodes" in text
    assert text in resolve_mfu(run_of(BF16_2X8)).note
    assert text in resolve_mfu(run_of(BF16_2X8, "hardware.mfu=0.3")).note
    # a GPU profile without the network figure says so instead of inventing one
    bare = internode_assumption(run_of("configs/qwen7b-qlora-1xh100.yaml", "hardware.num_workers=2"))
    assert "not estimated" in bare and "internode_gbit_s" in bare


def test_plan_prints_the_internode_assumption():
    r = run_cli("plan", BF16_1X8, TWO_NODES, S3)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())  # rich wraps long lines
    assert "16 device(s)" in text and "ZeRO-3" in text
    for needle in ("inter-node", "3,200 Gbit/s", "0.5 efficiency", "not calibrated"):
        assert needle in text, needle
    single = run_cli("plan", BF16_1X8)
    assert single.returncode == 0 and "inter-node" not in single.stdout


def test_report_states_the_assumption_and_the_sharded_memory(tmp_path):
    out = tmp_path / "rep"
    r = run_cli("report", BF16_2X8, "--hardware", "2x8xh100-80gb", "--out", str(out))
    assert r.returncode == 0, r.stderr
    md = (out / "report.md").read_text()
    assert "not calibrated" in md and "3,200 Gbit/s" in md and "16 device(s)" in md
    base = memory_for_run(run_of(BF16_2X8)).base_weights
    assert base == pytest.approx(memory_for_run(run_of(BF16_1X8)).base_weights / 2)
    assert f"| base_weights | {base:.2f} |" in md


# ---- storage every node sees --------------------------------------------------------------------------------


def test_validate_refuses_local_storage_on_two_nodes():
    r = run_cli("validate", BF16_1X8, TWO_NODES, "storage.path=runs")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "storage.path" in r.stderr and "'2x8xh100-80gb'" in r.stderr and "2 nodes" in r.stderr
    assert "s3://" in r.stderr and "Traceback" not in r.stderr
    more = run_cli("validate", BF16_1X8, "hardware.num_workers=16", "storage.path=/tmp/runs")
    assert more.returncode == 2 and "storage.path" in more.stderr and "s3://" in more.stderr


def test_validate_and_plan_pass_with_s3_storage():
    for command in ("validate", "plan"):
        r = run_cli(command, BF16_1X8, TWO_NODES, S3)
        assert r.returncode == 0, (command, r.stderr)
    assert run_cli("validate", BF16_2X8).returncode == 0  # the shipped config (s3://)


def test_local_storage_is_fine_on_one_node():
    check_shared_storage(run_of(BF16_1X8, "storage.path=runs"))
    check_shared_storage(run_of("configs/tiny-cpu.yaml", "hardware.num_workers=4"))
    with pytest.raises(UserError) as err:
        check_shared_storage(run_of(BF16_2X8, "hardware.num_workers=8", "storage.path=runs"))
    assert err.value.field == "storage.path"  # the profile is two nodes, whatever the workers


def test_sweep_storage_once_the_concurrency_is_known():
    trial = run_of("configs/sweep-rank-lr-node-per-trial.yaml", "storage.path=runs")
    check_sweep_storage(trial, 8, 1)  # one trial, one node
    check_sweep_storage(trial, 2, 4)  # four 2-GPU trials fill one 8-GPU node
    with pytest.raises(UserError, match="4 nodes") as err:
        check_sweep_storage(trial, 8, 4)
    assert err.value.field == "storage.path" and "s3://" in err.value.hint
    check_sweep_storage(run_of("configs/sweep-rank-lr-node-per-trial.yaml"), 8, 4)  # s3:// as shipped
    check_sweep_storage(run_of("configs/tiny-sweep.yaml"), 2, 4)  # CPU trials share a machine


# ---- cluster files ------------------------------------------------------------------------------------------


def load_cluster(name: str) -> dict:
    return yaml.safe_load((ROOT / "cluster" / name).read_text())


def test_aws_multinode_cluster_file():
    c = load_cluster("aws-multinode-h100.yaml")
    assert c["provider"]["type"] == "aws" and c["docker"]["image"].startswith("rayproject/ray:2.60.")
    assert "," not in c["provider"]["availability_zone"]  # EFA stays in one zone
    nodes = c["available_node_types"]
    head = nodes[c["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"] and head["resources"]["CPU"] == 0
    gpu = nodes["gpu_worker"]
    cfg = gpu["node_config"]
    assert cfg["InstanceType"] == "p5.48xlarge" and cfg["InstanceMarketOptions"]["MarketType"] == "spot"
    assert gpu["resources"]["GPU"] == load_profiles()["2x8xh100-80gb"].devices_per_node
    assert load_profiles()["2x8xh100-80gb"].nodes <= gpu["min_workers"] <= gpu["max_workers"] <= c["max_workers"]
    efa = cfg["NetworkInterfaces"]
    assert [n["NetworkCardIndex"] for n in efa] == list(range(32)) and all(n["InterfaceType"] == "efa" for n in efa)
    assert [n["DeviceIndex"] for n in efa] == [0] + [1] * 31
    assert all(n["SubnetId"] and n["Groups"] for n in efa)
    assert not {"SubnetIds", "SubnetId", "SecurityGroupIds"} & set(cfg)  # Ray's rule with NetworkInterfaces
    assert "Placement" in cfg
    text = (ROOT / "cluster" / "aws-multinode-h100.yaml").read_text()
    assert "RAY_AUTH_MODE=token" in text
    for cfg_path in ("configs/qwen72b-bf16-2x8xh100.yaml", "configs/sweep-rank-lr-node-per-trial.yaml"):
        assert cfg_path in text and (ROOT / cfg_path).is_file()


def test_kuberay_multinode_file_matches_its_profile():
    job = load_cluster("kuberay-rayjob-multinode.yaml")
    assert job["kind"] == "RayJob" and job["spec"]["rayClusterSpec"]["rayVersion"] == "2.60.0"
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    entry = job["spec"]["entrypoint"]
    config = entry.split("train ", 1)[1].split()[0]
    run = run_of(config)
    assert int(limits["nvidia.com/gpu"]) == run.profile.devices_per_node
    assert group["replicas"] == math.ceil(run.num_workers / run.profile.devices_per_node) == run.profile.nodes
    assert run.spec.storage.path.startswith("s3://")


def test_a_users_price_is_per_node_hour_and_counts_every_node():
    from mindprint_ray.planning.costs import hourly_price

    two = load_run("configs/qwen72b-bf16-2x8xh100.yaml", ["hardware.price_per_hour=50"])
    one = load_run("configs/qwen72b-bf16-8xh100.yaml", ["hardware.price_per_hour=50"])
    assert hourly_price(two)["per_hour"] == 100 and "x 2 nodes" in hourly_price(two)["basis"]
    assert hourly_price(one)["per_hour"] == 50
    assert hourly_price(two, override=30)["per_hour"] == 60


def test_plan_warns_about_local_storage_on_two_nodes_before_validate_refuses_it(tmp_path):
    r = run_cli("plan", "configs/qwen72b-bf16-2x8xh100.yaml", f"storage.path={tmp_path}", "--json")
    assert r.returncode == 0, r.stderr
    (warning,) = json.loads(r.stdout)["warnings"]
    assert "local folder" in warning and "s3://" in warning
    r = run_cli("plan", "configs/qwen72b-bf16-2x8xh100.yaml", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["warnings"] == []
