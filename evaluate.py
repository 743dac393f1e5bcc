"""Measure steering: attribute success by independent judges, diversity, domain mix and speed.

    python evaluate.py --guides none,positive,negative --scales 30
    python evaluate.py --prompts prompts.txt --n 4 --json results.json --md results.md
    python evaluate.py --guides none,positive,negative --scales 5,15,30,60 --plot sweep.png
    python evaluate.py --ppl-model gpt2-xl            # paper tier: fluency under GPT-2 XL

For each (guide, scale) it continues every prompt n times and reports
  - sentiment by the VADER lexicon analyser (Hutto & Gilbert 2014), never by the probe that steered:
    positive if compound >= 0.05, negative if <= -0.05, on the continuation and on prompt + continuation
  - Dist-1/2/3: distinct word n-grams / all n-grams among each prompt's samples, averaged over prompts
  - domain mix (tiny tier): the domain probes' argmax on the re-embedded continuation, to show whether
    steering changed the sentiment or merely the kind of text
  - offensive language by alt-profanity-check (a linear model on character/word n-grams): the share
    of continuations with probability > 0.5
  - perplexity of the continuation given the prompt under a reference LM (--ppl-model): `self` is our
    own decoder run unguided, its soft prompt built from pure noise at a = 0 (a plain prefix LM; the
    tiny tier's stand-in, biased toward our own samples), or a Hugging Face causal LM such as gpt2-xl
    (the paper's judge). exp(total NLL / total tokens) over all samples of a setting; the
    continuation's tokens are scored, not an end-of-text token
  - seconds per sample (prior + decoding, this machine)
  - diagnostics of where steering is lost: the sentiment probe on the proposals and on the
    re-embedded text, the mean cosine between each text's embedding and its proposal (does the
    decoder write what the prior proposed?), and with --nearest VADER on each proposal's nearest
    training sentence
Default prompts: the first words of held-out sentences of the tiny corpus (never trained on).
--plot FILE.png draws attribute success against perplexity, one curve per guide over the scales
(needs matplotlib, an optional extra: pip install matplotlib).
"""
import argparse
import json
import math
import re
import time
from dataclasses import replace
from pathlib import Path

import torch

import data as data_lib
from decoder import encode_continuation, fit_length
from encoder import EmbeddingCache, cache_dir_for
from sample import DGLM, SamplingConfig, add_sampling_args, read_prompt_file, sampling_config
from utils import ArgumentParser, bounded, pick_device, run_cli


def heldout_prompts(cache_dir, n_prompts, n_words=4, seed=0):
    """First n_words of held-out tiny-corpus sentences with at least 2 * n_words words."""
    rows = data_lib.prepare_tiny(Path(cache_dir) / "tiny")
    texts = [r["text"] for r in rows if data_lib.is_held_out(r["text"]) and len(r["text"].split()) >= 2 * n_words]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(texts), generator=g)[:n_prompts].tolist()
    return [" ".join(texts[i].split()[:n_words]) for i in order]


def distinct_n(samples, n):
    """Distinct n-grams over all n-grams in a group of samples (Li et al. 2016)."""
    grams = [tuple(words[i:i + n]) for s in samples for words in [s.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def vader_labels(texts):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    analyzer = SentimentIntensityAnalyzer()
    scores = [analyzer.polarity_scores(t)["compound"] for t in texts]
    return [1 if c >= 0.05 else -1 if c <= -0.05 else 0 for c in scores]


OFFENSIVE_THRESHOLD = 0.5


def offensive_probs(texts):
    """Probability that each text is offensive/profane, by alt-profanity-check (never by our probes)."""
    try:
        from profanity_check import predict_prob
    except ImportError:
        raise SystemExit("error: the offensive-language judge needs `pip install alt-profanity-check` "
                         "(listed in requirements.txt)") from None
    return [float(p) for p in predict_prob(list(texts))] if texts else []


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
    diagnostic of where steering is lost (prior vs decoder); the judge above is VADER, not this."""
    if "sentiment" not in model.probes:
        return {}
    w, b = model.probes["sentiment"]
    return {"proposal_positive": (proposals @ w + b > 0).float().mean().item(),
            "text_positive": (text_embeddings @ w + b > 0).float().mean().item()}


class NearestSentence:
    """The proposal judged before the decoder writes it (--nearest): VADER on the proposal's nearest
    training sentence of the tiny corpus by cosine. Against the judge on the decoded text it shows
    which half loses an attribute: the prior and its guidance, or the decoder."""

    def __init__(self, model, cache_dir):
        rows = data_lib.prepare_tiny(Path(cache_dir) / "tiny")
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
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
            self.lm = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
        except Exception as err:  # offline hub, missing folder, not a causal LM: many error types
            raise SystemExit(f"error: could not load the reference language model {name!r} for perplexity "
                             f"({type(err).__name__}); pass a local folder with --ppl-model or use --ppl-model self") from None
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


def evaluate_setting(model, prompts, n, guide, sampling, args, ppl=None, nearest=None):
    """One (guide, scale) setting: n continuations of each prompt, judged (see the module docstring)."""
    guidance = model.guidance(guide, sampling)
    prefixes = [p for p in prompts for _ in range(n)]
    started = time.time()
    texts, proposals = [], []
    for i in range(0, len(prefixes), args.batch_size):
        chunk = prefixes[i:i + args.batch_size]
        e = model.sample_proposals(chunk, guidance, sampling, args.seed + i)
        texts += model.decode(chunk, e, sampling, args.seed + i)
        proposals.append(e)
    seconds = (time.time() - started) / len(prefixes)
    proposals, text_e = torch.cat(proposals), model.embed(texts)  # unit vectors
    cont = vader_labels(texts)
    full = vader_labels([f"{p} {t}" for p, t in zip(prefixes, texts)])
    offensive = offensive_probs(texts)
    groups = [texts[i:i + n] for i in range(0, len(texts), n)]
    result = {
        "guide": guide, "scale": sampling.scale if guide != "none" else 0.0, "samples": len(texts),
        "positive": cont.count(1) / len(cont), "negative": cont.count(-1) / len(cont),
        "positive_with_prompt": full.count(1) / len(full), "negative_with_prompt": full.count(-1) / len(full),
        "offensive": sum(p > OFFENSIVE_THRESHOLD for p in offensive) / len(offensive),
        "perplexity": perplexity(ppl, prefixes, texts) if ppl is not None else None,
        **{f"dist{k}": sum(distinct_n(g, k) for g in groups) / len(groups) for k in (1, 2, 3)},
        "domains": domain_mix(model, text_e), "seconds_per_sample": seconds,
        "sentiment_probe": probe_agreement(model, proposals, text_e),
        "proposal_cosine": (text_e * proposals).sum(-1).mean().item(),  # does the text say what was proposed?
        "nearest_sentence": nearest(proposals) if nearest is not None else None,
        "examples": [{"prefix": p, "text": t} for p, t in list(zip(prefixes, texts))[:6]],
    }
    result["attribute_success"] = attribute_success(result, guide, model.guides)
    return result


# ----------------------------------------------------------------------------- attribute success and the sweep plot

OFFENSIVE_PROBES = ("offensive", "toxicity", "toxic", "profanity")


def judged_share(result, probe, target):
    """Share of samples the independent judges put in class `target` (0 or 1) of `probe`; None without
    a judge. sentiment -> VADER on the continuation, offensive/toxicity -> alt-profanity-check,
    a domain -> the domain mix (the domain probes on the re-embedded text). Guides over several
    probes or with per-prompt targets ("prefix", e.g. same-domain) have no single share: None."""
    if not isinstance(probe, str) or target not in (0, 1):
        return None
    if probe == "sentiment":
        return result["positive"] if target else result["negative"]
    if probe in OFFENSIVE_PROBES:
        return result["offensive"] if target else 1 - result["offensive"]
    if probe in result.get("domains", {}):
        share = result["domains"][probe]
        return share if target else 1 - share
    return None


def guide_target(name, guides):
    """Guide name -> (probe, target label), from the checkpoint's guides or the name itself."""
    if name in guides:
        return tuple(guides[name])
    return {"positive": ("sentiment", 1), "negative": ("sentiment", 0), "nontoxic": ("toxicity", 0)}.get(name, (name, 1))


def attribute_success(result, guide, guides):
    """The share of samples matching a single guide's target (weights ignored); None for 'none',
    for composite guides ('negative,news:0.5', but 'negative+same-domain' is judged as negative) and for
    attributes no judge covers."""
    names = [part.split(":")[0].strip() for part in re.split(r"[,+]", str(guide)) if part.strip()]
    names = [n for n in names if not n.startswith("same-")]  # 'positive+same-domain' is judged as positive
    if len(names) != 1 or names[0] == "none":
        return None
    return judged_share(result, *guide_target(names[0], guides))


def plot_sweep(results, path, guides, ppl_name="the reference LM"):
    """Attribute success (y) against perplexity (x): one curve per guide over its scales, each point
    labelled with the scale; the unguided setting (guide none or scale 0) is marked as a star on each
    curve, at that guide's own success measure. Returns False (and says why) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (an optional extra): pip install matplotlib; plot skipped")
        return False
    ok = lambda v: v is not None and math.isfinite(v)
    unguided = next((r for r in results if r["guide"] == "none"), None)
    fig, ax = plt.subplots(figsize=(7, 5))
    drawn = starred = False
    for guide in dict.fromkeys(r["guide"] for r in results if r["guide"] != "none"):
        points = sorted(((r["scale"], r["perplexity"], r["attribute_success"]) for r in results if r["guide"] == guide),
                        key=lambda p: p[0])
        if unguided is not None and not any(scale == 0 for scale, _, _ in points):
            points.insert(0, (0.0, unguided["perplexity"], attribute_success(unguided, guide, guides)))
        points = [p for p in points if ok(p[1]) and ok(p[2])]
        if not points:
            continue
        drawn = True
        line, = ax.plot([p[1] for p in points], [100 * p[2] for p in points], "o-", label=guide)
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
    ax.set_ylabel("attribute success (% judged to have the guide's target)")
    ax.set_title("guidance-scale sweep (points: guidance scale)")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- tables and main

HEADER = ["guide", "scale", "positive", "negative", "positive (with prompt)", "negative (with prompt)", "offensive",
          "perplexity", "Dist-1", "Dist-2", "Dist-3", "domain mix (movie/tweet/product/news)",
          "probe positive: proposal / text", "text-proposal cosine", "proposal's nearest sentence: positive / negative",
          "s/sample"]


def markdown_row(r):
    sp = r["sentiment_probe"]
    probe = f"{100 * sp['proposal_positive']:.0f}% / {100 * sp['text_positive']:.0f}%" if sp else "-"
    mix = "/".join(f"{100 * r['domains'].get(d, 0):.0f}" for d in data_lib.DOMAINS) if r["domains"] else "-"
    cosine = f"{r['proposal_cosine']:.3f}" if r.get("proposal_cosine") is not None else "-"
    near = r.get("nearest_sentence")
    near = f"{100 * near['positive']:.0f}% / {100 * near['negative']:.0f}%" if near else "-"
    ppl = r.get("perplexity")
    ppl = f"{ppl:.1f}" if ppl is not None and math.isfinite(ppl) else "-"
    return (f"| {r['guide']} | {r['scale']:g} | {100 * r['positive']:.1f}% | {100 * r['negative']:.1f}% | "
            f"{100 * r['positive_with_prompt']:.1f}% | {100 * r['negative_with_prompt']:.1f}% | "
            f"{100 * r['offensive']:.1f}% | {ppl} | "
            f"{r['dist1']:.3f} | {r['dist2']:.3f} | {r['dist3']:.3f} | {mix} | {probe} | {cosine} | {near} | "
            f"{r['seconds_per_sample']:.3f} |")


def markdown(results, ppl_name=None):
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += [markdown_row(r) for r in results]
    lines.append("")
    lines.append(f"offensive: alt-profanity-check probability > {OFFENSIVE_THRESHOLD} on the continuation. "
                 f"perplexity: of the continuation given the prompt under {ppl_name or 'no reference LM'}.")
    return "\n".join(lines)


def get_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out", help="checkpoint directory")
    p.add_argument("--prompts", default=None, help="file with one prompt per line (default: held-out tiny prefixes)")
    p.add_argument("--n-prompts", type=bounded(int, 1, 1e6), default=50,
                   help="held-out prompts to use when --prompts is not given")
    p.add_argument("--n", type=bounded(int, 1, 1e5), default=4, help="continuations per prompt")
    p.add_argument("--guides", default="none,positive,negative", help="comma-separated guides ('none' = unguided)")
    p.add_argument("--scales", default=f"{SamplingConfig.scale:g}", help="comma-separated guidance scales")
    p.add_argument("--batch-size", type=bounded(int, 1, 1e5), default=100, help="generation batch")
    p.add_argument("--ppl-model", default="self",
                   help="reference LM for perplexity: 'self' (our decoder run unguided: soft prompt from pure noise, "
                        "a = 0; the tiny tier's default) or a Hugging Face causal LM id / local folder, e.g. gpt2-xl")
    p.add_argument("--nearest", action="store_true",
                   help="also judge each proposal by VADER on its nearest training sentence (tiny corpus; "
                        "embeds the corpus once into the cache if it is not there)")
    p.add_argument("--plot", default=None, help="write a PNG of attribute success against perplexity (needs matplotlib)")
    p.add_argument("--cache-dir", default="cache", help="where train.py keeps the tiny corpus")
    p.add_argument("--seed", type=bounded(int, 0, 2 ** 62), default=0, help="random seed")
    p.add_argument("--json", default=None, help="write all results (with examples) to this JSON file")
    p.add_argument("--md", default=None, help="write the Markdown table to this file")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"], help="where to run")
    add_sampling_args(p, guidance_scale=False)
    args = p.parse_args(argv)
    scale = bounded(float, 0, 1e6)
    try:
        args.scales = [scale(v) for v in args.scales.split(",")]
    except argparse.ArgumentTypeError as err:
        p.error(f"argument --scales: {err}")
    return args


def main(args):
    torch.manual_seed(args.seed)
    prompts = read_prompt_file(args.prompts) if args.prompts else None
    device = pick_device(args.device)
    # --ppl-model: 'self' (our decoder, unguided) or a Hugging Face causal LM, loaded first to fail fast
    ppl = HFPerplexity(args.ppl_model, device) if args.ppl_model != "self" else None
    model = DGLM(args.ckpt, device, args.precision)
    ppl = ppl or SelfPerplexity(model, args.seed)
    nearest = NearestSentence(model, args.cache_dir) if args.nearest else None
    if prompts is None:
        prompts = heldout_prompts(args.cache_dir, args.n_prompts, seed=args.seed)
    print(f"perplexity under {ppl.name}")
    sampling = sampling_config(args)
    # warm-up, so that the first setting's s/sample does not include one-time start-up costs
    warm = SamplingConfig(steps=2, max_tokens=2)
    model.decode(prompts[:1], model.sample_proposals(prompts[:1], None, warm, 0), warm, 0)
    results = []
    for guide in args.guides.split(","):
        for scale in ([0.0] if guide == "none" else args.scales):
            r = evaluate_setting(model, prompts, args.n, guide, replace(sampling, scale=scale), args, ppl, nearest)
            results.append(r)
            print(markdown_row(r), flush=True)
    table = markdown(results, ppl.name)
    print("\n" + table)
    if args.json:
        Path(args.json).write_text(json.dumps({"ckpt": str(args.ckpt), "prompts": len(prompts), "n": args.n,
                                               "sampling": vars(sampling), "precision": "bf16" if model.bf16 else "fp32",
                                               "ppl_model": ppl.name, "results": results}, indent=2))
    if args.md:
        Path(args.md).write_text(table + "\n")
    if args.plot and plot_sweep(results, args.plot, model.guides, ppl.name):
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    run_cli(lambda: main(get_args()))
