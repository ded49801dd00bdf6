"""Streamed previews from the step engine: where they fall, what they show (diffusion's x̂₀ at that step,
PixelCNN's pixels so far), that asking for them changes nothing in the final images, and that a stream
closed early frees its rows. Fake runners, no sleeps."""
from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest
import torch

from serving.engine import AsyncEngine, Status
from serving.engine.diffusion import to_uint8
from serving.engine.request import make_state
from serving.engine.state import preview_steps
from tests.test_engine import ALPHAS, FakeRunner, close, diffusion, engine, pixelcnn, run, toy_denoiser


@pytest.mark.parametrize("steps, previews, at", [
    (20, 3, (5, 10, 15)), (10, 3, (2, 5, 8)), (10, 1, (5,)), (4, 3, (1, 2, 3)), (2, 3, (1,)), (1, 3, ()),
    (784, 3, (196, 392, 588)), (20, 0, ()),
])
def test_previews_fall_evenly_and_never_on_the_final_step(steps, previews, at):
    assert preview_steps(steps, previews) == at


def test_previews_are_validated():
    with pytest.raises(ValueError, match=r"^previews must be an integer in \[0, 3\], got 4$"):
        diffusion(previews=4)


def outputs_of(core, request, arrivals_before: int = 0) -> list:
    """Every output the engine gives `request` (id "a"), in order, stepping until idle."""
    core.add_request(request, "a")
    outputs = []
    while core.has_work():
        outputs += [o for o in core.step() if o.request_id == "a"]
    return outputs


def test_a_diffusion_preview_is_that_steps_prediction_of_the_clean_image():
    """3 previews over 8 steps: after steps 2, 4 and 6, each the clamped x̂₀ = (x_t - √(1-ᾱ) ε) / √ᾱ of
    that step, and the final images exactly those of the same request without previews."""
    request = diffusion(steps=8, previews=3, n=2, seed=7)
    outputs = outputs_of(engine(), request)
    assert [(o.status, o.preview_index, o.step) for o in outputs] == [
        (Status.RUNNING, 0, 2), (Status.RUNNING, 1, 4), (Status.RUNNING, 2, 6), (Status.FINISHED, None, 8)]
    assert torch.equal(outputs[-1].images, run(engine(), {0: [("a", diffusion(steps=8, n=2, seed=7))]})["a"].images)

    # the first preview by hand: replay steps 1-2 of the same request and take step 2's x̂₀
    state = make_state("b", diffusion(steps=8, n=2, seed=7), 0.0)
    core = engine()
    core.add_request(diffusion(steps=8, n=2, seed=7), "b")
    core.step()  # step 1
    x_t = core.scheduler.requests["b"].x.clone()
    t = state.timesteps[1]
    eps = toy_denoiser(x_t, torch.full((2,), t), torch.full((2,), 3))
    a = ALPHAS[t].double()
    x0 = ((x_t - (1 - a).sqrt() * eps) / a.sqrt()).float()
    assert close(outputs[0].images, to_uint8(x0))


def test_diffusion_previews_approach_the_final_image():
    outputs = outputs_of(engine(), diffusion(steps=12, previews=3, seed=1))
    final = outputs[-1].images.float()
    errors = [(o.images.float() - final).abs().mean().item() for o in outputs[:-1]]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0]


def test_a_pixelcnn_preview_is_the_pixels_sampled_so_far():
    outputs = outputs_of(engine(family="pixelcnn"), pixelcnn(previews=3, n=2))
    assert [o.step for o in outputs] == [196, 392, 588, 784]
    final = outputs[-1].images.flatten(1)
    for o in outputs[:-1]:
        pixels = o.images.flatten(1)
        assert torch.equal(pixels[:, :o.step], final[:, :o.step]) and not pixels[:, o.step:].any()


def test_other_requests_in_the_batch_are_untouched_by_a_neighbours_previews():
    core = engine()
    outputs = run(core, {0: [("plain", diffusion(steps=6, seed=2)), ("streamed", diffusion(steps=6, seed=3, previews=2))],
                         2: [("late", diffusion(steps=3, seed=4, previews=1))]})
    for name, request in (("plain", diffusion(steps=6, seed=2)), ("late", diffusion(steps=3, seed=4))):
        assert torch.equal(outputs[name].images, run(engine(), {0: [("a", request)]})["a"].images)
    assert core.metrics.previews == 3 and core.metrics.finished == 3


def test_closing_a_stream_after_its_first_preview_frees_its_rows_at_the_next_step():
    async def main():
        eng = AsyncEngine(engine(max_rows=8))
        loop_task = asyncio.create_task(eng.run())
        async with aclosing(eng.stream(diffusion(steps=50, previews=3, n=4), "gone")) as stream:
            first = await anext(stream)
        assert first.status is Status.RUNNING and first.preview_index == 0
        kept = await eng.submit(diffusion(steps=4, n=8))  # needs the whole row budget: only if "gone" left
        assert kept.shape == (8, 1, 28, 28)
        m = eng.core.metrics
        assert (m.cancelled, m.finished, m.previews) == (1, 1, 1) and m.steps < 50
        eng.stop()
        await loop_task

    asyncio.run(asyncio.wait_for(main(), 60))
