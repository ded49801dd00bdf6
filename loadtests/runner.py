"""Runs a scenario against a server and records every request into a run directory (see loadtests.records).

Open loop: the send schedule is fixed up front (loadtests.schedule) and each request is sent at its
intended time in its own task, however many earlier ones are still waiting, so a slow server cannot slow
the offered load (no coordinated omission); latency runs from the intended send time, and the gap to the
actual send is recorded as the generator's own lag. Closed loop: `concurrency` users, each sending its next
request when its last one is answered. Either way sending stops at the scenario's duration or
max_requests, and every request is bounded by request_timeout_s, so a run ends by duration + timeout."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from loadtests.clients import Client, Outcome, make_client
from loadtests.environment import describe_machine
from loadtests.metrics import scrape
from loadtests.records import METRICS, RUN, Record, RecordWriter
from loadtests.scenario import ClosedLoop, Scenario
from loadtests.schedule import Draws, open_loop_schedule, stage_windows


def run_scenario(scenario: Scenario, out_dir: str | Path, *, progress: bool = True,
                 command: str | None = None) -> Path:
    """Run `scenario` against its server and write the run into `out_dir` (created): requests.jsonl and
    .csv, run.json, and metrics.jsonl when the scenario has a metrics_url. `command` is recorded as the
    exact command that made the run (default: this process's command line). Returns `out_dir`. Raises
    RuntimeError, before sending anything, when the server cannot be reached. Call it from synchronous
    code (it runs its own event loop)."""
    out_dir = Path(out_dir)
    asyncio.run(_Run(scenario, out_dir, progress, command or shlex.join(sys.argv)).main())
    return out_dir


class _Run:
    def __init__(self, scenario: Scenario, out_dir: Path, progress: bool, command: str):
        self.scenario, self.out_dir, self.progress = scenario, out_dir, progress
        self.meta: dict[str, Any] = {
            "scenario": scenario.to_dict(), "scenario_file": scenario.source, "command": command,
            "cwd": os.getcwd(), "environment": describe_machine(),
            "windows": [dataclasses.asdict(w) for w in stage_windows(scenario)]}
        self.sent = self.failed = 0     # requests sent so far, and how many of those failed (progress bar)

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        async with make_client(self.scenario) as client:
            self.meta["server"] = await client.server_info()
            self.out_dir.mkdir(parents=True, exist_ok=True)   # only now: a run against nothing leaves nothing
            self.meta["started_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self._write_meta(complete=False)   # a killed run is still a readable run
            self.writer = RecordWriter(self.out_dir)
            closed = isinstance(self.scenario.load, ClosedLoop)
            schedule = None if closed else open_loop_schedule(self.scenario)
            self.bar = tqdm(total=self.scenario.max_requests if closed else len(schedule), unit="req",
                            desc=self.scenario.name, file=sys.stderr, dynamic_ncols=True,
                            disable=not self.progress or not sys.stderr.isatty())
            self.t0 = loop.time()
            scraper = (asyncio.create_task(scrape(self.scenario.metrics_url, self.out_dir / METRICS, self.t0))
                       if self.scenario.metrics_url else None)
            complete = False
            try:
                await (self._closed_loop(client) if closed else self._open_loop(client, schedule))
                complete = True
            finally:
                if scraper:
                    scraper.cancel()
                    await asyncio.gather(scraper, return_exceptions=True)
                self.bar.close()
                self.writer.close()
                self.meta["wall_s"] = round(loop.time() - self.t0, 3)
                self.meta["requests"] = len(self.writer.records)
                self._write_meta(complete)

    def _write_meta(self, complete: bool) -> None:
        self.meta["complete"] = complete
        (self.out_dir / RUN).write_text(json.dumps(self.meta, indent=2))

    async def _open_loop(self, client: Client, schedule: list) -> None:
        loop, tasks = asyncio.get_running_loop(), []
        for send in schedule:
            if (delay := self.t0 + send.at - loop.time()) > 0:
                await asyncio.sleep(delay)
            # A task per request: the next send never waits for an answer.
            tasks.append(asyncio.create_task(self._one(client, len(tasks), send.stage, send.template, send.seed,
                                                       send.at, send.warmup)))
        await asyncio.gather(*tasks)

    async def _closed_loop(self, client: Client) -> None:
        loop, draws, sc = asyncio.get_running_loop(), Draws(self.scenario), self.scenario

        async def user() -> None:
            while (now := loop.time() - self.t0) < sc.duration_s and self.sent != sc.max_requests:
                template, seed = draws.next()
                await self._one(client, self.sent, 0, template, seed, now, now < sc.warmup_s)

        await asyncio.gather(*(user() for _ in range(sc.load.concurrency)))

    async def _one(self, client: Client, id: int, stage: int, index: int, seed: int, intended: float,
                   warmup: bool) -> None:
        loop, sc = asyncio.get_running_loop(), self.scenario
        template = sc.mix[index]
        self.sent += 1
        actual = loop.time() - self.t0
        try:
            outcome = await asyncio.wait_for(client.send(template, seed), sc.request_timeout_s)
        except TimeoutError:
            outcome = Outcome(0, error=f"timeout: no answer within {sc.request_timeout_s:g} s")
        latency = loop.time() - self.t0 - intended
        offered = None if isinstance(sc.load, ClosedLoop) else sc.load.stages[stage].rate
        self.writer.write(Record(
            id=id, stage=stage, offered_rate=offered, template=index, requested_model=template.model,
            slo_ms=template.latency_slo_ms, seed=seed, intended_send=round(intended, 6),
            actual_send=round(actual, 6), latency_s=round(latency, 6), status=outcome.status, ok=outcome.ok,
            model=outcome.model, family=outcome.family, settings=outcome.settings, policy=outcome.policy,
            server_ms=outcome.server_ms, bytes=outcome.bytes, error=outcome.error, warmup=warmup))
        self.failed += not outcome.ok
        self.bar.set_postfix_str(f"failed {self.failed}", refresh=False)
        self.bar.update(1)
