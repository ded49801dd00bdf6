"""genserve's Prometheus metrics: every metric defined in metrics.py (names, types, units, buckets,
labels, and the recording helpers), exported through Ray's metrics agent; http.py times HTTP requests,
engine.py exports the step-batched engine."""
from serving.observability.metrics import (METRICS, METRICS_PORT, MetricSpec, note_error_code, note_model,
                                           observe_model_call, observe_request, record_batch, record_decision,
                                           record_model_load, record_rejection, record_request_times, record_retry,
                                           record_slo, record_verification_failure, report_model_ready)

__all__ = ["METRICS", "METRICS_PORT", "MetricSpec", "note_error_code", "note_model", "observe_model_call",
           "observe_request", "record_batch", "record_decision", "record_model_load", "record_rejection",
           "record_request_times", "record_retry", "record_slo", "record_verification_failure",
           "report_model_ready"]
