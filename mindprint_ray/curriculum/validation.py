"""Everything that must hold before any training starts: spec, zones, hardware, data, token lengths."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from mindprint_ray.curriculum.chat_template import check_template
from mindprint_ray.curriculum.data_scan import scan_curriculum, scan_overlaps
from mindprint_ray.curriculum.data_stats import TopicStats, drop_overlong, topic_stats
from mindprint_ray.curriculum.tokens import TokenCounter
from mindprint_ray.curriculum.topics import TopicData, curriculum_dir, load_topic, needed_files
from mindprint_ray.errors import UserError
from mindprint_ray.planning.multinode import check_shared_storage
from mindprint_ray.planning.run_plan import RunPlan, load_run


def validate_data(run: RunPlan) -> tuple[list[TopicStats], TokenCounter]:
    """Every check of the spec's data, holding no topic's records: each file streamed once (or its cached scan
    reused), with token statistics per topic after the over-long policy."""
    check_shared_storage(run)  # a run over several nodes needs storage every node sees (s3://)
    counter = TokenCounter.for_model(run.model_path)
    check_model_matches(run)
    check_local_template(run, counter)
    rows = [topic_stats(run.spec, scan) for scan in scan_curriculum(run.spec, counter)]
    return rows, counter


def validate_run(run: RunPlan) -> tuple[list[TopicData], list[TopicStats], TokenCounter]:
    """`validate_data`, then every topic's records for training (over-long ones dropped when the policy says so)."""
    rows, counter = validate_data(run)
    return list(training_topics(run, counter)), rows, counter


def training_topics(run: RunPlan, counter: TokenCounter) -> Iterator[TopicData]:
    """Each topic's records as training uses them, one topic at a time (the files' scans, cached by
    `validate_data`, say which are over-long): a loop that trains topic by topic holds one topic's records."""
    spec = run.spec
    data_dir, kinds = curriculum_dir(spec), needed_files(spec)
    for scan in scan_curriculum(spec, counter):
        topic = load_topic(data_dir, scan.name, kinds, spec.eval.heldout_pairs)
        drop_overlong(spec, topic, scan)
        yield topic


ARCH_KEYS = {
    "num_hidden_layers": "num_layers",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "vocab_size": "vocab_size",
}


def check_model_matches(run: RunPlan) -> None:
    """A local model folder must have the architecture of the registry model the spec names (the zone plan and
    every estimate come from the registry), or PEFT would wrap other modules than planned inside the workers."""
    config_file = Path(run.model_path) / "config.json"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config = config.get("text_config", config)  # multimodal folders (gemma-3) keep the decoder's in text_config
    for key, field in ARCH_KEYS.items():
        if key in config and config[key] != getattr(run.arch, field):
            raise UserError(
                f"the model folder's {key} is {config[key]}, but {run.arch.name} has {getattr(run.arch, field)}",
                file=config_file,
                field="model.name",
                hint="set model.name to the folder's model (or a name outside the registry, so that "
                "its config.json is used)",
            )


def check_local_template(run: RunPlan, counter: TokenCounter) -> None:
    """With a local tokenizer: the chat template must compile and end assistant turns with a special token.
    Each conversation is then split into turns as it is scanned (`data_scan.checked_text`), as the training
    backends split them through transformers before Ray."""
    if counter.tokenizer is None:
        return
    if counter.template is None:
        if counter.template_error:
            raise UserError(
                f"the chat template does not compile: {counter.template_error}",
                file=counter.template_file,
                hint="fix the template's jinja syntax",
            )
        raise UserError(
            f"the model at {run.model_path} has no chat template",
            file=counter.template_file,
            hint="add chat_template.jinja to the model folder (e.g. ChatML)",
        )
    check_template(
        counter.render_chat, counter.special_tokens, [], run.spec.curriculum.system_prompt, counter.template_file
    )


def data_warnings(run: RunPlan, counter: TokenCounter | None = None) -> list[str]:
    """Problems that do not stop a run: eval questions that are also trained prompts (file:line of both)."""
    if not run.spec.eval.enabled:
        return []
    counter = counter or TokenCounter.for_model(run.model_path)
    return [o.message() for o in scan_overlaps(run.spec, counter)]


def validate_all(config: str | Path, overrides: list[str]) -> tuple[RunPlan, list[TopicStats], TokenCounter]:
    run = load_run(config, overrides)
    rows, counter = validate_data(run)
    return run, rows, counter
