"""The one-pass path (gan, vae, flow): dynamic batching across requests by image count (batcher.py),
per-request noise and uint8 images (inputs.py), and the Ray Serve deployment (deployment.py)."""

from serving.onepass.batcher import BatcherStats, BatchShapeError, ImageBatcher

__all__ = ["BatchShapeError", "BatcherStats", "ImageBatcher"]
