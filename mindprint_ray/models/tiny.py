"""The embedded default model: a few-MB Qwen2 written as a standard HF folder, deterministically.

Its byte-level BPE tokenizer is trained on the sample corpus, with ChatML special tokens and the
Qwen2.5 chat template, so the same code paths (TRL, PEFT, mlx-lm) run on it as on Qwen2.5-72B.
"""

from __future__ import annotations

import json
from pathlib import Path

from mindprint_ray.curriculum.chat_template import with_system
from mindprint_ray.curriculum.topics import HELDOUT_DEFAULT, split_pairs
from mindprint_ray.errors import UserError
from mindprint_ray.models.sample import ensure_sample_model
from mindprint_ray.planning.registry import ModelArch, get_arch
from mindprint_ray.runs.storage import materialize_data_dir

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus_texts(data_dir: Path) -> list[str]:
    """Every text of the curriculum (messages, prompts, answers, eval items), in a fixed order."""
    texts: list[str] = []

    def collect(value) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            for v in value:
                collect(v)
        elif isinstance(value, dict):
            for k in sorted(value):
                if k not in ("role", "id", "answer"):
                    collect(value[k])

    for path in sorted(data_dir.glob("*/*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                collect(json.loads(line))
    texts.append("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")  # the template's default
    persona = data_dir / "persona.yaml"
    if persona.is_file():
        texts.append(persona.read_text(encoding="utf-8"))
    return texts


def neutral_conversations(data_dir: Path, heldout_fraction: float = HELDOUT_DEFAULT) -> list[list[dict]]:
    """Questions paired with the flat, generic answers (DPO `rejected`): what a plain base assistant says.

    Only each topic's DPO train pairs are used (`curriculum.split_pairs`, the rule training uses), so the
    held-out pairs that the evaluation scores for preference are unseen by the base model too."""
    convs = []
    for path in sorted(data_dir.glob("*/dpo.jsonl")):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for row in split_pairs(rows, heldout_fraction, prompt=lambda r: r["prompt"])[0]:
            prompt = with_system(row["prompt"], None)  # user text or messages
            rejected = (
                row["rejected"]
                if isinstance(row["rejected"], list)
                else [{"role": "assistant", "content": row["rejected"]}]
            )
            convs.append(prompt + rejected)
    return convs


def pretrain(model, tokenizer, conversations: list[list[dict]], steps: int, seed: int) -> None:
    """A short full-parameter warm-up so the tiny base is a (plain-voiced) language model, not noise.

    Single-threaded and seeded, so the written weights are identical on every build."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(seed)
        ids = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"] for c in conversations]
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        model.train()
        for _ in range(steps):
            batch = [ids[i] for i in torch.randint(len(ids), (8,), generator=g).tolist()]
            width = max(map(len, batch))
            x = torch.full((len(batch), width), tokenizer.pad_token_id)
            labels = torch.full((len(batch), width), -100)
            for row, seq in enumerate(batch):
                x[row, : len(seq)] = torch.tensor(seq)
                labels[row, : len(seq)] = torch.tensor(seq)
            loss = model(input_ids=x, attention_mask=(labels != -100).long(), labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
        model.eval()
    finally:
        torch.set_num_threads(threads)


def qwen25_chat_template() -> str:
    """The Qwen2.5 chat template as shipped with TRL (identical to Qwen2.5-Instruct's)."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text(encoding="utf-8")


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def qwen2_config(arch: ModelArch, **extra):
    """A transformers Qwen2Config with exactly the registry architecture (no download); `extra` adds settings."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings,
        rope_theta=1_000_000.0,
        tie_word_embeddings=arch.tie_embeddings,
        **extra,
    )


def write_tiny_model(
    out_dir: str | Path, data_dir: str | Path = "data/curriculum", seed: int = 0, pretrain_steps: int = 300
) -> Path:
    """Write config.json, model.safetensors, tokenizer files and the chat template to `out_dir`."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

    out, data = Path(out_dir), Path(data_dir)
    texts = corpus_texts(data)
    if not texts:
        raise UserError(
            f"no curriculum text found under {data}",
            field="data_dir",
            hint="the tiny tokenizer is trained on <data_dir>/*/*.jsonl",
        )
    arch = get_arch("tiny")
    tok = train_tokenizer(texts, arch.vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=arch.max_position_embeddings,
    )
    tokenizer.chat_template = qwen25_chat_template()
    config = qwen2_config(
        arch,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    convs = neutral_conversations(data)
    if convs and pretrain_steps:
        pretrain(model, tokenizer, convs, pretrain_steps, seed)
    model.generation_config.eos_token_id = [config.eos_token_id, config.pad_token_id]
    model.generation_config.pad_token_id = config.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def ensure_tiny_model(path: str | Path, data_dir: str | Path = "data/curriculum") -> Path:
    """Build the tiny model at `path` unless a complete one is there already."""
    path = Path(path)
    if (
        (path / "config.json").is_file()
        and (path / "model.safetensors").is_file()
        and (path / "tokenizer.json").is_file()
    ):
        return path
    return write_tiny_model(path, data_dir)


def ensure_run_model(run) -> None:
    """A run on the tiny model or the SmolLM2 sample model builds it on first use (the tiny one from the
    curriculum's local copy); other models load from their path or hub id as they are."""
    if Path(run.model_path, "config.json").is_file():
        return
    if run.arch.name == "tiny":
        ensure_tiny_model(run.model_path, materialize_data_dir(run.spec.curriculum.data_dir))
    elif run.arch.name == "smollm2-135m":
        ensure_sample_model(run.model_path)
