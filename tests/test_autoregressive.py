"""PixelCNN step maths: raster order, per-row logit gathering, inverse-CDF sampling with temperature."""


import torch

from core.samplers.autoregressive import (LEVELS, NUM_PIXELS, draw_uniforms, logits_at, raster_position,
                                             sample_pixels)

torch.set_num_threads(1)


def test_raster_order_visits_every_pixel_row_by_row():
    row, col = raster_position(torch.arange(NUM_PIXELS))
    assert row.tolist() == [p // 28 for p in range(NUM_PIXELS)]
    assert col.tolist() == [p % 28 for p in range(NUM_PIXELS)]
    row, col = raster_position(torch.tensor([0, 27, 28, 783]))
    assert (row.tolist(), col.tolist()) == ([0, 0, 1, 27], [0, 27, 0, 27])


def test_logits_at_reads_each_row_at_its_own_position():
    logits = torch.randn(3, LEVELS, 28, 28)
    step = torch.tensor([0, 29, 783])
    got = logits_at(logits, step)  # [3, 256]
    for b, (r, c) in enumerate([(0, 0), (1, 1), (27, 27)]):
        assert torch.equal(got[b], logits[b, :, r, c])


def test_sampling_picks_the_only_possible_level():
    logits = torch.full((3, LEVELS), -torch.inf)
    logits[0, 7], logits[1, 0], logits[2, 255] = 0.0, 0.0, 0.0
    for u in (0.0, 0.5, 0.999999):
        assert sample_pixels(logits, torch.ones(3), torch.full((3,), u)).tolist() == [7, 0, 255]


def test_inverse_cdf_follows_u_through_the_levels():
    logits = torch.zeros(4, LEVELS)  # uniform over 256 levels: level = floor(256 u)
    u = torch.tensor([0.0, 0.25, 0.5, 0.9999])
    assert sample_pixels(logits, torch.ones(4), u).tolist() == [0, 64, 128, 255]


def test_empirical_distribution_matches_softmax_with_temperature():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(LEVELS, generator=g)
    n = 20000
    for temperature in (0.5, 1.0, 2.0):
        levels = sample_pixels(base.expand(n, LEVELS), torch.full((n,), temperature),
                               torch.rand(n, generator=g, dtype=torch.float64))
        freq = torch.bincount(levels, minlength=LEVELS).double() / n
        want = torch.softmax(base.double() / temperature, -1)
        assert (freq - want).abs().max() < 0.02, temperature


def test_lower_temperature_concentrates_on_the_mode():
    logits = torch.linspace(0, 30, LEVELS).expand(2000, LEVELS)
    u = torch.rand(2000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cold = sample_pixels(logits, torch.full((2000,), 0.05), u)
    hot = sample_pixels(logits, torch.full((2000,), 5.0), u)
    assert (cold >= 250).float().mean() > 0.95 > (hot >= 250).float().mean()


def test_each_request_draws_from_its_own_generator():
    """A request's uniforms are the same whatever it is batched with."""
    alone = draw_uniforms([torch.Generator().manual_seed(5)], [3])
    mixed = draw_uniforms([torch.Generator().manual_seed(1), torch.Generator().manual_seed(5)], [2, 3])
    assert torch.equal(mixed[2:], alone) and mixed.dtype == torch.float64
