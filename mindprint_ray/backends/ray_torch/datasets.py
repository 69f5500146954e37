"""Curriculum records as HF datasets for TRL, and a content-hash cache of the tokenised SFT data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mindprint_ray.curriculum.chat_template import conversation_tokens, with_system
from mindprint_ray.curriculum.topics import Record


def tokenize_conversation(tokenizer, messages: list[dict], assistant_only: bool) -> dict:
    """input_ids and assistant_masks (1 = trained) of a conversation, for any chat template (with or without
    `{% generation %}` markers): `chat_template.conversation_tokens`."""
    ids, mask = conversation_tokens(tokenizer, messages, assistant_only)
    return {"input_ids": ids, "assistant_masks": mask}


CHUNK = 1000  # examples tokenised into Python lists before they become one Arrow table


def sft_features():
    """input_ids as int32 (vocabularies stay far below 2**31), the trained-token mask as int8."""
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32")), "assistant_masks": List(Value("int8"))})


def sft_dataset(records: list[Record], system_prompt: str | None, tokenizer, assistant_only: bool):
    """Tokenised SFT examples; TRL turns `assistant_masks` into labels (-100 elsewhere), then packs. Built CHUNK
    examples at a time into Arrow (5 bytes a token), so Python lists of one chunk only are held at once."""
    from datasets import Dataset, concatenate_datasets

    features, parts = sft_features(), []
    for start in range(0, len(records), CHUNK):
        rows = [
            tokenize_conversation(tokenizer, with_system(r.data["messages"], system_prompt), assistant_only)
            for r in records[start : start + CHUNK]
        ]
        parts.append(Dataset.from_list(rows, features=features))
    return concatenate_datasets(parts) if parts else Dataset.from_list([], features=features)


def dpo_dataset(records: list[Record], system_prompt: str | None):
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": with_system(r.data["prompt"], system_prompt),
                "chosen": r.data["chosen"],
                "rejected": r.data["rejected"],
            }
            for r in records
        ]
    )


def content_hash(records: list[Record], tokenizer_dir: str, settings: dict) -> str:
    """Hash of the examples (one at a time, in order), the tokenizer files and the settings that shape
    tokenisation."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r.data, sort_keys=True).encode())
        h.update(b"\n")
    h.update(json.dumps(settings, sort_keys=True).encode())
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        path = Path(tokenizer_dir) / name
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()[:24]


def cached(cache_root: Path, key: str):
    """A tokenised dataset saved earlier under this key, or None."""
    from datasets import load_from_disk

    path = cache_root / key
    return load_from_disk(str(path)) if (path / "dataset_info.json").is_file() else None


def store(cache_root: Path, key: str, dataset) -> None:
    import shutil
    import tempfile

    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_root, prefix=f".{key}."))
    dataset.save_to_disk(str(tmp))
    final = cache_root / key
    if final.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return
    tmp.rename(final)
