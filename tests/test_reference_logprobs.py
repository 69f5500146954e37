"""DPO's frozen reference scored once per topic (issue 15, item 2): the rule (planning/dpo_reference.py) that the
worker, the time model and the multi-node model share, and, on the tiny model with torch and TRL (no Ray), that
the precomputed reference log-probs are the reference's (sft or base) and give the same DPO loss and gradients
as the reference forward at every step."""

from __future__ import annotations

from pathlib import Path

import pytest

from mindprint_ray.planning.dpo_reference import precompute_reference, run_precomputes
from mindprint_ray.planning.multinode import stage_bytes
from mindprint_ray.planning.run_plan import load_run
from mindprint_ray.planning.time_model import forward_flops_per_token, stage_flops
from mindprint_ray.planning.topic_tokens import TopicTokens

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-cpu.yaml"
QLORA = ROOT / "configs" / "qwen72b-qlora-8xh100.yaml"
PAIRS = [
    ("Where are we in the cycle?", "In my view we are early in the daily cycle.", "Prices go up."),
    ("What marks a cycle low?", "I think a break of the declining trend line confirms it.", "A low."),
    ("How long is a daily cycle?", "Clearly it runs about sixty days, low to low.", "It varies a lot."),
]


# ---- the rule ----------------------------------------------------------------------------------------------------


def test_auto_precomputes_exactly_when_pairs_are_revisited():
    assert precompute_reference("auto", pairs=20, steps=100, batch=1)  # each pair seen 5 times
    assert precompute_reference("auto", pairs=21, steps=10, batch=4)  # 40 pairs consumed > 21
    assert not precompute_reference("auto", pairs=200, steps=100, batch=2)  # one pass exactly: no revisit
    assert not precompute_reference("auto", pairs=500, steps=100, batch=2)
    assert not precompute_reference("auto", pairs=0, steps=100, batch=2)  # no pairs: no DPO to score
    assert precompute_reference(True, pairs=500, steps=1, batch=1)  # set: as set
    assert not precompute_reference(False, pairs=2, steps=100, batch=8)


def test_the_rule_counts_the_global_batch_of_every_worker():
    run = load_run(QLORA)  # dpo: 100 steps x batch 1 x accumulation 2 x 8 GPUs = 1,600 pairs consumed
    assert run_precomputes(run, 1599) and not run_precomputes(run, 1600)
    one_gpu = load_run(QLORA, ["hardware.num_workers=1"])  # 200 consumed
    assert run_precomputes(one_gpu, 199) and not run_precomputes(one_gpu, 200)
    never = load_run(QLORA, ["dpo.precompute_ref_log_probs=false"])
    assert not run_precomputes(never, 10)
    assert load_run(QLORA).spec.dpo.precompute_ref_log_probs == "auto"  # the default


def test_time_and_traffic_models_follow_the_rule():
    run = load_run(QLORA)
    few = TopicTokens("x", 10, 1000, 20, 4000, 5000)  # 20 pairs, revisited 80 times: auto precomputes
    many = TopicTokens("y", 10, 1000, 4000, 800_000, 1_000_000)  # 4,000 pairs > 1,600 consumed: no revisit
    fwd = forward_flops_per_token(run.arch, run.zones.trainable_params(), few.mean_dpo_length)
    off = load_run(QLORA, ["dpo.precompute_ref_log_probs=false"])
    # precomputed: one reference forward over every pair (5,000 padded tokens) instead of 80 passes
    assert stage_flops(off, few, "dpo")[1] - stage_flops(run, few, "dpo")[1] == pytest.approx(79 * 5000 * fwd)
    assert stage_flops(run, many, "dpo") == stage_flops(off, many, "dpo")
    forced = load_run(QLORA, ["dpo.precompute_ref_log_probs=true"])  # scores all 4,000 pairs, trains on 1,600
    fwd_many = forward_flops_per_token(run.arch, run.zones.trainable_params(), many.mean_dpo_length)
    extra = stage_flops(forced, many, "dpo")[1] - stage_flops(off, many, "dpo")[1]
    assert extra == pytest.approx((1_000_000 - 1600 / 4000 * 1_000_000) * fwd_many)
    z3 = ["hardware.deepspeed=zero3", "hardware.profile=2x8xh100-80gb"]
    assert stage_bytes(load_run(QLORA, z3), few, "dpo") < stage_bytes(load_run(QLORA, [*z3, *off_args()]), few, "dpo")


def off_args() -> list[str]:
    return ["dpo.precompute_ref_log_probs=false"]


def test_mlx_always_precomputes_and_only_the_pairs_its_steps_visit():
    mac = load_run(ROOT / "configs" / "qwen72b-mac-studio.yaml", ["dpo.precompute_ref_log_probs=false"])
    assert run_precomputes(mac, 10_000)
    # the same spec on one Ray worker, precompute on: TRL's pass scores every training pair
    ray = load_run(ROOT / "configs" / "qwen72b-mac-studio.yaml", ["hardware.profile=cpu", "hardware.num_workers=1"])
    ray.spec.dpo.precompute_ref_log_probs = True
    seen = ray.spec.dpo.steps_per_topic * ray.spec.dpo.batch_size * ray.spec.dpo.gradient_accumulation
    many = TopicTokens("y", 10, 1000, 4 * seen, 800_000, 1_000_000)  # 4x the pairs the steps visit
    fwd = forward_flops_per_token(mac.arch, mac.zones.trainable_params(), many.mean_dpo_length)
    saved = stage_flops(ray, many, "dpo")[1] - stage_flops(mac, many, "dpo")[1]
    assert saved == pytest.approx(3 / 4 * 1_000_000 * fwd)  # MLX scores a quarter of the pairs
    few = TopicTokens("x", 10, 1000, seen // 4, 4000, 5000)  # revisited: both score every pair once
    assert stage_flops(mac, few, "dpo") == pytest.approx(stage_flops(ray, few, "dpo"))


# ---- torch: the tiny model, TRL's DPOTrainer as the worker builds it -------------------------------------------


def tiny_run(model_dir: Path):
    overrides = [f"model.path={model_dir}", f"curriculum.data_dir={ROOT / 'data' / 'curriculum'}", "lora.dropout=0"]
    return load_run(TINY, overrides)  # no dropout in the independent forwards (DPO trains without it)


def sft_adapted_model(run):
    """The worker's zone-LoRA model with a non-zero adapter (as after SFT), so that sft and base differ."""
    import torch

    from mindprint_ray.backends.ray_torch.model_loading import apply_zone_plan, load_base_model

    base, _ = load_base_model(run, "cpu")
    model = apply_zone_plan(base, run, False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # A and B: every model built here holds the same adapter
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def dpo_trainer(run, reference: str, precompute: bool, tmp: Path, pairs: int = len(PAIRS), batch: int = 2):
    from datasets import Dataset
    from trl import DPOConfig

    from mindprint_ray.backends.ray_torch.model_loading import load_tokenizer
    from mindprint_ray.backends.ray_torch.trainer_args import trainer_args
    from mindprint_ray.backends.ray_torch.trainers import dpo_trainer_class

    rows = [
        {"prompt": [{"role": "user", "content": f"{q} ({i})"}], "chosen": [{"role": "assistant", "content": c}],
         "rejected": [{"role": "assistant", "content": r}]}
        for i, (q, c, r) in enumerate((PAIRS * pairs)[:pairs])
    ]  # fmt: skip
    common = trainer_args(run.spec, "dpo", str(tmp / f"{reference}-{precompute}"), False, None, False)
    common.update(save_strategy="no", report_to=[])
    args = DPOConfig(**common, max_steps=1, beta=run.spec.dpo.beta, precompute_ref_batch_size=batch)
    return dpo_trainer_class()(
        model=sft_adapted_model(run),
        ref_model=None,
        args=args,
        processing_class=load_tokenizer(run),
        train_dataset=Dataset.from_list(rows),
        reference=reference,
        precompute=precompute,
    )


def plain_sequence_logps(model, batch):
    """Summed completion log-probs of each row from the full logits (no fused head, no TRL)."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(-1)


def step(trainer, batch):
    """DPO loss and LoRA gradients of one batch, as a training step computes them."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reference", ["sft", "base"])
def test_precomputed_reference_equals_the_per_step_reference(tiny_model_dir, tmp_path, reference):
    import torch

    run = tiny_run(tiny_model_dir)
    pre = dpo_trainer(run, reference, True, tmp_path)
    plain = dpo_trainer(run, reference, False, tmp_path)
    assert pre.precompute_ref_logps and not plain.precompute_ref_logps
    assert "ref" not in pre.model.peft_config  # scored: the frozen copy is freed
    assert ("ref" in plain.model.peft_config) == (reference == "sft")  # per step: sft keeps TRL's frozen copy

    # the stored log-probs are the reference's, computed from the full logits of an independent forward
    rows = [pre.train_dataset[i] for i in range(len(PAIRS))]
    batch = pre.data_collator(rows)
    scorer = sft_adapted_model(run)  # the same adapter: the sft reference
    with scorer.disable_adapter() if reference == "base" else torch.no_grad():
        expected = plain_sequence_logps(scorer, batch)
    stored = torch.tensor([r["ref_chosen_logps"] for r in rows] + [r["ref_rejected_logps"] for r in rows])
    torch.testing.assert_close(stored, expected, atol=1e-5, rtol=1e-6)  # sums near -100 of fp32 terms
    # and they are what TRL's reference forward at a step gives, batch by batch
    plain_batch = plain.data_collator([plain.train_dataset[i] for i in range(len(PAIRS))])
    per_step = torch.cat(plain.compute_ref_log_probs(plain.model, plain_batch))
    torch.testing.assert_close(stored, per_step, atol=1e-5, rtol=0)
    if reference == "sft":
        with scorer.disable_adapter():
            assert (plain_sequence_logps(scorer, batch) - stored).abs().max() > 1e-3  # base differs: the test can fail

    # one DPO step: the same loss and LoRA gradients with the stored and the per-step reference
    loss_pre, grads_pre = step(pre, batch)
    loss_plain, grads_plain = step(plain, plain_batch)
    assert loss_pre == pytest.approx(loss_plain, abs=1e-5)
    assert grads_pre.keys() == grads_plain.keys() and grads_pre
    for name, g in grads_pre.items():
        torch.testing.assert_close(g, grads_plain[name], atol=1e-5, rtol=1e-5)


TWO_RANKS = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
import test_reference_logprobs as t
import torch.distributed as dist
trainer = t.dpo_trainer(t.tiny_run(Path(sys.argv[1])), "sft", True, Path(sys.argv[2]), pairs=5, batch=1)
rank = dist.get_rank()
scores = [list(trainer.train_dataset[name]) for name in ("ref_chosen_logps", "ref_rejected_logps")]
Path(sys.argv[2], f"rank{rank}.json").write_text(json.dumps(scores))
"""


@pytest.mark.slow
def test_every_rank_gets_every_pairs_reference_logps_in_order(tiny_model_dir, tmp_path):
    """Two gloo ranks (no Ray): each scores half the pairs (the sampler pads 5 pairs to 6), and both end with all
    five, in dataset order, equal to one process's. TRL's own precompute fails here (rank 1 cannot read the cache
    file rank 0 wrote in its own temporary folder)."""
    import json
    import subprocess
    import sys

    from conftest import free_port

    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    done = subprocess.run(
        [*cmd, str(script), str(tiny_model_dir), str(tmp_path), str(ROOT / "tests")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    one = dpo_trainer(tiny_run(tiny_model_dir), "sft", True, tmp_path, pairs=5, batch=1).train_dataset
    assert ranks[0] == ranks[1] and len(ranks[0][0]) == 5 and len(set(ranks[0][0])) == 5  # five distinct pairs
    assert ranks[0][0] == pytest.approx(list(one["ref_chosen_logps"]), abs=1e-5)
    assert ranks[0][1] == pytest.approx(list(one["ref_rejected_logps"]), abs=1e-5)
