"""Streamed previews: what they cost the step engine, and what they buy the client.

    python -m benchmarks.previews [--out benchmarks/results] [--store model_store_data]

1. Cost. The mixed benchmark's workload (diffusion, DPM-Solver++(2M), guided: two rows an image, steps drawn
   from {10, 25, 50}) saturating one diffusion replica through the OpenAI endpoint: a closed loop of USERS
   clients, best_effort (so admission refuses nothing and every arm does the same work), in three arms:
   unstreamed, streamed with 0 partial images, streamed with 3. The arms take turns for ROUNDS rounds (this
   machine is shared and noisy: a side-by-side ratio, not two separate runs); throughput is the engine's own
   row-steps per second over each measured window, and finished requests per second at the client.
2. What they buy. 10-, 25- and 50-step requests alone (one at a time), 3 partial images each: time to the first
   preview vs time to the final image, at the client.

Writes OUT/previews.md and previews.json.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.serving import MIXED_STEPS, engine_stats, genserve_app, serving, write
from genserve.build import build
from model_store.store import ModelStore

USERS = 48          # guided requests take two rows: 32 fill the engine's 64-row budget, the rest queue
WARMUP_S = 5.0
MEASURE_S = 20.0
ROUNDS = 2
ARMS = {"unstreamed": None, "streamed, 0 previews": 0, "streamed, 3 previews": 3}
ALONE_REPEATS = 5


def _body(steps: int, partial_images: int | None, seed: int) -> dict[str, Any]:
    body = {"model": "diffusion", "prompt": "sneaker", "sampler": "dpmpp_2m", "steps": steps, "seed": seed,
            "best_effort": True}
    return body | ({"stream": True, "partial_images": partial_images} if partial_images is not None else {})


async def _request(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[float | None, float]:
    """One request: (seconds to its first preview or None, seconds to its final image). Raises on an error."""
    start, first = time.perf_counter(), None
    async with session.post(url + "/v1/images/generations", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
        if not body.get("stream"):
            await response.read()
            return None, time.perf_counter() - start
        async for line in response.content:
            if line.startswith(b"event: image_generation.partial_image") and first is None:
                first = time.perf_counter() - start
            elif line.startswith(b"event: image_generation.completed"):
                done = time.perf_counter() - start
            elif line.startswith(b"event: error"):
                raise RuntimeError(f"stream error: {(await response.read())[:200]!r}")
    return first, done


async def _saturate(url: str, partial_images: int | None, seconds: float, seed: int) -> int:
    """USERS clients in a closed loop for `seconds`; returns the requests they finished."""
    finished, stop = 0, time.perf_counter() + seconds

    async def user(i: int) -> None:
        nonlocal finished
        rng = random.Random(seed * 1000 + i)
        while time.perf_counter() < stop:
            await _request(session, url, _body(rng.choice(MIXED_STEPS), partial_images, rng.randrange(2**31)))
            finished += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(user(i) for i in range(USERS)))
    return finished


def _cost(url: str) -> dict[str, list[dict[str, float]]]:
    """Per arm, per round: engine row-steps/s and client requests/s over the measured window."""
    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    for round_ in range(ROUNDS):
        for arm, partial_images in ARMS.items():
            asyncio.run(_saturate(url, partial_images, WARMUP_S, seed=round_))
            before, start = engine_stats("genserve", "diffusion"), time.perf_counter()
            finished = asyncio.run(_saturate(url, partial_images, MEASURE_S, seed=round_))
            after, elapsed = engine_stats("genserve", "diffusion"), time.perf_counter() - start
            results[arm].append({"row_steps_per_s": (after["row_steps"] - before["row_steps"]) / elapsed,
                                 "requests_per_s": finished / elapsed,
                                 "previews": after["previews"] - before["previews"]})
            print(f"  round {round_ + 1} {arm}: {results[arm][-1]['row_steps_per_s']:,.0f} row-steps/s, "
                  f"{results[arm][-1]['requests_per_s']:.2f} req/s", flush=True)
    return results


def _alone(url: str) -> dict[int, dict[str, float]]:
    """Per step count: median seconds to the first preview and to the final image, one request at a time."""
    async def measure() -> dict[int, dict[str, float]]:
        out = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            await _request(session, url, _body(10, 3, 0))  # warm
            for steps in MIXED_STEPS:
                times = [await _request(session, url, _body(steps, 3, seed)) for seed in range(ALONE_REPEATS)]
                out[steps] = {"first_preview_s": statistics.median(t[0] for t in times),
                              "final_s": statistics.median(t[1] for t in times)}
        return out

    return asyncio.run(measure())


def previews(store: str, out: Path) -> dict[str, Any]:
    with serving([genserve_app("genserve", "/", store, "diffusion", "step")]) as url:
        cost = _cost(url)
        alone = _alone(url)
    mean = {arm: {k: statistics.mean(r[k] for r in rounds) for k in ("row_steps_per_s", "requests_per_s")}
            for arm, rounds in cost.items()}
    data = {"users": USERS, "measure_s": MEASURE_S, "rounds": ROUNDS, "cost": cost, "mean": mean,
            "alone": {str(k): v for k, v in alone.items()}}
    write(out, "previews", _markdown(data), data)
    return data


def _markdown(data: dict[str, Any]) -> str:
    base = data["mean"]["streamed, 0 previews"]["row_steps_per_s"]
    lines = ["| arm | engine row-steps/s (per round) | mean | vs streamed, 0 previews | requests/s |",
             "|---|---|---:|---:|---:|"]
    for arm, rounds in data["cost"].items():
        m = data["mean"][arm]
        per_round = ", ".join(f"{r['row_steps_per_s']:,.0f}" for r in rounds)
        lines.append(f"| {arm} | {per_round} | "
                     f"{m['row_steps_per_s']:,.0f} | {m['row_steps_per_s'] / base:.3f}x | {m['requests_per_s']:.2f} |")
    lines += ["", f"Closed loop of {data['users']} streaming clients on one diffusion replica, {data['measure_s']:.0f} s "
              f"per arm per round, {data['rounds']} rounds, arms in turn.", "",
              "| steps | first preview (ms) | final image (ms) | first preview / final |", "|---:|---:|---:|---:|"]
    for steps, t in data["alone"].items():
        lines.append(f"| {steps} | {t['first_preview_s'] * 1000:.0f} | {t['final_s'] * 1000:.0f} | "
                     f"{t['first_preview_s'] / t['final_s']:.2f} |")
    lines.append(f"\nOne request at a time, 3 partial images, median of {ALONE_REPEATS}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.previews", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--store", default="model_store_data")
    args = parser.parse_args(argv)
    store = ModelStore.open(args.store)
    build(store, log=lambda line: print(line, flush=True))   # a no-op when the store is current
    previews(store.uri, args.out)


if __name__ == "__main__":
    main()
