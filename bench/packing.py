"""Real-token throughput of SFT with packing vs without, on the sample curriculum and the tiny model, in one run.

Both modes use the worker's own pieces: `configs/tiny-cpu.yaml` (all ten sample topics), the tiny model loaded
by `load_base_model` with the zone plan applied by `apply_zone_plan`, the worker's conversational dataset
(`train.datasets.sft_dataset`) and TRL's SFTTrainer with the worker's arguments. Packed = `packing=True`
(TRL's BFD strategy, padding-free: documents concatenated, `position_ids` restart per document); unpacked =
`packing=False` (each row one example, padded to the longest in the batch). The modes alternate for `--rounds`
rounds after `--warmup` steps each, at each `--batch`; the figures are medians over rounds of per-round totals.

  real tokens/s   = tokens of the examples (no padding) / wall time of the timed steps
  real share      = real tokens / tokens the model computed on (padding included)
  row fill        = real tokens / (rows x max_seq_length), packed only (how full BFD fills the rows)

    python bench/packing.py                     # batch 1 and 4, ~2 minutes on 2 CPU cores
    python bench/packing.py --batch 1 --steps 3 --rounds 1 --warmup 1   # a quick check (~15 s)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c


def measure(run, data, packing: bool, steps: int, warmup: int) -> dict:
    """One round of one mode: a fresh worker model, `warmup` + `steps` optimizer steps."""
    tokenizer, model = c.worker_model(run)
    log = c.StepLog()
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as tmp:
        trainer = c.sft_trainer(run, model, tokenizer, data, packing, warmup + steps, Path(tmp), log)
        trainer.train()
    timed = log.timed(warmup)
    seconds = sum(s.seconds for s in timed)
    real = sum(s.real_tokens for s in timed)
    computed = sum(s.computed_tokens for s in timed)
    rows = len(timed) * run.spec.sft.batch_size * run.spec.sft.gradient_accumulation
    return {
        "real_tokens_per_s": real / seconds,
        "real_share": real / computed,
        "row_fill": real / (rows * run.spec.sft.max_seq_length) if packing else None,
        "step_s": statistics.median(s.seconds for s in timed),
        "real_tokens_per_step": real / len(timed),
        "examples_per_step": sum(len(s.doc_lengths) for s in timed) / len(timed),
    }


def summarise(rounds: list[dict]) -> dict:
    """Median of each figure over rounds."""
    keys = [k for k in rounds[0] if rounds[0][k] is not None]
    return {k: statistics.median(r[k] for r in rounds) for k in keys}


def compare(batch: int, opts) -> dict:
    """Unpacked and packed, alternating for `opts.rounds` rounds, at one per-device batch size."""
    import torch

    run = c.tiny_run([f"sft.batch_size={batch}", "sft.gradient_accumulation=1"])
    torch.set_num_threads(opts.threads or max(1, run.profile.cpus_per_worker))
    data = c.curriculum_sft_data(run)
    results: dict[str, list[dict]] = {"unpacked": [], "packed": []}
    for _ in range(opts.rounds):
        for mode in results:
            results[mode].append(measure(run, data, mode == "packed", opts.steps, opts.warmup))
    out = {mode: summarise(r) for mode, r in results.items()}
    out["ratio_packed_over_unpacked"] = out["packed"]["real_tokens_per_s"] / out["unpacked"]["real_tokens_per_s"]
    out["setup"] = {
        "examples": len(data),
        "batch": batch,
        "max_seq_length": run.spec.sft.max_seq_length,
        "steps": opts.steps,
        "warmup": opts.warmup,
        "rounds": opts.rounds,
        "threads": torch.get_num_threads(),
        "attention": "sdpa",
    }
    return out


def report(out: dict) -> None:
    s = out["setup"]
    print(
        f"\n# {s['examples']} SFT examples (10 sample topics), batch {s['batch']}, max_seq_length "
        f"{s['max_seq_length']}, {s['steps']} timed steps x {s['rounds']} rounds, {s['threads']} thread(s)"
    )
    rows = []
    for mode in ("unpacked", "packed"):
        r = {"mode": mode, **out[mode], "real_pct": 100 * out[mode]["real_share"]}
        r["fill_pct"] = 100 * r["row_fill"] if r.get("row_fill") else None
        rows.append(r)
    c.print_table(
        rows,
        [
            ("mode", "mode"),
            ("real_tokens_per_s", "real tok/s"),
            ("real_pct", "real %"),
            ("fill_pct", "row fill %"),
            ("step_s", "step s"),
            ("real_tokens_per_step", "real tok/step"),
            ("examples_per_step", "examples/step"),
        ],
    )
    print(
        f"PACKING RATIO batch {s['batch']} (real tokens/s, packed / unpacked): {out['ratio_packed_over_unpacked']:.2f}"
    )
    print(f"PACKED REAL SHARE batch {s['batch']}: {100 * out['packed']['real_share']:.1f}% (goal >= 95%)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=[1, 4],
        help="per-device batch sizes (rows per step) to compare at; the tiny-cpu spec uses 1",
    )
    p.add_argument("--steps", type=int, default=12, help="timed optimizer steps per round and mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of unpacked, packed")
    p.add_argument("--threads", type=int, help="torch threads (default: the cpu-2 profile's 1 per worker)")
    p.add_argument("--json", help="write the figures to this file")
    opts = p.parse_args(argv)
    c.quiet()
    results = []
    for batch in opts.batch:
        results.append(compare(batch, opts))
        report(results[-1])
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
