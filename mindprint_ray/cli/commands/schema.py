"""`mindprint-ray schema [--out FILE]`: the run spec's JSON schema, for editors that validate and complete specs."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mindprint_ray.spec.inputs import check_output_file
from mindprint_ray.spec.run_spec import RunSpec


def schema_text() -> str:
    """RunSpec's JSON schema as indented JSON: every section and field with its description, type, bounds, default."""
    return json.dumps(RunSpec.model_json_schema(), indent=2) + "\n"


def register(app: typer.Typer) -> None:
    @app.command()
    def schema(
        out: Path | None = typer.Option(None, "--out", help="write the schema to FILE instead of printing it"),
    ) -> None:
        """Print the run spec's JSON schema, with which editors validate and complete specs (YAML language server:
        a first line `# yaml-language-server: $schema=FILE`)."""
        if out is None:
            typer.echo(schema_text(), nl=False)
            return
        check_output_file(out, "--out").write_text(schema_text(), encoding="utf-8")
        typer.echo(f"wrote the run spec's JSON schema to {out}")
