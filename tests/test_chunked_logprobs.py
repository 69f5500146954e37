"""Log-probs in small tiles (issue 15, item 3): equal to the full-vocabulary computation, loss and gradients, on
random tensors with padding and on the tiny model (SFT masked NLL, DPO sequence log-probs), and really what the
worker's SFT and DPO trainers run."""

from __future__ import annotations

from pathlib import Path

import pytest

from mindprint_ray.planning import memory

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-cpu.yaml"

torch = pytest.importorskip("torch")


def full_logprobs(hidden, weight, bias, targets):
    """Per-token log-probs from the whole [N, vocab] logits in fp32 (the plain computation)."""
    logits = hidden.float() @ weight.float().t() + (0 if bias is None else bias.float())
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1), logits


def padded_batch(gen, batch=3, seq=37, hidden=24, vocab=301):
    """Hidden states of right-padded rows with -100 labels on the prompt and the padding (TRL's layout)."""
    h = torch.randn(batch, seq, hidden, generator=gen, dtype=torch.float64).float()
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    lengths, prompts = [seq, seq - 9, 11], [5, 12, 3]
    for row, (n, p) in enumerate(zip(lengths, prompts)):
        labels[row, :p] = -100
        labels[row, n:] = -100
    return h, labels


@pytest.mark.parametrize("token_tile,vocab_tile,bias", [(7, 64, False), (16, 301, True), (1000, 50, False)])
def test_tiled_logprobs_equal_the_full_logits_with_padding(token_tile, vocab_tile, bias):
    from mindprint_ray.backends.ray_torch.chunked_logprobs import tiled_logprobs

    gen = torch.Generator().manual_seed(1)
    h, labels = padded_batch(gen)
    vocab = 301
    w = (torch.randn(vocab, h.shape[-1], generator=gen) * 0.3).requires_grad_()
    b = (torch.randn(vocab, generator=gen) * 0.1).requires_grad_() if bias else None
    mask = labels != -100
    targets = labels.clamp(min=0).reshape(-1)
    leaves = [t for t in (w, b) if t is not None]

    def losses(per_token):
        per_token = per_token.view(mask.shape).masked_fill(~mask, 0)
        sft = -per_token.sum() / mask.sum()  # SFT: masked mean NLL
        dpo = per_token.sum(-1)  # DPO: each row's summed completion log-probs
        return sft, dpo

    h1 = h.clone().requires_grad_()
    out = tiled_logprobs(
        h1.reshape(-1, h.shape[-1]), w, b, targets, 1.0, vocab_tile, None, 1.0, ("log_probs", "entropy", "is_top1"),
        token_tile=token_tile,
    )  # fmt: skip
    sft, dpo = losses(out[0])
    grads = torch.autograd.grad(sft + (dpo * torch.tensor([0.3, -1.0, 2.0])).sum(), [h1, *leaves])

    h2 = h.clone().requires_grad_()
    ref, logits = full_logprobs(h2.reshape(-1, h.shape[-1]), w, b, targets)
    sft_ref, dpo_ref = losses(ref)
    grads_ref = torch.autograd.grad(sft_ref + (dpo_ref * torch.tensor([0.3, -1.0, 2.0])).sum(), [h2, *leaves])

    assert sft.item() == pytest.approx(sft_ref.item(), abs=1e-5)
    torch.testing.assert_close(dpo, dpo_ref, atol=1e-5, rtol=0)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=0)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(out[1], -(p * torch.log(p)).sum(-1).detach(), atol=1e-5, rtol=0)  # entropy
    assert torch.equal(out[4], logits.argmax(-1) == targets)  # is_top1


def test_the_tiles_the_memory_model_assumes_are_trls():
    """memory.py states TRL 1.16's tiles and MLX's chunk (the core imports neither): a change fails here."""
    import trl.kernels.chunked_logprob as kernel
    import trl.trainer.utils as fused

    from local_mlx.losses import LOGITS_CHUNK

    assert memory.TRL_TOKEN_TILE == kernel.TOKEN_CHUNK_SIZE
    assert memory.TRL_VOCAB_TILE == fused._CHUNKED_LOGPROB_CHUNK_SIZE
    assert memory.MLX_LOGITS_CHUNK == LOGITS_CHUNK  # and MLX's chunk of positions


# Peak memory of the tiled log-probs, measured: a fresh process (its own peak RSS) runs the worker's head on
# SmolLM2's shapes (vocab 49,152, hidden 576; random weights, fp32 CPU), forward and backward, as
# bench/logits_memory.py --kinds head does on the real weights (docs/benchmarks.md)
PEAK_OF_HEAD = """
import re, sys
from pathlib import Path
import torch
from mindprint_ray.backends.ray_torch.chunked_logprobs import TiledLogProbFunction

def status(key):
    return int(re.search(key + r":\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

full, n, vocab, width = sys.argv[1] == "full", int(sys.argv[2]), 49152, 576
gen = torch.Generator().manual_seed(0)
weight = torch.randn(vocab, width, generator=gen) * 0.02
hidden = torch.randn(n, width, generator=gen).requires_grad_()
targets = torch.randint(0, vocab, (n,), generator=gen)
outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
def head(h, t):
    if full:
        return torch.log_softmax(h @ weight.t(), -1).gather(-1, t[:, None]).squeeze(-1)
    return TiledLogProbFunction.apply(h, weight, None, t, 1.0, 32768, None, 1.0, outputs)[0]
head(hidden[:8], targets[:8]).sum().backward()  # warm up
hidden.grad = None
try:
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts at the current RSS
except OSError:
    pass  # the setup's own peak (the weight, the warm-up) is not above its RSS by more than a few MB
before = status("VmRSS")
head(hidden, targets).sum().backward()
print(status("VmHWM") - before)
"""


def measured_head_bytes(head: str, tokens: int) -> int:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", PEAK_OF_HEAD, head, str(tokens)], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_the_cpu_logits_term_matches_the_measured_peak_at_2048_tokens(stage):
    from mindprint_ray.planning.registry import arch_from_hf_config

    config = {  # models/smollm2/config.json
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    }
    arch = arch_from_hf_config(config, "smollm2", "smollm2")
    sequences, seq = (2 if stage == "dpo" else 1), 2048
    m = memory.MemoryInputs("fp32", "ray", 0, seq, 1, True, 0, 1, False, sequences, activation_bytes=4)
    modelled = memory.logits_bytes(arch, m)
    tiled = measured_head_bytes("tiled", sequences * (seq - 1))  # the step's positions: seq - 1 per sequence
    assert modelled == pytest.approx(tiled, rel=0.15)
    if stage == "sft":  # the plain computation holds the full fp32 logits several times over: the term it replaced
        full, logits = measured_head_bytes("full", seq - 1), (seq - 1) * arch.vocab_size * 4
        assert full > 2.5 * logits and tiled < full / 1.5


# ---- the tiny model -----------------------------------------------------------------------------------------------


def tiny_run(model_dir: Path):
    from mindprint_ray.planning.run_plan import load_run

    overrides = [f"model.path={model_dir}", f"curriculum.data_dir={ROOT / 'data' / 'curriculum'}", "lora.dropout=0"]
    return load_run(TINY, overrides)  # no dropout: two forwards of one batch compare exactly


def zone_model(run):
    from mindprint_ray.backends.ray_torch.model_loading import apply_zone_plan, load_base_model

    base, _ = load_base_model(run, "cpu")
    model = apply_zone_plan(base, run, False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # A and B: every model built here holds the same adapter
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


@pytest.fixture
def small(monkeypatch):
    """Tiles small enough that the tiny model's batches span several of them."""
    from mindprint_ray.backends.ray_torch import chunked_logprobs

    monkeypatch.setattr(chunked_logprobs, "CPU_TOKEN_TILE", 8)
    monkeypatch.setattr(chunked_logprobs, "CPU_VOCAB_TILE", 512)


@pytest.fixture
def calls(monkeypatch):
    """Counts TRL kernel calls (one per token tile) made through the fused lm_head."""
    from trl.kernels import ChunkedLogProbFunction

    seen = []
    original = ChunkedLogProbFunction.apply

    def counting(*args):
        seen.append(args[0].shape[0])
        return original(*args)

    monkeypatch.setattr(ChunkedLogProbFunction, "apply", counting)
    return seen


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_tiny_model_sft_nll_and_dpo_logprobs_equal_the_full_logits(tiny_model_dir, small, calls):
    from trl.trainer.utils import add_fused_lm_head

    from mindprint_ray.backends.ray_torch.chunked_logprobs import small_tiles

    run = tiny_run(tiny_model_dir)
    model = zone_model(run)
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, model.config.vocab_size, (2, 40), generator=gen)
    attention = torch.ones_like(ids)
    attention[1, 30:] = 0
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :6] = -100  # the prompt

    with small_tiles("cpu"):
        fused = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
    assert len(calls) == 10  # 2 x 39 positions in tiles of 8: the tiled path ran
    fused.loss.backward()
    grads = lora_grads(model)
    model.zero_grad(set_to_none=True)
    plain = model(input_ids=ids, attention_mask=attention, labels=labels)  # transformers' loss, full logits
    plain.loss.backward()
    assert fused.loss.item() == pytest.approx(plain.loss.item(), abs=1e-5)
    for name, g in lora_grads(model).items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=0)

    # DPO: each row's summed log-probs over its completion, token by token within 1e-5; the sums of ~35 values near
    # -8 agree to fp32's rounding of a sum near -290 (1e-7 relative)
    logits = plain.logits.detach().float()
    per_token = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    per_token = per_token * (labels[:, 1:] != -100)
    torch.testing.assert_close(fused.log_probs.detach(), per_token, atol=1e-5, rtol=0)
    torch.testing.assert_close(fused.log_probs.detach().sum(-1), per_token.sum(-1), atol=1e-5, rtol=1e-6)


def sft_rows(n=3, length=30):
    from datasets import Dataset

    gen = torch.Generator().manual_seed(3)
    return Dataset.from_list(
        [{"input_ids": torch.randint(3, 1000, (length,), generator=gen).tolist(),
          "assistant_masks": [0] * 5 + [1] * (length - 5)} for _ in range(n)]
    )  # fmt: skip


def test_the_sft_trainer_runs_the_tiles(tiny_model_dir, tmp_path, small, calls):
    from trl import SFTConfig

    from mindprint_ray.backends.ray_torch.model_loading import load_tokenizer
    from mindprint_ray.backends.ray_torch.trainer_args import trainer_args
    from mindprint_ray.backends.ray_torch.trainers import sft_trainer_class

    run = tiny_run(tiny_model_dir)
    common = trainer_args(run.spec, "sft", str(tmp_path / "sft"), False, None, False)
    common.update(save_strategy="no", report_to=[], max_steps=1)
    args = SFTConfig(**common, packing=False, assistant_only_loss=False)
    model = zone_model(run)
    trainer = sft_trainer_class()(
        model=model, args=args, train_dataset=sft_rows(), processing_class=load_tokenizer(run)
    )
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[0]]))
    loss = trainer.compute_loss(model, dict(batch))
    assert calls == [8, 8, 8, 5]  # 29 positions in tiles of 8
    plain = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss  # the full logits
    assert loss.item() == pytest.approx(plain.item(), abs=1e-5)
    calls.clear()
    trainer.train()
    assert calls and max(calls) <= 8  # every forward of the training step went through the tiles


def test_the_dpo_trainer_runs_the_tiles(tiny_model_dir, tmp_path, small, calls):
    from datasets import Dataset
    from trl import DPOConfig

    from mindprint_ray.backends.ray_torch.model_loading import load_tokenizer
    from mindprint_ray.backends.ray_torch.trainer_args import trainer_args
    from mindprint_ray.backends.ray_torch.trainers import dpo_trainer_class

    run = tiny_run(tiny_model_dir)
    common = trainer_args(run.spec, "dpo", str(tmp_path / "dpo"), False, None, False)
    common.update(save_strategy="no", report_to=[], max_steps=1)
    rows = [
        {"prompt": [{"role": "user", "content": f"Where is low {i}?"}],
         "chosen": [{"role": "assistant", "content": "In my view the cycle low is behind us."}],
         "rejected": [{"role": "assistant", "content": "Down."}]}
        for i in range(2)
    ]  # fmt: skip
    trainer = dpo_trainer_class()(
        model=zone_model(run),
        ref_model=None,
        args=DPOConfig(**common, beta=0.1),
        processing_class=load_tokenizer(run),
        train_dataset=Dataset.from_list(rows),
        precompute=True,
    )
    assert calls and max(calls) <= 8  # the precomputed reference went through the tiles
    calls.clear()
    trainer.train()
    assert calls and max(calls) <= 8  # and so did the policy's forward
    assert trainer.state.log_history[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at step 1
