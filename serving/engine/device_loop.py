"""The diffusion step loop with x kept on one device between steps: the denoiser's inputs and output are
torch buffers bound to the ONNX Runtime session by address (IOBinding), and the sampler update is the
registry's own step function in torch on that device. Nothing crosses to the host inside the loop: every
per-step input (timestep, ᾱ) is laid out on the device before it starts.

The buffers keep one row count and one address for the whole run, which is what ONNX Runtime's CUDA
graphs need (a session created with the CUDA EP's enable_cuda_graph captures on its first runs and then
replays): one BoundDenoiser per batch bucket. On CPU the same code runs with device "cpu", so the tests
exercise it; benchmarks/gpu.py measures it on a GPU against HostDenoiser, the engine's way (host copies
every step).

This is a fixed-bucket loop (every row at the same step and setting), not the engine: EngineCore mixes
requests at different steps, and its DiffusionStepper keeps x on the CPU.
"""
from __future__ import annotations

import numpy as np
import torch

from core.contracts import NULL_CLASS, GraphContract
from core.samplers import (FINAL_TIMESTEP, SAMPLERS, StepRows, alphas_at, classifier_free_guidance,
                           inference_timesteps, linear_alphas_cumprod)


def ort_device(device: torch.device) -> tuple[str, int]:
    """torch device -> ONNX Runtime's (device_type, device_id) for IOBinding."""
    return ("cuda", device.index or 0) if device.type == "cuda" else ("cpu", 0)


class BoundDenoiser:
    """diffusion.denoise over fixed device buffers x [R,1,28,28], t [R], y [R] -> eps [R,1,28,28]: write the
    inputs in place, call, read eps (overwritten by the next call)."""

    def __init__(self, session, contract: GraphContract, rows: int, device: torch.device | str, *,
                 own_stream: bool = False):
        self.session, self.rows, self.device = session, rows, torch.device(device)
        # ORT on a CUDA stream of its own (no user_compute_stream): torch's writes to the inputs must be done
        # before it reads them; it synchronises its own stream at the end of every run.
        self.own_stream = own_stream and self.device.type == "cuda"
        x_spec, t_spec, y_spec = contract.inputs  # x, t, y: the contract's order
        self.x = torch.zeros(x_spec.concrete_shape(rows), dtype=torch.float32, device=self.device)
        self.t = torch.zeros(rows, dtype=torch.int64, device=self.device)
        self.y = torch.zeros(rows, dtype=torch.int64, device=self.device)
        self.eps = torch.empty_like(self.x)
        kind, index = ort_device(self.device)
        self.io = session.io_binding()
        for spec, buf in zip((x_spec, t_spec, y_spec), (self.x, self.t, self.y)):
            self.io.bind_input(spec.name, kind, index, np.dtype(spec.dtype), list(buf.shape), buf.data_ptr())
        self.io.bind_output(contract.outputs[0].name, kind, index, np.float32, list(self.eps.shape),
                            self.eps.data_ptr())

    def __call__(self) -> torch.Tensor:
        if self.own_stream:
            torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(self.io)
        return self.eps


class HostDenoiser(BoundDenoiser):
    """The same buffers, run the engine's way: inputs copied to the host, session.run, eps copied back."""

    def __init__(self, session, contract: GraphContract, rows: int, device: torch.device | str):
        super().__init__(session, contract, rows, device)
        self.names = [spec.name for spec in contract.inputs]
        self.output = contract.outputs[0].name

    def __call__(self) -> torch.Tensor:
        feeds = {name: buf.cpu().numpy() for name, buf in zip(self.names, (self.x, self.t, self.y))}
        self.eps.copy_(torch.from_numpy(self.session.run([self.output], feeds)[0]))
        return self.eps


@torch.no_grad()
def sample_on_device(denoiser: BoundDenoiser, x_T: torch.Tensor, class_ids: torch.Tensor, *, sampler: str,
                     steps: int, guidance_scale: float, clip_x0: bool = True) -> torch.Tensor:
    """x_T [B,1,28,28] and class_ids [B] on the denoiser's device -> x_0 [B,1,28,28] there. Guided, the
    denoiser has 2B rows: conditional then unconditional, in one forward. The maths is the engine's
    (serving.engine.diffusion): the same registry step, per-image ᾱ in float64, eta 0, x_0 clipped."""
    spec, device = SAMPLERS[sampler], denoiser.device
    b = x_T.shape[0]
    guided = guidance_scale != 1.0
    if denoiser.rows != (2 * b if guided else b):
        raise ValueError(f"a {denoiser.rows}-row denoiser cannot step {b} images (guided: {guided})")

    # Every per-step input, on the device before the loop starts.
    timesteps = inference_timesteps(steps)
    t_now = torch.tensor(timesteps, dtype=torch.int64, device=device)                            # [S]
    t_next = torch.tensor(timesteps[1:] + [FINAL_TIMESTEP], dtype=torch.int64, device=device)    # [S]
    alphas = linear_alphas_cumprod().to(device)
    alpha_t, alpha_prev = alphas_at(alphas, t_now), alphas_at(alphas, t_next)                    # [S] float64
    last = torch.arange(steps, device=device) == steps - 1                                       # [S] bool
    eta = torch.zeros(b, dtype=torch.float64, device=device)
    y = class_ids.to(device=device, dtype=torch.int64)
    denoiser.y.copy_(torch.cat([y, torch.full_like(y, NULL_CLASS)]) if guided else y)

    x = x_T.to(device=device, dtype=torch.float32)
    state = spec.state.initial(x)
    for i in range(steps):
        denoiser.x[:b].copy_(x)
        if guided:
            denoiser.x[b:].copy_(x)
        denoiser.t.copy_(t_now[i].expand(denoiser.rows))
        eps = denoiser()
        if guided:
            eps = classifier_free_guidance(eps[:b], eps[b:], guidance_scale)
        rows = StepRows(alpha_t[i].expand(b), alpha_prev[i].expand(b), last[i].expand(b), eta, None)
        x, state = spec.step(x, eps, rows, state, clip_x0)
    return x
