"""Server counters in the Prometheus text exposition format (``expertflow-store stat --prometheus``)."""

from __future__ import annotations

import re
from collections.abc import Mapping

_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")
# Counters only ever grow; everything else the server reports is a gauge.
_COUNTER_SUFFIXES = (
    "_total",
    "_sent",
    "_hits",
    "_misses",
    "_evictions",
    "_reads",
    "_read",
    "_gone",
    "_errors",
    "_dropped",
    "_ignored",
    "_expired",
)


def metric_type(name: str) -> str:
    if name.startswith(("requests_", "errors_")) or name.endswith(_COUNTER_SUFFIXES):
        return "counter"
    return "gauge"


def prometheus_text(counters: Mapping[str, int | float], address: str) -> str:
    """One ``expertflow_store_<name>{server="..."} value`` sample per counter, with TYPE lines."""
    label = address.replace("\\", "\\\\").replace('"', '\\"')
    lines = []
    for name in sorted(counters):
        metric = "expertflow_store_" + _UNSAFE.sub("_", name)
        lines.append(f"# TYPE {metric} {metric_type(name)}")
        lines.append(f'{metric}{{server="{label}"}} {counters[name]}')
    return "\n".join(lines) + "\n"
