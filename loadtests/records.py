"""One record per request, and a run directory's files:

    RUN/requests.jsonl   every request, one JSON object a line, written as each one ends (a killed run
                         keeps what it had)
    RUN/requests.csv     the same, sorted by id, written at the end (spreadsheets, pandas)
    RUN/run.json         the scenario, the exact command, the environment, the server's model list,
                         the stage windows
    RUN/metrics.jsonl    the scraped Prometheus samples, if the scenario has a metrics_url
"""
from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.schedule import Window

REQUESTS, REQUESTS_CSV, RUN, METRICS = "requests.jsonl", "requests.csv", "run.json", "metrics.jsonl"


@dataclass(frozen=True)
class Record:
    id: int                     # send order
    stage: int                  # index into the load's stages
    offered_rate: float | None  # the stage's req/s; None in a closed loop
    template: int               # index into the scenario's mix
    requested_model: str        # the template's model ("auto" included)
    slo_ms: float | None        # the template's latency_slo_ms, the SLO the stats hold it to
    seed: int
    intended_send: float        # seconds after the run's start
    actual_send: float          # ... and when it really left: the gap is the generator's own lag
    latency_s: float            # from the intended send to the whole answer read
    status: int                 # HTTP status (gRPC's mapped to it); 0 when none came (connection error, timeout)
    ok: bool                    # 200 and a well-formed answer
    model: str | None           # what the server says served it
    family: str | None
    settings: dict | None       # the sampling settings used (sampler, steps, ...)
    policy: dict | None         # the policy's decision, when the server reports one
    server_ms: float | None     # the server's own latency_ms
    bytes: int                  # response size
    error: str | None
    warmup: bool

    @property
    def rejected(self) -> bool:
        """Turned away by admission control (429, with Retry-After)."""
        return self.status == 429

    @property
    def timed_out(self) -> bool:
        """The server's deadline (504) or ours (no answer within request_timeout_s)."""
        return self.status == 504 or (self.status == 0 and (self.error or "").startswith("timeout"))

    @property
    def done_at(self) -> float:
        return self.intended_send + self.latency_s


class RecordWriter:
    """Appends records to RUN/requests.jsonl as they come; close() also writes RUN/requests.csv."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._file = open(run_dir / REQUESTS, "w")
        self.records: list[Record] = []

    def write(self, record: Record) -> None:
        self.records.append(record)
        self._file.write(json.dumps(dataclasses.asdict(record)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        write_csv(sorted(self.records, key=lambda r: r.id), self.run_dir / REQUESTS_CSV)


def write_csv(records: list[Record], path: Path) -> None:
    names = [f.name for f in dataclasses.fields(Record)]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        for r in records:
            row = dataclasses.asdict(r)
            writer.writerow([json.dumps(row[n]) if isinstance(row[n], dict) else row[n] for n in names])


@dataclass(frozen=True)
class RunData:
    """A recorded run, as the report and the benchmarks read it."""

    run_dir: Path
    meta: dict[str, Any]        # run.json
    records: list[Record]       # by id
    windows: list[Window]       # the stages' measured windows

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS


def read_records(path: Path) -> list[Record]:
    with open(path) as f:
        return sorted((Record(**json.loads(line)) for line in f if line.strip()), key=lambda r: r.id)


def load_run(run_dir: str | Path) -> RunData:
    """Read RUN/run.json and RUN/requests.jsonl."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN).is_file():
        raise FileNotFoundError(f"{run_dir} is not a load-test run: it has no {RUN}")
    meta = json.loads((run_dir / RUN).read_text())
    return RunData(run_dir, meta, read_records(run_dir / REQUESTS), [Window(**w) for w in meta["windows"]])
