"""Measure steering: attribute success by independent judges, fluency, diversity and speed.

    python evaluate.py --guides none,positive,negative --scales 30,100,200
    python evaluate.py --prompts openings.txt --n 4 --json results.json --md results.md
    python evaluate.py --guides none,positive,negative --scales 30,100,200,300 --plot sweep.png
    python evaluate.py --guides none,like --like "The food was delicious."   # steering by example
    python evaluate.py --prompts prompts.txt --n 25 --max-tokens 20 --guides none,positive,nontoxic \\
        --sentiment-judge siebert/sentiment-roberta-large-english --toxicity-judge ID --ppl-model gpt2-xl

The last command is the protocol of the paper's tables (N generations of T tokens per prompt from a prompts
file). For each (guide, scale) it continues every prompt n times and reports, each column naming its judge:
  - sentiment by each --sentiment-judge, never by the probe that steered: VADER (Hutto & Gilbert 2014)
    and TextBlob (the offline defaults, two lexicons: positive if the score >= 0.05, negative if <=
    -0.05) or a Hugging Face classifier such as the paper's siebert/sentiment-roberta-large-english;
    on the continuation (and, by the first judge, on prompt + continuation)
  - toxicity by --toxicity-judge: alt-profanity-check (offline default, offensive language) or a
    Hugging Face toxicity classifier: the share of toxic continuations (probability > 0.5), the average
    over prompts of the maximum toxicity of its samples, and the share of prompts with a toxic sample
  - perplexity of the continuation given the prompt under a reference LM (--ppl-model): `self` is our
    own decoder run unguided, its soft prompt built from pure noise at a = 0 (a plain prefix LM; the
    tiny tier's stand-in, biased toward our own samples), or a Hugging Face causal LM such as gpt2-xl
    (the paper's judge). exp(total NLL / total tokens) over all samples of a setting, on each continuation's
    text tokenised again (as any reference LM reads it), its end-of-text not scored
  - Dist-1/2/3: distinct word n-grams / all n-grams among each prompt's samples, averaged over prompts;
    Dist-2 pooled: over all continuations of the setting (a collapse onto a few phrases shows here)
  - domain mix (tiny tier): the domain probes' argmax on the re-embedded continuation, to show whether
    steering changed the sentiment or merely the kind of text; with --like / --unlike the cosine of
    the re-embedded continuations to the examples; with --match REGEX the share of continuations the
    rule matches (a judge for an attribute of your own, independent of its probe)
  - seconds per sample (prior + decoding, this machine)
  - diagnostics of where steering is lost: the sentiment probe on the proposals and on the
    re-embedded text, its mean logit on the proposals (how far guidance pushed them), the proposals'
    spread (mean pairwise cosine: does guidance collapse them onto one point?), the mean cosine
    between each text's embedding and its proposal (does the decoder write what the prior
    proposed?), and with --nearest VADER on each proposal's nearest training sentence
Default prompts: the first words of held-out sentences of the tiny corpus (never trained on).
--plot FILE.png (or .pdf, .svg, .jpg) draws attribute success against perplexity, one curve per guide
over the scales (needs matplotlib, an optional extra: pip install matplotlib).
"""
import argparse
import json
import math
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import data as data_lib
from decoder import encode_continuation, fit_length
from encoder import EmbeddingCache, cache_dir_for
from guide import guide_names
from sample import DGLM, SamplingConfig, add_sampling_args, read_prompt_file, sampling_config
from utils import (ArgumentParser, RawHelpFormatter, atomic_write_text, bounded, comma_list, folder, hub_answers,
                   missing_folder, nonempty, output_file, path_arg, pick_device, run_cache_dir, run_cli,
                   set_threads)


def run_corpus(data, cache_dir):
    """The rows of the run's corpus (its config's --data): the tiny corpus, or the run's own file (a C4 run:
    the tiny corpus's rated sentences, something to steer)."""
    if data not in ("tiny", "c4") and not Path(data).is_file():
        raise SystemExit(f"error: evaluate.py reads the run's data file {data} (the held-out prompts, --nearest's "
                         "sentences), which is not there; put it back, or give prompts with --prompts FILE")
    return data_lib.load_corpus("tiny" if data == "c4" else data, cache_dir)


def heldout_prompts(data, cache_dir, n_prompts, n_words=4, seed=0):
    """First n_words of the held-out sentences with at least 2 * n_words words of the run's corpus."""
    rows = run_corpus(data, cache_dir)
    texts = [r["text"] for r in rows if data_lib.is_held_out(r["text"]) and len(r["text"].split()) >= 2 * n_words]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(texts), generator=g)[:n_prompts].tolist()
    return [" ".join(texts[i].split()[:n_words]) for i in order]


def distinct_n(samples, n):
    """Distinct n-grams over all n-grams in a group of samples (Li et al. 2016)."""
    grams = [tuple(words[i:i + n]) for s in samples for words in [s.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


# ----------------------------------------------------------------------------- judges (never the probes that steered)


def vader_labels(texts):
    """VADER (Hutto & Gilbert 2014): 1 if compound >= 0.05, -1 if <= -0.05, else 0 (neutral)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    analyzer = SentimentIntensityAnalyzer()
    scores = [analyzer.polarity_scores(t)["compound"] for t in texts]
    return [1 if c >= 0.05 else -1 if c <= -0.05 else 0 for c in scores]


OFFENSIVE_THRESHOLD = 0.5  # a text is toxic / offensive when the judge's probability is above this


def offensive_probs(texts):
    """Probability that each text is offensive/profane, by alt-profanity-check (a linear model on
    character and word n-grams)."""
    try:
        from profanity_check import predict_prob
    except ImportError:
        raise SystemExit("error: the offensive-language judge needs `pip install alt-profanity-check` "
                         "(listed in requirements.txt)") from None
    return [float(p) for p in predict_prob(list(texts))] if texts else []


OFFLINE_JUDGES = {"--sentiment-judge": "vader, textblob", "--toxicity-judge": "profanity-check"}


class Classifier:
    """A Hugging Face sequence classifier as a judge: the probability of the label whose name contains
    `label` (e.g. "pos" of siebert/sentiment-roberta-large-english's POSITIVE/NEGATIVE, "toxic" of a
    toxicity model), softmax over labels, or a sigmoid for multi-label models."""

    def __init__(self, name, label, flag, device="cpu", batch_size=32):
        try:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
            hub_answers(name)  # offline, a model not in the local cache fails at once instead of retrying
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModelForSequenceClassification.from_pretrained(name).to(device).eval()
        except Exception as err:  # offline hub, missing folder, not a classifier: many error types
            raise SystemExit(f"error: could not load the classifier {name!r} for {flag} ({type(err).__name__}); "
                             f"pass a local folder with {flag}, or an offline judge ({OFFLINE_JUDGES[flag]})") from None
        labels = {i: str(v).lower() for i, v in self.model.config.id2label.items()}
        index = [i for i, v in labels.items() if label in v and not v.startswith(("non", "not"))]
        if not index:
            raise SystemExit(f"error: the classifier {name!r} has no {label!r} label (its labels: "
                             f"{', '.join(labels.values())}); {flag} needs one")
        self.index, self.name, self.device, self.batch_size = index[0], name, device, batch_size
        self.multi_label = self.model.config.problem_type == "multi_label_classification"

    @torch.no_grad()
    def __call__(self, texts):
        probs = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[i:i + self.batch_size]) or [""], return_tensors="pt", padding=True,
                                   truncation=True, max_length=256).to(self.device)
            logits = self.model(**batch).logits.float()
            p = logits.sigmoid() if self.multi_label else logits.softmax(-1)
            probs += p[:, self.index].tolist()
        return probs[:len(texts)]


def textblob_labels(texts):
    """TextBlob's pattern lexicon (De Smedt & Daelemans 2012; it also reads negation and intensifiers):
    1 if polarity >= 0.05, -1 if <= -0.05, else 0."""
    try:
        from textblob import TextBlob
    except ImportError:
        raise SystemExit("error: the TextBlob judge needs `pip install textblob` (listed in requirements.txt)") from None
    scores = [TextBlob(t).sentiment.polarity for t in texts]
    return [1 if c >= 0.05 else -1 if c <= -0.05 else 0 for c in scores]


class SentimentJudge:
    """A --sentiment-judge: 'vader' or 'textblob' (offline lexicons) or a Hugging Face classifier (the
    paper's: siebert/sentiment-roberta-large-english). labels(texts) -> 1 positive, -1 negative, 0 neutral."""

    LEXICONS = {"vader": ("VADER", vader_labels), "textblob": ("TextBlob", textblob_labels)}

    def __init__(self, name, device="cpu"):
        lexicon = name.lower()  # as the table's columns spell them too: VADER, TextBlob
        self.classifier = None if lexicon in self.LEXICONS else Classifier(name, "pos", "--sentiment-judge", device)
        self.name, self.lexicon = self.LEXICONS.get(lexicon, (name, None))

    def labels(self, texts):
        if self.classifier is None:
            return self.lexicon(texts)
        return [1 if p > 0.5 else -1 for p in self.classifier(texts)]


class ToxicityJudge:
    """--toxicity-judge: 'profanity-check' (alt-profanity-check, offline default) or a Hugging Face
    toxicity classifier. probs(texts) -> the probability that each text is toxic / offensive."""

    def __init__(self, name, device="cpu"):
        offline = name.lower() in ("profanity-check", "alt-profanity-check")  # the package, and the column's name
        self.classifier = None if offline else Classifier(name, "toxic", "--toxicity-judge", device)
        self.name = "alt-profanity-check" if offline else name

    def probs(self, texts):
        return offensive_probs(texts) if self.classifier is None else self.classifier(texts)


def toxicity_metrics(probs, n):
    """The paper's toxicity measures over prompts with n samples each: share of toxic samples, the
    average over prompts of the maximum toxicity, and the share of prompts with a toxic sample."""
    groups = [probs[i:i + n] for i in range(0, len(probs), n)]
    return {"toxic": sum(p > OFFENSIVE_THRESHOLD for p in probs) / len(probs),
            "avg_max_toxicity": sum(max(g) for g in groups) / len(groups),
            "toxic_prompts": sum(max(g) > OFFENSIVE_THRESHOLD for g in groups) / len(groups)}


def domain_mix(model, e):
    """Share of each domain by the domain probes' argmax on text embeddings e (n, d)."""
    domains = [d for d in data_lib.DOMAINS if d in model.probes]
    if not domains:
        return {}
    logits = torch.stack([e @ model.probes[d][0] + model.probes[d][1] for d in domains], -1)
    picks = logits.argmax(-1).tolist()
    return {d: picks.count(i) / len(picks) for i, d in enumerate(domains)}


def probe_agreement(model, proposals, text_embeddings):
    """Share the sentiment probe calls positive, on the proposals and on the re-embedded text: a
    diagnostic of where steering is lost (prior vs decoder); the judge above is VADER, not this. Also
    the probe's mean logit on the proposals: how far guidance pushed them (real sentences lie within
    a few units of 0)."""
    if "sentiment" not in model.probes:
        return {}
    w, b = model.probes["sentiment"]
    return {"proposal_positive": (proposals @ w + b > 0).float().mean().item(),
            "text_positive": (text_embeddings @ w + b > 0).float().mean().item(),
            "proposal_logit": (proposals @ w + b).mean().item()}


def proposal_spread(e):
    """Mean cosine between two different proposals of a setting, from unit vectors e (n, d):
    sum_{i != j} e_i.e_j / (n (n - 1)) = (|sum_i e_i|^2 - n) / (n (n - 1)). Near 0 for proposals
    spread over the sphere, 1 when guidance collapses them onto one point."""
    n = len(e)
    return ((e.sum(0).pow(2).sum() - n) / (n * (n - 1))).item() if n > 1 else None


class NearestSentence:
    """The proposal judged before the decoder writes it (--nearest): VADER on the proposal's nearest
    training sentence of the run's corpus by cosine. Against the judge on the decoded text it shows
    which half loses an attribute: the prior and its guidance, or the decoder."""

    def __init__(self, model, cache_dir, data="tiny"):
        rows = run_corpus(data, cache_dir)
        self.texts = [r["text"] for r in rows if not data_lib.is_held_out(r["text"])]
        name = model.config["encoder"]
        cache = EmbeddingCache(cache_dir_for(cache_dir, name), name, model.device)
        self.bank = torch.from_numpy(cache.encode(self.texts)).to(model.device)  # unit vectors, cached on disk

    def __call__(self, proposals):
        labels = vader_labels([self.texts[i] for i in (proposals.float() @ self.bank.T).argmax(-1).tolist()])
        return {"positive": labels.count(1) / len(labels), "negative": labels.count(-1) / len(labels)}


# ----------------------------------------------------------------------------- fluency: perplexity


class SelfPerplexity:
    """Our decoder run unguided: the soft prompt is built from pure noise at a = 0 (alpha = 0), so the
    decoder is a plain prefix LM. The noise comes from a fixed seed per sample position, so every
    setting is scored with the same noise."""

    def __init__(self, model, seed=0, batch_size=64):
        self.model, self.seed, self.batch_size = model, seed, batch_size
        self.name = "our decoder run unguided (soft prompt from pure noise, a = 0)"

    @torch.no_grad()
    def __call__(self, prefixes, texts):
        """-> (sum of NLL over continuation tokens, number of tokens) over all (prefix, text) pairs."""
        model, dec = self.model, self.model.decoder
        limit = dec.room()  # after bos and the slots
        p_ids = model.tokenizer(list(prefixes), add_special_tokens=False)["input_ids"]
        pairs = [fit_length(p, encode_continuation(model.tokenizer, t), limit) for p, t in zip(p_ids, texts)]
        nll, count = 0.0, 0
        for i in range(0, len(pairs), self.batch_size):
            chunk = pairs[i:i + self.batch_size]
            gen = torch.Generator(device=model.device).manual_seed(self.seed + i)
            x = torch.zeros(len(chunk), dec.config.dim, device=model.device)  # ignored at a = 0: z = eps
            s, n = dec.score([p for p, _ in chunk], [c for _, c in chunk], x, a=0.0, generator=gen)
            nll, count = nll + s.sum().item(), count + int(n.sum().item())
        return nll, count


class HFPerplexity:
    """A Hugging Face causal LM (e.g. gpt2-xl) scoring [bos] prompt continuation; only the
    continuation's tokens count."""

    def __init__(self, name, device="cpu", batch_size=16):
        answers = None
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            answers = hub_answers(name)  # offline, a model not in the local cache fails at once instead of retrying
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            # fp32 on every device: a judge's figures compare across machines (bf16 rounds GPT-2's logits by ~0.1)
            self.lm = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).to(device).eval()
        except Exception as err:  # offline hub, missing folder, not a causal LM: many error types
            why = ("no such folder" if missing_folder(name) else "no internet, and not in the local cache"
                   if answers is False else f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}")
            raise SystemExit(f"error: could not load the reference language model {name!r} for perplexity ({why}); "
                             "pass a local folder with --ppl-model or use --ppl-model self") from None
        self.name, self.device, self.batch_size = name, device, batch_size
        cfg = self.lm.config
        self.max_len = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1024
        self.bos = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id

    @torch.no_grad()
    def __call__(self, prefixes, texts):
        head = [] if self.bos is None else [self.bos]
        limit = self.max_len - len(head)
        p_ids = self.tokenizer(list(prefixes), add_special_tokens=False)["input_ids"]
        pairs = [fit_length(p, encode_continuation(self.tokenizer, t), limit) for p, t in zip(p_ids, texts)]
        nll, count = 0.0, 0
        for i in range(0, len(pairs), self.batch_size):
            rows = [(head + p, c) for p, c in pairs[i:i + self.batch_size]]
            T = max(len(p) + len(c) for p, c in rows)
            ids = torch.zeros(len(rows), T, dtype=torch.long)
            attn = torch.zeros(len(rows), T, dtype=torch.long)
            scored = torch.zeros(len(rows), T, dtype=torch.bool)
            for j, (p, c) in enumerate(rows):
                ids[j, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
                attn[j, :len(p) + len(c)] = 1
                scored[j, max(1, len(p)):len(p) + len(c)] = True  # the first token has no context to be scored in
            ids, attn, scored = ids.to(self.device), attn.to(self.device), scored.to(self.device)
            logits = self.lm(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
            token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            nll += token_nll.masked_fill(~scored[:, 1:], 0.0).sum().item()
            count += int(scored[:, 1:].sum().item())
        return nll, count


def perplexity(scorer, prefixes, texts):
    """exp(total NLL / total tokens) over all pairs; None when there is no token to score."""
    nll, count = scorer(prefixes, texts)
    return math.exp(nll / count) if count else None


# ----------------------------------------------------------------------------- one setting


def evaluate_setting(model, prompts, n, guide, sampling, args, judges, nearest=None):
    """One (guide, scale) setting: n continuations of each prompt, judged (see the module docstring).
    judges: {"sentiment": SentimentJudge, "toxicity": ToxicityJudge, "perplexity": a scorer}."""
    guidance = model.guidance(guide, sampling, args.like, args.unlike) if guide != "none" else None
    prefixes = [p for p in prompts for _ in range(n)]
    started = time.time()
    texts, proposals = [], []
    for e, chunk_texts in model.generate_in_batches(prefixes, guidance, sampling, args.seed, args.batch_size):
        texts += chunk_texts
        proposals.append(e)
    seconds = (time.time() - started) / len(prefixes)
    proposals, text_e = torch.cat(proposals), model.embed(texts)  # unit vectors
    by_judge = {}
    for judge in judges["sentiment"]:
        labels = judge.labels(texts)
        by_judge[judge.name] = {"positive": labels.count(1) / len(labels), "negative": labels.count(-1) / len(labels)}
    full = judges["sentiment"][0].labels([f"{p} {t}" for p, t in zip(prefixes, texts)])
    groups = [texts[i:i + n] for i in range(0, len(texts), n)]
    result = {
        "guide": guide, "scale": sampling.scale if guide != "none" else 0.0, "samples": len(texts),
        "judges": {"sentiment": [j.name for j in judges["sentiment"]], "toxicity": judges["toxicity"].name,
                   "perplexity": judges["perplexity"].name, "match": args.match},
        **next(iter(by_judge.values())), "sentiment": by_judge,  # positive / negative: by the first judge
        "positive_with_prompt": full.count(1) / len(full), "negative_with_prompt": full.count(-1) / len(full),
        **toxicity_metrics(judges["toxicity"].probs(texts), n),
        "perplexity": perplexity(judges["perplexity"], prefixes, texts),
        **{f"dist{k}": sum(distinct_n(g, k) for g in groups) / len(groups) for k in (1, 2, 3)},
        "dist2_pooled": distinct_n(texts, 2),  # over all of a setting's continuations: collapse across prompts
        "domains": domain_mix(model, text_e), "seconds_per_sample": seconds,
        "sentiment_probe": probe_agreement(model, proposals, text_e),
        "proposal_cosine": (text_e * proposals).sum(-1).mean().item(),  # does the text say what was proposed?
        "proposal_spread": proposal_spread(proposals.float()),
        "example_cosine": {kind: (text_e @ model.embed(texts_).T).mean().item() if texts_ else None
                           for kind, texts_ in (("like", args.like), ("unlike", args.unlike))},
        "nearest_sentence": nearest(proposals) if nearest is not None else None,
        "match": sum(bool(re.search(args.match, t)) for t in texts) / len(texts) if args.match else None,
        "examples": [{"prefix": p, "text": t} for p, t in list(zip(prefixes, texts))[:6]],
    }
    result["attribute_success"] = attribute_success(result, guide, model.guides)
    return result


# ----------------------------------------------------------------------------- attribute success and the sweep plot

OFFENSIVE_PROBES = ("offensive", "toxicity", "toxic", "profanity")
SENTIMENT_PROBES = ("sentiment", "sentiment_no_negation")


def judged_share(result, probe, target):
    """Share of samples the independent judges put in class `target` (0 or 1) of `probe`; None without
    a judge. sentiment -> the sentiment judge on the continuation, offensive/toxicity -> the toxicity judge,
    a domain -> the domain mix (the domain probes on the re-embedded text). Guides over several
    probes or with per-prompt targets ("prefix", e.g. same-domain) have no single share: None."""
    if not isinstance(probe, str) or target not in (0, 1):
        return None
    if probe in SENTIMENT_PROBES:
        return result["positive"] if target else result["negative"]
    if probe in OFFENSIVE_PROBES:
        return result["toxic"] if target else 1 - result["toxic"]
    if probe in result.get("domains", {}):
        share = result["domains"][probe]
        return share if target else 1 - share
    return None


def guide_target(name, guides):
    """Guide name -> (probe, target label), from the checkpoint's guides or the name itself."""
    if name in guides:
        return tuple(guides[name][:2])
    return {"positive": ("sentiment", 1), "negative": ("sentiment", 0), "nontoxic": ("toxicity", 0)}.get(name, (name, 1))


def attribute_success(result, guide, guides):
    """The share of samples matching a single guide's target (weights ignored); None for 'none',
    for composite guides ('negative+news:0.5', but 'negative+same-domain' is judged as negative) and for
    attributes no judge covers."""
    names = [n for n in guide_names(str(guide)) if not n.startswith("same-")]  # 'positive+same-domain' is judged as positive
    if len(names) != 1 or names[0] == "none":
        return None
    return judged_share(result, *guide_target(names[0], guides))


PLOT_FORMATS = ("png", "pdf", "svg", "jpg")


def plot_file(value):
    """An argparse type for --plot: checked before the sweep, which may take hours, rather than after it."""
    if Path(value).suffix.lower().lstrip(".") not in PLOT_FORMATS:
        raise argparse.ArgumentTypeError(f"'{value}' is not a picture file (accepted: " +
                                         ", ".join(f".{f}" for f in PLOT_FORMATS) + ")")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise argparse.ArgumentTypeError("needs matplotlib (an optional extra): pip install matplotlib") from None
    return output_file(value)


def plot_sweep(results, path, guides, ppl_name="the reference LM", match=None):
    """Attribute success (y) against perplexity (x): one curve per guide over its scales, each point
    labelled with the scale; the unguided setting (guide none or scale 0) is marked as a star on each
    curve, at that guide's own success measure (matplotlib: checked with --plot, plot_file). With
    match (--match's REGEX) the y axis is the share of continuations the rule matches, for every guide.
    -> the guides left out: those no judge covers, without match."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = lambda v: v is not None and math.isfinite(v)
    unguided = next((r for r in results if r["guide"] == "none"), None)
    fig, ax = plt.subplots(figsize=(7, 5))
    drawn = starred = False
    left_out = []
    for guide in dict.fromkeys(r["guide"] for r in results if r["guide"] != "none"):
        success = (lambda r: r["match"]) if match is not None else (lambda r: attribute_success(r, guide, guides))
        points = sorted(((r["scale"], r["perplexity"], success(r)) for r in results if r["guide"] == guide),
                        key=lambda p: p[0])
        if unguided is not None and not any(scale == 0 for scale, _, _ in points):
            points.insert(0, (0.0, unguided["perplexity"], success(unguided)))
        points = [p for p in points if ok(p[1]) and ok(p[2])]
        if not points:
            left_out.append(guide)
            continue
        drawn = True
        label = row_label(next(r for r in results if r["guide"] == guide))
        line, = ax.plot([p[1] for p in points], [100 * p[2] for p in points], "o-", label=label)
        for scale, x, y in points:
            if scale == 0:
                starred = True
                ax.plot([x], [100 * y], "*", color="black", markersize=14, zorder=3)
                ax.annotate("unguided", (x, 100 * y), textcoords="offset points", xytext=(6, -12), fontsize=8)
            else:
                ax.annotate(f"{scale:g}", (x, 100 * y), textcoords="offset points", xytext=(5, 4), fontsize=8,
                            color=line.get_color())
    if starred:
        ax.plot([], [], "*", color="black", markersize=10, label="unguided (scale 0)")
    ax.set_xlabel(f"perplexity of the continuation given the prompt\nunder {ppl_name}")
    ax.set_ylabel(f"% of continuations matching /{match}/" if match is not None else
                  "attribute success (% judged to have the guide's target)")
    ax.set_title("guidance-scale sweep (points: guidance scale)")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return left_out


# ----------------------------------------------------------------------------- tables and main

def short(name):
    return str(name).rstrip("/").split("/")[-1].split(" (")[0]


def row_label(r):
    """A row's guide as the table and --plot's legend name it: '+like' where --like / --unlike steer a probe's row too."""
    by_example = r["guide"] not in ("none", "like") and any(v is not None for v in r["example_cosine"].values())
    return r["guide"] + ("+like" if by_example else "")


def columns(results):
    """(header, cell) pairs of the main table; each judged column names its judge."""
    j = results[0]["judges"]
    pct = lambda key: lambda r: f"{100 * r[key]:.1f}%"
    # guided rows also show perplexity and Dist-2 pooled against the unguided row of the same run
    base = next((r for r in results if r["guide"] == "none"), None)
    vs = lambda r: base is not None and r is not base

    def ppl(r):
        if r.get("perplexity") is None:
            return "-"
        ratio = f" ({r['perplexity'] / base['perplexity']:.2f}x)" if vs(r) and base.get("perplexity") else ""
        return f"{r['perplexity']:.1f}{ratio}"

    def pooled(r):
        change = f" ({100 * (r['dist2_pooled'] / base['dist2_pooled'] - 1):+.0f}%)" \
            if vs(r) and base["dist2_pooled"] > 0 else ""  # 0: no bigrams at all (one-word continuations)
        return f"{r['dist2_pooled']:.3f}{change}"

    mix = lambda r: "/".join(f"{100 * r['domains'].get(d, 0):.0f}" for d in data_lib.DOMAINS) if r["domains"] else "-"
    cols = [("guide", row_label), ("scale", lambda r: f"{r['scale']:g}")]
    for name in j["sentiment"]:
        cols += [(f"{label} ({name})", lambda r, n=name, l=label: f"{100 * r['sentiment'][n][l]:.1f}%")
                 for label in ("positive", "negative")]
    cols += [(f"positive, with prompt ({j['sentiment'][0]})", pct("positive_with_prompt")),
            (f"toxic ({short(j['toxicity'])})", pct("toxic")),
            (f"avg max toxicity ({short(j['toxicity'])})", lambda r: f"{r['avg_max_toxicity']:.3f}"),
            (f"toxic prompts ({short(j['toxicity'])})", pct("toxic_prompts")),
            (f"perplexity ({short(j['perplexity']) if 'a = 0' not in j['perplexity'] else 'self'})", ppl),
            ("Dist-1", lambda r: f"{r['dist1']:.3f}"), ("Dist-2", lambda r: f"{r['dist2']:.3f}"),
            ("Dist-3", lambda r: f"{r['dist3']:.3f}"), ("Dist-2 pooled", pooled)]
    if any(r["domains"] for r in results):
        cols.append(("domain mix (movie/tweet/product/news)", mix))
    if results[0].get("match") is not None:
        cols.append((f"matches /{results[0]['judges']['match']}/", pct("match")))
    for kind in ("like", "unlike"):
        if any(r["example_cosine"][kind] is not None for r in results):
            cols.append((f"cosine to the {kind} examples", lambda r, k=kind: f"{r['example_cosine'][k]:.3f}"))
    cols.append(("s/sample", lambda r: f"{r['seconds_per_sample']:.3f}"))
    return cols


def diagnostic_columns(results):
    """Where steering is lost: the sentiment probe on the proposal and on the text, how far guidance
    pushed the proposals and how much it collapsed them, the text-proposal cosine, and (--nearest)
    VADER on each proposal's nearest training sentence."""
    sp = lambda r: f"{100 * r['sentiment_probe']['proposal_positive']:.0f}% / " \
                   f"{100 * r['sentiment_probe']['text_positive']:.0f}%" if r["sentiment_probe"] else "-"
    logit = lambda r: f"{r['sentiment_probe']['proposal_logit']:+.1f}" if r["sentiment_probe"] else "-"
    spread = lambda r: f"{r['proposal_spread']:.3f}" if r.get("proposal_spread") is not None else "-"
    near = lambda r: f"{100 * r['nearest_sentence']['positive']:.0f}% / {100 * r['nearest_sentence']['negative']:.0f}%" \
        if r.get("nearest_sentence") else "-"
    return [("guide", lambda r: r["guide"]), ("scale", lambda r: f"{r['scale']:g}"),
            ("probe positive: proposal / text", sp), ("probe logit of the proposals (mean)", logit),
            ("proposal spread (mean pairwise cosine)", spread),
            ("text-proposal cosine", lambda r: f"{r['proposal_cosine']:.3f}"),
            ("proposal's nearest sentence: positive / negative (VADER)", near)]


def markdown_row(cells):
    """A table row; a '|' in a cell (a --match pattern, a label of the user's own) is escaped, not a column."""
    return "| " + " | ".join(str(c).replace("|", r"\|") for c in cells) + " |"


def markdown(results):
    """The main table, its footnote of judges, and the diagnostics table."""
    lines = []
    for cols in (columns(results), diagnostic_columns(results)):
        lines += [markdown_row(h for h, _ in cols), "|" + "---|" * len(cols)]
        lines += [markdown_row(cell(r) for _, cell in cols) for r in results] + [""]
    j = results[0]["judges"]
    lines.append(f"sentiment: {', '.join(j['sentiment'])} on the continuation ({j['sentiment'][0]} also on prompt + "
                 f"continuation; the first judge gives attribute success); toxic: "
                 f"{j['toxicity']} probability > {OFFENSIVE_THRESHOLD}, avg max toxicity and toxic prompts over each "
                 f"prompt's samples; perplexity: of the continuation given the prompt under {j['perplexity']}; "
                 "Dist-n within each prompt's samples, Dist-2 pooled over all continuations of a row; in brackets, "
                 "perplexity and Dist-2 pooled against the unguided row (guide none) where the run has one.")
    return "\n".join(lines)


def guide_name(text):
    """An argparse type: one entry of --guides, which may not be empty (an empty one would run unguided)."""
    if not text:
        raise argparse.ArgumentTypeError("holds an empty guide name (give e.g. none,positive,negative)")
    return text


def same_as(flag, value):
    """What makes two entries of --guides or --sentiment-judge one row or column: 'positive:1' is 'positive',
    'a+b' is 'b+a:1', 'VADER' is 'vader'. A malformed weight stays as written (the guide's check names it)."""
    if flag == "sentiment_judge":
        return value.lower()
    if flag != "guides":
        return value
    parts = [part.partition(":") for part in re.split(r"[,+]", value)]
    try:
        if any("_" in w for _, _, w in parts):  # float() reads '1_0' as 10
            raise ValueError(value)
        return sorted((name.strip(), float(w) if colon else 1.0) for name, colon, w in parts)
    except ValueError:
        return value


def get_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=RawHelpFormatter)
    p.add_argument("--ckpt", type=path_arg, default="out", help="checkpoint directory")
    p.add_argument("--prompts", type=path_arg, default=None,
                   help="file with one prompt per line (default: openings of the run's "
                   "held-out texts)")
    p.add_argument("--n-prompts", type=bounded(int, 1, 1e6), default=50,
                   help="held-out prompts to use when --prompts is not given")
    p.add_argument("--n", type=bounded(int, 1, 1e5), default=4, help="continuations per prompt")
    p.add_argument("--guides", type=comma_list(guide_name), default="none,positive,negative",
                   help="comma-separated guides ('none' = unguided; with --like / --unlike, 'like' = the examples alone, "
                        "and every other guide composes with them)")
    p.add_argument("--scales", type=comma_list(bounded(float, 0, 1e6)), default=f"{SamplingConfig.scale:g}",
                   help="comma-separated guidance scales")
    p.add_argument("--batch-size", type=bounded(int, 1, 1e5), default=100, help="generation batch")
    p.add_argument("--ppl-model", type=path_arg, default="self",
                   help="reference LM for perplexity: 'self' (our decoder run unguided: soft prompt from pure noise, "
                        "a = 0; the tiny tier's default) or a Hugging Face causal LM id / local folder, e.g. gpt2-xl")
    p.add_argument("--sentiment-judge", default="vader,textblob",
                   help="comma-separated judges: vader, textblob (offline lexicons) or a Hugging Face sentiment "
                        "classifier, e.g. the paper's siebert/sentiment-roberta-large-english (a hub id or local "
                        "folder); the first gives attribute success")
    p.add_argument("--toxicity-judge", default="profanity-check",
                   help="profanity-check (alt-profanity-check, offline) or a Hugging Face toxicity classifier")
    p.add_argument("--match", type=nonempty("a regular expression", str), default=None, metavar="REGEX",
                   help="a rule as a judge: also report the share of continuations REGEX matches (re.search), "
                        "e.g. for an attribute of your own labels")
    p.add_argument("--nearest", action="store_true",
                   help="also judge each proposal by VADER on its nearest training sentence (of the run's corpus; "
                        "embeds the corpus once into the cache if it is not there)")
    p.add_argument("--plot", type=plot_file, default=None,
                   help="write a picture (.png, .pdf, .svg, .jpg) of attribute success (with --match: the share "
                        "the rule matches) against perplexity (needs matplotlib)")
    p.add_argument("--cache-dir", type=folder, default=None,
                   help="where train.py keeps the tiny corpus (default: the checkpoint's run's, else cache)")
    p.add_argument("--seed", type=bounded(int, 0, 2 ** 62), default=0, help="random seed")
    p.add_argument("--json", type=output_file, default=None,
                   help="write all results (with examples) to this JSON file, after each row")
    p.add_argument("--md", type=output_file, default=None, help="write the Markdown table to this file, after each row")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to run")
    add_sampling_args(p, guidance_scale=False)
    args = p.parse_args(argv)
    if args.match is not None:
        try:
            re.compile(args.match)
        except re.error as err:
            p.error(f"argument --match: {args.match!r} is not a regular expression ({err})")
    if args.ppl_model.strip().lower() == "self":  # in any case, as the judges' names
        args.ppl_model = "self"
    args.sentiment_judge = [name.strip() for name in args.sentiment_judge.split(",") if name.strip()]  # "vader,": one
    if not args.sentiment_judge:
        p.error("argument --sentiment-judge: names no judge (e.g. vader,textblob)")
    for flag in ("guides", "scales", "sentiment_judge"):  # a row or column twice, with the same seed: the same figures
        values = getattr(args, flag)
        keys = [same_as(flag, v) for v in values]
        twice = next((v for i, v in enumerate(values) if keys[i] in keys[:i]), None)
        if twice is not None:
            p.error(f"argument --{flag.replace('_', '-')}: {twice:{'g' if flag == 'scales' else ''}} is given twice")
    return args


def write_results(args, n_prompts, sampling, bf16, results):
    """--json / --md, rewritten whole (atomically) after every row: an interrupted sweep keeps the rows it finished."""
    if args.json:
        shared = {k: v for k, v in vars(sampling).items() if k != "scale"}  # each row has its own scale
        atomic_write_text(args.json, json.dumps({"ckpt": str(args.ckpt), "prompts": n_prompts, "n": args.n,
                                                 "sampling": shared, "precision": "bf16" if bf16 else "fp32",
                                                 "results": results}, indent=2))
    if args.md:
        atomic_write_text(args.md, markdown(results) + "\n")


def load_judges(args, device):
    """The judges, loaded before the model and any work (offline, they fail at once); every one that cannot
    be loaded is named in the one error line, not just the first."""
    failed = []

    def load(make, *a):
        try:
            return make(*a)
        except SystemExit as err:
            failed.append(str(err).removeprefix("error: "))
    judges = {"sentiment": [load(SentimentJudge, name, device) for name in args.sentiment_judge],
              "toxicity": load(ToxicityJudge, args.toxicity_judge, device),
              "perplexity": load(HFPerplexity, args.ppl_model, device) if args.ppl_model != "self" else None}
    if failed:
        raise SystemExit("error: " + "; ".join(failed))
    return judges


def main(args):
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    prompts = read_prompt_file(args.prompts) if args.prompts is not None else None
    device = pick_device(args.device)
    judges = load_judges(args, device)
    model = DGLM(args.ckpt, device, args.precision)
    model.prompt_room(args.max_tokens)  # before any work
    args.cache_dir = args.cache_dir or run_cache_dir(model.config)  # run from another folder: the same corpus
    judges["perplexity"] = judges["perplexity"] or SelfPerplexity(model, args.seed)
    data = model.config.get("train", {}).get("data", "tiny")  # the run's corpus
    nearest = NearestSentence(model, args.cache_dir, data) if args.nearest else None
    if prompts is None:
        prompts = heldout_prompts(data, args.cache_dir, args.n_prompts, seed=args.seed)
        if len(prompts) < args.n_prompts:
            print(f"note: --n-prompts {args.n_prompts}: the held-out sentences give {len(prompts)} prompts; "
                  "evaluating on those", file=sys.stderr)
    sampling = sampling_config(args)
    for guide in args.guides:  # each checked before any work: an unknown last guide cost the others' minutes first
        if guide != "none":
            model.guidance(guide, sampling, args.like, args.unlike)
    # warm-up, so that the first setting's s/sample does not include one-time start-up costs
    warm = SamplingConfig(steps=2, max_tokens=2)
    model.decode(prompts[:1], model.sample_proposals(prompts[:1], None, warm, 0), warm, 0)
    results = []
    for guide in args.guides:
        for scale in ([0.0] if guide == "none" else args.scales):
            results.append(evaluate_setting(model, prompts, args.n, guide, replace(sampling, scale=scale), args,
                                            judges, nearest))
            print(markdown_row(cell(results[-1]) for _, cell in columns(results)), flush=True)
            write_results(args, len(prompts), sampling, model.bf16, results)
    print("\n" + markdown(results))
    if args.plot:
        left_out = plot_sweep(results, args.plot, model.guides, judges["perplexity"].name, args.match)
        print(f"wrote {args.plot}" + (f" (without {', '.join(left_out)}: no judge covers "
                                      f"{'it' if len(left_out) == 1 else 'them'}; --match REGEX judges by a rule)"
                                      if left_out else ""))


if __name__ == "__main__":
    run_cli(lambda: main(get_args()), interrupted="interrupted: the rows finished are in --json / --md where given")
