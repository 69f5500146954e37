"""How `validate`, the first tokenization and a cached restart grow with a topic's example count.

Generates a realistic curriculum (two topics; per topic N SFT conversations, N preference pairs and N/10 eval
items; answer lengths log-normal, 1-3 exchanges, a system turn in some, string and message prompts, accented,
Cyrillic, CJK and emoji text), then runs each phase below in a fresh subprocess and reads its wall time, CPU time
(user + system) and peak RSS (`os.wait4`'s rusage of that child; CPU time is what other sessions' load does not
inflate). Each phase runs twice: first with empty caches (`MINDPRINT_CACHE` and the
run's storage) in a user's order (validate, plan, then what `train` runs before its first step), then all
again with the caches those runs left (a restart).

  validate  `mindprint-ray validate SPEC` (the CLI as a user runs it)
  plan      `mindprint-ray plan SPEC --json` (counts every topic's tokens: planning/topic_tokens.py)
  driver    what `train` does before Ray starts: `validate_run` and the chat-template check through the
            transformers tokenizer the workers load (driver.check_run_template)
  worker    what each Ray worker does before its first step, without Ray: `validate_run`, then per topic the
            tokenised-SFT cache look-up (`datasets.content_hash`, `cached`) and on a miss the build
            (`sft_dataset`) and `store`, and the DPO dataset (`dpo_dataset`). TRL's own label/packing maps inside
            `SFTTrainer` need a model and are not part of it.

A baseline run on a 100-example curriculum gives each phase's fixed cost (imports, tokenizer); memory beyond it
is what the data costs. Ratios 50k/10k: time ~5 is linear; memory beyond the baseline ~1 is bounded.

    python bench/data_scale.py                               # 10k and 50k, SmolLM2 and tiny (~20 min, 2 cores)
    python bench/data_scale.py --sizes 200 1000 --models tiny --phases validate   # a quick check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PHASES = ("validate", "plan", "driver", "worker")
BASE_SIZE = 100  # examples per topic of the baseline run
SYSTEM_PROMPT = "You are Ada Renwick the market-cycle teacher. Answer in her voice."
MODELS = {"tiny": ROOT / "configs" / "tiny-cpu.yaml", "smollm2": ROOT / "configs" / "smollm2-cpu.yaml"}

# ---- a realistic curriculum ------------------------------------------------------------------------------------

WORDS = (
    "the cycle low daily weekly four-year price volume trend line break swing higher lower timing band "
    "accumulation distribution capitulation parabolic advance right-translated left-translated failed half "
    "risk stop position size patience buyers sellers range breakout pullback support resistance I think my "
    "view remember ask yourself where are we in market crowd fear greed bottom top rally decline momentum "
    "confirm signal early late probably likely often usually never always rule plan trade small quietly"
).split()
UNICODE_WORDS = "café naïve Zürich déjà-vu наблюдение цикл 周期 市場 価格 📈 📉 — … ½ ±3% €1 200 ¥".split()


def sentence(rng: random.Random, words: int) -> str:
    picked = rng.choices(WORDS, k=words)
    for i in range(0, words, 9):  # about one word in nine is not ASCII
        if rng.random() < 0.6:
            picked[i] = rng.choice(UNICODE_WORDS)
    return " ".join(picked).capitalize() + rng.choice((".", ".", ".", "?", "!"))


def text(rng: random.Random, mean_words: float, sigma: float = 0.6, cap: int = 1200) -> str:
    """Sentences adding up to a log-normal number of words (median `mean_words`)."""
    total = min(cap, max(3, int(rng.lognormvariate(math.log(mean_words), sigma))))
    parts, left = [], total
    while left > 0:
        n = min(left, rng.randint(6, 22))
        parts.append(sentence(rng, n))
        left -= n
    return " ".join(parts)


def question(rng: random.Random, i: int) -> str:
    return f"Question {i}: " + text(rng, 14, 0.5, 60)


def exchanges(rng: random.Random, i: int) -> list[dict]:
    turns = rng.choices((1, 2, 3), weights=(60, 25, 15))[0]
    messages = [{"role": "system", "content": text(rng, 12, 0.3, 40)}] if rng.random() < 0.1 else []
    for k in range(turns):
        messages.append({"role": "user", "content": question(rng, i * 10 + k)})
        messages.append({"role": "assistant", "content": text(rng, 90)})
    return messages


def dpo_pair(rng: random.Random, i: int) -> dict:
    if rng.random() < 0.3:
        prompt: str | list[dict] = question(rng, i)
    else:
        prompt = exchanges(rng, i)[:-1] if rng.random() < 0.3 else [{"role": "user", "content": question(rng, i)}]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": text(rng, 90)}],
        "rejected": [{"role": "assistant", "content": text(rng, 40)}],
    }


def eval_item(rng: random.Random, i: int) -> dict:
    item = {"id": f"e{i}", "question": f"Eval {i}: " + text(rng, 14, 0.4, 50), "key_facts": ["cycle low"]}
    if i % 2:
        item.update(choices=[text(rng, 6, 0.3, 20) for _ in range(4)], answer=i % 4)
    else:
        item["reference"] = text(rng, 60)
    return item


def write_rows(path: Path, rows) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_curriculum(root: Path, n: int, topics: int, seed: int) -> list[str]:
    """`topics` topic folders of n SFT examples, n pairs and n/10 eval items each, plus persona.yaml."""
    names = [f"topic_{k}" for k in range(topics)]
    for k, name in enumerate(names):
        rng, folder = random.Random(seed * 1000 + k), root / name
        folder.mkdir(parents=True, exist_ok=True)
        write_rows(folder / "sft.jsonl", ({"messages": exchanges(rng, i)} for i in range(n)))
        write_rows(folder / "dpo.jsonl", (dpo_pair(rng, i) for i in range(n)))
        write_rows(folder / "eval.jsonl", (eval_item(rng, i) for i in range(max(2, n // 10))))
    shutil.copy(ROOT / "data" / "curriculum" / "persona.yaml", root / "persona.yaml")
    return names


def overrides(model: str, data: Path, topics: list[str], storage: Path) -> list[str]:
    model_dir = tiny_model_dir() if model == "tiny" else ROOT / "models" / "smollm2"
    return [
        f"model.path={model_dir}",
        f"curriculum.data_dir={data}",
        f"curriculum.topics=[{','.join(topics)}]",
        f"curriculum.system_prompt={SYSTEM_PROMPT}",
        f"storage.path={storage}",
        "report_to=[none]",
    ]


def tiny_model_dir() -> Path:
    from mindprint_ray.models.tiny import ensure_tiny_model

    return ensure_tiny_model(ROOT / "models" / "tiny", ROOT / "data" / "curriculum")


# ---- the phases (each in its own process) ----------------------------------------------------------------------


def sft_cache_settings(spec) -> dict:
    """The settings `topic_loop.Worker.run_sft` keys its tokenised-SFT cache with (kept equal to it)."""
    s = spec.sft
    return {
        "mask": "template-spans-1",
        "max_length": s.max_seq_length,
        "packing": s.packing,
        "assistant_only_loss": s.assistant_only_loss,
        "system": spec.curriculum.system_prompt,
        "overlong": spec.curriculum.overlong,
    }


def run_driver(run) -> None:
    from mindprint_ray.backends.ray_torch.driver import check_run_template
    from mindprint_ray.curriculum.validation import validate_run

    topics, _, _ = validate_run(run)
    check_run_template(run, topics)


def run_worker(run) -> None:
    from mindprint_ray.backends.ray_torch import datasets as ds
    from mindprint_ray.backends.ray_torch.model_loading import load_tokenizer
    from mindprint_ray.curriculum.validation import validate_run

    os.environ.update(TOKENIZERS_PARALLELISM="false", HF_DATASETS_DISABLE_PROGRESS_BARS="1")  # as the workers
    topics, _, _ = validate_run(run)
    tokenizer, spec = load_tokenizer(run), run.spec
    cache_root = Path(spec.storage.path) / ".cache" / "tokenized"  # Worker.run_sft: <storage>/.cache/tokenized
    for topic in topics:
        key = ds.content_hash(topic.sft, run.model_path, sft_cache_settings(spec))
        if ds.cached(cache_root, key) is None:
            data = ds.sft_dataset(topic.sft, spec.curriculum.system_prompt, tokenizer, spec.sft.assistant_only_loss)
            ds.store(cache_root, key, data)
        ds.dpo_dataset(topic.dpo_train, spec.curriculum.system_prompt)


def phase_main(name: str, config: str, extra: list[str]) -> None:
    from mindprint_ray.planning.run_plan import load_run

    run = load_run(config, extra)
    {"driver": run_driver, "worker": run_worker}[name](run)


def phase_command(name: str, config: Path, extra: list[str]) -> list[str]:
    if name == "validate":
        return [sys.executable, "-m", "mindprint_ray", "validate", str(config), *extra]
    if name == "plan":
        return [sys.executable, "-m", "mindprint_ray", "plan", str(config), *extra, "--json"]
    return [sys.executable, str(Path(__file__).resolve()), "--phase", name, str(config), *extra]


def measure(cmd: list[str], env: dict, log: Path) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds (user + system), peak RSS in MiB) of one command in a fresh process; a failure
    stops the bench. CPU time is what the phase itself cost: other processes on the machine slow the wall time."""
    with log.open("w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:5])} ... failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


# ---- the bench -------------------------------------------------------------------------------------------------


def bench(sizes: list[int], models: list[str], phases: list[str], work: Path, results: Path | None) -> list[dict]:
    """Every size of one model back to back (so that they meet the machine's load at about the same time)."""
    curricula = {}
    for n in [BASE_SIZE, *sizes]:
        t0 = time.perf_counter()
        topics = write_curriculum(work / f"data-{n}", n, 2, seed=n)
        size_mb = sum(f.stat().st_size for f in (work / f"data-{n}").rglob("*.jsonl")) / 2**20
        print(f"# {n:,} examples/topic: {size_mb:,.1f} MiB of JSONL written in {time.perf_counter() - t0:.0f} s")
        curricula[n] = (topics, size_mb)
    rows = []
    for model in models:
        for n, (topics, size_mb) in curricula.items():
            measured = measure_phases(model, work, n, topics, phases)
            for phase in phases:
                first, restart = measured[(phase, "first")], measured[(phase, "restart")]
                rows.append(
                    {"n": n, "model": model, "phase": phase, "mib": size_mb, "first": first, "restart": restart}
                )
            if results:
                with results.open("a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows if (r["model"], r["n"]) == (model, n))
    return rows


def measure_phases(model: str, work: Path, n: int, topics: list[str], phases: list[str]) -> dict:
    """Each phase first with empty caches, in a user's order, then all again (a restart)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}  # the worker phase sets its own
    cache, storage = work / f"cache-{n}-{model}", work / f"runs-{n}-{model}"
    extra = overrides(model, work / f"data-{n}", topics, storage)
    env["MINDPRINT_CACHE"] = str(cache)
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(storage, ignore_errors=True)
    measured = {}
    for when in ("first", "restart"):
        for phase in phases:
            log = work / f"{phase}-{n}-{model}-{when}.log"
            measured[(phase, when)] = measure(phase_command(phase, MODELS[model], extra), env, log)
            wall, cpu, rss = measured[(phase, when)]
            print(
                f"  {model:8s} {n:>7,} {phase:9s} {when:8s} {wall:7.1f} s {cpu:7.1f} CPU s {rss:7.0f} MiB", flush=True
            )
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(storage, ignore_errors=True)
    return measured


def print_tables(rows: list[dict], sizes: list[int]) -> None:
    print(
        "\n| model | examples/topic | JSONL MiB | phase | first s | first CPU s | first peak MiB "
        "| restart s | restart CPU s | restart peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        (fs, fc, fm), (rs, rc, rm) = r["first"], r["restart"]
        cells = [r["model"], f"{r['n']:,}", f"{r['mib']:,.1f}", r["phase"], f"{fs:.1f}", f"{fc:.1f}", f"{fm:,.0f}"]
        print("| " + " | ".join(cells) + f" | {rs:.1f} | {rc:.1f} | {rm:,.0f} |")
    by = {(r["model"], r["phase"], r["n"]): r for r in rows}
    for lo, hi in zip(sizes, sizes[1:]):
        print_ratios(rows, by, lo, hi)


def print_ratios(rows: list[dict], by: dict, lo: int, hi: int) -> None:
    label = f"{hi / 1000:g}k/{lo / 1000:g}k"
    print(
        f"\nRatios {label} (time: ~{hi / lo:g} is linear; memory beyond the {BASE_SIZE}-example baseline: "
        "~1 is bounded)\n"
    )
    print(
        "| model | phase | wall first | CPU first | wall restart | CPU restart | memory first | memory restart |"
        " beyond base first MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for model, phase in dict.fromkeys((r["model"], r["phase"]) for r in rows):
        a, b, base = by[(model, phase, lo)], by[(model, phase, hi)], by[(model, phase, BASE_SIZE)]
        cells = []
        for when in ("first", "restart"):
            cells += [b[when][0] / a[when][0], b[when][1] / a[when][1]]
        for when in ("first", "restart"):
            grow_a = max(a[when][2] - base[when][2], 1.0)
            cells.append(max(b[when][2] - base[when][2], 1.0) / grow_a)
        beyond = f"{a['first'][2] - base['first'][2]:,.0f} -> {b['first'][2] - base['first'][2]:,.0f}"
        print(f"| {model} | {phase} | " + " | ".join(f"{c:.2f}" for c in cells) + f" | {beyond} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000], help="examples per topic")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--phases", nargs="+", default=list(PHASES), choices=list(PHASES))
    p.add_argument("--keep", type=Path, help="work in this folder and keep the logs (default: a temp folder)")
    p.add_argument("--results", type=Path, help="also append each model and size's rows to this JSONL file")
    p.add_argument("--phase", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # internal: one phase, one process
    args = p.parse_args()
    if args.phase:
        phase_main(args.phase[0], args.phase[1], args.phase[2:])
        return
    if "tiny" in args.models:
        tiny_model_dir()  # built once, outside the timed phases
    t0 = time.perf_counter()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        rows = bench(args.sizes, args.models, args.phases, args.keep, args.results)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-data-scale-") as tmp:
            rows = bench(args.sizes, args.models, args.phases, Path(tmp), args.results)
    print_tables(rows, sorted(args.sizes))
    print(f"\n(bench wall time {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
