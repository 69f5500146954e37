"""The Ray driver's configuration of Ray Train, checked without starting a cluster."""

from mindprint_ray.backends.ray_torch.driver import WORKER_ENV, build_trainer, for_workers
from mindprint_ray.planning.run_plan import load_run
from mindprint_ray.runs.run_folder import RunFolder


def test_the_workers_get_their_env_and_ray_train_logs_stay_out_of_the_terminal(tmp_path, monkeypatch):
    """Whether train starts a local cluster, joins one (RAY_ADDRESS) or runs as a job, the env reaches the
    workers through RunConfig.worker_runtime_env, and Ray Train's per-report INFO lines stay in its log files."""
    monkeypatch.delenv("MINDPRINT_RAY_TRAIN_LOG_LEVEL", raising=False)
    run = load_run("configs/tiny-cpu.yaml", [f"storage.path={tmp_path}"])
    trainer = build_trainer(for_workers(run), RunFolder(tmp_path / "r"))
    config = trainer.run_config
    assert config.worker_runtime_env == {"env_vars": {**WORKER_ENV, "MINDPRINT_RAY_TRAIN_LOG_LEVEL": "WARNING"}}
    assert WORKER_ENV["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0" and WORKER_ENV["TOKENIZERS_PARALLELISM"] == "false"
    assert config.logging_config.log_level == "WARNING"
    monkeypatch.setenv("MINDPRINT_RAY_TRAIN_LOG_LEVEL", "info")
    assert build_trainer(for_workers(run), RunFolder(tmp_path / "r")).run_config.logging_config.log_level == "INFO"


def test_gpu_workers_that_fit_one_node_stay_on_it(tmp_path):
    """STRICT_PACK for 8 GPU workers of an 8-GPU node (NVLink); PACK over two nodes and for CPU workers."""
    folder = RunFolder(tmp_path / "r")
    cases = {
        ("configs/qwen72b-qlora-8xh100.yaml", ()): "STRICT_PACK",
        ("configs/qwen72b-bf16-2x8xh100.yaml", ()): "PACK",
        ("configs/tiny-cpu.yaml", ()): "PACK",
    }
    for (config, overrides), strategy in cases.items():
        run = load_run(config, [f"storage.path={tmp_path}", *overrides])
        assert build_trainer(for_workers(run), folder).scaling_config.placement_strategy == strategy, config


def test_ray_trains_report_lines_leave_the_console_but_not_the_log_files():
    """Ray 2.60 logs 'Reporting training result' from a logger named by its file path: the console filter
    drops it (and other Ray Train INFO), and keeps warnings and everything that is not Ray Train's."""
    import logging

    from mindprint_ray.backends.ray_torch.topic_loop import RayTrainConsoleFilter

    quiet = RayTrainConsoleFilter("WARNING")

    def record(name, level):
        return logging.LogRecord(name, level, __file__, 1, "Reporting training result 1", None, None)

    context_py = "/venv/lib/python3.11/site-packages/ray/train/v2/_internal/execution/context.py"
    assert not quiet.filter(record(context_py, logging.INFO))
    assert not quiet.filter(record("ray.train.v2._internal.execution.controller", logging.INFO))
    assert quiet.filter(record(context_py, logging.WARNING))
    assert quiet.filter(record("mindprint_ray", logging.INFO))
    assert RayTrainConsoleFilter("info").filter(record(context_py, logging.INFO))


def test_elastic_workers_retention_and_preemption_reach_ray_train(tmp_path):
    """hardware.num_workers [min, max] becomes Ray Train V2's elastic (min, max); storage.keep_checkpoints is
    Ray's num_to_keep (the trainer keeps none of its own: uploads delete the local copies); the preemption budget
    is counted apart from max_failures."""
    run = load_run(
        "configs/tiny-cpu.yaml",
        [
            f"storage.path={tmp_path}",
            "hardware.num_workers=[1,3]",
            "storage.keep_checkpoints=4",
            "ray.max_failures=1",
            "ray.max_preemptions=5",
            "ray.preemption_grace_s=30",
        ],
    )
    trainer = build_trainer(for_workers(run), RunFolder(tmp_path / "r"))
    assert trainer.scaling_config.num_workers == (1, 3) and trainer.scaling_config.elasticity_enabled
    config = trainer.run_config
    assert config.checkpoint_config.num_to_keep == 4
    failure = config.failure_config
    assert (failure.max_failures, failure.max_preemption_failures, failure.preemption_grace_s) == (1, 5, 30.0)
    fixed = build_trainer(
        for_workers(load_run("configs/tiny-cpu.yaml", [f"storage.path={tmp_path}"])), RunFolder(tmp_path / "r")
    )
    assert fixed.scaling_config.num_workers == 2 and not fixed.scaling_config.elasticity_enabled
