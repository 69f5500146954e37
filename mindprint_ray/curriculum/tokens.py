"""Token counting for curriculum statistics: the model's own tokenizer and chat template when local.

Uses the `tokenizers` library and jinja2 directly (no torch, no transformers), so `validate` stays fast.
Without a local tokenizer it falls back to a stated approximation (4 characters per token).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

CHARS_PER_TOKEN = 4.0
APPROXIMATE = f"approximate: {CHARS_PER_TOKEN:g} characters per token, ChatML"  # the fingerprint of no tokenizer


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


def _template_file(model_dir: Path) -> str:
    jinja = model_dir / "chat_template.jinja"
    return str(jinja if jinja.is_file() else model_dir / "tokenizer_config.json")


def _named_tokens(model_dir: Path) -> dict[str, str]:
    """bos_token and eos_token from tokenizer_config.json (templates may use them), as strings."""
    cfg = model_dir / "tokenizer_config.json"
    data = json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else {}
    out = {}
    for key in ("bos_token", "eos_token"):
        value = data.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        out[key] = value if isinstance(value, str) else ""
    return out


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


def compile_template(source: str):
    """The chat template compiled as transformers compiles it: sandboxed jinja2 with `{% generation %}`,
    loop controls, `raise_exception`, `strftime_now` and a `tojson` that keeps non-ASCII text."""
    from datetime import datetime

    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # the markers only matter to transformers' assistant mask: render the body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    return env.from_string(source)


@dataclass
class TokenCounter:
    """Counts tokens of a conversation as the trainer will see it: exact with the model's tokenizer and its chat
    template, approximate (stated as such) otherwise."""

    tokenizer: object | None = None
    template: object | None = None
    template_file: str | None = None  # where the template came from (chat_template.jinja or tokenizer_config.json)
    template_error: str | None = None  # why a template that exists could not be compiled
    special_tokens: tuple[str, ...] = ()
    named_tokens: dict | None = None  # bos_token / eos_token, as the template sees them
    fingerprint: str = APPROXIMATE  # what the counts depend on: tokenizer.json, template, named/special tokens

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None and self.template is not None

    @classmethod
    def for_model(cls, model_path: str | None) -> TokenCounter:
        found = local_tokenizer_dir(model_path) if model_path else None
        if not found:
            return cls()
        folder = Path(found)
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        special = tuple(t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special)
        source, where = _chat_template(folder), _template_file(folder)
        template, error = None, None
        if source:
            try:
                template = compile_template(source)
            except Exception as e:  # noqa: BLE001 - any jinja error: reported, and counts become approximate
                error = f"{type(e).__name__}: {e}"
        named = _named_tokens(folder)
        digest = hashlib.sha256((folder / "tokenizer.json").read_bytes())
        digest.update(json.dumps([source, named, special], ensure_ascii=False).encode("utf-8"))
        return cls(tokenizer, template, where, error, special, named, digest.hexdigest())

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation through the model's chat template (as `apply_chat_template(tokenize=False)`)."""
        if not messages:
            return ""
        return self.template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=None, **(self.named_tokens or {})
        )

    def render(self, messages: list[dict]) -> str:
        if self.template is not None:
            return self.render_chat(messages)
        return chatml(messages)

    def count(self, messages: list[dict]) -> int:
        return self.lengths([self.render(messages)])[0]

    def lengths(self, texts: list[str]) -> list[int]:
        """Tokens of each rendered text: one batch through the tokenizer (its threads), or ~4 characters each."""
        if self.tokenizer is None:
            return [max(1, round(len(text) / CHARS_PER_TOKEN)) for text in texts]
        return [len(e.ids) for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
