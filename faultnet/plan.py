"""Faults as data: toxics, fault plans, and their text and JSON forms.

The model follows Toxiproxy. A *toxic* is one kind of fault with its parameters, a
direction and a *toxicity* (the chance that it applies to a given connection). A
:class:`FaultPlan` is an ordered list of toxics plus a seed. The same plan and seed always
pick the same toxics for the same connection index, which is what makes a chaos run
replayable.

Text form, for the command line (items are separated by ``;``)::

    seed=7; latency:down(ms=50,jitter=10); reset_peer:up(after=64k)~0.3

Each item is ``NAME[:DIRECTION][(KEY=VALUE,...)][~TOXICITY][@TRIGGER]``. DIRECTION is
``up`` (client to server, the default) or ``down`` (server to client). TRIGGER delays the
toxic: ``@bytes=64k`` makes it act only once 64 KiB have passed in its direction (its own
positions then count from there), ``@connections=3`` spares a proxy's first three
connections; both may be given, separated by a comma. Sizes take the suffixes
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
    "LimitTime",
    "Loss",
    "PlanSyntaxError",
    "ResetPeer",
    "Slicer",
    "SlowClose",
    "Stall",
    "Timeout",
    "Toxic",
    "toxic_from_dict",
    "toxic_to_dict",
]


class PlanSyntaxError(ValueError):
    """A fault plan, in text or JSON, could not be understood."""


class Direction(enum.Enum):
    """Which way the bytes a toxic acts on are travelling."""

    UPSTREAM = "up"  # client -> server: what the wrapped side sends
    DOWNSTREAM = "down"  # server -> client: what the wrapped side receives


#: fields every toxic has, which are not among its kind-specific parameters
_COMMON_FIELDS = ("direction", "toxicity", "trigger_bytes", "trigger_connections")


@dataclass(frozen=True)
class Toxic:
    """Base of every toxic: where it acts, how often, and from when.

    ``trigger_bytes`` holds the toxic back until that many bytes have passed in its
    direction; from there on it acts as if its connection had just started (``after``,
    ``at`` and ``bytes`` count from the trigger, timers start there). ``trigger_connections``
    leaves out the first that many connections (by index) entirely.
    """

    direction: Direction = Direction.UPSTREAM
    toxicity: float = 1.0
    trigger_bytes: int = 0
    trigger_connections: int = 0

    #: the name used in the text and JSON forms
    NAME: ClassVar[str] = ""
    #: inclusive bounds of parameters that have them, beyond "finite and not negative"
    LIMITS: ClassVar[Mapping[str, tuple[float, float]]] = {}

    def __post_init__(self) -> None:
        if not isinstance(self.direction, Direction):
            raise PlanSyntaxError(
                f"{self.NAME}: direction must be a Direction, got {self.direction!r}"
            )
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                if not math.isfinite(value):
                    raise PlanSyntaxError(f"{self.NAME}: {f.name} must be finite, got {value}")
                low, high = {"toxicity": (0.0, 1.0), **self.LIMITS}.get(f.name, (0, math.inf))
                if f.name == "toxicity" or f.name in self.LIMITS:
                    if not low <= value <= high:
                        raise PlanSyntaxError(
                            f"{self.NAME}: {f.name} must be within {low:g}..{high:g}, got {value}"
                        )
                elif value < 0:
                    raise PlanSyntaxError(
                        f"{self.NAME}: {f.name} must not be negative, got {value}"
                    )

    def params(self) -> dict[str, Any]:
        """The kind-specific parameters, without direction, toxicity and trigger."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in _COMMON_FIELDS
        }

    def trigger(self) -> dict[str, int]:
        """The trigger's non-default parts, as ``{"bytes": N, "connections": M}``."""
        parts = {"bytes": self.trigger_bytes, "connections": self.trigger_connections}
        return {key: value for key, value in parts.items() if value}

    def needs_timer(self) -> bool:
        """Whether the toxic acts at a time rather than at a byte: only a wrapper that can
        run timers (the chaos proxy) can carry it out."""
        return False


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
    """After ``after`` bytes, reset the connection (a real RST, via ``SO_LINGER 0``).

    With ``ms``, the bytes from ``after`` on are held back for that many milliseconds
    before the reset: Toxiproxy's ``reset_peer`` with its ``timeout``.
    """

    NAME: ClassVar[str] = "reset_peer"
    after: int = 0
    ms: float = 0.0


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
    LIMITS: ClassVar[Mapping[str, tuple[float, float]]] = {"mask": (1, 0xFF)}
    at: int = 0
    mask: int = 0xFF


@dataclass(frozen=True)
class LimitTime(Toxic):
    """Close the connection cleanly ``ms`` milliseconds after it starts (or its trigger)."""

    NAME: ClassVar[str] = "limit_time"
    ms: float = 0.0

    def needs_timer(self) -> bool:
        return True


@dataclass(frozen=True)
class Timeout(Toxic):
    """Toxiproxy's ``timeout``: from the start (or the trigger) nothing passes, and what
    arrives is dropped; the connection closes after ``ms`` milliseconds (0: never)."""

    NAME: ClassVar[str] = "timeout"
    ms: float = 0.0

    def needs_timer(self) -> bool:
        return self.ms > 0


@dataclass(frozen=True)
class Loss(Toxic):
    """Packet loss as a TCP stream feels it: some segments stall for a retransmission.

    The stream is cut into segments of ``segment`` bytes. Each is lost with probability
    ``p``; a lost segment, and every byte behind it, waits ``rto_ms`` milliseconds (the
    retransmission timeout) before it passes. Nothing is dropped or reordered: TCP hides
    loss as delay. ``correlation`` makes losses come in bursts (a Gilbert model): it is
    the correlation between one segment's loss and the next's, while the long-run loss
    rate stays ``p``; a burst lasts ``1 / (1 - p - correlation * (1 - p))`` segments on
    average.
    """

    NAME: ClassVar[str] = "loss"
    LIMITS: ClassVar[Mapping[str, tuple[float, float]]] = {
        "p": (0.0, 1.0),
        "correlation": (0.0, 1.0),
        "segment": (1, math.inf),
    }
    p: float = 0.0
    correlation: float = 0.0
    segment: int = 1460
    rto_ms: float = 200.0


TOXIC_TYPES: dict[str, type[Toxic]] = {
    cls.NAME: cls
    for cls in (
        Latency,
        Bandwidth,
        Slicer,
        Stall,
        ResetPeer,
        LimitData,
        SlowClose,
        Corrupt,
        LimitTime,
        Timeout,
        Loss,
    )
}

_SIZE_SUFFIXES = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_ITEM = re.compile(
    r"""^(?P<name>[a-z_]+)
        (?::(?P<direction>up|down|upstream|downstream))?
        (?:\((?P<params>[^)]*)\))?
        (?:~(?P<toxicity>[0-9.eE+-]+))?
        (?:@(?P<trigger>[a-z0-9.=,\s]+))?$""",
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


_TRIGGER_FIELDS = {"bytes": "trigger_bytes", "connections": "trigger_connections"}


def _read_trigger(name: str, raw: Mapping[str, Any]) -> dict[str, int]:
    """The toxic's trigger fields from ``{"bytes": ..., "connections": ...}``."""
    trigger: dict[str, int] = {}
    for key, value in raw.items():
        field_name = _TRIGGER_FIELDS.get(key)
        if field_name is None:
            raise PlanSyntaxError(
                f"{name}: unknown trigger {key!r}; a trigger takes bytes, connections"
            )
        trigger[field_name] = int(_read_value(value, integer=True, what=f"{name}@{key}"))
    return trigger


def _read_value(value: Any, *, integer: bool, what: str) -> int | float:
    if isinstance(value, str):
        return _parse_number(value, integer=integer, what=what)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise PlanSyntaxError(f"{what}: expected a number, got {value!r}")
    if integer and (not math.isfinite(value) or value != int(value)):
        raise PlanSyntaxError(f"{what}: expected a whole number, got {value!r}")
    return int(value) if integer else float(value)


def _build_toxic(
    name: str,
    raw: Mapping[str, Any],
    *,
    direction: Direction,
    toxicity: float,
    trigger: Mapping[str, Any] | None = None,
) -> Toxic:
    cls = TOXIC_TYPES.get(name)
    if cls is None:
        known = ", ".join(sorted(TOXIC_TYPES))
        raise PlanSyntaxError(f"unknown toxic {name!r}; known toxics: {known}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in _COMMON_FIELDS}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        f = fields.get(key)
        if f is None:
            raise PlanSyntaxError(
                f"{name}: unknown parameter {key!r}; it takes {', '.join(fields) or 'none'}"
            )
        kwargs[key] = _read_value(value, integer=f.type in ("int", int), what=f"{name}.{key}")
    kwargs.update(_read_trigger(name, trigger or {}))
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
        return tuple(self.toxics[i] for i in self.selected(index))

    def selected(self, index: int) -> tuple[int, ...]:
        """Which of the plan's toxics (by position) apply to connection number ``index``."""
        rng = self.rng(index, "select")
        # The draw comes first so a trigger never shifts the choices of other toxics.
        drawn = [
            i for i, t in enumerate(self.toxics) if t.toxicity >= 1.0 or rng.random() < t.toxicity
        ]
        return tuple(i for i in drawn if index >= self.toxics[i].trigger_connections)

    def joins(self, toxic: Toxic, index: int, key: str) -> bool:
        """Whether ``toxic``, added while connection ``index`` is open, applies to it.

        Drawn by toxicity from a source of its own, keyed by the toxic's ``key`` (its name),
        so adding or removing one toxic never changes the draw of another.
        """
        if index < toxic.trigger_connections:
            return False
        return toxic.toxicity >= 1.0 or self.rng(index, f"join:{key}").random() < toxic.toxicity

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
            raw = _split_pairs(match["name"], match["params"] or "")
            toxicity = 1.0
            if match["toxicity"]:
                toxicity = float(
                    _parse_number(match["toxicity"], integer=False, what=f"{match['name']}~")
                )
            direction = _parse_direction(match["direction"] or "up")
            trigger = _split_pairs(match["name"] + "@", match["trigger"] or "")
            toxics.append(
                _build_toxic(
                    match["name"], raw, direction=direction, toxicity=toxicity, trigger=trigger
                )
            )
        return cls(toxics=tuple(toxics), seed=seed)

    def to_text(self) -> str:
        """The one-line text form; :meth:`parse` reads it back to an equal plan."""
        items = [f"seed={self.seed}"]
        for t in self.toxics:
            # repr() of a float is the shortest text that reads back to the same float
            params = ",".join(f"{k}={v!r}" for k, v in t.params().items())
            trigger = ",".join(f"{k}={v}" for k, v in t.trigger().items())
            items.append(
                f"{t.NAME}:{t.direction.value}({params})~{t.toxicity!r}"
                + (f"@{trigger}" if trigger else "")
            )
        return "; ".join(items)

    # -- JSON form ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "toxics": [toxic_to_dict(t) for t in self.toxics]}

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


def _split_pairs(what: str, text: str) -> dict[str, str]:
    """``key=value,...`` into a dict, refusing a pair without ``=`` or a key given twice."""
    raw: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep:
            raise PlanSyntaxError(f"{what}: expected key=value, got {pair!r}")
        if key.strip() in raw:
            raise PlanSyntaxError(f"{what}: {key.strip()!r} given twice")
        raw[key.strip()] = value.strip()
    return raw


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
    trigger = data.get("trigger", {})
    if not isinstance(trigger, Mapping):
        raise PlanSyntaxError("a toxic's 'trigger' must be an object")
    return _build_toxic(
        str(data["type"]),
        attributes,
        direction=_parse_direction(str(data.get("direction", "up"))),
        toxicity=float(toxicity),
        trigger=trigger,
    )


def toxic_to_dict(toxic: Toxic) -> dict[str, Any]:
    """The JSON form :func:`toxic_from_dict` reads; ``trigger`` only when there is one."""
    data: dict[str, Any] = {
        "type": toxic.NAME,
        "direction": toxic.direction.value,
        "toxicity": toxic.toxicity,
        "attributes": toxic.params(),
    }
    if toxic.trigger():
        data["trigger"] = toxic.trigger()
    return data


FaultPlan.NONE = FaultPlan()
