"""`mindprint-ray sweep CFG`: a Ray Tune search over LoRA rank, learning rates and DPO beta."""

from __future__ import annotations

from pathlib import Path

import typer

from mindprint_ray.planning.run_plan import load_run
from mindprint_ray.spec.sweep_space import check_space


def register(app: typer.Typer) -> None:
    @app.command()
    def sweep(
        config: Path = typer.Argument(..., help="run spec YAML with a `tune` section"),
        overrides: list[str] | None = typer.Argument(None, help="dotted overrides"),
        name: str | None = typer.Option(None, "--name", help="sweep name (default: the spec's)"),
    ) -> None:
        """Run the spec's `tune` search; write results.csv/.md, heatmap.png, best.yaml and best_adapter/."""
        run = load_run(config, overrides or [], name=name)
        space = check_space(run)
        from mindprint_ray.backends.ray_torch.sweep import run_sweep

        root = run_sweep(run)
        typer.echo((root / "results.md").read_text())
        typer.echo(
            f"results: {root / 'results.csv'}\nheatmap: {root / 'heatmap.png'}\nbest:    {root / 'best.yaml'}"
            f" (metric {space.metric}, {space.mode})"
        )
