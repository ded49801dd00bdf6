"""The step-batched engine for iterative families (diffusion, PixelCNN): requests join and leave the
batch at every step; one forward per step; each request advances by its own sampler and generator."""

from importlib import import_module

# Imported on first use (PEP 562), so that `import serving.engine.scheduler` (torch-free: the policy at the
# ingress admits with it) does not pull in torch through this package. name -> the module that defines it.
_EXPORTS = {
    "AsyncEngine": "serving.engine.async_engine",
    "DiffusionStepper": "serving.engine.diffusion",
    "DEFAULT_MAX_ROWS": "serving.engine.engine", "EngineCore": "serving.engine.engine",
    "Stepper": "serving.engine.engine",
    "EngineMetrics": "serving.engine.metrics",
    "PixelCNNStepper": "serving.engine.pixelcnn",
    **dict.fromkeys(["DiffusionRequest", "PixelCNNRequest", "Request", "RequestOutput"], "serving.engine.request"),
    **dict.fromkeys(["DeadlineExceeded", "EngineOverloaded", "EngineStopped", "RequestAborted", "RequestCancelled",
                     "RequestFailed"],
                    "serving.errors"),
    **dict.fromkeys(["DenoiseRunner", "StepRunner", "OnnxRunner", "TorchRunner"], "serving.engine.runner"),
    "Scheduler": "serving.engine.scheduler", "StepPlan": "serving.engine.scheduler",
    "Status": "serving.engine.state",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
