"""Model shapes, conditioning and the exactness properties of the likelihood families."""
import math

import pytest
import torch

from core.samplers.autoregressive import mixture_log_probs
from families import diffusion, flow, gan, pixelcnn, vae
from families.common import NULL_CLASS
from families.registry import FAMILIES, get_family

torch.set_num_threads(1)

# Tiny configs: the same code paths as the shipped models, at a fraction of the cost.
TINY = {
    "vae": vae.Config(latent_dim=4, width=8, class_dim=4),
    "gan": gan.Config(z_dim=8, g_width=16, d_width=8),
    "flow": flow.Config(hidden=8, couplings_per_stage=1, class_dim=2),
    # 16 wide: a mixture head starts near 5 bits/dim (a softmax near 8), and at 8 wide test_train's 30 steps
    # lowered it by only 7-14% (seed 0 / 1), against the 10% asked
    "pixelcnn": pixelcnn.Config(hidden=16, dilations=(1, 2)),
    "diffusion": diffusion.Config(channels=(8, 16, 16), emb_dim=16),
}


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.tensor([0, 3, 9, NULL_CLASS, 5, 1][:n])
    return x, y


@pytest.mark.parametrize("family", FAMILIES)
def test_samples_are_uint8_images_for_every_class_id(family):
    spec = get_family(family)
    torch.manual_seed(0)
    model = spec.build(TINY[family]).eval()
    settings = {"steps": 2} if family == "diffusion" else {}
    _, y = _batch(3) if family == "pixelcnn" else _batch()
    out = spec.sample(model, y, torch.Generator().manual_seed(1), **settings)
    assert out.shape == (y.shape[0], 1, 28, 28) and out.dtype == torch.uint8


@pytest.mark.parametrize("family", FAMILIES)
def test_class_conditioning_changes_the_output(family):
    """The same noise with another class id gives another image: the class reaches the network."""
    spec = get_family(family)
    torch.manual_seed(0)
    model = spec.build(TINY[family]).eval()
    # Zero-initialised output layers make a fresh net ignore its inputs; perturb every weight.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, _ = _batch(2)
    a, b = torch.tensor([1, 1]), torch.tensor([7, NULL_CLASS])
    with torch.no_grad():
        if family == "diffusion":
            t = torch.tensor([500, 500])
            xf = torch.randn(2, 1, 28, 28)
            outs = model(xf, t, a), model(xf, t, b)
        elif family == "pixelcnn":
            outs = model(x, a), model(x, b)
        elif family == "gan":
            z = torch.randn(2, model.z_dim)
            outs = model(z, a), model(z, b)
        elif family == "vae":
            z = torch.randn(2, model.latent_dim)
            outs = model.decoder(z, a), model.decoder(z, b)
        else:
            zs = [torch.randn(2, *s) for s in model.latent_shapes()]
            outs = model.sample_from_latents(zs, a), model.sample_from_latents(zs, b)
    for i in range(2):
        assert not torch.allclose(outs[0][i], outs[1][i]), f"class id {b[i]} had no effect"


def test_diffusion_predicts_noise_shaped_output():
    model = diffusion.build(TINY["diffusion"])
    out = model(torch.randn(5, 1, 28, 28), torch.tensor([0, 1, 500, 998, 999]), torch.tensor([0, 1, 2, 3, NULL_CLASS]))
    assert out.shape == (5, 1, 28, 28)


def test_vae_encoder_and_decoder_work_alone():
    model = vae.build(TINY["vae"])
    mu, logvar = model.encoder(torch.rand(3, 1, 28, 28), torch.tensor([0, 4, NULL_CLASS]))
    assert mu.shape == logvar.shape == (3, 4)
    x = model.decoder(mu, torch.tensor([0, 4, NULL_CLASS]))
    assert x.shape == (3, 1, 28, 28) and 0 <= x.min() and x.max() <= 1
    bpd = model.elbo_bits_per_dim(*_batch(3))
    assert bpd.shape == (3,) and torch.isfinite(bpd).all()


def test_flow_log_det_matches_autograd_jacobian():
    """log|det J| of the whole flow (couplings, squeezes, splits) equals slogdet of the Jacobian."""
    torch.manual_seed(0)
    model = flow.build(flow.Config(image_size=8, hidden=8, couplings_per_stage=2, class_dim=2)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))  # move off the identity initialisation
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([3])

    def flat_forward(v):
        zs, _ = model(v.reshape(1, 1, 8, 8), y)
        return torch.cat([z.flatten() for z in zs])

    jac = torch.autograd.functional.jacobian(flat_forward, x.flatten())   # (64, 64)
    _, logdet = model(x, y)
    assert torch.allclose(logdet, torch.linalg.slogdet(jac).logabsdet, atol=1e-8)


def test_flow_inverse_inverts_and_likelihood_is_finite():
    torch.manual_seed(0)
    model = flow.build(TINY["flow"]).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x, y = torch.randn(4, 1, 28, 28, dtype=torch.float64), torch.tensor([0, 1, 2, NULL_CLASS])
    zs, _ = model(x, y)
    assert torch.allclose(model.inverse(zs, y), x, atol=1e-8)
    bpd = model.bits_per_dim(torch.rand(4, 1, 28, 28, dtype=torch.float64), y)
    assert torch.isfinite(bpd).all()


def test_pixelcnn_is_causal():
    """The logits at pixel (i, j) depend on no pixel at or after (i, j) in raster order, and on
    every earlier pixel in its receptive field."""
    torch.manual_seed(0)
    model = pixelcnn.build(pixelcnn.Config(hidden=8, dilations=(1, 2, 1))).double()
    x = torch.randint(0, 256, (1, 1, 28, 28)).double().requires_grad_(True)
    y = torch.tensor([2])
    i, j = 14, 9
    model(x, y)[0, :, i, j].sum().backward()
    grad = x.grad[0, 0].abs()
    raster = torch.arange(28 * 28).reshape(28, 28)
    position = raster[i, j]
    assert grad[raster >= position].sum() == 0, "logits see the current pixel or a later one"
    assert grad[i, j - 1] > 0 and grad[i - 1, j] > 0 and grad[i - 1, j + 1] > 0  # left, above, above-right


def test_pixelcnn_bits_per_dim_is_exact_normalised_likelihood():
    """The network's mixtures give every pixel a distribution over the 256 levels that sums to 1, and
    bits/dim (computed at the true levels only) is the mean over pixels of -log2 of it at the true level;
    its gradient, the training loss's, is finite everywhere."""
    torch.manual_seed(0)
    model = pixelcnn.build(pixelcnn.Config(hidden=8, dilations=(1, 2), mixtures=3))
    with torch.no_grad():  # spread the mixtures: sharp and broad components, means outside [-1, 1]
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, y = _batch(2)
    x[0, 0, 0] = 0  # the end levels, which take the tails
    x[1, 0, 0] = 255
    with torch.no_grad():
        log_p = mixture_log_probs(model(x, y))                                         # (2, 256, 28, 28)
    torch.testing.assert_close(log_p.exp().sum(1), torch.ones(2, 28, 28, dtype=torch.float64), atol=1e-12, rtol=0)
    manual = -log_p.gather(1, x.long()).flatten(1).mean(1) / math.log(2)
    bpd = model.bits_per_dim(x, y)
    assert bpd.dtype == torch.float64
    torch.testing.assert_close(bpd.detach(), manual, atol=1e-9, rtol=0)
    bpd.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_pixelcnn_step_is_the_full_forward_at_pixel_p_even_on_the_rows_so_far():
    torch.manual_seed(0)
    model = pixelcnn.build(TINY["pixelcnn"]).eval()
    x, y = _batch(3)
    p = torch.tensor([0, 300, 783])
    with torch.no_grad():
        full = model(x, y).flatten(2)[torch.arange(3), :, p]                      # [3, 3K]
        torch.testing.assert_close(model.step(x, y, p), full, atol=1e-4, rtol=0)
        # pixel 300 is in row 10: rows 10 - reach .. 10 are all the step needs
        top = 10 - model.reach
        torch.testing.assert_close(model.step(x[1:2, :, top:11], y[1:2], p[1:2] - 28 * top), full[1:2],
                                   atol=1e-4, rtol=0)
        short = model.step(x[1:2, :, top + 1:11], y[1:2], p[1:2] - 28 * (top + 1))
        assert (short - full[1:2]).abs().max() > 1e-5  # and not one row fewer: reach is exact


def test_pixelcnn_sampling_is_seeded():
    torch.manual_seed(0)
    model = pixelcnn.build(pixelcnn.Config(hidden=4, dilations=(1,))).eval()
    y = torch.tensor([1, NULL_CLASS])
    for guidance_scale in (1.0, 2.0):
        a = pixelcnn.sample(model, y, torch.Generator().manual_seed(3), guidance_scale=guidance_scale)
        b = pixelcnn.sample(model, y, torch.Generator().manual_seed(3), guidance_scale=guidance_scale)
        assert torch.equal(a, b)


def test_gan_generator_and_discriminator_shapes():
    cfg = TINY["gan"]
    g, d = gan.Generator(cfg), gan.Discriminator(cfg)
    y = torch.tensor([0, 9, NULL_CLASS])
    x = g(torch.randn(3, cfg.z_dim), y)
    assert x.shape == (3, 1, 28, 28) and x.abs().max() <= 1
    assert d(x, y).shape == (3,)


def test_vae_discretized_logistic_is_a_distribution_over_256_levels():
    levels = torch.arange(256, dtype=torch.uint8).view(256, 1, 1, 1)
    for mean, log_scale in ((0.0, -4.0), (0.3, -2.0), (1.0, 0.5)):
        logp = vae.discretized_logistic_log_prob(levels, torch.full((256, 1, 1, 1), mean),
                                                 torch.full((256, 1, 1, 1), log_scale))
        assert abs(logp.exp().sum().item() - 1.0) < 1e-5
