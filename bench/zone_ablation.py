"""Zone ablation on the real sample model: does putting different modules in different layer bands (zone-LoRA)
teach the persona better than the usual placements, at the same steps, data and seeds?

Variants (SmolLM2-135M-Instruct, 30 layers):
  a) zone      the seed's zones: lexicon 0-7 q_proj / reasoning 8-21 v,up,down / voice 22-29 o,up,down, r=8
  b) uniform   the same five modules in every layer, ranks 5 (layers 0-13) and 4 (14-29): trainable parameters
               within 0.1% of (a) (no single integer rank comes within 10%: r=4 is -10.4%, r=5 +12.0%)
  c) last16    mlx-lm's default placement: the last 16 layers, every linear module, r=8 (alpha 16 as in the others,
               not mlx-lm's scale 20, so that one learning rate serves every variant)
  d) all7      all seven modules in every layer at r=8

Each variant x seed is one `mindprint-ray train` run (Ray, 2 CPU workers) of the same spec (configs/smollm2-cpu.yaml
unless --config) on the same topics; the first topic's scores after the last topic measure forgetting. Scores are
held-out (eval items not in SFT, preference pairs DPO never trained on). Intervals: 95% bootstrap over items, pooled
over seeds (each resample draws items within each seed). The base model's scores are the same for every variant.

    .venv/bin/python bench/zone_ablation.py [--seeds 3] [--config configs/smollm2-cpu.yaml] [--out runs/ablation]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mindprint_ray.evaluation.gates import recheck_key
from mindprint_ray.evaluation.metrics import (
    DEFAULT_WEIGHTS,
    ITEM_KINDS,
    bootstrap,
    composite,
    item_lists,
)
from mindprint_ray.planning.run_plan import build_run
from mindprint_ray.report.numbers import with_interval
from mindprint_ray.spec.run_spec import RunSpec

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SAME5 = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
VARIANTS = {
    "zone": None,  # the spec's own (the seed's zones)
    "uniform": [
        {"name": "uniform_r5", "layers": [0, 13], "modules": SAME5, "rank": 5, "alpha": 10},
        {"name": "uniform_r4", "layers": [14, 29], "modules": SAME5, "rank": 4, "alpha": 8},
    ],
    "last16": [{"name": "last16", "layers": [14, 29], "modules": ALL7}],
    "all7": [{"name": "all7", "layers": [0, 29], "modules": ALL7}],
}
METRICS = ("voice_fidelity", "markers", "lexicon", "semantic", "preference", "accuracy", "general_ppl")


def variant_spec(base: dict, variant: str, seed: int, storage: Path) -> dict:
    spec = json.loads(json.dumps(base))
    spec["seed"] = seed
    spec["storage"] = {**spec.get("storage", {}), "path": str(storage)}
    spec["model"]["path"] = str((ROOT / spec["model"]["path"]).resolve())
    spec["curriculum"]["data_dir"] = str((ROOT / spec["curriculum"]["data_dir"]).resolve())
    spec["report_to"] = ["none"]
    if VARIANTS[variant] is not None:
        spec["lora"] = {**spec.get("lora", {}), "zones": VARIANTS[variant]}
    return spec


def train(spec: dict, name: str, work: Path, overrides: list[str]) -> tuple[dict, float]:
    """One run of `mindprint-ray train`; (summary.json, wall seconds). Reuses a finished run of the same name."""
    cfg = work / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(spec, sort_keys=False))
    summary_file = Path(spec["storage"]["path"]) / name / "summary.json"
    if summary_file.is_file() and json.loads(summary_file.read_text()).get("status") == "done":
        return json.loads(summary_file.read_text()), json.loads(summary_file.read_text()).get("wall_s", 0.0)
    t0 = time.time()
    log = work / f"{name}.log"
    with log.open("w") as f:
        code = subprocess.call(
            [sys.executable, "-m", "mindprint_ray", "train", str(cfg), "--name", name, *overrides],
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}); see {log}")
    return json.loads(summary_file.read_text()), time.time() - t0


def stage_items(summary: dict, topic: str, key: str) -> dict | None:
    return summary["topics"].get(topic, {}).get("eval", {}).get(key)


def pooled(scores: list[dict], metric: str, weights: dict) -> tuple:
    """Mean over seeds, and a 95% bootstrap interval that resamples items within each seed's evaluation."""
    values = [s.get(metric) for s in scores]
    if not values or any(v is None for v in values):
        return None, None, None
    mean = sum(values) / len(values)
    if metric == "general_ppl":  # one neutral text, the same items in every seed: the mean of the intervals
        cis = [s.get("general_ppl_ci") for s in scores]
        return (mean, *[sum(c[i] for c in cis) / len(cis) for i in (0, 1)]) if all(cis) else (mean, None, None)
    groups = {
        f"{kind}@{i}": lists[kind]
        for i, s in enumerate(scores)
        for kind, lists in [(k, item_lists(s["items"])) for k in ITEM_KINDS]
    }

    def statistic(sample: dict) -> dict:
        per_seed = [composite({k: sample[f"{k}@{i}"] for k in ITEM_KINDS}, weights)[metric] for i in range(len(scores))]
        return {"x": None if None in per_seed else sum(per_seed) / len(per_seed)}

    ci = bootstrap(groups, statistic)["x"]
    return (mean, *ci) if ci else (mean, None, None)


def trainable(spec: dict) -> int:
    return build_run(RunSpec.model_validate(spec)).zones.trainable_params()


def fmt(mean, lo, hi, digits: int = 3) -> str:
    return with_interval(mean, None if lo is None else [lo, hi], digits)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/smollm2-cpu.yaml")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. sft.epochs_per_topic=3")
    args = p.parse_args()
    base = yaml.safe_load((ROOT / args.config).read_text())
    storage = (ROOT / args.out).resolve()
    work = storage / "_specs"
    work.mkdir(parents=True, exist_ok=True)
    topics = base["curriculum"]["topics"]
    weights = {**DEFAULT_WEIGHTS, **(base.get("eval", {}).get("weights") or {})}
    results = {}
    for variant in args.variants.split(","):
        runs = []
        for seed in range(args.seeds):
            name, spec = f"{variant}-s{seed}", variant_spec(base, variant, seed, storage)
            summary, wall = train(spec, name, work, args.overrides)
            runs.append((summary, wall))
            print(f"{name}: {trainable(spec):,} trainable, done in {wall:.0f} s", flush=True)
        results[variant] = (trainable(spec), runs)
    print(report(results, topics, weights, args))


def report(results: dict, topics: list[str], weights: dict, args) -> str:
    first, last = topics[0], topics[-1]
    lines = [
        f"command: .venv/bin/python bench/zone_ablation.py --config {args.config} --seeds {args.seeds} "
        + " ".join(args.overrides),
        f"topics {', '.join(topics)}; held-out scores after DPO, mean of {args.seeds} seeds [95% interval]",
        "",
    ]
    base_run = next(iter(results.values()))[1][0][0]
    header = "| variant | trainable | topic | " + " | ".join(METRICS) + " | wall s |"
    lines += [header, "|" + "---|" * (len(METRICS) + 4)]
    for topic in topics:
        base = [stage_items(base_run, topic, "base")]
        lines.append(
            f"| base model | 0 | {topic} | " + " | ".join(fmt(*pooled(base, k, weights)) for k in METRICS) + " | - |"
        )
    for variant, (params, runs) in results.items():
        wall = sum(w for _, w in runs) / len(runs)
        for topic in topics:
            scores = [stage_items(s, topic, "after_dpo") for s, _ in runs]
            lines.append(
                f"| {variant} | {params:,} | {topic} | "
                + " | ".join(fmt(*pooled(scores, k, weights)) for k in METRICS)
                + f" | {wall:.0f} |"
            )
        key = recheck_key("after_dpo", last)
        if len(topics) > 1 and all(key in s["topics"][first]["eval"] for s, _ in runs):
            scores = [s["topics"][first]["eval"][key] for s, _ in runs]
            lines.append(
                f"| {variant} | | {first} after {last} (forgetting) | "
                + " | ".join(fmt(*pooled(scores, k, weights)) for k in METRICS)
                + " | |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
