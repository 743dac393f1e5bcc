"""The DGLM prior: a v-prediction, variance-preserving diffusion over sentence embeddings.

It learns p(x_c | x_p): the standardised embedding x_c of a continuation given the embedding x_p
of its prefix (DGLM sec. 3.2). Notation (Kingma et al. 2021, "Variational Diffusion Models"):

    lambda_t = log SNR(t)          cosine schedule: lambda(t) = -2 log tan(pi t / 2), clipped to [-15, 15]
    a_t = sigmoid(lambda_t)        signal variance ("alpha bar"); 1 - a_t is the noise variance
    q(z_t | x):  z_t = sqrt(a_t) x + sqrt(1 - a_t) eps,       eps ~ N(0, I)
    v target:    v   = sqrt(a_t) eps - sqrt(1 - a_t) x        (Salimans & Ho 2022)
    from v_hat:  x_hat   = sqrt(a_t) z_t - sqrt(1 - a_t) v_hat
                 eps_hat = sqrt(1 - a_t) z_t + sqrt(a_t) v_hat

The denoiser is a bidirectional transformer over the vector cut into N tokens, with the prefix
embedding cut the same way and concatenated per token, RMSNorm, adaLN-Zero conditioning on the
noise level and U-ViT long skips. A learned null prefix replaces x_p with probability p_uncond
so that one network also gives the unconditional model (classifier-free guidance).
Training: lambda from an adaptive importance sampler over [-15, 15] and an asymmetric loss weight
(Kingma & Gao 2023), as in the paper's reference code. Samplers: ancestral DDPM (variance
interpolated in log space) and DDIM, with any step count.
"""
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- schedule and identities

LOGSNR_MIN, LOGSNR_MAX = -15.0, 15.0


def logsnr_cosine(t, logsnr_min=LOGSNR_MIN, logsnr_max=LOGSNR_MAX):
    """lambda(t) = -2 log tan(pi t / 2), with t rescaled so that lambda(0) = max and lambda(1) = min."""
    t_lo = math.atan(math.exp(-0.5 * logsnr_max))
    t_hi = math.atan(math.exp(-0.5 * logsnr_min))
    return -2.0 * torch.log(torch.tan(t_lo + t * (t_hi - t_lo)))


def alpha(logsnr):
    return torch.sigmoid(logsnr)  # a = sigmoid(lambda): signal variance


def bcast(coef, x):
    """Per-example coefficient (B,) -> (B, 1, ..., 1) to broadcast against x."""
    return coef.reshape(-1, *([1] * (x.dim() - 1)))


def q_sample(x, eps, a):
    return bcast(a.sqrt(), x) * x + bcast((1 - a).sqrt(), x) * eps  # z_t ~ q(z_t | x)


def v_target(x, eps, a):
    return bcast(a.sqrt(), x) * eps - bcast((1 - a).sqrt(), x) * x  # v = sqrt(a) eps - sqrt(1-a) x


def x0_from_v(z, v, a):
    return bcast(a.sqrt(), z) * z - bcast((1 - a).sqrt(), z) * v  # x = sqrt(a) z - sqrt(1-a) v


def eps_from_v(z, v, a):
    return bcast((1 - a).sqrt(), z) * z + bcast(a.sqrt(), z) * v  # eps = sqrt(1-a) z + sqrt(a) v


def x0_from_eps(z, eps, a):
    return (z - bcast((1 - a).sqrt(), z) * eps) / bcast(a.sqrt(), z)  # x = (z - sqrt(1-a) eps) / sqrt(a)


# ----------------------------------------------------------------------------- loss weighting and noise levels


def loss_weight(logsnr, std=2.4):
    """v-space loss weight w_v(lambda), after Kingma & Gao 2023 ("Understanding Diffusion Objectives").

    Shape: a Cauchy(0, std) bump below lambda = 0 and a Normal(0, std) one above (both peak 1),
    then made monotone in eps-space: ||v_hat - v||^2 = (1 + e^-lambda) ||eps_hat - eps||^2, so
    w_eps = w_v (1 + e^-lambda) is replaced by its running maximum from the right (non-increasing
    in lambda), and converted back. Evaluated exactly (no lookup grid) on the given lambdas.
    """
    grid = torch.linspace(LOGSNR_MIN, LOGSNR_MAX, 10_001, dtype=torch.float64)
    shape = torch.where(grid < 0, 1 / (1 + (grid / std) ** 2), torch.exp(-0.5 * (grid / std) ** 2))
    w_eps = shape * (1 + torch.exp(-grid))
    w_eps = w_eps.flip(0).cummax(0).values.flip(0)            # non-increasing in lambda
    w_v = w_eps / (1 + torch.exp(-grid))
    w_v = w_v / w_v.max()
    idx = ((logsnr.double().cpu() - LOGSNR_MIN) / (LOGSNR_MAX - LOGSNR_MIN) * 10_000).round().long().clamp(0, 10_000)
    return w_v[idx].to(device=logsnr.device, dtype=torch.float32)


class LogSNRSampler(nn.Module):
    """Adaptive importance sampler over lambda in [-15, 15] (as in the reference code).

    100 equal bins; each keeps an EMA (decay 0.9) of the weighted loss of the examples that fell in
    it. lambda is drawn with density p(lambda) proportional to those EMAs, so training spends its
    samples where the weighted loss is large, and each example is re-weighted by
    w(lambda) / p(lambda) so the objective stays  int w(lambda) E||v_hat - v||^2 dlambda.
    """

    def __init__(self, n_bins=100, decay=0.9):
        super().__init__()
        self.decay = decay
        self.width = (LOGSNR_MAX - LOGSNR_MIN) / n_bins
        self.register_buffer("bin_loss", torch.ones(n_bins, dtype=torch.float64))
        grid = torch.linspace(LOGSNR_MIN, LOGSNR_MAX, 10_001)
        self.weight_integral = torch.trapezoid(loss_weight(grid), grid).item()  # int w(lambda) dlambda

    def density(self, logsnr):
        p = self.bin_loss / (self.bin_loss.sum() * self.width)      # piecewise-constant p(lambda)
        return p[self.bin_of(logsnr)].float()

    def bin_of(self, logsnr):
        return ((logsnr - LOGSNR_MIN) / self.width).long().clamp(0, len(self.bin_loss) - 1)

    def sample(self, n, generator=None):
        """-> lambda (n,) drawn from p, and the importance weight w(lambda) / (p(lambda) int w)."""
        device = self.bin_loss.device
        bins = torch.multinomial(self.bin_loss.float(), n, replacement=True, generator=generator)
        logsnr = LOGSNR_MIN + (bins + torch.rand(n, device=device, generator=generator)) * self.width
        return logsnr, loss_weight(logsnr) / (self.density(logsnr) * self.weight_integral)

    @torch.no_grad()
    def update(self, logsnr, weighted_loss):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # data-parallel: every process updates with the whole batch, so the density stays identical
            logsnr, weighted_loss = (all_gather(t) for t in (logsnr, weighted_loss))
        bins = self.bin_of(logsnr)
        total = torch.zeros_like(self.bin_loss).index_add_(0, bins, weighted_loss.double())
        count = torch.zeros_like(self.bin_loss).index_add_(0, bins, torch.ones_like(weighted_loss, dtype=torch.float64))
        seen = count > 0
        self.bin_loss[seen] = self.decay * self.bin_loss[seen] + (1 - self.decay) * total[seen] / count[seen]


def all_gather(t):
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


# ----------------------------------------------------------------------------- denoiser


@dataclass
class PriorConfig:
    dim: int = 384          # embedding width d
    n_tokens: int = 8       # the vector is cut into N tokens ...
    token_dim: int = 64     # ... of c channels each (Linear d -> N*c)
    width: int = 256        # transformer width
    depth: int = 4          # transformer blocks (U-ViT skips join block i with block depth-1-i)
    heads: int = 4
    mlp_ratio: int = 4
    p_uncond: float = 0.1   # probability of the learned null prefix while training (CFG)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)  # scale comes from adaLN


class Block(nn.Module):
    """Pre-norm transformer block; adaLN-Zero: (shift, scale, gate) x 2 from the noise-level embedding."""

    def __init__(self, width, heads, mlp_ratio, cond_dim):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = RMSNorm(width), RMSNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))
        self.modulation = nn.Linear(cond_dim, 6 * width)
        nn.init.zeros_(self.modulation.weight)  # zero-init: every block starts as the identity
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h, cond):  # h (B, N, W), cond (B, W/2)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond)[:, None].chunk(6, dim=-1)
        B, N, W = h.shape
        q, k, v = self.qkv(self.norm1(h) * (1 + scale1) + shift1).view(B, N, 3, self.heads, -1).transpose(1, 3).unbind(2)
        # bidirectional attention over the N tokens, written out: N is small (8 to 32), and on a CPU
        # this beats the fused kernel (scaled_dot_product_attention), most of all in bf16
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])     # (B, heads, N, N)
        attn = scores.softmax(-1) @ v                                  # (B, heads, N, W/heads)
        h = h + gate1 * self.proj(attn.transpose(1, 2).reshape(B, N, W))
        return h + gate2 * self.mlp(self.norm2(h) * (1 + scale2) + shift2)


def timestep_embedding(logsnr, dim):
    """Sinusoidal features of the noise level; lambda in [-15, 15] is mapped to [0, 1000] first."""
    u = (logsnr.float() - LOGSNR_MIN) / (LOGSNR_MAX - LOGSNR_MIN) * 1000.0
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=logsnr.device) / (dim // 2))
    args = u[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class Denoiser(nn.Module):
    """v_hat = f(z_t, lambda_t, x_p): transformer over the vector cut into tokens (DGLM sec. 3.2)."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        N, c, W = cfg.n_tokens, cfg.token_dim, cfg.width
        self.split_z = nn.Linear(cfg.dim, N * c)       # z  -> N tokens of c channels
        self.split_prefix = nn.Linear(cfg.dim, N * c)  # x_p -> N tokens of c channels
        self.null_prefix = nn.Parameter(torch.randn(cfg.dim) * 0.02)  # learned "no prefix" for CFG
        self.embed = nn.Linear(2 * c, W)                # [z token ; prefix token] -> width
        self.pos = nn.Parameter(torch.randn(N, W) * 0.02)
        self.time = nn.Sequential(nn.Linear(W, W // 2), nn.SiLU(), nn.Linear(W // 2, W // 2))  # as the reference code
        self.blocks = nn.ModuleList(Block(W, cfg.heads, cfg.mlp_ratio, W // 2) for _ in range(cfg.depth))
        self.skips = nn.ModuleList(nn.Linear(2 * W, W) for _ in range(cfg.depth // 2))  # U-ViT long skips
        self.final_norm = RMSNorm(W)
        self.final_modulation = nn.Linear(W // 2, 2 * W)
        self.unembed = nn.Linear(W, c)
        self.merge = nn.Linear(N * c, cfg.dim)          # N tokens -> d
        for layer in (self.final_modulation, self.merge):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, z, logsnr, prefix, drop_prefix=None):
        """z (B, d), logsnr (B,), prefix (B, d); drop_prefix (B,) bool uses the null prefix -> v_hat (B, d)."""
        B, N = z.shape[0], self.cfg.n_tokens
        if drop_prefix is not None:
            prefix = torch.where(drop_prefix[:, None], self.null_prefix.to(prefix.dtype).expand_as(prefix), prefix)
        tokens = torch.cat([self.split_z(z).view(B, N, -1), self.split_prefix(prefix).view(B, N, -1)], -1)
        h = self.embed(tokens) + self.pos                               # (B, N, W)
        cond = F.silu(self.time(timestep_embedding(logsnr, self.cfg.width).to(h.dtype)))  # (B, W/2)
        half = len(self.blocks) // 2
        saved = []
        for i, block in enumerate(self.blocks):
            if i >= len(self.blocks) - half:                            # second half: join the long skip
                h = self.skips[len(self.blocks) - 1 - i](torch.cat([h, saved.pop()], -1))
            h = block(h, cond)
            if i < half:
                saved.append(h)
        shift, scale = self.final_modulation(cond)[:, None].chunk(2, dim=-1)
        h = self.unembed(self.final_norm(h) * (1 + scale) + shift)     # (B, N, c)
        return self.merge(h.reshape(B, -1))                             # (B, d)


# ----------------------------------------------------------------------------- the diffusion model


class Prior(nn.Module):
    """Training loss and samplers for p(x_c | x_p). `forward()` returns the loss."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        self.net = Denoiser(cfg)
        self.noise_levels = LogSNRSampler()

    def forward(self, x, prefix, shard=None):
        """Per-example training loss, x and prefix (B, d) standardised.

        lambda ~ p (adaptive), z = sqrt(a) x + sqrt(1-a) eps, loss = w(lambda)/p(lambda) ||v_hat - v||^2 / int w,
        an unbiased estimate of the weighted objective int w(lambda) E||v_hat - v||^2 dlambda / int w.
        shard (data-parallel training): every process draws the noise of the whole batch from the same
        RNG state and keeps only the rows `shard`, so N processes compute exactly what one would.
        """
        B = x.shape[0]
        logsnr, importance = self.noise_levels.sample(B)
        eps = torch.randn_like(x)
        drop = torch.rand(B, device=x.device) < self.cfg.p_uncond
        if shard is not None:
            x, prefix, logsnr, importance, eps, drop = (t[shard] for t in (x, prefix, logsnr, importance, eps, drop))
        a = alpha(logsnr)
        z = q_sample(x, eps, a)
        v_hat = self.net(z, logsnr, prefix, drop)
        mse = (v_hat.float() - v_target(x, eps, a)).pow(2).mean(-1)
        if self.training:
            self.noise_levels.update(logsnr, loss_weight(logsnr) * mse.detach())
        return importance * mse

    def predict(self, z, logsnr, prefix, cfg_scale=1.0):
        """(x_hat, eps_hat) at noise level logsnr; cfg_scale w: v = v_uncond + w (v_cond - v_uncond)."""
        if cfg_scale == 1.0:
            v = self.net(z, logsnr, prefix)
        else:
            both = self.net(torch.cat([z, z]), torch.cat([logsnr, logsnr]), torch.cat([prefix, prefix]),
                            torch.arange(2 * len(z), device=z.device) >= len(z))
            v_cond, v_uncond = both.chunk(2)
            v = v_uncond + cfg_scale * (v_cond - v_uncond)
        a = alpha(logsnr)
        return x0_from_v(z, v, a), eps_from_v(z, v, a)

    @torch.no_grad()
    def sample(self, prefix, steps=50, method="ddim", cfg_scale=1.0, guidance=None, generator=None,
               var_interp=0.2, callback=None):
        """Draw x ~ p(x | prefix) with `steps` denoising steps from lambda = -15 to +15.

        method: "ddim" (deterministic, Song et al. 2021) or "ddpm" (ancestral).
        guidance: optional callable(predict, z, logsnr) -> (x_hat, eps_hat) that bends the prediction
                  (guide.py); predict(z, logsnr) -> (x_hat, eps_hat) is the plain denoiser.
        callback: optional f(step, logsnr, x_hat) to watch the proposal form.
        """
        B, d = prefix.shape
        z = torch.randn(B, d, device=prefix.device, generator=generator)  # z_1 ~ N(0, I)
        ts = torch.linspace(1.0, 0.0, steps + 1, device=prefix.device)
        predict = lambda z_, lam_: self.predict(z_, lam_, prefix, cfg_scale)
        for i in range(steps):
            lam_t = logsnr_cosine(ts[i]).expand(B)
            lam_s = logsnr_cosine(ts[i + 1]).expand(B)
            a_t, a_s = alpha(lam_t), alpha(lam_s)
            x_hat, eps_hat = predict(z, lam_t) if guidance is None else guidance(predict, z, lam_t)
            if callback is not None:
                callback(i, lam_t[0].item(), x_hat)
            if i == steps - 1:
                return x_hat  # the last step returns the prediction itself, not z at lambda = 15
            if method == "ddim":
                z = ddim_step(x_hat, eps_hat, a_s)
            elif method == "ddpm":
                z = ddpm_step(z, x_hat, a_t, a_s, var_interp, generator)
            else:
                raise ValueError(f"unknown sampler {method!r} (accepted: ddim, ddpm)")


def ddim_step(x_hat, eps_hat, a_s):
    """Deterministic DDIM: z_s = sqrt(a_s) x_hat + sqrt(1 - a_s) eps_hat."""
    return q_sample(x_hat, eps_hat, a_s)


def posterior(z, x_hat, a_t, a_s):
    """q(z_s | z_t, x) for s < t: mean and the two usual variance choices (lower, upper).

    With a_{t|s} = a_t / a_s and sigma^2_{t|s} = 1 - a_t / a_s:
      mean  = sqrt(a_s) sigma^2_{t|s} / (1 - a_t) x + sqrt(a_{t|s}) (1 - a_s) / (1 - a_t) z_t
      lower = sigma^2_{t|s} (1 - a_s) / (1 - a_t)   (the true posterior variance)
      upper = sigma^2_{t|s}                          (the forward-step variance)
    """
    a_ts = a_t / a_s
    var_ts = 1 - a_ts
    mean = bcast(a_s.sqrt() * var_ts / (1 - a_t), z) * x_hat + bcast(a_ts.sqrt() * (1 - a_s) / (1 - a_t), z) * z
    return mean, var_ts * (1 - a_s) / (1 - a_t), var_ts


def ddpm_step(z, x_hat, a_t, a_s, var_interp, generator=None):
    """Ancestral step z_s ~ N(mean, exp(l log upper + (1 - l) log lower)), l = var_interp."""
    mean, lower, upper = posterior(z, x_hat, a_t, a_s)
    log_var = var_interp * upper.log() + (1 - var_interp) * lower.log()
    noise = torch.randn(z.shape, device=z.device, generator=generator)
    return mean + bcast((0.5 * log_var).exp(), z) * noise


# ----------------------------------------------------------------------------- EMA


def make_ema(model):
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema, model, decay):
    """theta_ema <- decay * theta_ema + (1 - decay) * theta."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1 - decay)
