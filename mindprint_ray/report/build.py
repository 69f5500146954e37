"""Assemble the report: gather the data, draw the charts, write report.md and self-contained report.html."""

from __future__ import annotations

import json
from pathlib import Path

from mindprint_ray.planning.memory import TERMS
from mindprint_ray.planning.run_plan import RunPlan
from mindprint_ray.planning.step_budget import MAX_DPO_PASSES, MIN_STEPS, TABLE_HEADERS, headline, span, table_rows
from mindprint_ray.report import charts
from mindprint_ray.report.corrections import corrections
from mindprint_ray.report.data import gather_models, gather_options
from mindprint_ray.report.document import Document
from mindprint_ray.report.evaluation import eval_chart, eval_rows, eval_table, heldout_lines
from mindprint_ray.report.measured import measured_vs_estimate
from mindprint_ray.report.numbers import duration, signed_percent
from mindprint_ray.report.seed import SEED_MODELS
from mindprint_ray.report.training import loss_chart, reward_chart, sample_rows

ROWS = ("base_weights", "lora_weights", "gradients", "optimizer", "activations", "overhead", "total")


def write_report(
    run: RunPlan,
    out: Path,
    which: str = "all",
    run_dir: str | None = None,
    prices_path: str | None = None,
    price_override: float | None = None,
) -> dict[str, Path]:
    """Write report.md, report.html and the PNG charts into `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    options = gather_options(run, which, prices_path, price_override)
    if run_dir:  # a training report: what the run achieved first, then what it cost against the estimates
        doc = Document(f"Training report - {run.spec.name}")
        _results(doc, run, Path(run_dir), out)
        _step_budget(doc, options)
        _measured(doc, measured_vs_estimate(run_dir))
        doc.heading("Estimates")
    else:
        doc = Document(f"Cost estimate - {run.spec.name}")
    _intro(doc, run, options[0])
    if not run_dir:
        _step_budget(doc, options)
    _memory(doc, options, out)
    _time(doc, options, out)
    _corrections(doc, options, prices_path)
    _models(doc, gather_models(run, prices_path), options[0]["profile"])
    _prices(doc, options)
    paths = {"md": out / "report.md", "html": out / "report.html"}
    paths["md"].write_text(doc.markdown(), encoding="utf-8")
    paths["html"].write_text(doc.html(), encoding="utf-8")
    return paths


def _intro(doc: Document, run: RunPlan, first: dict) -> None:
    a, z = run.arch, run.zones
    doc.para(
        f"Model {a.name} ({a.total_params():,} parameters, {a.num_layers} layers), LoRA {z.strategy} "
        f"r={z.rank}: {z.trainable_params():,} trainable parameters in {len(z.zones)} zones "
        f"({', '.join(f'{x.name} {x.first}-{x.last}' for x in z.zones)}). Quantization {run.quant}; "
        f"SFT max_seq_length {run.spec.sft.max_seq_length}, micro-batch {run.spec.sft.batch_size}; DPO "
        f"max_seq_length {run.spec.dpo.max_seq_length}, micro-batch {run.spec.dpo.batch_size}; "
        f"{len(first['time']['topics'])} topics."
    )
    doc.para(
        f"Tokens per topic are counted from the curriculum ({run.spec.curriculum.data_dir}), "
        f"{first['time']['token_count']}. All memory figures are decimal GB (1e9 bytes) per device."
    )


def _memory(doc: Document, options: list[dict], out: Path) -> None:
    doc.heading("Memory per device")
    doc.image(charts.memory_chart(options, out / "memory.png"), "memory budget per device vs capacity")
    headers = ["term"] + [f"{o['profile']} ({o['memory']['phase'].upper()})" for o in options]
    rows = [[t] + [f"{o['memory']['peak'][t]:.2f}" for o in options] for t in ROWS]
    rows.append(["capacity"] + [f"{o['memory']['capacity_gb']:.2f}" for o in options])
    rows.append(["fits"] + ["yes" if o["memory"]["fits"] else "**no**" for o in options])
    doc.table(headers, rows)
    for o in options:
        m = o["memory"]
        sft, dpo = m["sft"]["total"], m.get("dpo", {}).get("total")
        doc.para(
            f"{o['profile']}: SFT {sft:.2f} GB"
            + (f", DPO {dpo:.2f} GB" if dpo is not None else "")
            + f" per device of {m['capacity_gb']:.2f} GB."
        )
        if not m["fits"]:
            doc.para(f"{o['profile']} does not fit. What would make it fit (estimated peak per device):")
            doc.bullets(
                [
                    f"{r['remedy']}: {r['total_gb']:.2f} GB of {r['capacity_gb']:.2f} GB - "
                    f"{'fits' if r['fits'] else 'still too big'}"
                    for r in m["remedies"]
                ]
            )
    doc.heading("What each term means", 3)
    doc.bullets([f"{k}: {v}" for k, v in TERMS.items()])


def _time(doc: Document, options: list[dict], out: Path) -> None:
    doc.heading("Time and cost")
    t0 = options[0]["time"]
    doc.para(
        "FLOPs per token: forward 2N (N = decoder linear weights + lm_head + LoRA); LoRA training 4N "
        "(forward + activation gradients; frozen weights need no weight gradients), 6N with gradient "
        "checkpointing; causal attention 2·layers·heads·head_dim·seq per forward token. DPO: the policy "
        "trains on chosen and rejected (each pair padded to its longer side) plus a 2N reference forward "
        "(once per pair when reference log-probs are precomputed). Time = FLOPs / (peak FLOP/s x devices x "
        f"MFU). {t0['excludes'].capitalize()}."
    )
    doc.image(charts.hours_chart(options, out / "hours.png"), "hours per topic per hardware option")
    doc.image(charts.cost_chart(options, out / "cost.png"), "curriculum cost per hardware option")
    headers = [
        "option",
        "MFU (source)",
        "effective TFLOP/s",
        "per topic",
        "curriculum",
        "$/h",
        "on-demand $",
        "spot $",
        "old list price $",
    ]
    rows = []
    for o in options:
        t = o["time"]
        rows.append(
            [
                o["profile"],
                f"{t['mfu']['sft']:.3g} ({t['mfu']['source']})",
                f"{t['effective_tflops']['sft']:,.1f}",
                duration(t["hours_per_topic"]),
                duration(t["curriculum_hours"]),
                f"{t['price']['per_hour']:.2f} ({t['price']['basis']})",
                f"{t['cost_on_demand_usd']:,.2f}",
                f"{t['cost_spot_usd']:,.2f}",
                f"{t['cost_previous_list_usd']:,.2f}" if "cost_previous_list_usd" in t else "-",
            ]
        )
    doc.table(headers, rows)
    doc.bullets([f"{o['profile']}: MFU {o['time']['mfu']['note']}" for o in options])
    doc.heading(f"Per topic - {options[0]['profile']}", 3)
    doc.image(charts.topics_chart(options[0], out / "topics.png"), "time and cost per topic")
    headers = (
        ["topic", "SFT tokens", "DPO tokens", "SFT", "DPO"]
        + [o["profile"] for o in options]
        + [f"$ {options[0]['profile']}"]
    )
    rows = []
    for i, r in enumerate(t0["topics"]):
        rows.append(
            [
                r["topic"],
                f"{r['sft']['tokens']:,}",
                f"{r.get('dpo', {}).get('tokens', 0):,}",
                duration(r["sft"]["hours"]),
                duration(r.get("dpo", {}).get("hours", 0.0)),
            ]
            + [duration(o["time"]["topics"][i]["hours"]) for o in options]
            + [f"{r['cost_usd']:,.2f}"]
        )
    doc.table(headers, rows)
    doc.para(
        "SFT and DPO columns are for the first option. Tokens are what the devices compute: SFT epochs x the "
        "topic's tokens (packed); DPO steps x global batch x mean padded pair length. DPO runs a fixed number of "
        "steps with a global batch of "
        "batch x gradient accumulation x devices, so more devices train on more pairs in the same steps."
    )


def _step_budget(doc: Document, options: list[dict]) -> None:
    """Optimizer steps, warmup, peak LR and passes per topic for the first option; a line for each other one."""
    doc.heading("Step budget")
    b = options[0]["step_budget"]
    doc.para(
        f"{options[0]['profile']}: {headline(b)}. batch_size is per device; a global batch is batch_size x "
        "gradient_accumulation x devices; sft.max_steps and dpo.steps_per_topic count optimizer steps of the "
        "whole group. Peak LR is the highest learning rate the schedule applies (warmup starts at 0); passes "
        f"are steps over steps per epoch. Warnings: warmup >= steps, fewer than {MIN_STEPS} steps, more than "
        f"{MAX_DPO_PASSES:g} DPO passes."
    )
    doc.table(TABLE_HEADERS, table_rows(b))
    doc.bullets(
        [f"Warning: {w['message']}. Fix: {w['fix']}." for w in b["warnings"]]
        or ["No warnings: every stage has enough steps, leaves warmup and revisits its pairs few times."]
    )
    if len(options) > 1:
        doc.para("The same spec on the other options (the device count changes the global batch):")
        doc.bullets([_budget_line(o) for o in options[1:]])


def _budget_line(option: dict) -> str:
    b = option["step_budget"]
    sft = [t["sft"] for t in b["topics"]]
    dpo = [t["dpo"] for t in b["topics"] if t["dpo"]]
    line = (
        f"{option['profile']} ({b['workers']} device(s)): SFT {span([s['steps'] for s in sft])} steps per topic, "
        f"peak LR {span([100 * s['peak_fraction'] for s in sft])}% of the configured one"
    )
    if dpo:
        line += f", DPO {span([d['passes'] for d in dpo])} passes over the pairs"
    return f"{line}; {len(b['warnings'])} warning(s)"


def _corrections(doc: Document, options: list[dict], prices_path: str | None) -> None:
    doc.heading("The seed guide's figures, checked")
    doc.table(
        ["item", "seed guide", "computed here", "note"],
        [[r["item"], r["seed"], r["computed"], r["note"]] for r in corrections(options, prices_path)],
    )


def _models(doc: Document, models: list[dict], primary: str) -> None:
    doc.heading("Model comparison (computed from the registry)")
    headers = [
        "model",
        "params",
        "layers",
        "context",
        "NF4 weights GB (seed INT4)",
        "MLX 4-bit GB",
        "BF16 weights GB (seed FP16)",
        "Mac Studio INT4 peak / 48 GB",
        "Mac Studio BF16 peak",
        "h/topic Mac Studio",
        f"h/topic {primary}",
    ]
    rows = []
    for m in models:
        s = SEED_MODELS.get(m["model"], {})
        cap = m["mac_capacity_gb"]
        rows.append(
            [
                m["model"],
                f"{m['params'] / 1e9:.2f}B",
                m["layers"],
                f"{m['context']:,}",
                f"{m['nf4_gb']:.1f} ({s.get('int4_gb', '-')})",
                f"{m['mlx4_gb']:.1f}",
                f"{m['bf16_gb']:.1f} ({s.get('bf16_gb', '-')})",
                f"{m['mac_int4_peak_gb']:.1f} - {'fits' if m['mac_int4_peak_gb'] <= cap else 'no'}",
                f"{m['mac_bf16_peak_gb']:.1f} - {'fits' if m['mac_bf16_peak_gb'] <= cap else 'no'}",
                duration(m["mac_hours_per_topic"]),
                duration(m["primary_hours_per_topic"]),
            ]
        )
    doc.table(headers, rows)
    doc.para(
        "Peaks are full training (SFT or DPO, whichever is larger) with this spec's sequence lengths and "
        "batch, on the Mac Studio's default GPU wired limit (75% of 64 GB). Seed figures in parentheses."
    )


def _measured(doc: Document, m: dict) -> None:
    doc.heading("Measured vs estimated")
    doc.para(
        f"Run {m['run']}: {m['model']} on {m['profile']} ({m['devices']} workers, {m['quant']}); tokens "
        f"{m['token_count']}. Estimates use the profile's assumed MFU (SFT {m['assumed_mfu']['sft']:.3g}, "
        f"DPO {m['assumed_mfu']['dpo']:.3g}); the run measured MFU "
        + ", ".join(f"{k.upper()} {v:.3g}" for k, v in m["measured_mfu"].items())
        + f". Measured memory is the {m['memory_kind']}. Error = (estimate - measured) / measured."
    )
    rows = [
        [
            r["topic"],
            r["stage"],
            f"{r['est_tokens']:,.0f}",
            f"{r['tokens']:,.0f}",
            signed_percent(r["tokens_err"]),
            f"{r['est_s']:.1f}",
            f"{r['s']:.1f}",
            signed_percent(r["s_err"]),
            f"{r['est_mem']:.3f}",
            f"{r['mem']:.3f}",
            signed_percent(r["mem_err"]),
        ]
        for r in m["rows"]
    ]
    doc.table(
        ["topic", "stage", "est. tokens", "tokens", "err", "est. s", "s", "err", "est. peak GB", "peak GB", "err"], rows
    )
    doc.para(
        "`mindprint-ray calibrate RUN_DIR` stores the measured MFU so that later estimates for this profile "
        "use it instead of the assumption."
    )


def _results(doc: Document, run: RunPlan, run_dir: Path, out: Path) -> None:
    """Loss and DPO reward curves per topic and stage, the held-out evaluation, and generated answers."""
    summary_file, metrics_file = run_dir / "summary.json", run_dir / "metrics.jsonl"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    metrics = (
        [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
        if metrics_file.is_file()
        else []
    )
    doc.heading("Training")
    doc.para(
        f"Run {run.spec.name}: {run.arch.name} ({run.model_path}), {len(summary.get('topics', {}))} topics, "
        f"status {summary.get('status', 'unknown')}. Curves are per optimizer step (SFT loss on the assistant "
        "tokens; DPO loss, reward accuracy and margin on the training batches)."
    )
    for chart, alt in (
        (loss_chart(metrics, out / "loss.png"), "loss per topic and stage"),
        (reward_chart(metrics, out / "rewards.png"), "DPO reward accuracy and margin"),
    ):
        if chart:
            doc.image(chart, alt)
    _evaluation(doc, run, summary, out)
    samples = sample_rows(summary)
    if samples:
        doc.heading("Generated answers (held-out questions, greedy)", 3)
        doc.table(["topic", "question", "stage", "answer"], samples)


def _evaluation(doc: Document, run: RunPlan, summary: dict, out: Path) -> None:
    """Per-topic voice fidelity and accuracy before training, after SFT and after DPO."""
    rows = eval_rows(summary)
    if not rows:
        return
    doc.heading("Held-out evaluation")
    doc.table(*eval_table(rows))
    doc.para(
        "Each score with its bootstrap 95% interval over the items; preference is scored on held-out DPO "
        "pairs only; general ppl is the perplexity of a neutral held-out text (lower is better)."
    )
    changes = heldout_lines(summary, run.spec)
    if changes:
        doc.bullets(changes)
    targets = {"voice_fidelity": run.spec.eval.voice_fidelity_target, "accuracy": run.spec.eval.accuracy_target}
    doc.image(eval_chart(rows, targets, out / "evaluation.png"), "voice fidelity and accuracy per topic")
    for line in summary.get("targets", {}).get("lines", []):
        doc.para(line)


def _prices(doc: Document, options: list[dict]) -> None:
    doc.heading("Prices used")
    rows = []
    for o in options:
        p = o["time"]["price"]
        rows.append(
            [
                o["profile"],
                p["key"],
                f"{p['on_demand']:.2f}",
                f"{p['spot']:.2f}",
                p["date"],
                p["source"],
                p["spot_source"],
            ]
        )
    doc.table(["option", "price", "on-demand $/h", "spot $/h", "date", "source", "spot source"], rows)
    doc.para(
        "Override with `--prices FILE` (same fields: on_demand, spot, source, date) or `--price-per-hour X` "
        "(applies to the first option)."
    )
