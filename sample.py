"""Generate with DGLM, optionally steered by linear probes (plug-and-play control).

    python sample.py --guide positive                     # unguided vs guided, same seed, side by side
    python sample.py --guide negative:1,news:0.5 --prefix "The service was"
    python sample.py --guide positive --prompts prompts.txt --n 4 --out samples.jsonl
    python sample.py --guide positive --show-steps        # watch the proposal form while denoising

Generation (DGLM sec. 3): embed the prefix -> sample a continuation embedding from the prior with
DDIM/DDPM, bending every denoising step with the probes' gradient (guide.py) -> map it back to the
unit sphere -> re-noise at a = 0.95 -> soft prompt -> GPT-2 writes the continuation.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from decoder import encode_continuation
from encoder import embed, load_encoder, standardize, unstandardize
from guide import build_guidance, load_probes

# Defaults picked from the guidance-scale sweep on the tiny tier (README, `evaluate.py --plot`): scale 300
# is where positive success stops rising while perplexity keeps growing; temperature 0.7 steers more
# than 1.0 at a small cost in diversity.
DEFAULT_SCALE = 300.0
DEFAULT_TEMPERATURE = 0.7
DEMO_PREFIXES = ["The movie", "I think that", "This product", "The city council"]


class DGLM:
    """Everything needed to generate, rebuilt from a checkpoint directory alone."""

    def __init__(self, ckpt, device="cpu"):
        from train import load_for_inference
        self.ckpt = Path(ckpt)
        self.device = device
        self.config, self.prior, self.decoder, self.tokenizer, self.mu, self.s = load_for_inference(ckpt, device)
        self.encoder = None  # loaded on first use, after cheap checks such as the guide names
        probe_path = self.ckpt / "probes.safetensors"
        self.probes, self.guides = load_probes(probe_path, self.config["encoder"]) if probe_path.exists() else ({}, {})

    def embed(self, texts):
        if self.encoder is None:
            self.encoder = load_encoder(self.config["encoder"], self.device)
        return torch.from_numpy(embed(self.encoder, texts)).to(self.device)

    def guidance(self, spec, scale, **kwargs):
        if spec not in (None, "", "none") and not self.guides:
            raise SystemExit(f"error: {self.ckpt} has no probes.safetensors; train on labelled data or use --guide none")
        return build_guidance(spec, self.probes, self.guides, self.mu, self.s, scale, **kwargs)

    def prefix_ids(self, prefixes, max_new_tokens):
        room = self.decoder.max_len - self.decoder.cfg.n_soft - 1 - max_new_tokens
        ids = self.tokenizer(list(prefixes), add_special_tokens=False)["input_ids"]
        if any(len(i) > room for i in ids):
            print(f"warning: prompts longer than {room} tokens are cut to their last {room} tokens", file=sys.stderr)
        return [i[-room:] for i in ids]

    @torch.no_grad()
    def sample_proposals(self, prefixes, guidance=None, steps=50, method="ddim", cfg_scale=1.0, seed=0, callback=None):
        """Continuation embeddings (B, d) on the unit sphere, sampled from the prior given the prefixes."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        e_p = self.embed(prefixes)
        x_p = standardize(e_p, self.mu, self.s)
        guidance = guidance.bind(e_p) if guidance is not None else None  # targets taken from the prefix
        x = self.prior.sample(x_p, steps=steps, method=method, cfg_scale=cfg_scale, guidance=guidance,
                              generator=gen, callback=callback)
        return unstandardize(x, self.mu, self.s)  # e = normalize(mu + s x)

    @torch.no_grad()
    def decode(self, prefixes, e, alpha=None, max_new_tokens=32, top_p=0.9, temperature=DEFAULT_TEMPERATURE,
               repetition_penalty=1.2, seed=0):
        gen = torch.Generator(device=self.device).manual_seed(seed + 1)
        ids = self.decoder.generate(self.prefix_ids(prefixes, max_new_tokens), standardize(e, self.mu, self.s),
                                    alpha=alpha, max_new_tokens=max_new_tokens, top_p=top_p,
                                    temperature=temperature, repetition_penalty=repetition_penalty, generator=gen)
        return [self.tokenizer.decode(i).strip() for i in ids]

    def generate(self, prefixes, guidance=None, steps=50, method="ddim", cfg_scale=1.0, seed=0, **decode_kwargs):
        """Continuations of `prefixes` (one each); the same seed gives the same noise guided or not."""
        e = self.sample_proposals(prefixes, guidance, steps, method, cfg_scale, seed)
        return self.decode(prefixes, e, seed=seed, **decode_kwargs)


def read_prompt_file(path):
    """One prompt per line; a missing, unreadable or empty file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: prompt file {path} does not exist")
    try:
        prompts = [l.strip() for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    except UnicodeDecodeError as err:
        raise SystemExit(f"error: cannot read prompt file {path} ({err})") from None
    if not prompts:
        raise SystemExit(f"error: prompt file {path} is empty (expected one prompt per line)")
    return prompts


def read_prompts(args):
    if args.prompts:
        return read_prompt_file(args.prompts)
    return [args.prefix] if args.prefix is not None else DEMO_PREFIXES


def show_steps(model, prefix, guidance, args):
    """Decode the predicted proposal x_hat at a few points of the trajectory, guided and not."""
    points = sorted({0, args.steps // 4, args.steps // 2, 3 * args.steps // 4, args.steps - 1})
    for label, g in (("unguided", None), (args.guide, guidance)):
        trajectory = []
        model.sample_proposals([prefix], g, args.steps, args.sampler, args.cfg, args.seed,
                               callback=lambda i, lam, x_hat: trajectory.append((i, lam, x_hat.clone())) if i in points else None)
        print(f"\n[{label}] {prefix!r}: the proposal x_hat while denoising")
        for i, lam, x_hat in trajectory:
            text = model.decode([prefix], unstandardize(x_hat, model.mu, model.s), seed=args.seed,
                                max_new_tokens=args.max_tokens, top_p=args.top_p, temperature=args.temperature,
                                repetition_penalty=args.repetition_penalty)[0]
            print(f"  step {i + 1:3d}/{args.steps}  logSNR {lam:+6.1f}  {prefix} {text}")


def get_args(argv=None):
    from train import ArgumentParser
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out", help="checkpoint directory written by train.py")
    p.add_argument("--guide", default="positive", help="guide name(s): 'positive', 'negative:1,news:0.5', or 'none'")
    p.add_argument("--scale", default=DEFAULT_SCALE, help=f"guidance scale (default {DEFAULT_SCALE:g}; 0 = unguided)")
    p.add_argument("--prefix", default=None, help="one prefix to continue ('' for none)")
    p.add_argument("--prompts", default=None, help="file with one prefix per line")
    p.add_argument("--n", type=int, default=2, help="samples per prefix")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same noise guided or not)")
    p.add_argument("--out", default=None, help="write JSON lines {prefix, text, guide, scale, seed} here")
    p.add_argument("--steps", type=int, default=50, help="denoising steps of the prior")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="prior sampler")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale on the prefix (1 = off)")
    p.add_argument("--mc-samples", type=int, default=32, help="Monte Carlo samples around x_hat for the probe loss (0 = x_hat)")
    p.add_argument("--alpha", type=float, default=None, help="re-noising level of the proposal (default: checkpoint's, 0.95)")
    p.add_argument("--max-tokens", type=int, default=32, help="continuation length in tokens")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="sampling temperature (0 = greedy)")
    p.add_argument("--repetition-penalty", type=float, default=1.2, help="CTRL-style repetition penalty")
    p.add_argument("--show-steps", action="store_true", help="print the decoded proposal at several denoising steps")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to run")
    args = p.parse_args(argv)
    try:
        args.scale = float(args.scale)
    except ValueError:
        p.error(f"--scale {args.scale!r} is not a number")
    if args.n < 1:
        p.error("--n must be at least 1")
    return args


def main(args):
    from train import pick_device
    device = pick_device(args.device)
    model = DGLM(args.ckpt, device)
    guidance = model.guidance(args.guide, args.scale, n_samples=args.mc_samples, seed=args.seed)
    prompts = read_prompts(args)
    decode = dict(alpha=args.alpha, max_new_tokens=args.max_tokens, top_p=args.top_p,
                  temperature=args.temperature, repetition_penalty=args.repetition_penalty)
    if args.show_steps:
        show_steps(model, prompts[0], guidance, args)
        return
    prefixes = [p for p in prompts for _ in range(args.n)]
    run = lambda g: model.generate(prefixes, g, args.steps, args.sampler, args.cfg, args.seed, **decode)
    guided = run(guidance)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for prefix, text in zip(prefixes, guided):
                f.write(json.dumps({"prefix": prefix, "text": text, "guide": args.guide, "scale": args.scale,
                                    "seed": args.seed}) + "\n")
        print(f"wrote {len(guided)} samples to {args.out}")
        return
    unguided = run(None) if guidance is not None else guided
    width = max(len("unguided"), len(args.guide))
    for i, prefix in enumerate(prefixes):
        if i % args.n == 0:
            print(f"\n=== {prefix!r}")
        print(f"  {'unguided':<{width}} | {prefix} {unguided[i]}")
        if guidance is not None:
            print(f"  {args.guide:<{width}} | {prefix} {guided[i]}")


if __name__ == "__main__":
    from train import run_cli
    run_cli(lambda: main(get_args()))
