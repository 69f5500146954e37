"""Hardware profiles and hourly prices, read from the data files shipped with the package.

Both files are validated by pydantic models (`HardwareFile`, `PriceFile`), as the run spec is by `RunSpec`."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from mindprint_ray.errors import UserError
from mindprint_ray.spec.run_spec import Section, validation_error
from mindprint_ray.spec.yaml_lines import parse_yaml, read_text

DATA = Path(__file__).parent / "catalog"
PRICE_FIELDS = ("on_demand", "spot", "source", "date")
PRICES_EXAMPLE = "mindprint_ray/planning/catalog/prices.yaml"
HARDWARE_EXAMPLE = "the other profiles of mindprint_ray/planning/catalog/hardware.yaml"


def _as_text(value: Any) -> Any:
    """Dates and numbers as the text they were written as (YAML reads 2025-01-31 as a date); other values as they
    are, for the type check."""
    if isinstance(value, (datetime.date, int, float)) and not isinstance(value, bool):
        return str(value)
    return value


Text = Annotated[str, BeforeValidator(_as_text)]
Dollars = Annotated[float, Field(ge=0)]


class Catalog(Section):
    """An entry of a catalog file: strict types (no "8" for 8, no 1 for true)."""

    model_config = ConfigDict(strict=True)


class PriceEntry(Catalog):
    """One hourly price of catalog/prices.yaml (or of the --prices file): USD per node-hour, with its source."""

    on_demand: Dollars = Field(description="USD per node-hour on demand")
    spot: Dollars = Field(description="USD per node-hour on the spot market (hardware.spot: true)")
    source: Text = Field(description="where the figure came from")
    date: Text = Field(description="when it was recorded, e.g. 2026-11")
    spot_source: Text = Field("", description="where the spot figure came from, e.g. estimate (50% of on-demand)")
    previous_list_price: Dollars | None = Field(None, description="an older list price, costed beside the current")
    previous_list_note: Text = Field("", description="what the older list price was")


class PriceFile(Catalog):
    """A price file: `prices:` by key, each key named by a hardware profile's `price`."""

    prices: dict[str, PriceEntry] = Field(description="hourly prices by key")


class ProfileEntry(Catalog):
    """One hardware profile of catalog/hardware.yaml: nodes, devices per node, memory per device, peak FLOP/s, how
    Ray places workers, the default ZeRO stage, the assumed MFU, the network between nodes and the key of its
    price (a node's: a profile of N nodes costs N times it)."""

    description: str = Field(description="the hardware in words, shown in plans and reports")
    backend: Literal["ray", "mlx"] = Field(description="ray: the Ray backend (torch); mlx: local_mlx on a Mac")
    device: str = Field(description="the device model, e.g. H100-SXM-80GB")
    nodes: int = Field(1, ge=1, description="nodes (machines) the profile trains on; all have `devices` devices")
    devices: int = Field(
        ge=1, description="devices per node; nodes x devices are the default Ray Train workers (hardware.num_workers)"
    )
    memory_gb: float = Field(gt=0, description="memory per device in decimal GB, as the device reports it")
    peak_tflops: float = Field(gt=0, description="dense BF16 peak TFLOP/s per device")
    use_gpu: bool = Field(description="each Ray worker takes a GPU; false: CPU workers")
    cpus_per_worker: int = Field(ge=1, description="CPUs each Ray worker reserves (and its torch threads on CPU)")
    deepspeed: Literal["none", "zero2", "zero3"] = Field(description="the ZeRO stage of hardware.deepspeed: auto")
    price: str = Field(description="key of the node's price in the price file")
    mfu: dict[Literal["nf4", "bf16", "fp32"], Annotated[float, Field(gt=0, le=1)]] = Field(
        min_length=1, description="assumed model-FLOPs utilisation per quantization mode, in (0, 1]"
    )
    wired_limit_fraction: float | None = Field(
        None, gt=0, le=1, description="share of memory a device may use for training (a Mac's GPU wired limit)"
    )
    internode_gbit_s: float | None = Field(
        None, gt=0, description="network bandwidth of one node to the others in Gbit/s (e.g. EFA); needed by nodes > 1"
    )
    internode_efficiency: float | None = Field(
        None, gt=0, le=1, description="assumed share of internode_gbit_s that NCCL's collectives reach, in (0, 1]"
    )
    internode_source: str = Field("", description="where the internode_gbit_s figure came from")

    @model_validator(mode="after")
    def _network_between_nodes(self) -> ProfileEntry:
        if self.nodes > 1 and (self.internode_gbit_s is None or self.internode_efficiency is None):
            raise ValueError("a profile of more than one node needs internode_gbit_s and internode_efficiency")
        return self


class HardwareFile(Catalog):
    """The hardware catalog: `profiles:` by name (hardware.profile in the spec)."""

    profiles: dict[str, ProfileEntry] = Field(description="hardware profiles by name")


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
    """One hardware option: devices, memory per device, peak FLOP/s, how Ray places workers, its price.

    `devices` counts every device of every node (nodes x the file's devices per node): the default Ray Train
    workers, what ZeRO shards over and what the FLOP/s add up over. `price` is the whole profile's per hour
    (nodes x the node's price)."""

    name: str
    description: str
    backend: str  # "ray" or "mlx"
    device: str
    devices: int  # all nodes together
    memory_gb: float
    peak_tflops: float
    use_gpu: bool
    cpus_per_worker: int
    deepspeed: str
    price: Price
    mfu: dict = field(default_factory=dict)
    wired_limit_fraction: float | None = None
    nodes: int = 1
    devices_per_node: int = 0  # 0: all devices on one node
    internode_gbit_s: float | None = None
    internode_efficiency: float | None = None
    internode_source: str = ""

    def __post_init__(self) -> None:
        if not self.devices_per_node:
            object.__setattr__(self, "devices_per_node", self.devices)

    @property
    def capacity_gb(self) -> float:
        """Memory one device can use for training (the GPU wired-memory limit on a Mac)."""
        return self.memory_gb * (self.wired_limit_fraction or 1.0)

    @property
    def is_gpu(self) -> bool:
        return self.use_gpu


def _read_catalog(path: Path, model: type[BaseModel], example: str, missing_hint: str) -> BaseModel:
    """A catalog file validated by `model`; a problem is a UserError naming the file, its line and the key."""
    top = next(iter(model.model_fields))  # the file's one top-level key
    data, lines = parse_yaml(read_text(path, hint="check the path given to --prices"), path)
    if not isinstance(data, dict):
        raise UserError(f"expected a top-level mapping '{top}:'", file=path, line=1)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err, str(path), lines, model, missing_hint, f"fix the value (see {example})") from None


@cache
def load_prices(path: str | None = None) -> dict[str, Price]:
    """Prices by key; every entry needs on_demand, spot, source and date."""
    file = Path(path) if path else DATA / "prices.yaml"
    catalog = _read_catalog(file, PriceFile, PRICES_EXAMPLE, f"every price needs: {', '.join(PRICE_FIELDS)}")
    return {key: Price(key=key, **entry.model_dump()) for key, entry in catalog.prices.items()}


@cache
def load_profiles(prices_path: str | None = None) -> dict[str, Profile]:
    prices = load_prices(prices_path)
    profiles = {}
    catalog = _read_catalog(DATA / "hardware.yaml", HardwareFile, HARDWARE_EXAMPLE, f"add it (see {HARDWARE_EXAMPLE})")
    for name, entry in catalog.profiles.items():
        price_key = entry.price
        if price_key not in prices:
            raise UserError(
                f"profile '{name}' names price '{price_key}', which the price file lacks", field=f"prices.{price_key}"
            )
        fields = entry.model_dump(exclude={"price", "devices"})
        profiles[name] = Profile(
            name=name,
            price=nodes_price(prices[price_key], entry.nodes),
            devices=entry.nodes * entry.devices,
            devices_per_node=entry.devices,
            **fields,
        )
    return profiles


def nodes_price(node: Price, nodes: int) -> Price:
    """The hourly price of `nodes` nodes: every figure of the node's price times the node count."""
    if nodes == 1:
        return node
    return Price(
        key=f"{nodes} x {node.key}",
        on_demand=nodes * node.on_demand,
        spot=nodes * node.spot,
        source=f"{nodes} x {node.source}",
        date=node.date,
        spot_source=node.spot_source,
        previous_list_price=None if node.previous_list_price is None else nodes * node.previous_list_price,
        previous_list_note=node.previous_list_note,
    )


def get_profile(name: str, prices_path: str | None = None) -> Profile:
    profiles = load_profiles(prices_path)
    if name not in profiles:
        raise UserError(
            f"unknown hardware profile '{name}'",
            field="hardware.profile",
            hint=f"known profiles: {', '.join(profiles)}",
        )
    return profiles[name]
