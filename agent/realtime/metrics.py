"""Prometheus text-format metrics, by hand: a few counters, gauges and histograms
(the client library would add a dependency for ~60 lines of formatting)."""
from __future__ import annotations

import threading
from collections import defaultdict
from typing import Dict, Sequence, Tuple

LATENCY_BUCKETS_MS = (10, 25, 50, 100, 200, 300, 500, 750, 1000, 2000, 5000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += value
        self.n += 1


class Metrics:
    """Thread-safe: the engine thread observes batch sizes, the event loop the rest."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counters: Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float] = defaultdict(float)
        self.gauges: Dict[str, float] = defaultdict(float)
        self.histograms: Dict[Tuple[str, Tuple[Tuple[str, str], ...]], Histogram] = {}
        self.help: Dict[str, str] = {}

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self._lock:
            self.counters[(name, tuple(sorted(labels.items())))] += value

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self.gauges[name] = value

    def observe(self, name: str, value: float, buckets: Sequence[float] = LATENCY_BUCKETS_MS, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            if key not in self.histograms:
                self.histograms[key] = Histogram(buckets)
            self.histograms[key].observe(value)

    def render(self) -> str:
        def fmt(labels, extra=()):
            items = list(labels) + list(extra)
            return "{" + ",".join(f'{k}="{v}"' for k, v in items) + "}" if items else ""

        lines = []
        with self._lock:
            for name, value in sorted(self.gauges.items()):
                lines += [f"# TYPE {name} gauge", f"{name} {value:g}"]
            seen = set()
            for (name, labels), value in sorted(self.counters.items()):
                if name not in seen:
                    lines.append(f"# TYPE {name} counter")
                    seen.add(name)
                lines.append(f"{name}{fmt(labels)} {value:g}")
            for (name, labels), h in sorted(self.histograms.items()):
                if name not in seen:
                    lines.append(f"# TYPE {name} histogram")
                    seen.add(name)
                cumulative = 0
                for edge, count in zip(h.buckets, h.counts):
                    cumulative += count
                    lines.append(f"{name}_bucket{fmt(labels, [('le', f'{edge:g}')])} {cumulative}")
                lines.append(f"{name}_bucket{fmt(labels, [('le', '+Inf')])} {h.n}")
                lines.append(f"{name}_sum{fmt(labels)} {h.total:g}")
                lines.append(f"{name}_count{fmt(labels)} {h.n}")
        return "\n".join(lines) + "\n"
