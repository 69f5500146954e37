"""`mindprint-ray eval` and `mindprint-ray generate`: score or talk to a trained adapter (PEFT)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mindprint_ray.cli.views import console
from mindprint_ray.curriculum.topics import load_persona, load_topic, needed_files
from mindprint_ray.errors import UserError
from mindprint_ray.planning.run_plan import load_run
from mindprint_ray.report.numbers import score
from mindprint_ray.runs.storage import materialize_data_dir
from mindprint_ray.spec.inputs import check_output_file, check_topic_name

COLUMNS = (
    "voice_fidelity",
    "accuracy",
    "markers",
    "lexicon",
    "semantic",
    "preference",
    "mc_accuracy",
    "key_fact_recall",
)
AdapterOpt = typer.Option(
    None, "--adapter", help="PEFT adapter folder, e.g. runs/<run>/adapters/<topic> (default: the base model alone)"
)


def _adapter(path: Path | None) -> Path | None:
    """--adapter checked before any model loads: a folder with a readable config and weights."""
    from mindprint_ray.runs.adapter_format import check_adapter_folder

    if path is not None:
        check_adapter_folder(path, "--adapter")
    return path


def _topics(spec, names: str | None) -> list:
    """The topics to score: --topics (any folder in data_dir) or the spec's curriculum."""
    wanted = [t.strip() for t in names.split(",") if t.strip()] if names is not None else list(spec.curriculum.topics)
    if not wanted:
        raise UserError("--topics names no topic", field="--topics", hint="e.g. --topics cycle_basics,accumulation")
    for t in wanted:
        check_topic_name(t, "--topics")
    kinds = [k for k in needed_files(spec) if k != "sft"] + ["eval"]
    data_dir = Path(materialize_data_dir(spec.curriculum.data_dir))  # an s3:// curriculum: its cached copy
    return [load_topic(data_dir, t, sorted(set(kinds)), spec.eval.heldout_pairs) for t in wanted]


def _table(results: list, spec):
    from rich.table import Table

    table = Table(
        title=f"eval (targets: voice fidelity {spec.eval.voice_fidelity_target:.2f}, "
        f"accuracy {spec.eval.accuracy_target:.2f})"
    )
    table.add_column("topic")
    table.add_column("n", justify="right")
    for c in COLUMNS:
        table.add_column(c.replace("_", " "), justify="right")
    for r in results:
        table.add_row(r.topic, str(r.scores["n"]), *(score(r.scores[c]) for c in COLUMNS))
    return table


def eval_command(
    config: Path = typer.Argument(..., help="run spec YAML", show_default=False),
    overrides: list[str] | None = typer.Argument(None, help="dotted overrides", show_default=False),
    adapter: Path | None = AdapterOpt,
    topics: str | None = typer.Option(None, "--topics", help="comma-separated topics (default: the spec's)"),
    out: Path | None = typer.Option(None, "--out", help="JSON file (default: eval-<adapter>.json)"),
) -> None:
    """Score an adapter on each topic's eval set: voice fidelity, accuracy and their components."""
    from mindprint_ray.backends.ray_torch.eval_runner import evaluate_topics_detailed, load_model

    run = load_run(config, overrides or [])
    adapter = _adapter(adapter)
    out = check_output_file(out or Path(f"eval-{adapter.name if adapter else 'base'}.json"), "--out")
    topic_data, persona = _topics(run.spec, topics), load_persona(run.spec.persona_path)
    model, tokenizer = load_model(run, adapter)
    results = evaluate_topics_detailed(model, tokenizer, topic_data, persona, run.spec)
    terminal = console()
    terminal.print(_table(results, run.spec))
    payload = {
        "config": str(config),
        "adapter": str(adapter) if adapter else None,
        "model": run.model_path,
        "topics": {r.topic: {"scores": r.scores, "answers": r.answers} for r in results},
    }
    out.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    terminal.print(f"wrote {out}")


def generate_command(
    config: Path = typer.Argument(..., help="run spec YAML", show_default=False),
    overrides: list[str] | None = typer.Argument(None, help="dotted overrides (before the prompt)", show_default=False),
    prompt: str = typer.Argument(..., help="the question to ask", show_default=False),
    adapter: Path | None = AdapterOpt,
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", min=1, help="default: the spec's eval.max_new_tokens"
    ),
) -> None:
    """Answer one prompt with the chat template applied, streamed token by token (greedy)."""
    from mindprint_ray.backends.ray_torch.eval_runner import load_model, stream_answer

    run = load_run(config, overrides or [])
    model, tokenizer = load_model(run, _adapter(adapter))
    stream_answer(
        model, tokenizer, prompt, run.spec.curriculum.system_prompt, max_new_tokens or run.spec.eval.max_new_tokens
    )


def register(app: typer.Typer) -> None:
    """Add `eval` and `generate` to the CLI."""
    app.command("eval")(eval_command)
    app.command("generate")(generate_command)
