"""Measure steering: attribute success by independent judges, diversity, domain mix and speed.

    python evaluate.py --guides none,positive,negative --scales 30
    python evaluate.py --prompts prompts.txt --n 4 --json results.json --md results.md

For each (guide, scale) it continues every prompt n times and reports
  - sentiment by the VADER lexicon analyser (Hutto & Gilbert 2014), never by the probe that steered:
    positive if compound >= 0.05, negative if <= -0.05, on the continuation and on prompt + continuation
  - Dist-1/2/3: distinct word n-grams / all n-grams among each prompt's samples, averaged over prompts
  - domain mix (tiny tier): the domain probes' argmax on the re-embedded continuation, to show whether
    steering changed the sentiment or merely the kind of text
  - seconds per sample (prior + decoding, this machine)
Default prompts: the first words of held-out sentences of the tiny corpus (never trained on).
"""
import argparse
import json
import time
from pathlib import Path

import torch

import data as data_lib
from sample import DGLM


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


def domain_mix(model, texts):
    domains = [d for d in data_lib.DOMAINS if d in model.probes]
    if not domains:
        return {}
    e = model.embed(texts)
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


def evaluate_setting(model, prompts, n, guide, scale, args):
    guidance = model.guidance(guide, scale, n_samples=args.mc_samples, seed=args.seed)
    prefixes = [p for p in prompts for _ in range(n)]
    started = time.time()
    texts, proposals = [], []
    for i in range(0, len(prefixes), args.batch_size):
        chunk = prefixes[i:i + args.batch_size]
        e = model.sample_proposals(chunk, guidance, args.steps, args.sampler, 1.0, args.seed + i)
        texts += model.decode(chunk, e, alpha=args.alpha, max_new_tokens=args.max_tokens, seed=args.seed + i,
                              temperature=args.temperature)
        proposals.append(e)
    seconds = (time.time() - started) / len(prefixes)
    cont = vader_labels(texts)
    full = vader_labels([f"{p} {t}" for p, t in zip(prefixes, texts)])
    groups = [texts[i:i + n] for i in range(0, len(texts), n)]
    result = {
        "guide": guide, "scale": scale if guide != "none" else 0.0, "samples": len(texts),
        "positive": cont.count(1) / len(cont), "negative": cont.count(-1) / len(cont),
        "positive_with_prompt": full.count(1) / len(full), "negative_with_prompt": full.count(-1) / len(full),
        **{f"dist{k}": sum(distinct_n(g, k) for g in groups) / len(groups) for k in (1, 2, 3)},
        "domains": domain_mix(model, texts), "seconds_per_sample": seconds,
        "sentiment_probe": probe_agreement(model, torch.cat(proposals), model.embed(texts)),
        "examples": [{"prefix": p, "text": t} for p, t in list(zip(prefixes, texts))[:6]],
    }
    return result


def markdown(results):
    lines = ["| guide | scale | positive | negative | positive (with prompt) | negative (with prompt) | Dist-1 | Dist-2 | Dist-3 | domain mix (movie/tweet/product/news) | probe positive: proposal / text | s/sample |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        sp = r["sentiment_probe"]
        probe = f"{100 * sp['proposal_positive']:.0f}% / {100 * sp['text_positive']:.0f}%" if sp else "-"
        mix = "/".join(f"{100 * r['domains'].get(d, 0):.0f}" for d in data_lib.DOMAINS) if r["domains"] else "-"
        lines.append(f"| {r['guide']} | {r['scale']:g} | {100 * r['positive']:.1f}% | {100 * r['negative']:.1f}% | "
                     f"{100 * r['positive_with_prompt']:.1f}% | {100 * r['negative_with_prompt']:.1f}% | "
                     f"{r['dist1']:.3f} | {r['dist2']:.3f} | {r['dist3']:.3f} | {mix} | {probe} | {r['seconds_per_sample']:.3f} |")
    return "\n".join(lines)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out", help="checkpoint directory")
    p.add_argument("--prompts", default=None, help="file with one prompt per line (default: held-out tiny prefixes)")
    p.add_argument("--n-prompts", type=int, default=50, help="held-out prompts to use when --prompts is not given")
    p.add_argument("--n", type=int, default=4, help="continuations per prompt")
    p.add_argument("--guides", default="none,positive,negative", help="comma-separated guides ('none' = unguided)")
    p.add_argument("--scales", default="30", help="comma-separated guidance scales")
    p.add_argument("--steps", type=int, default=50, help="prior denoising steps")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="prior sampler")
    p.add_argument("--mc-samples", type=int, default=32, help="Monte Carlo samples of the guidance loss")
    p.add_argument("--max-tokens", type=int, default=32, help="continuation length")
    p.add_argument("--temperature", type=float, default=1.0, help="decoding temperature (top-p 0.9, repetition penalty 1.2)")
    p.add_argument("--alpha", type=float, default=None, help="re-noising level of proposals (default: checkpoint's)")
    p.add_argument("--batch-size", type=int, default=100, help="generation batch")
    p.add_argument("--cache-dir", default="cache", help="where train.py keeps the tiny corpus")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--json", default=None, help="write all results (with examples) to this JSON file")
    p.add_argument("--md", default=None, help="write the Markdown table to this file")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"], help="where to run")
    return p.parse_args(argv)


def main(args):
    from train import pick_device
    torch.manual_seed(args.seed)
    model = DGLM(args.ckpt, pick_device(args.device))
    if args.prompts:
        prompts = [l.strip() for l in Path(args.prompts).read_text(encoding="utf-8").splitlines() if l.strip()]
    else:
        prompts = heldout_prompts(args.cache_dir, args.n_prompts, seed=args.seed)
    try:
        scales = [float(s) for s in args.scales.split(",")]
    except ValueError:
        raise SystemExit(f"error: --scales {args.scales!r} must be comma-separated numbers") from None
    results = []
    for guide in args.guides.split(","):
        for scale in ([0.0] if guide == "none" else scales):
            r = evaluate_setting(model, prompts, args.n, guide, scale, args)
            results.append(r)
            print(markdown([r]).splitlines()[-1], flush=True)
    table = markdown(results)
    print("\n" + table)
    if args.json:
        Path(args.json).write_text(json.dumps({"ckpt": str(args.ckpt), "prompts": len(prompts), "n": args.n,
                                               "steps": args.steps, "sampler": args.sampler, "results": results}, indent=2))
    if args.md:
        Path(args.md).write_text(table + "\n")


if __name__ == "__main__":
    main(get_args())
