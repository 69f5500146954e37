"""`python -m local_mlx dry-run CFG`: will this Mac run fit and work? Checked in minutes, before a days-long run.

Validates spec and data, prints the memory plan against the GPU wired limit (and the sysctl that raises it),
hours per topic, then runs a few real SFT and DPO steps: on the configured model when it is on this machine,
otherwise on the tiny model with the same zone layout scaled to its 8 layers. Returns 1 when the plan cannot fit.
"""

from __future__ import annotations

from pathlib import Path

from mindprint_ray.curriculum.validation import validate_run
from mindprint_ray.errors import UserError
from mindprint_ray.models.tiny import ensure_tiny_model
from mindprint_ray.planning.hardware import load_profiles
from mindprint_ray.planning.registry import get_arch
from mindprint_ray.planning.run_plan import RunPlan, build_run, load_run
from mindprint_ray.planning.time_model import Mfu, resolve_mfu, throughput_mfu
from mindprint_ray.planning.topic_tokens import count_topic_tokens
from mindprint_ray.spec.run_spec import RunSpec

from .model import cached_model_dir, load_for_training
from .plan_check import hours_lines, memory_lines, memory_verdict
from .training import Trainer

TINY_PATH = "models/tiny"


def mac_run(run: RunPlan) -> RunPlan:
    """The run on an MLX profile: the spec's own, or the first MLX profile when the spec names a Ray one."""
    if run.profile.backend == "mlx":
        return run
    name = next(n for n, p in load_profiles().items() if p.backend == "mlx")
    print(f"note: hardware.profile '{run.profile.name}' is not an MLX profile; planning for '{name}'")
    data = run.spec.model_dump(mode="json")
    data["hardware"]["profile"] = name
    return build_run(RunSpec.model_validate(data))


def standin_run(run: RunPlan) -> RunPlan:
    """The tiny model with the plan's zones as fractions of the layer stack (same modules, rank and alpha)."""
    layers = run.arch.num_layers
    data = run.spec.model_dump(mode="json")
    data["model"] = {"name": "tiny", "path": TINY_PATH}
    data["lora"]["zones"] = [
        {
            "name": z.name,
            "fraction": [z.first / layers, (z.last + 1) / layers],
            "modules": list(z.modules),
            "rank": z.rank,
            "alpha": z.alpha,
            "dropout": z.dropout,
        }
        for z in run.zones.zones
    ]
    limit = get_arch("tiny").max_position_embeddings
    for section in ("sft", "dpo"):
        data[section]["max_seq_length"] = min(data[section]["max_seq_length"], limit)
    try:
        return build_run(RunSpec.model_validate(data))
    except UserError as e:
        raise UserError(
            f"the zone layout does not scale to the tiny model's 8 layers: {e.message}",
            field="lora.zones",
            hint="zones narrower than 1/8 of the layers have no tiny stand-in",
        ) from None


def run_steps(run: RunPlan, folder: Path | None, steps: int) -> dict:
    """A few real SFT and DPO steps on the first topic; loss, tokens/s and peak memory of each stage."""
    import mlx.core as mx

    topics, _, _ = validate_run(run)
    mx.random.seed(run.spec.seed)
    model, tokenizer = load_for_training(run, folder)
    trainer = Trainer(run, model, tokenizer, log=lambda record: None)
    results = {"sft": trainer.train_sft(topics[0], max_steps=steps)}
    if run.spec.dpo.enabled and topics[0].dpo and not results["sft"].bad:
        results["dpo"] = trainer.train_dpo(topics[0], max_steps=steps)
    return {stage: r for stage, r in results.items() if r is not None}


def step_lines(label: str, results: dict) -> list[str]:
    lines = [f"steps on {label}:"]
    for stage, r in results.items():
        s = r.summary(stage)
        if r.bad:
            lines.append(f"  {stage.upper()}: {r.bad[0]} became {r.bad[1]} at step {r.bad[2]} (NaN guard)")
            continue
        extra = f", reward acc {s['reward_accuracy']:.2f}" if stage == "dpo" else ""
        lines.append(
            f"  {stage.upper()}: {s['steps']} steps, loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}"
            f"{extra}, {s['tokens_per_s']:.0f} tokens/s, peak memory {s['peak_memory_gb']:.3f} GB"
        )
    return lines


def hours_mfu(run: RunPlan, tokens: list, measured: dict | None) -> Mfu:
    """The MFU of the hours estimate: what the configured model's measured tokens/s implies, else plan's."""
    if measured and "sft" in measured:
        return throughput_mfu(run, tokens, measured, f"measured on this machine with {run.arch.name}")
    return resolve_mfu(run)


def dry_run(config: Path, overrides: list[str], steps: int = 3) -> int:
    """Print the checks; 0 when the run can start (possibly after the printed sysctl), 1 when it cannot."""
    run = mac_run(load_run(config, overrides))
    topics, rows, counter = validate_run(run)
    print(
        f"{run.spec.name}: {run.arch.name} ({run.arch.total_params():,} params), {run.quant} "
        f"({'MLX 4-bit, group 64' if run.quant == 'nf4' else run.quant}), profile {run.profile.name}"
    )
    print(
        f"data: {len(topics)} topics, {sum(r.sft for r in rows)} SFT examples, {sum(r.dpo for r in rows)} DPO pairs "
        f"validated ({'exact' if counter.exact else 'approximate, 4 chars/token'} token counts)"
    )
    zones = ", ".join(f"{z.name} {z.first}-{z.last} {'/'.join(z.modules)} r={z.rank}" for z in run.zones.zones)
    print(f"zones: {zones}; {run.zones.trainable_params():,} trainable params")
    verdict = memory_verdict(run)
    print("memory plan:")
    print("\n".join(memory_lines(run, verdict)))
    local = cached_model_dir(run.model_path)
    measured, results = None, {}
    if local and verdict.status != "no":
        results = run_steps(run, local, steps)
        print("\n".join(step_lines(f"{run.arch.name} ({local})", results)))
        measured = {k: r.summary(k)["tokens_per_s"] for k, r in results.items() if not r.bad}
    tokens, _ = count_topic_tokens(run, counter)
    print("\n".join(hours_lines(run, tokens, hours_mfu(run, tokens, measured))))
    if not local or verdict.status == "no":
        why = "does not fit, so it is not loaded" if local else f"is not on this machine ({run.model_path})"
        standin = standin_run(run)
        ensure_tiny_model(TINY_PATH, run.spec.curriculum.data_dir)
        zones = ", ".join(f"{z.name} {z.first}-{z.last}" for z in standin.zones.zones)
        print(f"the configured model {why}; running on the tiny stand-in (zones scaled: {zones})")
        results = run_steps(standin, None, steps)
        print("\n".join(step_lines("the tiny stand-in", results)))
    if any(r.bad for r in results.values()):
        print("result: training produced NaN/inf; lower the learning rates before starting the run")
        return 1
    if verdict.status == "no":
        print(
            f"result: the plan does not fit: {verdict.peak_phase.upper()} needs {verdict.need_gb:.1f} GB, "
            f"the wired limit can give at most {verdict.ceiling_gb:.1f} GB; apply a remedy above"
        )
        return 1
    print("result: ready" + (f" after `{verdict.sysctl}`" if verdict.status == "raise" else ""))
    return 0
