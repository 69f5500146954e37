"""`python -m local_mlx train|dry-run|generate CFG`: the curriculum on Apple MLX (mlx[cpu] on Linux too)."""

from __future__ import annotations

from pathlib import Path

import typer

from mindprint_ray.cli.runner import run_app
from mindprint_ray.cli.views import topic_result_line
from mindprint_ray.planning.run_plan import load_run
from mindprint_ray.report.numbers import score
from mindprint_ray.spec.inputs import check_finite

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Zone-LoRA persona fine-tuning on Apple MLX: train, dry-run, generate.",
)

ConfigArg = typer.Argument(..., help="run spec YAML, e.g. configs/tiny-mlx.yaml", show_default=False)
OverridesArg = typer.Argument(None, help="dotted overrides such as sft.learning_rate=1e-4", show_default=False)


@app.command()
def train(
    config: Path = ConfigArg,
    overrides: list[str] | None = OverridesArg,
    name: str | None = typer.Option(None, "--name", help="run name (default: the spec's); reuse to resume"),
    force: bool = typer.Option(False, "--force", help="continue a run whose spec changed"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show progress bars"),
    dpo_reference: str | None = typer.Option(
        None,
        "--dpo-reference",
        help="DPO reference log-probs: sft "
        "(the model after SFT, as the Ray path) or base (adapter disabled); "
        "default: the spec's dpo.reference",
    ),
    force_lease: bool = typer.Option(
        False, "--force-lease", help="take over the run's lease: only when you are sure its other process is dead"
    ),
) -> None:
    """Train every topic (SFT then DPO), one mlx-lm adapter per topic. Rerun with the same name to resume."""
    run = load_run(config, overrides or [], name=name)  # every user error before mlx is imported
    from .training import train_run

    reference = dpo_reference or run.spec.dpo.reference
    folder = train_run(run, force=force, progress=progress, reference=reference, force_lease=force_lease)
    for topic, entry in folder.summary().get("topics", {}).items():
        peak = entry.get("sft", {}).get("peak_memory_gb")
        typer.echo(f"{topic_result_line(topic, entry)}, peak {score(peak)} GB")
    typer.echo(f"adapters: {folder.adapters}\nsummary:  {folder.summary_file}\nmetrics:  {folder.metrics_file}")


@app.command("dry-run")
def dry_run(
    config: Path = ConfigArg,
    overrides: list[str] | None = OverridesArg,
    steps: int = typer.Option(3, "--steps", min=1, help="real SFT and DPO steps to run"),
) -> None:
    """Validate, print the memory plan vs the wired limit and hours per topic, then run a few real steps."""
    from .dry_run import dry_run as run_dry

    code = run_dry(config, overrides or [], steps)
    if code:
        raise typer.Exit(code)


@app.command()
def generate(
    config: Path = ConfigArg,
    overrides: list[str] | None = typer.Argument(None, help="dotted overrides (before the prompt)", show_default=False),
    prompt: str = typer.Argument(..., help="the user's message", show_default=False),
    adapter: Path | None = typer.Option(
        None, "--adapter", help="mlx-lm adapter folder, e.g. runs/<name>/adapters/<topic>"
    ),
    max_tokens: int = typer.Option(200, "--max-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy"),
) -> None:
    """Answer one prompt with the spec's model (4-bit for nf4) and an adapter; stops at <|im_end|>."""
    from .generation import load_with_adapter, stream

    check_finite(temperature, "--temperature")
    run = load_run(config, overrides or [])
    model, tokenizer = load_with_adapter(run, adapter)
    for piece in stream(model, tokenizer, prompt, run.spec.curriculum.system_prompt, max_tokens, temperature):
        typer.echo(piece, nl=False)
    typer.echo()


def main(argv: list[str] | None = None) -> None:
    """User errors print one message and exit 2; anything else is a bug and raises."""
    run_app(app, "python -m local_mlx", argv)


if __name__ == "__main__":
    main()
