"""Serve autoscaling for the step engine by row demand, not request count.

Serve's default policy scales on ongoing requests per replica (target_ongoing_requests). For a step engine
a request is the wrong unit: a guided 50-step diffusion request costs 100x the row-steps of an unguided
1-step one, and what slows every request in a replica is the rows each forward carries. So each iterative
replica reports its row demand — rows running plus rows queued, in units of its row budget (1.0 = one full
batch) — through Serve's custom autoscaling metrics (IterativeDeployment.record_autoscaling_stats), and
this policy asks for enough replicas to keep the average demand at TARGET_DEMAND.

Configured in deploy/serve_config.yaml as
    autoscaling_config: {policy: {policy_function: serving.engine.autoscaling:row_demand_policy}, ...}
Serve applies min/max_replicas and the up/downscale delays around it. Runs in the Serve controller: no
torch, no engine imports."""
from __future__ import annotations

import math
from typing import Any

ROW_DEMAND = "row_demand"   # the metric's name, as record_autoscaling_stats reports it
# Average demand per replica to aim for: below 1 leaves room for a burst to join the running batch at once
# (a replica at 1.0 queues every newcomer behind a full batch, and its step time is already the largest).
TARGET_DEMAND = 0.75


def replicas_for(demands: list[float], target: float = TARGET_DEMAND) -> int:
    """Replicas that would carry these replicas' total demand at `target` each (at least one)."""
    return max(1, math.ceil(sum(demands) / target - 1e-9))


def row_demand_policy(ctx) -> tuple[float, dict[str, Any]]:
    """Serve's custom policy signature: ctx is ray.serve.config.AutoscalingContext; returns the desired
    replicas and the policy state. Until every running replica has reported (a fresh replica, a restart),
    it keeps the current count rather than scale on half the picture."""
    demand = (ctx.aggregated_metrics or {}).get(ROW_DEMAND, {})
    if ctx.current_num_replicas == 0 or len(demand) < len(ctx.running_replicas):
        return ctx.target_num_replicas, {}
    return replicas_for(list(demand.values())), {}
