"""Zone plan: layer bands with their own LoRA modules and rank, counted exactly and rendered for PEFT and MLX."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mindprint_ray.errors import UserError
from mindprint_ray.planning.registry import ALL_MODULES, ModelArch

# The seed's zones as fractions of the layer stack: [start, end) of the layers.
SEED_ZONES = (
    ("lexicon", (0.0, 0.25), ("q_proj",)),
    ("reasoning", (0.25, 0.75), ("v_proj", "up_proj", "down_proj")),
    ("voice", (0.75, 1.0), ("o_proj", "up_proj", "down_proj")),
)
STRATEGIES = {
    # name: (rank, dropout, modules for every zone or None for the seed's per-zone modules); alpha: default_alpha
    "conservative": (8, 0.05, None),
    "aggressive": (16, 0.05, ALL_MODULES),
}


def default_alpha(rank: int) -> float:
    """LoRA alpha where none is set: 2 x rank (the seed's r=8/alpha=16, r=16/alpha=32), per zone and run-wide."""
    return 2 * rank


@dataclass(frozen=True)
class Zone:
    """One resolved zone: a contiguous span of layers [first, last] with its modules and LoRA settings."""

    name: str
    first: int
    last: int
    modules: tuple[str, ...]
    rank: int
    alpha: float
    dropout: float

    @property
    def layers(self) -> list[int]:
        return list(range(self.first, self.last + 1))

    def params(self, arch: ModelArch) -> int:
        """Trainable LoRA parameters: r * (in + out) per targeted module per layer."""
        per_layer = sum(self.rank * sum(arch.module_shape(m)) for m in self.modules)
        return per_layer * len(self.layers)

    def module_paths(self, arch: ModelArch) -> list[str]:
        return [arch.module_path(layer, m) for layer in self.layers for m in self.modules]

    def regex(self, arch: ModelArch) -> str:
        """A regex that fullmatches exactly this zone's module names."""
        layers = "|".join(str(i) for i in self.layers)
        mods = "|".join(re.escape(arch.module_relpath(m)) for m in self.modules)
        return rf"{re.escape(arch.layer_prefix)}\.(?:{layers})\.(?:{mods})"


@dataclass(frozen=True)
class ZonePlan:
    """All zones of one run, plus the run-wide LoRA defaults, computed once and rendered for every backend."""

    arch: ModelArch
    strategy: str
    zones: tuple[Zone, ...]
    rank: int
    alpha: float
    dropout: float
    use_rslora: bool = False

    def trainable_params(self) -> int:
        return sum(z.params(self.arch) for z in self.zones)

    def zone(self, name: str) -> Zone:
        for z in self.zones:
            if z.name == name:
                return z
        raise UserError(f"no zone named '{name}'", hint=f"zones are: {', '.join(z.name for z in self.zones)}")

    def module_paths(self) -> list[str]:
        return [p for z in self.zones for p in z.module_paths(self.arch)]

    def target_regex(self) -> str:
        return "|".join(f"(?:{z.regex(self.arch)})" for z in self.zones)

    def uniform(self) -> bool:
        """True when every zone uses the run-wide rank, alpha and dropout."""
        return all((z.rank, z.alpha, z.dropout) == (self.rank, self.alpha, self.dropout) for z in self.zones)

    def peft_kwargs(self, explicit_list: bool = False) -> dict:
        """Keyword arguments for `peft.LoraConfig` (target regex or explicit list, plus rank/alpha patterns)."""
        rank_pattern = {z.regex(self.arch): z.rank for z in self.zones if z.rank != self.rank}
        alpha_pattern = {z.regex(self.arch): z.alpha for z in self.zones if z.alpha != self.alpha}
        return {
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.module_paths() if explicit_list else self.target_regex(),
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "use_rslora": self.use_rslora,
            "bias": "none",
            "task_type": "CAUSAL_LM",
        }

    def zone_dropouts(self) -> dict[str, float]:
        """Module path -> dropout, for zones whose dropout differs from the run-wide one (PEFT has no pattern)."""
        return {p: z.dropout for z in self.zones if z.dropout != self.dropout for p in z.module_paths(self.arch)}

    def scale(self, zone: Zone) -> float:
        """LoRA scaling as PEFT applies it: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return zone.alpha / (zone.rank**0.5 if self.use_rslora else zone.rank)

    def mlx_configs(self) -> list[dict]:
        """One mlx-lm `lora_parameters` dict per zone: full module paths as keys, that zone's rank and scale."""
        return [
            {"rank": z.rank, "scale": self.scale(z), "dropout": z.dropout, "keys": z.module_paths(self.arch)}
            for z in self.zones
        ]

    def layers_for_zone(self, name: str) -> list[int]:
        return self.zone(name).layers


def fraction_to_span(start: float, end: float, num_layers: int) -> tuple[int, int]:
    return round(start * num_layers), round(end * num_layers) - 1


def build_plan(
    arch: ModelArch,
    strategy: str = "conservative",
    zones: list[dict] | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    dropout: float | None = None,
    use_rslora: bool = False,
) -> ZonePlan:
    """Resolve zone specs (layer spans or fractions) against the architecture and validate them."""
    if strategy not in STRATEGIES:
        raise UserError(
            f"unknown strategy '{strategy}'", field="lora.strategy", hint=f"use one of: {', '.join(STRATEGIES)}"
        )
    s_rank, s_dropout, s_modules = STRATEGIES[strategy]
    rank = rank if rank is not None else s_rank
    alpha = alpha if alpha is not None else default_alpha(rank)
    dropout = dropout if dropout is not None else s_dropout
    if zones is None:
        zones = [{"name": n, "fraction": list(f), "modules": list(s_modules or m)} for n, f, m in SEED_ZONES]
    resolved = tuple(_resolve_zone(arch, i, z, rank, alpha, dropout) for i, z in enumerate(zones))
    _check_overlaps(resolved)
    return ZonePlan(arch, strategy, resolved, rank, alpha, dropout, use_rslora)


def _resolve_zone(arch: ModelArch, index: int, z: dict, rank: int, alpha: float, dropout: float) -> Zone:
    field = f"lora.zones[{index}]"
    name = z.get("name") or f"zone{index}"
    if z.get("layers") is not None:
        first, last = z["layers"]
    elif z.get("fraction") is not None:
        first, last = fraction_to_span(*z["fraction"], arch.num_layers)
    else:
        raise UserError("a zone needs `layers: [first, last]` or `fraction: [start, end]`", field=field)
    if not (0 <= first <= last < arch.num_layers):
        raise UserError(
            f"zone '{name}' spans layers {first}-{last}, outside {arch.name}'s layers 0-{arch.num_layers - 1}",
            field=f"{field}.layers",
            hint="give first <= last, both within the model's layers",
        )
    modules = tuple(z.get("modules") or ())
    if not modules:
        raise UserError(
            f"zone '{name}' has no modules", field=f"{field}.modules", hint=f"choose from: {', '.join(ALL_MODULES)}"
        )
    for m in modules:
        if m not in ALL_MODULES:
            raise UserError(
                f"unknown module '{m}' in zone '{name}' for {arch.name}",
                field=f"{field}.modules",
                hint=f"modules of this architecture are: {', '.join(ALL_MODULES)}",
            )
    if len(set(modules)) != len(modules):
        raise UserError(f"zone '{name}' lists a module twice", field=f"{field}.modules")
    z_rank = z.get("rank") or rank
    z_alpha = z.get("alpha") if z.get("alpha") is not None else (default_alpha(z_rank) if z.get("rank") else alpha)
    z_dropout = z.get("dropout") if z.get("dropout") is not None else dropout
    return Zone(name, first, last, modules, z_rank, z_alpha, z_dropout)


def _check_overlaps(zones: tuple[Zone, ...]) -> None:
    names = [z.name for z in zones]
    if len(set(names)) != len(names):
        raise UserError("two zones share a name", field="lora.zones", hint="give every zone its own name")
    ordered = sorted(zones, key=lambda z: z.first)
    for a, b in zip(ordered, ordered[1:]):
        if b.first <= a.last:
            raise UserError(
                f"zones '{a.name}' ({a.first}-{a.last}) and '{b.name}' ({b.first}-{b.last}) overlap",
                field="lora.zones",
                hint="each layer may belong to one zone only",
            )
