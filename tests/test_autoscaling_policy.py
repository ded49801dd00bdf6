"""The step engine's autoscaling policy (serving/engine/autoscaling.py), fed the way Serve's controller feeds
it; the policy running on a real cluster is tests/cluster/test_autoscaling.py's."""
from types import SimpleNamespace

import yaml
from ray.serve.schema import ServeDeploySchema

from serving.config import DEFAULT_CONFIG
from serving.engine.autoscaling import ROW_DEMAND, TARGET_DEMAND, replicas_for, row_demand_policy


def ctx(demands: dict[str, float], running: int, target: int | None = None):
    return SimpleNamespace(aggregated_metrics={ROW_DEMAND: demands}, current_num_replicas=running,
                           running_replicas=[f"r{i}" for i in range(running)], target_num_replicas=target or running)


def test_replicas_follow_row_demand_not_request_count():
    assert replicas_for([0.0, 0.0]) == 1                      # idle: Serve's min_replicas holds the floor
    assert replicas_for([TARGET_DEMAND, TARGET_DEMAND]) == 2   # exactly at target: stay
    assert replicas_for([1.0, 1.0]) == 3                      # both batches full: one more
    assert replicas_for([2.5]) == 4                           # a full batch and 1.5 batches queued behind it
    assert replicas_for([0.2, 0.2, 0.2]) == 1                 # three replicas a fifth busy: one would do


def test_policy_waits_for_every_replica_to_report():
    assert row_demand_policy(ctx({"r0": 1.0, "r1": 1.0}, running=2))[0] == 3
    assert row_demand_policy(ctx({"r0": 3.0}, running=2, target=2))[0] == 2   # r1 not heard from yet: keep
    assert row_demand_policy(ctx({}, running=0, target=2))[0] == 2             # cold start: Serve's count


def test_the_config_uses_it_for_the_iterative_models():
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    ServeDeploySchema.model_validate(config)
    policies = {d["name"]: d.get("autoscaling_config", {}).get("policy", {}).get("policy_function")
                for d in config["applications"][0]["deployments"]}
    assert policies["diffusion"] == policies["pixelcnn"] == "serving.engine.autoscaling:row_demand_policy"
    assert policies["gan"] is None   # one-pass models batch images across requests: requests are the unit there
