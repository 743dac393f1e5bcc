"""Generate with DGLM, optionally steered by linear probes (plug-and-play control).

    python sample.py --guide positive                     # unguided vs guided, same seed, side by side
    python sample.py --guide negative:1,news:0.5 --prefix "The service was"
    python sample.py --guide positive --prompts prompts.txt --n 4 --out samples.jsonl
    python sample.py --guide positive --show-steps        # watch the proposal form while denoising
    python sample.py --like "The food was delicious." --prefix "Dinner"   # steer toward an example, no probe

Generation (DGLM sec. 3): embed the prefix -> sample a continuation latent x from the prior with
DDIM/DDPM, bending the noisy denoising steps with the probes' gradient (guide.py) -> the proposal
e = normalize(mu + s x) on the unit sphere -> its latent standardize(e) (what encoder.project_to_sphere computes)
re-noised at a = 0.95 -> soft prompt -> GPT-2 writes the continuation, without the words a guide
bars (guide.WORD_BARS: the tiny tier's negative guide bars negations; --no-word-bars lets them in).
Precision: bf16 autocast where the hardware computes in bf16 natively (CUDA; CPUs with AVX512-BF16
or AMX), fp32 elsewhere; --precision fp32 or bf16 overrides. The sentence encoder (prompts, --like
examples, --best-of candidates) runs in fp32 either way: a few texts, and the exact embedding.
"""
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data import input_file, not_utf8, text_lines
from decoder import barred_token_ids
from encoder import embed, load_encoder, standardize, unstandardize
from guide import build_guidance, guide_names, load_probes
from utils import (ArgumentParser, RawHelpFormatter, autocast, bounded, free_text, load_for_inference, nonempty_text,
                   output_file, path_arg, pick_device, run_cli, set_threads, shell, threads_flag,
                   use_bf16)

DEMO_PREFIXES = ["The movie", "I think that", "This product", "The city council"]
GUIDANCE_NOISE, DECODING_NOISE = 1, 2  # the roles of noise_seed


def noise_seed(seed, role):
    """The seed of one kind of noise in a generation seeded `seed`: the prior's noise takes seed itself,
    the guidance's Monte Carlo draws and the decoding's noise each a seed of their own drawn from (seed,
    role) by numpy's SeedSequence. Seeded with seed itself, the draws would be the prior's starting noise
    (one CPU generator, one stream); seeded seed + 1, the decoding would be the next seed's starting noise."""
    return int(np.random.SeedSequence([seed, role]).generate_state(1, np.uint64)[0])


@dataclass
class SamplingConfig:
    """Every sampling default, in one place (sample.py, evaluate.py and bench.py read these)."""
    steps: int = 15                 # denoising steps of the prior (15 steer as well as 25, 50 or 250: README)
    sampler: str = "ddim"           # ddim (deterministic) or ddpm (ancestral)
    cfg_scale: float = 1.0          # classifier-free guidance on the prefix (1: off)
    scale: float = 180.0            # guidance scale (0: unguided); the tiny tier's sweep chose 200 at 25 steps, and
                                    # 15 steps pull a tenth harder (README)
    guide_max_logsnr: float = -2.0  # guide the steps with logSNR <= this (the noisiest 22% of t: 4 of 15 DDIM steps)
    mc_samples: int = 32            # Monte Carlo samples of the guidance loss (0: x_hat itself)
    like_weight: float = 20.0       # weight of each --like / --unlike example's -cos (+cos) in the guidance loss
    signal_level: float | None = None  # a of the re-noised proposal (None: the checkpoint's, 0.95)
    max_tokens: int = 32            # continuation length in tokens
    min_tokens: int = 24            # no end-of-text before this many tokens (why 24: README)
    top_p: float = 0.9              # nucleus sampling mass
    temperature: float = 0.7        # 0: greedy
    repetition_penalty: float = 1.2  # CTRL-style, on the prompt's and the generated tokens
    best_of: int = 1                # decode N candidates per proposal, keep the closest to it
    word_bars: bool = True          # decode without the words a guide bars (guide.WORD_BARS; False: every word)


def add_sampling_args(p, guidance_scale=True):
    """The sampling options of sample.py, evaluate.py and bench.py, with SamplingConfig's defaults."""
    d = SamplingConfig()
    p.add_argument("--steps", type=bounded(int, 1, 10_000), default=d.steps, help="denoising steps of the prior")
    p.add_argument("--sampler", default=d.sampler, choices=["ddim", "ddpm"], help="prior sampler")
    p.add_argument("--cfg-scale", type=bounded(float, 0, 100), default=d.cfg_scale,
                   help="classifier-free guidance weight on the prefix (1 = off)")
    if guidance_scale:
        p.add_argument("--scale", type=bounded(float, 0, 1e6), default=d.scale,
                       help="guidance scale (default %(default)g; 0 = unguided)")
    p.add_argument("--guide-max-logsnr", type=bounded(float, -15, 15), default=d.guide_max_logsnr,
                   help="guide the denoising steps with logSNR <= this (default %(default)g: the noisiest 22%% of t, 4 "
                        "of 15 DDIM steps; 15 = every step)")
    p.add_argument("--mc-samples", type=bounded(int, 0, 4096), default=d.mc_samples,
                   help="Monte Carlo samples around x_hat for the guidance loss (0 = x_hat itself)")
    p.add_argument("--like", action="append", default=[], metavar="TEXT", type=nonempty_text,
                   help="steer toward the meaning of TEXT (repeatable; no probe needed; composes with the guides)")
    p.add_argument("--unlike", action="append", default=[], metavar="TEXT", type=nonempty_text,
                   help="steer away from TEXT (repeatable)")
    p.add_argument("--like-weight", type=bounded(float, 0, 1e4), default=d.like_weight,
                   help="weight of each --like / --unlike example in the guidance loss (default %(default)g)")
    p.add_argument("--signal-level", type=bounded(float, 0, 1), default=d.signal_level,
                   help="signal level a of the re-noised proposal (default: the checkpoint's, 0.95; 0 = ignore it)")
    p.add_argument("--max-tokens", type=bounded(int, 1, 100_000), default=d.max_tokens, help="continuation length in tokens")
    p.add_argument("--min-tokens", type=bounded(int, 0, 100_000), default=None,
                   help=f"no end-of-text before this many tokens (default: {d.min_tokens}, or --max-tokens if smaller)")
    p.add_argument("--top-p", type=bounded(float, 0, 1, low_open=True), default=d.top_p, help="nucleus sampling mass")
    p.add_argument("--temperature", type=bounded(float, 0, 100), default=d.temperature, help="sampling temperature (0 = greedy)")
    p.add_argument("--repetition-penalty", type=bounded(float, 1, 100), default=d.repetition_penalty,
                   help="CTRL-style repetition penalty (1 = off)")
    p.add_argument("--best-of", type=bounded(int, 1, 1024), default=d.best_of,
                   help="decode N candidates per proposal, keep the one whose embedding is closest to it")
    p.add_argument("--no-word-bars", dest="word_bars", action="store_false",
                   help="decode every word, also those a guide bars (the tiny tier's negative guide bars negations)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast where the hardware has native bf16 (CUDA, AVX512-BF16/AMX CPUs), else fp32")
    threads_flag(p.add_argument)


def sampling_config(args):
    """SamplingConfig from parsed arguments (options a script did not add keep their defaults). The
    default --min-tokens shrinks to a smaller --max-tokens; one given explicitly must fit in it."""
    values = {k: getattr(args, k) for k in SamplingConfig.__dataclass_fields__ if hasattr(args, k)}
    max_tokens = values.get("max_tokens", SamplingConfig.max_tokens)
    if values.get("min_tokens") is None:
        values["min_tokens"] = min(SamplingConfig.min_tokens, max_tokens)
    elif values["min_tokens"] > max_tokens:
        raise SystemExit(f"error: --min-tokens {values['min_tokens']} is more than --max-tokens {max_tokens}")
    return SamplingConfig(**values)


class DGLM:
    """Everything needed to generate, rebuilt from a checkpoint directory alone.

    precision: "auto" (bf16 autocast where utils.native_bf16(device), else fp32), "fp32" or "bf16".
    The sampler's state (z, the DDIM update) and the guidance loss stay in fp32 either way.
    """

    def __init__(self, ckpt, device="cpu", precision="auto"):
        self.ckpt = Path(ckpt)
        self.device = device
        self.bf16 = use_bf16(precision, device)
        self.config, self.prior, self.decoder, self.tokenizer, self.mu, self.s = load_for_inference(ckpt, device)
        self.encoder = None  # loaded on first use, after cheap checks such as the guide names
        self.warned_long_prompts = False  # said once, not for every setting decoded from the same prompts
        self.barred_ids = {}  # barred words -> their token ids (decoder.barred_token_ids), looked up once
        probe_path = self.ckpt / "probes.safetensors"
        self.probes, self.guides = load_probes(probe_path, self.config["encoder"], device) if probe_path.exists() \
            else ({}, {})

    def embed(self, texts):
        """Unit embeddings e (len(texts), d) of texts, by the checkpoint's encoder."""
        if self.encoder is None:
            self.encoder = load_encoder(self.config["encoder"], self.device)
        return torch.from_numpy(embed(self.encoder, texts)).to(self.device)

    def guidance(self, spec, sampling, like=(), unlike=()):
        """Guidance for a guide spec ('positive', 'negative:1,news:0.5'; 'none' or 'like': no probe) and
        example texts to steer toward (like) or away from (unlike); None when nothing steers."""
        if "like" in guide_names(spec) and not (like or unlike):
            raise SystemExit("error: the guide like steers by example: give it --like TEXT (or --unlike TEXT)")
        if spec not in (None, "", "none", "like") and not self.guides:
            paper = self.config.get("train", {}).get("tier") == "paper"  # its probes' data sets could not be reached
            add = f"`python guide.py --ckpt {shell(self.ckpt)} --probes paper` (--probe-data DIR for local copies of " \
                  "its data sets), or your own with --labels FILE" if paper else \
                f"`python guide.py --ckpt {shell(self.ckpt)} --labels FILE` (a text and a label per row)"
            raise SystemExit(f"error: {self.ckpt} has no probes.safetensors; add probes with {add}, steer by "
                             "example with --like, or sample unguided with --guide none")
        like_e, unlike_e = (self.embed(list(texts)) if texts else [] for texts in (like, unlike))
        return build_guidance(spec, self.probes, self.guides, self.mu, self.s, sampling.scale, like=like_e,
                              unlike=unlike_e, like_weight=sampling.like_weight, ckpt=self.ckpt,
                              n_samples=sampling.mc_samples, max_logsnr=sampling.guide_max_logsnr)

    def prompt_room(self, max_new_tokens):
        """Prompt tokens that fit beside max_new_tokens new ones; a one-line error when not one does (the
        prompts would be cut to nothing, and their continuations read as if they went on from them)."""
        room = self.decoder.room(max_new_tokens)
        if room < 1:
            raise SystemExit(f"error: --max-tokens {max_new_tokens} does not fit the decoder's context of "
                             f"{self.decoder.max_len} positions (at most {self.decoder.room(1)} new tokens after bos, "
                             f"the {self.decoder.config.n_soft} soft-prompt slots and a prompt)")
        return room

    def prefix_ids(self, prefix_texts, max_new_tokens):
        """Token ids of the prompts, cut to the context left after max_new_tokens (with a warning)."""
        room = self.prompt_room(max_new_tokens)
        ids = self.tokenizer(list(prefix_texts), add_special_tokens=False)["input_ids"]
        if any(len(i) > room for i in ids) and not self.warned_long_prompts:
            self.warned_long_prompts = True
            print(f"warning: prompts longer than {room} tokens are cut to their last {room} tokens "
                  f"(the decoder's context is {self.decoder.max_len} positions)", file=sys.stderr)
        return [i[len(i) - room:] for i in ids]

    @torch.no_grad()
    def sample_proposals(self, prefix_texts, guidance, sampling, seed, callback=None):
        """Proposals e (B, d) on the unit sphere, sampled from the prior given the prefixes."""
        if sampling.cfg_scale != 1 and not self.prior.config.p_uncond:  # its null prefix was never trained
            raise SystemExit(f"error: --cfg-scale {sampling.cfg_scale:g} needs the learned null prefix, which the "
                             f"prior of {self.ckpt} (trained with --no-null-prefix) does not have; leave --cfg-scale "
                             "at 1")
        gen = torch.Generator(device=self.device).manual_seed(seed)
        e_prefix = self.embed(prefix_texts)
        x_prefix = standardize(e_prefix, self.mu, self.s)
        if guidance is not None:  # "prefix" targets from the prefixes; Monte Carlo noise of its own seed
            guidance = guidance.bind(e_prefix, noise_seed(seed, GUIDANCE_NOISE))
        with autocast(self.device, self.bf16):
            x = self.prior.sample(x_prefix, steps=sampling.steps, method=sampling.sampler,
                                  cfg_scale=sampling.cfg_scale, guidance=guidance, generator=gen, callback=callback)
        return unstandardize(x.float(), self.mu, self.s)  # e = normalize(mu + s x)

    @torch.no_grad()
    def decode(self, prefix_texts, e, sampling, seed, barred=frozenset()):
        """Continuations of the prompts written from proposals e (B, d) on the unit sphere, without the
        words `barred` (a guidance's, see guide.WORD_BARS) unless sampling.word_bars is off.

        best_of n > 1 decodes n candidates per proposal and keeps the one whose embedding is closest
        to the proposal (cosine): the text that best says what the prior proposed. It costs n decodes
        and n encodings, and uses neither a probe nor a judge.
        """
        B, n = len(prefix_texts), sampling.best_of
        gen = torch.Generator(device=self.device).manual_seed(noise_seed(seed, DECODING_NOISE))
        x = standardize(e, self.mu, self.s).repeat(n, 1)  # candidate k of row b: k * B + b
        barred = barred if sampling.word_bars else frozenset()
        if barred and barred not in self.barred_ids:
            self.barred_ids[barred] = barred_token_ids(self.tokenizer, barred)
        with autocast(self.device, self.bf16):
            ids = self.decoder.generate(self.prefix_ids(list(prefix_texts) * n, sampling.max_tokens), x,
                                        a=sampling.signal_level, max_new_tokens=sampling.max_tokens,
                                        min_new_tokens=sampling.min_tokens,
                                        top_p=sampling.top_p, temperature=sampling.temperature,
                                        repetition_penalty=sampling.repetition_penalty,
                                        barred_ids=self.barred_ids[barred] if barred else None, generator=gen)
        texts = [self.tokenizer.decode(i).strip() for i in ids]
        if n == 1:
            return texts
        cosine = (self.embed(texts).view(n, B, -1) * e[None]).sum(-1)  # (n, B); unit vectors
        return [texts[k * B + b] for b, k in enumerate(cosine.argmax(0).tolist())]

    def generate_in_batches(self, prefix_texts, guidance, sampling, seed, batch_size=100):
        """Yield (proposals e (b, d), continuations) for batch_size rows at a time, the batch from row i
        seeded seed + i; the same seed gives the same noise guided or not."""
        for i in range(0, len(prefix_texts), batch_size):
            chunk = list(prefix_texts[i:i + batch_size])
            e = self.sample_proposals(chunk, guidance, sampling, seed + i)
            yield e, self.decode(chunk, e, sampling, seed + i, guidance.barred if guidance is not None else frozenset())

    def generate(self, prefix_texts, guidance, sampling, seed, batch_size=100, progress=None, on_batch=None):
        """Continuations of the prompts (one each), batch_size rows at a time (generate_in_batches);
        progress: the label of a progress bar over the rows, shown when they take more than one batch;
        on_batch(first_row, texts): called with each batch as it is done (sample.py --out writes it then)."""
        texts = []
        with tqdm(total=len(prefix_texts), desc=progress, unit=" samples", leave=False,
                  disable=progress is None or len(prefix_texts) <= batch_size) as bar:
            for _, batch in self.generate_in_batches(prefix_texts, guidance, sampling, seed, batch_size):
                if on_batch is not None:
                    on_batch(len(texts), batch)
                texts += batch
                bar.update(len(batch))
        return texts


def read_prompt_file(path):
    """One prompt per line; a missing, unreadable or empty file is a one-line error."""
    path = input_file(path, "prompt file", "a file with one prompt per line")
    try:
        prompts = text_lines(path)
    except UnicodeDecodeError as err:
        raise SystemExit(f"error: cannot read prompt file {path}: {not_utf8(err)}") from None
    except OSError as err:
        raise SystemExit(f"error: cannot read prompt file {path} ({err})") from None
    if not prompts:
        raise SystemExit(f"error: prompt file {path} is empty (expected one prompt per line)")
    return prompts


def show_steps(model, prefix, guidance, label, sampling, seed):
    """Decode the predicted proposal x_hat at a few points of the trajectory, unguided and (with a guide) guided."""
    steps = sampling.steps
    points = sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps - 1})
    for name, g in [("unguided", None)] + ([(label, guidance)] if guidance is not None else []):
        trajectory = []
        model.sample_proposals([prefix], g, sampling, seed,
                               callback=lambda i, lam, x_hat: trajectory.append((i, lam, x_hat.clone())) if i in points else None)
        print(f"\n[{name}] {prefix!r}: the proposal x_hat while denoising")
        for i, lam, x_hat in trajectory:
            text = model.decode([prefix], unstandardize(x_hat.float(), model.mu, model.s), sampling, seed,
                                g.barred if g is not None else frozenset())[0]
            print(f"  step {i + 1:3d}/{steps}  logSNR {lam:+6.1f}  {prefix} {text}")


def get_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=RawHelpFormatter)
    p.add_argument("--ckpt", type=path_arg, default="out", help="checkpoint directory written by train.py")
    p.add_argument("--guide", default=None,
                   help="guide name(s): 'positive', 'negative:1,news:0.5', or 'none' (default: positive, or none "
                        "with --like / --unlike)")
    p.add_argument("--prefix", "--prompt", default=None, type=free_text, help="one prefix to continue ('' for none)")
    p.add_argument("--prompts", type=path_arg, default=None,
                   help="file with one prefix per line (one prefix: --prefix TEXT)")
    p.add_argument("--n", type=bounded(int, 1, 100_000), default=None, help="samples per prefix (default 2)")
    p.add_argument("--batch-size", type=bounded(int, 1, 100_000), default=100,
                   help="rows generated at once (prompts x --n in batches of this many; less memory when smaller)")
    p.add_argument("--seed", type=bounded(int, 0, 2 ** 62), default=0,
                   help="random seed (same seed -> same noise guided or not)")
    p.add_argument("--out", type=output_file, default=None,
                   help="write JSON lines {prefix, text, guide, like, unlike, scale, seed, batch_size} here (a file "
                        "there is replaced), each batch as it is done (scale 0: unguided; the seed and batch size "
                        "draw a row's noise)")
    p.add_argument("--show-steps", action="store_true",
                   help="print the decoded proposal at several denoising steps (one sample of one --prefix)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to run")
    add_sampling_args(p)
    args = p.parse_args(argv)
    if args.prefix is not None and args.prompts is not None:
        p.error("--prefix and --prompts: give one (a prefix, or a file of them)")
    if args.show_steps and (args.out or args.prompts is not None or (args.n or 1) > 1):  # it would show the
        p.error("--show-steps prints one sample's denoising to the screen: give it --prefix, not --prompts, --out "
                "or --n")  # first prompt's first sample, write nothing
    if args.guide is not None and not args.guide.strip():
        p.error("argument --guide: is empty (a guide name, or none)")
    args.n = args.n or 2
    return args


def main(args):
    set_threads(args.threads)
    sampling = sampling_config(args)
    model = DGLM(args.ckpt, pick_device(args.device), args.precision)
    model.prompt_room(sampling.max_tokens)  # before any work
    args.guide = args.guide or ("none" if args.like or args.unlike else "positive")
    guidance = model.guidance(args.guide, sampling, args.like, args.unlike)
    label = "+".join([part.strip() for part in re.split(r"[,+]", args.guide) if part.strip() not in ("none", "like")]
                     + [f"like {t!r}" for t in args.like] + [f"unlike {t!r}" for t in args.unlike])  # like: once
    if guidance is None and label:  # positive:0: the unguided rows, shown once
        print(f"note: --guide {args.guide} steers nothing (every weight is 0): the samples are unguided",
              file=sys.stderr)
    prompts = read_prompt_file(args.prompts) if args.prompts is not None else [args.prefix] if args.prefix is not None \
        else DEMO_PREFIXES
    if args.show_steps:
        show_steps(model, prompts[0], guidance, label, sampling, args.seed)
        return
    prefixes = [p for p in prompts for _ in range(args.n)]
    if args.out:  # each batch written as it is done: an interrupted run keeps the rows it made
        def write(first_row, texts):  # the file is replaced once the first batch is there, then appended to
            with open(args.out, "a" if first_row else "w", encoding="utf-8") as f:
                for prefix, text in zip(prefixes[first_row:first_row + len(texts)], texts):
                    f.write(json.dumps({"prefix": prefix, "text": text, "guide": args.guide, "like": args.like,
                                        "unlike": args.unlike, "scale": args.scale if guidance is not None else 0.0,
                                        "seed": args.seed, "batch_size": args.batch_size}) + "\n")
        model.generate(prefixes, guidance, sampling, args.seed, args.batch_size, label, on_batch=write)
        print(f"wrote {len(prefixes)} sample{'s' if len(prefixes) > 1 else ''} to {args.out}")
        return
    width = max(len("unguided"), len(label) if guidance is not None else 0)

    def show(first_row, guided):  # each batch printed as it is done, beside the unguided rows of the same noise
        rows = prefixes[first_row:first_row + len(guided)]  # one batch, seeded as generate seeds it (seed + first row)
        unguided = model.generate(rows, None, sampling, args.seed + first_row, len(rows)) if guidance is not None \
            else guided
        for i, (prefix, u, g) in enumerate(zip(rows, unguided, guided), first_row):
            if i % args.n == 0:
                tqdm.write(f"\n=== {prefix!r}")
            tqdm.write(f"  {'unguided':<{width}} | {prefix} {u}")
            if guidance is not None:
                tqdm.write(f"  {label:<{width}} | {prefix} {g}")
    model.generate(prefixes, guidance, sampling, args.seed, args.batch_size, label, on_batch=show)


if __name__ == "__main__":
    run_cli(lambda: main(get_args()), interrupted="interrupted: the batches finished are in --out where given")
