"""Generation on MLX with a topic adapter: the model's chat template, stopping at <|im_end|>."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mindprint_ray.curriculum.chat_template import with_system
from mindprint_ray.errors import UserError
from mindprint_ray.planning.run_plan import RunPlan
from mindprint_ray.runs.adapter_format import check_adapter_folder

from .model import load_base, model_dir


def load_with_adapter(run: RunPlan, adapter: Path | None):
    """(model, tokenizer): the run's base (4-bit for nf4, as trained) plus an mlx-lm adapter folder, checked
    (runs.adapter_format.check_adapter_folder) before the model loads."""
    from mlx_lm.tuner.utils import load_adapters

    if adapter is not None and check_adapter_folder(adapter, "--adapter") != "mlx":
        raise UserError(
            "this is a PEFT adapter; MLX generates with mlx-lm adapters",
            file=adapter,
            field="--adapter",
            hint=f"convert it first: mindprint-ray convert --to mlx {adapter} OUT",
        )
    model, tokenizer, _ = load_base(model_dir(run), run.quant)
    if adapter is not None:
        load_adapters(model, str(adapter))
    model.eval()
    return model, tokenizer


def stream(
    model, tokenizer, prompt: str, system: str | None = None, max_tokens: int = 200, temperature: float = 0.0
) -> Iterator[str]:
    """Text pieces of the answer to one user prompt; greedy unless temperature > 0."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    messages = with_system(prompt, system)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    for response in stream_generate(
        model, tokenizer, ids, max_tokens=max_tokens, sampler=make_sampler(temp=temperature)
    ):
        yield response.text
