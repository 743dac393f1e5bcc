"""Train DGLM: one loop that alternates a prior step and a decoder step on the same batch (the decoder
on its first --decoder-batch rows).

    python train.py                          # tiny tier: rated sentences, MiniLM, a small GPT-2; CPU, minutes
    python train.py --data c4 --steps 100k   # paper tier: C4, Sentence-T5 XL, GPT-2 large; one CUDA GPU
    torchrun --nproc_per_node 8 train.py --data c4 --steps 100k     # data-parallel

Per step (DGLM sec. 3, 4.1), on a batch of (prefix, continuation) embeddings:
  1. prior:   v-MSE of the diffusion model p(x_c | x_p) on the standardised continuation latent
  2. decoder: next-token loss of GPT-2 on [prefix][soft prompt(noised x_c, a)][continuation]
The file reads top to bottom: the config (tiers and flags), the two steps, the run (setup: checks,
data, models, probes; Progress: what it reports), and last main(), the loop. What the steps train on
(a corpus read whole, or C4 in windows embedded in the background) comes from batches.py. Everything
sample.py needs is written to --out (utils.py describes the directory).
"""
import argparse
import contextlib
import datetime
import gc
import glob
import math
import os
import random
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import budget
import data as data_lib
from batches import load_data
from decoder import TINY_LM, DecoderConfig
from diffusion import PriorConfig, ema_update, make_ema
from encoder import TINY_ENCODER, latent_stats, standardize
from guide import PAPER_GUIDES, TINY_GUIDES, load_probes, merge_probes, train_paper_probes, train_tiny_probes
from utils import (CHECKPOINT, SAVED_FILES, ArgumentParser, Checkpoint, LossLog, RawHelpFormatter, Terminated,
                   autocast, bounded, build_models, comma_list, count, failed_downloads, folder, hold,
                   keep_freed_memory, missing_folder, model_config, nonempty, not_a_model, out_flag, path_arg,
                   pick_device, refusal, release, run_cli, save_checkpoint, set_threads, shell, threads_flag,
                   use_bf16)

# ----------------------------------------------------------------------------- config

# The tiny tier is the defaults: PriorConfig(), DecoderConfig() and the flags' defaults below. The paper
# tier overrides them. Model ids and sizes are configuration, never a second code path.
TIERS = {
    "tiny": {},
    "paper": dict(encoder="sentence-transformers/sentence-t5-xl", lm="gpt2-large",
                  prior=dict(n_tokens=32, token_dim=64, width=768, depth=12, heads=12),
                  decoder=dict(soft_token_dim=384, soft_width=768, soft_depth=6, soft_heads=12, hidden_cond=False),
                  train=dict(steps=250_000, decoder_batch=64, decoder_lr=5e-6, ema=0.9999, max_prefix_frac=1.0, max_len=128,
                             warmup=1000, save_every=2000)),  # a checkpoint of this size is about 12 GB
}
# GPT-2 architectures, so that --sizes and the memory estimate need no download
GPT2_CONFIGS = {"gpt2": (12, 768, 12), "gpt2-medium": (24, 1024, 16), "gpt2-large": (36, 1280, 20),
                "gpt2-xl": (48, 1600, 25)}
TEACHING_SWITCHES = {  # flag -> (config part, field, value): each turns one design choice of the paper off
    "no_noise_augmentation": ("decoder", "noise_augmentation", False),
    "no_loss_weight": ("prior", "loss_weight", False),
    "no_adaptive_noise": ("prior", "adaptive_noise", False),
    "no_null_prefix": ("prior", "p_uncond", 0.0),
}
# What a run is: --resume refuses a flag that changes one of these (the seed, say, would re-split the data).
RUN_SETTINGS = ("data", "tier", "encoder", "lm", "max_prefix_frac", "max_len", "vocab_size", "window", "batch_size",
                "decoder_batch", "seed", *TEACHING_SWITCHES)
# Flags of one invocation, not of the run: micro-batches are planned again for the GPU a --resume runs on
NOT_RESUMED = ("out", "stop_at", "sizes", "gpu_memory", "bf16", "micro_batch", "decoder_micro_batch")
# Local paths a checkpoint keeps absolute: a model folder too, so that sample.py run from another working folder
# loads the encoder the run trained with, not one of the same name there
PATH_FLAGS = ("data", "cache_dir", "probe_data", "c4_path", "encoder", "lm")


def data_flags(add):
    add("--data", type=path_arg, default="tiny",
        help="tiny (rated sentences, offline), c4 (streamed), or a .txt/.jsonl/.csv/.tsv file")
    add("--tier", default=None, choices=list(TIERS), help="sizes and defaults (default: paper for --data c4, else tiny)")
    add("--encoder", type=nonempty("minilm, a hub id or a folder"), default=None, help="sentence-transformers model: minilm (shipped), a hub id or a folder "
        "(default: %(default)s)")
    add("--lm", type=nonempty("tiny, a hub id or a folder"), default=None, help="decoder: tiny (from scratch) or a GPT-2 hub id / folder (default: %(default)s)")
    add("--out", type=folder, default="out", help="checkpoint directory")
    add("--cache-dir", type=folder, default="cache", help="where the corpus and the embedding cache live")
    add("--max-prefix-frac", type=bounded(float, 0, 1), default=0.5,
        help="prefix length ~ U{0..frac*(words-1)} (default %(default)g)")
    add("--max-len", type=bounded(count, 2, 1e5), default=48,
        help="prefix + continuation tokens per text, longer ones are cut (default %(default)s)")
    add("--vocab-size", type=bounded(count, 300, 1e6), default=8192, help="BPE vocabulary of the tiny tier's tokenizer")
    add("--c4-path", type=path_arg, default=None, help="a local copy of C4 en (folder of .json.gz files) for --data c4")
    add("--window", type=count, default=count("200k"),
        help="--data c4: examples (prefix and continuation pairs) per window of the stream")
    add("--drop-windows", action=argparse.BooleanOptionalAction, default=False,
        help="--data c4: delete a window's embeddings once a checkpoint lies past it, so that the cache holds a few "
             "windows instead of every window of the run (a later run on them, or another run sharing the cache, "
             "embeds them again)")
    add("--probe-data", type=folder, default=None, help="local copies of the paper probes' data sets (see guide.py)")
    add("--probe-examples", type=count, default=count("20k"), help="paper probes: examples per class and data set")


def optimisation_flags(add):
    add("--steps", type=count, default=count("2400"), help="training steps, e.g. 3000 or 100k")
    add("--batch-size", type=bounded(count, 1, 1e6), default=256, help="global prior batch (default %(default)s)")
    add("--decoder-batch", type=bounded(count, 1, 1e6), default=32,
        help="global decoder batch, the first rows of the prior batch (default %(default)s)")
    add("--prior-lr", type=bounded(float, 0, 1, low_open=True), default=1e-3, help="peak AdamW learning rate of the prior")
    add("--decoder-lr", type=bounded(float, 0, 1, low_open=True), default=3e-3,
        help="peak AdamW learning rate of the decoder (default %(default)g)")
    add("--soft-prompt-lr", type=bounded(float, 0, 1, low_open=True), default=None,
        help="peak learning rate of the soft-prompt generator and hidden_cond (default: --decoder-lr)")
    add("--warmup", type=bounded(int, 0, 1e9), default=100, help="linear warm-up steps (default %(default)s)")
    add("--ema", type=bounded(float, 0, 1, high_open=True), default=0.995,
        help="EMA decay of the prior used for sampling (default %(default)g)")


def run_flags(add):
    add("--save-every", type=count, default=500, help="checkpoint every this many steps")
    add("--log-every", type=count, default=200, help="throughput report every this many steps")
    add("--resume", action="store_true",
        help="continue the run in --out; its flags are the defaults, and a larger --steps trains on")
    add("--overwrite", action="store_true", help="replace an existing checkpoint in --out")
    add("--stop-at", type=count, default=None, help="save and stop after this step, as if interrupted")
    add("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to train")
    add("--precision", default="auto", choices=["auto", "fp32", "bf16"],
        help="auto: bf16 autocast (and a bf16 encoder) where the hardware computes bf16 natively (CUDA, "
             "AVX512-BF16/AMX CPUs), else fp32")
    add("--micro-batch", type=count, default=None,
        help="prior micro-batch per process (default: the whole batch, or what the memory estimate allows on CUDA)")
    add("--decoder-micro-batch", type=count, default=None, help="decoder micro-batch per process (default: as above)")
    add("--grad-checkpointing", action="store_true", help="recompute GPT-2's activations in the backward pass")
    add("--peak-tflops", type=bounded(float, 0, 1e6, low_open=True), default=None,
        help="the device's peak bf16 TFLOP/s for MFU (default: a table of GPUs; measured on a CPU)")
    add("--gpu-memory", type=comma_list(bounded(float, 1, 1e4)), default=None,
        help="with --sizes: GiB of the GPUs to plan for, e.g. 24,40,80")
    add("--compile", action="store_true",
        help="torch.compile the denoiser and the language model (for a GPU: on 2 CPU cores compiling costs what it saves)")
    add("--sizes", action="store_true", help="print the run's model sizes and memory plan (no download) and exit")
    add("--seed", type=bounded(int, 0, 2 ** 62), default=0, help="seed for data split, batches and initialisation")
    threads_flag(add)


def teaching_flags(add):
    add("--no-noise-augmentation", action="store_true",
        help="teaching switch: train the decoder on clean proposals and decode them clean (a = 1)")
    add("--no-loss-weight", action="store_true", help="teaching switch: every noise level weighs the same in the prior's loss")
    add("--no-adaptive-noise", action="store_true",
        help="teaching switch: noise levels from the cosine schedule instead of the adaptive importance sampler")
    add("--no-null-prefix", action="store_true",
        help="teaching switch: never train the null prefix (no classifier-free guidance)")


def get_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=RawHelpFormatter)
    for title, flags in (("data: what the run learns from and where it writes", data_flags),
                         ("optimisation: how long and how fast each model learns", optimisation_flags),
                         ("run: saving, resuming, devices, memory and speed", run_flags),
                         ("teaching switches: each turns one of the paper's design choices off", teaching_flags)):
        flags(p.add_argument_group(title).add_argument)
    pre = argparse.ArgumentParser(add_help=False)  # the tier first: its defaults are the parser's
    for flag in ("--data", "--tier", "--lm", "--out"):
        pre.add_argument(flag)
    pre.add_argument("--resume", action="store_true")
    pre.add_argument("-h", "--help", action="store_true")
    first, _ = pre.parse_known_args(argv)
    out = first.out or p.get_default("out")
    trained = Checkpoint(out).config["train"] if first.resume and not first.help else {}  # how it was trained
    tier = trained.get("tier") or (first.tier if first.tier in TIERS else
                                   "paper" if first.data == "c4" and first.lm != TINY_LM else "tiny")
    p.set_defaults(tier=tier, encoder=TIERS[tier].get("encoder", TINY_ENCODER), lm=TIERS[tier].get("lm", TINY_LM),
                   **TIERS[tier].get("train", {}))  # --help shows the tier's defaults
    # A resumed run continues as it was trained: its flags are the defaults; learning rates, --steps and the
    # like may change, what the run is (RUN_SETTINGS) may not.
    p.set_defaults(**{k: v for k, v in trained.items() if k not in NOT_RESUMED})
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed: what Ctrl-C before a checkpoint repeats
    if trained.get("cache_dir") and args.cache_dir == trained["cache_dir"] and not os.path.isdir(args.cache_dir):
        args.cache_dir = "cache"  # gone (a moved clone): the working folder's, as run_cache_dir gives sample.py
        if os.environ.get("RANK", "0") == "0":  # under torchrun, the main process says it
            print(f"note: the run's cache folder {trained['cache_dir']} is gone; using "
                  f"{os.path.abspath(args.cache_dir)} (--cache-dir chooses another)")
    if args.data == "c4" and args.window < args.batch_size:  # a window is trained on once, a batch at a time
        p.error(f"--window {args.window} is smaller than a batch (--batch-size {args.batch_size})")
    if args.gpu_memory and not args.sizes:  # a run plans for the GPU it runs on
        p.error("--gpu-memory plans for GPUs with --sizes; a run plans its micro-batches for its own GPU "
                "(--micro-batch / --decoder-micro-batch set them)")
    same_texts = False  # a data file with the texts the run trained on, wherever it is now
    if trained.get("data_sha256") and os.path.isfile(args.data):
        same_texts = data_lib.sha256_of(args.data) == trained["data_sha256"]
        if not same_texts and local_path("data", args.data) == trained["data"]:
            raise SystemExit(f"error: {args.data} has changed since the run in {out} trained on it (another "
                             "sha256), so --resume would train on other texts; restore it, or start a new run with "
                             "another --out")
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (trained with {trained[k]})"
               for k in RUN_SETTINGS if k in trained and local_path(k, getattr(args, k)) != local_path(k, trained[k])
               and not (k == "data" and same_texts)]
    if changed:
        hint = ""
        if "data" in trained and args.data != trained["data"] and trained["data"] not in ("tiny", "c4"):
            if "data_sha256" not in trained:  # a checkpoint of an earlier release: the path is all it knows
                hint = f" (a data file that moved: put it back at {trained['data']}, or link it there)"
            elif not os.path.isfile(args.data):
                hint = f" (there is no file at {args.data})"
            else:
                hint = f" ({args.data} holds other texts than the file it was trained on)"
        raise SystemExit(f"error: --resume continues the run in {out} as it was trained, and these flags would change "
                         f"it: {', '.join(changed)}; leave them out, or start a new run with another --out{hint}")
    c4_copy = args.data == "c4" and (args.c4_path or os.environ.get(data_lib.C4_PATH_ENV))
    if trained.get("c4_fingerprint"):  # a run on a local copy of C4: its position counts its files and documents
        check_c4_copy(c4_copy, trained["c4_fingerprint"], out)
    if not args.resume:  # a model folder by its absolute path: as the checkpoint, its probes and the cache name it
        args.encoder, args.lm = local_path("encoder", args.encoder), local_path("lm", args.lm)
        if c4_copy and not args.sizes:  # what a --resume checks the copy against
            args.c4_fingerprint = data_lib.c4_fingerprint(c4_copy)
    return args


def check_c4_copy(c4_copy, trained, out):
    """--resume of a run on a local C4 copy: the files it read must still be there, first in the listing, with
    their sizes (files added after them, shards still downloading, say, are fine). Else the saved stream
    position, counted in files and documents, would point elsewhere."""
    if not c4_copy:
        raise SystemExit(f"error: the run in {out} read a local copy of C4 ({trained['path']}); pass it with "
                         f"--c4-path (or ${data_lib.C4_PATH_ENV}) to --resume")
    now = data_lib.c4_fingerprint(c4_copy, trained["files"])
    if (now["files"], now["sha256"]) != (trained["files"], trained["sha256"]):
        raise SystemExit(f"error: the run in {out} read the C4 files at {trained['path']}, and {c4_copy} does not "
                         "begin with the same files (names and sizes), so the run's stream position would point "
                         "elsewhere; point --c4-path at the run's copy, or start a new run with another --out")


def model_configs(args, dim):
    """PriorConfig and DecoderConfig of a new run: the tier's sizes plus the teaching switches."""
    parts = {"prior": dict(TIERS[args.tier].get("prior", {}), dim=dim),
             "decoder": dict(TIERS[args.tier].get("decoder", {}), dim=dim, lm=args.lm, vocab_size=args.vocab_size)}
    for flag, (part, name, value) in TEACHING_SWITCHES.items():
        if getattr(args, flag):
            parts[part][name] = value
    if args.no_noise_augmentation:
        parts["decoder"]["inference_a"] = 1.0  # trained on clean proposals only: decode them clean
    return PriorConfig(**parts["prior"]), DecoderConfig(**parts["decoder"])


def planned_configs(args, ckpt=None):
    """(PriorConfig, DecoderConfig, GPT-2 config) of a run before its data is read: the checkpoint's,
    or the tier's at its encoder's usual width (768 for the paper tier, else 384)."""
    if ckpt:
        c = ckpt.config
        return PriorConfig(**c["prior"]), DecoderConfig(**c["decoder"]), c["lm_config"]
    prior_config, decoder_config = model_configs(args, 768 if args.tier == "paper" else 384)
    return prior_config, decoder_config, lm_config_for(args, decoder_config)


def lm_config_for(args, decoder_config, tokenizer=None):
    """The language model's GPT2Config as a dict: the tiny tier's from DecoderConfig, else the hub's."""
    if args.lm == TINY_LM:
        eos = tokenizer.eos_token_id if tokenizer is not None else 0
        return decoder_config.lm_config(len(tokenizer) if tokenizer is not None else args.vocab_size, eos)
    if not os.path.isdir(args.lm) and args.lm in GPT2_CONFIGS and args.sizes:  # --sizes: no download
        n_layer, n_embd, n_head = GPT2_CONFIGS[args.lm]
        return dict(vocab_size=50257, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=1024)
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(args.lm).to_dict()
    except (OSError, ValueError) as err:
        if os.path.isdir(args.lm):
            raise not_a_model(args.lm, "GPT-2 model", err) from None
        raise SystemExit(f"error: could not load the configuration of the language model {args.lm!r}; "
                         f"without internet pass a local GPT-2 folder with --lm, or use --lm {TINY_LM}") from None


# ----------------------------------------------------------------------------- the two steps


def cosine_lr(step, total, warmup, floor=0.1):
    """Linear warm-up, then cosine decay to floor * peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def micro_batches(n, rank, world, micro):
    """This process's rows of a batch of n, as slices of at most `micro` rows."""
    lo, hi = rank * n // world, (rank + 1) * n // world
    return [slice(a, min(a + micro, hi)) for a in range(lo, hi, micro)]


def backward_in_parts(runner, opt, rows, world, amp, loss_of):
    """Fresh gradients of the whole batch from its micro-batches: loss_of(rows) is each part's share of
    the batch's loss, so the parts' gradients add up to the whole batch's. DDP syncs gradients only on
    the last part (no_sync before it). Returns this process's share of the loss."""
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for i, r in enumerate(rows):
        last = i == len(rows) - 1
        sync = contextlib.nullcontext() if last or not hasattr(runner, "no_sync") else runner.no_sync()
        with sync, amp():
            loss = loss_of(r)
        (loss * world).backward()  # DDP averages gradients over processes; the parts' losses add up
        total += loss.detach()
    return total


def prior_step(prior, runner, opt, x, x_prefix, rows, world, amp):
    """One AdamW step of the prior on a batch of latents x, x_prefix (B, d). runner: the prior or its
    DDP wrapper; rows: this process's micro-batches. Returns this process's share of the mean loss."""
    noise = prior.draw_noise(len(x), x.device)  # the whole batch's, identical in every process
    total = backward_in_parts(runner, opt, rows, world, amp,
                              lambda r: runner(x[r], x_prefix[r], {k: v[r] for k, v in noise.items()}).sum() / len(x))
    prior.noise_levels.update()  # the importance sampler learns from the whole batch's losses
    torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
    opt.step()
    return total


def decoder_step(decoder, runner, opt, x, prefix_ids, cont_ids, rows, world, amp, own_rng=contextlib.nullcontext()):
    """One AdamW step of the decoder; the loss is the batch's total NLL over its total token count.
    own_rng: the context of this process's dropout (Distributed.own_random_numbers; the prior has none)."""
    noise = decoder.draw_noise(len(x), x.device)  # the whole batch's, identical in every process
    n_tokens = sum(len(p) + len(c) + 1 for p, c in zip(prefix_ids, cont_ids))  # + eos
    with own_rng:
        total = backward_in_parts(runner, opt, rows, world, amp,
                                  lambda r: runner(prefix_ids[r], cont_ids[r], x[r], {k: v[r] for k, v in noise.items()},
                                                   n_tokens))
    torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
    opt.step()
    return total


@torch.no_grad()
def reconstruction_cosine(decoder, tokenizer, cache, texts, mu, s, device, seed=0):
    """Embed -> decode (empty prefix; the latent re-noised at the decoder's inference_a, top-p 0.9,
    temperature 1, up to 48 tokens) -> re-embed: the mean cosine to the original, a signal of how much
    of a proposal the decoder writes."""
    decoder.eval()
    e = torch.from_numpy(cache.encode(texts, show_progress=False)).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    # eager even under --compile: the key/value cache grows every token, and each new shape would
    # recompile GPT-2's transformer until dynamo gives up (8 times, tens of seconds on a CPU)
    with torch.compiler.set_stance("force_eager"):
        ids = decoder.generate([[] for _ in texts], standardize(e, mu, s), max_new_tokens=48, top_p=0.9,
                               temperature=1.0, repetition_penalty=1.2, generator=gen)
    decoded = [tokenizer.decode(i).strip() or "." for i in ids]
    e2 = torch.from_numpy(cache.embed(decoded)).to(device)
    decoder.train()
    return (e * e2).sum(-1).mean().item(), decoded


# ----------------------------------------------------------------------------- the run


@contextlib.contextmanager
def seeded(seed, device):
    """Random numbers from torch.manual_seed(seed) inside, the CPU's and `device`'s streams restored after."""
    with torch.random.fork_rng(devices=[device] if device.startswith("cuda") else []):
        torch.manual_seed(seed)
        yield


class Distributed:
    """rank, world size and device; under `torchrun` one process per GPU (NCCL) or CPU process (gloo)."""

    def __init__(self, device_name):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.device = 0, pick_device(device_name)
        if self.world > 1:
            self.rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
            if self.device == "cuda":
                torch.cuda.set_device(local_rank)
                self.device = f"cuda:{local_rank}"
            # an hour, not NCCL's 10 minutes: the others wait at a barrier while the main process embeds the
            # probes' data (setup), minutes of a GPU at the paper's sizes
            torch.distributed.init_process_group("nccl" if self.device.startswith("cuda") else "gloo",
                                                 timeout=datetime.timedelta(hours=1))
        self.is_main = self.rank == 0
        self.runners = []  # the DDP wrappers of wrap(), freed by finish()

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def own_random_numbers(self, seed, step):
        """A context in which this process draws from a random stream of its own, seeded by (seed, rank,
        step), and after which the shared stream is as it was. Every process seeds the shared stream alike
        so that the batch's noise is drawn alike everywhere (Prior.draw_noise); GPT-2's dropout draws in
        here, or every process would drop the same units of its different rows. One process: no-op."""
        if self.world == 1:
            return contextlib.nullcontext()
        return seeded(int(np.random.default_rng([seed, self.rank, step]).integers(2 ** 62)), self.device)

    def from_main(self, *values):
        """The main process's values, in every process."""
        values = list(values)
        if self.world > 1:
            torch.distributed.broadcast_object_list(values, src=0)
        return values

    def sum(self, value):
        """Sum of a scalar tensor over processes, as a float."""
        value = value.detach().float()
        if self.world > 1:
            torch.distributed.all_reduce(value)
        return value.item()

    def wrap(self, *models):
        """The modules that run the steps (a list this object owns): DDP averages gradients over processes."""
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [torch.cuda.current_device()] if self.device.startswith("cuda") else None
            models = [DDP(model, device_ids=ids) for model in models]
        self.runners = list(models)
        return self.runners

    def finish(self):
        """Free the DDP wrappers while the process group is alive, wait for every process, then end the
        group. (A wrapper freed after destroy_process_group ends the gloo group on the main thread, with
        the GIL held, while a gloo worker thread may wait for the GIL to free a tensor: a hang at exit.)"""
        if self.world > 1:
            self.runners.clear()  # main's `runners` is this list: the wrappers are freed here
            gc.collect()
            self.barrier()  # waiting releases the GIL, so the workers finish freeing what they hold
            torch.distributed.destroy_process_group()


def preflight(args):
    """Try every download a run needs and name each one that fails, in one line, before any work. A
    local folder that is not there (or a --c4-path with no C4 files) is named as such, not as a download."""
    from transformers import AutoConfig
    lm = args.lm != TINY_LM and not args.resume  # a resumed run's language model is in its checkpoint
    for flag, name, needed in (("--lm", args.lm, lm), ("--encoder", args.encoder, True)):
        if needed and missing_folder(name):
            raise SystemExit(f"error: {flag} {name}: no such folder (a local model folder, or a hub id such as "
                             f"{'gpt2-large' if flag == '--lm' else 'sentence-transformers/sentence-t5-xl'})")
    if args.data == "c4" and (args.c4_path or os.environ.get(data_lib.C4_PATH_ENV)):
        data_lib.c4_files(args.c4_path or os.environ[data_lib.C4_PATH_ENV])  # one line when there are no C4 files
    checks = [(args.lm, "--lm", lm, lambda: AutoConfig.from_pretrained(args.lm)),
              (args.encoder, "--encoder", args.encoder != TINY_ENCODER, lambda: AutoConfig.from_pretrained(args.encoder)),
              ("allenai/c4", "--c4-path", args.data == "c4", lambda: data_lib.open_c4(args.c4_path))]
    if lm and os.path.isdir(args.lm):  # read at once: a folder that holds no model is named before any work
        lm_config_for(args, None)
    failed = failed_downloads([(name, flag, check) for name, flag, needed, check in checks
                               if needed and not os.path.isdir(str(name))])
    if failed:
        tiny = "leave out --tier paper" if args.data == "tiny" else "--data tiny"
        instead = f"train the offline tiny tier ({tiny})" if args.tier == "paper" else \
            f"leave them at the tiny tier's offline models (--lm {TINY_LM}, --encoder {TINY_ENCODER})"
        raise SystemExit(f"error: the {args.tier} tier could not download {', '.join(failed)}; without internet pass "
                         f"local copies with the flags named, or {instead}")


def check_gpu(args):
    """The paper tier on --device auto stops when PyTorch sees no GPU, before its gigabytes of models are
    downloaded: most often a CPU build of torch, or a driver too old for torch's CUDA build."""
    if args.tier != "paper" or args.device != "auto" or pick_device("auto") != "cpu":
        return
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a CPU build; install a CUDA build from pytorch.org"
    else:
        why = f"torch {torch.__version__} is built for CUDA {torch.version.cuda} and finds no GPU; check the driver " \
              "with nvidia-smi"
    raise SystemExit(f"error: the paper tier trains on a CUDA GPU and this PyTorch sees none ({why}); --device cpu "
                     "trains there anyway, far slower, or train the tiny tier: python train.py")


def has_probes(path, encoder):
    """Whether the run's probes file is there and readable; missing or damaged, the tier's own are trained again."""
    try:
        load_probes(path, encoder)
    except SystemExit:
        return False
    return True


def train_probes(args, window, out, cache):
    """The tier's probes, before the long loop, into out/probes.safetensors: the tiny corpus's labels
    (sentiment, domains) or the paper's data sets (sentiment, toxicity, topics). -> report or None."""
    rated = data_lib.tiny_format(window.examples)
    if rated and data_lib.tiny_format(window.held_out):
        probes, report = train_tiny_probes(window.e_cont, window.examples, window.held_out_e_cont, window.held_out,
                                           lambda texts: cache.encode(texts, show_progress=False))
        merge_probes(out / "probes.safetensors", probes, TINY_GUIDES, args.encoder)
        return report
    if args.tier != "paper":
        why = "no held-out text to measure them on" if rated else \
            "train.py fits them on the tiny corpus's ratings alone"
        print(f"no probes: {why}; add probes of your labels with "
              f"`python guide.py --ckpt {shell(out)} --labels FILE` (a text and a label a row"
              + ("" if args.data in ("tiny", "c4") else f": {args.data} itself, if it has a label column")
              + "), or steer by example with `sample.py --like TEXT`")
        return None
    try:
        probes, report = train_paper_probes(cache, args.probe_examples, args.probe_data, flag="--probe-examples")
    except SystemExit as err:
        print(f"warning: no probes ({str(err).removeprefix('error: ')}); training goes on; add them later with "
              f"`python guide.py --ckpt {shell(out)} --probes paper` (--probe-data DIR for local copies)",
              file=sys.stderr)
        return None
    merge_probes(out / "probes.safetensors", probes, PAPER_GUIDES, args.encoder)
    return report


def check_args(args, out):
    where = next(p for p in (out, *out.parents) if p.exists())  # out, or the folder it will be made in
    if why := refusal(where):  # before the data work
        raise SystemExit(f"error: cannot write the checkpoint folder --out {out} ({why})")
    if out.is_dir():
        hold(out)  # before it is read: a run training there now may change it (a new --out is held once made)
    if args.data not in ("tiny", "c4"):  # a --data file that is not there, empty or unreadable, before the checkpoint
        if args.resume and not Path(args.data).exists():  # there (another --out would not help)
            raise SystemExit(f"error: data file {args.data}, which the run in {out} trained on, does not exist; if it "
                             "was moved, python train.py --resume --data NEW_PATH finds it by its content")
        data_lib.load_local(args.data)  # load_data reads it again (seconds)
    if not args.resume and (out / CHECKPOINT).exists() and not args.overwrite:
        raise SystemExit(existing_run(args, out))
    if args.data == "c4" and args.lm == TINY_LM:
        raise SystemExit("error: --data c4 cuts documents with the GPT-2 tokenizer; use the paper tier "
                         "(the default for c4) or --lm with a GPT-2 hub id or local folder")
    if args.decoder_batch > args.batch_size:
        raise SystemExit(f"error: --decoder-batch {args.decoder_batch} is larger than --batch-size {args.batch_size} "
                         "(the decoder trains on the first rows of the prior's batch)")
    if args.probe_data and args.tier == "paper" and not args.resume and not Path(args.probe_data).is_dir():
        raise SystemExit(f"error: --probe-data {args.probe_data}: no such folder (the local copies of the paper "
                         "probes' data sets)")  # else a warning, after the first window is embedded


def existing_run(args, out):
    """The error for an --out that holds a checkpoint: --resume continues it, unless it is another kind of
    run (a tiny-tier checkpoint where the paper tier is asked for, say), which needs another --out."""
    try:
        ckpt = Checkpoint(out)
        tier, data, steps = (ckpt.config["train"][k] for k in ("tier", "data", "steps"))
    except (SystemExit, KeyError):  # unreadable, or from an earlier release
        return f"error: {out}/ already holds a checkpoint; continue it with --resume, train into another --out, " \
               "or pass --overwrite to replace it"
    done = ckpt.step >= steps
    run = f"the {tier} tier on --data {data}, " + (f"finished at step {steps}" if done else f"step {ckpt.step} of {steps}")
    if tier == args.tier and (data == args.data or {data, args.data}.isdisjoint({"tiny", "c4"})):
        resume = f"train it on with --resume --steps {2 * ckpt.step}" if done else "continue it with --resume"
        return f"error: {out}/ already holds a run ({run}); {resume}, train into another --out, " \
               "or pass --overwrite to replace it"
    return f"error: {out}/ already holds another run ({run}); train this one into another --out (then sample.py " \
           "--ckpt with it), or pass --overwrite to replace it"


class Models:
    """The prior, its EMA, the decoder, their optimisers and the latent statistics (mu, s) of a run:
    new (from the config) or resumed (from the checkpoint)."""

    def __init__(self, args, config, mu, s, device, ckpt=None):
        self.config, self.step = config, ckpt.step if ckpt else 0
        self.prior, self.decoder = build_models(config, pretrained_lm=not ckpt and args.lm != TINY_LM)
        self.prior, self.decoder = self.prior.to(device), self.decoder.to(device)
        if args.grad_checkpointing:
            self.decoder.checkpoint_activations()
        self.ema = make_ema(self.prior)
        self.mu, self.s = mu.to(device), s.to(device)
        # fused: one kernel for the whole AdamW update on any device (CPU, CUDA, MPS); a CPU's default
        # is a Python loop over the tensors, a noticeable share of the tiny tier's small steps
        self.opt_prior = torch.optim.AdamW([{"params": self.prior.parameters(), "peak_lr": args.prior_lr}],
                                           lr=args.prior_lr, betas=(0.9, 0.99), weight_decay=0.01, fused=True)
        rest = [p for n, p in self.decoder.named_parameters() if not n.startswith("lm.")]  # soft prompt, hidden_cond
        self.opt_decoder = torch.optim.AdamW([{"params": self.decoder.lm.parameters(), "peak_lr": args.decoder_lr},
                                              {"params": rest, "peak_lr": args.soft_prompt_lr or args.decoder_lr}],
                                             lr=args.decoder_lr, betas=(0.9, 0.99), weight_decay=0.02, fused=True)
        if ckpt:
            for name in ("prior", "prior_ema", "decoder"):
                ckpt.load_model(getattr(self, {"prior_ema": "ema"}.get(name, name)), name)
            ckpt.load_optimizer(self.opt_prior, "opt_prior")
            ckpt.load_optimizer(self.opt_decoder, "opt_decoder")
            ckpt.restore_rng(device)

    def set_lr(self, scale):
        for opt in (self.opt_prior, self.opt_decoder):
            for group in opt.param_groups:
                group["lr"] = group["peak_lr"] * scale

    def save(self, out, step, data_state):
        save_checkpoint(out, self.config, step, {"prior": self.prior, "prior_ema": self.ema, "decoder": self.decoder},
                        {"opt_prior": self.opt_prior, "opt_decoder": self.opt_decoder},
                        {"stats.mu": self.mu, "stats.s": self.s}, data_state)


def new_config(args, window, tokenizer):
    """The checkpoint config of a new run (utils.model_config), sized for the encoder's width."""
    prior_config, decoder_config = model_configs(args, window.e_cont.shape[1])
    decoder_config.vocab_size = len(tokenizer)
    return model_config(prior_config, decoder_config, args.encoder, lm_config_for(args, decoder_config, tokenizer),
                        tokenizer.eos_token_id, train_settings(args))


def train_settings(args):
    """The run's flags as its checkpoint keeps them (config["train"]): the defaults of a later --resume."""
    return {k: local_path(k, v) for k, v in vars(args).items()
            if k not in ("resume", "overwrite", "encode_device", "argv")}


def local_path(key, value):
    """A flag's value as the checkpoint keeps it: a local file or folder as an absolute path, so that a --resume
    (or evaluate.py) from another working folder finds the same data and cache."""
    names = {"data": ("tiny", "c4"), "lm": (TINY_LM,), "encoder": (TINY_ENCODER,)}.get(key, ())  # not paths
    if key in PATH_FLAGS and isinstance(value, str) and value not in names and (
            os.path.exists(value) or key == "c4_path" and glob.glob(value)):  # --c4-path may be a glob
        return os.path.abspath(value)
    return value


def setup(args):
    """Everything before the loop: checks, devices, data, models, probes. -> (dist, run, data, tokenizer, cache)."""
    out = Path(args.out)
    check_args(args, out)
    preflight(args)
    check_gpu(args)
    dist = Distributed(args.device)
    if args.batch_size % dist.world or args.decoder_batch % dist.world:
        raise SystemExit(f"error: --batch-size {args.batch_size} and --decoder-batch {args.decoder_batch} must be "
                         f"multiples of the {dist.world} processes")
    args.bf16, args.encode_device = use_bf16(args.precision, dist.device), dist.device
    keep_freed_memory()
    set_threads(args.threads)
    torch.manual_seed(args.seed)  # alike in every process: the batch's noise too (dropout: Distributed.own_random_numbers)
    random.seed(args.seed)
    ckpt = Checkpoint(out) if args.resume else None
    if ckpt and args.steps <= ckpt.step:
        raise SystemExit(f"error: the run in {out} is already at step {ckpt.step}; --resume trains on to --steps, "
                         f"so give more than {ckpt.step} (e.g. --steps {2 * ckpt.step})")
    if ckpt and args.stop_at and args.stop_at <= ckpt.step:
        raise SystemExit(f"error: --stop-at {args.stop_at} is not after step {ckpt.step}, where the run in {out} "
                         "stands; give a later step, or leave it out to train on to --steps")
    if dist.is_main:  # first what the run is, and whether it fits (it sets the micro-batches that do)
        budget.describe_run(args, *planned_configs(args, ckpt), dist.device, dist.world)
    args.micro_batch, args.decoder_micro_batch = dist.from_main(args.micro_batch, args.decoder_micro_batch)
    data, tokenizer, cache = load_data(args, ckpt, dist)
    window = data.window
    config = ckpt.config if ckpt else new_config(args, window, tokenizer)
    if ckpt:
        config["train"] = train_settings(args)  # a resumed run's flags (a larger --steps, say), for the next --resume
    n_positions = config["lm_config"]["n_positions"]
    if args.max_len + config["decoder"]["n_soft"] + 2 > n_positions:
        raise SystemExit(f"error: --max-len {args.max_len} does not fit the language model's context of {n_positions} "
                         f"positions beside the {config['decoder']['n_soft']} soft-prompt slots, bos and end of text "
                         f"(at most {n_positions - config['decoder']['n_soft'] - 2})")
    stats = ckpt.tensors("stats") if ckpt else dict(zip(("mu", "s"), latent_stats(window.e_cont)))
    if dist.is_main and not ckpt:
        out.mkdir(parents=True, exist_ok=True)
        hold(out)
        if args.overwrite:  # the replaced run goes with its tokenizer: not before (a failed start keeps it), nor
            for name in SAVED_FILES:  # after (a Ctrl-C before the first save would offer to resume it)
                (out / name).unlink(missing_ok=True)
        tokenizer.save_pretrained(str(out / "tokenizer"))
    run = Models(args, config, stats["mu"], stats["s"], dist.device, ckpt)
    if ckpt and dist.is_main:
        print(f"resumed from {out} at step {run.step}")
    if dist.is_main and not has_probes(out / "probes.safetensors", args.encoder):
        report = train_probes(args, window, out, cache)
        if report:
            print("probes (held-out accuracy): " + ", ".join(f"{k} {v:.3f}" for k, v in report.items()))
    if dist.is_main or args.data == "c4":  # the main process is done with the tokenizer, cache and probes:
        dist.barrier()  # a corpus's other processes wait for it in load_data, C4's here
    if args.compile:  # what the steps call: Prior.forward calls net, Decoder calls lm.transformer (never lm itself)
        run.prior.net.compile()
        run.decoder.lm.transformer.compile()
    return dist, run, data, tokenizer, cache


class Progress:
    """What a run reports: the progress bar, out/log.jsonl (losses every step, throughput every
    --log-every steps), a NaN check, and the reconstruction cosine at each save."""

    def __init__(self, args, dist, run, data, prior_rows, decoder_rows, tokenizer, cache, started):
        self.args, self.dist, self.run, self.tokenizer, self.cache, self.started = args, dist, run, tokenizer, cache, started
        self.n_soft = run.decoder.config.n_soft
        self.held_texts = [ex["text"] for ex in data.window.held_out[:64]]
        self.log = LossLog(Path(args.out) / "log.jsonl", run.step) if dist.is_main else None
        peak = budget.peak_flops(dist.device, args.bf16, args.peak_tflops)[0] if dist.is_main else None
        self.meter = budget.Throughput(run.prior, run.decoder, peak and peak * dist.world)
        if hasattr(data, "prefetch"):
            data.log = self.log
            data.prefetch()
        if dist.is_main:
            size = lambda rows: rows[0].stop - rows[0].start
            print(f"training on {dist.device} x {dist.world} ({'bf16 autocast' if args.bf16 else 'fp32'}); per process "
                  f"micro-batches: prior {len(prior_rows)} x {size(prior_rows)}, decoder {len(decoder_rows)} x "
                  f"{size(decoder_rows)}")

    def steps(self):
        self.bar = tqdm(range(self.run.step, self.args.steps), initial=self.run.step, total=self.args.steps,
                        dynamic_ncols=True, disable=not self.dist.is_main)
        self.first_step, self.loop_started, self.step_seconds = self.run.step, time.time(), [0.0, 0.0]
        return self.bar

    def update(self, step, losses, t_prior, t_decoder, prefix_ids, cont_ids):
        if not all(map(math.isfinite, losses)):
            if self.dist.is_main:
                self.bar.close()  # the line below on a line of its own
                kept = (Path(self.args.out) / CHECKPOINT).exists()
                print(f"error: the loss became {losses[0]} (prior) / {losses[1]} (decoder) at step {step}; stopped "
                      "without saving, " + (f"the last good checkpoint in {Path(self.args.out)}/ is kept (try a lower "
                      "learning rate, then --resume)" if kept else "before a first checkpoint (try a lower learning "
                      "rate, and train again)"), file=sys.stderr)
            raise SystemExit(1)
        self.bar.set_postfix_str(f"prior {losses[0]:.3f} | decoder {losses[1]:.3f}")
        self.step_seconds[0] += t_prior
        self.step_seconds[1] += t_decoder
        self.meter.add(t_prior, t_decoder, self.args.batch_size,
                       [len(p) + len(c) + self.n_soft + 2 for p, c in zip(prefix_ids, cont_ids)])
        throughput = self.meter.report() if step % self.args.log_every == 0 or step == self.args.steps else None
        if self.log:
            lr_scale = self.run.opt_prior.param_groups[0]["lr"] / self.run.opt_prior.param_groups[0]["peak_lr"]
            self.log.write(step, prior=losses[0], decoder=losses[1], lr_scale=lr_scale, **(throughput or {}))
            if throughput:
                tqdm.write(f"step {step}: {budget.format_throughput(throughput)}")

    def reconstruction(self, step, losses=None, final=False):
        """Embed held-out texts -> decode them from their embeddings -> re-embed: the mean cosine. At the end,
        also where the run's time (and on a GPU its memory) went."""
        if not self.dist.is_main:
            return
        texts = self.held_texts if final else self.held_texts[:32]
        cos, decoded = reconstruction_cosine(self.run.decoder, self.tokenizer, self.cache, texts, self.run.mu,
                                             self.run.s, self.dist.device) if texts else (None, [])
        if not final:
            tqdm.write(f"step {step}: prior {losses[0]:.3f} | decoder {losses[1]:.3f}"
                       + (f" | reconstruction cosine {cos:.3f}" if texts else ""))
            return
        if texts:
            print(f"reconstruction cosine (held-out, embed -> decode -> re-embed, n={len(texts)}): {cos:.3f}")
        else:  # a small C4 --window (the first one is held out from) may hold none
            print("no reconstruction cosine: the run holds no held-out text (on C4, in its first window)")
        for original, text in list(zip(texts, decoded))[:3]:
            print(f"  {original[:70]!r}\n   -> {text[:70]!r}")
        if str(self.dist.device).startswith("cuda"):
            print(peak_gpu_memory(self.dist.device))
        total, before = time.time() - self.started, self.loop_started - self.started
        prior, decoder = self.step_seconds
        print(f"done in {total / 60:.1f} min: {before:.0f} s before the first step (data, embedding, models, probes), "
              f"{prior:.0f} s in {self.args.steps - self.first_step} prior steps, {decoder:.0f} s in as many decoder "
              f"steps, {total - before - prior - decoder:.0f} s around them (batches, logging, saving, reconstruction); "
              f"checkpoint in {Path(self.args.out)}/")


def peak_gpu_memory(device):
    """The run's peak CUDA memory, to hold against the estimate printed at the start (budget.py)."""
    gib = lambda n: f"{n / 2 ** 30:.1f} GiB"
    return (f"peak GPU memory: {gib(torch.cuda.max_memory_allocated(device))} allocated, "
            f"{gib(torch.cuda.max_memory_reserved(device))} reserved (the estimate at the start also counts the "
            "CUDA context)")


def launcher():
    """How this run was started, for the commands it suggests: python, or torchrun with its processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"torchrun --nproc_per_node {world}" if world > 1 else "python"


def interrupted(args):
    """What Ctrl-C leaves in --out, and the command that goes on from it."""
    if not (Path(args.out) / CHECKPOINT).exists():
        return ("interrupted before the first checkpoint (--save-every steps), so there is none to resume: train "
                f"again with the same command, {launcher()} {shlex.join(['train.py', *args.argv])}")
    return (f"interrupted: the last checkpoint saved in {args.out} (every --save-every steps) is kept; continue it "
            f"with {launcher()} train.py --resume{out_flag(args.out)}")


def main(args):
    started = time.time()
    if args.sizes:  # the run's sizes and memory plan, from configs alone
        return budget.describe_run(args, *planned_configs(args))
    data = None
    try:
        dist, run, data, tokenizer, cache = setup(args)
        runners = dist.wrap(run.prior, run.decoder)  # EMA, saving and logging use the plain modules
        prior_rows = micro_batches(args.batch_size, dist.rank, dist.world, args.micro_batch or args.batch_size)
        decoder_rows = micro_batches(args.decoder_batch, dist.rank, dist.world, args.decoder_micro_batch or args.decoder_batch)
        amp, D = (lambda: autocast(dist.device, args.bf16)), args.decoder_batch
        progress = Progress(args, dist, run, data, prior_rows, decoder_rows, tokenizer, cache, started)

        def save(step):
            if dist.is_main:
                run.save(args.out, step, data.state())
                data.saved()  # C4 --drop-windows: the windows before the checkpoint's are not needed again
        run.prior.train(), run.decoder.train()
        for step in progress.steps():
            e_prefix, e_cont, prefix_ids, cont_ids = data.batch(step)  # C4: the next window when this one is done
            x, x_prefix = (standardize(e.to(dist.device), run.mu, run.s) for e in (e_cont, e_prefix))
            run.set_lr(cosine_lr(step, args.steps, args.warmup))

            t0 = time.perf_counter()  # 1. the prior on the whole batch, then its EMA
            losses = [dist.sum(prior_step(run.prior, runners[0], run.opt_prior, x, x_prefix, prior_rows, dist.world,
                                          amp))]
            # the EMA's decay warms up, so that the first weights, far from the last, fade fast: 0.1 at
            # step 0, 0.9 at step 80, the default --ema 0.995 from step 1790
            ema_update(run.ema, run.prior, min(args.ema, (1 + step) / (10 + step)))
            t1 = time.perf_counter()  # 2. the decoder on the first rows of the same batch (.item() synchronised both)
            losses.append(dist.sum(decoder_step(run.decoder, runners[1], run.opt_decoder, x[:D], prefix_ids[:D],
                                                cont_ids[:D], decoder_rows, dist.world, amp,
                                                dist.own_random_numbers(args.seed, step))))

            t2 = time.perf_counter()  # 3. log
            progress.update(step + 1, losses, t1 - t0, t2 - t1, prefix_ids[:D], cont_ids[:D])
            if step + 1 == args.stop_at:
                save(step + 1)
                progress.bar.n = step + 1  # the bar counts a step when the next one begins: this one too
                progress.bar.close()       # and the line below on a line of its own
                if dist.is_main:
                    print(f"stopped at step {step + 1} (--stop-at); continue with {launcher()} train.py --resume"
                          f"{out_flag(args.out)}")
                break
            if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
                save(step + 1)
                progress.reconstruction(step + 1, losses)
        else:  # the last step
            save(args.steps)
            progress.reconstruction(args.steps, final=True)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (Terminated)
        raise type(err)(interrupted(args)) from None
    finally:
        if data is not None:
            data.close()  # C4: stop embedding a window this run will not train on (exit would wait for it)
        release(args.out)  # in-process callers (tests, a notebook) give --out back; a process's end always does
    dist.finish()


def stop_on_sigterm():
    """SIGTERM (what a scheduler, `docker stop` or `timeout` sends) stops the run as Ctrl-C does: with the line
    that says what is kept and how to go on (interrupted), not silently."""
    def handler(signum, frame):
        raise Terminated
    signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    stop_on_sigterm()
    run_cli(lambda: main(get_args()))  # Ctrl-C: main names what it leaves (interrupted)
