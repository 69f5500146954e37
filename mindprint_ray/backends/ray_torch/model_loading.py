"""Load tokenizer and base model (NF4 QLoRA, BF16 or FP32) and apply the zone plan with PEFT."""

from __future__ import annotations

import importlib.util
import logging

from mindprint_ray.backends.ray_torch.trainer_args import CHECKPOINTING_KWARGS
from mindprint_ray.backends.ray_torch.zero3 import gathered
from mindprint_ray.errors import UserError
from mindprint_ray.planning.run_plan import RunPlan

log = logging.getLogger("mindprint_ray")


def pick_attention(requested: str, cuda: bool) -> str:
    """flash_attention_2 when flash-attn and a CUDA GPU are present, else SDPA (unless the spec names one)."""
    if requested != "auto":
        return requested
    if cuda and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}[name]


def load_tokenizer(run: RunPlan):
    from transformers import AutoTokenizer

    spec = run.spec.model
    tok = AutoTokenizer.from_pretrained(
        run.model_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(run: RunPlan, device: str, local_rank: int = 0):
    """The frozen base model on `device`, quantized per the spec, with the KV cache off (packing needs that)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q, spec = run.spec.quantization, run.spec.model
    cuda = device.startswith("cuda")
    attn = pick_attention(spec.attn_implementation, cuda)
    kwargs: dict = {
        "attn_implementation": attn,
        "trust_remote_code": spec.trust_remote_code,
        "revision": spec.revision,
        "low_cpu_mem_usage": True,
    }
    if q.mode == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
            bnb_4bit_quant_storage=torch_dtype(q.quant_storage),
        )
        kwargs["dtype"] = torch_dtype(q.compute_dtype)
        kwargs["device_map"] = {"": local_rank} if cuda else "cpu"
    else:
        kwargs["dtype"] = torch.bfloat16 if q.mode == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(run.model_path, **kwargs)
    if q.mode != "nf4":
        model.to(device)
    model.config.use_cache = False
    log.info("loaded %s (%s) with attention=%s on %s", run.model_path, q.mode, attn, device)
    return model, attn


def apply_zone_plan(model, run: RunPlan, gradient_checkpointing: bool):
    """Wrap the model with PEFT LoRA on exactly the zone plan's modules (checked after wrapping)."""
    import torch
    from peft import LoraConfig, get_peft_model

    plan = run.zones
    set_checkpointing(model, gradient_checkpointing)
    config = LoraConfig(**plan.peft_kwargs(explicit_list=run.spec.lora.target == "list"))
    peft_model = get_peft_model(model, config)
    dropouts = plan.zone_dropouts()
    wrapped = set()
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            short = name.removeprefix("base_model.model.")
            wrapped.add(short)
            if short in dropouts:
                module.lora_dropout["default"] = torch.nn.Dropout(dropouts[short])
    expected = set(plan.module_paths())
    if wrapped != expected:
        missing, extra = sorted(expected - wrapped)[:3], sorted(wrapped - expected)[:3]
        raise UserError(
            f"the model's modules do not match the zone plan (missing {missing}, unexpected {extra})",
            field="lora.zones",
            hint="check model.name matches the checkpoint's architecture",
        )
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    if trainable != plan.trainable_params():
        raise UserError(
            f"PEFT made {trainable:,} parameters trainable, the zone plan counts "
            f"{plan.trainable_params():,}: the checkpoint's module shapes differ from {run.arch.name}'s",
            field="model.name",
            hint="check model.name matches the checkpoint's architecture",
        )
    return peft_model


def set_checkpointing(model, enabled: bool) -> None:
    """Switch gradient checkpointing on or off on the (PEFT-wrapped) model: each stage calls it with its own
    section's setting (RunSpec.stage), so DPO never inherits SFT's. On, the input embeddings' outputs require
    grad (frozen embeddings would otherwise cut the graph at the first checkpointed layer)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.disable_input_require_grads()
    if enabled:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(CHECKPOINTING_KWARGS))
        base.enable_input_require_grads()
    else:
        base.gradient_checkpointing_disable()


def load_adapter_weights(peft_model, adapter_dir) -> None:
    """Carry a topic's adapter forward: load its weights into the active adapter (under ZeRO-3, into the whole
    weights, from rank 0, partitioned back on exit)."""
    from pathlib import Path

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    lora = [p for name, p in peft_model.named_parameters() if "lora_" in name]
    with gathered(lora, modifier_rank=0):
        result = set_peft_model_state_dict(peft_model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise RuntimeError(f"adapter at {adapter_dir} lacks {len(missing)} LoRA tensors, e.g. {missing[0]}")
