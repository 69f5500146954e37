"""Ray Tune sweeps: a Tune function trainable builds and fits a TorchTrainer per trial (Ray Train V2 + Tune).

Outputs in <storage>/<sweep name>/: results.csv, results.md, heatmap.png, best.yaml (the full curriculum
with the best values, ready for `mindprint-ray train`), best_adapter/ and trials/<trial>/ run folders.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import yaml

from mindprint_ray.backends.ray_torch.driver import build_trainer, for_workers, init_ray
from mindprint_ray.curriculum.validation import validate_run
from mindprint_ray.models.tiny import ensure_run_model
from mindprint_ray.planning.costs import hourly_price
from mindprint_ray.planning.multinode import check_sweep_storage
from mindprint_ray.planning.run_plan import RunPlan, build_run
from mindprint_ray.runs.run_folder import RunFolder
from mindprint_ray.runs.storage import parse_s3, pyarrow_filesystem
from mindprint_ray.spec.run_spec import RunSpec
from mindprint_ray.spec.sweep_space import SearchSpace, apply_params, best_spec, check_space


def distributions(space: SearchSpace, search: str) -> dict:
    from ray import tune

    out = {}
    for path, r in space.params.items():
        if r.values is not None:
            out[path] = tune.grid_search(r.values) if search == "grid" else tune.choice(r.values)
        elif space.is_integer(path):
            out[path] = (
                tune.lograndint(int(r.min), int(r.max) + 1) if r.log else tune.randint(int(r.min), int(r.max) + 1)
            )
        else:
            out[path] = tune.loguniform(r.min, r.max) if r.log else tune.uniform(r.min, r.max)
    return out


def make_trial(base: dict, space: SearchSpace, trials_storage: str, workers: int):
    """The Tune function trainable: one TorchTrainer run of the sweep's topics with this trial's values."""

    def trial(config: dict) -> None:
        import ray.tune
        from ray.tune.integration.ray_train import TuneReportCallback

        params = {k: config[k] for k in space.params}
        name = f"trial-{ray.tune.get_context().get_trial_id()}"
        spec = apply_params(RunSpec.model_validate(base), params, name, space.topics)
        spec.storage.path = trials_storage
        spec.hardware.num_workers = workers
        run = build_run(spec)
        folder = RunFolder.for_storage(spec.storage.path, name)
        folder.claim(spec.dump(), force=True)
        folder.update_summary(run=name, params=params, topics_order=space.topics)
        build_trainer(run, folder, callbacks=[TuneReportCallback()]).fit()

    return trial


def concurrency(run: RunPlan, workers: int) -> int:
    import ray

    if run.spec.tune.max_concurrent:
        return run.spec.tune.max_concurrent
    resources = ray.cluster_resources()
    if run.profile.use_gpu:
        return max(1, int(resources.get("GPU", 0)) // workers)
    return max(1, int(resources.get("CPU", 1)) // (workers * run.profile.cpus_per_worker))


def run_sweep(run: RunPlan) -> Path:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    space = check_space(run)  # everything is checked before any trial starts
    ensure_run_model(run)
    run = for_workers(run)  # trials run on workers: absolute paths (best.yaml too)
    validate_run(run)
    t = run.spec.tune
    sweep_folder = RunFolder.for_storage(run.spec.storage.path, run.spec.name)  # local, or an s3:// mirror
    root = sweep_folder.root
    root.mkdir(parents=True, exist_ok=True)
    trials_storage = f"{sweep_folder.remote}/trials" if sweep_folder.remote else str(root / "trials")
    workers = t.workers_per_trial or run.num_workers
    init_ray(run)  # the concurrency reads the cluster's resources
    at_once = concurrency(run, workers)
    check_sweep_storage(run, workers, at_once)  # trials on several nodes need storage every node sees; none started
    search_alg = None
    if t.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=run.spec.seed)
    scheduler = (
        ASHAScheduler(time_attr="training_iteration", grace_period=t.grace_period, reduction_factor=2, max_t=10_000)
        if t.scheduler == "asha"
        else None
    )
    trainable = tune.with_resources(
        make_trial(run.spec.model_dump(mode="json"), space, trials_storage, workers), {"memory": 64 * 1024**2}
    )  # the trial driver itself: no CPU held
    tune_storage, filesystem = str(root), None
    if sweep_folder.remote:
        loc = parse_s3(sweep_folder.remote)
        tune_storage, filesystem = f"{loc.bucket}/{loc.prefix}", pyarrow_filesystem()
    tuner = tune.Tuner(
        trainable,
        param_space=distributions(space, t.search),
        tune_config=tune.TuneConfig(
            metric=space.metric,
            mode=space.mode,
            num_samples=t.num_samples,
            search_alg=search_alg,
            scheduler=scheduler,
            max_concurrent_trials=at_once,
        ),
        run_config=tune.RunConfig(name="tune", storage_path=tune_storage, storage_filesystem=filesystem),
    )
    results = tuner.fit()
    rows = collect_rows(results, space, trials_storage, run, workers)
    write_outputs(run, space, rows, root)
    for name in ("results.csv", "results.md", "heatmap.png", "best.yaml", "sweep.json", "best_adapter"):
        if (root / name).exists():
            sweep_folder.push(name)
    return root


def collect_rows(results, space: SearchSpace, trials_storage: str, run: RunPlan, workers: int) -> list[dict]:
    """One row per trial: values, metric, steps, wall time, estimated cost, whether it finished."""
    price = hourly_price(run)["per_hour"]
    rows = []
    for r in results:
        m = r.metrics or {}
        trial_id = m.get("trial_id") or Path(r.path).name
        folder = RunFolder.for_storage(trials_storage, f"trial-{trial_id}")
        folder.pull()
        summary = folder.summary()
        steps = sum(
            (e.get("sft", {}).get("steps") or 0) + (e.get("dpo", {}).get("steps") or 0)
            for e in summary.get("topics", {}).values()
        )
        wall = float(m.get("time_total_s") or 0.0)
        done = all(folder.topic_done(t) for t in space.topics)
        rows.append(
            {
                "trial": f"trial-{trial_id}",
                **{p: r.config.get(p) for p in space.params},
                space.metric: m.get(space.metric),
                "steps": steps,
                "wall_s": round(wall, 1),
                "est_cost_usd": round(wall / 3600 * price * workers / max(run.profile.devices, 1), 4),
                "status": "finished" if done else ("error" if r.error else "stopped early"),
                "adapter": str(folder.adapter_dir(space.topics[-1])) if done else "",
            }
        )
    return rows


def best_row(rows: list[dict], space: SearchSpace) -> dict | None:
    scored = [
        r
        for r in rows
        if isinstance(r[space.metric], (int, float)) and math.isfinite(r[space.metric]) and r["status"] == "finished"
    ]
    if not scored:
        return None
    return (max if space.mode == "max" else min)(scored, key=lambda r: r[space.metric])


def write_outputs(run: RunPlan, space: SearchSpace, rows: list[dict], root: Path) -> None:
    columns = ["trial", *space.params, space.metric, "steps", "wall_s", "est_cost_usd", "status"]
    with (root / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    best = best_row(rows, space)
    lines = [
        f"# Sweep {run.spec.name}",
        "",
        f"metric: `{space.metric}` ({space.mode}), topics: {', '.join(space.topics)}, "
        f"search: {run.spec.tune.search}, scheduler: {run.spec.tune.scheduler}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in columns) + " |")
    if best:
        lines += [
            "",
            f"best: {best['trial']} with {', '.join(f'{p}={_cell(best[p])}' for p in space.params)} "
            f"({space.metric} = {_cell(best[space.metric])}); config: best.yaml",
        ]
        spec = best_spec(run, {p: best[p] for p in space.params})
        (root / "best.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
        target = root / "best_adapter"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(best["adapter"], target)
    (root / "results.md").write_text("\n".join(lines) + "\n")
    heatmap(rows, space, root / "heatmap.png")
    (root / "sweep.json").write_text(
        json.dumps({"metric": space.metric, "mode": space.mode, "rows": rows, "best": best}, indent=2, default=str)
    )


def _cell(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "" if x is None else str(x)


def heatmap(rows: list[dict], space: SearchSpace, path: Path) -> Path:
    """Mean metric per (rank, learning rate) cell, or over the first two swept parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = list(space.params)
    y_key = "lora.rank" if "lora.rank" in params else params[0]
    x_key = "sft.learning_rate" if "sft.learning_rate" in params else (params[1] if len(params) > 1 else params[0])
    ys = sorted({r[y_key] for r in rows})
    xs = sorted({r[x_key] for r in rows})
    grid = [[float("nan")] * len(xs) for _ in ys]
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            vals = [
                r[space.metric]
                for r in rows
                if r[y_key] == y
                and r[x_key] == x
                and isinstance(r[space.metric], (int, float))
                and math.isfinite(r[space.metric])
            ]
            if vals:
                grid[i][j] = sum(vals) / len(vals)
    fig, ax = plt.subplots(figsize=(1.6 * len(xs) + 3, 1.0 * len(ys) + 2))
    im = ax.imshow(grid, cmap="viridis" if space.mode == "max" else "viridis_r", aspect="auto")
    ax.set_xticks(range(len(xs)), [f"{x:.3g}" for x in xs])
    ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
    ax.set_xlabel(x_key)
    ax.set_ylabel(y_key)
    for i in range(len(ys)):
        for j in range(len(xs)):
            if not math.isnan(grid[i][j]):
                light = im.norm(grid[i][j]) > 0.6 if space.mode == "max" else im.norm(grid[i][j]) < 0.4
                ax.text(
                    j, i, f"{grid[i][j]:.3f}", ha="center", va="center", fontsize=9, color="black" if light else "white"
                )
    fig.colorbar(im, ax=ax, label=f"{space.metric} ({space.mode})")
    ax.set_title(f"sweep: {space.metric} by {y_key} x {x_key}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
