"""diffusion.py: the identities, the schedule, the samplers against closed forms, the loss weighting
and the importance sampler, the denoiser."""
import pytest
import torch

from diffusion import (Block, LogSNRSampler, Prior, PriorConfig, ddpm_step, ema_update, eps_from_v, logsnr_cosine,
                       loss_weight, loss_weight_integral, make_ema, posterior, q_sample, signal_level, v_target,
                       x0_from_eps, x0_from_v)

SMALL = PriorConfig(dim=16, n_tokens=4, token_dim=8, width=32, depth=2, heads=2)


def test_v_identities_round_trip():
    torch.manual_seed(0)
    x, eps = torch.randn(5, 16), torch.randn(5, 16)
    a = torch.rand(5) * 0.98 + 0.01
    z = q_sample(x, eps, a)
    v = v_target(x, eps, a)
    torch.testing.assert_close(x0_from_v(z, v, a), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_from_v(z, v, a), eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x0_from_eps(z, eps, a), x, atol=1e-4, rtol=1e-4)
    # v is the rotation of (eps, x): ||v||^2 + ||z||^2 = ||eps||^2 + ||x||^2
    torch.testing.assert_close(v.pow(2).sum(-1) + z.pow(2).sum(-1), eps.pow(2).sum(-1) + x.pow(2).sum(-1))


def test_cosine_schedule_endpoints_and_median():
    t = torch.tensor([0.0, 0.5, 1.0])
    lam = logsnr_cosine(t)
    assert lam[0].item() == pytest.approx(15.0, abs=1e-3)
    assert lam[1].item() == pytest.approx(0.0, abs=1e-4)  # cos^2 = sin^2 at t = 1/2
    assert lam[2].item() == pytest.approx(-15.0, abs=1e-3)
    assert torch.all(logsnr_cosine(torch.linspace(0, 1, 50)).diff() < 0)
    assert signal_level(torch.tensor(0.0)).item() == 0.5


def test_posterior_is_consistent_with_the_forward_process():
    # if z_s ~ q(z_s | x) and z_t ~ q(z_t | z_s), then E[z_s | z_t, x] is the posterior mean: check by regression
    torch.manual_seed(0)
    n, a_s, a_t = 200_000, torch.tensor(0.8), torch.tensor(0.5)
    x = torch.full((n, 1), 1.5)
    z_s = q_sample(x, torch.randn(n, 1), a_s.expand(n))
    z_t = (a_t / a_s).sqrt() * z_s + (1 - a_t / a_s).sqrt() * torch.randn(n, 1)
    mean, lower, upper = posterior(z_t, x, a_t.expand(n), a_s.expand(n))
    resid = z_s - mean
    assert resid.mean().abs().item() < 0.01
    assert resid.var().item() == pytest.approx(lower[0].item(), rel=0.02)
    assert upper[0].item() > lower[0].item()


class PerfectDenoiser(torch.nn.Module):
    """Knows the answer x: returns the v that makes x_hat = x exactly."""

    def __init__(self, x):
        super().__init__()
        self.x = x

    def forward(self, z, logsnr, prefix, drop_prefix=None):
        a = signal_level(logsnr)[:, None]
        return (a.sqrt() * z - self.x) / (1 - a).sqrt()  # from x = sqrt(a) z - sqrt(1-a) v


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_sampler_with_perfect_denoiser_returns_x(method):
    torch.manual_seed(0)
    prior = Prior(SMALL)
    torch.set_default_dtype(torch.float64)  # lambda runs to +-15: float32 rounding would dominate
    try:
        x = torch.randn(6, 16)
        prior.net = PerfectDenoiser(x)
        out = prior.sample(torch.zeros(6, 16), steps=20, method=method, generator=torch.Generator().manual_seed(1))
    finally:
        torch.set_default_dtype(torch.float32)
    torch.testing.assert_close(out, x, atol=1e-8, rtol=1e-8)


def test_ddpm_step_with_zero_interp_uses_posterior_variance():
    torch.manual_seed(0)
    z, x = torch.zeros(50_000, 1), torch.zeros(50_000, 1)
    a_t, a_s = torch.full((50_000,), 0.3), torch.full((50_000,), 0.6)
    _, lower, upper = posterior(z, x, a_t, a_s)
    assert ddpm_step(z, x, a_t, a_s, 0.0).var().item() == pytest.approx(lower[0].item(), rel=0.03)
    assert ddpm_step(z, x, a_t, a_s, 1.0).var().item() == pytest.approx(upper[0].item(), rel=0.03)


def test_denoiser_shapes_and_null_prefix():
    torch.manual_seed(0)
    prior = Prior(SMALL)
    for p in prior.parameters():  # leave the zero-init so outputs depend on inputs
        torch.nn.init.normal_(p, std=0.1)
    z, lam, prefix = torch.randn(3, 16), torch.zeros(3), torch.randn(3, 16)
    v = prior.net(z, lam, prefix)
    assert v.shape == (3, 16)
    dropped = prior.net(z, lam, prefix, torch.tensor([True, True, True]))
    null = prior.net(z, lam, prior.net.null_prefix.expand(3, 16))
    torch.testing.assert_close(dropped, null)
    # classifier-free guidance at scale 1 is the conditional model
    torch.testing.assert_close(prior.predict(z, lam, prefix, 1.0)[0], prior.predict(z, lam, prefix, 1.0 + 1e-9)[0],
                               atol=1e-5, rtol=1e-5)
    # weight 0 is the unconditional model: the null prefix in place of every prefix
    torch.testing.assert_close(prior.predict(z, lam, prefix, 0.0)[0],
                               prior.predict(z, lam, prior.net.null_prefix.expand(3, 16), 1.0)[0],
                               atol=1e-5, rtol=1e-5)


def test_the_written_out_attention_is_pytorchs_and_a_new_denoiser_is_not_blind_to_z():
    torch.manual_seed(0)
    W, heads, B, N = 32, 2, 3, 5
    block = Block(W, heads, 2, W // 2)
    torch.nn.init.normal_(block.modulation.weight, std=0.1)
    with torch.no_grad():
        block.modulation.weight[5 * W:] = 0  # gate2 = 0: the block's output is its attention branch alone
    h, cond = torch.randn(B, N, W), torch.randn(B, W // 2)
    shift1, scale1, gate1 = block.modulation(cond)[:, None].chunk(6, dim=-1)[:3]
    q, k, v = block.qkv(block.norm1(h) * (1 + scale1) + shift1).view(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
    attn = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, W)
    torch.testing.assert_close(block(h, cond), h + gate1 * block.proj(attn))
    # adaLN-Zero: zero-initialised modulations scale by 1 + 0, so once the last layer (zero too) has
    # learned anything the output depends on z
    net = Prior(SMALL).net
    torch.nn.init.normal_(net.merge.weight, std=0.1)
    lam, prefix = torch.zeros(1), torch.randn(1, 16)
    assert (net(torch.randn(1, 16), lam, prefix) - net(torch.randn(1, 16), lam, prefix)).abs().max() > 1e-3


def test_the_prior_loss_is_the_importance_weighted_mean_squared_v_error():
    torch.manual_seed(0)
    prior = Prior(SMALL)
    for p in prior.net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, x_prefix = torch.randn(6, 16), torch.randn(6, 16)
    noise = prior.draw_noise(6, "cpu")
    noise["importance"] = torch.rand(6) + 0.5
    loss = prior(x, x_prefix, noise)
    lam, eps = noise["logsnr"], noise["eps"]
    a = torch.sigmoid(lam)[:, None]
    z, v = a.sqrt() * x + (1 - a).sqrt() * eps, a.sqrt() * eps - (1 - a).sqrt() * x
    mse = (prior.net(z, lam, x_prefix, noise["drop"]) - v).pow(2).mean(-1)
    torch.testing.assert_close(loss, noise["importance"] * mse)
    # the sampler learns from w(lambda) ||v_hat - v||^2, whatever the importance
    (seen_lam, seen_loss), = prior.noise_levels.pending
    torch.testing.assert_close(seen_lam, lam)
    torch.testing.assert_close(seen_loss, loss_weight(lam) * mse)


def test_each_bin_keeps_an_ema_of_its_mean_weighted_loss_and_the_average_model_one_of_the_weights():
    sampler = LogSNRSampler()
    sampler.observe(torch.tensor([0.1, 0.2]), torch.tensor([3.0, 5.0]))  # one bin (0.3 wide) ...
    sampler.observe(torch.tensor([0.25]), torch.tensor([7.0]))           # ... seen three times: mean 5
    sampler.update()
    expected = torch.ones(100, dtype=torch.float64)
    expected[sampler.bin_of(torch.tensor(0.1))] = 0.9 * 1 + 0.1 * 5.0
    torch.testing.assert_close(sampler.bin_loss, expected)
    torch.manual_seed(0)
    model, other = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    ema = make_ema(model)
    ema_update(ema, other, 0.9)
    torch.testing.assert_close(ema.weight, 0.9 * model.weight + 0.1 * other.weight)


def test_prior_loss_falls():
    torch.manual_seed(0)
    prior = Prior(SMALL)
    prefix = torch.randn(512, 16)
    x = prefix.roll(1, dims=1) * 0.8 + 0.2 * torch.randn(512, 16)  # continuation depends on prefix
    opt = torch.optim.AdamW(prior.parameters(), lr=2e-3)
    losses = []
    for step in range(150):
        idx = torch.randint(0, 512, (128,))
        loss = prior(x[idx], prefix[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.75 * first, (first, last)


def test_loss_weight_is_monotone_in_eps_space_and_peaks_at_one():
    lam = torch.linspace(-15, 15, 3001)
    w = loss_weight(lam)
    w_eps = w.double() * (1 + torch.exp(-lam.double()))
    assert torch.all(w_eps.diff() <= 1e-9)  # the reference code's running maximum would change nothing
    assert w.max().item() == pytest.approx(1.0) and w[0].item() < 0.1 and w[-1].item() < 1e-6
    cauchy, normal = 1 / (1 + (lam / 2.4) ** 2), torch.exp(-0.5 * (lam / 2.4) ** 2)
    torch.testing.assert_close(w, torch.where(lam < 0, cauchy, normal))
    grid = torch.linspace(-15, 15, 100_001, dtype=torch.float64)
    assert loss_weight_integral() == pytest.approx(torch.trapezoid(loss_weight(grid), grid).item(), rel=1e-6)
    with pytest.raises(ValueError, match="std >= 2"):
        loss_weight(lam, std=1.5)  # below 2 the weight is not monotone in eps-space: the closed form is wrong


def test_importance_sampler_weights_integrate_the_target_weighting():
    torch.manual_seed(0)
    sampler = LogSNRSampler()
    sampler.bin_loss.copy_(torch.rand(100, dtype=torch.float64) + 0.05)   # an arbitrary learned density
    g = torch.Generator().manual_seed(0)
    lam, importance = sampler.sample(400_000, generator=g)
    # E_p[w/(p int w) f] = int w f / int w; with f = 1 it is 1, with f = 1[lambda > 0] the weight mass above 0
    assert importance.mean().item() == pytest.approx(1.0, rel=0.01)
    assert lam.unique().numel() > 390_000  # uniform within its bin, not the bin's centre
    grid = torch.linspace(-15, 15, 10001)
    above = torch.trapezoid(loss_weight(grid) * (grid > 0), grid) / sampler.weight_integral
    assert (importance * (lam > 0)).mean().item() == pytest.approx(above.item(), rel=0.02)
    unweighted = LogSNRSampler(weighted=False)
    assert unweighted.sample(1000)[1].mean().item() == pytest.approx(1.0)  # w = 1, uniform p: importance 1


def test_importance_sampler_moves_towards_high_loss_bins_once_per_update():
    sampler = LogSNRSampler()
    lam = torch.linspace(-14.9, 14.9, 1000)
    sampler.observe(lam, (lam < -10).float() * 5 + 0.1)
    assert torch.equal(sampler.bin_loss, torch.ones(100, dtype=torch.float64))  # observed, not yet applied
    sampler.update()
    for _ in range(30):
        sampler.observe(lam[:500], (lam[:500] < -10).float() * 5 + 0.1)  # a batch in two parts ...
        sampler.observe(lam[500:], (lam[500:] < -10).float() * 5 + 0.1)
        sampler.update()                                                 # ... folded in as one
    assert sampler.density(torch.tensor([-12.0])) > 10 * sampler.density(torch.tensor([5.0]))


def test_the_teaching_switches_change_the_noise_levels_and_weights():
    torch.manual_seed(0)
    plain = Prior(PriorConfig(dim=16, n_tokens=4, token_dim=8, width=32, depth=2, heads=2, loss_weight=False,
                              adaptive_noise=False, p_uncond=0.0))
    noise = plain.draw_noise(20_000, "cpu")
    t = torch.rand(20_000)
    assert noise["logsnr"].median().item() == pytest.approx(logsnr_cosine(t).median().item(), abs=0.2)  # cosine
    assert torch.equal(noise["importance"], torch.ones(20_000)) and not noise["drop"].any()
    x = torch.randn(8, 16)
    plain(x, x).sum().backward()
    assert plain.noise_levels.pending == []  # nothing to adapt
    weighted = Prior(PriorConfig(dim=16, n_tokens=4, token_dim=8, width=32, depth=2, heads=2, adaptive_noise=False))
    noise = weighted.draw_noise(1000, "cpu")  # the cosine schedule's levels, still weighted by w(lambda)
    torch.testing.assert_close(noise["importance"], loss_weight(noise["logsnr"]))


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser for data x ~ N(m, sigma^2 I): E[x | z_t] = m + sqrt(a) sigma^2 / (a sigma^2 + 1 - a) (z - sqrt(a) m)."""

    def __init__(self, m, sigma):
        super().__init__()
        self.m, self.sigma = m, sigma

    def forward(self, z, logsnr, prefix, drop_prefix=None):
        a = signal_level(logsnr)[:, None]
        var = self.sigma ** 2
        x_hat = self.m + a.sqrt() * var / (a * var + 1 - a) * (z - a.sqrt() * self.m)
        return (a.sqrt() * z - x_hat) / (1 - a).sqrt()


def test_ddim_with_the_full_step_count_matches_the_ancestral_sampler():
    # With the exact denoiser of a Gaussian, DDIM (deterministic) and the ancestral sampler must both
    # follow the true marginals: the same mean and spread of x_hat at every step, and x ~ N(m, sigma^2) at the end.
    m, sigma, n, steps = 1.5, 0.5, 20_000, 250
    prior = Prior(PriorConfig(dim=4, n_tokens=2, token_dim=4, width=8, depth=2, heads=2))
    prior.net = GaussianDenoiser(m, sigma)
    torch.set_default_dtype(torch.float64)
    try:
        paths = {}
        for method, interp in [("ddim", 0.2), ("ddpm", 0.2), ("ddpm", 0.0)]:
            stats = []
            out = prior.sample(torch.zeros(n, 4), steps=steps, method=method, var_interp=interp,
                               generator=torch.Generator().manual_seed(0),
                               callback=lambda i, lam, x_hat: stats.append((x_hat.mean().item(), x_hat.std().item())))
            assert out.mean().item() == pytest.approx(m, abs=0.01), (method, interp)
            assert out.std().item() == pytest.approx(sigma, rel=0.02), (method, interp)
            paths[method, interp] = torch.tensor(stats)
    finally:
        torch.set_default_dtype(torch.float32)
    for key in [("ddpm", 0.2), ("ddpm", 0.0)]:
        torch.testing.assert_close(paths[key], paths["ddim", 0.2], atol=0.02, rtol=0.03)
