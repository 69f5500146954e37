"""Assistant-only loss on any chat template: which characters and tokens carry loss, and templates refused
before training (validate and train exit 2, naming the template)."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_data, make_spec, run_cli

from mindprint_ray.curriculum.chat_template import TemplateError, assistant_spans, end_of_turn_token, token_mask
from mindprint_ray.curriculum.tokens import compile_template

CHATML_NO_MARKERS = (  # SmolLM2-135M-Instruct's template: a default system prompt, no {% generation %}
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else "
    "message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
WITH_MARKERS = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
    "{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
REWRITES_HISTORY = (  # drops earlier assistant turns' reasoning, as Qwen3-style templates do
    "{% for message in messages %}{% if message['role'] == 'assistant' and not loop.last %}"
    "{{ '<|im_start|>assistant\n' + message['content'].split('</think>')[-1] + '<|im_end|>\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NO_END_TOKEN = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
SPECIALS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
]
CONVERSATION = [
    {"role": "user", "content": "What is a cycle low?"},
    {"role": "assistant", "content": "Let me put it simply: the trough."},
    {"role": "user", "content": "And then?"},
    {"role": "assistant", "content": "Remember: low to low."},
]


def renderer(source: str, bos: str = ""):
    template = compile_template(source)
    return lambda messages, gen: (
        template.render(messages=messages, add_generation_prompt=gen, bos_token=bos) if messages else ""
    )


@pytest.mark.parametrize(
    "source,bos,eot",
    [
        (CHATML_NO_MARKERS, "", "<|im_end|>"),
        (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
        (GEMMA, "<bos>", "<end_of_turn>"),
        (WITH_MARKERS, "", "<|im_end|>"),
    ],
)
def test_assistant_spans_are_content_and_end_of_turn(source, bos, eot):
    text, spans = assistant_spans(renderer(source, bos), CONVERSATION)
    assert [text[a:b] for a, b in spans] == ["Let me put it simply: the trough." + eot, "Remember: low to low." + eot]
    assert end_of_turn_token(renderer(source, bos), SPECIALS) == eot


def test_template_that_rewrites_earlier_turns_is_refused():
    convo = [CONVERSATION[0], {"role": "assistant", "content": "<think>hmm</think>The trough."}, *CONVERSATION[2:]]
    with pytest.raises(TemplateError, match="prefix"):
        assistant_spans(renderer(REWRITES_HISTORY), convo)


def test_template_without_an_end_of_turn_token_is_refused():
    with pytest.raises(TemplateError, match="no special token"):
        end_of_turn_token(renderer(NO_END_TOKEN), SPECIALS)


def test_token_mask_marks_tokens_starting_inside_a_span():
    offsets = [(0, 5), (5, 9), (9, 12), (12, 12), (12, 20)]
    assert token_mask(offsets, [(5, 12)]) == [0, 1, 1, 0, 0]


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_which_smollm2_tokens_carry_loss(smollm2_tokenizer):
    """The real SmolLM2 template (no generation markers): only assistant content and <|im_end|> are trained."""
    from mindprint_ray.backends.ray_torch.datasets import tokenize_conversation

    tok = smollm2_tokenizer
    out = tokenize_conversation(tok, CONVERSATION, assistant_only=True)
    trained = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    expected = (
        tok("Let me put it simply: the trough.", add_special_tokens=False)["input_ids"]
        + [tok.eos_token_id]
        + tok("Remember: low to low.", add_special_tokens=False)["input_ids"]
        + [tok.eos_token_id]
    )
    assert trained == expected
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"
    assert sum(out["assistant_masks"]) < len(out["input_ids"]) / 2  # system, user turns and headers are not
    everything = tokenize_conversation(tok, CONVERSATION, assistant_only=False)
    assert everything["input_ids"] == out["input_ids"] and all(everything["assistant_masks"])


def test_generation_stops_at_the_templates_end_of_turn(smollm2_tokenizer):
    from mindprint_ray.backends.ray_torch.eval_runner import end_of_turn_ids

    assert end_of_turn_ids(smollm2_tokenizer)[0] == smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")


def model_with_template(src: Path, dst: Path, template: str) -> Path:
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").write_text(template)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("command", ["validate", "train"])
def test_unusable_template_is_refused_before_ray(tmp_path, tiny_model_dir, command):
    model = model_with_template(tiny_model_dir, tmp_path / "model", NO_END_TOKEN)
    data = make_data(tmp_path / "data")
    spec = make_spec(tmp_path / "run.yaml", data, storage={"path": str(tmp_path / "runs")})
    result = run_cli(command, str(spec), f"model.path={model}", timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "chat_template.jinja" in result.stderr and "no special token" in result.stderr
    assert "Traceback" not in result.stderr and "Ray" not in result.stdout + result.stderr
    assert not (tmp_path / "runs" / "t").exists()  # nothing claimed, nothing started


def test_template_failing_on_one_conversation_names_its_line(tmp_path, tiny_model_dir):
    model = model_with_template(tiny_model_dir, tmp_path / "model", REWRITES_HISTORY)
    data = make_data(tmp_path / "data", n=4)
    sft = data / "alpha" / "sft.jsonl"
    rows = sft.read_text().splitlines()
    rows[2] = json.dumps(
        {"messages": [CONVERSATION[0], {"role": "assistant", "content": "<think>x</think>Low."}, *CONVERSATION[2:]]}
    )
    sft.write_text("\n".join(rows) + "\n")
    result = run_cli("validate", str(make_spec(tmp_path / "run.yaml", data)), f"model.path={model}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{sft}:3" in result.stderr and "messages" in result.stderr and "prefix" in result.stderr
