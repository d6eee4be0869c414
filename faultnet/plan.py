"""Faults as data: toxics, fault plans, and their text and JSON forms.

The model follows Toxiproxy. A *toxic* is one kind of fault with its parameters, a
direction and a *toxicity* (the chance that it applies to a given connection). A
:class:`FaultPlan` is an ordered list of toxics plus a seed. The same plan and seed always
pick the same toxics for the same connection index, which is what makes a chaos run
replayable.

Text form, for the command line (items are separated by ``;``)::

    seed=7; latency:down(ms=50,jitter=10); reset_peer:up(after=64k)~0.3

Each item is ``NAME[:DIRECTION][(KEY=VALUE,...)][~TOXICITY]``. DIRECTION is ``up``
(client to server, the default) or ``down`` (server to client). Sizes take the suffixes
``k``, ``m`` and ``g`` (powers of 1024); numbers may also be written as ``0xff`` or
``2.5e-3``. The JSON form is what :meth:`FaultPlan.to_json` writes; both forms read back
to an equal plan.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "TOXIC_TYPES",
    "Bandwidth",
    "Corrupt",
    "Direction",
    "FaultPlan",
    "Latency",
    "LimitData",
    "PlanSyntaxError",
    "ResetPeer",
    "Slicer",
    "SlowClose",
    "Stall",
    "Toxic",
    "toxic_from_dict",
]


class PlanSyntaxError(ValueError):
    """A fault plan, in text or JSON, could not be understood."""


class Direction(enum.Enum):
    """Which way the bytes a toxic acts on are travelling."""

    UPSTREAM = "up"  # client -> server: what the wrapped side sends
    DOWNSTREAM = "down"  # server -> client: what the wrapped side receives


@dataclass(frozen=True)
class Toxic:
    """Base of every toxic: where it acts and how often."""

    direction: Direction = Direction.UPSTREAM
    toxicity: float = 1.0

    #: the name used in the text and JSON forms
    NAME: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if not isinstance(self.direction, Direction):
            raise PlanSyntaxError(
                f"{self.NAME}: direction must be a Direction, got {self.direction!r}"
            )
        if not 0.0 <= self.toxicity <= 1.0:
            raise PlanSyntaxError(f"{self.NAME}: toxicity must be within 0..1, got {self.toxicity}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                if not math.isfinite(value):
                    raise PlanSyntaxError(f"{self.NAME}: {f.name} must be finite, got {value}")
                if value < 0:
                    raise PlanSyntaxError(
                        f"{self.NAME}: {f.name} must not be negative, got {value}"
                    )

    def params(self) -> dict[str, Any]:
        """The kind-specific parameters, without direction and toxicity."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("direction", "toxicity")
        }


@dataclass(frozen=True)
class Latency(Toxic):
    """Delay every write by ``ms`` milliseconds, plus a uniform jitter of +-``jitter`` ms."""

    NAME: ClassVar[str] = "latency"
    ms: float = 0.0
    jitter: float = 0.0


@dataclass(frozen=True)
class Bandwidth(Toxic):
    """Limit throughput to ``rate`` bytes per second."""

    NAME: ClassVar[str] = "bandwidth"
    rate: int = 1024 * 1024


@dataclass(frozen=True)
class Slicer(Toxic):
    """Cut writes into pieces of about ``size`` bytes (+-``variation``), ``delay_ms`` apart.

    On the receiving side this shows up as short reads, which is the point.
    """

    NAME: ClassVar[str] = "slicer"
    size: int = 1
    variation: int = 0
    delay_ms: float = 0.0


@dataclass(frozen=True)
class Stall(Toxic):
    """After ``after`` bytes, stop moving data for ``seconds`` (0 means forever).

    This is Toxiproxy's ``timeout`` toxic: the connection stays open but nothing flows,
    which is what a progress timeout must detect.
    """

    NAME: ClassVar[str] = "stall"
    after: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class ResetPeer(Toxic):
    """After ``after`` bytes, reset the connection (a real RST, via ``SO_LINGER 0``)."""

    NAME: ClassVar[str] = "reset_peer"
    after: int = 0


@dataclass(frozen=True)
class LimitData(Toxic):
    """Close the connection cleanly once ``bytes`` bytes have passed."""

    NAME: ClassVar[str] = "limit_data"
    bytes: int = 0


@dataclass(frozen=True)
class SlowClose(Toxic):
    """Delay closing the connection by ``ms`` milliseconds."""

    NAME: ClassVar[str] = "slow_close"
    ms: float = 0.0


@dataclass(frozen=True)
class Corrupt(Toxic):
    """Flip one byte: the byte at stream position ``at`` is XORed with ``mask``."""

    NAME: ClassVar[str] = "corrupt"
    at: int = 0
    mask: int = 0xFF

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.mask <= 0xFF:
            raise PlanSyntaxError(f"corrupt: mask must be within 1..255, got {self.mask}")


TOXIC_TYPES: dict[str, type[Toxic]] = {
    cls.NAME: cls
    for cls in (Latency, Bandwidth, Slicer, Stall, ResetPeer, LimitData, SlowClose, Corrupt)
}

_SIZE_SUFFIXES = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_ITEM = re.compile(
    r"""^(?P<name>[a-z_]+)
        (?::(?P<direction>up|down|upstream|downstream))?
        (?:\((?P<params>[^)]*)\))?
        (?:~(?P<toxicity>[0-9.eE+-]+))?$""",
    re.VERBOSE,
)


_NUMBER = re.compile(
    r"(?P<hex>0[xX][0-9a-fA-F]+)|(?P<int>[0-9]+)(?P<suffix>[kmgKMG]?)"
    r"|(?P<float>(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)(?P<fsuffix>[kmgKMG]?)"
)


def _parse_number(text: str, *, integer: bool, what: str) -> int | float:
    """A non-negative number: ``64k``, ``1.5m``, ``0xff``, ``2.5e-3``; exact for integers."""
    match = _NUMBER.fullmatch(text.strip())
    if match is None:
        raise PlanSyntaxError(
            f"{what}: expected a number such as 10, 2.5, 64k or 0xff, got {text!r}"
        )
    if match["hex"]:
        value: int | float = int(match["hex"], 16)
    elif match["int"]:
        value = int(match["int"]) * _SIZE_SUFFIXES[match["suffix"].lower()]
    else:
        value = float(match["float"]) * _SIZE_SUFFIXES[match["fsuffix"].lower()]
    if integer and value != int(value):
        raise PlanSyntaxError(f"{what}: expected a whole number, got {text!r}")
    return int(value) if integer else float(value)


def _parse_direction(text: str) -> Direction:
    if text in ("up", "upstream"):
        return Direction.UPSTREAM
    if text in ("down", "downstream"):
        return Direction.DOWNSTREAM
    raise PlanSyntaxError(f"direction must be 'up' or 'down', got {text!r}")


def _build_toxic(
    name: str, raw: Mapping[str, Any], *, direction: Direction, toxicity: float
) -> Toxic:
    cls = TOXIC_TYPES.get(name)
    if cls is None:
        known = ", ".join(sorted(TOXIC_TYPES))
        raise PlanSyntaxError(f"unknown toxic {name!r}; known toxics: {known}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("direction", "toxicity")}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        f = fields.get(key)
        if f is None:
            raise PlanSyntaxError(
                f"{name}: unknown parameter {key!r}; it takes {', '.join(fields) or 'none'}"
            )
        integer = f.type in ("int", int)
        if isinstance(value, str):
            value = _parse_number(value, integer=integer, what=f"{name}.{key}")
        elif not isinstance(value, int | float) or isinstance(value, bool):
            raise PlanSyntaxError(f"{name}.{key}: expected a number, got {value!r}")
        elif integer and (not math.isfinite(value) or value != int(value)):
            raise PlanSyntaxError(f"{name}.{key}: expected a whole number, got {value!r}")
        kwargs[key] = int(value) if integer else float(value)
    return cls(direction=direction, toxicity=toxicity, **kwargs)


@dataclass(frozen=True)
class FaultPlan:
    """An ordered list of toxics plus the seed that makes their choices repeatable."""

    toxics: tuple[Toxic, ...] = ()
    seed: int = 0

    NONE: ClassVar[FaultPlan]

    def for_connection(self, index: int) -> tuple[Toxic, ...]:
        """The toxics that apply to connection number ``index``, drawn by toxicity.

        Deterministic: the same plan, seed and index always give the same answer.
        """
        rng = self.rng(index, "select")
        return tuple(t for t in self.toxics if t.toxicity >= 1.0 or rng.random() < t.toxicity)

    def rng(self, index: int, purpose: str) -> random.Random:
        """A random source for one connection and one purpose, derived from the seed."""
        return random.Random(f"{self.seed}:{index}:{purpose}")

    def with_toxic(self, toxic: Toxic) -> FaultPlan:
        return dataclasses.replace(self, toxics=(*self.toxics, toxic))

    # -- text form ---------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        """Read the one-line text form (see the module docstring) or a JSON object."""
        stripped = text.strip()
        if stripped.startswith("{"):
            return cls.from_json(stripped)
        seed = 0
        toxics: list[Toxic] = []
        for item in filter(None, (part.strip() for part in stripped.split(";"))):
            if item.startswith("seed="):
                seed = _parse_seed(item[5:])
                continue
            match = _ITEM.match(item)
            if match is None:
                raise PlanSyntaxError(
                    f"cannot read fault {item!r}; expected NAME[:up|down][(key=value,...)][~p]"
                )
            raw: dict[str, str] = {}
            for pair in filter(None, (p.strip() for p in (match["params"] or "").split(","))):
                key, sep, value = pair.partition("=")
                if not sep:
                    raise PlanSyntaxError(f"{match['name']}: expected key=value, got {pair!r}")
                if key.strip() in raw:
                    raise PlanSyntaxError(f"{match['name']}: {key.strip()!r} given twice")
                raw[key.strip()] = value.strip()
            toxicity = 1.0
            if match["toxicity"]:
                toxicity = float(
                    _parse_number(match["toxicity"], integer=False, what=f"{match['name']}~")
                )
            direction = _parse_direction(match["direction"] or "up")
            toxics.append(_build_toxic(match["name"], raw, direction=direction, toxicity=toxicity))
        return cls(toxics=tuple(toxics), seed=seed)

    def to_text(self) -> str:
        """The one-line text form; :meth:`parse` reads it back to an equal plan."""
        items = [f"seed={self.seed}"]
        for t in self.toxics:
            # repr() of a float is the shortest text that reads back to the same float
            params = ",".join(f"{k}={v!r}" for k, v in t.params().items())
            items.append(f"{t.NAME}:{t.direction.value}({params})~{t.toxicity!r}")
        return "; ".join(items)

    # -- JSON form ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "toxics": [
                {
                    "type": t.NAME,
                    "direction": t.direction.value,
                    "toxicity": t.toxicity,
                    "attributes": t.params(),
                }
                for t in self.toxics
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FaultPlan:
        try:
            toxics_data = data.get("toxics", [])
            if not isinstance(toxics_data, list):
                raise PlanSyntaxError("a fault plan's 'toxics' must be a list")
            seed = data.get("seed", 0)
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise PlanSyntaxError(f"a fault plan's 'seed' must be an integer, got {seed!r}")
            return cls(toxics=tuple(toxic_from_dict(t) for t in toxics_data), seed=seed)
        except (TypeError, AttributeError, ValueError) as exc:
            if isinstance(exc, PlanSyntaxError):
                raise
            raise PlanSyntaxError(f"malformed fault plan: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> FaultPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanSyntaxError(f"fault plan is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise PlanSyntaxError("a JSON fault plan must be an object")
        return cls.from_dict(data)


def _parse_seed(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise PlanSyntaxError(f"seed: expected an integer, got {text!r}") from None


def toxic_from_dict(data: Mapping[str, Any]) -> Toxic:
    """Build one toxic from its JSON form (Toxiproxy's shape: type, attributes, ...)."""
    if not isinstance(data, Mapping) or "type" not in data:
        raise PlanSyntaxError(f"a toxic needs a 'type', got {data!r}")
    attributes = data.get("attributes", {})
    if not isinstance(attributes, Mapping):
        raise PlanSyntaxError("a toxic's 'attributes' must be an object")
    toxicity = data.get("toxicity", 1.0)
    if not isinstance(toxicity, int | float) or isinstance(toxicity, bool):
        raise PlanSyntaxError(f"malformed toxic: 'toxicity' must be a number, got {toxicity!r}")
    return _build_toxic(
        str(data["type"]),
        attributes,
        direction=_parse_direction(str(data.get("direction", "up"))),
        toxicity=float(toxicity),
    )


FaultPlan.NONE = FaultPlan()
