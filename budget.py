"""What a training run costs: model sizes, FLOPs and MFU, and the GPU memory it needs.

  sizes       parameter counts of the prior, the soft-prompt generator and the language model, built
              on the meta device from configs alone (nothing is allocated or downloaded)
  FLOPs, MFU  analytic forward FLOPs (Prior.flops_per_example, Decoder.flops_per_sequence) times 3 for
              a training step (forward + backward); model FLOP utilisation = achieved FLOP/s over the
              device's peak bf16 FLOP/s (a table of common GPUs, --peak-tflops, or on a CPU a measured
              large matrix product)
  step_flops  one training step's FLOPs, and the frozen encoder's over the new texts a C4 step brings
  describe_run  what train.py prints first: tier, encoder, language model, sizes, compute, the memory plan
  memory      an estimate of peak GPU memory: fp32 weights, gradients and AdamW moments of what is
              trained, the prior's EMA, the frozen encoder in bf16, autocast's bf16 weight copies,
              and the activations of one micro-batch (Korthikanti et al. 2022: about 34 s b h bytes
              per transformer layer in half precision with fused attention; 2 s b h with activation
              checkpointing; the logits in bf16 and fp32 with their gradient), and on C4 the encoder's
              activations while it embeds the next window beside training. The global batch stays
              the paper's; it is split into the largest micro-batches that fit.
"""
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from data import C4_TOKENS, HELD_OUT_PERCENT
from decoder import SoftPromptGenerator, gpt2_sequence_flops
from diffusion import Prior
from encoder import EMBED_BATCH, cache_dir_for, disk_usage
from utils import CHECKPOINT

# Dense bf16 tensor-core peak (TFLOP/s) by a substring of torch.cuda.get_device_name(); longest match wins.
PEAK_BF16_TFLOPS = {
    "B200": 2250, "H200": 989, "GH200": 989, "H100 NVL": 835, "H100 PCIe": 756, "H100": 989, "H800": 989,
    "A100": 312, "A800": 312, "L40S": 362, "L40": 181, "L4": 121, "A10": 125, "A6000": 155,
    "RTX 4090": 165, "RTX 3090": 71,
}
# Encoders that cannot be sized without loading them: (parameters, width, feed-forward width, heads). Sentence-T5
# is the encoder of the original T5 (XL: T5-3B's, 24 layers, ReLU feed-forward), not of T5 v1.1.
ENCODERS = {"sentence-t5-xxl": (4.86e9, 1024, 65536, 128), "sentence-t5-xl": (1.24e9, 1024, 16384, 32),
            "sentence-t5-large": (335e6, 1024, 4096, 16), "sentence-t5-base": (110e6, 768, 3072, 12),
            "minilm": (22.7e6, 384, 1536, 12), "all-MiniLM-L6-v2": (22.7e6, 384, 1536, 12)}
GiB = 2 ** 30


def count_params(build):
    """Parameters of the module build() returns, built on the meta device (no memory, no init); the
    random number generator is left as it was, so that printing sizes never changes a run."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def encoder_shape(name):
    """(parameters, width, feed-forward width, heads) of a sentence encoder: read from a local folder (a copy
    of a known one under another name, say), else known by (the end of) its name, else None."""
    return folder_shape(name) or next((shape for key, shape in ENCODERS.items()
                                       if str(name).rstrip("/").endswith(key)), None)


def folder_shape(folder):
    """(parameters, width, feed-forward width, heads) of a sentence-transformers folder, from its config.json
    and the shapes in its safetensors headers (no weights read); None where they cannot tell."""
    from safetensors import safe_open
    folder = Path(os.path.expanduser(str(folder)))
    try:
        config = json.loads((folder / "config.json").read_text())
        get = lambda *keys: next(config[k] for k in keys if k in config)  # T5's names, then BERT's
        width, ff, heads = get("d_model", "hidden_size"), get("d_ff", "intermediate_size"), \
            get("num_heads", "num_attention_heads")
        params = 0
        for file in folder.rglob("*.safetensors"):
            with safe_open(str(file), "np") as f:
                params += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    except Exception:  # not a folder, no config.json, no such field, no safetensors header: not to be told
        return None
    return (params, width, ff, heads) if params else None


def encoder_params(name):
    """Known size of a sentence encoder by (the end of) its name, else None."""
    return (encoder_shape(name) or (None,))[0]


def embedding_activations(name, batch, text_len):
    """Bytes the frozen encoder (half precision, no gradients) holds at its peak while it embeds `batch` texts
    of text_len GPT-2 tokens (0 for an encoder not in ENCODERS). Per token: the feed-forward's hidden layer
    before and after its activation (2 x 2 x ff bytes) and a few hidden states (12 x width); per head and
    pair of tokens, the attention's position bias and mask (2 bytes). The encoder's own tokens are taken
    as 1.5x GPT-2's, a margin for its tokenizer."""
    shape = encoder_shape(name)
    if shape is None:
        return 0
    _, width, ff, heads = shape
    tokens = math.ceil(1.5 * text_len)
    return batch * tokens * (4 * ff + 12 * width) + 2 * batch * heads * tokens ** 2


def step_flops(prior_config, lm_config, seq_len, n_soft, prior_batch, decoder_batch, encoder_params=None,
               embed_len=0):
    """Analytic FLOPs of one training step, the decoder's sequences of seq_len tokens (n_soft of them
    slots): the prior's and the decoder's forward + backward (3x the forward), and, with encoder_params, the
    forward pass of the frozen encoder over the prior_batch new texts of embed_len tokens that a C4 step
    brings (each window's texts are embedded once; about 2 FLOPs per parameter and token)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        prior = Prior(prior_config)
    lm = gpt2_sequence_flops(lm_config["n_layer"], lm_config["n_embd"], lm_config["vocab_size"], seq_len, n_soft)
    return {"prior": 3 * prior_batch * prior.flops_per_example(), "decoder": 3 * decoder_batch * lm,
            "embedding": 2 * (encoder_params or 0) * embed_len * prior_batch}


def peak_flops(device, bf16, given_tflops=None):
    """-> (peak FLOP/s, where it comes from). CUDA: the table; a CPU: a measured 1024^3 matrix product."""
    if given_tflops:
        return given_tflops * 1e12, "--peak-tflops"
    if str(device).startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        key = max((k for k in PEAK_BF16_TFLOPS if k in name), key=len, default=None)
        return (PEAK_BF16_TFLOPS[key] * 1e12, f"{key} bf16 table") if key else (None, f"{name} not in the table")
    dtype = torch.bfloat16 if bf16 else torch.float32
    a = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)).to(device, dtype)  # training's RNG untouched
    (a @ a).sum().item()  # warm-up
    started, n = time.perf_counter(), 0
    while time.perf_counter() - started < 0.3:
        (a @ a).sum().item()
        n += 1
    return 2 * 1024 ** 3 * n / (time.perf_counter() - started), f"measured {str(dtype)[6:]} matmul"


class Throughput:
    """Samples/s, tokens/s, FLOP/s and MFU of the prior and decoder steps over a stretch of steps."""

    def __init__(self, prior, decoder, peak):
        self.prior_flops = 3 * prior.flops_per_example()  # forward + backward
        self.decoder, self.peak = decoder, peak
        self.reset()

    def reset(self):
        self.t_prior = self.t_decoder = self.examples = self.sequences = self.tokens = self.flops_decoder = 0.0

    def add(self, t_prior, t_decoder, batch, lengths):
        """One step: seconds of each step, the prior batch size, the decoder's sequence lengths."""
        self.t_prior, self.t_decoder = self.t_prior + t_prior, self.t_decoder + t_decoder
        self.examples += batch
        self.sequences += len(lengths)
        self.tokens += sum(lengths)
        self.flops_decoder += sum(3 * self.decoder.flops_per_sequence(n) for n in lengths)

    def report(self):
        """{prior_samples_s, prior_tflops, prior_mfu, decoder_samples_s, decoder_tokens_s, ...}; resets."""
        prior_fs = self.prior_flops * self.examples / max(self.t_prior, 1e-9)
        decoder_fs = self.flops_decoder / max(self.t_decoder, 1e-9)
        mfu = (lambda fs: fs / self.peak) if self.peak else (lambda fs: None)
        out = {"prior_samples_s": self.examples / max(self.t_prior, 1e-9), "prior_tflops": prior_fs / 1e12,
               "prior_mfu": mfu(prior_fs), "decoder_samples_s": self.sequences / max(self.t_decoder, 1e-9),
               "decoder_tokens_s": self.tokens / max(self.t_decoder, 1e-9), "decoder_tflops": decoder_fs / 1e12,
               "decoder_mfu": mfu(decoder_fs)}
        self.reset()
        return out


def format_throughput(r):
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"
    return (f"prior {r['prior_samples_s']:.0f} samples/s, {r['prior_tflops']:.2f} TFLOP/s, MFU {pct(r['prior_mfu'])} | "
            f"decoder {r['decoder_samples_s']:.1f} samples/s, {r['decoder_tokens_s']:.0f} tokens/s, "
            f"{r['decoder_tflops']:.2f} TFLOP/s, MFU {pct(r['decoder_mfu'])}")


# ----------------------------------------------------------------------------- memory


def memory_estimate(sizes, prior_config, lm_config, seq_len, prior_micro, decoder_micro, checkpointing=False,
                    embedding=0):
    """Bytes of peak GPU memory, by part, for training in bf16 autocast.

    sizes: {prior, soft_prompt, lm, encoder} parameter counts (encoder None: not counted). embedding: bytes
    of the encoder's activations while it embeds the next C4 window beside training (embedding_activations).
    """
    trained = sizes["prior"] + sizes["soft_prompt"] + sizes["lm"]
    h, L, V = lm_config["n_embd"], lm_config["n_layer"], lm_config["vocab_size"]
    per_layer = (2 if checkpointing else 34) * seq_len * decoder_micro * h
    decoder_act = L * per_layer + (34 * seq_len * decoder_micro * h if checkpointing else 0) \
        + 10 * decoder_micro * seq_len * V                       # logits: bf16 + fp32 copy + fp32 gradient
    prior_act = 34 * prior_config["n_tokens"] * prior_config["width"] * prior_config["depth"] * prior_micro
    parts = {
        "weights, gradients, AdamW (fp32)": 16 * trained,
        "prior EMA": 4 * sizes["prior"],
        "autocast bf16 weight copies": 2 * trained,
        "frozen encoder (bf16)": 2 * (sizes["encoder"] or 0),
        "activations (the larger of the two steps)": max(decoder_act, prior_act),
        **({"encoder activations (next C4 window)": embedding} if embedding else {}),
        "CUDA context and allocator slack": 1.0 * GiB,
    }
    parts["total"] = sum(parts.values())
    return parts


def plan_micro_batches(sizes, prior_config, lm_config, seq_len, prior_batch, decoder_batch, device_bytes,
                       checkpointing=False, fill=0.9, embedding=0, chosen=(None, None)):
    """The largest micro-batches (divisors of each process's batch) whose estimate fits in
    fill * device_bytes -> (prior micro, decoder micro, estimate); None for the micro-batches when
    even 1 does not fit. chosen: micro-batches given (--micro-batch, --decoder-micro-batch), taken as
    they are."""
    divisors = lambda n: [m for m in range(n, 0, -1) if n % m == 0]
    estimate = lambda p, d: memory_estimate(sizes, prior_config, lm_config, seq_len, p, d, checkpointing, embedding)
    fits = lambda p, d: estimate(p, d)["total"] <= fill * device_bytes
    prior_micro = chosen[0] or next((m for m in divisors(prior_batch) if fits(m, 1)), None)
    decoder_micro = chosen[1] or next((m for m in divisors(decoder_batch) if fits(1, m)), None)
    if prior_micro is None or decoder_micro is None:
        return None, None, estimate(1, 1)
    return prior_micro, decoder_micro, estimate(prior_micro, decoder_micro)


def format_estimate(parts):
    return ", ".join(f"{k} {v / GiB:.1f}" for k, v in parts.items() if k != "total") + \
        f" -> total {parts['total'] / GiB:.1f} GiB"


def compute_line(args, prior_config, decoder_config, lm_config, encoder_params, device, world):
    """What train.py prints about compute: FLOPs a step and in all, C4's embedding apart, and hours at
    40% MFU where the peak is known (CUDA or --peak-tflops); an estimate until a GPU run measures it."""
    c4 = args.data == "c4"
    text_len = min(C4_TOKENS, args.max_len) if c4 else args.max_len
    flops = step_flops(prior_config, lm_config, text_len + decoder_config.n_soft + 2, decoder_config.n_soft,
                       args.batch_size, args.decoder_batch, encoder_params if c4 else None, text_len)
    step = flops["prior"] + flops["decoder"]
    line = (f"compute (analytic, texts of {text_len} tokens): {step:.1e} FLOPs a training step (prior "
            f"{flops['prior']:.1e}, decoder {flops['decoder']:.1e})")
    if flops["embedding"]:  # C4: every text is new, so each step brings --batch-size texts to embed
        line += f", and {flops['embedding']:.1e} to embed its {args.batch_size} new C4 examples"
    line += f"; {args.steps} steps: {args.steps * step:.1e}" + \
        (f" + {args.steps * flops['embedding']:.1e} FLOPs" if flops["embedding"] else " FLOPs")
    peak = peak_flops(device, True, args.peak_tflops)[0] if args.peak_tflops or str(device).startswith("cuda") else None
    if peak:
        def hours(flop, gpus):  # at 40% MFU; a tiny run's in minutes or seconds
            seconds = args.steps * flop / (0.4 * peak * gpus)
            return f"{seconds / 3600:.1f} h" if seconds >= 360 else f"{seconds / 60:.1f} min" if seconds >= 60 \
                else f"{seconds:.1f} s"
        line += f"; at 40% MFU about {hours(step, world)} of training steps"
        if flops["embedding"]:
            line += f" and {hours(flops['embedding'], world)} of embedding, in the background"
    return line


def disk_line(args, sizes, dim):
    """What a run writes to disk, against the space free there: the checkpoint (the weights, the prior's EMA
    and AdamW's two moments, in fp32; twice that while a new one replaces the old) and on C4 the window
    files of the embedding cache (every --window texts' prefix and continuation embeddings in fp16, kept
    for later runs), with a warning when the disk looks too small. -> (line, warning or None)"""
    trained = sizes["prior"] + sizes["soft_prompt"] + sizes["lm"]
    checkpoint = 4 * (3 * trained + sizes["prior"])
    size = lambda n: f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2 ** 20:.0f} MiB"
    line = f"disk: checkpoint {size(checkpoint)} ({size(2 * checkpoint)} while one is saved)"
    need = {args.out: checkpoint * (1 if (Path(args.out) / CHECKPOINT).exists() else 2)}  # what is not there yet
    if args.data == "c4":
        steps_per_window = max(1, int(args.window * (1 - HELD_OUT_PERCENT / 100)) // args.batch_size)
        windows = math.ceil(args.steps / steps_per_window)
        if args.drop_windows:  # those since the last checkpoint, the current one and the next
            windows = min(windows, math.ceil(args.save_every / steps_per_window) + 2)
        window_bytes = args.window * 2 * dim * 2
        stored = disk_usage(cache_dir_for(args.cache_dir, args.encoder))  # windows embedded ahead, or by a resumed run
        need[args.cache_dir] = need.get(args.cache_dir, 0) + max(0, windows * window_bytes - stored)
        each = f"windows of {window_bytes / GiB:.2f} GiB"
        kept = f"at most {windows} {each} at a time, --drop-windows" if args.drop_windows else \
            f"{windows} {each} over {args.steps} steps, kept for later runs; --drop-windows keeps a few"
        line += f", C4 embedding cache {windows * window_bytes / GiB:.0f} GiB ({kept}; {stored / GiB:.0f} GiB there now)"
    disks = {}  # by file system: out and the cache may share one
    for folder, n in need.items():
        where = next(p for p in (Path(folder).resolve(), *Path(folder).resolve().parents) if p.exists())
        disk = disks.setdefault(os.stat(where).st_dev, {"need": 0, "where": where, "free": shutil.disk_usage(where).free})
        disk["need"] += n
    short = [f"{d['need'] / GiB:.0f} GiB needed on the disk of {d['where']}, {d['free'] / GiB:.0f} GiB free"
             for d in disks.values() if d["need"] > d["free"]]
    if not short:
        return line, None
    fix = "free space, point --out / --cache-dir at a larger disk" + \
        (", or --drop-windows" if args.data == "c4" and not args.drop_windows else "")
    return line, f"warning: {'; '.join(short)} ({fix})"


def describe_run(args, prior_config, decoder_config, lm_config, device=None, world=1):
    """Print the tier, encoder, language model and model sizes, the compute (compute_line), then the memory plan.

    On CUDA (or for each size of --gpu-memory) the estimate of peak GPU memory is printed beside the
    device's memory, with the micro-batches that fit; one line ends the run when even micro-batch 1
    does not. Sets --micro-batch / --decoder-micro-batch when they were not given."""
    sizes = {"prior": count_params(lambda: Prior(prior_config)),
             "soft_prompt": count_params(lambda: SoftPromptGenerator(decoder_config, lm_config["n_embd"])),
             "lm": count_params(lambda: GPT2LMHeadModel(GPT2Config(**lm_config))),
             "encoder": encoder_params(args.encoder)}
    million = lambda n: "?" if n is None else f"{n / 1e6:.1f}M"
    print(f"tier {args.tier} | encoder {args.encoder} ({million(sizes['encoder'])}) | language model {args.lm} "
          f"({million(sizes['lm'])}) | prior {million(sizes['prior'])} | soft prompt {million(sizes['soft_prompt'])}")
    seq_len = args.max_len + decoder_config.n_soft + 2  # the longest sequence, for memory
    print(compute_line(args, prior_config, decoder_config, lm_config, sizes["encoder"], device, world))
    line, warning = disk_line(args, sizes, prior_config.dim)
    print(line)
    if warning:
        print(warning, file=sys.stderr)
    per_process = (args.batch_size // world, args.decoder_batch // world)
    gpus = [g * GiB for g in args.gpu_memory or []]
    if device is not None and str(device).startswith("cuda"):
        gpus = [torch.cuda.get_device_properties(torch.device(device)).total_memory]
    # C4: the next window is embedded on the same GPU while this one trains
    embedding = embedding_activations(args.encoder, EMBED_BATCH, min(C4_TOKENS, args.max_len)) if args.data == "c4" else 0
    chosen = (args.micro_batch, args.decoder_micro_batch)  # given: taken as they are, and estimated
    plans = []
    for total in gpus:
        prior_micro, decoder_micro, estimate = plan_micro_batches(
            sizes, asdict(prior_config), lm_config, seq_len, *per_process, total, args.grad_checkpointing,
            embedding=embedding, chosen=chosen)
        if prior_micro is None:
            why = (f"training does not fit in {total / GiB:.3g} GiB of GPU memory even at micro-batch 1 (estimate "
                   f"{format_estimate(estimate)}); try --grad-checkpointing, a smaller --lm (e.g. gpt2) or a larger "
                   "GPU")
            if len(gpus) == 1:  # the run's own GPU, or the one size asked for
                raise SystemExit(f"error: {why}")
            print(f"GPU {total / GiB:.3g} GiB: {why}")  # --sizes --gpu-memory 8,24: the plans of the others too
            continue
        over = any(chosen) and estimate["total"] > 0.9 * total  # the given ones, beyond what a plan allows
        print(f"GPU {total / GiB:.3g} GiB: micro-batches prior {prior_micro} of {per_process[0]}, decoder "
              f"{decoder_micro} of {per_process[1]} per process" + (" (as given: more than the 90% of the GPU "
              "planned for, so likely out of memory; smaller ones, or leave them to the plan)" if over else "") +
              f"; estimate {format_estimate(estimate)}")
        plans.append((prior_micro, decoder_micro))
    if plans:  # the run's GPU (on CUDA the only one planned for), or the first size of --sizes --gpu-memory
        args.micro_batch, args.decoder_micro_batch = plans[0]
    return sizes


if __name__ == "__main__":  # a module of train.py's, with no command line of its own
    raise SystemExit("budget.py has no command line: python train.py [--data c4] --sizes --gpu-memory 24,40,80 "
                     "prints what it works out, without training")
