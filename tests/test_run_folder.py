"""Finishing a topic in the run folder: the same manifest, status, stop message and metrics for both backends."""

from __future__ import annotations

import json

from conftest import ROOT

from mindprint_ray.planning.run_plan import load_run
from mindprint_ray.runs.run_folder import ADAPTER_MANIFEST, RunFolder, adapter_manifest, stopped_message


def test_a_stopped_stage_is_recorded_once_for_both_backends(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.root.mkdir()
    message = folder.stop_stage("t", "sft", ("loss", float("nan"), 3))
    assert message == stopped_message("t", "sft", ("loss", float("nan"), 3))
    assert "sft loss became nan at step 3" in message and "lower sft.learning_rate" in message
    entry = folder.summary()["topics"]["t"]
    assert entry["status"] == "failed" and entry["error"] == message
    assert folder.read_metrics()[-1] | {"time": 0} == {
        "time": 0,
        "event": "nan_guard",
        "topic": "t",
        "stage": "sft",
        "key": "loss",
        "step": 3,
    }


def test_a_finished_topic_has_its_manifest_status_and_tokens(tmp_path):
    run = load_run(ROOT / "configs" / "tiny-cpu.yaml")
    folder = RunFolder(tmp_path / "run")
    staging = folder.staging_dir("t")
    manifest = adapter_manifest(run, "t", "mlx", quantization=run.quant)
    assert list(manifest) == ["topic", "run", "model", "zones", "trainable_params", "format", "quantization", "created"]
    assert manifest["trainable_params"] == run.zones.trainable_params()
    folder.publish_adapter("t", staging, manifest)
    folder.finish_topic("t", 1.234, [{"tokens": 10}, {}])
    assert folder.topic_done("t")
    assert json.loads((folder.adapter_dir("t") / ADAPTER_MANIFEST).read_text())["format"] == "mlx"
    entry = folder.summary()["topics"]["t"]
    assert (entry["status"], entry["tokens"], entry["wall_s"]) == ("done", 10, 1.23)
    assert folder.read_metrics()[-1]["event"] == "topic_done"
