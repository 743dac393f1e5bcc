"""Training texts: the tiny tier's rated sentences, local files, or C4; and the prefix split.

DGLM trains on texts split at a random point into prefix | continuation (sec. 4.1): the decoder
learns p(continuation | prefix, proposal) and the prior learns p(e_continuation | e_prefix).

  --data tiny   ~23.7k sentences with mean human valence ratings in [-4, 4] from four domains
                (movie reviews, tweets, product reviews, news editorials), shipped inside the
                source distribution of `vaderSentiment==3.3.2` (Hutto & Gilbert 2014, MIT).
                Fetched with pip, checked against a sha256, cached as corpus.jsonl.
  --data PATH   a local .txt (one text per line) or .jsonl (a `text` field; optional `label`).
  --data c4     C4 `en`, streamed with `datasets` (needs internet).
"""
import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path

VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
DOMAIN_FILES = {  # file in hutto_ICWSM_2014.tar.gz -> domain label
    "movieReviewSnippets_GroundTruth.txt": "movie",
    "tweets_GroundTruth.txt": "tweet",
    "amazonReviewSnippets_GroundTruth.txt": "product",
    "nytEditorialSnippets_GroundTruth.txt": "news",
}
DOMAINS = list(DOMAIN_FILES.values())
HELD_OUT_PERCENT = 4  # sentences whose sha1 falls here are never trained on (eval prefixes)


def is_held_out(text):
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:8], 16) % 100 < HELD_OUT_PERCENT


def sha256_of(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def prepare_tiny(cache_dir):
    """Fetch (once) and parse the rated sentences -> list of {text, rating, domain}."""
    cache_dir = Path(cache_dir)
    corpus = cache_dir / "corpus.jsonl"
    if corpus.exists():
        return read_jsonl(corpus)
    cache_dir.mkdir(parents=True, exist_ok=True)
    sdist = cache_dir / VADER_SDIST
    if not sdist.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               "vaderSentiment==3.3.2", "--dest", str(cache_dir)]
        if subprocess.run(cmd, capture_output=True).returncode != 0 or not sdist.exists():
            raise SystemExit("error: could not fetch vaderSentiment==3.3.2 from PyPI for the tiny corpus; "
                             f"put {VADER_SDIST} into {cache_dir} by hand or pass --data FILE")
    if sha256_of(sdist) != VADER_SHA256:
        raise SystemExit(f"error: {sdist} has an unexpected sha256; delete it and run again")
    rows = []
    with tarfile.open(sdist) as outer:
        inner_bytes = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz").read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        for filename, domain in DOMAIN_FILES.items():
            raw = inner.extractfile(f"hutto_ICWSM_2014/{filename}").read().decode("utf-8")
            for line in raw.splitlines():
                parts = line.split("\t")
                if len(parts) < 3 or not parts[2].strip():
                    continue
                rows.append({"text": " ".join(parts[2].split()), "rating": float(parts[1]), "domain": domain})
    write_jsonl(corpus, rows)
    return rows


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows):
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def load_local(path):
    """A .txt (one text per line) or .jsonl (`text` field) -> list of {text, ...}."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: data file {path} does not exist (accepted: tiny, c4, a .txt or .jsonl file)")
    try:
        if path.suffix == ".jsonl":
            rows = [r for r in read_jsonl(path) if str(r.get("text", "")).strip()]
        else:
            rows = [{"text": line.strip()} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SystemExit(f"error: cannot read {path}: {err}") from None
    if not rows:
        raise SystemExit(f"error: {path} holds no texts (expected one per line, or a `text` field per JSON line)")
    return rows


def stream_c4(max_texts, words_per_text=64, seed=0):
    """First `max_texts` chunks of C4 `en` (streamed, never held whole)."""
    try:
        from datasets import load_dataset
        stream = load_dataset("allenai/c4", "en", split="train", streaming=True)
        rows = []
        for doc in stream:
            words = doc["text"].split()
            for i in range(0, len(words), words_per_text):
                rows.append({"text": " ".join(words[i:i + words_per_text])})
                if len(rows) >= max_texts:
                    return rows
        return rows
    except ImportError:
        raise SystemExit("error: --data c4 needs `pip install datasets`") from None
    except Exception as err:  # datasets raises many kinds of connection errors
        raise SystemExit(f"error: could not stream allenai/c4 from the Hugging Face hub ({type(err).__name__}); "
                         "offline, pass a local .txt/.jsonl with --data PATH or use --data tiny") from None


def load_corpus(data, cache_dir, max_texts=200_000):
    if data == "tiny":
        return prepare_tiny(Path(cache_dir) / "tiny")
    if data == "c4":
        return stream_c4(max_texts)
    return load_local(data)


def split_text(text, rng, max_prefix_frac=1.0):
    """Split at a uniformly random word boundary: k ~ U{0..floor(frac*n)}; the prefix may be empty."""
    words = text.split()
    k = rng.randint(0, int(max_prefix_frac * (len(words) - 1)))
    return " ".join(words[:k]), " ".join(words[k:])


def make_examples(rows, seed, max_prefix_frac):
    """Fixed prefix/continuation split per text (so embeddings can be cached), train/held-out split."""
    rng = random.Random(seed)
    train, held_out = [], []
    for row in rows:
        prefix, continuation = split_text(row["text"], rng, max_prefix_frac)
        example = dict(row, prefix=prefix, continuation=continuation)
        (held_out if is_held_out(row["text"]) else train).append(example)
    if not train:
        raise SystemExit("error: no training texts left after holding out the evaluation split")
    return train, held_out
