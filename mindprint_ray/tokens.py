"""Token counting for curriculum statistics: the model's own tokenizer and chat template when local.

Uses the `tokenizers` library and jinja2 directly (no torch, no transformers), so `validate` stays fast.
Without a local tokenizer it falls back to a stated approximation (4 characters per token).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CHARS_PER_TOKEN = 4.0


def _chat_template(model_dir: Path) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = model_dir / "tokenizer_config.json"
    if cfg.is_file():
        template = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):  # named variants
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template
    return None


def local_tokenizer_dir(model_path: str) -> str | None:
    """The model folder, or its snapshot in the Hugging Face cache, when it holds tokenizer.json."""
    if (Path(model_path) / "tokenizer.json").is_file():
        return model_path
    import os

    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    snapshots = hub.expanduser() / f"models--{model_path.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*/tokenizer.json")) if snapshots.is_dir() else []
    return str(found[-1].parent) if found else None


def chatml(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


@dataclass
class TokenCounter:
    """Counts tokens of a conversation as the trainer will see it."""

    tokenizer: object | None = None
    template: object | None = None

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    @classmethod
    def for_model(cls, model_path: str | None) -> "TokenCounter":
        found = local_tokenizer_dir(model_path) if model_path else None
        if not found:
            return cls()
        folder = Path(found)
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        source = _chat_template(folder)
        template = None
        if source:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False)
            try:
                template = env.from_string(source)
            except Exception:  # a template using transformers-only extensions: fall back to ChatML
                template = None
        return cls(tokenizer, template)

    def render(self, messages: list[dict]) -> str:
        if self.template is not None:
            try:
                return self.template.render(messages=messages, add_generation_prompt=False, tools=None)
            except Exception:
                pass
        return chatml(messages)

    def count(self, messages: list[dict]) -> int:
        text = self.render(messages)
        if self.tokenizer is None:
            return max(1, round(len(text) / CHARS_PER_TOKEN))
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)


def percentile(values: list[int], q: float) -> int:
    if not values:
        return 0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]
