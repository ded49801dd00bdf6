"""The latency/quality policy: which model, sampler and step count serves a request in time at the best
quality (policy.py), from candidates with measured quality (candidates.py) and latency models corrected
online (latency.py); simulator.py replays workloads through it without Ray."""
from serving.policy.candidates import TIERS, Candidate, Quality, QualityFloor, candidates_of
from serving.policy.latency import LiveState
from serving.policy.policy import (AUTO, CASCADE_THRESHOLD, Considered, Decision, Escalation, Finished, Hints,
                                   Outcome, Policy, PolicyConfig, PolicyStats, Rejection, ServedModel)

__all__ = ["AUTO", "CASCADE_THRESHOLD", "TIERS", "Candidate", "Considered", "Decision", "Escalation", "Finished",
           "Hints", "LiveState", "Outcome",
           "Policy", "PolicyConfig", "PolicyStats", "Quality", "QualityFloor", "Rejection", "ServedModel",
           "candidates_of"]
