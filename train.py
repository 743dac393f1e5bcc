"""Train DGLM: one flat loop that alternates a prior step and a decoder step on the same batch.

    python train.py                               # tiny tier: offline, CPU, minutes
    python train.py --tier paper --data c4 --steps 100k --device cuda

Per step (DGLM sec. 3, 4.1), on a batch of cached (prefix, continuation) embeddings:
  1. prior:   v-MSE of the diffusion model p(x_c | x_p) on the standardised continuation embedding
  2. decoder: next-token loss of GPT-2 on [prefix][soft prompt(noised x_c, a)][continuation]
The checkpoint directory (--out) holds everything sample.py needs: checkpoint.safetensors
(weights, EMA, latent statistics, optimiser state; config in its metadata), config.json (a copy
for reading), tokenizer/, probes.safetensors (when the data has labels).
"""
import argparse
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

import data as data_lib
from decoder import TINY_LM, Decoder, DecoderConfig, encode_continuation, load_tokenizer, train_tokenizer
from diffusion import Prior, PriorConfig, ema_update, make_ema
from encoder import TINY_ENCODER, EmbeddingCache, cache_dir_for, latent_stats, standardize

# Presets. Model ids, sizes and optimisation defaults are configuration, never a second code path.
TIERS = {
    "tiny": dict(encoder=TINY_ENCODER, lm=TINY_LM, dim=384,
                 prior=dict(n_tokens=8, token_dim=32, width=128, depth=4, heads=4),
                 decoder=dict(n_soft=8, soft_token_dim=64, soft_width=128, soft_depth=2, soft_heads=4,
                              hidden_cond=True, n_layer=4, n_embd=192, n_head=4, n_positions=128, vocab_size=8192),
                 train=dict(batch_size=256, decoder_batch=32, prior_lr=1e-3, decoder_lr=3e-3, ema=0.995,
                            max_prefix_frac=0.5, max_len=48)),
    "paper": dict(encoder="sentence-transformers/sentence-t5-xl", lm="gpt2-large", dim=768,
                  prior=dict(n_tokens=32, token_dim=64, width=768, depth=12, heads=12),
                  decoder=dict(n_soft=8, soft_token_dim=384, soft_width=768, soft_depth=6, soft_heads=12),
                  train=dict(batch_size=256, decoder_batch=64, prior_lr=1e-3, decoder_lr=5e-6, ema=0.9999,
                             max_prefix_frac=1.0, max_len=128)),
}
CHECKPOINT = "checkpoint.safetensors"
GPT2_WIDTHS = {"gpt2": 768, "gpt2-medium": 1024, "gpt2-large": 1280, "gpt2-xl": 1600}  # n_embd, for --sizes


def model_sizes(tier_name, lm_width=None):
    """Parameter counts of a tier's prior and soft-prompt generator, built from configs alone."""
    from decoder import SoftPromptGenerator
    tier = TIERS[tier_name]
    lm_width = lm_width or tier["decoder"].get("n_embd") or GPT2_WIDTHS[tier["lm"]]
    prior = Prior(PriorConfig(**tier["prior"], dim=tier["dim"]))
    soft = SoftPromptGenerator(DecoderConfig(**tier["decoder"], dim=tier["dim"]), lm_width)
    count = lambda m: sum(p.numel() for p in m.parameters())
    return {"prior": count(prior), "soft_prompt": count(soft), "lm_width": lm_width}


def parse_count(text):
    """'100k' -> 100000, '2.5M' -> 2500000, '300' -> 300."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (accepted: 300, 20k, 1.5M)")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive whole number")
    return int(value)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (exit code 2, as argparse does)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see python {self.prog} --help)\n")


def run_cli(fn):
    """Run a script's fn(): an `error: ...` (bad input, missing file, offline hub) becomes one line
    on stderr and exit code 2, with no traceback, like the usage errors of ArgumentParser above."""
    try:
        fn()
    except SystemExit as err:
        if isinstance(err.code, str):
            print(err.code, file=sys.stderr)
            raise SystemExit(2) from None
        raise


def setup_distributed(device_name):
    """-> (rank, world size, device). Under `torchrun --nproc_per_node N train.py ...` there is one
    process per GPU (NCCL), or per CPU process with gloo; a plain `python train.py` is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA GPU is visible (accepted: auto, cpu, cuda, mps)")
    return name


# ----------------------------------------------------------------------------- checkpoints


def atomic_save(tensors, path, metadata):
    from safetensors.torch import save_file
    tmp = f"{path}.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)  # a kill during the save leaves the previous file whole


def optimizer_tensors(opt, name):
    state = opt.state_dict()
    tensors = {f"{name}.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()}
    return tensors, json.dumps(state["param_groups"])


def load_optimizer(opt, name, tensors, param_groups):
    state = {}
    for key, value in tensors.items():
        if key.startswith(name + "."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = value
    opt.load_state_dict({"state": state, "param_groups": json.loads(param_groups)})


def save_checkpoint(out, config, models, optimizers, step, extra_tensors, data_state=None):
    tensors = dict(extra_tensors)
    for name, model in models.items():
        seen = set()
        for k, v in model.state_dict().items():
            if v.data_ptr() not in seen:  # tied weights (GPT-2's lm_head = wte) are stored once
                seen.add(v.data_ptr())
                tensors[f"{name}.{k}"] = v
    meta = {"config": json.dumps(config), "step": str(step), "data": json.dumps(data_state)}
    for name, opt in optimizers.items():
        t, groups = optimizer_tensors(opt, name)
        tensors.update(t)
        meta[f"{name}.param_groups"] = groups
    tensors["rng.torch"] = torch.get_rng_state()
    Path(out).mkdir(parents=True, exist_ok=True)
    tmp = Path(out) / "config.json.tmp"
    tmp.write_text(json.dumps(dict(config, step=step), indent=2))
    os.replace(tmp, Path(out) / "config.json")  # for reading; the copy inside the checkpoint is loaded
    atomic_save(tensors, Path(out) / CHECKPOINT, meta)


def read_checkpoint(out, prefixes=None):
    """-> (config, step, metadata, {name: tensor}) for the keys starting with any of `prefixes`."""
    from safetensors import safe_open
    path = Path(out) / CHECKPOINT
    if not path.exists():
        raise SystemExit(f"error: no checkpoint at {path}; train one with `python train.py --out {out}`")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            keys = [k for k in f.keys() if prefixes is None or k.startswith(tuple(prefixes))]
            tensors = {k: f.get_tensor(k) for k in keys}
        config = json.loads(meta["config"])
        step = int(meta["step"])
    except Exception as err:  # truncated file, bad header, missing metadata
        raise SystemExit(f"error: checkpoint {path} is unreadable or incomplete ({type(err).__name__}: {err}); "
                         "retrain or restore it") from None
    return config, step, meta, tensors


def build_models(config, pretrained_lm=False):
    prior = Prior(PriorConfig(**config["prior"]))
    dec_cfg = DecoderConfig(**config["decoder"])
    decoder = Decoder(dec_cfg, config["lm_config"], config["bos_id"], config["eos_id"], pretrained=pretrained_lm)
    return prior, decoder


def load_state(model, name, tensors, path):
    state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[1 if "\n" in str(err).strip() else 0].strip()
        raise SystemExit(f"error: checkpoint {path} does not match its config ({name}: {first})") from None
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise SystemExit(f"error: checkpoint {path} does not match its config ({name}: "
                         f"missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")


def load_for_inference(out, device="cpu"):
    """Rebuild (config, EMA prior, decoder, tokenizer, mu, s) from a checkpoint directory alone."""
    config, step, _, tensors = read_checkpoint(out, ["prior_ema.", "decoder.", "stats."])
    prior, decoder = build_models(config)
    load_state(prior, "prior_ema", tensors, out)
    load_state(decoder, "decoder", tensors, out)
    tokenizer = load_tokenizer(str(Path(out) / "tokenizer"))
    mu, s = tensors["stats.mu"].to(device), tensors["stats.s"].to(device)
    return config, prior.to(device).eval(), decoder.to(device).eval(), tokenizer, mu, s


# ----------------------------------------------------------------------------- data


class Batches:
    """Deterministic, length-grouped batches: epoch e's order depends only on (seed, e).

    Texts of similar length share a batch (sorted inside windows of 16 batches), which
    removes most padding from the decoder step; the batch order is shuffled.
    """

    def __init__(self, lengths, batch_size, seed):
        self.lengths, self.batch_size, self.seed = np.asarray(lengths), batch_size, seed
        self.per_epoch = max(1, len(lengths) // batch_size)

    def epoch(self, e):
        rng = np.random.default_rng([self.seed, e])
        order = rng.permutation(len(self.lengths))
        window = 16 * self.batch_size
        for i in range(0, len(order), window):
            chunk = order[i:i + window]
            order[i:i + window] = chunk[np.argsort(self.lengths[chunk], kind="stable")]
        batches = [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(self.per_epoch)]
        return [rng.permutation(batches[i]) for i in rng.permutation(len(batches))]

    def get(self, step):
        return self.epoch(step // self.per_epoch)[step % self.per_epoch]


def cosine_lr(step, total, warmup, floor=0.1):
    """Linear warm-up, then cosine decay to floor * peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def c4_window(args, tokenizer, position):
    """The next --window examples of the C4 stream from `position` -> (examples, position after them).

    C4 is never held whole: training runs through consecutive windows, each embedded (cached) and
    trained on once; a checkpoint records where its window starts, so --resume rebuilds it exactly.
    """
    import itertools
    stream = data_lib.C4Examples(tokenizer, args.c4_path, args.seed, position, max_prefix_frac=args.max_prefix_frac)
    examples = list(itertools.islice(stream, args.window))
    if len(examples) < args.batch_size:
        raise SystemExit(f"error: the C4 stream ran out ({len(examples)} texts left, a batch needs {args.batch_size})")
    return examples, stream.position


def prepare(args, tokenizer=None, examples=None):
    """Texts -> examples with cached embeddings and token ids; trains the tokenizer when needed.

    examples: a C4 window of {text, prefix, continuation}; otherwise --data is read whole and split.
    """
    if examples is None:
        rows = data_lib.load_corpus(args.data, args.cache_dir)
        train_ex, held_out = data_lib.make_examples(rows, args.seed, args.max_prefix_frac)
    else:
        train_ex = [ex for ex in examples if not data_lib.is_held_out(ex["text"])]
        held_out = [ex for ex in examples if data_lib.is_held_out(ex["text"])]
    print(f"data: {len(train_ex)} training texts, {len(held_out)} held out")
    if tokenizer is None:
        if args.lm == TINY_LM:
            tokenizer = train_tokenizer([ex["text"] for ex in train_ex], args.vocab_size)
        else:
            tokenizer = load_tokenizer(args.lm)
    cache = EmbeddingCache(cache_dir_for(args.cache_dir, args.encoder), args.encoder, device=args.encode_device,
                           dtype="bf16" if str(args.encode_device).startswith("cuda") else None)
    print(f"embedding cache: {len(cache)} texts already encoded")
    cont_e = torch.from_numpy(cache.encode([ex["continuation"] for ex in train_ex]))
    prefix_e = torch.from_numpy(cache.encode([ex["prefix"] for ex in train_ex]))
    prefix_ids = tokenizer([ex["prefix"] for ex in train_ex], add_special_tokens=False)["input_ids"]
    cont_ids = [encode_continuation(tokenizer, ex["continuation"]) for ex in train_ex]
    return dict(train=train_ex, held_out=held_out, cont_e=cont_e, prefix_e=prefix_e,
                prefix_ids=prefix_ids, cont_ids=cont_ids, tokenizer=tokenizer, cache=cache)


def fit_length(prefix, continuation, room):
    """Trim a (prefix, continuation) pair of token lists to at most `room` tokens (prefix first)."""
    cut = max(0, len(prefix) + len(continuation) - room)
    prefix = prefix[min(cut, len(prefix)):]
    return prefix, continuation[:room - len(prefix)]


# ----------------------------------------------------------------------------- evaluation signals


@torch.no_grad()
def reconstruction_cosine(decoder, tokenizer, cache, texts, mu, s, device, seed=0):
    """Embed -> decode from the clean embedding (empty prefix) -> re-embed; mean cosine to the original."""
    decoder.eval()
    e = torch.from_numpy(cache.encode(texts, show_progress=False)).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = decoder.generate([[] for _ in texts], standardize(e, mu, s), max_new_tokens=48, generator=gen)
    decoded = [tokenizer.decode(i).strip() or "." for i in ids]
    e2 = torch.from_numpy(cache.embed(decoded)).to(device)
    decoder.train()
    return (e * e2).sum(-1).mean().item(), decoded


def train_probes(prepared, out, encoder_name):
    """Probes on continuation embeddings when the data has labels (tiny: ratings and domains)."""
    from guide import TINY_GUIDES, save_probes, train_tiny_probes
    train, held = prepared["train"], prepared["held_out"]
    if not train or "rating" not in train[0] or not held:
        return None
    held_e = torch.from_numpy(prepared["cache"].encode([ex["continuation"] for ex in held], show_progress=False))
    probes, report = train_tiny_probes(prepared["cont_e"], train, held_e, held)
    save_probes(Path(out) / "probes.safetensors", probes, TINY_GUIDES, encoder_name)
    return report


# ----------------------------------------------------------------------------- main


def get_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="tiny", help="tiny (rated sentences, offline), c4 (streamed), or a .txt/.jsonl file")
    p.add_argument("--tier", default="tiny", choices=TIERS, help="architecture preset and default encoder/LM")
    p.add_argument("--encoder", default=None, help="sentence-transformers model: minilm (shipped), a hub id or a folder")
    p.add_argument("--lm", default=None, help="decoder: tiny (from scratch) or a GPT-2 hub id / folder, e.g. gpt2-large")
    p.add_argument("--out", default="out", help="checkpoint directory")
    p.add_argument("--cache-dir", default="cache", help="where corpus and embedding cache live")
    p.add_argument("--steps", type=parse_count, default=parse_count("2400"), help="training steps, e.g. 3000 or 100k")
    # the defaults of these seven come from --tier (TIERS[...]["train"]), given here as tiny / paper
    p.add_argument("--batch-size", type=parse_count, default=None, help="global prior batch (256 / 256)")
    p.add_argument("--decoder-batch", type=parse_count, default=None, help="global decoder batch, the first rows of the prior batch (32 / 64)")
    p.add_argument("--prior-lr", type=float, default=None, help="peak AdamW learning rate of the prior (1e-3 / 1e-3)")
    p.add_argument("--decoder-lr", type=float, default=None, help="peak AdamW learning rate of the decoder (3e-3 from scratch / 5e-6 fine-tuning)")
    p.add_argument("--soft-prompt-lr", type=float, default=None, help="peak learning rate of the soft-prompt generator and hidden_cond (default: --decoder-lr)")
    p.add_argument("--warmup", type=parse_count, default=100, help="linear warm-up steps")
    p.add_argument("--ema", type=float, default=None, help="EMA decay of the prior used for sampling (0.995 / 0.9999)")
    p.add_argument("--max-prefix-frac", type=float, default=None, help="prefix length ~ U{0..frac*words} (0.5 / 1.0)")
    p.add_argument("--max-len", type=parse_count, default=None, help="prefix + continuation tokens per text, longer ones are cut (48 / 128)")
    p.add_argument("--vocab-size", type=parse_count, default=8192, help="BPE vocabulary of the tiny tier's tokenizer")
    p.add_argument("--c4-path", default=None, help="a local copy of C4 en (folder of .json.gz files) for --data c4")
    p.add_argument("--window", type=parse_count, default=parse_count("200k"), help="--data c4: texts per window of the stream")
    p.add_argument("--save-every", type=parse_count, default=500, help="checkpoint every this many steps")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")
    p.add_argument("--stop-at", type=parse_count, default=None, help="save and stop after this step, as if interrupted")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to train")
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser and the language model")
    p.add_argument("--sizes", action="store_true", help="print the tier's model sizes (from configs, no download) and exit")
    p.add_argument("--seed", type=int, default=0, help="seed for data split, batches and initialisation")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    return p.parse_args(argv)


def main(args):
    started = time.time()
    if args.sizes:
        for width in [None, 768] if args.tier == "paper" else [None]:  # paper: gpt2-large and gpt2 widths
            n = model_sizes(args.tier, width)
            print(f"{args.tier}: prior {n['prior'] / 1e6:.1f}M params, soft-prompt generator "
                  f"{n['soft_prompt'] / 1e6:.1f}M (into a language model of width {n['lm_width']})")
        return
    tier = TIERS[args.tier]
    args.encoder = args.encoder or tier["encoder"]
    args.lm = args.lm or tier["lm"]
    for key, value in tier["train"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out = Path(args.out)
    if not args.resume and (out / CHECKPOINT).exists() and not args.overwrite:
        raise SystemExit(f"error: {out}/ already holds a checkpoint; continue it with --resume, "
                         "train into another --out, or pass --overwrite to replace it")
    rank, world, device = setup_distributed(args.device)
    if args.batch_size % world or args.decoder_batch % world or args.decoder_batch > args.batch_size:
        raise SystemExit(f"error: --batch-size {args.batch_size} and --decoder-batch {args.decoder_batch} must be "
                         f"multiples of the {world} processes, with the decoder batch at most the prior batch")
    args.encode_device = device
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # the same seed in every process: see `shard` in Prior/Decoder.forward
    random.seed(args.seed)
    distributed = world > 1
    if distributed and rank > 0:
        torch.distributed.barrier()  # rank 0 first fills the embedding cache and writes the tokenizer

    resume = read_checkpoint(out) if args.resume else None
    if args.overwrite and not args.resume and rank == 0:
        (out / "probes.safetensors").unlink(missing_ok=True)  # they belong to the replaced run
    tokenizer = load_tokenizer(str(out / "tokenizer")) if resume or rank > 0 else None
    window, next_position = None, None  # --data c4: {"start": its first step, "position": where it starts in the stream}
    if args.data == "c4":
        if args.lm == TINY_LM:
            raise SystemExit("error: --data c4 prepares text with the GPT-2 tokenizer; use --tier paper, or --lm with "
                             "a GPT-2 hub id or local folder")
        window = json.loads(resume[2].get("data", "null")) if resume else None
        window = window or {"start": 0, "position": None}
        examples, next_position = c4_window(args, tokenizer or load_tokenizer(args.lm), window["position"])
    prepared = prepare(args, tokenizer, examples if window else None)
    tokenizer = prepared["tokenizer"]

    if resume:
        config, start_step = resume[0], resume[1]
        mu, s = resume[3]["stats.mu"], resume[3]["stats.s"]
    else:
        start_step = 0
        mu, s = latent_stats(prepared["cont_e"])
        dec = dict(tier["decoder"], lm=args.lm, dim=prepared["cont_e"].shape[1])
        if args.lm == TINY_LM:
            dec["vocab_size"] = len(tokenizer)
            lm_config = dict(vocab_size=len(tokenizer), n_layer=dec["n_layer"], n_embd=dec["n_embd"],
                             n_head=dec["n_head"], n_positions=dec["n_positions"],
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # a few epochs: no overfitting
                             bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        else:
            from transformers import AutoConfig
            try:
                lm_config = AutoConfig.from_pretrained(args.lm).to_dict()
            except OSError:
                raise SystemExit(f"error: could not load the configuration of the language model {args.lm!r}; "
                                 f"without internet pass a local GPT-2 folder with --lm, or use --lm {TINY_LM}") from None
        config = dict(encoder=args.encoder, prior=dict(tier["prior"], dim=dec["dim"]), decoder=dec,
                      lm_config=lm_config, bos_id=tokenizer.eos_token_id, eos_id=tokenizer.eos_token_id,
                      train={k: v for k, v in vars(args).items() if k not in ("resume", "overwrite", "encode_device")})
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            tokenizer.save_pretrained(str(out / "tokenizer"))

    prior, decoder = build_models(config, pretrained_lm=not resume and args.lm != TINY_LM)
    prior, decoder = prior.to(device), decoder.to(device)
    ema = make_ema(prior)
    mu, s = mu.to(device), s.to(device)
    fused = str(device).startswith("cuda")  # one kernel for the whole AdamW update
    opt_prior = torch.optim.AdamW([{"params": prior.parameters(), "peak_lr": args.prior_lr}],
                                  lr=args.prior_lr, betas=(0.9, 0.99), weight_decay=0.01, fused=fused)
    opt_decoder = torch.optim.AdamW([{"params": decoder.lm.parameters(), "peak_lr": args.decoder_lr},
                                     {"params": [p for n, p in decoder.named_parameters() if not n.startswith("lm.")],
                                      "peak_lr": args.soft_prompt_lr or args.decoder_lr}],  # soft prompt, hidden_cond
                                    lr=args.decoder_lr, betas=(0.9, 0.99), weight_decay=0.02, fused=fused)
    if resume:
        _, _, meta, tensors = resume
        for name, model in (("prior", prior), ("prior_ema", ema), ("decoder", decoder)):
            load_state(model, name, tensors, out)
        load_optimizer(opt_prior, "opt_prior", tensors, meta["opt_prior.param_groups"])
        load_optimizer(opt_decoder, "opt_decoder", tensors, meta["opt_decoder.param_groups"])
        torch.set_rng_state(tensors["rng.torch"])
        if rank == 0:
            print(f"resumed from {out} at step {start_step}")
    if rank == 0 and not (out / "probes.safetensors").exists():
        report = train_probes(prepared, out, args.encoder)
        if report:
            print("probes (held-out accuracy): " + ", ".join(f"{k} {v:.3f}" for k, v in report.items()))
    if distributed and rank == 0:
        torch.distributed.barrier()  # the other processes may read the cache and tokenizer now
    n_params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    if rank == 0:
        print(f"prior {n_params(prior):.2f}M params | decoder {n_params(decoder.lm):.2f}M + soft prompt "
              f"{n_params(decoder.soft):.2f}M | device {device} x {world}")
    if args.compile:
        prior.net.compile()
        decoder.lm.compile()
    # data-parallel wrappers average the gradients over processes; the EMA, saving and logging use the plain modules
    prior_step, decoder_step = prior, decoder
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [torch.cuda.current_device()] if str(device).startswith("cuda") else None
        prior_step, decoder_step = DDP(prior, device_ids=ids), DDP(decoder, device_ids=ids)

    room = min(args.max_len, decoder.max_len - decoder.cfg.n_soft - 2)  # bos and eos

    def batch_source(prepared):
        """Latents, token ids and batches of a prepared corpus (or C4 window)."""
        x_all = standardize(prepared["cont_e"], mu.cpu(), s.cpu())       # (N, d) continuation latents
        p_all = standardize(prepared["prefix_e"], mu.cpu(), s.cpu())     # (N, d) prefix latents
        pairs = [fit_length(p, c, room) for p, c in zip(prepared["prefix_ids"], prepared["cont_ids"])]
        return x_all, p_all, pairs, Batches([len(p) + len(c) for p, c in pairs], args.batch_size, args.seed)

    x_all, p_all, pairs, batches = batch_source(prepared)
    window_end = window["start"] + batches.per_epoch if window else math.inf  # tiny / a file: epochs, no end
    held_texts = [ex["text"] for ex in prepared["held_out"][:64]]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if fused else torch.autocast("cpu", enabled=False)
    shard = lambda n: slice(rank * n // world, (rank + 1) * n // world) if distributed else None  # this process's rows
    prior_shard, decoder_shard = shard(args.batch_size), shard(args.decoder_batch)
    log = LossLog(out / "log.jsonl", start_step) if rank == 0 else None

    def save(step):
        if rank == 0:
            save_checkpoint(out, config, {"prior": prior, "prior_ema": ema, "decoder": decoder},
                            {"opt_prior": opt_prior, "opt_decoder": opt_decoder}, step,
                            {"stats.mu": mu, "stats.s": s}, window)

    def global_mean(value, shards_sum=False):
        """The whole batch's loss from this process's part (shards' losses add up or average)."""
        value = value.detach().float()
        if distributed:
            torch.distributed.all_reduce(value)
            value = value if shards_sum else value / world
        return value.item()

    from tqdm import tqdm
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, dynamic_ncols=True,
               disable=rank > 0)
    prior.train(), decoder.train()
    for step in bar:
        if step >= window_end:  # --data c4: on to the next window of the stream (rank 0 embeds it first)
            window = {"start": window_end, "position": next_position}
            if distributed and rank > 0:
                torch.distributed.barrier()
            examples, next_position = c4_window(args, tokenizer, window["position"])
            x_all, p_all, pairs, batches = batch_source(prepare(args, tokenizer, examples))
            window_end = window["start"] + batches.per_epoch
            if distributed and rank == 0:
                torch.distributed.barrier()
        idx = batches.get(step - (window["start"] if window else 0))
        lr_scale = cosine_lr(step, args.steps, args.warmup)
        for opt in (opt_prior, opt_decoder):
            for group in opt.param_groups:
                group["lr"] = group["peak_lr"] * lr_scale

        # 1. prior step: v-MSE on the whole batch (this process: rows prior_shard)
        x, prefix = x_all[idx].to(device), p_all[idx].to(device)
        with autocast:
            prior_loss = prior_step(x, prefix, prior_shard).mean()
        opt_prior.zero_grad(set_to_none=True)
        prior_loss.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        opt_prior.step()
        ema_update(ema, prior, min(args.ema, (1 + step) / (10 + step)))

        # 2. decoder step: next-token loss on the first rows of the same batch
        sub = idx[:args.decoder_batch]
        with autocast:
            decoder_loss = decoder_step([pairs[i][0] for i in sub], [pairs[i][1] for i in sub], x_all[sub].to(device),
                                        decoder_shard)
        opt_decoder.zero_grad(set_to_none=True)
        (decoder_loss * world).backward()  # DDP averages gradients; the shards' losses are meant to add up
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        opt_decoder.step()

        losses = global_mean(prior_loss), global_mean(decoder_loss, shards_sum=True)
        if not all(map(math.isfinite, losses)):
            if rank == 0:
                print(f"error: the loss became {losses[0]} (prior) / {losses[1]} (decoder) at step {step + 1}; "
                      f"stopped without saving, the last good checkpoint in {out}/ is kept (try a lower "
                      "learning rate, then --resume)", file=sys.stderr)
            raise SystemExit(1)
        bar.set_postfix_str(f"prior {losses[0]:.3f} | decoder {losses[1]:.3f}")
        if log:
            log.write(step + 1, prior=losses[0], decoder=losses[1], lr_scale=lr_scale)
        if args.stop_at is not None and step + 1 == args.stop_at:
            save(step + 1)
            if rank == 0:
                print(f"stopped at step {step + 1} (--stop-at); continue with --resume")
            return finish(distributed)
        if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save(step + 1)
            if rank == 0 and held_texts:
                cos, _ = reconstruction_cosine(decoder, tokenizer, prepared["cache"], held_texts[:32], mu, s, device)
                tqdm.write(f"step {step + 1}: prior {losses[0]:.3f} | decoder {losses[1]:.3f} | "
                           f"reconstruction cosine {cos:.3f}")
    save(args.steps)

    if rank == 0:
        if held_texts:
            cos, decoded = reconstruction_cosine(decoder, tokenizer, prepared["cache"], held_texts, mu, s, device)
            print(f"reconstruction cosine (held-out, embed -> decode -> re-embed, n={len(held_texts)}): {cos:.3f}")
            for original, text in list(zip(held_texts, decoded))[:3]:
                print(f"  {original[:70]!r}\n   -> {text[:70]!r}")
        print(f"done in {(time.time() - started) / 60:.1f} min; checkpoint in {out}/")
    finish(distributed)


def finish(distributed):
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class LossLog:
    """out/log.jsonl: one line of losses per step. On --resume the lines after the checkpoint's
    step (written by the interrupted run) are dropped, so the log is that of an uninterrupted run."""

    def __init__(self, path, start_step):
        self.path = Path(path)
        lines = self.path.read_text().splitlines() if start_step and self.path.exists() else []
        kept = [l for l in lines if json.loads(l)["step"] <= start_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(l + "\n" for l in kept))
        self.file = open(self.path, "a")

    def write(self, step, **values):
        self.file.write(json.dumps(dict(step=step, **{k: round(v, 6) for k, v in values.items()})) + "\n")
        self.file.flush()


if __name__ == "__main__":
    run_cli(lambda: main(get_args()))
