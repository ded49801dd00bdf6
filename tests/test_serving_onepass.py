"""The one-pass path without Ray: the image-count batcher (fake forwards gated by asyncio.Event, no sleeps),
per-request noise, uint8 conversion, the serving runtime over a real store version, and the config checks."""
from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from core.contracts import contracts_for
from serving.config import AppArgs, IterativeConfig, ModelEntry, OnePassConfig
from serving.onepass.batcher import BatchShapeError, ImageBatcher
from serving.onepass.inputs import draw_inputs, to_images
from serving.runtime import threads_for


class GatedForward:
    """A fake forward: each call announces its batch on `entered`, then waits for its own gate; returns
    z * 2 (or `fail` raised / `rows` rows when set) so the tests can see which rows came back where."""

    def __init__(self):
        self.entered: asyncio.Queue[tuple[dict[str, np.ndarray], asyncio.Event]] = asyncio.Queue()
        self.fail: Exception | None = None
        self.rows: int | None = None

    async def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        gate = asyncio.Event()
        await self.entered.put((feeds, gate))
        await gate.wait()
        if self.fail is not None:
            raise self.fail
        out = feeds["z"] * 2
        return out[: self.rows] if self.rows is not None else out

    async def next_batch(self, release: bool = True) -> dict[str, np.ndarray]:
        feeds, gate = await self.entered.get()
        if release:
            gate.set()
        return feeds


def job(first: float, n: int) -> dict[str, np.ndarray]:
    """n rows whose z values are first, first+1, ...: each request's rows are recognisable."""
    z = (first + np.arange(n, dtype=np.float32))[:, None]  # [n, 1]
    return {"z": z, "y": np.full(n, int(first), dtype=np.int64)}


async def settle(ticks: int = 20) -> None:
    """Let every ready task run (no wall-clock wait)."""
    for _ in range(ticks):
        await asyncio.sleep(0)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_small_requests_share_one_batch_and_get_their_own_rows():
    async def main():
        fwd = GatedForward()
        b = ImageBatcher(fwd, OnePassConfig(max_batch_images=8, max_wait_ms=0))
        first = asyncio.create_task(b.submit(job(100, 1)))
        feeds0, gate0 = await fwd.entered.get()           # batch 1 is in flight, holding the loop
        later = [asyncio.create_task(b.submit(job(200, 2))), asyncio.create_task(b.submit(job(300, 3)))]
        await settle()
        gate0.set()
        feeds1 = await fwd.next_batch()
        results = await asyncio.gather(first, *later)
        assert len(feeds0["z"]) == 1 and len(feeds1["z"]) == 5  # the two queued requests shared one forward
        np.testing.assert_array_equal(feeds1["y"], [200, 200, 300, 300, 300])
        for r, (start, n) in zip(results, [(100, 1), (200, 2), (300, 3)]):
            np.testing.assert_array_equal(r[:, 0], 2 * (start + np.arange(n)))
        assert list(b.stats.recent_batch_sizes) == [1, 5]
        await b.close()
    run(main())


def test_a_request_larger_than_the_batch_spans_several_in_order():
    async def main():
        fwd = GatedForward()
        b = ImageBatcher(fwd, OnePassConfig(max_batch_images=4, max_wait_ms=0))
        big = asyncio.create_task(b.submit(job(0, 10)))
        sizes = [len((await fwd.next_batch())["z"]) for _ in range(3)]
        np.testing.assert_array_equal((await big)[:, 0], 2 * np.arange(10))
        assert sizes == [4, 4, 2]
        await b.close()
    run(main())


def test_requests_are_split_and_merged_at_batch_boundaries():
    async def main():
        fwd = GatedForward()
        b = ImageBatcher(fwd, OnePassConfig(max_batch_images=4, max_wait_ms=0))
        blocker = asyncio.create_task(b.submit(job(0, 1)))
        _, gate = await fwd.entered.get()
        a, c = asyncio.create_task(b.submit(job(10, 3))), asyncio.create_task(b.submit(job(20, 3)))
        await settle()
        gate.set()
        second, third = await fwd.next_batch(), await fwd.next_batch()
        np.testing.assert_array_equal(second["z"][:, 0], [10, 11, 12, 20])  # all of a, the first of c
        np.testing.assert_array_equal(third["z"][:, 0], [21, 22])           # the rest of c leads the next
        np.testing.assert_array_equal((await c)[:, 0], [40, 42, 44])
        await asyncio.gather(blocker, a)
        await b.close()
    run(main())


def test_a_full_batch_runs_at_once_and_a_partial_one_waits_for_max_wait():
    async def main():
        fwd = GatedForward()
        b = ImageBatcher(fwd, OnePassConfig(max_batch_images=4, max_wait_ms=3_600_000))
        tasks = [asyncio.create_task(b.submit(job(0, 3)))]
        await settle()
        assert fwd.entered.empty()                     # 3 < 4 images, and the hour-long wait has not passed
        tasks.append(asyncio.create_task(b.submit(job(5, 1))))
        assert len((await fwd.next_batch())["z"]) == 4  # full: no waiting
        await asyncio.gather(*tasks)
        b.reconfigure(OnePassConfig(max_batch_images=4, max_wait_ms=0))
        assert len((await asyncio.gather(b.submit(job(9, 1)), fwd.next_batch()))[0]) == 1  # no wait at 0 ms
        await b.close()
    run(main())


def test_an_exception_reaches_every_waiter_in_the_batch_and_the_loop_goes_on():
    async def main():
        fwd = GatedForward()
        b = ImageBatcher(fwd, OnePassConfig(max_batch_images=8, max_wait_ms=0))
        blocker = asyncio.create_task(b.submit(job(0, 1)))
        _, gate = await fwd.entered.get()
        doomed = [asyncio.create_task(b.submit(job(10, 2))), asyncio.create_task(b.submit(job(20, 1)))]
        await settle()
        fwd.fail = RuntimeError("boom")
        gate.set()
        await fwd.next_batch()
        outcomes = await asyncio.gather(blocker, *doomed, return_exceptions=True)
        assert all(isinstance(o, RuntimeError) and str(o) == "boom" for o in outcomes)
        fwd.fail = None
        ok = asyncio.create_task(b.submit(job(30, 2)))
        await fwd.next_batch()
        np.testing.assert_array_equal((await ok)[:, 0], [60, 62])
        assert b.stats.failed_batches == 2 and b.stats.batches == 3
        await b.close()
    run(main())


def test_a_forward_returning_the_wrong_row_count_fails_its_batch():
    async def main():
        fwd = GatedForward()
        fwd.rows = 1
        b = ImageBatcher(fwd, OnePassConfig(max_batch_images=8, max_wait_ms=0))
        task = asyncio.create_task(b.submit(job(0, 3)))
        await fwd.next_batch()
        with pytest.raises(BatchShapeError, match="the forward returned 1 rows for a batch of 3 images"):
            await task
        await b.close()
    run(main())


def test_a_failed_large_request_leaves_no_rows_behind():
    async def main():
        fwd = GatedForward()
        b = ImageBatcher(fwd, OnePassConfig(max_batch_images=2, max_wait_ms=0))
        fwd.fail = ValueError("bad batch")
        big = asyncio.create_task(b.submit(job(0, 6)))
        await fwd.next_batch()
        with pytest.raises(ValueError, match="bad batch"):
            await big
        fwd.fail = None
        after = asyncio.create_task(b.submit(job(50, 1)))
        assert (await fwd.next_batch())["z"][:, 0].tolist() == [50]  # big's other 4 rows were dropped
        await after
        await b.close()
    run(main())


def test_a_cancelled_waiter_leaves_the_queue():
    async def main():
        fwd = GatedForward()
        b = ImageBatcher(fwd, OnePassConfig(max_batch_images=8, max_wait_ms=0))
        blocker = asyncio.create_task(b.submit(job(0, 1)))
        _, gate = await fwd.entered.get()
        gone, kept = asyncio.create_task(b.submit(job(10, 3))), asyncio.create_task(b.submit(job(20, 1)))
        await settle()
        gone.cancel()
        await settle()
        gate.set()
        assert (await fwd.next_batch())["z"][:, 0].tolist() == [20]
        await asyncio.gather(blocker, kept)
        assert gone.cancelled()
        await b.close()
    run(main())


def test_reconfigure_applies_to_the_next_batch():
    async def main():
        fwd = GatedForward()
        b = ImageBatcher(fwd, OnePassConfig(max_batch_images=8, max_wait_ms=0))
        blocker = asyncio.create_task(b.submit(job(0, 1)))
        _, gate = await fwd.entered.get()
        big = asyncio.create_task(b.submit(job(10, 5)))
        await settle()
        b.reconfigure(OnePassConfig(max_batch_images=2, max_wait_ms=0))
        gate.set()
        sizes = [len((await fwd.next_batch())["z"]) for _ in range(3)]
        await asyncio.gather(blocker, big)
        assert sizes == [2, 2, 1]
        await b.close()
    run(main())


def test_submit_and_config_check_their_arguments():
    async def main():
        b = ImageBatcher(GatedForward())
        with pytest.raises(ValueError, match=r"inputs must share one leading size n >= 1, got \{'z': 2, 'y': 3\}"):
            await b.submit({"z": np.zeros((2, 1)), "y": np.zeros(3)})
        with pytest.raises(ValueError, match="inputs must share one leading size n >= 1"):
            await b.submit({"z": np.zeros((0, 1))})
    run(main())
    with pytest.raises(ValueError, match="max_batch_images must be an integer >= 1, got 0"):
        OnePassConfig(max_batch_images=0)
    with pytest.raises(ValueError, match="max_batch_images must be an integer >= 1, got True"):
        OnePassConfig(max_batch_images=True)
    with pytest.raises(ValueError, match="max_wait_ms must be a finite number >= 0, got -1"):
        OnePassConfig(max_wait_ms=-1)
    with pytest.raises(ValueError, match=r"one-pass user_config: unknown keys \['max_batch'\]"):
        OnePassConfig.from_dict({"max_batch": 4})
    with pytest.raises(ValueError, match="max_batch_rows must be an integer >= 1, got 0"):
        IterativeConfig(max_batch_rows=0)


def test_app_args():
    args = AppArgs.from_dict({"models": ["gan@stable", {"name": "v", "ref": "vae@r1"}], "store": "/s"})
    assert args.models == (ModelEntry("gan", "gan@stable"), ModelEntry("v", "vae@r1")) and args.batching == "step"
    with pytest.raises(ValueError, match=r"args.batching must be 'step' or 'request', got 'both'"):
        AppArgs.from_dict({"models": ["gan"], "batching": "both"})
    with pytest.raises(ValueError, match=r"names must be unique, got \['gan'\]"):
        AppArgs.from_dict({"models": ["gan", "gan@stable"]})
    with pytest.raises(ValueError, match=r"args: unknown keys \['modles'\]"):
        AppArgs.from_dict({"modles": ["gan"]})


def test_per_request_noise_depends_on_the_seed_only():
    contract = contracts_for("gan", {"z_dim": 8})[0]
    a = draw_inputs(contract, 3, 4, seed=7)
    assert a["z"].shape == (4, 8) and a["z"].dtype == np.float32 and a["y"].tolist() == [3] * 4
    np.testing.assert_array_equal(a["z"], draw_inputs(contract, 3, 4, seed=7)["z"])
    assert not np.array_equal(a["z"], draw_inputs(contract, 3, 4, seed=8)["z"])
    flow = contracts_for("flow", {})[0]
    np.testing.assert_allclose(draw_inputs(flow, 0, 2, 1, temperature=0.5)["z"], 0.5 * draw_inputs(flow, 0, 2, 1)["z"])


@pytest.mark.parametrize("family", ["gan", "vae", "flow"])
def test_per_image_seeds_and_classes_give_each_row_as_its_one_image_request(family):
    """n seeds and classes (a KServe v2 request): row i of every input is what seed i and class i give alone."""
    contract = contracts_for(family, {})[0]
    classes, seeds = [3, 10, 3], [7, 8, 7]
    rows = draw_inputs(contract, classes, 3, seeds, temperature=0.7)
    alone = [draw_inputs(contract, c, 1, s, temperature=0.7) for c, s in zip(classes, seeds)]
    assert rows.keys() == alone[0].keys()
    for name in rows:
        np.testing.assert_array_equal(rows[name], np.concatenate([a[name] for a in alone]))
    assert rows["y"].dtype == np.int64 and rows["y"].tolist() == classes
    np.testing.assert_array_equal(draw_inputs(contract, 3, 3, seeds)["z"] * np.float32(0.7), rows["z"])
    with pytest.raises(ValueError, match="n = 3 images takes one seed and class id, or n of them"):
        draw_inputs(contract, 3, 3, [1, 2])


def test_outputs_become_uint8_images_like_families_common():
    gan, vae = contracts_for("gan", {})[0], contracts_for("vae", {})[0]
    x = np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0], np.float32).reshape(6, 1, 1, 1) * np.ones((1, 1, 28, 28), np.float32)
    assert to_images(gan, x)[:, 0, 0].tolist() == [0, 0, 128, 191, 255, 255]  # (x+1)*127.5: 127.5 rounds to even
    assert to_images(vae, x)[:, 0, 0].tolist() == [0, 0, 0, 128, 255, 255]
    assert to_images(vae, x).shape == (6, 28, 28) and to_images(vae, x).dtype == np.uint8


def test_threads_follow_the_replica_cpus():
    assert [threads_for(c).reserved for c in (None, 0, 0.5, 1, 2, 3.9)] == [1, 1, 1, 1, 2, 3]


def test_up_command_reads_the_one_serve_config():
    import argparse

    import yaml

    from genserve.launch import on_one_node
    from genserve.up import local_cpus, register, run_up
    from serving.config import DEFAULT_CONFIG

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["up", "--port", "8100", "--no-build"])
    assert (args.func, args.port, args.config, args.no_build) == (run_up, 8100, DEFAULT_CONFIG, True)
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    app = config["applications"][0]
    assert app["import_path"] == "serving.app:build_app"
    models = AppArgs.from_dict(app["args"]).models
    assert [d["name"] for d in app["deployments"]] == ["Ingress", *(m.name for m in models)]
    for d in app["deployments"][1:]:
        config_cls = IterativeConfig if d["name"] in ("diffusion", "pixelcnn") else OnePassConfig
        config_cls.from_dict(d["user_config"])  # every user_config is valid
    # a CPU per model replica; the ingress a tenth, which keeps it off a KubeRay head started with num-cpus 0;
    # Ray is told a whole number of CPUs (it refuses 5.1)
    assert local_cpus(on_one_node(config)) == max(len(models) + 1, os.cpu_count())
