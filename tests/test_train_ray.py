"""Real training on a local Ray cluster with the tiny model: curriculum, resume, QLoRA and DeepSpeed paths."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, committed_checkpoints, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.ray_cluster]
TOPICS = ["cycle_basics", "accumulation"]


def train_args(name: str, storage: Path, model: Path, *extra: str) -> list[str]:
    return [
        "train",
        "configs/tiny-cpu.yaml",
        "--name",
        name,
        f"storage.path={storage}",
        f"model.path={model}",
        f"curriculum.topics=[{','.join(TOPICS)}]",
        "storage.checkpoint_every_steps=5",
        "ray.dashboard=false",  # saves ~4 s of each local cluster's start
        "sft.epochs_per_topic=3",  # 45 SFT steps a topic on 2 workers: the loss falls, a kill lands mid-topic
        "eval.max_examples=4",
        "eval.max_new_tokens=32",
        *extra,
    ]


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, tiny_model_dir):
    """Train two topics. While the driver runs, a second driver on the same run is refused. Once the second
    topic's SFT has a committed checkpoint, kill the whole job (the driver and its local Ray); then rerun."""
    storage = tmp_path_factory.mktemp("runs")
    run_dir = storage / "resume"
    args = [sys.executable, "-m", "mindprint_ray", *train_args("resume", storage, tiny_model_dir)]
    proc = subprocess.Popen(
        args, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline, second = time.time() + 400, None
    try:
        while time.time() < deadline and proc.poll() is None:
            if second is None and any(e.get("event") == "worker_group_start" for e in events(run_dir)):
                second = run_cli(*train_args("resume", storage, tiny_model_dir))  # the first holds the lease
            if second is not None and f"{TOPICS[1]}-sft-" in committed_checkpoints(run_dir):
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        first_adapter = sha(run_dir / "adapters" / TOPICS[0] / "adapter_model.safetensors")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (run_dir / "adapters" / TOPICS[1] / "mindprint_manifest.json").exists()
    result = run_cli(*train_args("resume", storage, tiny_model_dir))  # the killed driver's lease is taken over
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, first_adapter, result, second


def test_resume_skips_the_finished_topic(resumed_run):
    run_dir, first_adapter, _, _ = resumed_run
    starts = [e for e in events(run_dir) if e.get("event") == "stage_start"]
    assert [(e["topic"], e["stage"]) for e in starts].count((TOPICS[0], "sft")) == 1
    assert sha(run_dir / "adapters" / TOPICS[0] / "adapter_model.safetensors") == first_adapter
    runs = [e for e in events(run_dir) if e.get("event") == "run_start"]
    assert runs[-1]["resumed"] is True and runs[-1]["pending"] == TOPICS[1:]


def test_a_killed_driver_resumes_mid_topic_from_its_last_checkpoint(resumed_run):
    run_dir, _, _, _ = resumed_run
    starts = [e for e in events(run_dir) if e.get("event") == "stage_start" and e["topic"] == TOPICS[1]]
    sft = [e for e in starts if e["stage"] == "sft"]
    assert len(sft) == 2 and sft[0]["step"] == 0 and sft[1]["step"] >= 5  # storage.checkpoint_every_steps=5
    group = [e for e in events(run_dir) if e.get("event") == "worker_group_start"][-1]
    assert group["restored"]["topic"] == TOPICS[1] and group["restored"]["stage"] == "sft"


def test_a_second_driver_on_a_running_run_is_refused(resumed_run):
    _, _, _, second = resumed_run
    assert second is not None and second.returncode == 2, second.stderr[-2000:] if second else None
    assert "lease" in second.stderr and "pid" in second.stderr and "Traceback" not in second.stderr
    assert "--force-lease" in second.stderr


def test_every_topic_has_an_adapter_with_exactly_the_zone_modules(resumed_run, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    from mindprint_ray.planning.run_plan import load_run

    run_dir, _, _, _ = resumed_run
    plan = load_run("configs/tiny-cpu.yaml").zones
    expected = {f"base_model.model.{p}.lora_{ab}.weight" for p in plan.module_paths() for ab in "AB"}
    for topic in TOPICS:
        tensors = load_file(run_dir / "adapters" / topic / "adapter_model.safetensors")
        assert set(tensors) == expected
        assert all(torch.count_nonzero(t) > 0 for k, t in tensors.items() if "lora_B" in k)


def test_adapter_loads_with_peft_and_changes_the_model(resumed_run, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, _, _, _ = resumed_run
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 200, 300, 400, 2]])
    with torch.no_grad():
        before = base(ids).logits
        model = PeftModel.from_pretrained(base, run_dir / "adapters" / TOPICS[1])
        after = model(ids).logits
    assert (after - before).abs().max() > 1e-3


def test_losses_fall_and_dpo_prefers_chosen(resumed_run):
    run_dir, _, _, _ = resumed_run
    summary = json.loads((run_dir / "summary.json").read_text())
    for topic in TOPICS:
        t = summary["topics"][topic]
        assert t["status"] == "done" and t["wall_s"] > 0 and t["tokens"] > 0
        assert t["sft"]["last_loss"] < t["sft"]["first_loss"]
        assert t["dpo"]["reward_accuracy"] > 0.5 and t["dpo"]["reward_margin"] > 0
    logged = [e for e in events(run_dir) if e.get("stage") == "sft" and "loss" in e]
    assert all("grad_norm" in e and "tokens_per_s" in e and "peak_memory_gb" in e for e in logged)
    assert (run_dir / "spec.yaml").is_file() and list((run_dir / "tensorboard").glob("*"))


def test_eval_before_and_after_each_stage(resumed_run):
    run_dir, _, _, _ = resumed_run
    summary = json.loads((run_dir / "summary.json").read_text())
    gains = []
    for topic in TOPICS:
        evals = summary["topics"][topic]["eval"]
        for stage in ("base", "after_sft", "after_dpo"):
            assert 0 <= evals[stage]["voice_fidelity"] <= 1 and 0 <= evals[stage]["accuracy"] <= 1
        gains.append(evals["after_dpo"]["voice_fidelity"] - evals["base"]["voice_fidelity"])
    assert sum(gains) / len(gains) > 0  # the trained adapters sound more like the persona than the base
    assert "after_dpo@accumulation" in summary["topics"]["cycle_basics"]["eval"]  # forgetting check
    assert summary["targets"]["lines"] and "stability" in summary["targets"]["checks"]
    assert any(e.get("event") == "eval" for e in events(run_dir))
    report = (run_dir / "report" / "report.md").read_text()
    assert "## Held-out evaluation" in report and "Measured vs estimated" in report
    assert (run_dir / "report" / "evaluation.png").stat().st_size > 10_000


def test_reusing_a_name_with_another_spec_is_refused(resumed_run, tiny_model_dir):
    run_dir, _, _, _ = resumed_run
    r = run_cli(*train_args("resume", run_dir.parent, tiny_model_dir, "sft.learning_rate=0.5"))
    assert r.returncode == 2 and "different spec" in r.stderr and "--force" in r.stderr


def test_rerunning_a_finished_run_trains_nothing(resumed_run, tiny_model_dir):
    run_dir, _, _, _ = resumed_run
    before = len(events(run_dir))
    r = run_cli(*train_args("resume", run_dir.parent, tiny_model_dir))
    assert r.returncode == 0 and len(events(run_dir)) == before


def quick_run(tmp_path, model, name, *extra):
    args = [
        "train",
        "configs/tiny-cpu.yaml",
        "--name",
        name,
        f"storage.path={tmp_path}",
        f"model.path={model}",
        "curriculum.topics=[capitulation]",
        "sft.max_steps=3",
        "dpo.steps_per_topic=2",
        "eval.enabled=false",
        "ray.dashboard=false",
        *extra,
    ]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    assert summary["topics"]["capitulation"]["status"] == "done"
    return tmp_path / name / "adapters" / "capitulation"


def test_eval_gate_stop_ends_the_run_after_the_topic_and_keeps_its_adapter(tmp_path, tiny_model_dir):
    args = [
        "train",
        "configs/tiny-cpu.yaml",
        "--name",
        "gate",
        f"storage.path={tmp_path}",
        f"model.path={tiny_model_dir}",
        "curriculum.topics=[capitulation,accumulation]",
        "sft.max_steps=3",
        "dpo.steps_per_topic=2",
        "eval.on_miss=stop",
        "eval.max_examples=2",
        "eval.max_new_tokens=16",
        "ray.dashboard=false",
    ]
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "eval gate stopped the run after 'capitulation'" in r.stderr and "Traceback" not in r.stderr[-500:]
    run_dir = tmp_path / "gate"
    assert (run_dir / "adapters" / "capitulation" / "mindprint_manifest.json").is_file()
    assert not (run_dir / "adapters" / "accumulation").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["topics"]["capitulation"]["gates"]
    starts = [e for e in events(run_dir) if e.get("event") == "worker_group_start"]
    assert len(starts) == 1  # a stop is not a crash: Ray did not retry it


def test_qlora_nf4_path_on_cpu(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    adapter = quick_run(tmp_path, tiny_model_dir, "qlora", "quantization.mode=nf4", "hardware.num_workers=1")
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)
