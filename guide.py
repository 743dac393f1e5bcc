"""Plug-and-play control: guidance of the prior by linear probes on the embedding space.

A probe is logistic regression on unit-norm sentence embeddings, p(y = 1 | e) = sigmoid(w.e + b)
(DGLM sec. 3.3). During denoising, with gradients on z_t (Loss-Guided Diffusion, Song et al. 2023):

    x_hat, eps_hat = denoiser(z_t)                        (differentiable in z_t)
    x_k = x_hat + r_t * eps_k,   r_t^2 = (1 - a_t) / a_t,  k = 1..K   (Monte Carlo around x_hat)
    e_k = normalize(mu + s * x_k)                         (into the probe's space)
    L   = aggregate_k  sum_j  weight_j * BCE(w_j . e_k + b_j, target_j)
    eps_hat <- eps_hat + scale * sqrt(1 - a_t) * dL/dz_t  ;  x_hat <- (z_t - sqrt(1-a_t) eps_hat) / sqrt(a_t)

Several attributes compose by summing their losses. The decoder never sees the probe.

Guidance acts on the noisy steps only, while lambda_t <= max_logsnr (sample.py's default -2:
a_t < 0.12, the noisiest 22% of t, 4 of 15 DDIM steps); the cleaner steps run the plain denoiser.
The attribute is settled while the proposal is still forming, so guiding those steps steers about
as well as guiding all of them (README, "Teaching switches") for a fraction of the backward passes.

The file reads in that order: guidance (the loss, the step), guides (names -> probes and targets),
then fitting probes (tiny corpus, the paper's data sets) and `python guide.py`, which adds probes
to a checkpoint.
"""
import copy
import json
import math
import os
import re
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import data as data_lib
from diffusion import signal_level, x0_from_eps
from encoder import DTYPES, EmbeddingCache, cache_dir_for, default_dtype
from utils import (ArgumentParser, Checkpoint, atomic_save, bounded, count, folder, nonempty, path_arg, pick_device,
                   refusal, run_cache_dir, run_cli, shell)

# ----------------------------------------------------------------------------- guidance


class Guidance:
    """callable(predict, z, logsnr) -> (x_hat, eps_hat), bent toward the requested attributes.

    terms: list of (w, b, target, weight) linear probes on unit embeddings; target is a label, a
           tensor (B,) of per-example targets, or "prefix" until bind() resolves it. Steering by
           example: (e_text, 0, "like" | "unlike", weight), the loss -cos(e, e_text) (or +cos): no probe.
    n_samples K: Monte Carlo samples around x_hat (K = 0 uses x_hat itself; the reference code uses 32).
    max_logsnr: guide the steps with lambda_t <= max_logsnr (15: every step); the others are unguided.
    aggregate, over the K draws of loss_k = sum_j weight_j * l_j(x_k) (each term's BCE or cosine, summed first):
               "reference": log mean_k exp(loss_k), as the paper's reference code aggregates one probe (it
                 aggregates each probe over the draws, then sums); its gradient weights the draws by
                 softmax_k(loss_k), the worst draws most;
               "lgd": -log mean_k exp(-loss_k), LGD-MC's likelihood average (for one probe of weight 1:
                 -log mean_k p(y | x_k)); its gradient weights the best draws most;
               "mean": mean_k loss_k, every draw alike.
    The Monte Carlo draws come from the generator of bind(), seeded per generation, so the same
    seed gives the same guided sample every time; sample.py seeds it apart from the sampler's own
    noise (sample.noise_seed), which the draws leave untouched.
    barred: words the text of this guidance is decoded without (see WORD_BARS).
    """

    def __init__(self, terms, mu, s, scale, *, n_samples, max_logsnr, aggregate="reference", barred=frozenset()):
        if aggregate not in ("reference", "lgd", "mean"):
            raise ValueError(f"unknown aggregate {aggregate!r} (accepted: reference, lgd, mean)")
        self.terms = terms
        self.mu, self.s = mu, s
        self.scale = scale
        self.n_samples = n_samples
        self.aggregate = aggregate
        self.max_logsnr = max_logsnr
        self.barred = barred  # read by the decoding (sample.DGLM.decode), not by the prior
        self.generator = None  # set by bind(); None draws from torch's global RNG

    def bind(self, e_prefix, seed):
        """This guidance for one generation: "prefix" targets become the probes' probabilities on the
        prefixes' unit embeddings e_prefix (B, d), and the Monte Carlo noise a generator seeded with seed."""
        bound = copy.copy(self)
        bound.terms = [(w, b, torch.sigmoid(e_prefix.float() @ w + b) if target == "prefix" else target, weight)
                       for w, b, target, weight in self.terms]
        bound.generator = torch.Generator().manual_seed(seed)
        return bound

    def loss(self, x_hat, a):
        """Per-example guidance loss (B,) of predicted clean latents x_hat (B, d) at signal level a (B,).

        Sample k of row b is x_kb = x_hat_b + r_b n_k, n_k ~ N(0, I); its unit embedding is
        e_kb = normalize(m_b + r_b u_k) with m = mu + s x_hat and u_k = s n_k. A probe's logit needs
        only dot products, so the K x B logits come from (B, d) x (d, K) products instead of a
        (K, B, d) tensor:
            w.e_kb = (w.m_b + r_b w.u_k) / |m_b + r_b u_k|
            |m_b + r_b u_k|^2 = |m_b|^2 + 2 r_b m_b.u_k + r_b^2 |u_k|^2
        The K draws are shared by the batch's rows (each row's estimate is still a K-sample average).
        """
        d = x_hat.shape[1]
        m = self.mu + self.s * x_hat                                                   # (B, d), not yet normalised
        r = ((1 - a) / a).sqrt()[None]                                                 # (1, B): r_t^2 = (1 - a_t) / a_t
        if self.n_samples > 0:
            u = self.s * torch.randn(self.n_samples, d, generator=self.generator).to(m)  # (K, d)
        else:
            u = torch.zeros(1, d).to(m)                                                # K = 0: x_hat itself
        norm2 = m.pow(2).sum(-1)[None] + 2 * r * (u @ m.T) + r ** 2 * u.pow(2).sum(-1)[:, None]  # (K, B)
        norm = norm2.clamp_min(1e-24).sqrt()
        total = 0.0
        for w, b, target, weight in self.terms:
            dot = ((m @ w)[None] + r * (u @ w)[:, None]) / norm                        # (K, B): w.e_kb
            if isinstance(target, str):  # "like" / "unlike": w is an example's unit embedding, dot a cosine
                total = total + weight * (-dot if target == "like" else dot)
            else:
                total = total + weight * F.binary_cross_entropy_with_logits(
                    dot + b, torch.as_tensor(target).to(dot).expand_as(dot), reduction="none")
        K = total.shape[0]
        if self.aggregate == "reference":
            return torch.logsumexp(total, 0) - math.log(K)      # log mean_k exp(L_k)
        if self.aggregate == "lgd":
            return -(torch.logsumexp(-total, 0) - math.log(K))  # -log mean_k p(y | x_k)
        return total.mean(0)

    def __call__(self, predict, z, logsnr):
        active = logsnr <= self.max_logsnr  # (B,): the noisy steps are guided, the clean ones are not
        if self.scale == 0 or not self.terms or not active.any():
            return predict(z, logsnr)
        a = signal_level(logsnr)
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            x_hat, eps_hat = predict(z, logsnr)
            with torch.autocast(z.device.type, enabled=False):                   # the probe loss in fp32
                loss = self.loss(x_hat.float(), a).sum()
            grad, = torch.autograd.grad(loss, z)                                  # through the denoiser
        step = self.scale * (1 - a).sqrt() * active                               # scale sigma_t, 0 where not guided
        eps_hat = eps_hat.detach() + step[:, None] * grad                         # eps <- eps + scale sigma grad
        return x0_from_eps(z.detach(), eps_hat, a), eps_hat


def build_guidance(spec, probes, guides, mu, s, scale, like=(), unlike=(), like_weight=1.0, ckpt="CKPT", **kwargs):
    """Guidance for a spec like 'positive' or 'negative:1,news:0.5' ('none' or 'like': no probe), plus
    the unit embeddings of example texts to steer toward (like) or away from (unlike), each at
    like_weight; None when nothing steers. ckpt: the checkpoint an unknown guide's error names.
    kwargs: Guidance's."""
    terms = [term for term in probe_terms(spec, probes, guides, ckpt=ckpt) if term[3] != 0]  # x:0 steers nothing,
    # so it is the unguided sample exactly (the guided path's x_hat, rederived, differs by its rounding in bf16)
    terms += [(e, torch.zeros(()), "like", like_weight) for e in like]
    terms += [(e, torch.zeros(()), "unlike", like_weight) for e in unlike]
    return Guidance(terms, mu, s, scale, barred=barred_words(spec, guides), **kwargs) if terms else None


def guide_probes(guide):
    """The probe names a guide (a value of TINY_GUIDES, say) reads: one, or a list of them."""
    names = guide[0]
    return names if isinstance(names, list) else [names]


def probe_terms(spec, probes, guides, outer=1.0, ckpt="CKPT"):
    """A guide spec -> [(w, b, target, weight)], one term per probe. A guide may carry a strength, which
    multiplies its weight (1 without), and other guides it holds as it steers (a spec), which come in at
    their weights relative to its own. A guide over several probes uses those there are (a corpus of two
    domains has two domain probes)."""
    terms = []
    for name, weight in parse_guides(spec, guides, ckpt):
        names, target, *extra = guides[name]
        weight *= outer * (extra[0] if extra else 1.0)
        present = [n for n in guide_probes(guides[name]) if n in probes]
        if not present:
            raise SystemExit(f"error: guide {name!r} needs the probe {names!r}, which these probes lack")
        terms += [(*probes[n], target, weight) for n in present]
        if len(extra) > 1:
            terms += probe_terms(extra[1], probes, guides, weight)
    return terms


# ----------------------------------------------------------------------------- guides

# Guide name -> (probe or list of probes, target label[, strength[, guides it holds[, words it bars]]]).
# "negative" is a sentiment probe asked for label 0 (on the tiny tier the one blind to negation, see
# train_tiny_probes).
# Target "prefix" holds an attribute where the prefix has it: each probe's target is its own probability on
# the prefix's embedding, so e.g. `positive,same-domain` changes the sentiment and keeps the kind of text
# (composition is the point of plug-and-play control). The strength multiplies a guide's weight: the tiny
# decoder leans positive, so at a scale where negative steers, a full-strength positive overshoots
# (repeated "love", "great"; README, "Why these defaults"), and its guide pulls at 0.4 of that strength.
# The tiny tier's negative guide holds the prefix's domain at a quarter of its own pull: left alone it drifts
# into the corpus's negative tweets ("sucks", hashtags) whatever the prefix, text the decoder finds unlikely
# after a review's opening; held, it stays in the prefix's register. Its strength, 0.875, is where negative
# text stays negative while its perplexity stays near unguided text's on openings it has never seen.
# A guide may also bar words from the decoded text (WORD_BARS): the tiny tier's negative guide bars negations.
TINY_GUIDES = {
    "positive": ("sentiment", 1, 0.4), "negative": ("sentiment_no_negation", 0, 0.875, "same-domain:0.25", "negation"),
    "movie": ("movie", 1), "tweet": ("tweet", 1), "product": ("product", 1), "news": ("news", 1),
    "same-domain": (["movie", "tweet", "product", "news"], "prefix"),
}
# Paper tier: probes trained on the public labelled data sets of DGLM's experiments, see train_paper_probes.
PAPER_GUIDES = {
    "positive": ("sentiment", 1), "negative": ("sentiment", 0),
    "toxic": ("toxicity", 1), "nontoxic": ("toxicity", 0),
    "world": ("world", 1), "sports": ("sports", 1), "business": ("business", 1), "scitech": ("scitech", 1),
    "same-topic": (["world", "sports", "business", "scitech"], "prefix"),
}


# Words a guide's text is decoded without, by name. MiniLM puts a sentence beside its negation ("The movie
# was bad." / "... not bad.", cosine 0.90), so no probe on its embeddings can tell which of the two a
# proposal holds, and a proposal pushed negative is decoded into negated negatives ("no problems", "no
# trouble") that read positive. Barred, the decoder says what the proposal holds without a negation (README,
# "Why these defaults"). "'t" ends "don't", "isn't", ...; their first halves are barred too, so that none
# is left half-written ("can" and "won" are words of their own and stay).
WORD_BARS = {
    "negation": frozenset("not no never nothing none nobody nor cannot n't 't ’t don doesn didn isn wasn aren weren "
                          "haven hasn hadn couldn wouldn shouldn ain mustn needn".split()),
}


def barred_words(spec, guides):
    """The words the text of a guide spec is decoded without: the bars of its guides (those at weight 0 and
    the guides a guide holds bar nothing)."""
    words = set()
    for name, weight in parse_guides(spec, guides):
        bars = guides[name][4] if len(guides[name]) > 4 else None
        if bars and weight > 0:
            if bars not in WORD_BARS:
                raise SystemExit(f"error: guide {name!r} bars the words {bars!r}, which this version does not know "
                                 f"(known: {', '.join(WORD_BARS)})")
            words |= WORD_BARS[bars]
    return frozenset(words)


def guide_names(spec):
    """The guides a spec names, weights left out: 'negative:1,news:0.5' -> ['negative', 'news']."""
    return [part.partition(":")[0].strip() for part in re.split(r"[,+]", spec or "") if part.strip()]


def parse_guides(spec, available, ckpt="CKPT"):
    """'positive,tweet:0.5' (or 'positive+tweet:0.5') -> [(guide name, weight)]; 'none', 'like' or '' -> []
    ('like' stands for the --like / --unlike examples alone, which are not probes). ckpt: the checkpoint
    an unknown guide's error names."""
    if spec in (None, "", "none"):
        return []
    parsed, parts = [], re.split(r"[,+]", spec)
    for part in parts:
        name, colon, weight = part.strip().partition(":")
        if name == "like":
            if colon:  # it was ignored, a word as much as a number
                raise SystemExit(f"error: guide {spec!r}: like takes no weight; --like-weight sets the pull of each "
                                 "--like / --unlike example")
            continue
        if name == "none" and colon:
            raise SystemExit(f"error: guide {spec!r}: none (no guidance) takes no weight")
        if name == "none" and len(parts) > 1:  # evaluate.py --guides none,positive is two rows
            raise SystemExit(f"error: guide {spec!r}: none (no guidance) stands alone; the guides of a list steer "
                             "together (evaluate.py --guides gives one row each)")
        if not name:
            raise SystemExit(f"error: empty guide name in {spec!r} (use name[:weight], joined by ',' or '+')")
        if name not in available:
            paper = "" if name not in PAPER_GUIDES else (
                f"; {name!r} is one of the paper tier's guides: `python guide.py --ckpt {shell(ckpt)} --probes paper` "
                "adds them (their data sets come from the hub, or --probe-data DIR)")
            raise SystemExit(f"error: unknown guide {name!r} (available: {', '.join(sorted(available))}, none{paper})")
        try:
            if "_" in weight:  # float() reads '1_0' as 10
                raise ValueError(weight)
            value = float(weight) if colon else 1.0  # 'positive:' names no weight: an error, not 1
        except ValueError:
            plus = "; '+' joins guides, so write 1e2, not 1e+2" if weight.lower().endswith("e") else ""
            raise SystemExit(f"error: guide weight {weight!r} in {part!r} is not a number (use name:weight{plus})") \
                from None
        if not 0 <= value <= 1e4:  # also refuses nan and inf, which would turn every step's noise into nan
            raise SystemExit(f"error: guide weight {weight!r} in {part!r} is out of range (accepted: [0, 10000]; "
                             "to steer the other way, use the opposite guide)")
        parsed.append((name, value))
    return parsed


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


# A text is negated by putting "not" after its first auxiliary verb ("The plot was thin." -> "The plot was
# not thin."); texts that already hold a negation are left out.
AUXILIARY = re.compile(r"\b(is|was|are|were|do|does|did|can|will|would|could|should)\b", re.I)
NEGATION = re.compile(r"n't\b|\b(not|no|never|nothing|none|nobody|nor|cannot)\b", re.I)


def negation_direction(texts, encode, n=2000):
    """The encoder's direction of negation: the mean change of a text's embedding when it is negated, over
    up to n of `texts`, as a unit vector; None if no text can be negated by the rule above.
    encode: list of texts -> (N, d) embeddings."""
    plain = [t for t in texts if AUXILIARY.search(t) and not NEGATION.search(t)][:n]
    if not plain:
        return None
    negated = [AUXILIARY.sub(lambda m: m.group(0) + " not", t, count=1) for t in plain]
    d = (torch.as_tensor(encode(negated)) - torch.as_tensor(encode(plain))).float().mean(0)
    return d / d.norm()


def probe_without(e, y, sample_weight, d):
    """A probe (train_probe) fitted on the embeddings e with the unit direction d projected out: it can
    neither read nor push along d."""
    e = e.float()
    return train_probe(e - (e @ d)[:, None] * d, y, sample_weight)


SENTIMENT_MARGIN = 0.5  # tiny corpus: rating > +0.5 is positive, < -0.5 negative, between is left out
def train_tiny_probes(train_e, train_rows, test_e, test_rows, encode):
    """Sentiment (balanced within each domain) and one-vs-rest domain probes for the tiny corpus.

    Returns {name: (w, b)} and {name: held-out accuracy}. The sentiment probe's classes are weighted
    so that each domain holds as much positive as negative mass: it cannot score by naming a domain.

    MiniLM puts a sentence and its negation close together ("The movie was bad." / "... not bad.", cosine
    0.90), and the corpus's negative sentences hold more negations, so the sentiment direction also points
    along negation (cosine about -0.4): pushed negative, a proposal gains "no" and "not", and the decoder
    writes negated negatives ("no problems") that read positive. `sentiment_no_negation` is the sentiment
    probe fitted on the embeddings with the negation direction projected out (encode: texts -> embeddings,
    to embed negated copies), so it cannot push along it, rescaled to the whole probe's norm so that a
    guide's scale means the same push; the `negative` guide steers with it (README, "Why these
    defaults"). `positive` keeps the whole probe: pushed positive, a proposal loses negations, which does
    no harm, and without that part it steered about a point less (README).
    """
    probes, report = {}, {}

    def sentiment_set(e, rows):
        keep = [i for i, r in enumerate(rows) if abs(r["rating"]) > SENTIMENT_MARGIN]
        y = torch.tensor([float(rows[i]["rating"] > 0) for i in keep])
        return e[keep], y, [rows[i]["domain"] for i in keep]

    e, y, domains = sentiment_set(train_e, train_rows)
    weights = balanced_weights(y, domains)
    probes["sentiment"] = train_probe(e, y, weights)
    te, ty, _ = sentiment_set(test_e, test_rows)
    report["sentiment"] = accuracy(*probes["sentiment"], te, ty)
    w, b = probes["sentiment"]
    d = negation_direction([r["continuation"] for r in train_rows], encode)
    if d is None:
        print("note: no training text to negate (no English auxiliary verb); sentiment_no_negation is the whole "
              "sentiment probe")
        probes["sentiment_no_negation"] = w.clone(), b.clone()
    else:
        w_n, b_n = probe_without(e, y, weights, d)
        k = w.norm() / w_n.norm()
        probes["sentiment_no_negation"] = w_n * k, b_n * k  # the same decision boundary, the whole probe's norm
    report["sentiment_no_negation"] = accuracy(*probes["sentiment_no_negation"], te, ty)
    for domain in sorted({r["domain"] for r in train_rows}):
        y = torch.tensor([float(r["domain"] == domain) for r in train_rows])
        probes[domain] = train_probe(train_e, y, balanced_weights(y, [0] * len(y)))
        ty = torch.tensor([float(r["domain"] == domain) for r in test_rows])
        report[domain] = accuracy(*probes[domain], test_e, ty)
    return probes, report


def refit_tiny_probes(config, cache, cache_dir):
    """guide.py --probes tiny: the probes train.py fitted for a run on the tiny corpus (or a file in its format:
    a text, a rating and a domain a row), fitted again on the run's own split and cached embeddings, so that an
    edit of train_tiny_probes or TINY_GUIDES reaches a trained run in seconds. -> (probes, report)"""
    run = config["train"]
    data = run["data"]
    if data == "c4":
        raise SystemExit("error: --probes tiny fits on the tiny corpus's ratings and domains, which C4 has not; "
                         "use --probes paper, or --labels FILE")
    if run.get("data_sha256") and os.path.isfile(data) and data_lib.sha256_of(data) != run["data_sha256"]:
        raise SystemExit(f"error: {data} has changed since the run trained on it, so its split would not be the "
                         "run's; restore it, or fit probes of your labels with --labels FILE")
    train, held_out = data_lib.make_examples(data_lib.load_corpus(data, cache_dir), run["seed"], run["max_prefix_frac"])
    if not (data_lib.tiny_format(train) and data_lib.tiny_format(held_out)):
        raise SystemExit(f"error: --probes tiny fits on the tiny corpus's ratings and domains; {data} has no rating "
                         "and domain in every row: fit probes of your labels with --labels FILE, or the paper's with "
                         "--probes paper")

    def continuations(examples):
        return torch.from_numpy(cache.encode([ex["continuation"] for ex in examples]))

    return train_tiny_probes(continuations(train), train, continuations(held_out), held_out,
                             lambda texts: cache.encode(texts, show_progress=False))


def save_probes(path, probes, guides, encoder_name):
    tensors = {}
    for name, (w, b) in probes.items():
        tensors[f"{name}.weight"], tensors[f"{name}.bias"] = w.contiguous(), b.reshape(1)
    atomic_save(tensors, path, {"encoder": encoder_name, "guides": json.dumps(guides)})


def load_probes(path, encoder_name=None, device="cpu"):
    """-> ({probe name: (w, b)} on `device`, {guide name: (probe name, target[, ...])}: guide_probes reads
    a guide's entry)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path), device=str(device))
    except (OSError, Exception) as err:  # safetensors raises its own error type for corrupt files
        raise SystemExit(f"error: cannot read probes {path} ({err}); restore it, or replace it: `python guide.py "
                         f"--ckpt {shell(Path(path).parent)}` with its tier's own (--labels FILE: probes of your "
                         "own)") from None
    if encoder_name is not None and meta.get("encoder") != encoder_name:
        raise SystemExit(f"error: probes in {path} were trained for encoder {meta.get('encoder')!r}, "
                         f"but the checkpoint uses {encoder_name!r}")
    names = {k.rsplit(".", 1)[0] for k in tensors}
    probes = {n: (tensors[f"{n}.weight"], tensors[f"{n}.bias"][0]) for n in names}
    guides = {g: tuple(v) for g, v in json.loads(meta.get("guides", "{}")).items()}
    return probes, guides


def guides_on_disk(path, encoder_name):
    """The guides of the probes file `path` for this encoder: {} where there is none, or it is unreadable
    or another encoder's (merge_probes replaces those, and says so)."""
    try:
        return load_probes(path, encoder_name)[1] if path.exists() else {}
    except SystemExit:
        return {}


def readers(guides, probe_names, exclude=()):
    """{guide: the probes of probe_names it reads} for the guides not in exclude: the guides that a new
    probe of one of those names would silently turn toward something else."""
    read = {g: sorted(set(guide_probes(v)) & set(probe_names)) for g, v in guides.items() if g not in exclude}
    return {g: names for g, names in read.items() if names}


def merge_probes(path, probes, guides, encoder_name):
    """Write probes and guides into `path`, keeping those already there for the same encoder
    (a probe or guide of the same name is replaced)."""
    old_probes, old_guides = {}, {}
    if os.path.exists(path):
        try:
            old_probes, old_guides = load_probes(path, encoder_name)
        except SystemExit as err:  # another encoder's or an unreadable file: nothing worth keeping
            print(f"note: replacing {path}: {str(err).removeprefix('error: ')}")
    changed = sorted(g for g in guides if g in old_guides and list(old_guides[g]) != json.loads(json.dumps(guides[g])))
    if changed:  # e.g. the paper's probes over a tiny checkpoint's: its positive and negative steer differently now
        print(f"note: {path}: " + (f"the guide {changed[0]} is replaced by the new one of that name"
                                   if len(changed) == 1 else
                                   f"the guides {', '.join(changed)} are replaced by the new ones of those names"))
    save_probes(path, {**old_probes, **probes}, {**old_guides, **guides}, encoder_name)


# ----------------------------------------------------------------------------- paper-tier probes


def balanced_accuracy(w, b, e, y):
    """Mean of the per-class accuracies: 0.5 is chance however unequal the classes are."""
    right = (e.float() @ w + b > 0).float() == y.float()
    return 0.5 * (right[y == 1].float().mean() + right[y == 0].float().mean()).item()


MIN_FITTED = 5  # examples of each class a paper probe is fitted on, at the least (20k of each by default)


def train_paper_probes(cache, max_per_class=20_000, data_dir=None, show_progress=True, flag="--max-per-class"):
    """The paper tier's probes on embeddings from `cache` (an encoder.EmbeddingCache); `flag`: the caller's
    name for max_per_class (train.py's is --probe-examples), for its errors.

      sentiment   SST-2 + Amazon polarity, each (data set, label) cell weighted equally
      toxicity    Civil Comments, toxic when the toxicity score > 0.5, classes weighted equally
      world, sports, business, scitech   AG News, one topic against the other three

    Returns ({probe: (w, b)}, {probe: held-out balanced accuracy}); see PAPER_GUIDES for the guides.
    """
    unreachable = []  # each data set opened first: one line names every one that cannot be had, not the first
    for source in data_lib.PROBE_SOURCES:
        try:
            data_lib.open_probe_source(source, data_dir)
        except SystemExit as err:
            unreachable.append((source, str(err)))
    if unreachable:
        first = unreachable[0][1]
        rest = [source for source, why in unreachable[1:] if why != first]
        raise SystemExit(first + (f" (likewise {', '.join(rest)}: DIR/<name>.jsonl each)" if rest else ""))
    sentiment = [(row, source) for source in ("sst2", "amazon_polarity")
                 for row in data_lib.read_labelled(source, max_per_class, data_dir)]
    toxicity = data_lib.read_labelled("civil_comments", max_per_class, data_dir)
    news = data_lib.read_labelled("ag_news", max_per_class, data_dir)
    tasks = [("sentiment", [row for row, _ in sentiment], [row[1] for row, _ in sentiment], [s for _, s in sentiment]),
             ("toxicity", toxicity, [row[1] for row in toxicity], [0] * len(toxicity))]
    tasks += [(topic, news, [float(row[1] == k) for row in news], [0] * len(news))
              for k, topic in enumerate(data_lib.AG_NEWS_TOPICS)]
    for name, rows, y, _ in tasks:  # before any encoding: a probe fitted on nothing would be all zeros
        fitted = [sum(1 for (_, _, h), label in zip(rows, y) if label == c and not h) for c in (0, 1)]
        if min(fitted) < MIN_FITTED:
            raise SystemExit(f"error: the {name} probe would be fitted on {fitted[0]} / {fitted[1]} examples of its "
                             f"two classes (after the held-out ones); it needs {MIN_FITTED} of each: more data, or "
                             f"a larger {flag}")
    probes, report = {}, {}
    for name, rows, y, groups in tasks:
        e = torch.from_numpy(cache.encode([text for text, _, _ in rows], show_progress=show_progress))
        y = torch.tensor(y, dtype=torch.float32)
        held = torch.tensor([h for _, _, h in rows])
        train_groups = [g for g, h in zip(groups, held.tolist()) if not h]
        probes[name] = train_probe(e[~held], y[~held], balanced_weights(y[~held], train_groups))
        report[name] = balanced_accuracy(*probes[name], e[held], y[held])
    return probes, report


# ----------------------------------------------------------------------------- probes for a user's labels

MIN_PER_LABEL = 10       # different texts of each label a probe needs (every 5th is held out to measure it)
LABEL_HELD_OUT_EVERY = 5
RESERVED_GUIDES = {"none", "like"}


def held_out(texts, labels):
    """Which rows of a labelled file measure its probe: every 5th different text of each label, with
    every copy of it. A copy on the training side would let the probe be scored on what it was fitted
    to, and labels the text does not show at all could score near 1."""
    seen, held = dict.fromkeys(labels, 0), {}
    for text, label in zip(texts, labels):
        if (text, label) not in held:
            held[text, label] = seen[label] % LABEL_HELD_OUT_EVERY == 0
            seen[label] += 1
    return torch.tensor([held[row] for row in zip(texts, labels)])


def train_label_probes(e, texts, labels, name):
    """Probes for a labelled file: e (N, d) unit embeddings of texts (N,), labels (N,) strings.

    Two labels: one probe `name` (the second label, sorted, is class 1) and a guide for each label.
    More: a one-vs-rest probe `name-LABEL` and a guide per label. Classes are weighted to equal mass;
    the rows of held_out() measure it. -> (probes, guides, held-out accuracy, chance)."""
    names = sorted(set(labels))
    held = held_out(texts, labels)
    probes, guides, logits = {}, {}, []
    for k, label in enumerate(names if len(names) > 2 else names[1:]):
        y = torch.tensor([float(l == label) for l in labels])
        probe = name if len(names) == 2 else f"{name}-{label}"
        probes[probe] = train_probe(e[~held], y[~held], balanced_weights(y[~held], [0] * int((~held).sum())))
        logits.append(e[held].float() @ probes[probe][0] + probes[probe][1])
        guides[label] = (probe, 1)
    if len(names) == 2:
        guides[names[0]] = (name, 0)
        predicted = [names[int(v > 0)] for v in logits[0].tolist()]
    else:
        predicted = [names[i] for i in torch.stack(logits, 1).argmax(1).tolist()]
    truth = [l for l, h in zip(labels, held.tolist()) if h]
    recall = [sum(p == t == label for p, t in zip(predicted, truth)) / truth.count(label) for label in names]
    return probes, guides, sum(recall) / len(names), 1 / len(names)


def add_label_probes(args, encoder_name, cache):
    """guide.py --labels FILE: probes for the file's labels, merged into the checkpoint's probes."""
    rows = data_lib.read_labels(args.labels, args.text_column, args.label_column)
    labels = [label for _, label in rows]
    counts = dict(sorted(Counter(labels).items()))  # rows of each label, in label order
    distinct = set(rows)  # a row repeated is one text of its label (held_out keeps its copies together)
    different = Counter(label for _, label in distinct)
    if len(counts) < 2:
        raise SystemExit(f"error: {args.labels} has a single label ({next(iter(counts))!r}); a probe needs two or more")
    few = {label: different[label] for label in counts if different[label] < MIN_PER_LABEL}  # sorted, not set order
    if few:
        shown = ", ".join(f"{n} of {label!r}" for label, n in list(few.items())[:5])
        more = f" and {len(few) - 5} more labels" if len(few) > 5 else ""
        hint = f"; is {args.label_column!r} the column of labels?" if len(counts) * MIN_PER_LABEL > len(rows) else ""
        raise SystemExit(f"error: every label needs at least {MIN_PER_LABEL} different texts; {args.labels} has "
                         f"{shown}{more}{hint}")
    bad = [label for label in counts if re.search(r"[\s,+:]", label) or label in RESERVED_GUIDES]
    if bad:
        raise SystemExit(f"error: label {bad[0]!r} cannot name a guide (no spaces, ',', '+' or ':'; not "
                         f"{' or '.join(sorted(RESERVED_GUIDES))})")
    path = Path(args.ckpt) / "probes.safetensors"
    existing = guides_on_disk(path, encoder_name)
    taken = sorted(set(counts) & set(existing))
    if taken and not args.overwrite:
        raise SystemExit(f"error: {path} already has {'a guide' if len(taken) == 1 else 'guides'} named "
                         f"{', '.join(map(repr, taken))}; pass --overwrite to replace "
                         f"{'it' if len(taken) == 1 else 'them'}, or rename the label")
    name = args.name or re.sub(r"\W+", "-", Path(args.labels).stem)
    new_probes = {name} if len(counts) == 2 else {f"{name}-{label}" for label in counts}
    relying = readers(existing, new_probes, exclude=counts)
    if relying:  # replacing the probe would silently change what those guides steer toward
        clash = sorted(set().union(*relying.values()))
        raise SystemExit(f"error: {path} already has a probe named {', '.join(map(repr, clash))}, which the guide(s) "
                         f"{', '.join(sorted(relying))} use; name the new probe with --name")
    texts = [text for text, _ in rows]
    e = torch.from_numpy(cache.encode(texts))
    probes, guides, accuracy_, chance = train_label_probes(e, texts, labels, name)
    merge_probes(path, probes, guides, encoder_name)
    copies = len(rows) - len(distinct)
    copies = f" ({copies} copies of earlier rows, each on its row's side of the held-out split)" if copies else ""
    print(f"{len(rows)} examples{copies}, labels " + ", ".join(f"{label} {n}" for label, n in counts.items()))
    print(f"held-out balanced accuracy {accuracy_:.3f} (chance {chance:.3f}); probes {', '.join(probes)} "
          f"saved to {path}; guides: {', '.join(guides)}")
    held = {g: set(guide_names(v[3])) & set(taken) for g, v in existing.items() if g not in guides and len(v) > 3}
    holding = {g: names for g, names in held.items() if names}
    if holding:  # e.g. the tiny tier's negative holds same-domain as it steers
        replaced = sorted(set().union(*holding.values()))
        print(f"note: the guide(s) {', '.join(sorted(holding))} hold {', '.join(replaced)}, which now steer"
              f"{'s' if len(replaced) == 1 else ''} as your labels do")
    dashed = sorted(g for g in guides if g.startswith("-"))
    if dashed:  # argparse reads `--guide -x` as a flag without its value
        print(f"note: give a guide that starts with '-' after '=': sample.py --guide={dashed[0]}")
    if accuracy_ < chance + 0.1:  # the probe reads little of the labels from the embeddings: its gradient is mostly noise
        print(f"warning: the probe is {'no' if accuracy_ <= chance else 'barely'} better than chance on its held-out "
              "examples, so its guides will steer little or at random; more examples, or labels the text itself "
              "shows, help", file=sys.stderr)
    return accuracy_


# ----------------------------------------------------------------------------- command line


def main(argv=None):
    p = ArgumentParser(description="Train probes for an existing checkpoint and add them to its "
                                   "probes.safetensors (probes already there for its encoder are kept).")
    p.add_argument("--ckpt", type=path_arg, default="out", help="checkpoint directory (its config names the encoder)")
    p.add_argument("--labels", type=nonempty("your labelled .csv, .tsv or .jsonl"), default=None, help="your labelled .csv, .tsv or .jsonl: a probe and a guide per label")
    p.add_argument("--text-column", default="text", help="--labels: the column (or JSON field) of the texts")
    p.add_argument("--label-column", default="label", help="--labels: the column (or JSON field) of the labels")
    p.add_argument("--name", default=None, help="--labels: the probe's name (default: the file's name)")
    p.add_argument("--overwrite", action="store_true", help="--labels: replace guides of the same names")
    p.add_argument("--probes", default=None, choices=["tiny", "paper"],
                   help="without --labels, the tier's probes (default: the run's tier, paper with --max-per-class or "
                        "--probe-data): tiny fits train.py's again on the run's corpus and cached embeddings (after an "
                        "edit of guide.py, say); paper: sentiment (SST-2, Amazon polarity), toxicity (Civil Comments), "
                        "AG News topics")
    p.add_argument("--max-per-class", type=count, default=None,
                   help="paper probes: examples per class and data set (default 20k)")
    p.add_argument("--probe-data", type=folder, default=None, help="local copies: sst2.jsonl, amazon_polarity.jsonl, "
                   "civil_comments.jsonl, ag_news.jsonl (the hub's field names); the others are streamed")
    p.add_argument("--cache-dir", type=folder, default=None,
                   help="where the embedding cache lives (default: the checkpoint's run's --cache-dir, else cache)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to encode")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="encoder precision (default: bf16 where the device computes it natively, else fp32)")
    p.add_argument("--batch-size", type=bounded(int, 1, 65536), default=128, help="texts per encoder forward pass")
    args = p.parse_args(argv)
    if args.name is not None and not re.sub(r"\W+", "", args.name):  # "" fell back to the file's name
        p.error(f"argument --name: {args.name!r} names no probe (give it letters or digits)")
    flags = lambda names: [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) is not None]
    tiers, paper = flags(("probes", "max_per_class", "probe_data")), flags(("max_per_class", "probe_data"))
    if args.labels and tiers:  # each would be ignored
        p.error(f"{', '.join(tiers)} {'is' if len(tiers) == 1 else 'are'} for the tier's probes, a run of their "
                "own; --labels trains probes of your file alone")
    if args.probes == "tiny" and paper:
        p.error(f"{' and '.join(paper)} {'is' if len(paper) == 1 else 'are'} for --probes paper; --probes tiny fits "
                "on the run's own corpus")
    mine = [f"--{flag.replace('_', '-')}" for flag in ("text_column", "label_column", "name", "overwrite")
            if getattr(args, flag) != p.get_default(flag)]
    if mine and not args.labels:
        p.error(f"{', '.join(mine)} {'is' if len(mine) == 1 else 'are'} for --labels FILE")
    config = Checkpoint(args.ckpt).config  # a missing or unreadable checkpoint: one line
    if why := refusal(args.ckpt):  # the probes are saved beside the checkpoint at the end: said before the work
        raise SystemExit(f"error: cannot write probes into {args.ckpt} ({why}); copy the checkpoint folder "
                         "somewhere writable and pass that --ckpt")
    encoder_name, device = config["encoder"], pick_device(args.device)
    tier = args.probes or ("paper" if paper else config.get("train", {}).get("tier", "paper"))  # the run's tier
    cache = EmbeddingCache(cache_dir_for(args.cache_dir or run_cache_dir(config), encoder_name), encoder_name, device,
                           args.batch_size, args.dtype or default_dtype(device))
    if args.labels:
        return add_label_probes(args, encoder_name, cache)
    path = Path(args.ckpt) / "probes.safetensors"
    guides, on_disk = TINY_GUIDES if tier == "tiny" else PAPER_GUIDES, guides_on_disk(path, encoder_name)
    relying = readers(on_disk, set().union(*map(guide_probes, guides.values())), exclude=guides)
    if relying:  # replacing the probe would silently change what those guides steer toward
        raise SystemExit(f"error: the guide(s) {', '.join(sorted(relying))} of {path} read a probe named "
                         f"{', '.join(map(repr, sorted(set().union(*relying.values()))))}, which the {tier} probes "
                         f"would replace; train yours again under another --name first, or add the {tier} probes to "
                         "a copy of the checkpoint")
    if tier == "tiny":
        probes, report = refit_tiny_probes(config, cache, args.cache_dir or run_cache_dir(config))
    else:
        probes, report = train_paper_probes(cache, args.max_per_class or count("20k"), args.probe_data)
    kept = sorted(set(on_disk) - set(guides))  # a user's, say: merge_probes keeps them
    merge_probes(path, probes, guides, encoder_name)
    print(("held-out accuracy: " if tier == "tiny" else "held-out balanced accuracy (chance 0.5): ")
          + ", ".join(f"{k} {v:.3f}" for k, v in report.items()))
    print(f"probes saved to {path}; guides: {', '.join(guides)}" + (f"; kept: {', '.join(kept)}" if kept else ""))
    weak = [name for name, accuracy_ in report.items() if accuracy_ < 0.6]
    if weak:
        print(f"warning: the probe(s) {', '.join(weak)} are barely better than chance or worse on their held-out "
              "examples, so their guides will steer little or at random; more examples help"
              + (" (--max-per-class)" if tier == "paper" else ""), file=sys.stderr)
    return report


if __name__ == "__main__":
    run_cli(main)
