"""The NaN/inf guard stops a real TRL trainer at the bad step; the driver turns it into one clear message."""

import math

from mindprint_ray.backends.ray_torch.driver import worker_stop
from mindprint_ray.errors import UserError


def test_nan_loss_stops_the_trainer_at_the_bad_step(tmp_path, tiny_model_dir):
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from mindprint_ray.backends.ray_torch.callbacks import MetricsCallback
    from mindprint_ray.planning.run_plan import load_run
    from mindprint_ray.runs.run_folder import RunFolder

    run = load_run("configs/tiny-cpu.yaml", [f"model.path={tiny_model_dir}"])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(**run.zones.peft_kwargs()))
    with torch.no_grad():  # a poisoned adapter: every forward pass gives a NaN loss
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    data = Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "I think so."}]}
            for i in range(8)
        ]
    )
    folder = RunFolder(tmp_path / "run")
    folder.root.mkdir(parents=True)
    guard = MetricsCallback(folder, "t", "sft")
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=2,
        save_strategy="no",
        disable_tqdm=True,
        max_length=64,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[guard])
    trainer.train()
    assert guard.bad is not None and guard.bad[0] in ("loss", "grad_norm") and not math.isfinite(guard.bad[1])
    assert trainer.state.global_step == 1  # stopped at the first bad step, not after six
    assert any(r.get("stage") == "sft" for r in folder.read_metrics())


def worker_group_error(failures: dict):
    """Ray Train's own failure, as trainer.fit() raises it, after a pickle round trip (as from a worker)."""
    import pickle

    from ray.train import WorkerGroupError

    return pickle.loads(pickle.dumps(WorkerGroupError("rank errors", failures)))


def test_a_stopped_worker_becomes_one_message():
    from mindprint_ray.backends.ray_torch.topic_loop import TrainingStopped

    stop = TrainingStopped("topic 'x': sft loss became nan at step 3; the last good adapter is kept.")
    message = worker_stop(worker_group_error({1: RuntimeError("rank 1 saw the stop"), 0: stop}))
    assert isinstance(message, UserError) and str(message).startswith("topic 'x': sft loss became nan at step 3")
    # a crash, a lost node or Ray's text mentioning our error names are Ray's to retry
    assert worker_stop(worker_group_error({0: RuntimeError("TrainingStopped: topic 'x'")})) is None
    assert worker_stop(RuntimeError("mindprint_ray...TrainingStopped: topic 'x'")) is None


def test_a_user_error_from_a_worker_keeps_its_file_field_and_hint():
    error = UserError("no chat template", file="models/x/tokenizer_config.json", field="model.path", hint="add one")
    stop = worker_stop(worker_group_error({0: error}))
    assert (stop.file, stop.field, stop.hint) == ("models/x/tokenizer_config.json", "model.path", "add one")


def test_out_of_memory_message_keeps_the_remedies():
    from mindprint_ray.backends.ray_torch.topic_loop import OutOfMemoryStop

    text = (
        "CUDA out of memory on 4xa100-80gb. The seed's remedies, in order:\n"
        "  - max_seq_length 2048: 61.2 GB per device (fits)\n  - LoRA rank 4: 70.1 GB per device (fits)"
    )
    message = str(worker_stop(worker_group_error({0: OutOfMemoryStop(text)})))
    assert message.splitlines()[0].startswith("CUDA out of memory") and len(message.splitlines()) == 3
