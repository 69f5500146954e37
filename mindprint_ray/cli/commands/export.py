"""`mindprint-ray export RUN --topic T [--merge] [--out DIR]`."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def export(
        run_dir: Path = typer.Argument(..., help="the run folder: <storage.path>/<run name>"),
        topic: str = typer.Option(..., "--topic", help="whose adapter to export"),
        merge: bool = typer.Option(False, "--merge", help="merge into a BF16 copy of the base model"),
        out: Path | None = typer.Option(None, "--out", help="default: RUN/export/TOPIC[-merged]"),
    ) -> None:
        """Write a topic's PEFT adapter, or a merged BF16 model (QLoRA: merged into the de-quantised base)."""
        from mindprint_ray.backends.ray_torch.export import export_adapter

        target = out or Path(run_dir) / "export" / (topic + ("-merged" if merge else ""))
        path = export_adapter(run_dir, topic, target, merge)
        typer.echo(f"wrote {'merged model' if merge else 'adapter'} to {path}")
