"""PixelCNN step maths: the discretized logistic mixture's log-probabilities and bits/dim in float64,
inverse-CDF sampling with temperature, classifier-free guidance on the log-probabilities."""

import math

import torch

from core.samplers.autoregressive import (LEVELS, bits_per_dim, draw_uniforms, guided_levels, mixture_log_probs,
                                          sample_pixels)

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


def one_logistic(mean: float, log_scale: float, n: int = 1) -> torch.Tensor:
    """[n, 3] the parameters of one logistic (K = 1) of `mean` in [-1, 1] units."""
    return torch.tensor([[0.0, mean, log_scale]] * n, dtype=torch.float64)


def test_mixture_log_probs_are_the_logistic_cdf_differences_over_the_level_bins():
    """Level v is the bin v / 127.5 - 1 +- 1/255, levels 0 and 255 take the tails; a mixture weighs its
    components by softmax(logits). Checked against the CDF written out, where float64 computes it well."""
    sig = torch.sigmoid
    v = torch.arange(LEVELS, dtype=torch.float64)
    x = v / 127.5 - 1

    def cdf(mean, scale, edge):
        return sig((edge - mean) / scale)

    def one(mean, log_scale):
        s = math.exp(log_scale)
        p = cdf(mean, s, x + 1 / 255) - cdf(mean, s, x - 1 / 255)
        p[0], p[-1] = cdf(mean, s, x[0] + 1 / 255), 1 - cdf(mean, s, x[-1] - 1 / 255)
        return p

    for mean, log_scale in ((0.0, -3.0), (0.7, -1.0), (-1.2, 0.5), (0.3, 4.0)):
        got = mixture_log_probs(one_logistic(mean, log_scale))[0]
        torch.testing.assert_close(got.exp(), one(mean, log_scale), atol=1e-12, rtol=1e-9)
    mix = torch.tensor([[math.log(0.25), math.log(0.75), -0.5, 0.4, -3.0, -2.0]], dtype=torch.float64)  # K = 2
    torch.testing.assert_close(mixture_log_probs(mix)[0].exp(), 0.25 * one(-0.5, -3.0) + 0.75 * one(0.4, -2.0),
                               atol=1e-12, rtol=1e-9)


def test_mixture_log_probs_stay_exact_where_the_cdf_difference_cancels():
    """Far in a tail, a narrow logistic's bin probability is e^-1000 or less: the CDF difference rounds to 0
    (log -inf) in float64, and the log-probabilities must still be finite, exact (the logistic's tail is
    e^-(d/s) to leading order) and normalised, and give the training loss finite gradients."""
    params = one_logistic(-0.9, -7.0, 2).requires_grad_(True)   # the narrowest scale the head allows
    log_p = mixture_log_probs(params)                            # [2, 256]
    assert torch.isfinite(log_p).all() and log_p[0, 255] < -1000
    # level 200's bin starts d = 200 / 127.5 - 1 - 1/255 - (-0.9) from the mean: log P ~ -d/s + log(1 - e^(-w/s))
    d, s = 200 / 127.5 - 1 - 1 / 255 + 0.9, math.exp(-7.0)
    torch.testing.assert_close(log_p[0, 200].detach(), torch.tensor(-d / s + math.log(-math.expm1(-2 / 255 / s)),
                                                                  dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.logsumexp(log_p, 1).detach(), torch.zeros(2, dtype=torch.float64),
                               atol=1e-12, rtol=0)
    images = torch.tensor([[[0, 255]]]).expand(2, 1, 2)          # a 1x2 image of the end levels: the tails
    bits_per_dim(params[:, :, None, None].expand(2, 3, 1, 2), images).sum().backward()
    assert torch.isfinite(params.grad).all()


def test_bits_per_dim_sums_the_true_levels_log_probabilities():
    g = torch.Generator().manual_seed(0)
    params = torch.randn(3, 9, 28, 28, generator=g)               # K = 3
    images = torch.randint(0, LEVELS, (3, 28, 28), generator=g)
    log_p = mixture_log_probs(params)                             # [3, 256, 28, 28]
    want = -log_p.gather(1, images[:, None])[:, 0].flatten(1).sum(1) / (784 * math.log(2))
    torch.testing.assert_close(bits_per_dim(params, images), want, atol=1e-12, rtol=0)
    # the likelihood operation feeds the graph's float32 parameters and uint8 images
    torch.testing.assert_close(bits_per_dim(params, images.to(torch.uint8)), want, atol=1e-12, rtol=0)
