"""Export a topic's adapter, or merge it into a BF16 copy of the base model.

For QLoRA runs the adapter is merged into the de-quantised NF4 base (the weights it was trained
against), never into a re-quantised model, so the merged model reproduces base+adapter logits."""

from __future__ import annotations

import shutil
from pathlib import Path

from mindprint_ray.backends.ray_torch.model_loading import load_base_model, load_tokenizer
from mindprint_ray.errors import UserError
from mindprint_ray.planning.run_plan import RunPlan, load_run
from mindprint_ray.runs.run_folder import ADAPTER_MANIFEST, RunFolder
from mindprint_ray.spec.inputs import check_output_dir, check_topic_name


def run_from_folder(folder: RunFolder) -> RunPlan:
    """The run plan of a run folder's spec.yaml (read and checked like any spec)."""
    if not folder.spec_file.is_file():
        raise UserError(
            "not a run folder (no spec.yaml)",
            file=folder.root,
            hint="pass <storage.path>/<run name>, the folder `train` printed",
        )
    return load_run(folder.spec_file)


def export_adapter(run_dir: str | Path, topic: str, out: str | Path, merge: bool = False) -> Path:
    """Copy a finished topic's adapter to `out`, or merge it; `out` is new, empty, or an earlier export."""
    check_topic_name(topic, "--topic")
    check_output_dir(out, "--out", ADAPTER_MANIFEST)
    folder = RunFolder(run_dir)
    run = run_from_folder(folder)
    if not folder.topic_done(topic):
        done = [t for t in run.spec.curriculum.topics if folder.topic_done(t)]
        raise UserError(
            f"topic '{topic}' has no finished adapter in {folder.root}",
            field="--topic",
            hint=f"finished topics: {', '.join(done) or 'none yet'}",
        )
    out, source = Path(out), folder.adapter_dir(topic).resolve()
    if out.resolve() == source or out.resolve() in source.parents:
        raise UserError(
            "is the adapter folder itself or holds it; exporting there would delete the adapter",
            file=out,
            field="--out",
            hint="export to a new folder, e.g. RUN/export/TOPIC",
        )
    if not merge:
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(folder.adapter_dir(topic), out)
        return out
    return merge_adapter(run, folder.adapter_dir(topic), out)


def load_dequantized_base(run: RunPlan):
    """The base model in BF16 (FP32 for fp32 runs); NF4 runs load as trained, then de-quantise."""
    import torch
    from transformers import AutoModelForCausalLM

    if run.quant == "nf4":
        model, _ = load_base_model(run, "cpu")
        model = model.dequantize()
        return model.to(torch.bfloat16)
    dtype = torch.float32 if run.quant == "fp32" else torch.bfloat16
    return AutoModelForCausalLM.from_pretrained(
        run.model_path, dtype=dtype, trust_remote_code=run.spec.model.trust_remote_code
    )


def merge_adapter(run: RunPlan, adapter_dir: Path, out: Path) -> Path:
    from peft import PeftModel

    base = load_dequantized_base(run)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = True
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    load_tokenizer(run).save_pretrained(out)
    shutil.copy2(adapter_dir / ADAPTER_MANIFEST, out / ADAPTER_MANIFEST)  # marks the folder as an export
    return out
