"""Toxiproxy's JSON shapes for toxics and proxies, read into rup's and written back.

Toxiproxy names its toxics' attributes and units its own way; rup's plan syntax has its
own. This module is the one place that translates, type by type:

==========  ===========================================  =====================================
Toxiproxy   attributes (Toxiproxy's units)               rup toxic
==========  ===========================================  =====================================
latency     latency (ms), jitter (ms)                    latency(ms, jitter)
bandwidth   rate (KB/s, 1 KB = 1000 bytes)               bandwidth(rate in bytes/s)
slow_close  delay (ms)                                   slow_close(ms)
timeout     timeout (ms; 0: never close)                 timeout(ms)
reset_peer  timeout (ms); rup adds after (bytes)         reset_peer(ms, after)
slicer      average_size, size_variation (bytes),        slicer(size, variation, delay_ms)
            delay (microseconds)
limit_data  bytes                                        limit_data(bytes)
limit_time  time (ms)                                    limit_time(ms)
==========  ===========================================  =====================================

rup's other toxics (``stall``, ``corrupt``, ``loss``) keep their own attribute names. A
toxic's ``trigger`` (``{"bytes": N, "connections": M}``) is a rup extension, written only
when set. Defaults are Toxiproxy's: ``stream`` downstream, ``toxicity`` 1, name
``TYPE_STREAM``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from faultnet.plan import Direction, PlanSyntaxError, Toxic, toxic_from_dict
from faultnet.tcpproxy import ChaosProxy, NamedToxic, format_address

__all__ = ["ToxicRequest", "proxy_to_json", "toxic_from_json", "toxic_to_json"]

_STREAMS = {"upstream": Direction.UPSTREAM, "downstream": Direction.DOWNSTREAM}
_STREAM_NAMES = {direction: name for name, direction in _STREAMS.items()}

#: per Toxiproxy type: its attribute -> (rup parameter, rup value per Toxiproxy unit)
_ATTRIBUTES: dict[str, dict[str, tuple[str, float]]] = {
    "latency": {"latency": ("ms", 1), "jitter": ("jitter", 1)},
    "bandwidth": {"rate": ("rate", 1000)},
    "slow_close": {"delay": ("ms", 1)},
    "timeout": {"timeout": ("ms", 1)},
    "reset_peer": {"timeout": ("ms", 1), "after": ("after", 1)},
    "slicer": {
        "average_size": ("size", 1),
        "size_variation": ("variation", 1),
        "delay": ("delay_ms", 0.001),
    },
    "limit_data": {"bytes": ("bytes", 1)},
    "limit_time": {"time": ("ms", 1)},
}


@dataclass(frozen=True)
class ToxicRequest:
    """A toxic read from Toxiproxy's JSON, with the name it asked for (or its default)."""

    name: str
    toxic: Toxic


def _number(value: Any, what: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise PlanSyntaxError(f"{what}: expected a number, got {value!r}")
    return value


def toxic_from_json(data: Any, *, existing: NamedToxic | None = None) -> ToxicRequest:
    """Read a toxic in Toxiproxy's shape; with ``existing``, an update of that toxic.

    An update may change ``toxicity``, ``trigger`` and any of the ``attributes``; the
    rest stays as it was, as Toxiproxy's update does. Raises :class:`PlanSyntaxError`.
    """
    if not isinstance(data, Mapping):
        raise PlanSyntaxError("a toxic must be a JSON object")
    base = toxic_to_json(existing) if existing is not None else {}
    kind = data.get("type", base.get("type"))
    if not isinstance(kind, str):
        raise PlanSyntaxError("a toxic needs a 'type'")
    stream = data.get("stream", base.get("stream", "downstream"))
    if stream not in _STREAMS:
        raise PlanSyntaxError(f"stream must be upstream or downstream, got {stream!r}")
    attributes = data.get("attributes", {})
    if not isinstance(attributes, Mapping):
        raise PlanSyntaxError("a toxic's 'attributes' must be an object")
    name = data.get("name", base.get("name", f"{kind}_{stream}"))
    if not isinstance(name, str) or not name:
        raise PlanSyntaxError(f"a toxic's name must be a non-empty string, got {name!r}")
    merged = {**base.get("attributes", {}), **attributes}
    table = _ATTRIBUTES.get(kind)
    if table is not None:
        rup_attributes = {}
        for key, value in merged.items():
            if key not in table:
                raise PlanSyntaxError(
                    f"{kind}: unknown attribute {key!r}; it takes {', '.join(table)}"
                )
            parameter, scale = table[key]
            rup_value = _number(value, f"{kind}.{key}") * scale
            # KB/s times 1000 must stay a whole number of bytes despite float rounding
            whole = math.isfinite(rup_value) and abs(rup_value - round(rup_value)) < 1e-6
            rup_attributes[parameter] = round(rup_value) if whole else rup_value
        merged = rup_attributes
    toxic = toxic_from_dict(
        {
            "type": kind,
            "direction": _STREAMS[stream].value,
            "toxicity": data.get("toxicity", base.get("toxicity", 1.0)),
            "attributes": merged,
            "trigger": data.get("trigger", base.get("trigger", {})),
        }
    )
    return ToxicRequest(name=name, toxic=toxic)


def _plain(value: float) -> int | float:
    # Toxiproxy's clients decode whole numbers into integer fields, which refuse "20.0".
    return int(value) if math.isfinite(value) and value == int(value) else value


def toxic_to_json(named: NamedToxic) -> dict[str, Any]:
    """A toxic in Toxiproxy's shape: name, type, stream, toxicity, attributes."""
    toxic = named.toxic
    params = toxic.params()
    table = _ATTRIBUTES.get(toxic.NAME)
    if table is None:
        attributes = {key: _plain(value) for key, value in params.items()}
    else:
        attributes = {
            key: _plain(params[parameter] / scale) for key, (parameter, scale) in table.items()
        }
    data: dict[str, Any] = {
        "name": named.name,
        "type": toxic.NAME,
        "stream": _STREAM_NAMES[toxic.direction],
        "toxicity": toxic.toxicity,
        "attributes": attributes,
    }
    if toxic.trigger():
        data["trigger"] = toxic.trigger()
    return data


def proxy_to_json(proxy: ChaosProxy) -> dict[str, Any]:
    """A proxy in Toxiproxy's shape, with its toxics."""
    return {
        "name": proxy.name,
        "listen": format_address(proxy.address),
        "upstream": format_address(proxy.upstream),
        "enabled": proxy.enabled,
        "toxics": [toxic_to_json(named) for named in proxy.toxics()],
    }
