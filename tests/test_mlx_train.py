"""local_mlx trains the curriculum for real on the tiny model (mlx[cpu]): run folder, resume, NaN guard, DPO."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from mindprint_ray.errors import UserError

TOPICS = ["cycle_basics", "accumulation", "capitulation"]  # the topics configs/tiny-mlx.yaml lists


def run_mlx(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "local_mlx", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir


def spec_with_model(tmp_path, tiny):
    """configs/tiny-mlx.yaml pointing at the session's tiny model, as a file."""
    import yaml

    spec = yaml.safe_load((ROOT / "configs" / "tiny-mlx.yaml").read_text())
    spec["model"]["path"] = str(tiny)
    path = tmp_path / "tiny-mlx.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_train_every_topic_then_resume_and_generate(tiny, tmp_path):
    small = [
        f"storage.path={tmp_path}",
        f"model.path={tiny}",
        "sft.max_steps=2",
        "dpo.steps_per_topic=2",
        "--no-progress",
    ]
    result = run_mlx("train", "configs/tiny-mlx.yaml", *small, "--name", "X")
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "X"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["backend"] == "mlx" and summary["status"] == "done"
    for topic in TOPICS:
        entry = summary["topics"][topic]
        assert entry["status"] == "done" and entry["tokens"] > 0 and entry["wall_s"] > 0
        assert math.isfinite(entry["sft"]["first_loss"]) and math.isfinite(entry["sft"]["last_loss"])
        assert 0 <= entry["dpo"]["reward_accuracy"] <= 1 and "reward_margin" in entry["dpo"]
        adapter = folder / "adapters" / topic
        assert {"adapters.safetensors", "adapter_config.json", "mindprint_manifest.json"} <= {
            p.name for p in adapter.iterdir()
        }
        assert json.loads((adapter / "mindprint_manifest.json").read_text())["format"] == "mlx"
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert len(steps) == 3 * (2 + 2) and all("peak_memory_gb" in m and "tokens_per_s" in m for m in steps)
    dpo_first = [m for m in steps if m["stage"] == "dpo" and m["step"] == 1]
    assert all(abs(m["loss"] - math.log(2)) < 1e-3 for m in dpo_first)  # reference = the model as DPO starts

    from mlx_lm import load

    model, _ = load(str(tiny), adapter_path=str(folder / "adapters" / "capitulation"))  # mlx-lm loads it as is

    shutil.rmtree(folder / "adapters" / "capitulation")  # resume: only the unfinished topic trains again
    again = run_mlx("train", "configs/tiny-mlx.yaml", *small, "--name", "X")
    assert again.returncode == 0, again.stderr
    new = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()][len(metrics) :]
    assert {m["topic"] for m in new if "loss" in m} == {"capitulation"}

    answer = run_mlx(
        "generate",
        str(spec_with_model(tmp_path, tiny)),
        "--adapter",
        str(folder / "adapters" / "capitulation"),
        "What is a cycle low?",
        "--max-tokens",
        "12",
    )
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() and "<|im_end|>" not in answer.stdout


def test_changed_spec_and_bad_adapter_are_user_errors(tiny, tmp_path):
    first = run_mlx(
        "train",
        "configs/tiny-mlx.yaml",
        f"storage.path={tmp_path}",
        f"model.path={tiny}",
        "sft.max_steps=1",
        "dpo.enabled=false",
        "curriculum.topics=[cycle_basics]",
        "--name",
        "Y",
        "--no-progress",
    )
    assert first.returncode == 0, first.stderr
    changed = run_mlx(
        "train",
        "configs/tiny-mlx.yaml",
        f"storage.path={tmp_path}",
        f"model.path={tiny}",
        "sft.max_steps=2",
        "dpo.enabled=false",
        "curriculum.topics=[cycle_basics]",
        "--name",
        "Y",
        "--no-progress",
    )
    assert changed.returncode == 2 and "different spec" in changed.stderr and "Traceback" not in changed.stderr
    bad = run_mlx("generate", str(spec_with_model(tmp_path, tiny)), "--adapter", str(tmp_path), "hi")
    assert bad.returncode == 2 and "no adapter_config.json" in bad.stderr and "Traceback" not in bad.stderr


def test_prompt_masking_targets_only_assistant_turns(tiny):
    from mlx_lm.utils import load_tokenizer

    from local_mlx.data import sft_sequence

    tok = load_tokenizer(tiny)
    messages = [
        {"role": "user", "content": "What is a cycle low?"},
        {"role": "assistant", "content": "I think it is the lowest point."},
    ]
    seq = sft_sequence(tok, messages, 512)
    target = tok.decode([t for t, m in zip(seq.tokens, seq.target) if m])
    assert target == "I think it is the lowest point.<|im_end|>"  # the template's trailing newline is not trained


def test_nan_guard_stops_without_updating(tmp_path):
    import mlx.core as mx
    import mlx.nn as nn

    from local_mlx.stage import StageConfig, no_metrics, run_stage
    from local_mlx.training import finish_stage
    from mindprint_ray.runs.run_folder import RunFolder

    model = nn.Linear(4, 2)
    before = mx.array(model.weight)

    def nan_loss(model, x):
        return (model(x).sum() * mx.array(float("nan")), mx.array(1))

    batches = iter(lambda: ((mx.ones((1, 4)),), 4), None)
    result = run_stage(model, StageConfig("t", "sft", 3, 1, 0.1), batches, nan_loss, no_metrics, lambda r: None)
    assert result.bad[0] == "loss" and result.bad[2] == 1
    assert mx.array_equal(model.weight, before)
    folder = RunFolder(tmp_path / "run")
    folder.root.mkdir()
    with pytest.raises(UserError, match="learning_rate"):
        finish_stage(folder, "t", "sft", result)
    assert folder.summary()["topics"]["t"]["status"] == "failed"


def test_local_mlx_never_imports_torch_itself():
    for path in (ROOT / "local_mlx").glob("*.py"):
        text = path.read_text()
        assert "import torch" not in text and "from torch" not in text, path
    assert "torch" not in (ROOT / "mindprint_ray" / "runs" / "adapter_format.py").read_text().replace("no torch", "")


def test_the_reference_is_computed_for_the_pairs_the_stage_visits_each_once():
    from itertools import islice

    from local_mlx.data import shuffled_batches
    from local_mlx.training import visited_once

    pairs = [object() for _ in range(6)]
    few = list(islice(shuffled_batches(pairs, 2, seed=1), 2))  # 2 steps x batch 2 < 6 pairs
    assert visited_once(few) == [p for g in few for p in g] and len(visited_once(few)) == 4
    many = list(islice(shuffled_batches(pairs, 2, seed=1), 9))  # 3 epochs: every pair, once, by first visit
    once = visited_once(many)
    assert sorted(map(id, once)) == sorted(map(id, pairs)) and once[:2] == many[0]
