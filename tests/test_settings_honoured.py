"""Settings and paths that must not lie (issue 14): every spec field is read by what it claims to control, one
gradient-checkpointing rule per stage in the estimate and both backends, one wired-limit and one time model for
`plan` and `dry-run`, s3:// curricula and storage honoured, and resume from any working directory. No Ray."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
from conftest import ROOT, make_data, make_spec
from pydantic import BaseModel

from mindprint_ray.planning.run_plan import build_run


def tiny_spec(data_dir: Path, **sections):
    """A RunSpec for the tiny model (no model folder needed: nothing here loads it)."""
    from mindprint_ray.spec.run_spec import RunSpec

    spec = {
        "name": "t",
        "model": {"name": "tiny"},
        "curriculum": {"data_dir": str(data_dir), "topics": ["alpha"]},
        "hardware": {"profile": "cpu-2"},
    }
    for key, value in sections.items():
        spec.setdefault(key, {}).update(value)
    return RunSpec.model_validate(spec)


# ---- every spec field is read ----------------------------------------------------------------------------

# Fields the AST walk cannot see read outside spec.py, each with where it is read:
READ_IN_SPEC_PY = {
    "eval.general_text": "RunSpec.general_text_path (spec.py), called by curriculum.py and evaluation/runner.py",
}


def schema_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted paths of every field of the spec schema, through nested sections, lists and dicts of sections."""
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        stack = [field.annotation]
        while stack:
            ann = stack.pop()
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                out += schema_fields(ann, f"{prefix}{name}.")
            else:
                stack += list(getattr(ann, "__args__", ()))
    return out


def names_the_code_reads() -> set[str]:
    """Every attribute accessed (`x.name`) and every string constant in the packages, spec.py excepted."""
    names = set()
    for package in ("mindprint_ray", "local_mlx"):
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "mindprint_ray" / "spec.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Attribute):
                    names.add(node.attr)
                elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                    names.add(node.value)
    return names


def test_every_spec_field_is_read_by_the_code():
    from mindprint_ray.spec.run_spec import RunSpec

    fields = schema_fields(RunSpec)
    assert "sft.logging_steps" in fields and "tune.space.log" in fields  # the walk reaches nested sections
    read = names_the_code_reads()
    unread = [f for f in fields if f.split(".")[-1] not in read and f not in READ_IN_SPEC_PY]
    assert not unread, f"spec fields no code reads (wire them up or remove them): {unread}"


# ---- the trainer arguments carry the spec's values ---------------------------------------------------------


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_trainer_args_carry_the_stage_and_storage_settings(tmp_path, stage):
    from mindprint_ray.backends.ray_torch.trainer_args import trainer_args

    spec = tiny_spec(
        tmp_path,
        sft={
            "logging_steps": 5,
            "gradient_checkpointing": stage == "sft",
            "learning_rate": 3e-4,
            "max_grad_norm": 0.7,
            "warmup_steps": 3,
            "max_seq_length": 256,
        },
        dpo={
            "gradient_checkpointing": stage == "dpo",
            "learning_rate": 2e-6,
            "max_grad_norm": 0.2,
            "warmup_steps": 1,
            "max_seq_length": 128,
            "batch_size": 3,
        },
        storage={"keep_checkpoints": 4, "checkpoint_every_steps": 7},
    )
    args = trainer_args(spec, stage, str(tmp_path / "out"), gpu=False, deepspeed=None, native_bf16=False)
    section = spec.stage(stage)
    assert args["save_total_limit"] is None and args["save_steps"] == 7  # Ray keeps storage.keep_checkpoints
    assert args["logging_steps"] == (5 if stage == "sft" else 1)
    assert args["gradient_checkpointing"] is True  # each stage's own value (the other stage's is False)
    assert (
        args["learning_rate"],
        args["max_grad_norm"],
        args["warmup_steps"],
        args["max_length"],
        args["per_device_train_batch_size"],
    ) == (
        section.learning_rate,
        section.max_grad_norm,
        section.warmup_steps,
        section.max_seq_length,
        section.batch_size,
    )


def test_trl_configs_take_the_trainer_args_as_they_are(tmp_path):
    from trl import DPOConfig, SFTConfig

    from mindprint_ray.backends.ray_torch.trainer_args import trainer_args

    spec = tiny_spec(
        tmp_path,
        sft={"logging_steps": 3, "gradient_checkpointing": False},
        dpo={"gradient_checkpointing": True},
        storage={"keep_checkpoints": 5},
    )
    sft = SFTConfig(**trainer_args(spec, "sft", str(tmp_path / "sft"), False, None, False))
    dpo = DPOConfig(**trainer_args(spec, "dpo", str(tmp_path / "dpo"), False, None, False))
    # TRL's own defaults would be 10, None and True
    assert (sft.logging_steps, sft.save_total_limit, sft.gradient_checkpointing) == (3, None, False)
    assert (dpo.logging_steps, dpo.save_total_limit, dpo.gradient_checkpointing) == (1, None, True)


class FakeHFModel:
    """What set_checkpointing calls on the PEFT model's base, recorded."""

    def __init__(self):
        self.calls = []

    def get_base_model(self):
        return self

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.calls.append(("enable", gradient_checkpointing_kwargs))

    def gradient_checkpointing_disable(self):
        self.calls.append(("disable", None))

    def enable_input_require_grads(self):
        self.calls.append(("inputs", None))

    def disable_input_require_grads(self):
        pass


def test_the_worker_switches_checkpointing_at_each_stage_and_uses_trainer_args(tmp_path):
    from mindprint_ray.backends.ray_torch.topic_loop import Worker
    from mindprint_ray.backends.ray_torch.trainer_args import trainer_args

    worker = Worker.__new__(Worker)  # no model load: only what stage_args touches
    worker.spec = tiny_spec(
        tmp_path,
        sft={"gradient_checkpointing": False},
        dpo={"gradient_checkpointing": True},
        storage={"keep_checkpoints": 3},
    )
    worker.model, worker.writer, worker.local, worker.gpu, worker.ds_config = FakeHFModel(), None, tmp_path, False, None
    worker.run, worker.world = build_run(worker.spec), 2  # the profile's 2 workers: the spec's own batch layout
    worker.native_bf16 = True  # a device with bf16: the spec's sft.bf16 (on by default) decides
    sft = worker.stage_args("sft", "alpha")
    assert worker.model.calls[-1][0] == "disable"
    dpo = worker.stage_args("dpo", "alpha")
    assert worker.model.calls[-2:] == [("enable", {"use_reentrant": False}), ("inputs", None)]
    assert sft == trainer_args(worker.spec, "sft", str(tmp_path / "alpha-sft"), False, None, worker.native_bf16)
    assert sft["bf16"] and dpo["bf16"]
    assert dpo["gradient_checkpointing"] and not sft["gradient_checkpointing"]
    assert dpo["save_steps"] == sft["save_steps"] and dpo["save_total_limit"] is None
    worker.world = 1  # one worker left: it accumulates what two computed, the global batch stays the spec's
    one = worker.stage_args("dpo", "alpha")
    assert one["gradient_accumulation_steps"] == 2 * dpo["gradient_accumulation_steps"]
    assert one["per_device_train_batch_size"] == dpo["per_device_train_batch_size"]


def test_set_checkpointing_turns_a_real_peft_model_on_and_off():
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mindprint_ray.backends.ray_torch.model_loading import set_checkpointing

    config = Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
    )
    model = get_peft_model(Qwen2ForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj"]))
    layers = model.get_base_model().model.layers
    set_checkpointing(model, True)
    assert all(layer.gradient_checkpointing for layer in layers)
    set_checkpointing(model, False)
    assert not any(layer.gradient_checkpointing for layer in layers)


@pytest.mark.parametrize("sft_gc,dpo_gc", [(True, False), (False, True)])
def test_one_checkpointing_rule_in_the_estimate_and_both_backends(tmp_path, sft_gc, dpo_gc):
    from local_mlx.training import Trainer
    from mindprint_ray.backends.ray_torch.trainer_args import trainer_args
    from mindprint_ray.planning.estimates import memory_inputs
    from mindprint_ray.planning.run_plan import build_run

    run = build_run(tiny_spec(tmp_path, sft={"gradient_checkpointing": sft_gc}, dpo={"gradient_checkpointing": dpo_gc}))
    mlx = Trainer(run, model=None, tokenizer=None, log=lambda record: None)
    mlx_configs = {"sft": mlx.sft_config("alpha", 8), "dpo": mlx.dpo_config("alpha")}
    for stage, expected in (("sft", sft_gc), ("dpo", dpo_gc)):
        assert memory_inputs(run, stage).gradient_checkpointing is expected
        assert trainer_args(run.spec, stage, "out", False, None, False)["gradient_checkpointing"] is expected
        assert mlx_configs[stage].gradient_checkpointing is expected


def tiny_mlx_model():
    from mlx_lm.models.qwen2 import Model, ModelArgs

    return Model(
        ModelArgs(
            model_type="qwen2",
            hidden_size=32,
            num_hidden_layers=2,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            rms_norm_eps=1e-6,
            vocab_size=64,
            tie_word_embeddings=True,
        )
    )


def sft_batches(n: int = 64):
    import mlx.core as mx

    while True:
        tokens = mx.array([[i % n for i in range(1, 9)]])
        yield (tokens, mx.ones((1, 7))), 8


def test_mlx_stage_sets_its_checkpointing_and_logs_every_logging_steps():
    import mlx.core as mx

    from local_mlx.losses import sft_loss
    from local_mlx.model import is_checkpointing, set_checkpointing
    from local_mlx.stage import StageConfig, no_metrics, run_stage

    model = tiny_mlx_model()
    plain = type(model.layers[0]).__call__
    logged = []
    cfg = StageConfig("alpha", "sft", 5, 1, 1e-3, gradient_checkpointing=True, logging_steps=2)
    result = run_stage(model, cfg, sft_batches(), sft_loss, no_metrics, logged.append)
    assert is_checkpointing(model) and len(result.history) == 5
    assert [r["step"] for r in logged if "loss" in r] == [2, 4, 5]  # every 2nd step and the last
    cfg = StageConfig("alpha", "dpo", 1, 1, 1e-3, gradient_checkpointing=False)
    run_stage(model, cfg, sft_batches(), sft_loss, no_metrics, lambda record: None)
    assert not is_checkpointing(model) and type(model.layers[0]).__call__ is plain
    set_checkpointing(model, True)
    set_checkpointing(model, True)  # idempotent: one wrapper, and off restores the original
    set_checkpointing(model, False)
    assert type(model.layers[0]).__call__ is plain
    assert mx.isfinite(model(mx.array([[1, 2, 3]]))).all().item()


# ---- one wired limit, one time model -----------------------------------------------------------------------


def mac_run(*overrides: str):
    from mindprint_ray.planning.run_plan import load_run

    return load_run(ROOT / "configs" / "qwen72b-mac-studio.yaml", list(overrides))


def test_wired_limit_is_mib_and_plan_and_dry_run_print_the_same_value():
    from local_mlx.plan_check import memory_verdict
    from mindprint_ray.planning.estimates import MIB, remedies, wired_limit_mb

    assert wired_limit_mb(10.0, 56.0) == 11 * 1024  # 11e9 bytes need 10.24 GiB: 11 GiB, in MiB
    assert wired_limit_mb(60.0, 56.0) == int(56e9 / MIB)
    run = mac_run("sft.max_seq_length=2048", "dpo.max_seq_length=2048")
    verdict = memory_verdict(run)
    assert verdict.status == "raise"
    alone = next(r for r in remedies(run) if r["remedy"].startswith("sudo sysctl") and "+" not in r["remedy"])
    assert alone["remedy"].startswith(verdict.sysctl + " ") and alone["total_gb"] == round(verdict.need_gb, 2)
    assert alone["capacity_gb"] == round(verdict.ceiling_gb, 2)


def test_dry_run_hours_are_plan_hours():
    from local_mlx.plan_check import hours_lines
    from mindprint_ray.planning.plan_summary import plan_summary
    from mindprint_ray.planning.time_model import resolve_mfu
    from mindprint_ray.planning.topic_tokens import count_topic_tokens

    run = mac_run()
    tokens, _ = count_topic_tokens(run)
    lines = hours_lines(run, tokens, resolve_mfu(run))
    assert f"all 10 topics: {plan_summary(run)['time']['curriculum_hours']:.2f} h" in lines[-1]


def test_measured_throughput_gives_hours_at_that_throughput():
    from mindprint_ray.planning.time_model import throughput_mfu, topic_times
    from mindprint_ray.planning.topic_tokens import count_topic_tokens

    run = mac_run()
    tokens, _ = count_topic_tokens(run)
    mfu = throughput_mfu(run, tokens, {"sft": 1000.0, "dpo": 400.0}, "measured here")
    times = topic_times(run, tokens, mfu)
    assert math.isclose(sum(t.sft.tokens for t in times) / sum(t.sft.seconds for t in times), 1000.0, rel_tol=1e-9)
    assert math.isclose(sum(t.dpo.tokens for t in times) / sum(t.dpo.seconds for t in times), 400.0, rel_tol=1e-9)


def test_rank_4_remedy_keeps_the_users_zones():
    from dataclasses import replace

    from mindprint_ray.planning.estimates import peak_memory, remedies
    from mindprint_ray.planning.run_plan import build_run
    from mindprint_ray.planning.zones import build_plan
    from mindprint_ray.spec.run_spec import RunSpec

    def run(rank: int, mlp_rank: int | None):
        return build_run(
            RunSpec.model_validate(
                {
                    "model": {"name": "qwen2.5-72b"},
                    "hardware": {"profile": "1xh100-80gb"},
                    "curriculum": {"topics": ["a"]},
                    "lora": {
                        "rank": rank,
                        "zones": [
                            {"name": "only", "layers": [0, 3], "modules": ["q_proj"]},
                            {"name": "mlp", "layers": [70, 79], "modules": ["down_proj"], "rank": mlp_rank},
                        ],
                    },
                }
            )
        )

    rank4 = next(r for r in remedies(run(16, 32)) if r["remedy"] == "LoRA rank 4")
    expected = run(4, None)  # the same zones, every one at rank 4
    assert rank4["total_gb"] == round(peak_memory(expected)[1].total, 2)
    seed_zones = build_plan(expected.arch, "conservative", None, 4)  # what the remedy used to estimate
    assert round(peak_memory(replace(expected, zones=seed_zones))[1].total, 2) != rank4["total_gb"]


# ---- s3:// curricula and storage ---------------------------------------------------------------------------


def fake_s3(monkeypatch, tmp_path: Path, source: Path) -> None:
    """storage's S3 calls answered from a local folder (`source` is the bucket's prefix)."""
    import shutil

    from mindprint_ray.runs import storage

    monkeypatch.setenv("MINDPRINT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(storage, "check_read", lambda loc, field: None)
    monkeypatch.setattr(
        storage,
        "download_tree",
        lambda loc, target, relative="": shutil.copytree(source, target, dirs_exist_ok=True) and 1,
    )


def test_eval_reads_an_s3_curriculum_from_its_downloaded_copy(tmp_path, monkeypatch):
    from mindprint_ray.cli.commands.evaluate import _topics

    fake_s3(monkeypatch, tmp_path, make_data(tmp_path / "bucket"))
    spec = tiny_spec(tmp_path, curriculum={"data_dir": "s3://my-bucket/curriculum", "topics": ["alpha", "beta"]})
    topics = _topics(spec, None)
    assert [t.name for t in topics] == ["alpha", "beta"] and topics[0].eval
    assert spec.persona_path.is_file()  # the persona of the same copy


def test_facade_with_s3_output_writes_no_local_s3_folder(tmp_path, monkeypatch):
    from mindprint_ray import DPOPipeline, get_model_config
    from mindprint_ray.backends.ray_torch import driver

    class Done:
        def summary(self):
            return {"topics": {}}

    seen = {}
    monkeypatch.setattr(driver, "train", lambda run, progress=True: seen.setdefault("run", run) and Done())
    monkeypatch.setenv("MINDPRINT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    DPOPipeline(get_model_config("tiny")).train_topics(
        ["alpha"], str(make_data(tmp_path / "data")), "s3://my-bucket/runs", name="p"
    )
    assert not (tmp_path / "s3:").exists()
    assert seen["run"].spec.storage.path == "s3://my-bucket/runs"


def test_mlx_topic_pushes_metrics_like_the_ray_path(tmp_path, monkeypatch):
    from local_mlx import training
    from local_mlx.stage import StageResult
    from mindprint_ray.curriculum.topics import TopicData
    from mindprint_ray.planning.run_plan import build_run
    from mindprint_ray.runs.run_folder import RunFolder

    run = build_run(tiny_spec(tmp_path, dpo={"enabled": False}))
    folder = RunFolder(tmp_path / "run", remote="s3://my-bucket/runs/t")
    pushed = []
    monkeypatch.setattr(folder, "push", lambda relative="": pushed.append(relative) or 1)
    monkeypatch.setattr(training, "save_adapter", lambda model, zones, path, model_path: None)

    class FakeTrainer:
        def __init__(self):
            self.run, self.model = run, None

        def train_sft(self, topic):
            return StageResult(history=[{"step": 1, "loss": 1.0, "num_tokens": 8}])

    training.train_topic(FakeTrainer(), folder, TopicData("alpha"))
    assert "metrics.jsonl" in pushed and folder.topic_done("alpha")
    assert folder.summary()["topics"]["alpha"]["status"] == "done"


# ---- commands take dotted overrides -------------------------------------------------------------------------


def test_generate_commands_take_dotted_overrides(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import local_mlx.__main__ as mlx_cli
    from local_mlx import generation
    from mindprint_ray.backends.ray_torch import eval_runner as runner
    from mindprint_ray.cli.app import app

    spec = make_spec(tmp_path / "run.yaml", make_data(tmp_path / "data"))
    seen = []
    monkeypatch.setattr(runner, "load_model", lambda run, adapter: seen.append(run) or (None, None))
    monkeypatch.setattr(runner, "stream_answer", lambda *args: None)
    monkeypatch.setattr(generation, "load_with_adapter", lambda run, adapter: seen.append(run) or (None, None))
    monkeypatch.setattr(generation, "stream", lambda *args: iter(["ok"]))
    for cli in (app, mlx_cli.app):
        result = CliRunner().invoke(cli, ["generate", str(spec), "sft.max_seq_length=128", "What is a cycle low?"])
        assert result.exit_code == 0, result.output
        assert seen[-1].spec.sft.max_seq_length == 128


# ---- resume from any working directory ---------------------------------------------------------------------


def test_resume_from_another_working_directory(tmp_path, monkeypatch):
    """The same command from two checkouts (or two Ray job working_dirs): the second resumes, and spec.yaml
    keeps the relative paths while the workers' spec has absolute ones."""
    from mindprint_ray.backends.ray_torch.driver import for_workers
    from mindprint_ray.planning.run_plan import load_run
    from mindprint_ray.runs.run_folder import claim_run_folder

    storage = tmp_path / "runs"
    resumed = []
    for checkout in ("a", "b"):
        root = tmp_path / checkout
        make_data(root / "data")
        spec_file = make_spec(
            root / "run.yaml", Path("data"), storage={"path": str(storage)}, model={"path": "models/tiny"}
        )
        monkeypatch.chdir(root)
        run = load_run(spec_file)
        workers = for_workers(run)
        folder, again = claim_run_folder(run.spec)
        resumed.append(again)
        assert workers.spec.curriculum.data_dir == str(root / "data") and run.spec.curriculum.data_dir == "data"
    assert resumed == [False, True]
    assert "data_dir: data\n" in folder.spec_file.read_text()


def test_mlx_dpo_reference_is_checked_before_the_run_folder_is_claimed(tmp_path):
    from local_mlx.training import train_run
    from mindprint_ray.errors import UserError
    from mindprint_ray.planning.run_plan import build_run
    from mindprint_ray.runs.run_folder import RunFolder

    run = build_run(tiny_spec(make_data(tmp_path / "data"), storage={"path": str(tmp_path / "runs")}))
    with pytest.raises(UserError, match="unknown DPO reference"):
        train_run(run, reference="bogus")
    assert not RunFolder.for_storage(str(tmp_path / "runs"), "t").root.exists()
