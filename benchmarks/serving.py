"""The serving benchmarks, every served figure measured through the load generator (loadtests/):

    python -m benchmarks.serving ceiling      1. raw ONNX Runtime rows/s of each served graph at batch 1..64
    python -m benchmarks.serving efficiency   2. step engine: row-steps/s served at saturation / the raw ceiling
    python -m benchmarks.serving mixed        3. mixed diffusion steps {10, 25, 50}, Poisson ramp:
                                                 step-batched engine vs the request-level @serve.batch baseline
    python -m benchmarks.serving onepass      4. one-pass (GAN): overhead at low load, saturated throughput
                                                 vs a hand-written Ray Serve + ONNX Runtime peer
    python -m benchmarks.serving machine      5. the whole machine: genserve as `genserve up` runs it vs a minimal
                                                 step-batched loop (benchmarks/steploop.py), unguided DDIM
                                                 {10, 25, 50} steps on a Poisson ramp; then every model at once
    python -m benchmarks.serving all          all five

Streamed previews have their own: python -m benchmarks.previews.

Each prints its table and writes it, with the raw numbers, to OUT (default benchmarks/results/): NAME.md and
NAME.json; the load generator's runs go to OUT/runs/ (`genserve report` turns one into an HTML page).
The store is built if it is not current. Every replica under test gets one CPU (one ONNX Runtime thread),
as deploy/serve_config.yaml gives it; ratios are measured side by side in one run, since this machine is
shared and noisy.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from core.contracts import sample_inputs
from exporters.profile import time_call
from genserve.build import build
from loadtests.records import load_run
from loadtests.runner import run_scenario
from loadtests.scenario import ClosedLoop, OpenLoop, Scenario, Stage, Template
from loadtests.stats import GroupStats, group_stats, summarize
from model_store.store import ModelStore
from serving.config import ITERATIVE_GRAPH, ONE_PASS_GRAPH
from serving.runtime import load_model

GRAPHS = {**ONE_PASS_GRAPH, **ITERATIVE_GRAPH}   # family -> the graph it serves with
BATCHES = (1, 2, 4, 8, 16, 32, 64)
MAX_ROWS = 64                                    # the engine's row budget, as in deploy/serve_config.yaml
MIXED_STEPS = (10, 25, 50)
SLO_S = 3.0                                      # benchmark 3's SLO


# ---- shared ------------------------------------------------------------------------------------------

def raw_rows_per_second(store: str, family: str, batches=BATCHES, budget_s: float = 1.0) -> dict[int, float]:
    """Rows per second of the family's served graph, one thread, the session set up as a replica's."""
    graph = load_model(store, family, GRAPHS, threads=1).graph
    rng = np.random.default_rng(0)
    out = {}
    for b in batches:
        feeds = sample_inputs(graph.contract, b, rng)
        out[b] = b / (time_call(lambda: graph.run(feeds), min_runs=5, budget_s=budget_s) / 1000)
    return out


def _deployment(name: str, num_cpus: float, user_config: dict | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"name": name, "num_replicas": 1, "ray_actor_options": {"num_cpus": num_cpus}}
    return d | ({"user_config": user_config} if user_config else {})


def genserve_app(name: str, prefix: str, store: str, model: str, batching: str) -> dict[str, Any]:
    """One application of genserve's config serving one model on one CPU; the request-level baseline runs
    without genserve's admission control, as a plain Ray Serve app would."""
    from genserve.launch import load_config

    app = dict(load_config()["applications"][0])
    config = {d["name"]: d.get("user_config") for d in app["deployments"]}
    app.update(name=name, route_prefix=prefix,
               args={**app["args"], "store": store, "models": [f"{model}@latest"],
                     "batching": batching, "admission": batching == "step"},
               deployments=[_deployment("Ingress", 0), _deployment(model, 1, config[model])])
    return app


@contextmanager
def serving(apps: list[dict[str, Any]], port: int = 8000, num_cpus: float = 2) -> Iterator[str]:
    """A local Ray (num_cpus CPUs to reserve) running these Serve applications; yields the HTTP root."""
    import ray
    from ray import serve

    from genserve.launch import deploy_local, start_local_ray

    start_local_ray(num_cpus=num_cpus, log_to_driver=False)
    try:
        deploy_local({"proxy_location": "EveryNode", "http_options": {"host": "127.0.0.1", "port": port},
                "applications": apps}, timeout_s=300)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def engine_stats(app: str, model: str) -> dict[str, Any]:
    from ray import serve

    return vars(serve.get_deployment_handle(model, app_name=app).metrics.remote().result(timeout_s=60))


def metrics_url() -> str:
    """The local Ray's Prometheus endpoint: the load generator scrapes it into the run (batch occupancy)."""
    import ray

    return f"http://127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}/metrics"


def load(url: str, out: Path, name: str, mix: list[Template], load: OpenLoop | ClosedLoop, *,
         warmup_s: float = 5.0, timeout_s: float = 60.0) -> Any:
    """Run one scenario through the load generator, scraping Ray's metrics as it goes; returns the
    recorded run (loadtests.records.RunData)."""
    scenario = Scenario(name=name, mix=tuple(mix), load=load, url=url, warmup_s=warmup_s,
                        request_timeout_s=timeout_s, seed=0, metrics_url=metrics_url())
    run_dir = out / "runs" / name
    print(f"  load: {name} -> {run_dir}", flush=True)
    return load_run(run_scenario(scenario, run_dir, progress=False))


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.0f}"


def write(out: Path, name: str, markdown: str, data: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(markdown + "\n")
    (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    print("\n" + markdown + f"\n\n(written to {out / name}.md and .json)", flush=True)


# ---- 1. the ceiling ----------------------------------------------------------------------------------

def ceiling(store: str, out: Path) -> dict[str, dict[int, float]]:
    table = {f"{family}.{GRAPHS[family]}": raw_rows_per_second(store, family) for family in GRAPHS}
    lines = ["| graph | " + " | ".join(f"batch {b}" for b in BATCHES) + " |",
             "|---|" + "---:|" * len(BATCHES)]
    lines += [f"| {g} | " + " | ".join(f"{r[b]:,.0f}" for b in BATCHES) + " |" for g, r in table.items()]
    write(out, "ceiling", "Raw ONNX Runtime throughput, rows (images) per second, one thread:\n\n" + "\n".join(lines),
          {g: {str(b): v for b, v in r.items()} for g, r in table.items()})
    return table


# ---- 2. step engine efficiency -----------------------------------------------------------------------

# Closed-loop users that keep the engine's 64 rows full with requests waiting: a guided diffusion image
# takes 2 rows (32 fill it), a PixelCNN image one (two now that it is guided by default). best_effort: past
# the default SLO the policy would refuse them before the engine is full, which is not what this measures
SATURATING = {"diffusion": (Template(model="diffusion", prompt="bag", steps=50, best_effort=True), 48),
              "pixelcnn": (Template(model="pixelcnn", prompt="bag", best_effort=True), 80)}


def efficiency(store: str, out: Path, warmup_s: float = 20.0, measure_s: float = 40.0,
               families: tuple[str, ...] = tuple(SATURATING)) -> dict[str, Any]:
    """Row-steps per second the engine serves through Ray Serve at saturation (its own counter, over a
    wall-clock window: every gap between forwards counts against it), divided by the raw graph's rows per
    second at the same batch size, measured in the same run on the idle machine just before the load."""
    data, lines = {}, []
    for family in families:
        template, users = SATURATING[family]
        with serving([genserve_app("genserve", "/", store, family, "step")]) as url:
            raw = raw_rows_per_second(store, family, batches=(MAX_ROWS,))[MAX_ROWS]
            with ThreadPoolExecutor(1) as pool:   # the load runs its own event loop in this thread
                run = pool.submit(load, url, out, f"efficiency-{family}", [template],
                                  ClosedLoop(users, warmup_s + measure_s), warmup_s=0,
                                  timeout_s=warmup_s + measure_s + 5)  # then cut: a PixelCNN image takes minutes
                time.sleep(warmup_s)
                t0, before = time.monotonic(), engine_stats("genserve", family)
                time.sleep(measure_s)
                t1, after = time.monotonic(), engine_stats("genserve", family)
                run.result()
        served = (after["row_steps"] - before["row_steps"]) / (t1 - t0)
        rows = (after["row_steps"] - before["row_steps"]) / max(1, after["steps"] - before["steps"])
        data[family] = {"raw_rows_per_s_at_64": raw, "served_row_steps_per_s": served, "mean_rows": rows,
                        "busy_row_steps_per_s": after["row_steps_per_second"], "efficiency": served / raw,
                        "users": users}
        lines.append(f"| {family} | {users} | {rows:.1f} | {raw:,.0f} | {served:,.0f} | {served / raw:.2f} |")
    write(out, "efficiency", "Step engine at saturation through Ray Serve (closed loop), one CPU:\n\n"
          "| model | users | mean rows per forward | raw rows/s at batch 64 | served row-steps/s | efficiency |\n"
          "|---|---:|---:|---:|---:|---:|\n" + "\n".join(lines), data)
    return data


# ---- 4. one-pass overhead vs a hand-written peer -------------------------------------------------------

def onepass(store: str, out: Path, low_rate: float = 5.0, users: int = 64, duration_s: float = 30.0) -> dict[str, Any]:
    apps = [genserve_app("genserve", "/", store, "gan", "step"),
            {"name": "peer", "route_prefix": "/peer", "import_path": "benchmarks.peer:build",
             "args": {"store": store}, "deployments": [_deployment("PeerGAN", 1)]}]
    raw = raw_rows_per_second(store, "gan", batches=(1,))[1]
    forward_s = 1 / raw
    rows, data = [], {"forward_batch1_ms": forward_s * 1000}
    with serving(apps) as root:
        for n in (1, 8):
            mix = [Template(model="gan", prompt="coat", n=n)]
            for who, url in (("genserve", root), ("peer", root + "/peer")):
                low = summarize(load(url, out, f"onepass-{who}-n{n}-low", mix,
                                     OpenLoop("constant", (Stage(low_rate, duration_s),))).records).overall
                sat = summarize(load(url, out, f"onepass-{who}-n{n}-saturated", mix,
                                     ClosedLoop(users, duration_s)).records).overall
                data[f"{who}-n{n}"] = {"low_p50_s": low.p50_s, "saturated_rps": sat.throughput_rps,
                                       "saturated_images_per_s": sat.throughput_rps * n,
                                       "saturated_p50_s": sat.p50_s}
            ours, peer = data[f"genserve-n{n}"], data[f"peer-n{n}"]
            ratio = ours["saturated_rps"] / peer["saturated_rps"]
            data[f"ratio-n{n}"] = ratio
            rows.append(f"| {n} | {_ms(ours['low_p50_s'])} | {_ms(peer['low_p50_s'])} | "
                        f"{ours['saturated_images_per_s']:,.0f} | {peer['saturated_images_per_s']:,.0f} | {ratio:.2f}x |")
    md = (f"One-pass GAN, one CPU per replica; raw forward at batch 1: {forward_s * 1000:.2f} ms. Low load: "
          f"{low_rate:g} req/s constant; saturated: {users} closed-loop users; {duration_s:g} s each.\n\n"
          "| images/request | p50 at low load, genserve (ms) | p50 at low load, peer (ms) | saturated images/s, "
          "genserve | saturated images/s, peer | genserve / peer |\n|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows))
    write(out, "onepass", md, data)
    return data


# ---- 3. mixed diffusion workload -----------------------------------------------------------------------

def _by_stage_and_steps(run) -> list[dict[str, Any]]:
    measured = [r for r in run.records if not r.warmup]
    rows = []
    for w in run.windows:
        stage = [r for r in measured if r.stage == w.stage]
        row: dict[str, Any] = {"rate": w.offered_rate,
                               "all": group_stats("all", stage, w.start, w.end, w.offered_rate, SLO_S * 1000)}
        for steps in MIXED_STEPS:
            row[steps] = group_stats(f"steps={steps}", [r for r in stage if MIXED_STEPS[r.template] == steps],
                                     w.start, w.end, slo_ms=SLO_S * 1000)
        rows.append(row)
    return rows


def mixed(store: str, out: Path, stage_s: float = 20.0, fractions=(0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5)) -> dict[str, Any]:
    raw = raw_rows_per_second(store, "diffusion", batches=(MAX_ROWS,))[MAX_ROWS]
    row_steps_per_request = 2 * float(np.mean(MIXED_STEPS))       # guided: two rows a step
    ceiling_rps = raw / row_steps_per_request
    rates = [round(f * ceiling_rps, 2) for f in fractions]
    mix = [Template(model="diffusion", prompt="sneaker", sampler="dpmpp_2m", steps=s, latency_slo_ms=SLO_S * 1000)
           for s in MIXED_STEPS]
    ramp = OpenLoop("poisson", tuple(Stage(r, stage_s) for r in rates))
    apps = [genserve_app("genserve", "/", store, "diffusion", "step"),
            genserve_app("baseline", "/baseline", store, "diffusion", "request")]
    results = {}
    with serving(apps) as root:
        for who, url in (("step-batched", root), ("request-batched", root + "/baseline")):
            results[who] = _by_stage_and_steps(load(url, out, f"mixed-{who}", mix, ramp, timeout_s=30))
    data = {"raw_rows_per_s_at_64": raw, "ceiling_rps": ceiling_rps, "rates": rates, "slo_s": SLO_S,
            "results": {who: [{"rate": row["rate"], **{str(k): vars(v) for k, v in row.items() if k != "rate"}}
                              for row in rows] for who, rows in results.items()}}
    write(out, "mixed", _mixed_markdown(data, results), data)
    return data


def _capacity(rows: list[dict[str, Any]]) -> float:
    """The highest offered rate whose requests were answered within the SLO at >= 99%."""
    held = [row["rate"] for row in rows if (row["all"].slo_attainment or 0) >= 0.99]
    return max(held, default=0.0)


def _mixed_markdown(data: dict[str, Any], results: dict[str, list[dict[str, Any]]]) -> str:
    header = ("| offered req/s | system | p50 / p99 10 steps (ms) | p50 / p99 25 steps (ms) | p50 / p99 50 steps (ms) "
              "| goodput at 3 s (req/s) | within 3 s | rejected (429) | expired (504) |\n"
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = []
    for i, rate in enumerate(data["rates"]):
        for who, rows in results.items():
            row = rows[i]
            cells = [f"{_ms(row[s].p50_s)} / {_ms(row[s].p99_s)}" for s in MIXED_STEPS]
            a: GroupStats = row["all"]
            lines.append(f"| {rate:g} | {who} | " + " | ".join(cells) +
                         f" | {a.goodput_rps:.2f} | {(a.slo_attainment or 0) * 100:.0f}% | {a.rejection_rate * 100:.0f}% "
                         f"| {a.timeout_rate * 100:.0f}% |")
    caps = {who: _capacity(rows) for who, rows in results.items()}
    knee = next((i for i, row in enumerate(results["request-batched"]) if (row["all"].p50_s or 0) > 1.0), None)
    summary = [f"Raw ceiling: {data['raw_rows_per_s_at_64']:,.0f} rows/s at batch 64 = {data['ceiling_rps']:.2f} req/s "
               f"for this mix (2 rows x {np.mean(MIXED_STEPS):.1f} steps on average).",
               "Capacity (highest rate held at >= 99% within 3 s): " +
               ", ".join(f"{who} {cap:g} req/s ({cap / data['ceiling_rps']:.2f} of the ceiling)" for who, cap in caps.items())]
    if knee is not None:
        ours, base = results["step-batched"][knee][10].p99_s, results["request-batched"][knee][10].p99_s
        if ours and base:
            summary.append(f"At {data['rates'][knee]:g} req/s, where the baseline's median passes 1 s: 10-step p99 "
                           f"{_ms(ours)} ms vs {_ms(base)} ms = {ours / base:.2f}x the baseline's.")
    return "\n".join([header, *lines, "", *summary])


# ---- 5. the whole machine: genserve as `genserve up` runs it vs the minimal step loop ---------------------

MACHINE_RATES = (10.0, 12.0, 15.0, 18.0, 21.0, 24.0)
# issue 14's workload: unguided DDIM, steps drawn from {10, 25, 50}, one image, a class
MACHINE_MIX = [Template(model="diffusion", class_id=7, sampler="ddim", steps=s, guidance_scale=1.0) for s in MIXED_STEPS]
# every model at once, the load a shared machine sees (one-pass n=1, diffusion 25 steps, PixelCNN rarely)
FIVE_MODELS = [Template(model=m, class_id=7, weight=w) for m, w in (("gan", 3), ("vae", 3), ("flow", 3))] + [
    Template(model="diffusion", class_id=7, sampler="ddim", steps=25, guidance_scale=1.0, weight=3),
    Template(model="pixelcnn", class_id=7, weight=0.3)]


def genserve_up_apps(store: str, share_cores: bool = False) -> tuple[list[dict[str, Any]], int]:
    """genserve's applications exactly as `genserve up` deploys them (every model, one replica each), and the
    CPUs it tells Ray to reserve; share_cores: the node's cores shared by demand (GENSERVE_SHARE_CORES=1,
    serving.runtime.cores) instead of every replica sized to its reservation."""
    from genserve.launch import load_config, on_one_node, serve_only_what_the_store_has
    from genserve.up import local_cpus
    from serving.runtime.cores import SHARE_ENV

    config, _ = serve_only_what_the_store_has(on_one_node(load_config()), store)
    if share_cores:
        for d in config["applications"][0]["deployments"]:
            d.setdefault("ray_actor_options", {})["runtime_env"] = {"env_vars": {SHARE_ENV: "1"}}
    return config["applications"], local_cpus(config)


def _step_loop_app(store: str, threads: int) -> dict[str, Any]:
    return {"name": "steploop", "route_prefix": "/", "import_path": "benchmarks.steploop:build",
            "args": {"store": store, "threads": threads}, "deployments": [_deployment("StepLoop", 1)]}


def machine(store: str, out: Path, stage_s: float = 30.0, rates=MACHINE_RATES, only: str = "") -> dict[str, Any]:
    """Issue 14's targets 1 and 2 on this machine, one system at a time on a fresh Ray: the minimal step loop
    with 2 ONNX Runtime threads (and 1), genserve as `genserve up` serves it (all five models) with and without
    latency_slo_ms, on the same Poisson ramp; capacity is the highest rate with >= 99% of requests answered
    OK within 3 s (a refusal counts as a miss); then each genserve arm at 1.5x its own capacity. Last, every
    model at once with the node's cores shared vs each replica sized to its reservation. `only`: run just the
    arms whose name contains it (a quick look; the markdown needs every arm)."""
    ramp = OpenLoop("poisson", tuple(Stage(r, stage_s) for r in rates))
    slo = [dataclasses.replace(t, latency_slo_ms=SLO_S * 1000) for t in MACHINE_MIX]
    apps, cpus = genserve_up_apps(store)
    arms = {"step loop, 2 threads": ([_step_loop_app(store, 2)], 2, MACHINE_MIX),
            "step loop, 1 thread": ([_step_loop_app(store, 1)], 2, MACHINE_MIX),
            "genserve, no latency_slo_ms": (apps, cpus, MACHINE_MIX),
            "genserve, latency_slo_ms 3000": (apps, cpus, slo)}
    data: dict[str, Any] = {"rates": list(rates), "stage_s": stage_s, "slo_s": SLO_S, "arms": {}}
    for arm, (arm_apps, arm_cpus, mix) in arms.items():
        if only not in arm:
            continue
        slug = arm.replace(",", "").replace(" ", "-")
        with serving(arm_apps, num_cpus=arm_cpus) as url:
            rows = _by_stage_and_steps(load(url, out, f"machine-{slug}", mix, ramp, timeout_s=30))
            capacity = _capacity(rows)
            entry = {"capacity_rps": capacity, "ramp": [{"rate": r["rate"], "all": vars(r["all"]),
                                                         **{str(k): vars(r[k]) for k in MIXED_STEPS}} for r in rows]}
            if arm.startswith("genserve") and capacity:
                over = OpenLoop("poisson", (Stage(round(1.5 * capacity, 2), stage_s),))
                a = _by_stage_and_steps(load(url, out, f"machine-{slug}-overload", mix, over, timeout_s=30))[0]["all"]
                entry["at_1.5x"] = {"rate": 1.5 * capacity, **vars(a), "goodput_over_capacity": a.goodput_rps / capacity}
        data["arms"][arm] = entry
    five = OpenLoop("poisson", (Stage(6.0, stage_s), Stage(10.0, stage_s)))
    data["five_models"] = {}
    for arm, share in (("cores shared", True), ("each replica its reservation", False)):
        if only not in arm:
            continue
        five_apps, five_cpus = genserve_up_apps(store, share_cores=share)
        with serving(five_apps, num_cpus=five_cpus) as url:
            run = load(url, out, f"machine-five-{'shared' if share else 'reserved'}", FIVE_MODELS, five, timeout_s=60)
        measured = [r for r in run.records if not r.warmup]
        data["five_models"][arm] = {
            f"{w.offered_rate:g}": {m: vars(group_stats(m, [r for r in measured if r.stage == w.stage
                                                            and FIVE_MODELS[r.template].model == m], w.start, w.end))
                                    for m in ("gan", "vae", "flow", "diffusion", "pixelcnn")}
            for w in run.windows}
    write(out, "machine", _machine_markdown(data), data)
    return data


def _machine_markdown(data: dict[str, Any]) -> str:
    arms = data["arms"]
    lines = ["| offered req/s | " + " | ".join(arms) + " |", "|---:|" + "---|" * len(arms)]
    for i, rate in enumerate(data["rates"]):
        cells = []
        for entry in arms.values():
            row = entry["ramp"][i]
            a, ten = row["all"], row["10"]
            cells.append(f"{a['goodput_rps']:.2f} / {_ms(ten['p99_s'])} ms" +
                         (f" ({a['rejection_rate'] * 100:.0f}% refused)" if a["rejection_rate"] else ""))
        lines.append(f"| {rate:g} | " + " | ".join(cells) + " |")
    lines += ["", "Capacity (highest rate with >= 99% answered OK within 3 s; a refusal is a miss): " +
              ", ".join(f"{arm} {e['capacity_rps']:g} req/s" for arm, e in arms.items()) + "."]
    for arm, e in arms.items():
        if "at_1.5x" in e:
            o = e["at_1.5x"]
            lines.append(f"{arm} at 1.5x its capacity ({o['rate']:g} req/s): goodput {o['goodput_rps']:.2f} req/s = "
                         f"{o['goodput_over_capacity']:.2f}x capacity, {o['rejection_rate'] * 100:.0f}% refused, "
                         f"p99 {_ms(o['p99_s'])} ms.")
    lines += ["", "Every model at once (Poisson; gan, vae, flow, diffusion 25 steps 3:3:3:3, pixelcnn 0.3), "
              "p50 / p99 ms and answered OK per second:", "",
              "| offered req/s | arm | gan | vae | flow | diffusion | pixelcnn |", "|---:|---|---|---|---|---|---|"]
    for arm, by_rate in data["five_models"].items():
        for rate, by_model in by_rate.items():
            lines.append(f"| {rate} | {arm} | " + " | ".join(
                f"{_ms(g['p50_s'])} / {_ms(g['p99_s'])} ({g['throughput_rps']:.2f}/s)" for g in by_model.values()) + " |")
    return "\n".join(lines)


# ---- the command -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["ceiling", "efficiency", "mixed", "onepass", "machine", "all"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--store", default="model_store_data")
    parser.add_argument("--family", choices=tuple(SATURATING), help="efficiency: this family only (default both)")
    args = parser.parse_args(argv)
    store = ModelStore.open(args.store)
    build(store, log=lambda line: print(line, flush=True))   # a no-op when the store is current
    for name in (["ceiling", "efficiency", "mixed", "onepass", "machine"] if args.which == "all" else [args.which]):
        print(f"== {name}", flush=True)
        kwargs = {"families": (args.family,)} if name == "efficiency" and args.family else {}
        globals()[name](store.uri, args.out, **kwargs)


if __name__ == "__main__":
    main()
