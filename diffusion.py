"""The DGLM prior: a v-prediction, variance-preserving diffusion over sentence embeddings.

It learns p(x_c | x_p): the standardised embedding x_c of a continuation given the embedding x_p
of its prefix (DGLM sec. 3.2). Notation (Kingma et al. 2021, "Variational Diffusion Models"):

    lambda_t = log SNR(t)          cosine schedule: lambda(t) = -2 log tan(pi t / 2), t rescaled: lambda spans [-15, 15]
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

Names: x a standardised latent (x_prefix: the prefix's), z a noised latent, eps the noise, v the
velocity, a the signal variance, logsnr = lambda. Shapes: (B, d) vectors, (B,) noise levels.
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


def signal_level(logsnr):
    return torch.sigmoid(logsnr)  # a = sigmoid(lambda): the signal variance


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
    """v-space loss weight w(lambda), after Kingma & Gao 2023 ("Understanding Diffusion Objectives"):
    a Cauchy(0, std) bump below lambda = 0 and a Normal(0, std) one above, both peaking at 1.

    The reference code also makes the weight monotone in eps-space, where ||v_hat - v||^2 =
    (1 + e^-lambda) ||eps_hat - eps||^2: w_eps = w (1 + e^-lambda) must not increase with lambda.
    For std >= 2 it never does, so that step changes nothing:
        d log w_eps / d lambda = -2 lambda / (std^2 + lambda^2) - sigmoid(-lambda)   (lambda < 0)
    whose first term is at most 1/std <= 1/2 and whose second is below -1/2; above 0 both are negative.
    """
    if std < 2:
        raise ValueError("loss_weight's closed form needs std >= 2 (see its docstring)")
    return torch.where(logsnr < 0, 1 / (1 + (logsnr / std) ** 2), torch.exp(-0.5 * (logsnr / std) ** 2))


def loss_weight_integral(std=2.4):
    """int_{-15}^{15} w(lambda) dlambda = std atan(15 / std) + std sqrt(pi / 2) erf(15 / (std sqrt 2))."""
    return std * math.atan(-LOGSNR_MIN / std) + std * math.sqrt(math.pi / 2) * math.erf(LOGSNR_MAX / (std * math.sqrt(2)))


class LogSNRSampler(nn.Module):
    """Adaptive importance sampler over lambda in [-15, 15] (as in the reference code).

    100 equal bins; each keeps an EMA (decay 0.9) of the weighted loss of the examples that fell in
    it. lambda is drawn with density p(lambda) proportional to those EMAs, so training spends its
    samples where the weighted loss is large, and each example is re-weighted by
    w(lambda) / (p(lambda) int w) so the objective stays  int w(lambda) E||v_hat - v||^2 dlambda / int w.
    weighted=False: w = 1 (the loss weighting turned off, a teaching switch).
    Losses are observed while a batch is processed (observe) and folded into the bins once per
    training step (update), so a batch split into micro-batches updates the bins as the whole would.
    """

    def __init__(self, weighted=True, n_bins=100, decay=0.9):
        super().__init__()
        self.decay = decay
        self.width = (LOGSNR_MAX - LOGSNR_MIN) / n_bins
        self.weight = loss_weight if weighted else torch.ones_like
        self.weight_integral = loss_weight_integral() if weighted else LOGSNR_MAX - LOGSNR_MIN  # int w dlambda
        self.register_buffer("bin_loss", torch.ones(n_bins, dtype=torch.float64))
        self.pending = []  # (lambda, weighted loss) observed since the last update

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
        return logsnr, self.weight(logsnr) / (self.density(logsnr) * self.weight_integral)

    def observe(self, logsnr, weighted_loss):
        self.pending.append((logsnr.detach(), weighted_loss.detach()))

    @torch.no_grad()
    def update(self):
        """Fold the observed losses into the bins: an EMA of each bin's mean weighted loss."""
        if not self.pending:
            return
        logsnr, weighted_loss = (torch.cat(t) for t in zip(*self.pending))
        self.pending = []
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
    """The tiny tier's prior; train.TIERS["paper"] overrides the sizes (12 x 768 over 32 tokens)."""
    dim: int = 384          # embedding width d
    n_tokens: int = 8       # the vector is cut into N tokens ...
    token_dim: int = 32     # ... of c channels each (Linear d -> N*c)
    width: int = 128        # transformer width
    depth: int = 4          # transformer blocks (U-ViT skips join block i with block depth-1-i)
    heads: int = 4
    mlp_ratio: int = 4
    p_uncond: float = 0.1   # probability of the learned null prefix while training (CFG); 0 turns it off
    loss_weight: bool = True     # w(lambda) of Kingma & Gao; False: every noise level weighs the same
    adaptive_noise: bool = True  # lambda from the adaptive importance sampler; False: the cosine schedule

    def __post_init__(self):
        check_heads("PriorConfig: width / heads", self.width, self.heads)


def check_heads(names, width, heads):
    """A transformer's width must split into its heads (and, for the timestep features, in two): an edit that
    breaks this fails where the config is made, in one line, not in a forward pass."""
    if width % heads or width % 2:
        raise SystemExit(f"error: {names} {width} / {heads}: the width must be even and a multiple of the heads")


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
    """v_hat = f(z_t, lambda_t, x_prefix): transformer over the vector cut into tokens (DGLM sec. 3.2)."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        d, N, c, W = config.dim, config.n_tokens, config.token_dim, config.width
        self.split_z = nn.Linear(d, N * c)        # z        -> N tokens of c channels
        self.split_prefix = nn.Linear(d, N * c)   # x_prefix -> N tokens of c channels
        self.null_prefix = nn.Parameter(torch.randn(d) * 0.02)  # learned "no prefix" for CFG
        self.embed = nn.Linear(2 * c, W)                # [z token ; prefix token] -> width
        self.pos = nn.Parameter(torch.randn(N, W) * 0.02)
        self.time = nn.Sequential(nn.Linear(W, W // 2), nn.SiLU(), nn.Linear(W // 2, W // 2))  # as the reference code
        self.blocks = nn.ModuleList(Block(W, config.heads, config.mlp_ratio, W // 2) for _ in range(config.depth))
        self.skips = nn.ModuleList(nn.Linear(2 * W, W) for _ in range(config.depth // 2))  # U-ViT long skips
        self.final_norm = RMSNorm(W)
        self.final_modulation = nn.Linear(W // 2, 2 * W)
        self.unembed = nn.Linear(W, c)
        self.merge = nn.Linear(N * c, d)                # N tokens -> d
        for layer in (self.final_modulation, self.merge):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, z, logsnr, x_prefix, drop_prefix=None):
        """z (B, d), logsnr (B,), x_prefix (B, d); drop_prefix (B,) bool uses the null prefix -> v_hat (B, d)."""
        B, N = z.shape[0], self.config.n_tokens
        if drop_prefix is not None:
            null = self.null_prefix.to(x_prefix.dtype).expand_as(x_prefix)
            x_prefix = torch.where(drop_prefix[:, None], null, x_prefix)
        tokens = torch.cat([self.split_z(z).view(B, N, -1), self.split_prefix(x_prefix).view(B, N, -1)], -1)
        h = self.embed(tokens) + self.pos                               # (B, N, W)
        cond = F.silu(self.time(timestep_embedding(logsnr, self.config.width).to(h.dtype)))  # (B, W/2)
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

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        self.net = Denoiser(config)
        self.noise_levels = LogSNRSampler(weighted=config.loss_weight)

    def draw_noise(self, n, device):
        """The training noise of n examples: {logsnr, importance, eps, drop} (a dict of (n,...) tensors).

        Drawn for the whole batch at once, so that micro-batches and data-parallel processes (each
        taking rows of it) compute exactly what one pass over the whole batch would.
        adaptive_noise: lambda ~ p (the adaptive sampler), importance w(lambda) / (p(lambda) int w);
        otherwise lambda = lambda(t) of the cosine schedule with t ~ U(0, 1), importance w(lambda).
        """
        self.noise_levels.update()  # losses observed since the last draw (a no-op after train.py's update)
        if self.config.adaptive_noise:
            logsnr, importance = self.noise_levels.sample(n)
        else:
            logsnr = logsnr_cosine(torch.rand(n, device=device))
            importance = self.noise_levels.weight(logsnr)
        eps = torch.randn(n, self.config.dim, device=device)
        drop = torch.rand(n, device=device) < self.config.p_uncond  # these rows see the null prefix
        return {"logsnr": logsnr, "importance": importance, "eps": eps, "drop": drop}

    def forward(self, x, x_prefix, noise=None):
        """Per-example training loss (B,) of standardised latents x, x_prefix (B, d).

        z = sqrt(a) x + sqrt(1-a) eps,  loss = importance * ||v_hat - v||^2 (mean over d); with the
        adaptive sampler an unbiased estimate of  int w(lambda) E||v_hat - v||^2 dlambda / int w.
        noise: rows of draw_noise() (default: drawn for this batch).
        """
        noise = self.draw_noise(len(x), x.device) if noise is None else noise
        logsnr, eps = noise["logsnr"], noise["eps"]
        a = signal_level(logsnr)
        z = q_sample(x, eps, a)
        v_hat = self.net(z, logsnr, x_prefix, noise["drop"])
        mse = (v_hat.float() - v_target(x, eps, a)).pow(2).mean(-1)
        if self.training and self.config.adaptive_noise:
            self.noise_levels.observe(logsnr, self.noise_levels.weight(logsnr) * mse.detach())
        return noise["importance"] * mse

    def predict(self, z, logsnr, x_prefix, cfg_scale):
        """(x_hat, eps_hat) at noise level logsnr; classifier-free guidance with weight
        cfg_scale = w: v = v_uncond + w (v_cond - v_uncond) (w = 1: the conditional model alone)."""
        if cfg_scale == 1.0:
            v = self.net(z, logsnr, x_prefix)
        else:
            both = self.net(torch.cat([z, z]), torch.cat([logsnr, logsnr]), torch.cat([x_prefix, x_prefix]),
                            torch.arange(2 * len(z), device=z.device) >= len(z))
            v_cond, v_uncond = both.chunk(2)
            v = v_uncond + cfg_scale * (v_cond - v_uncond)
        a = signal_level(logsnr)
        return x0_from_v(z, v, a), eps_from_v(z, v, a)

    @torch.no_grad()
    def sample(self, x_prefix, *, steps, method, cfg_scale=1.0, guidance=None, generator=None, var_interp=0.2,
               callback=None):
        """Draw x ~ p(x | x_prefix) with `steps` denoising steps from lambda = -15 toward +15: the denoiser
        runs last at lambda(1 / steps) (+4.5 at 15 steps), and its x_hat there is the sample.

        method: "ddim" (deterministic, Song et al. 2021) or "ddpm" (ancestral; var_interp, a weight and not
                a logSNR, interpolates the variance in log space between the two usual choices).
        guidance: optional callable(predict, z, logsnr) -> (x_hat, eps_hat) that bends the prediction
                  (guide.py); predict(z, logsnr) -> (x_hat, eps_hat) is the plain denoiser.
        callback: optional f(step, logsnr, x_hat) to watch the proposal form.
        """
        if method not in ("ddim", "ddpm"):
            raise ValueError(f"unknown sampler {method!r} (accepted: ddim, ddpm)")
        B, d = x_prefix.shape
        z = torch.randn(B, d, device=x_prefix.device, generator=generator)  # z_1 ~ N(0, I)
        ts = torch.linspace(1.0, 0.0, steps + 1, device=x_prefix.device)
        predict = lambda z_, lam_: self.predict(z_, lam_, x_prefix, cfg_scale)
        for i in range(steps):
            lam_t = logsnr_cosine(ts[i]).expand(B)
            lam_s = logsnr_cosine(ts[i + 1]).expand(B)
            a_t, a_s = signal_level(lam_t), signal_level(lam_s)
            x_hat, eps_hat = predict(z, lam_t) if guidance is None else guidance(predict, z, lam_t)
            if callback is not None:
                callback(i, lam_t[0].item(), x_hat)
            if i == steps - 1:
                return x_hat  # the last step returns the prediction itself, not z at lambda = 15
            if method == "ddim":
                z = ddim_step(x_hat, eps_hat, a_s)
            else:
                z = ddpm_step(z, x_hat, a_t, a_s, var_interp, generator)

    def flops_per_example(self):
        """Forward FLOPs of the denoiser for one example (2 per multiply-add of every matrix product)."""
        config = self.config
        d, N, c, W, L = config.dim, config.n_tokens, config.token_dim, config.width, config.depth
        per_token = 2 * (2 * c * W + L * (4 + 2 * config.mlp_ratio) * W * W + (L // 2) * 2 * W * W + W * c)
        attention = L * 2 * 2 * N * W                    # q k^T and (softmax) v, per token
        per_example = 2 * (2 * d * N * c + N * c * d + W * W // 2 + (W // 2) ** 2 + L * (W // 2) * 6 * W + W * W)
        return N * (per_token + attention) + per_example


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
