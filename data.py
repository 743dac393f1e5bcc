"""Texts: the tiny tier's rated sentences, local files, C4 and the paper probes' labelled data sets.

DGLM trains on texts split at a random point into prefix | continuation (sec. 4.1): the decoder
learns p(continuation | prefix, proposal) and the prior learns p(e_continuation | e_prefix).

  --data tiny   ~23.7k sentences with mean human valence ratings in [-4, 4] from four domains
                (movie reviews, tweets, product reviews, news editorials), shipped inside the
                source distribution of `vaderSentiment==3.3.2` (Hutto & Gilbert 2014, MIT).
                Fetched from PyPI (with pip, or its simple index where pip is not installed),
                checked against a sha256, cached as corpus.jsonl.
  --data PATH   a local .txt (one text per line), .jsonl (a `text` field) or .csv / .tsv (a `text` column).
  --data c4     C4 `en`, streamed with `datasets` from the hub, or from a local copy of its
                .json.gz files (--c4-path DIR or $DGLM_C4_PATH). Prepared as in the paper: documents
                with > 0.25 GPT-2 tokens per character dropped, 128-token chunks, the first 88
                tokens of each kept. C4Examples streams it resumably; see its `position`.
  probe data    SST-2, Amazon polarity, Civil Comments and AG News (the paper tier's probes, guide.py),
                streamed from the hub or read from local copies (--probe-data DIR).
"""
import csv
import glob
import hashlib
import importlib.util
import io
import itertools
import json
import os
import random
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
from pathlib import Path

# A user's text files (--data, --labels, --prompts) are UTF-8, with or without the byte-order mark that Excel
# and Notepad write: read as plain UTF-8 it would begin the first text, or the first column's name.
USER_TEXT = "utf-8-sig"
VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
PYPI_SIMPLE = "https://pypi.org/simple/vadersentiment/"
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
        fetch_sdist(sdist)
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


def tiny_format(rows):
    """Whether every row is in the tiny corpus's format (a numeric rating, one of its four domains), which its
    probes are fitted on; a file of the user's own with a rating field of another kind gets none of them."""
    return bool(rows) and all(isinstance(r.get("rating"), (int, float)) and not isinstance(r["rating"], bool)
                              and r.get("domain") in DOMAINS for r in rows)


def fetch_sdist(sdist):
    """vaderSentiment's source archive from PyPI into `sdist`: with pip where it is installed (it reads the
    user's index settings, a mirror say), else from PyPI's simple index over HTTPS (a venv made by uv has
    no pip). prepare_tiny checks the sha256 of what arrives."""
    if importlib.util.find_spec("pip"):
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               "vaderSentiment==3.3.2", "--dest", str(sdist.parent)]
        if subprocess.run(cmd, capture_output=True).returncode == 0 and sdist.exists():
            return
    try:  # PEP 691: the index as JSON, each file with its url
        index = urllib.request.Request(PYPI_SIMPLE, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(index, timeout=60) as response:
            url = next(f["url"] for f in json.load(response)["files"] if f["filename"] == VADER_SDIST)
        url = urllib.parse.urljoin(PYPI_SIMPLE, url)  # an index may give it relative to itself
        with urllib.request.urlopen(url, timeout=60) as response:
            part = sdist.with_name(sdist.name + ".part")
            part.write_bytes(response.read())
        part.replace(sdist)
    except (OSError, ValueError, KeyError, StopIteration) as err:  # URLError and timeouts are OSErrors
        raise SystemExit(f"error: could not fetch vaderSentiment==3.3.2 from PyPI for the tiny corpus ({err}); "
                         f"put {VADER_SDIST} into {sdist.parent} by hand or pass --data FILE") from None


def not_utf8(err):
    """What a UnicodeDecodeError in a user's file means, and what to do."""
    return f"it is not UTF-8 (it has the byte 0x{err.object[err.start]:02x}); save it as UTF-8 (in Excel: CSV UTF-8)"


def text_lines(path):
    """The stripped, non-empty lines of a user's text file (--data FILE.txt, --prompts)."""
    return [line.strip() for line in Path(path).read_text(encoding=USER_TEXT).splitlines() if line.strip()]


def read_jsonl(path):
    """JSON lines -> a list; a line that is not JSON is a ValueError naming the line."""
    rows = []
    with open(path, encoding=USER_TEXT) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"line {n} is not JSON ({err.msg})") from None
    return rows


def write_jsonl(path, rows):
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def input_file(path, what, accepted=""):
    """Path(path) when it names a file; a folder or a missing path is a one-line error about `what`."""
    if not Path(path).is_file():
        why = ("does not exist" if not str(path) or not Path(path).exists() else  # Path("") is ".", a folder
               "is a folder" if Path(path).is_dir() else "is not a file (a pipe or a device: save it to a file first)")
        raise SystemExit(f"error: {what} {str(path)!r} {why}" + (f" (accepted: {accepted})" if accepted else ""))
    return Path(path)


def data_file(path):
    """--data as a local file: Path(path), or the one-line error naming what --data accepts."""
    return input_file(path, "data file", "tiny, c4, a .txt, .jsonl, .csv or .tsv file")


def load_local(path):
    """A .txt (one text per line), .jsonl (`text` field) or .csv / .tsv (`text` column) -> list of {text, ...}."""
    path = data_file(path)
    suffix = path.suffix.lower()  # Windows and Excel write .CSV
    try:
        if suffix == ".jsonl":
            rows = read_jsonl(path)
            bad = next((n for n, r in enumerate(rows, 1)
                        if not isinstance(r, dict) or not isinstance(r.get("text", ""), str)), None)
            if bad:
                raise ValueError(f"record {bad} is not a JSON object with a string `text` field")
            if rows and not any("text" in r for r in rows):
                raise ValueError(f"no record has a `text` field (the first's fields: {', '.join(map(str, rows[0]))})")
            rows = [r for r in rows if r.get("text", "").strip()]
        elif suffix == ".json":  # line by line it would train on brackets and keys
            raise ValueError("a .json file is not read (one JSON object with a `text` field a line is .jsonl; "
                             "one text a line, .txt)")
        elif suffix in (".csv", ".tsv"):  # its text column only: read line by line it would train on the header
            records = read_table(path, path.read_text(encoding=USER_TEXT), "data file")
            if records and "text" not in records[0]:
                raise ValueError(f"no `text` column (its columns: {', '.join(map(str, records[0]))})")
            rows = [{"text": " ".join(r["text"].split())} for r in records if (r["text"] or "").strip()]
        else:
            rows = [{"text": line} for line in text_lines(path)]
    except UnicodeDecodeError as err:
        raise SystemExit(f"error: cannot read {path}: {not_utf8(err)}") from None
    except (ValueError, csv.Error) as err:
        raise SystemExit(f"error: cannot read {path}: {err}") from None
    if not rows:
        raise SystemExit(f"error: {path} holds no texts (expected one per line, a `text` field per JSON line, "
                         "or a `text` column)")
    return rows


# ----------------------------------------------------------------------------- C4 (paper tier)

C4_PATH_ENV = "DGLM_C4_PATH"  # a local copy of C4 `en`, used when no path is passed
C4_SUFFIXES = (".json", ".json.gz", ".jsonl", ".jsonl.gz")


def c4_files(path):
    """A folder of C4 shards, one file, or a glob -> sorted list of files in the C4 record format. In a
    folder holding allenai/c4's train shards (c4-train.*), those alone: not its validation shards, and
    one variant only (en, not en.noblocklist beside it)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(str(f) for f in path.rglob("*") if f.name.endswith(C4_SUFFIXES))
        train = [f for f in files if Path(f).name.startswith("c4-train.")]
        variants = sorted({str(Path(f).parent.relative_to(path)) for f in train})
        if len(variants) > 1:
            raise SystemExit(f"error: {path} holds C4 train shards in {len(variants)} folders "
                             f"({', '.join(variants[:4])}); point --c4-path at one of them, e.g. {path / variants[0]}")
        files = train or files
    elif path.is_file():
        files = [str(path)]
    else:
        files = sorted(glob.glob(str(path)))
    if not files:
        raise SystemExit(f"error: no C4 files at {path} (expected .json or .json.gz files with one "
                         '{"text", "timestamp", "url"} record per line, as in allenai/c4)')
    return files


def c4_fingerprint(path, n_files=None):
    """What a --resume checks of a local C4 copy: {path, files: how many, sha256 of the first n_files (default:
    all) names and sizes}. Names are taken below the files' common folder, so the copy may move, or be named
    by a folder above it. The stream's position counts files and documents: in others it would point elsewhere."""
    files = c4_files(path)
    root = os.path.dirname(files[0]) if len(files) == 1 else os.path.commonpath(files)
    listing = [(os.path.relpath(f, root), os.path.getsize(f)) for f in files[:n_files]]
    return {"path": os.path.abspath(str(path)), "files": len(listing),
            "sha256": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}


def open_c4(path=None):
    """C4 `en` train as a streaming `datasets.IterableDataset`: a local copy if given, else the hub."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise SystemExit("error: --data c4 needs `pip install datasets`") from None
    path = path or os.environ.get(C4_PATH_ENV)
    if path:
        return load_dataset("json", data_files=c4_files(path), split="train", streaming=True)
    return stream_from_hub("allenai/c4", "en", offline=f"point --c4-path (or ${C4_PATH_ENV}) at a local copy of its "
                           "en/*.json.gz files, or pass a local .txt/.jsonl with --data PATH, or use --data tiny")


def stream_from_hub(hub_id, *config, offline):
    """The train split of a Hugging Face data set, streamed; when the hub cannot be reached, one line
    ending with `offline`, what to do instead."""
    from datasets import load_dataset
    from utils import hub_answers
    hub_answers()  # offline, load_dataset fails at once instead of retrying
    try:
        return load_dataset(hub_id, *config, split="train", streaming=True)
    except Exception as err:  # datasets raises many kinds of connection errors
        raise SystemExit(f"error: could not stream {hub_id} from the Hugging Face hub ({type(err).__name__}); "
                         f"offline, {offline}") from None


C4_TOKENS = 88  # GPT-2 tokens kept of each 128-token chunk of a C4 document (the paper's preparation)


def c4_chunks(text, tokenizer, chunk=128, keep=C4_TOKENS, max_tokens_per_char=0.25):
    """One C4 document -> the texts of its training chunks, as the paper prepares C4.

    Documents with more than `max_tokens_per_char` GPT-2 tokens per character are dropped: tables,
    code, markup and non-English text (English prose has 4 to 5 characters per token). The tokens
    are cut into chunks of `chunk` tokens and each chunk keeps its first `keep` tokens; the text
    is whitespace-normalised (split_text joins words with single spaces anyway). Chunks that hold
    no word give "". (A window, elsewhere, is --window examples of the stream.)
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if not ids or len(ids) > max_tokens_per_char * len(text):
        return []
    return [" ".join(tokenizer.decode(ids[i:i + keep]).split()) for i in range(0, len(ids), chunk)]


def c4_texts(stream, path):
    """The `text` of each record of a C4 stream; a file that is not C4 (not JSON lines, records without a
    `text`), or a stream that breaks off, ends in one line instead of pyarrow's or datasets' traceback."""
    path = path or os.environ.get(C4_PATH_ENV)
    where = f"the C4 files at {path}" if path else "C4 from the hub"
    records = iter(stream)
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as err:  # pyarrow's ArrowInvalid for a file that is not JSON lines; a connection that drops
            why = " ".join(str(err).split())[:200]  # one line: pyarrow's messages span several
            raise SystemExit(f"error: cannot read {where} ({type(err).__name__}: {why}); C4 en is "
                             "JSON lines with a \"text\" field, in *.json or *.json.gz files") from None
        if not isinstance(record.get("text"), str):
            raise SystemExit(f"error: a record of {where} has no \"text\" field (its fields: "
                             f"{', '.join(record) or 'none'}); C4 en is JSON lines with a \"text\" field") from None
        yield record["text"]


class C4Examples:
    """C4 `en` as a stream of training examples {text, prefix, continuation}, never held whole.

    Iterating yields the chunks of c4_chunks() in file order, each split at a random word boundary
    (split_text, with an RNG seeded by (seed, document, chunk), so a split never depends on where a
    run started). `position` is where the stream stands after the last example it yielded, a small
    JSON-serialisable dict: save it with a checkpoint and pass it back as `position=` to continue
    exactly there. It holds the `datasets` stream's own state_dict() taken before the current
    document, so resuming skips whole files instead of re-reading them. Under torchrun every process
    reads the same stream: train.py splits the embedding of each window between them, not the stream.
    """

    def __init__(self, tokenizer, path=None, seed=0, position=None, chunk=128, keep=C4_TOKENS,
                 max_tokens_per_char=0.25, max_prefix_frac=1.0):
        self.tokenizer, self.path, self.seed = tokenizer, path, seed
        self.chunk, self.keep, self.max_tokens_per_char = chunk, keep, max_tokens_per_char
        self.max_prefix_frac = max_prefix_frac
        # doc: documents read before the current one; chunk: its chunks already used;
        # dataset: the datasets stream's state before the current document (None: the start)
        self.position = dict(position) if position else {"doc": 0, "chunk": 0, "dataset": None}
        self.stream = open_c4(path)  # opened here, so that an offline hub fails before training starts

    def __iter__(self):
        start = self.position
        if start["dataset"] is not None:
            self.stream.load_state_dict(start["dataset"])
        doc, skip, state = start["doc"], start["chunk"], start["dataset"]
        for text in c4_texts(self.stream, self.path):
            texts = c4_chunks(text, self.tokenizer, self.chunk, self.keep, self.max_tokens_per_char)
            for k in range(skip, len(texts)):
                if not texts[k]:
                    continue
                rng = random.Random(f"{self.seed}:{doc}:{k}")
                prefix, continuation = split_text(texts[k], rng, self.max_prefix_frac)
                self.position = {"doc": doc, "chunk": k + 1, "dataset": state}
                yield {"text": texts[k], "prefix": prefix, "continuation": continuation}
            doc, skip, state = doc + 1, 0, self.stream.state_dict()
            self.position = {"doc": doc, "chunk": 0, "dataset": state}


def c4_window(tokenizer, path, seed, position, size, max_prefix_frac):
    """The next `size` examples of the C4 stream from `position` -> (examples, position after them).

    C4 is never held whole: training runs through consecutive windows, each embedded once and
    trained on once; a checkpoint records where its window starts, so --resume rebuilds it exactly.
    """
    stream = C4Examples(tokenizer, path, seed, position, max_prefix_frac=max_prefix_frac)
    return list(itertools.islice(stream, size)), stream.position


def load_corpus(data, cache_dir):
    """--data tiny or a local file, read whole (C4 is never read whole: iterate C4Examples)."""
    if data == "tiny":
        return prepare_tiny(Path(cache_dir) / "tiny")
    return load_local(data)


def split_text(text, rng, max_prefix_frac=1.0):
    """Split a text of n words after its first k words, k ~ U{0 .. floor(frac (n - 1))}: the prefix
    may be empty, the continuation keeps at least one word."""
    words = text.split()
    k = rng.randint(0, int(max_prefix_frac * (len(words) - 1)))
    return " ".join(words[:k]), " ".join(words[k:])


def make_examples(rows, seed, max_prefix_frac):
    """Each row's prefix/continuation split, the same in every run of a seed on the same rows (so embeddings
    can be cached), and the train/held-out split (by a hash of the text alone)."""
    rng = random.Random(seed)
    train, held_out = [], []
    for row in rows:
        prefix, continuation = split_text(row["text"], rng, max_prefix_frac)
        example = dict(row, prefix=prefix, continuation=continuation)
        (held_out if is_held_out(row["text"]) else train).append(example)
    if len(train) < 2:  # the latents' per-dimension std needs two; anything useful needs thousands
        raise SystemExit(f"error: {len(train)} training text(s) left after holding out the evaluation split; "
                         "training needs at least 2 (thousands to learn anything)")
    return train, held_out


# ----------------------------------------------------------------------------- labelled data for the paper probes

AG_NEWS_TOPICS = ["world", "sports", "business", "scitech"]  # AG News labels 0..3
# local file name -> (hub id, text field, classes, label of a record); the train split is streamed
PROBE_SOURCES = {
    "sst2": ("stanfordnlp/sst2", "sentence", 2, lambda r: r["label"]),
    "amazon_polarity": ("fancyzhx/amazon_polarity", "content", 2, lambda r: r["label"]),
    "civil_comments": ("google/civil_comments", "text", 2, lambda r: int(r["toxicity"] > 0.5)),
    "ag_news": ("fancyzhx/ag_news", "text", 4, lambda r: r["label"]),
}
PROBE_HELD_OUT_EVERY = 10  # the 1st, 11th, 21st, ... example of each class measures a probe, never trains it


def open_probe_source(name, data_dir=None):
    """Stream the train split of a labelled data set: DIR/<name>.jsonl (or .jsonl.gz, .parquet) if
    there, with the hub's field names, else the Hugging Face hub (one-line error offline).
    -> (records, the local file or None)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise SystemExit("error: the paper probes need `pip install datasets`") from None
    hub_id = PROBE_SOURCES[name][0]
    if data_dir and not os.path.isdir(data_dir):
        raise SystemExit(f"error: --probe-data {data_dir} is not a folder")
    for suffix, builder in ((".jsonl", "json"), (".jsonl.gz", "json"), (".parquet", "parquet")):
        path = os.path.join(data_dir or "", name + suffix)
        if data_dir and os.path.exists(path):
            return load_dataset(builder, data_files=path, split="train", streaming=True), path
    return stream_from_hub(hub_id, offline=f"save its train split as DIR/{name}.jsonl (one record per line, the "
                           "hub's field names) and pass --probe-data DIR"), None


def read_labelled(name, max_per_class, data_dir=None):
    """Up to `max_per_class` (text, label, held_out) of each class, in the data set's order. A text is
    read once with each label: copies on both sides of the held-out split would score a probe on what it
    was fitted to."""
    _, field, n_classes, label_of = PROBE_SOURCES[name]
    counts, rows, seen = [0] * n_classes, [], set()
    records, local = open_probe_source(name, data_dir)
    try:
        for record in records:
            text, label = " ".join(str(record[field] or "").split()), label_of(record)
            if text and 0 <= label < n_classes and counts[label] < max_per_class and (text, label) not in seen:
                seen.add((text, label))
                rows.append((text, label, counts[label] % PROBE_HELD_OUT_EVERY == 0))
                counts[label] += 1
                if min(counts) == max_per_class:
                    break
    except Exception as err:  # a local copy that is not JSON lines, or lacks the hub's fields (the hub's own: raised)
        if local is None:
            raise
        raise SystemExit(f"error: cannot read {local} as {name} with the hub's field names ('{field}' and its label): "
                         f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if min(counts) == 0:
        raise SystemExit(f"error: {name} gave no examples of some class (counts per class: {counts})")
    return rows


# ----------------------------------------------------------------------------- a user's labelled file (guide.py --labels)


def unclosed_quote(text, delimiter):
    """The line where a quoted field opens and never closes (or only past csv's field limit), or None. A
    lenient CSV reader (read_labels') reads the rest of the file into that field; a strict one says so."""
    reader, start = csv.reader(io.StringIO(text), delimiter=delimiter, strict=True), 1
    while True:
        try:
            next(reader)
        except StopIteration:
            return None
        except csv.Error as err:  # other complaints (a quote inside a field) are read leniently, as before
            if "unexpected end of data" in str(err) or "field limit" in str(err):  # > 131072 characters in it
                return start
        start = reader.line_num + 1


def read_table(path, text, what):
    """The rows of a .csv or .tsv file's text, as dicts by its header row (names stripped: `text, label`
    names `label`); csv.Error where it is malformed."""
    # Excel in many European locales separates a .csv with ';'; blank lines above the header are no header
    header = next((line for line in text.split("\n") if line.strip()), "")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ";" if ";" in header and "," not in header else ","
    if line := unclosed_quote(text, delimiter):
        raise SystemExit(f"error: {what} {path}: a quote opens a text on line {line} and does not close, so the "
                         "rest of the file would read as that one text (close it, or double each quote inside a "
                         "quoted text)")
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    names = [name.strip() for name in next((row for row in reader if any(f.strip() for f in row)), [])]
    twice = sorted({name for name in names if name and names.count(name) > 1})
    if twice:  # the last of the two columns would win, silently
        raise SystemExit(f"error: {what} {path}: the header names the column {twice[0]!r} twice")
    rows = []
    for row in reader:
        if len(row) > len(names) and any(field.strip() for field in row[len(names):]):  # empty extras: trailing commas
            raise SystemExit(f"error: {what} {path}: line {reader.line_num} has {len(row)} fields, its header "
                             f"{len(names)}; a text that holds a {delimiter!r} needs quotes around it (\"...\"), or "
                             "save the file as .tsv" + (" or one text a line as .txt" if len(names) == 1 else ""))
        if any(field.strip() for field in row):  # a blank line is no row
            rows.append(dict(zip(names, row + [None] * (len(names) - len(row)))))
    return rows


def read_labels(path, text_column="text", label_column="label"):
    """A labelled file -> [(text, label)]: .csv or .tsv with a header row, or .jsonl with one object a
    line; `text_column` and `label_column` name the fields. Labels are kept as strings. A missing or
    unreadable file, a missing column or an empty text or label is a one-line error."""
    path = input_file(path, "labels file")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl"):
        raise SystemExit(f"error: labels file {path} must be .csv, .tsv or .jsonl")
    try:
        records = read_jsonl(path) if suffix == ".jsonl" else read_table(path, path.read_text(encoding=USER_TEXT),
                                                                           "labels file")
    except UnicodeDecodeError as err:
        raise SystemExit(f"error: cannot read labels file {path}: {not_utf8(err)}") from None
    except ValueError as err:  # read_jsonl's, naming the line
        raise SystemExit(f"error: cannot read labels file {path}: {err}") from None
    except csv.Error as err:
        raise SystemExit(f"error: cannot read labels file {path} ({type(err).__name__}: {err})") from None
    if not records:
        raise SystemExit(f"error: labels file {path} holds no examples")
    rows = []
    as_text = lambda value: "" if value is None else str(value)  # 0 is a label (JSON's 0 / 1 classes), null is none
    for n, record in enumerate(records, start=2 if suffix != ".jsonl" else 1):
        label = record.get(label_column) if isinstance(record, dict) else None
        if isinstance(label, (list, dict)):
            raise SystemExit(f"error: {path} record {n} has a label that is a JSON {type(label).__name__}, not a word "
                             "or a number")
        if isinstance(label, float) and label.is_integer():  # JSON's 1 and 1.0 are one label
            record = {**record, label_column: int(label)}
        missing = [c for c in (text_column, label_column) if not isinstance(record, dict) or c not in record]
        if missing:
            found = f"its columns: {', '.join(map(str, record))}; " if isinstance(record, dict) else ""
            raise SystemExit(f"error: {path} has no {' or '.join(f'`{c}`' for c in missing)} column (record {n}; "
                             f"{found}name the columns with --text-column / --label-column)")
        text, label = " ".join(as_text(record[text_column]).split()), as_text(record[label_column]).strip()
        if not text or not label:
            raise SystemExit(f"error: {path} record {n} has an empty {'text' if not text else 'label'}")
        rows.append((text, label))
    return rows
