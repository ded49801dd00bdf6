"""The step-batched engine for iterative families (diffusion, PixelCNN): requests join and leave the
batch at every step; one forward per step; each request advances by its own sampler and generator."""

from serving.engine.async_engine import AsyncEngine, EngineStopped
from serving.engine.diffusion import DiffusionStepper
from serving.engine.engine import DEFAULT_MAX_ROWS, EngineCore, Stepper
from serving.engine.metrics import EngineMetrics
from serving.engine.pixelcnn import PixelCNNStepper
from serving.engine.request import (DeadlineExceeded, DiffusionRequest, PixelCNNRequest, Request, RequestAborted,
                                    RequestCancelled, RequestFailed, RequestOutput, Status)
from serving.engine.runner import DenoiseRunner, LogitsRunner, OnnxRunner, TorchRunner
from serving.engine.scheduler import Scheduler, StepPlan

__all__ = ["DEFAULT_MAX_ROWS", "AsyncEngine", "DeadlineExceeded", "DenoiseRunner", "DiffusionRequest",
           "DiffusionStepper", "EngineCore", "EngineMetrics", "EngineStopped", "LogitsRunner", "OnnxRunner",
           "PixelCNNRequest", "PixelCNNStepper", "Request", "RequestAborted", "RequestCancelled", "RequestFailed",
           "RequestOutput", "Scheduler", "Status", "StepPlan", "Stepper", "TorchRunner"]
