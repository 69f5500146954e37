"""`mindprint-ray convert --to mlx|peft SRC OUT`: move a LoRA adapter between PEFT and mlx-lm formats."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def convert(
        src: Path = typer.Argument(..., help="adapter folder (PEFT or mlx-lm)", show_default=False),
        out: Path = typer.Argument(..., help="folder to write", show_default=False),
        to: str = typer.Option(..., "--to", help="target format: mlx or peft", show_default=False),
        base_model: str = typer.Option(None, "--base-model", help="base model recorded in the output config"),
    ) -> None:
        """Convert a LoRA adapter: transpose A/B, rename keys, scale <-> alpha/r (rsLoRA too), per-zone ranks."""
        from mindprint_ray.runs.adapter_format import convert as run_convert

        adapter = run_convert(src, out, to.lower())
        if base_model:
            _set_base_model(out, to.lower(), base_model)
        ranks = ", ".join(f"{len(g.keys)} modules r={g.rank} scale={g.scale:g}" for g in adapter.groups)
        typer.echo(f"wrote {to.lower()} adapter to {out} ({ranks})")
        if to.lower() == "mlx" and len(adapter.groups) > 1:
            typer.echo(
                "zones differ in rank/scale: padded to the largest rank with each zone's scale folded into "
                "lora_b (exact); the zones' own ranks are kept in adapter_config.json for the way back"
            )


def _set_base_model(out: Path, to: str, base_model: str) -> None:
    import json

    config = out / "adapter_config.json"
    data = json.loads(config.read_text())
    data["base_model_name_or_path" if to == "peft" else "base_model"] = base_model
    config.write_text(json.dumps(data, indent=2))
