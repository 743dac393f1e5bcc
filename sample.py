"""Generate with DGLM, optionally steered by linear probes (plug-and-play control).

    python sample.py --guide positive                     # unguided vs guided, same seed, side by side
    python sample.py --guide negative:1,news:0.5 --prefix "The service was"
    python sample.py --guide positive --prompts prompts.txt --n 4 --out samples.jsonl
    python sample.py --guide positive --show-steps        # watch the proposal form while denoising

Generation (DGLM sec. 3): embed the prefix -> sample a continuation embedding from the prior with
DDIM/DDPM, bending the noisy denoising steps with the probes' gradient (guide.py) -> map it back to
the unit sphere -> re-noise at a = 0.95 -> soft prompt -> GPT-2 writes the continuation.
Precision: bf16 autocast where the hardware computes in bf16 natively (CUDA; CPUs with AVX512-BF16
or AMX), fp32 elsewhere; --precision fp32 or bf16 overrides.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from encoder import embed, load_encoder, standardize, unstandardize
from guide import GUIDE_MAX_LOGSNR, build_guidance, load_probes

# Defaults picked from the guidance-scale sweep on the tiny tier (README, `evaluate.py --plot`): at scale
# 200 positive and negative steering are near their best (98.5% / 69% by VADER) for a perplexity rise of
# about 1.6x; 100 is cheaper in perplexity but leaves negative at the edge (61%), 300 and 1000 only add
# perplexity. Temperature 0.7 steers more than 1.0 at a small cost in diversity.
DEFAULT_SCALE = 200.0
DEFAULT_TEMPERATURE = 0.7
DEMO_PREFIXES = ["The movie", "I think that", "This product", "The city council"]


def native_bf16(device):
    """Whether `device` runs bf16 matrix products natively (else autocast to bf16 would be slower)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    if kind == "cpu":  # AVX512-BF16 (e.g. AMD Zen 4, Intel Cooper Lake) or AMX (Intel Sapphire Rapids)
        return any(getattr(torch.cpu, check, lambda: False)()
                   for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def use_bf16(precision, device):
    """precision "auto" | "fp32" | "bf16" -> whether to run under bf16 autocast."""
    return precision == "bf16" or (precision == "auto" and native_bf16(device))


def add_sampling_args(p):
    """The options sample.py, evaluate.py and bench.py share: the guidance interval and the precision."""
    p.add_argument("--guide-max-logsnr", type=float, default=GUIDE_MAX_LOGSNR,
                   help="guide the denoising steps with logSNR <= this (default %(default)g: the noisiest 11 of "
                        "50 DDIM steps; 15 = every step)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast where the hardware has native bf16 (CUDA, AVX512-BF16/AMX CPUs), else fp32")


class DGLM:
    """Everything needed to generate, rebuilt from a checkpoint directory alone.

    precision: "auto" (bf16 autocast where native_bf16(device), else fp32), "fp32" or "bf16". The
    sampler's state (z, the DDIM update) and the guidance loss stay in fp32 either way.
    """

    def __init__(self, ckpt, device="cpu", precision="auto"):
        from train import load_for_inference
        self.ckpt = Path(ckpt)
        self.device = device
        self.bf16 = use_bf16(precision, device)
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

    def autocast(self):
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.bf16)

    @torch.no_grad()
    def sample_proposals(self, prefixes, guidance=None, steps=50, method="ddim", cfg_scale=1.0, seed=0, callback=None):
        """Continuation embeddings (B, d) on the unit sphere, sampled from the prior given the prefixes."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        e_p = self.embed(prefixes)
        x_p = standardize(e_p, self.mu, self.s)
        guidance = guidance.bind(e_p) if guidance is not None else None  # targets taken from the prefix
        with self.autocast():
            x = self.prior.sample(x_p, steps=steps, method=method, cfg_scale=cfg_scale, guidance=guidance,
                                  generator=gen, callback=callback)
        return unstandardize(x.float(), self.mu, self.s)  # e = normalize(mu + s x)

    @torch.no_grad()
    def decode(self, prefixes, e, alpha=None, max_new_tokens=32, top_p=0.9, temperature=DEFAULT_TEMPERATURE,
               repetition_penalty=1.2, seed=0, best_of=1):
        """Continuations of `prefixes` written from proposals e (B, d) on the unit sphere.

        best_of n > 1 decodes n candidates per proposal and keeps the one whose embedding is closest
        to the proposal (cosine): the text that best says what the prior proposed. It costs n decodes
        and n encodings, and uses neither a probe nor a judge.
        """
        B, n = len(prefixes), best_of
        gen = torch.Generator(device=self.device).manual_seed(seed + 1)
        with self.autocast():
            ids = self.decoder.generate(self.prefix_ids(list(prefixes) * n, max_new_tokens),
                                        standardize(e, self.mu, self.s).repeat(n, 1),  # candidate k of row b: k * B + b
                                        alpha=alpha, max_new_tokens=max_new_tokens, top_p=top_p,
                                        temperature=temperature, repetition_penalty=repetition_penalty, generator=gen)
        texts = [self.tokenizer.decode(i).strip() for i in ids]
        if n == 1:
            return texts
        cosine = (self.embed(texts).view(n, B, -1) * e[None]).sum(-1)  # (n, B); unit vectors
        return [texts[k * B + b] for b, k in enumerate(cosine.argmax(0).tolist())]

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
    p.add_argument("--best-of", type=int, default=1,
                   help="decode N candidates per proposal, keep the one whose embedding is closest to it")
    p.add_argument("--max-tokens", type=int, default=32, help="continuation length in tokens")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="sampling temperature (0 = greedy)")
    p.add_argument("--repetition-penalty", type=float, default=1.2, help="CTRL-style repetition penalty")
    p.add_argument("--show-steps", action="store_true", help="print the decoded proposal at several denoising steps")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to run")
    add_sampling_args(p)
    args = p.parse_args(argv)
    try:
        args.scale = float(args.scale)
    except ValueError:
        p.error(f"--scale {args.scale!r} is not a number")
    if args.n < 1 or args.best_of < 1:
        p.error("--n and --best-of must be at least 1")
    return args


def main(args):
    from train import pick_device
    device = pick_device(args.device)
    model = DGLM(args.ckpt, device, args.precision)
    guidance = model.guidance(args.guide, args.scale, n_samples=args.mc_samples, seed=args.seed,
                              max_logsnr=args.guide_max_logsnr)
    prompts = read_prompts(args)
    decode = dict(alpha=args.alpha, max_new_tokens=args.max_tokens, top_p=args.top_p, best_of=args.best_of,
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
