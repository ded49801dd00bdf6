"""PixelCNN step maths: inverse-CDF sampling with temperature, classifier-free guidance on the logits."""


import torch

from core.samplers.autoregressive import LEVELS, draw_uniforms, guided_levels, sample_pixels

torch.set_num_threads(1)


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


def test_guidance_one_or_equal_rows_is_the_plain_conditional_sample():
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(50, LEVELS, generator=g), torch.randn(50, LEVELS, generator=g)
    u, t = torch.rand(50, generator=g, dtype=torch.float64), torch.full((50,), 0.9)
    plain = sample_pixels(cond, t, u)
    assert torch.equal(guided_levels(cond, uncond, torch.ones(50), t, u), plain)
    assert torch.equal(guided_levels(cond, cond, torch.full((50,), 3.0), t, u), plain)


def test_guidance_extrapolates_away_from_the_unconditional_logits():
    """l_u + s (l_c - l_u), per row: s = 0 samples the unconditional distribution, s = 3 a sharper
    conditional one where the two disagree."""
    cond = torch.zeros(2, LEVELS)
    cond[:, 200] = 2.0                       # the class favours level 200 a little
    uncond = torch.zeros(2, LEVELS)
    u = torch.full((2,), 0.5, dtype=torch.float64)
    levels = guided_levels(cond, uncond, torch.tensor([0.0, 10.0]), torch.ones(2), u)
    assert levels.tolist() == [128, 200]     # uniform: the median level; guided 10x: certain of 200
