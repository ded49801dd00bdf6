"""Scraping the server's Prometheus endpoint during a run (RUN/metrics.jsonl), and reading back the batch
occupancy series the report plots.

Each line of metrics.jsonl: {"t": seconds after the run's start, "samples": [[name, labels, value], ...]},
or {"t", "error"} when a scrape failed. Only genserve's own series are kept: Ray exports hundreds of its own
(and prefixes ours with `ray_`, hence matching by substring)."""
from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

KEEP = "genserve"
# the gauge of how full the step engine's batches are (serving.observability: rows / max rows)
OCCUPANCY = re.compile(r"genserve_engine_batch_occupancy(_ratio)?$")
INTERVAL_S = 1.0
# labels Ray adds to every series; they would only clutter the legend
RAY_LABELS = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "JobId"}


def parse_samples(text: str) -> list[list]:
    """Prometheus text -> [[name, labels, value]] of genserve's series. Lines are filtered before parsing:
    Ray's endpoint is megabytes a second, and parsing it all stalled the generator's event loop (its send
    lag reached p99 170 ms on 2 cores)."""
    ours = "\n".join(line for line in text.splitlines() if KEEP in line)
    return [[s.name, s.labels, s.value] for family in text_string_to_metric_families(ours)
            for s in family.samples if KEEP in s.name]


async def scrape(url: str, path: Path, start: float) -> None:
    """Runs until cancelled; `start` is the run's origin on the event loop's clock."""
    clock = asyncio.get_running_loop().time
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=INTERVAL_S * 5)) as session:
        with open(path, "w") as out:
            while True:
                t = clock() - start
                try:
                    async with session.get(url) as r:
                        r.raise_for_status()
                        line = {"t": round(t, 3), "samples": parse_samples(await r.text())}
                except (aiohttp.ClientError, OSError, ValueError, asyncio.TimeoutError) as exc:
                    line = {"t": round(t, 3), "error": f"{type(exc).__name__}: {exc}"}
                out.write(json.dumps(line) + "\n")
                out.flush()
                await asyncio.sleep(max(0.0, INTERVAL_S - (clock() - start - t)))


def occupancy_series(path: Path) -> dict[str, tuple[list[float], list[float]]]:
    """From metrics.jsonl: 'name{labels}' -> (times, values) of every batch occupancy gauge scraped."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    if not path.is_file():
        return series
    with open(path) as f:
        for entry in map(json.loads, f):
            for name, labels, value in entry.get("samples", ()):
                if OCCUPANCY.search(name):
                    shown = ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k not in RAY_LABELS)
                    times, values = series.setdefault(f"{name}{{{shown}}}" if shown else name, ([], []))
                    times.append(entry["t"])
                    values.append(value)
    return series
