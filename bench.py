"""Time DGLM generation against plain decoding, or the two training steps, in one process and one run.

    python bench.py --ckpt out                                   # the tiny checkpoint, CPU or GPU
    python bench.py --config paper --device cuda                 # paper-sized random models, no download
    python bench.py --steps 20 --max-tokens 64 --batch-sizes 1,16,64 --profile
    python bench.py --train --config paper --device cuda         # training steps: time, memory, MFU
    python bench.py --embed --batch-sizes 32,128,512             # the sentence encoder: texts/s, MFU
    python bench.py --train --ckpt out --profile                 # where a step's time goes, op by op

--train times train.py's prior_step and decoder_step (AdamW, clipping, bf16 autocast where native) on
random latents and token ids at the batch of train.py's paper tier (256 for the prior, 64 sequences of
88 + 10 tokens for the decoder) or of --ckpt's run (the tiny tier's: 256 and 32 of 48 + 10), split into
the micro-batches the memory estimate allows on the GPU (--micro-batch / --decoder-micro-batch
override): seconds per step, samples and tokens per second, peak memory and model FLOP utilisation
(budget.py) for each.

--embed times the sentence encoder (--encoder, default --ckpt's) embedding --n-texts texts of --texts (the
tiny corpus, or a file) as train.py embeds a corpus, with --batch-sizes texts per forward pass: texts/s,
and TFLOP/s and MFU from the matmuls of its linear layers.

For each batch size B (the same B prompts everywhere):
  plain          the decoder's own generate() through DGLM.decode, m tokens, soft-prompt slots included,
                 at a = 0 (soft prompt from pure noise, no hidden_cond bias): the decoder as a plain
                 prefix LM, GPT-2 decoding of the prompts without the prior. (Not a random proposal at
                 a = 0.95: through hidden_cond an off-manifold vector makes every next-token distribution
                 so peaked that top-p sampling gets cheaper than on any real proposal.)
  DGLM unguided  DGLM.sample_proposals (embed the prompts, k DDIM steps of the prior) + DGLM.decode
  DGLM guided    the same with probe guidance (--guide at --scale, K = 32 Monte Carlo samples, as
                 sample.py uses): the denoiser's forward and backward on the guided steps
                 (logSNR <= --guide-max-logsnr: 4 of 15 by default), its forward alone on the others
and a breakdown (prompt embedding, prior alone with and without guidance, guidance with K = 0).
Every row decodes exactly m tokens: the bench holds end-of-text back for all m (--min-tokens m), so
an early end cannot make one side cheaper.
After one warm-up, each of --repeats rounds runs every row once in turn (so a slow spell of the machine
falls on every row alike); times are the medians over rounds, and each ratio is the median of the
rounds' own ratios. CUDA is synchronised around each run. Both sides run at the same precision,
sample.DGLM's: bf16 autocast where the hardware has native bf16 (CUDA, AVX512-BF16/AMX CPUs), else
fp32; --precision overrides. The last line is
`ratio guided/plain = X.XX` at the last batch size (defaults: DDIM 15 steps, 32 tokens, batch 64).

--config paper builds the paper's sizes with random weights (prior 12 x 768 over 32 tokens;
gpt2-large's architecture, 36 x 1280, vocab 50257; soft prompt 6 x 768), random prompt token ids
and random prompt embeddings: no encoder, tokenizer or hub access, so the sentence encoder's cost
(sentence-t5-xl on the paper tier) is not included there.
"""
import random
import statistics
import time
import zlib
from dataclasses import replace

import torch
import torch.nn.functional as F
from transformers import GPT2Config

import budget
import data as data_lib
import train
from encoder import embed, load_encoder
from sample import DEMO_PREFIXES, DGLM, add_sampling_args, sampling_config
from utils import (ArgumentParser, Checkpoint, RawHelpFormatter, autocast, bounded, build_models, comma_list,
                   folder, keep_freed_memory, path_arg, pick_device, run_cli, set_threads, use_bf16)


class RandomTokenizer:
    """Stand-in tokenizer for --config paper: a fixed pseudo-random id list per prompt."""

    def __init__(self, vocab_size, n_tokens=8):
        self.vocab_size, self.n_tokens = vocab_size, n_tokens

    def ids(self, text):
        g = torch.Generator().manual_seed(zlib.crc32(text.encode("utf-8")))
        return torch.randint(0, self.vocab_size - 1, (self.n_tokens,), generator=g).tolist()

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [self.ids(t) for t in texts]}

    def decode(self, ids):
        return " ".join(map(str, ids))


PAPER_LM = dict(vocab_size=50257, n_layer=36, n_embd=1280, n_head=20, n_positions=1024)  # gpt2-large's architecture
PAPER_DIM = 768  # sentence-t5-xl's embedding width


class RandomDGLM(DGLM):
    """DGLM with the paper tier's sizes and random weights (no checkpoint, encoder or download).
    Sampling and decoding are DGLM's own methods; only embed() (random unit vectors) differs."""

    def __init__(self, device="cpu", seed=0, precision="auto"):
        tier, dim = train.TIERS["paper"], PAPER_DIM
        eos = PAPER_LM["vocab_size"] - 1  # GPT-2's <|endoftext|>
        lm_config = GPT2Config(**PAPER_LM, bos_token_id=eos, eos_token_id=eos).to_dict()
        self.config = dict(encoder="random", prior=dict(tier["prior"], dim=dim),
                           decoder=dict(tier["decoder"], lm=tier["lm"], dim=dim),
                           lm_config=lm_config, bos_id=eos, eos_id=eos)
        torch.manual_seed(seed)
        prior, decoder = build_models(self.config)  # random GPT-2 from the config: nothing is downloaded
        with torch.no_grad():
            for p in prior.parameters():  # the zero-initialised layers would make guidance's gradient trivial
                if not p.any():
                    p.normal_(0, 0.02)
        self.ckpt, self.device = "random paper-sized models", device
        self.bf16 = use_bf16(precision, device)
        self.prior, self.decoder = prior.to(device).eval(), decoder.to(device).eval()
        self.tokenizer = RandomTokenizer(lm_config["vocab_size"])
        self.mu = torch.zeros(dim, device=device)
        self.s = torch.full((dim,), dim ** -0.5, device=device)
        self.encoder = None
        self.probes = {"sentiment": (F.normalize(torch.randn(dim), dim=0).mul(8).to(device), torch.tensor(0.0, device=device))}
        self.guides = {"positive": ("sentiment", 1), "negative": ("sentiment", 0)}

    def embed(self, texts):
        g = torch.Generator().manual_seed(zlib.crc32("\n".join(texts).encode("utf-8")))
        return F.normalize(torch.randn(len(texts), self.mu.shape[0], generator=g), dim=-1).to(self.device)


def fixed_length(args):
    """The sampling options of args with end-of-text held back for all --max-tokens tokens."""
    return replace(sampling_config(args), min_tokens=args.max_tokens)


def sync(device):
    """Wait for the GPU's queued work, so that a time is the work's, not its launch's."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    elif str(device) == "mps":  # --device auto picks an Apple GPU where there is one
        torch.mps.synchronize()


def timed_rounds(runs, device, repeats):
    """Wall times of each of `runs` {name: fn} over `repeats` rounds (after the caller's warm-up), every
    run once a round in turn, so that a slow spell of the machine falls on all of them alike, not on
    whichever was being timed then: -> {name: [seconds, one per round]}."""
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            sync(device)
            started = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - started)
    return times


def timed(fn, device, repeats):
    """Median wall time of fn() over `repeats` runs (after the caller's warm-up)."""
    return statistics.median(timed_rounds({"fn": fn}, device, repeats)["fn"])


def paired_ratio(times, a, b):
    """The median over rounds of run a's time over run b's in the same round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def bench_batch(model, batch, args):
    prefixes = [DEMO_PREFIXES[i % len(DEMO_PREFIXES)] for i in range(batch)]
    d = model.mu.shape[0]
    random_e = F.normalize(torch.randn(batch, d, generator=torch.Generator().manual_seed(1)), dim=-1).to(model.device)
    sampling = fixed_length(args)
    guided = model.guidance(args.guide, sampling, args.like, args.unlike)
    guided_k0 = model.guidance(args.guide, replace(sampling, mc_samples=0), args.like, args.unlike)
    plain = replace(sampling, signal_level=0.0)
    decode = lambda e, s=sampling, barred=frozenset(): model.decode(prefixes, e, s, seed=0, barred=barred)
    propose = lambda g: model.sample_proposals(prefixes, g, sampling, seed=0)
    runs = {
        "plain": lambda: decode(random_e, plain),
        "unguided": lambda: decode(propose(None)),
        "guided": lambda: decode(propose(guided), barred=guided.barred),  # as sample.py: the guide's word bars
        "embed": lambda: model.embed(prefixes),
        "prior": lambda: propose(None),
        "prior_guided": lambda: propose(guided),
        "prior_guided_k0": lambda: propose(guided_k0),
    }
    with autocast(model.device, model.bf16):
        ids = model.decoder.generate(model.prefix_ids(prefixes, args.max_tokens), random_e,
                                     max_new_tokens=args.max_tokens, min_new_tokens=sampling.min_tokens,
                                     top_p=sampling.top_p, temperature=sampling.temperature,
                                     repetition_penalty=sampling.repetition_penalty)
    assert all(len(row) == args.max_tokens for row in ids), "a row ended early despite the masked end-of-text"
    for fn in runs.values():  # warm-up once per shape
        fn()
    times = timed_rounds(runs, model.device, args.repeats)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {**medians, "unguided/plain": paired_ratio(times, "unguided", "plain"),
            "guided/plain": paired_ratio(times, "guided", "plain")}


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")


def print_profile(fn, device, what):
    """torch.profiler over fn(): the top ops by self time, and the share of it in matrix products."""
    from torch.profiler import ProfilerActivity, profile
    cuda = str(device).startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    ops = prof.key_averages()
    # the share: over the operators (a kernel's GPU time is its operator's too; summing both would count it twice)
    operators = [op for op in ops if op.device_type == torch.autograd.DeviceType.CPU]
    total = sum(getattr(op, key) for op in operators)
    share = sum(getattr(op, key) for op in operators if op.key in MATMUL_OPS) / max(total, 1)
    print(f"\nprofile of {what} (top ops by {key}):")
    print(ops.table(sort_by=key, row_limit=15))
    names = ", ".join(op.removeprefix("aten::") for op in MATMUL_OPS)
    print(f"matrix products ({names}): {share:.0%} of the self time")
    return share


def profile_guided(model, batch, args):
    """torch.profiler over one guided generation: where the time goes."""
    prefixes = [DEMO_PREFIXES[i % len(DEMO_PREFIXES)] for i in range(batch)]
    sampling = fixed_length(args)
    guided = model.guidance(args.guide, sampling, args.like, args.unlike)
    print_profile(lambda: model.decode(prefixes, model.sample_proposals(prefixes, guided, sampling, 0), sampling, 0,
                                       guided.barred), model.device, f"one guided generation, batch {batch}")


# ----------------------------------------------------------------------------- training steps


def random_models(args, device):
    """(config, prior, decoder) with random weights: the paper tier's sizes (gpt2-large's architecture,
    no download), or the sizes in --ckpt's config."""
    if args.config == "paper":
        eos = PAPER_LM["vocab_size"] - 1
        config = dict(prior=dict(train.TIERS["paper"]["prior"], dim=PAPER_DIM),
                      decoder=dict(train.TIERS["paper"]["decoder"], lm="gpt2-large", dim=PAPER_DIM),
                      lm_config=GPT2Config(**PAPER_LM, bos_token_id=eos, eos_token_id=eos).to_dict(), bos_id=eos,
                      eos_id=eos)
    else:
        config = Checkpoint(args.ckpt).config
    torch.manual_seed(0)
    prior, decoder = build_models(config)
    return config, prior.to(device).train(), decoder.to(device).train()


def peak_text(peak, where):
    """The device's peak FLOP/s as bench's headers name it (peak None: not in budget.py's table)."""
    return f"peak {f'{peak / 1e12:.1f} TFLOP/s' if peak else 'unknown, no MFU (pass --peak-tflops)'} ({where})"


def rate(flops, seconds, peak):
    """'X TFLOP/s, MFU Y%' of `flops` done in `seconds` (MFU n/a without a peak)."""
    return f"{flops / seconds / 1e12:.2f} TFLOP/s, MFU {f'{100 * flops / seconds / peak:.1f}%' if peak else 'n/a'}"


def time_steps(step, repeats, device):
    """Median seconds of step() over `repeats` runs after one warm-up, and the peak memory (bytes) of CUDA."""
    step()
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, device, repeats)
    peak = torch.cuda.max_memory_allocated() if str(device).startswith("cuda") else None
    return seconds, peak


def bench_train(args, device):
    """--train: the prior and decoder training steps at the tier's batch, as train.py runs them."""
    keep_freed_memory()  # as train.py does
    config, prior, decoder = random_models(args, device)
    run = vars(train.get_args(["--data", "c4"] if args.config == "paper" else []))
    run.update(config.get("train", {}) if args.config == "ckpt" else {})  # the checkpoint's run: its batches, lengths
    bf16 = use_bf16(args.precision, device)
    B, D = run["batch_size"], run["decoder_batch"]
    seq = min(data_lib.C4_TOKENS, run["max_len"]) if run["data"] == "c4" else run["max_len"]  # a text's tokens
    n = seq + config["decoder"]["n_soft"] + 2  # a decoder sequence: bos, the text, the slots and eos
    prior_micro, decoder_micro = args.micro_batch or B, args.decoder_micro_batch or D
    if str(device).startswith("cuda") and not (args.micro_batch and args.decoder_micro_batch):
        sizes = {"prior": sum(p.numel() for p in prior.parameters()),
                 "soft_prompt": sum(p.numel() for p in decoder.soft.parameters()),
                 "lm": sum(p.numel() for p in decoder.lm.parameters()), "encoder": None}
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        planned = budget.plan_micro_batches(sizes, config["prior"], config["lm_config"], n, B, D, total,
                                            args.grad_checkpointing)
        if planned[0] is None:
            raise SystemExit(f"error: the training steps do not fit in {total / budget.GiB:.0f} GiB even at "
                             f"micro-batch 1 ({budget.format_estimate(planned[2])}); try --grad-checkpointing")
        prior_micro, decoder_micro = args.micro_batch or planned[0], args.decoder_micro_batch or planned[1]
    if args.grad_checkpointing:
        decoder.checkpoint_activations()
    if args.compile:  # as train.py --compile: what the two steps call (compiled in the warm-up step)
        prior.net.compile()
        decoder.lm.transformer.compile()
    g = torch.Generator().manual_seed(0)
    d, vocab = config["prior"]["dim"], config["lm_config"]["vocab_size"]
    x, x_prefix = torch.randn(B, d, generator=g).to(device), torch.randn(B, d, generator=g).to(device)
    split = torch.randint(0, seq, (D,), generator=g).tolist()
    tokens = torch.randint(0, vocab - 1, (D, seq), generator=g).tolist()
    prefix_ids, cont_ids = [t[:k] for t, k in zip(tokens, split)], [t[k:] for t, k in zip(tokens, split)]
    opt_prior = torch.optim.AdamW(prior.parameters(), lr=1e-4, fused=True)  # fused, as train.py (the rate: no matter)
    opt_decoder = torch.optim.AdamW(decoder.parameters(), lr=1e-6, fused=True)
    amp = lambda: autocast(device, bf16)
    rows = lambda n, m: train.micro_batches(n, 0, 1, m)
    peak, where = budget.peak_flops(device, bf16, args.peak_tflops)
    runs = {"prior": (lambda: train.prior_step(prior, prior, opt_prior, x, x_prefix, rows(B, prior_micro), 1, amp),
                      B, prior_micro, 3 * prior.flops_per_example() * B),
            "decoder": (lambda: train.decoder_step(decoder, decoder, opt_decoder, x[:D], prefix_ids, cont_ids,
                                                   rows(D, decoder_micro), 1, amp),
                        D, decoder_micro, 3 * D * decoder.flops_per_sequence(n))}
    n_params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    print(f"{'paper-sized random models' if args.config == 'paper' else args.ckpt} on {device} "
          f"({'bf16 autocast' if bf16 else 'fp32'}{', torch.compile' if args.compile else ''}): "
          f"prior {n_params(prior):.1f}M, decoder {n_params(decoder.lm):.1f}M "
          f"+ soft prompt {n_params(decoder.soft):.1f}M params; {peak_text(peak, where)}; "
          f"median of {args.repeats} steps after a warm-up")
    report = {}
    for name, (step, batch, micro, flops) in runs.items():
        seconds, memory = time_steps(lambda: step().item(), args.repeats, device)
        report[name] = dict(seconds=seconds, memory=memory, mfu=peak and flops / seconds / peak)
        memory = f"{memory / budget.GiB:.1f} GiB" if memory is not None else "n/a on a CPU"
        unit = f"{batch * n / seconds:.0f} tokens/s" if name == "decoder" else f"{batch / seconds:.0f} samples/s"
        print(f"{name:>7} step: batch {batch} in micro-batches of {min(micro, batch)}: {seconds:.3f} s, {unit}, "
              f"{rate(flops, seconds, peak)}, peak memory {memory}")
    if args.profile:  # after the timing, so that the profiler's overhead stays out of it
        for name, (step, batch, _, _) in runs.items():
            report[name]["matmul_share"] = print_profile(step, device, f"one {name} step, batch {batch}")
    return report


# ----------------------------------------------------------------------------- embedding


def bench_embed(args, device):
    """--embed: the sentence encoder embedding --n-texts texts as train.py embeds a corpus (encoder.embed,
    bf16 where native), at each --batch-sizes value as texts per forward pass: texts/s, and the TFLOP/s
    and MFU of its linear layers (2 FLOPs per weight per token; attention's own products left out)."""
    if args.texts == "c4":  # before the checkpoint is read: this is what is wrong
        raise SystemExit("error: --texts c4 is a stream, not a file to sample; pass tiny or a .txt / .jsonl file")
    name = args.encoder or (train.TIERS["paper"]["encoder"] if args.config == "paper"
                            else Checkpoint(args.ckpt).config["encoder"])
    rows = data_lib.load_corpus(args.texts, args.cache_dir)
    texts = random.Random(0).sample([r["text"] for r in rows], min(args.n_texts, len(rows)))
    bf16 = use_bf16(args.precision, device)
    model = load_encoder(name, device, "bf16" if bf16 else None)
    tokens = sum(min(len(ids), model.max_seq_length) for ids in model.tokenizer(texts)["input_ids"])
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    flops = 2 * weights * tokens
    peak, where = budget.peak_flops(device, bf16, args.peak_tflops)
    print(f"{name} on {device} ({'bf16' if bf16 else 'fp32'}, {torch.get_num_threads()} CPU threads): "
          f"{len(texts)} texts of {args.texts}, {tokens / len(texts):.1f} tokens each on average; linear layers "
          f"{weights / 1e6:.1f}M weights; {peak_text(peak, where)}; "
          f"median of {args.repeats} rounds after a warm-up")
    for batch in args.batch_sizes:  # warm-up
        embed(model, texts[:2 * batch], batch)
    times = timed_rounds({batch: (lambda b=batch: embed(model, texts, b)) for batch in args.batch_sizes}, device,
                         args.repeats)
    report = {}
    for batch, t in times.items():
        seconds = statistics.median(t)
        report[batch] = dict(seconds=seconds, texts_per_s=len(texts) / seconds, mfu=peak and flops / seconds / peak)
        print(f"batch {batch:>5}: {seconds:.2f} s, {len(texts) / seconds:.0f} texts/s, {tokens / seconds:.0f} tokens/s, "
              f"{rate(flops, seconds, peak)}")
    if args.profile:
        batch = args.batch_sizes[-1]
        print_profile(lambda: embed(model, texts, batch), device, f"embedding the {len(texts)} texts, batch {batch}")
    return report


# ----------------------------------------------------------------------------- command line


def get_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=RawHelpFormatter)
    p.add_argument("--ckpt", type=path_arg, default="out", help="checkpoint directory (ignored with --config paper)")
    p.add_argument("--config", default="ckpt", choices=["ckpt", "paper"],
                   help="ckpt: the models in --ckpt; paper: paper-sized random models (no download)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to run")
    p.add_argument("--repeats", type=bounded(int, 1, 1000), default=5, help="timed runs per measurement (the median is reported)")
    p.add_argument("--batch-sizes", type=comma_list(bounded(int, 1, 1e5)), default="1,64",
                   help="comma-separated batch sizes; the last one gives the final ratio")
    p.add_argument("--guide", default="positive", help="guide of the guided run")
    p.add_argument("--profile", action="store_true",
                   help="also print torch.profiler's top ops of one guided run (--train: of each step; --embed: of the "
                        "last batch size)")
    p.add_argument("--train", action="store_true", help="time the two training steps instead of generation")
    p.add_argument("--embed", action="store_true",
                   help="time the sentence encoder instead, --batch-sizes texts per forward pass (e.g. 32,128,512)")
    p.add_argument("--encoder", type=path_arg, default=None,
                   help="--embed: the encoder (default: --ckpt's, or the paper tier's)")
    p.add_argument("--texts", type=path_arg, default="tiny",
                   help="--embed: tiny (the corpus, fetched into --cache-dir) or a .txt/.jsonl file")
    p.add_argument("--n-texts", type=bounded(int, 1, 1e7), default=2000, help="--embed: how many of them (a seeded sample)")
    p.add_argument("--cache-dir", type=folder, default="cache",
                   help="--embed: train.py's --cache-dir, where the tiny corpus is")
    p.add_argument("--micro-batch", type=bounded(int, 1, 1e6), default=None, help="--train: the prior's micro-batch")
    p.add_argument("--decoder-micro-batch", type=bounded(int, 1, 1e6), default=None,
                   help="--train: the decoder's micro-batch")
    p.add_argument("--grad-checkpointing", action="store_true", help="--train: recompute GPT-2's activations")
    p.add_argument("--compile", action="store_true",
                   help="--train: torch.compile the denoiser and GPT-2, as train.py --compile")
    p.add_argument("--peak-tflops", type=bounded(float, 0, 1e6, low_open=True), default=None,
                   help="--train, --embed: the device's peak bf16 TFLOP/s for MFU (default: budget.py's table, measured on a CPU)")
    add_sampling_args(p)
    return p.parse_args(argv)


def main(args):
    device = pick_device(args.device)
    set_threads(args.threads)
    if args.train and args.embed:
        raise SystemExit("error: --train and --embed time different things; give one")
    if args.train:
        return bench_train(args, device)
    if args.embed:
        return bench_embed(args, device)
    if args.config == "paper":
        model = RandomDGLM(device, precision=args.precision)
    else:
        model = DGLM(args.ckpt, device, args.precision)
    model.prompt_room(args.max_tokens)  # before anything is printed
    if model.guidance(args.guide, sampling_config(args), args.like, args.unlike) is None:
        raise SystemExit("error: --guide none has nothing to compare; pick a guide such as positive, or --like TEXT")
    n_params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    precision = "bf16 autocast" if model.bf16 else "fp32"
    print(f"{model.ckpt} on {device} ({torch.get_num_threads()} CPU threads, {precision}): "
          f"prior {n_params(model.prior):.1f}M, decoder {n_params(model.decoder.lm):.1f}M + soft prompt "
          f"{n_params(model.decoder.soft):.1f}M params")
    print(f"{args.sampler.upper()} {args.steps} steps | {args.max_tokens} tokens per row (end-of-text masked) | "
          f"guide {args.guide}, "
          f"scale {args.scale:g}, K = {args.mc_samples}, guided while logSNR <= {args.guide_max_logsnr:g} | "
          f"median of {args.repeats} rounds after a warm-up | seconds per batch\n")
    rows = []
    for batch in args.batch_sizes:
        rows.append((batch, bench_batch(model, batch, args)))
    head = ("batch", "plain", "DGLM unguided", "DGLM guided", "unguided/plain", "guided/plain")
    print(" | ".join(f"{h:>14}" for h in head))
    for batch, t in rows:
        print(" | ".join(f"{v:>14}" for v in (batch, f"{t['plain']:.3f}", f"{t['unguided']:.3f}", f"{t['guided']:.3f}",
                                                f"{t['unguided/plain']:.2f}", f"{t['guided/plain']:.2f}")))
    print("\nbreakdown (seconds per batch): prior times include embedding the prompts")
    head = ("batch", "embed prompts", "prior", "prior+guidance", "prior+guid. K=0", "decode (plain)")
    print(" | ".join(f"{h:>14}" for h in head))
    for batch, t in rows:
        print(" | ".join(f"{v:>14}" for v in (batch, f"{t['embed']:.3f}", f"{t['prior']:.3f}", f"{t['prior_guided']:.3f}",
                                                f"{t['prior_guided_k0']:.3f}", f"{t['plain']:.3f}")))
    if args.profile:
        profile_guided(model, args.batch_sizes[-1], args)
    batch, t = rows[-1]
    print(f"\n{args.sampler.upper()} {args.steps} steps, {args.max_tokens} tokens, batch {batch}:")
    print(f"ratio guided/plain = {t['guided/plain']:.2f}")


if __name__ == "__main__":
    run_cli(lambda: main(get_args()))
