"""The unseal storm as a picture: latency percentiles against concurrent agents."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import (
    FixedLocator,
    LogLocator,
    NullFormatter,
    NullLocator,
    StrMethodFormatter,
)

from bench.machine import Machine
from bench.stats import percentile
from bench.unseal_storm import Storm


@dataclass(frozen=True)
class Series:
    label: str
    fraction: float
    marker: str
    style: str
    # Where each point's value is written, in points from it: max often sits on p99 and p50
    # close below, so the three labels go above-left, right and below-right.
    offset: tuple[float, float]
    align: str


SERIES = (Series("max", 1.0, "^", ":", (-6, 6), "right"),
          Series("p99", 0.99, "s", "--", (9, -3), "left"),
          Series("p50", 0.5, "o", "-", (6, -12), "left"))


def plot_unseal_latency(storms: list[Storm], machine: Machine, path: Path) -> None:
    """Write a PNG of p50, p99 and max latency against agents, both axes logarithmic: the
    counts span three decades and so do the latencies."""
    served = [s for s in storms if s.latencies]
    agents = [s.agents for s in served]
    # A Figure without pyplot renders PNG with Agg and never looks for a display.
    figure = Figure(figsize=(8, 5.5), dpi=120, layout="constrained")
    axes = figure.subplots()
    for series in SERIES:
        values = [percentile(s.latencies, series.fraction) for s in served]
        top = series.label == "max"  # on top and smaller, so p99 still shows where they meet
        line, = axes.plot(agents, values, marker=series.marker, linestyle=series.style,
                          label=series.label, zorder=3 if top else 2, markersize=5 if top else 7)
        for x, y in zip(agents, values, strict=True):
            axes.annotate(f"{y:.2g} s", (x, y), textcoords="offset points", xytext=series.offset,
                          ha=series.align, fontsize=8, color=line.get_color(), zorder=4,
                          # lines pass behind the labels instead of through them
                          bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none"})
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlim(min(agents) / 1.6, max(agents) * 1.6)  # room for the labels at both ends
    axes.xaxis.set_major_locator(FixedLocator(agents))
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xticklabels([f"{n:,}" for n in agents])
    # Plain seconds (0.2, 1, 50) rather than powers of ten.
    axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    axes.yaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("concurrent agents (each with its own TLS connection)")
    axes.set_ylabel("unseal latency per agent, seconds")
    axes.grid(which="major", alpha=0.3)
    axes.legend(loc="upper left")
    figure.suptitle("Unseal latency against concurrent agents, one escrow serve")
    axes.set_title(f"{datetime.now(UTC):%Y-%m-%d}, {machine.brief()}\nagents simulated in one "
                   "process on the same host as the escrow, TLS on loopback", fontsize=7)
    figure.savefig(path)
