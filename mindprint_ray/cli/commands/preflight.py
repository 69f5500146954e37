"""`mindprint-ray preflight CFG`: check a job before it uses cluster resources."""

from __future__ import annotations

from pathlib import Path

import typer

from mindprint_ray.planning.run_plan import load_run


def register(app: typer.Typer) -> None:
    @app.command()
    def preflight(
        config: Path = typer.Argument(..., help="run spec YAML"),
        overrides: list[str] | None = typer.Argument(None, help="dotted overrides"),
        working_dir: Path = typer.Option(Path("."), "--working-dir", help="what `ray job submit` uploads"),
        runtime_env: Path = typer.Option(Path("cluster/runtime_env.yaml"), "--runtime-env"),
        gpus: bool = typer.Option(True, "--gpus/--no-gpus", help="check GPUs against the profile"),
    ) -> None:
        """Validate data, check storage is writable, the upload size and the GPUs before submitting."""
        from mindprint_ray.backends.ray_torch.preflight import preflight as run_preflight

        report = run_preflight(load_run(config, overrides or []), working_dir.absolute(), runtime_env, gpus)
        for check, result in report.checks:
            typer.echo(f"ok  {check:<12} {result}")
