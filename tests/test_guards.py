"""The NaN/inf guard stops a real TRL trainer at the bad step; the driver turns it into one clear message."""

import math

from mindprint_ray.backends.ray_torch.driver import _stopped_message


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


def test_a_stopped_worker_becomes_one_message():
    text = (
        "ray.train.WorkerGroupError: Training failed due to worker errors:\n[Rank 0 Error Snippet]:\n"
        "Traceback (most recent call last):\n  File ...\nmindprint_ray.train.topic_loop.TrainingStopped: topic 'x': "
        "sft loss became nan at step 3; the topic was stopped and the last good adapter is kept.\n"
    )
    assert _stopped_message(RuntimeError(text)).startswith("topic 'x': sft loss became nan at step 3")
    assert _stopped_message(RuntimeError("some other failure")) is None


def test_out_of_memory_message_keeps_the_remedies():
    text = (
        "Error: OutOfMemoryStop: CUDA out of memory on 4xa100-80gb. The seed's remedies, in order:\n"
        "  - max_seq_length 2048: 61.2 GB per device (fits)\n  - LoRA rank 4: 70.1 GB per device (fits)\n"
        "Traceback (most recent call last):\n"
    )
    message = _stopped_message(RuntimeError(text))
    assert message.splitlines()[0].startswith("CUDA out of memory") and len(message.splitlines()) == 3
