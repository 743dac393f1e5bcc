"""Plug-and-play control: linear probes on the embedding space and guidance of the prior.

A probe is logistic regression on unit-norm sentence embeddings, p(y = 1 | e) = sigmoid(w.e + b)
(DGLM sec. 3.3). During denoising, with gradients on z_t (Loss-Guided Diffusion, Song et al. 2023):

    x_hat, eps_hat = denoiser(z_t)                        (differentiable in z_t)
    x_k = x_hat + r_t * eps_k,   r_t^2 = (1 - a_t) / a_t,  k = 1..K   (Monte Carlo around x_hat)
    e_k = normalize(mu + s * x_k)                         (into the probe's space)
    L   = aggregate_k  sum_j  weight_j * BCE(w_j . e_k + b_j, target_j)
    eps_hat <- eps_hat + scale * sqrt(1 - a_t) * dL/dz_t  ;  x_hat <- (z_t - sqrt(1-a_t) eps_hat) / sqrt(a_t)

Several attributes compose by summing their losses. The decoder never sees the probe.
"""
import json
import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from diffusion import alpha, x0_from_eps
from encoder import unstandardize

# Guide name -> (probe, target label). "negative" is the sentiment probe asked for label 0.
TINY_GUIDES = {
    "positive": ("sentiment", 1), "negative": ("sentiment", 0),
    "movie": ("movie", 1), "tweet": ("tweet", 1), "product": ("product", 1), "news": ("news", 1),
}
SENTIMENT_MARGIN = 0.5  # tiny corpus: rating > +0.5 is positive, < -0.5 negative, between is left out


# ----------------------------------------------------------------------------- probes


def train_probe(e, y, sample_weight=None, weight_decay=1e-4, steps=200):
    """Weighted logistic regression on embeddings e (N, d), labels y (N,) in {0, 1} -> (w, b).

    Full-batch L-BFGS on  sum_i q_i BCE(w.e_i + b, y_i) + weight_decay/2 ||w||^2  with sum q_i = 1.
    """
    e, y = e.float(), y.float()
    q = torch.full_like(y, 1.0 / len(y)) if sample_weight is None else sample_weight / sample_weight.sum()
    w = torch.zeros(e.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (q * F.binary_cross_entropy_with_logits(e @ w + b, y, reduction="none")).sum()
        loss = loss + 0.5 * weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def balanced_weights(y, groups):
    """Weights that give every (group, label) cell the same total mass: no group predicts the label."""
    weight = torch.zeros(len(y))
    cells = sorted(set(zip(groups, y.tolist())))
    for g, label in cells:
        idx = torch.tensor([i for i, (gi, yi) in enumerate(zip(groups, y.tolist())) if gi == g and yi == label])
        weight[idx] = 1.0 / (len(cells) * len(idx))
    return weight


def accuracy(w, b, e, y):
    return ((e.float() @ w + b > 0).float() == y.float()).float().mean().item()


def train_tiny_probes(train_e, train_rows, test_e, test_rows):
    """Sentiment (balanced within each domain) and one-vs-rest domain probes for the tiny corpus.

    Returns {name: (w, b)} and {name: held-out accuracy}. The sentiment probe's classes are weighted
    so that each domain holds as much positive as negative mass: it cannot score by naming a domain.
    """
    probes, report = {}, {}

    def sentiment_set(e, rows):
        keep = [i for i, r in enumerate(rows) if abs(r["rating"]) > SENTIMENT_MARGIN]
        y = torch.tensor([float(rows[i]["rating"] > 0) for i in keep])
        return e[keep], y, [rows[i]["domain"] for i in keep]

    e, y, domains = sentiment_set(train_e, train_rows)
    probes["sentiment"] = train_probe(e, y, balanced_weights(y, domains))
    te, ty, tdomains = sentiment_set(test_e, test_rows)
    report["sentiment"] = accuracy(*probes["sentiment"], te, ty)
    for domain in sorted({r["domain"] for r in train_rows}):
        y = torch.tensor([float(r["domain"] == domain) for r in train_rows])
        probes[domain] = train_probe(train_e, y, balanced_weights(y, [0] * len(y)))
        ty = torch.tensor([float(r["domain"] == domain) for r in test_rows])
        report[domain] = accuracy(*probes[domain], test_e, ty)
    return probes, report


def save_probes(path, probes, guides, encoder_name):
    tensors = {}
    for name, (w, b) in probes.items():
        tensors[f"{name}.weight"], tensors[f"{name}.bias"] = w.contiguous(), b.reshape(1)
    meta = {"encoder": encoder_name, "guides": json.dumps(guides)}
    tmp = str(path) + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def load_probes(path, encoder_name=None):
    """-> ({probe name: (w, b)}, {guide name: (probe name, target)})."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, Exception) as err:  # safetensors raises its own error type for corrupt files
        raise SystemExit(f"error: cannot read probes {path} ({err}); retrain with train.py") from None
    if encoder_name is not None and meta.get("encoder") != encoder_name:
        raise SystemExit(f"error: probes in {path} were trained for encoder {meta.get('encoder')!r}, "
                         f"but the checkpoint uses {encoder_name!r}")
    names = {k.rsplit(".", 1)[0] for k in tensors}
    probes = {n: (tensors[f"{n}.weight"], tensors[f"{n}.bias"][0]) for n in names}
    guides = {g: tuple(v) for g, v in json.loads(meta.get("guides", "{}")).items()}
    return probes, guides


def parse_guides(spec, available):
    """'positive,tweet:0.5' -> [(guide name, weight)]; 'none' or '' -> []."""
    if spec in (None, "", "none"):
        return []
    parsed = []
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        if name not in available:
            raise SystemExit(f"error: unknown guide {name!r} (available: {', '.join(sorted(available))}, none)")
        try:
            parsed.append((name, float(weight) if weight else 1.0))
        except ValueError:
            raise SystemExit(f"error: guide weight {weight!r} in {part!r} is not a number (use name:weight)") from None
    return parsed


# ----------------------------------------------------------------------------- guidance


class Guidance:
    """callable(predict, z, logsnr) -> (x_hat, eps_hat), bent toward the requested attributes.

    terms: list of (w, b, target, weight) linear probes on unit embeddings.
    n_samples K: Monte Carlo samples around x_hat (K = 0 uses x_hat itself; the reference code uses 32).
    aggregate: "reference": log mean_k exp(loss_k), as the paper's reference code aggregates;
               "lgd": -log mean_k exp(-loss_k) = -log mean_k p(y | x_k), LGD-MC's likelihood average;
               "mean": mean_k loss_k.
    """

    def __init__(self, terms, mu, s, scale, n_samples=32, aggregate="reference", seed=0):
        if aggregate not in ("reference", "lgd", "mean"):
            raise ValueError(f"unknown aggregate {aggregate!r} (accepted: reference, lgd, mean)")
        self.terms = terms
        self.mu, self.s = mu, s
        self.scale = scale
        self.n_samples = n_samples
        self.aggregate = aggregate
        self.generator = torch.Generator().manual_seed(seed)  # own RNG: the sampler's noise is untouched

    def loss(self, x_hat, a):
        """Per-example guidance loss (B,) of predicted clean latents x_hat (B, d) at signal level a (B,)."""
        if self.n_samples > 0:
            r = ((1 - a) / a).sqrt()                                            # r_t^2 = (1 - a_t) / a_t
            noise = torch.randn((self.n_samples, *x_hat.shape), generator=self.generator).to(x_hat)
            x = x_hat[None] + r[None, :, None] * noise                          # (K, B, d)
        else:
            x = x_hat[None]
        e = unstandardize(x, self.mu, self.s)                                   # onto the unit sphere
        total = 0.0
        for w, b, target, weight in self.terms:
            logit = e @ w + b                                                   # (K, B)
            total = total + weight * F.binary_cross_entropy_with_logits(
                logit, torch.full_like(logit, float(target)), reduction="none")
        K = total.shape[0]
        if self.aggregate == "reference":
            return torch.logsumexp(total, 0) - math.log(K)      # log mean_k exp(L_k)
        if self.aggregate == "lgd":
            return -(torch.logsumexp(-total, 0) - math.log(K))  # -log mean_k p(y | x_k)
        return total.mean(0)

    def __call__(self, predict, z, logsnr):
        if self.scale == 0 or not self.terms:
            return predict(z, logsnr)
        a = alpha(logsnr)
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            x_hat, eps_hat = predict(z, logsnr)
            grad, = torch.autograd.grad(self.loss(x_hat.float(), a).sum(), z)  # through the denoiser
        eps_hat = eps_hat.detach() + self.scale * (1 - a).sqrt()[:, None] * grad  # eps <- eps + scale sigma grad
        return x0_from_eps(z.detach(), eps_hat, a), eps_hat


def build_guidance(spec, probes, guides, mu, s, scale, **kwargs):
    """Guidance for a spec like 'positive' or 'negative:1,news:0.5'; None for 'none'."""
    terms = []
    for name, weight in parse_guides(spec, guides):
        probe, target = guides[name]
        w, b = probes[probe]
        terms.append((w, b, target, weight))
    return Guidance(terms, mu, s, scale, **kwargs) if terms else None
