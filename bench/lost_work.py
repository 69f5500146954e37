"""The work a restart lost, in optimizer steps, read from a finished run's metrics.jsonl.

For each restart of the worker group (a lost node, a preemption, a killed worker): the last step the group logged
before it went, the checkpoint step it resumed from, and the difference (steps done twice). A preemption notice is
listed with its step: the just-in-time checkpoint is taken there.

    python bench/lost_work.py RUN_DIR [RUN_DIR ...]

tests/test_multinode_ray.py produces such runs (run it with --basetemp=DIR to keep them: the run folders of an
s3:// run are mirrored under DIR/.../cache*/runs/<bucket>/runs/<name>).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def restarts(records: list[dict]) -> list[dict]:
    """One row per worker-group restart: where the previous group stopped and where the new one resumed."""
    rows, last = [], {}
    for r in records:
        if r.get("event") == "worker_group_start":
            restored = r.get("restored")
            if restored and last:
                same = (last["topic"], last["stage"]) == (restored["topic"], restored["stage"])
                lost = last["step"] - restored["step"] if same else None
                rows.append(
                    {"world_size": r["world_size"], "last_logged": dict(last), "resumed": restored, "lost_steps": lost}
                )
        elif r.get("event") == "preemption_notice":
            rows.append({"preemption_notice": {k: r[k] for k in ("topic", "stage", "step")}})
        elif "loss" in r and "step" in r and r.get("stage") in ("sft", "dpo"):
            last = {"topic": r["topic"], "stage": r["stage"], "step": r["step"]}
    return rows


def main(paths: list[str]) -> None:
    for path in paths:
        metrics = Path(path) / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        print(f"{path}:")
        for row in restarts(records):
            print("  " + json.dumps(row))


if __name__ == "__main__":
    main(sys.argv[1:])
