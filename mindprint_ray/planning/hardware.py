"""Hardware profiles and hourly prices, read from the data files shipped with the package."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from mindprint_ray.errors import UserError
from mindprint_ray.spec.yaml_lines import load_yaml

DATA = Path(__file__).parent / "catalog"
PRICE_FIELDS = ("on_demand", "spot", "source", "date")


@dataclass(frozen=True)
class Price:
    key: str
    on_demand: float
    spot: float
    source: str
    date: str
    spot_source: str = ""
    previous_list_price: float | None = None
    previous_list_note: str = ""


@dataclass(frozen=True)
class Profile:
    """One hardware option: devices, memory per device, peak FLOP/s, how Ray places workers, its price."""

    name: str
    description: str
    backend: str  # "ray" or "mlx"
    device: str
    devices: int
    memory_gb: float
    peak_tflops: float
    use_gpu: bool
    cpus_per_worker: int
    deepspeed: str
    price: Price
    mfu: dict = field(default_factory=dict)
    wired_limit_fraction: float | None = None

    @property
    def capacity_gb(self) -> float:
        """Memory one device can use for training (the GPU wired-memory limit on a Mac)."""
        return self.memory_gb * (self.wired_limit_fraction or 1.0)

    @property
    def is_gpu(self) -> bool:
        return self.use_gpu


def _read_yaml(path: Path, top: str) -> dict:
    data = load_yaml(path, hint="check the path given to --prices")
    if not isinstance(data, dict) or not isinstance(data.get(top), dict):
        raise UserError(f"expected a top-level mapping '{top}:'", file=path)
    return data[top]


def _price_number(entry: dict, name: str, file: Path, key: str, optional: bool = False) -> None:
    """A price: a finite number >= 0 (not a boolean, not .nan or .inf)."""
    value = entry.get(name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UserError(f"'{name}' must be a finite number >= 0", file=file, field=f"prices.{key}.{name}")


@cache
def load_prices(path: str | None = None) -> dict[str, Price]:
    """Prices by key; every entry needs on_demand, spot, source and date."""
    file = Path(path) if path else DATA / "prices.yaml"
    prices = {}
    for key, entry in _read_yaml(file, "prices").items():
        if not isinstance(entry, dict):
            raise UserError("each price must be a mapping", file=file, field=f"prices.{key}")
        for f in PRICE_FIELDS:
            if f not in entry:
                raise UserError(
                    f"missing field '{f}'",
                    file=file,
                    field=f"prices.{key}.{f}",
                    hint=f"every price needs: {', '.join(PRICE_FIELDS)}",
                )
        for f in ("on_demand", "spot", "previous_list_price"):
            _price_number(entry, f, file, key, optional=f == "previous_list_price")
        for f in ("source", "date", "spot_source", "previous_list_note"):
            if f in entry and not isinstance(entry[f], str):
                entry[f] = str(entry[f])  # YAML reads 2025-01-31 as a date
        prices[key] = Price(key=key, **{k: entry[k] for k in entry if k in Price.__dataclass_fields__})
    return prices


@cache
def load_profiles(prices_path: str | None = None) -> dict[str, Profile]:
    prices = load_prices(prices_path)
    profiles = {}
    for name, p in _read_yaml(DATA / "hardware.yaml", "profiles").items():
        price_key = p.pop("price")
        if price_key not in prices:
            raise UserError(
                f"profile '{name}' names price '{price_key}', which the price file lacks", field=f"prices.{price_key}"
            )
        profiles[name] = Profile(name=name, price=prices[price_key], **p)
    return profiles


def get_profile(name: str, prices_path: str | None = None) -> Profile:
    profiles = load_profiles(prices_path)
    if name not in profiles:
        raise UserError(
            f"unknown hardware profile '{name}'",
            field="hardware.profile",
            hint=f"known profiles: {', '.join(profiles)}",
        )
    return profiles[name]
