"""`report` (cost-estimate report: report.md + report.html) and `calibrate` (feed a measured run back)."""

from __future__ import annotations

from pathlib import Path

import typer

from mindprint_ray.planning.calibration import calibration_path
from mindprint_ray.planning.run_measures import calibrate as do_calibrate
from mindprint_ray.planning.run_plan import load_run
from mindprint_ray.report import write_report
from mindprint_ray.spec.inputs import check_finite, check_output_dir


def report(
    config: Path = typer.Argument(..., help="run spec YAML", show_default=False),
    overrides: list[str] | None = typer.Argument(None, help="dotted overrides", show_default=False),
    hardware: str = typer.Option("all", "--hardware", help="'all' or one hardware profile name"),
    out: Path | None = typer.Option(None, "--out", help="output folder (default: reports/<run name>)"),
    run_dir: Path | None = typer.Option(None, "--run", help="a finished run folder: adds measured figures"),
    prices: Path | None = typer.Option(None, "--prices", help="price file replacing the shipped one"),
    price_per_hour: float | None = typer.Option(
        None, "--price-per-hour", min=0, help="$/h for the first hardware option"
    ),
) -> None:
    """Memory, time and cost per hardware option, the seed's figures checked, measured vs estimated."""
    check_finite(price_per_hour, "--price-per-hour")
    prices_path = str(prices) if prices else None
    run = load_run(config, overrides or [], prices_path)
    folder = check_output_dir(out or Path("reports") / run.spec.name, "--out")
    paths = write_report(run, folder, hardware, str(run_dir) if run_dir else None, prices_path, price_per_hour)
    typer.echo(f"wrote {paths['md']}\nwrote {paths['html']}")


def calibrate(
    run_dir: Path = typer.Argument(..., help="run folder (spec.yaml, summary.json, metrics.jsonl)", show_default=False),
) -> None:
    """Measure a run's throughput (MFU) and peak memory; later estimates for its profile use them."""
    entry = do_calibrate(run_dir)
    mfu = ", ".join(f"{k.upper()} {v:.4g}" for k, v in entry["mfu"].items())
    tps = ", ".join(f"{k.upper()} {v:,.0f}" for k, v in entry["tokens_per_s"].items() if v)
    mem = ", ".join(
        f"{k.upper()} {v:.3f} GB (estimated {entry['estimated_peak_memory_gb'][k]:.3f})"
        for k, v in entry["peak_memory_gb"].items()
    )
    typer.echo(
        f"{entry['profile']}/{entry['quant']} ({entry['model']}, {entry['devices']} workers): measured MFU {mfu}; "
        f"tokens/s {tps}; peak memory {mem}\nstored in {calibration_path()}"
    )


def register(app: typer.Typer) -> None:
    app.command("report")(report)
    app.command("calibrate")(calibrate)
