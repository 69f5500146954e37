"""Terminal tables for `validate` and `plan` (rich)."""

from __future__ import annotations

import shutil

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from mindprint_ray.curriculum.data_stats import TopicStats
from mindprint_ray.curriculum.tokens import TokenCounter
from mindprint_ray.evaluation.gates import latest_stage
from mindprint_ray.planning.run_plan import RunPlan
from mindprint_ray.planning.step_budget import TABLE_HEADERS, headline, table_rows
from mindprint_ray.report.numbers import duration, gb, score, usd, with_interval


def console() -> Console:
    """The terminal the commands print to: at least 120 columns wide, so tables keep one line per row."""
    return Console(highlight=False, width=max(shutil.get_terminal_size((140, 40)).columns, 120))


def progress_columns() -> tuple[ProgressColumn, ...]:
    """The training progress bar's columns (both backends): stage, bar, steps done of all, loss, elapsed."""
    return (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )


def print_validation(
    console: Console, run: RunPlan, rows: list[TopicStats], counter: TokenCounter, budget: dict | None = None
) -> None:
    spec = run.spec
    how = (
        "exact (model tokenizer + chat template)"
        if counter.exact
        else f"approximate (~4 chars/token: no tokenizer at {run.model_path})"
    )
    table = Table(title=f"{spec.name}: {len(rows)} topics valid - tokens {how}")
    for col in ("topic", "sft", "dpo", "eval", "sft tokens", "p50", "p95", "max", "over sft", "over dpo", "action"):
        table.add_column(col, justify="left" if col in ("topic", "action") else "right")
    for r in rows:
        table.add_row(
            r.topic,
            str(r.sft),
            str(r.dpo),
            str(r.eval),
            f"{r.sft_tokens:,}",
            str(r.p50),
            str(r.p95),
            str(r.max),
            str(r.sft_over),
            str(r.dpo_over),
            r.action,
        )
    console.print(table)
    over = sum(r.sft_over + r.dpo_over for r in rows)
    console.print(
        f"max_seq_length: sft {spec.sft.max_seq_length}, dpo {spec.dpo.max_seq_length}; "
        f"over-long policy '{spec.curriculum.overlong}': {over} example(s) affected"
    )
    if budget is not None:
        print_step_budget(console, budget)
    console.print("[green]OK[/green] spec and data are valid")


def print_step_budget(console: Console, b: dict) -> None:
    """Per topic: optimizer steps, peak LR reached and passes over the data of SFT and DPO; then the warnings."""
    if "error" in b:
        console.print(f"[yellow]step budget not computed[/yellow]: {b['error']}")
        return
    console.print(f"step budget ({headline(b)})")
    table = Table(title="step budget per topic")
    for col in TABLE_HEADERS:
        table.add_column(col, justify="left" if col == "topic" else "right")
    for row in table_rows(b):
        table.add_row(*row)
    console.print(table)
    for w in b["warnings"]:
        console.print(f"[yellow]warning[/yellow]: {w['message']}\n  fix: {w['fix']}")
    if not b["warnings"]:
        t = b["thresholds"]
        console.print(
            f"[green]step budget OK[/green]: every stage has at least {t['min_steps']} steps and leaves "
            f"warmup; DPO passes at most {t['max_dpo_passes']:g}"
        )


def print_data_warnings(console: Console, warnings: list[str]) -> None:
    """`validate`'s warnings (yellow): the run may go ahead, but the evaluation is weaker for them."""
    for message in warnings:
        console.print(f"[yellow]warning[/yellow] {message}", soft_wrap=True)
    if warnings:
        console.print(
            f"[yellow]{len(warnings)} warning(s)[/yellow]: an eval question that training sees does "
            "not measure held-out ability; reword it or drop the training example"
        )


def print_plan(console: Console, s: dict) -> None:
    m, lora, hw = s["model"], s["lora"], s["hardware"]
    console.print(
        f"[bold]{s['run']}[/bold]: {m['name']} ({m['path']}) - {m['total_params']:,} params, {m['layers']} layers"
    )
    console.print(
        f"LoRA {lora['strategy']}: r={lora['rank']} alpha={lora['alpha']} dropout={lora['dropout']}"
        f"{' rsLoRA' if lora['use_rslora'] else ''} - {lora['trainable_params']:,} trainable "
        f"({lora['trainable_percent']}%)"
    )
    zones = Table(title="zones")
    for col in ("zone", "layers", "modules", "rank", "alpha", "params"):
        zones.add_column(col, justify="right" if col in ("rank", "alpha", "params") else "left")
    for z in lora["zones"]:
        zones.add_row(
            z["name"],
            f"{z['layers'][0]}-{z['layers'][1]} ({z['num_layers']})",
            " ".join(z["modules"]),
            str(z["rank"]),
            f"{z['alpha']:g}",
            f"{z['params']:,}",
        )
    zones.add_row("total", "", "", "", "", f"{lora['trainable_params']:,}", style="bold")
    console.print(zones)
    a = s["adapter"]
    console.print(
        f"adapter size: {a['bf16_mb']} MB in bf16, {a['fp32_mb']} MB in fp32 "
        f"(the seed's {a['seed_claim_mb']} MB is neither)"
    )
    mem = s["memory"]
    title = (
        f"memory per device (GB) - {hw['profile']}: {hw['devices']} device(s), {s['quantization']}, "
        f"ZeRO-{hw['deepspeed_stage']}"
        if hw["deepspeed_stage"]
        else f"memory per device (GB) - {hw['profile']}: {hw['devices']} device(s), {s['quantization']}"
    )
    table = Table(title=title)
    table.add_column("term")
    table.add_column("SFT", justify="right")
    has_dpo = "dpo_per_device_gb" in mem
    if has_dpo:
        table.add_column("DPO", justify="right")
    for term in ("base_weights", "lora_weights", "gradients", "optimizer", "activations", "overhead", "total"):
        cells = [gb(mem["sft_per_device_gb"][term])]
        if has_dpo:
            cells.append(gb(mem["dpo_per_device_gb"][term]))
        table.add_row(term, *cells, style="bold" if term == "total" else None)
    console.print(table)
    console.print("(`mindprint-ray report CFG` explains each term)")
    verdict = "[green]fits[/green]" if mem["fits"] else "[red]does not fit[/red]"
    console.print(
        f"peak ({mem['phase']}): {gb(mem['per_device_gb']['total'])} GB of {gb(mem['capacity_gb'])} GB "
        f"capacity - {verdict}"
    )
    for r in mem.get("remedies", []):
        console.print(f"  remedy: {r['remedy']}: {gb(r['total_gb'])} GB - {'fits' if r['fits'] else 'still too big'}")
    _print_time(console, s.get("time", {}))
    if "step_budget" in s:
        print_step_budget(console, s["step_budget"])
    if "elastic" in s:
        print_elastic(console, s["elastic"])
    for warning in s.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {warning}")


def print_elastic(console: Console, e: dict) -> None:
    """The batch layout of each worker count of an elastic group (planning/elastic.py)."""
    table = Table(title=f"elastic workers {e['min_workers']}-{e['max_workers']}: the same global batch at any count")
    for col in ("workers", "SFT batch x accum", "SFT global", "DPO batch x accum", "DPO global", "step time"):
        table.add_column(col, justify="right")
    for c in e["counts"]:
        cells = [str(c["workers"])]
        for stage in ("sft", "dpo"):
            layout = c[stage]
            cells.append(f"{layout['batch_size']} x {layout['gradient_accumulation']}")
            cells.append(f"{layout['global_batch']}" + ("" if layout["exact"] else " (rounded up)"))
        table.add_row(*cells, f"x{c['time_factor']:g}")
    console.print(table)
    console.print(f"({e['assumes']})")


def _print_time(console: Console, t: dict) -> None:
    if "error" in t:
        console.print(f"[yellow]time and cost not estimated[/yellow]: {t['error']}")
        return
    m, p = t["mfu"], t["price"]
    console.print(
        f"time: {t['effective_tflops']['sft']:,.0f} effective TFLOP/s (MFU {m['sft']:.3g} SFT / "
        f"{m['dpo']:.3g} DPO, {m['source']}: {m['note']}); tokens {t['token_count']}"
    )
    table = Table(title=f"time and cost per topic - {usd(p['per_hour'])}/h ({p['basis']}, {p['key']}, {p['date']})")
    for col in ("topic", "SFT tokens", "DPO tokens", "SFT", "DPO", "total", "cost"):
        table.add_column(col, justify="left" if col == "topic" else "right")
    for r in t["topics"]:
        dpo = r.get("dpo", {"tokens": 0, "hours": 0.0})
        table.add_row(
            r["topic"],
            f"{r['sft']['tokens']:,}",
            f"{dpo['tokens']:,}",
            duration(r["sft"]["hours"]),
            duration(dpo["hours"]),
            duration(r["hours"]),
            usd(r["cost_usd"]),
        )
    table.add_row("curriculum", "", "", "", "", duration(t["curriculum_hours"]), usd(t["cost_usd"]), style="bold")
    console.print(table)
    line = f"curriculum: on-demand {usd(t['cost_on_demand_usd'])}, spot {usd(t['cost_spot_usd'])}"
    if "cost_previous_list_usd" in t:
        line += f", at the old list price ${p['previous_list_price']}/h: {usd(t['cost_previous_list_usd'])}"
    console.print(f"{line} ({t['excludes']})")


def topic_result_line(topic: str, entry: dict) -> str:
    """After training, one line per topic of summary.json: its status, SFT loss first -> last, DPO rewards."""
    sft, dpo = entry.get("sft", {}), entry.get("dpo", {})
    return (
        f"{topic}: {entry.get('status')} - SFT loss {score(sft.get('first_loss'))} -> "
        f"{score(sft.get('last_loss'))}, DPO reward acc {score(dpo.get('reward_accuracy'))}, "
        f"margin {score(dpo.get('reward_margin'))}"
    )


def before_after_rows(summary: dict) -> list[dict]:
    """Per trained topic: held-out scores of the base model and after the topic's last stage, with intervals."""
    rows = []
    gains = summary.get("targets", {}).get("heldout_gain", {})
    for topic in summary.get("topics_order") or list(summary.get("topics", {})):
        evals = summary.get("topics", {}).get(topic, {}).get("eval", {})
        stage = latest_stage(evals)
        if "base" not in evals or stage is None:
            continue
        base, after, gain = evals["base"], evals[stage], gains.get(topic, {})
        rows.append({"topic": topic, "stage": stage, "base": base, "after": after, "gain": gain})
    return rows


def print_before_after(console: Console, summary: dict) -> None:
    """The held-out before/after table (95% bootstrap intervals) and one answer from the base and the adapter."""
    rows = before_after_rows(summary)
    if not rows:
        return
    table = Table(title="held-out evaluation: base model -> after training, 95% bootstrap intervals")
    for col in ("topic", "voice fidelity: base", "after", "paired difference", "accuracy", "general ppl"):
        table.add_column(col, justify="left" if col == "topic" else "right", no_wrap=True)
    for r in rows:
        b, a, g = r["base"], r["after"], r["gain"]
        table.add_row(
            r["topic"],
            with_interval(b.get("voice_fidelity"), b.get("voice_fidelity_ci")),
            with_interval(a.get("voice_fidelity"), a.get("voice_fidelity_ci")),
            with_interval(g.get("diff"), g.get("diff_ci")),
            f"{score(b.get('accuracy'))} -> {score(a.get('accuracy'))}",
            f"{score(b.get('general_ppl'), 2)} -> {score(a.get('general_ppl'), 2)}",
        )
    console.print(table)
    for line in summary.get("targets", {}).get("lines", []):
        console.print(f"  {line}")
    first = rows[0]
    samples = [(label, r.get("sample")) for label, r in (("base model", first["base"]), ("adapter", first["after"]))]
    if all(s for _, s in samples):
        console.print(f"[bold]{first['topic']}[/bold] - {samples[0][1]['question']}")
        for label, sample in samples:
            console.print(f"  [bold]{label}:[/bold] {sample['answer']}")
