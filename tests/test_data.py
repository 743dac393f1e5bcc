"""data.py: the tiny corpus, local files, the prefix split, C4 prepared and streamed from a local copy."""
import http.server
import importlib.util
import io
import itertools
import json
import math
import random
import tarfile
import threading
from pathlib import Path

import pytest

import data


def test_split_text_is_at_a_word_boundary_and_respects_the_prefix_fraction():
    rng = random.Random(0)
    text = "one two three four five six seven eight nine ten"
    for frac, lengths in [(0.3, {0, 1, 2}), (0.5, {0, 1, 2, 3, 4}), (1.0, set(range(10)))]:  # 0.3 x 9 = 2.7: 2
        seen = set()
        for _ in range(500):
            prefix, continuation = data.split_text(text, rng, max_prefix_frac=frac)
            assert (prefix + " " + continuation).strip() == text and continuation
            seen.add(len(prefix.split()))
        assert seen == lengths  # U{0 .. floor(frac (n - 1))}: the prefix may be empty, the continuation never is


def test_make_examples_holds_out_by_text_hash():
    rows = [{"text": f"sentence number {i} here"} for i in range(500)]
    train, held = data.make_examples(rows, seed=0, max_prefix_frac=1.0)
    assert len(train) + len(held) == 500 and 5 <= len(held) <= 40
    assert all(data.is_held_out(ex["text"]) for ex in held)
    assert not any(data.is_held_out(ex["text"]) for ex in train)
    rows = [{"text": f"another sentence, number {i}"} for i in range(20_000)]
    train, held = data.make_examples(rows, seed=0, max_prefix_frac=0.0)
    assert 720 <= len(held) <= 880  # HELD_OUT_PERCENT = 4: 800 expected, and 1000 at 5%
    assert {ex["prefix"] for ex in train + held} == {""}  # the prefix fraction reaches the split


def test_load_local_reads_txt_and_jsonl_and_rejects_empty(tmp_path):
    (tmp_path / "a.txt").write_text("first text\n\nsecond text\n")
    assert [r["text"] for r in data.load_local(tmp_path / "a.txt")] == ["first text", "second text"]
    (tmp_path / "b.jsonl").write_text('{"text": "hello there", "label": "x"}\n{"text": ""}\n')
    assert data.load_local(tmp_path / "b.jsonl") == [{"text": "hello there", "label": "x"}]
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(SystemExit, match="holds no texts"):
        data.load_local(tmp_path / "empty.txt")
    with pytest.raises(SystemExit, match="does not exist"):
        data.load_local(tmp_path / "missing.txt")
    with pytest.raises(SystemExit, match="is a folder \\(accepted: tiny, c4, a .txt, .jsonl, .csv or .tsv file\\)"):
        data.load_local(tmp_path)
    with pytest.raises(SystemExit, match="'/dev/null' is not a file \\(a pipe or a device: save it to a file first\\)"):
        data.load_local("/dev/null")  # said "does not exist"
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n\n{not json\n')
    with pytest.raises(SystemExit, match="cannot read .*bad.jsonl: line 3 is not JSON"):
        data.load_local(tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text('{"text": "fine"}\n["a list"]\n')
    with pytest.raises(SystemExit, match="record 2 is not a JSON object with a string `text` field"):
        data.load_local(tmp_path / "list.jsonl")
    (tmp_path / "number.jsonl").write_text('{"text": "fine"}\n{"text": 5}\n')  # was a traceback when split
    with pytest.raises(SystemExit, match="record 2 is not a JSON object with a string `text` field"):
        data.load_local(tmp_path / "number.jsonl")
    (tmp_path / "tone.jsonl").write_text('{"sentence": "fine", "tone": "calm"}\n')  # not "holds no texts"
    with pytest.raises(SystemExit, match="tone.jsonl: no record has a `text` field \\(the first's fields: sentence, tone\\)"):
        data.load_local(tmp_path / "tone.jsonl")
    (tmp_path / "array.json").write_text('[\n  {"text": "fine"},\n  {"text": "also fine"}\n]\n')  # was read as lines
    with pytest.raises(SystemExit, match="array.json: a .json file is not read \\(one JSON object with a `text` field "
                                         "a line is .jsonl"):
        data.load_local(tmp_path / "array.json")
    for name in ("latin1.txt", "latin1.jsonl", "latin1.csv"):  # as Excel's plain CSV is saved (cp1252)
        (tmp_path / name).write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
        with pytest.raises(SystemExit, match=f"^error: cannot read .*{name}: it is not UTF-8 \\(it has the byte 0xe9\\); "
                                             "save it as UTF-8 \\(in Excel: CSV UTF-8\\)$"):
            data.load_local(tmp_path / name)
    with pytest.raises(SystemExit, match="^error: cannot read labels file .*latin1.csv: it is not UTF-8"):
        data.read_labels(tmp_path / "latin1.csv")


def test_training_needs_two_texts():
    with pytest.raises(SystemExit, match="1 training text.* needs at least 2"):
        data.make_examples([{"text": "hello world, one text only"}], 0, 1.0)
    train, held_out = data.make_examples([{"text": f"text number {i} of a few"} for i in range(20)], 0, 1.0)
    assert len(train) + len(held_out) == 20 and len(train) >= 2


def test_tiny_corpus_checksum_is_verified(tmp_path):
    (tmp_path / data.VADER_SDIST).write_bytes(b"not the real archive")
    with pytest.raises(SystemExit, match="unexpected sha256"):
        data.prepare_tiny(tmp_path)


def test_the_tiny_corpus_is_parsed_from_the_archive_once(tmp_path, monkeypatch):
    """Each domain's file: id, mean rating, text (tab-separated); a line without a text is skipped."""
    def tar_of(files):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for name, content in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
        return buffer.getvalue()

    lines = {"movie": "1_1\t2.5\tA  fine   film\n1_2\t-1.0\t \nno tabs here\n", "tweet": "2_1\t-3.1\tso sad :(\n",
             "product": "", "news": "4_1\t0.4\tThe vote  is today.\n"}
    inner = tar_of({f"hutto_ICWSM_2014/{f}": lines[d].encode() for f, d in data.DOMAIN_FILES.items()})
    sdist = tar_of({"vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner})
    (tmp_path / data.VADER_SDIST).write_bytes(sdist)
    monkeypatch.setattr(data, "VADER_SHA256", data.sha256_of(tmp_path / data.VADER_SDIST))
    expected = [{"text": "A fine film", "rating": 2.5, "domain": "movie"},  # spaces collapsed
                {"text": "so sad :(", "rating": -3.1, "domain": "tweet"},
                {"text": "The vote is today.", "rating": 0.4, "domain": "news"}]
    assert data.prepare_tiny(tmp_path) == expected
    (tmp_path / data.VADER_SDIST).unlink()  # read from corpus.jsonl from then on
    assert data.prepare_tiny(tmp_path) == expected


@pytest.fixture
def pypi(monkeypatch):
    """A PyPI simple index (PEP 691 JSON) on localhost that serves vaderSentiment's archive; -> the served
    files {path: bytes}, which a test may change."""
    files = {"/simple/vadersentiment/": json.dumps({"files": [  # the url relative to the index, as PEP 691 allows
        {"filename": "vaderSentiment-3.3.1.tar.gz", "url": "../../files/old.tar.gz"},
        {"filename": data.VADER_SDIST, "url": "../../files/vader.tar.gz"}]}).encode(),
        "/files/vader.tar.gz": b"the archive's bytes"}

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(data, "PYPI_SIMPLE", f"http://127.0.0.1:{server.server_port}/simple/vadersentiment/")
    yield files
    server.shutdown()


def test_without_pip_the_tiny_corpus_comes_from_pypis_simple_index(pypi, tmp_path, monkeypatch):
    """A venv made by uv has no pip: the archive comes from the index over HTTPS instead."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pip" else find_spec(name, *a))
    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: pytest.fail("pip was run"))
    data.fetch_sdist(tmp_path / data.VADER_SDIST)
    assert (tmp_path / data.VADER_SDIST).read_bytes() == b"the archive's bytes"
    assert [p.name for p in tmp_path.iterdir()] == [data.VADER_SDIST]  # no .part left behind
    del pypi["/files/vader.tar.gz"]
    with pytest.raises(SystemExit, match=r"^error: could not fetch vaderSentiment==3.3.2 from PyPI for the tiny corpus "
                                         r"\(HTTP Error 404: Not Found\); put vaderSentiment-3.3.2.tar.gz into "):
        data.fetch_sdist(tmp_path / "again" / data.VADER_SDIST)


def test_c4_offline_fails_with_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(data.C4_PATH_ENV, raising=False)
    pytest.importorskip("datasets")
    with pytest.raises(SystemExit, match="could not stream allenai/c4.*--data PATH"):
        data.open_c4()


def test_c4_offline_error_names_the_local_copy_flag(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(data.C4_PATH_ENV, raising=False)
    pytest.importorskip("datasets")
    with pytest.raises(SystemExit, match=r"could not stream allenai/c4 .*--c4-path .*DGLM_C4_PATH"):
        data.open_c4()


def test_c4_examples_read_chunks_from_a_local_copy(tmp_path):
    import gzip
    import json
    pytest.importorskip("datasets")
    from decoder import train_tokenizer
    docs = [" ".join(["alpha beta gamma delta."] * 40), " ".join(["epsilon zeta eta theta."] * 20)]
    with gzip.open(tmp_path / "c4-train.00000-of-01024.json.gz", "wt") as f:
        for text in docs:
            f.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": "https://example.com"}) + "\n")
    tokenizer = train_tokenizer(docs, vocab_size=400)
    rows = list(itertools.islice(data.C4Examples(tokenizer, path=tmp_path), 3))
    assert len(rows) == 3 and rows[0]["text"].startswith("alpha beta gamma delta.")
    assert all(len(tokenizer(r["text"])["input_ids"]) <= 88 for r in rows)
    assert rows[2]["text"].startswith("epsilon")  # the first document holds two 128-token windows


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _n_tokens(tokenizer, chunk):
    """Tokens of a chunk as running text (after a space); a window that began with "." may gain one."""
    return len(_ids(tokenizer, " " + chunk))


def test_c4_chunks_drop_garbage_and_keep_88_of_every_128_tokens(c4_copy):
    _, docs, tokenizer = c4_copy
    assert len(_ids(tokenizer, docs[0])) < 0.2 * len(docs[0])  # ordinary text passes the filter
    assert data.c4_chunks(docs[1], tokenizer) == []           # > 0.25 tokens per character: dropped
    for doc in (docs[0], docs[3]):
        chunks = data.c4_chunks(doc, tokenizer)
        ids = _ids(tokenizer, doc)
        assert len(ids) > 256 and len(chunks) == math.ceil(len(ids) / 128)
        for j, chunk in enumerate(chunks):  # the first 88 tokens of each 128-token window
            assert chunk == " ".join(tokenizer.decode(ids[128 * j:128 * j + 88]).split()) and chunk in doc
            assert 0 < _n_tokens(tokenizer, chunk) <= 88 + 1
        assert _n_tokens(tokenizer, chunks[0]) == 88 and doc.startswith(chunks[0])


def test_c4_files_of_an_allenai_c4_folder_are_one_variants_train_shards(tmp_path):
    """Every .json(.gz) under the folder was read, sorted by path: en.noblocklist's shards before en's, and
    the validation shards among them."""
    for name in ("en/c4-train.00000-of-00002.json.gz", "en/c4-train.00001-of-00002.json.gz",
                 "en/c4-validation.00000-of-00001.json.gz", "notes.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert [Path(f).name for f in data.c4_files(tmp_path)] == ["c4-train.00000-of-00002.json.gz",
                                                               "c4-train.00001-of-00002.json.gz"]
    (tmp_path / "en.noblocklist").mkdir()
    (tmp_path / "en.noblocklist" / "c4-train.00000-of-00001.json.gz").write_text("")
    with pytest.raises(SystemExit, match=r"holds C4 train shards in 2 folders \(en, en.noblocklist\); point "
                                         r"--c4-path at one of them, e.g. .*en$"):
        data.c4_files(tmp_path)
    assert len(data.c4_files(tmp_path / "en")) == 2
    (tmp_path / "mine").mkdir()  # shards of one's own, named otherwise: all of them
    (tmp_path / "mine" / "a.jsonl").write_text("")
    assert [Path(f).name for f in data.c4_files(tmp_path / "mine")] == ["a.jsonl"]


def test_a_c4_copys_fingerprint_holds_where_it_moves_or_gains_files_after_its_own(c4_copy, tmp_path):
    import shutil
    root = c4_copy[0]
    first = data.c4_fingerprint(root)
    assert first["files"] == 2 and data.c4_fingerprint(root.parent)["sha256"] == first["sha256"]  # the folder above
    moved = tmp_path / "elsewhere" / "en"
    shutil.copytree(root, moved)
    assert data.c4_fingerprint(moved)["sha256"] == first["sha256"] and data.c4_fingerprint(moved)["path"] == str(moved)
    shutil.copy(moved / "c4-train.00001-of-00002.json.gz", moved / "c4-train.00002-of-00002.json.gz")  # downloaded on
    assert data.c4_fingerprint(moved, 2)["sha256"] == first["sha256"] and data.c4_fingerprint(moved)["files"] == 3
    (moved / "c4-train.00000-of-00002.json.gz").write_bytes(b"")  # a file the run read, changed
    assert data.c4_fingerprint(moved, 2)["sha256"] != first["sha256"]


def test_c4_stream_from_a_local_copy(c4_copy):
    root, docs, tokenizer = c4_copy
    stream = data.C4Examples(tokenizer, path=root.parent, seed=1)
    examples, docs_seen = [], set()
    for ex in stream:
        examples.append(ex)
        docs_seen.add(stream.position["doc"])
    assert docs_seen == {0, 2, 3, 4}  # document 1 is the garbage one
    assert len(examples) == sum(len(data.c4_chunks(d, tokenizer)) for d in docs)
    for ex in examples:
        assert (ex["prefix"] + " " + ex["continuation"]).strip() == ex["text"]
        assert ex["continuation"] and _n_tokens(tokenizer, ex["text"]) <= 88 + 1
    assert len({len(ex["prefix"].split()) for ex in examples}) > 3  # random split points


def test_c4_stream_resumes_exactly_where_it_stopped(c4_copy):
    root, _, tokenizer = c4_copy
    as_tuples = lambda examples: [(ex["text"], ex["prefix"], ex["continuation"]) for ex in examples]
    full = as_tuples(data.C4Examples(tokenizer, path=root))
    for cut in (1, 3, 4, 5, 8, len(full) - 1, len(full)):  # mid-document, document and file boundaries
        stream = data.C4Examples(tokenizer, path=root)
        head = as_tuples(itertools.islice(stream, cut))
        position = json.loads(json.dumps(stream.position))  # as a checkpoint would store it
        tail = as_tuples(data.C4Examples(tokenizer, path=root, position=position))
        assert head + tail == full, cut


def test_c4_path_from_the_environment_and_offline_error(c4_copy, monkeypatch):
    root, _, tokenizer = c4_copy
    monkeypatch.setenv(data.C4_PATH_ENV, str(root))
    assert next(iter(data.C4Examples(tokenizer)))["text"]
    monkeypatch.delenv(data.C4_PATH_ENV)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as err:
        data.C4Examples(tokenizer)
    message = str(err.value)
    assert "allenai/c4" in message and "--c4-path" in message and "\n" not in message


def test_c4_windows_follow_each_other_through_the_stream(c4_copy):
    root, _, tokenizer = c4_copy
    full = [ex["text"] for ex in data.C4Examples(tokenizer, path=root)]
    first, position = data.c4_window(tokenizer, root, 0, None, 3, 1.0)
    second, _ = data.c4_window(tokenizer, root, 0, json.loads(json.dumps(position)), 3, 1.0)
    assert [ex["text"] for ex in first + second] == full[:6]


def test_labels_from_json_keep_numbers_and_refuse_null(tmp_path):
    path = tmp_path / "sst.jsonl"  # SST-2's format: 0 / 1 classes as JSON numbers
    path.write_text('{"text": "a dull film", "label": 0}\n{"text": "a fine film", "label": 1}\n')
    assert data.read_labels(path) == [("a dull film", "0"), ("a fine film", "1")]  # 0 was read as an empty label
    path.write_text('{"text": "a dull film", "label": 0}\n{"text": "a fine film", "label": null}\n')
    with pytest.raises(SystemExit, match="record 2 has an empty label"):
        data.read_labels(path)
    path.write_text('{"text": "a dull film", "label": 0.0}\n{"text": "a fine film", "label": 1}\n')
    assert data.read_labels(path) == [("a dull film", "0"), ("a fine film", "1")]  # 0.0 and 0 were two labels
    path.write_text('{"text": "a dull film", "label": 0}\n{"text": "a fine film", "label": ["good"]}\n')
    with pytest.raises(SystemExit, match="record 2 has a label that is a JSON list, not a word or a number"):
        data.read_labels(path)  # was a guide named "['good']"
    (tmp_path / "twice.csv").write_text("text,label,label\na dull film,0,x\n")  # the last column won
    with pytest.raises(SystemExit, match="the header names the column 'label' twice"):
        data.read_labels(tmp_path / "twice.csv")


def test_a_byte_order_mark_is_not_part_of_the_first_text_or_column(tmp_path):
    """Excel's "CSV UTF-8" and Notepad's UTF-8 begin the file with a byte-order mark: read as plain UTF-8 it
    began the first text (--data .txt), broke the first JSON line (.jsonl) and renamed the first column of a
    labels file ("no `text` column")."""
    files = {"texts.txt": "a fine film\na dull one\n", "texts.jsonl": '{"text": "a fine film"}\n{"text": "a dull one"}\n',
             "labels.csv": "text,label\na fine film,pos\na dull one,neg\n"}
    for name, text in files.items():
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    for name in ("texts.txt", "texts.jsonl"):
        assert data.load_local(tmp_path / name) == [{"text": "a fine film"}, {"text": "a dull one"}]
    assert data.read_labels(tmp_path / "labels.csv") == [("a fine film", "pos"), ("a dull one", "neg")]


def test_a_csv_or_tsv_corpus_gives_its_text_column_not_its_lines(tmp_path):
    """--data reviews.csv was read line by line: the header and every row's other columns became texts."""
    (tmp_path / "reviews.csv").write_text('id,text,stars\n1,"A fine film, truly",5\n2,,3\n3,a dull  one,1\n')
    assert data.load_local(tmp_path / "reviews.csv") == [{"text": "A fine film, truly"}, {"text": "a dull one"}]
    (tmp_path / "reviews.tsv").write_text("id\ttext\n1\tA fine film\n")
    assert data.load_local(tmp_path / "reviews.tsv") == [{"text": "A fine film"}]
    (tmp_path / "header.csv").write_text("id,text\n")
    with pytest.raises(SystemExit, match="holds no texts .*or a `text` column"):
        data.load_local(tmp_path / "header.csv")
    (tmp_path / "bare.csv").write_text("review,stars\nA fine film,5\n")
    with pytest.raises(SystemExit, match=r"^error: cannot read .*bare.csv: no `text` column \(its columns: review, stars\)"):
        data.load_local(tmp_path / "bare.csv")


def test_a_csv_separated_by_semicolons_as_excel_writes_it_in_many_locales(tmp_path):
    (tmp_path / "labels.csv").write_text('text;label\n"a fine, fine film";pos\na dull one;neg\n')
    assert data.read_labels(tmp_path / "labels.csv") == [("a fine, fine film", "pos"), ("a dull one", "neg")]
    (tmp_path / "labels.csv").write_text('text,label\na fine; fine film,pos\n')  # a ';' in a text is a text's
    assert data.read_labels(tmp_path / "labels.csv") == [("a fine; fine film", "pos")]
    (tmp_path / "labels.csv").write_text('\n\ntext;label\na fine, fine film;pos\n')  # the header after blank lines
    assert data.read_labels(tmp_path / "labels.csv") == [("a fine, fine film", "pos")]


def test_a_row_with_more_fields_than_its_header_is_an_error_not_a_text_cut_at_its_comma(tmp_path):
    """A one-column text.csv written by hand: "A fine film, truly" was read as "A fine film" without a word,
    and in a labels file the label column took the text's second half."""
    (tmp_path / "texts.csv").write_text("text\nA fine film\nA fine film, truly\n")
    with pytest.raises(SystemExit, match=r"texts.csv: line 3 has 2 fields, its header 1; a text that holds a ',' "
                                         r"needs quotes .* or one text a line as .txt$"):
        data.load_local(tmp_path / "texts.csv")
    (tmp_path / "labels.csv").write_text("text,label\nfine,pos\nfine, really,pos\n")
    with pytest.raises(SystemExit, match=r"labels.csv: line 3 has 3 fields, its header 2; .* save the file as .tsv$"):
        data.read_labels(tmp_path / "labels.csv")
    (tmp_path / "labels.csv").write_text("text,label,\nfine,pos,\n\ndull,neg,,\n")  # trailing commas, a blank line
    assert data.read_labels(tmp_path / "labels.csv") == [("fine", "pos"), ("dull", "neg")]


def test_header_names_are_stripped_and_extensions_read_in_any_case(tmp_path):
    """`text, label` named its second column " label"; TEXTS.JSONL and LABELS.CSV (as Windows writes them)
    were read line by line as plain text, JSON and header included, and refused as labels."""
    (tmp_path / "LABELS.CSV").write_text("text, label\nfine, pos\ndull, neg\n")
    assert data.read_labels(tmp_path / "LABELS.CSV") == [("fine", "pos"), ("dull", "neg")]
    assert data.load_local(tmp_path / "LABELS.CSV") == [{"text": "fine"}, {"text": "dull"}]
    (tmp_path / "TEXTS.JSONL").write_text('{"text": "a fine film"}\n')
    assert data.load_local(tmp_path / "TEXTS.JSONL") == [{"text": "a fine film"}]


def test_labels_file_errors_name_the_line_and_the_columns_there_are(tmp_path):
    path = tmp_path / "tone.jsonl"
    path.write_text('{"sentence": "fine", "tone": "up"}\n' * 4 + '{"sentence": "it"s fine", "tone": "flat"}\n')
    with pytest.raises(SystemExit, match=r"tone.jsonl: line 5 is not JSON \(Expecting"):  # was "line 1" for every line
        data.read_labels(path, "sentence", "tone")
    path.write_text('{"sentence": "fine", "tone": "up"}\n')
    with pytest.raises(SystemExit, match=r"no `text` column \(record 1; its columns: sentence, tone; name the"):
        data.read_labels(path, "text", "tone")


def test_a_quote_that_never_closes_is_an_error_not_one_long_text(tmp_path):
    path = tmp_path / "labels.csv"  # csv's lenient reader reads the rest of the file into the open quote
    path.write_text('label,text\npos,fine\npos,"a great film\nneg,dull\nneg,awful\n')
    with pytest.raises(SystemExit, match="a quote opens a text on line 3 and does not close"):
        data.read_labels(path)
    path.write_text('label,text\npos,"a great\nfilm"\nneg,"a ""dull"" one"\nneg,"awful" really\n')
    assert data.read_labels(path) == [("a great film", "pos"), ('a "dull" one', "neg"), ("awful really", "neg")]


def test_a_c4_path_that_is_not_c4_is_one_line(c4_copy, tmp_path):
    """A file that is not JSON lines was pyarrow's ArrowInvalid traceback; records without `text` a KeyError."""
    _, _, tokenizer = c4_copy
    (tmp_path / "notes.json").write_text("# not JSON\n")
    (tmp_path / "other.json").write_text('{"content": "a text", "url": "x"}\n')
    with pytest.raises(SystemExit, match=f"^error: cannot read the C4 files at {tmp_path / 'notes.json'} "
                                         r"\(ArrowInvalid: .*\); C4 en is JSON lines with a \"text\" field"):
        list(data.C4Examples(tokenizer, path=tmp_path / "notes.json"))
    with pytest.raises(SystemExit, match=r"has no \"text\" field \(its fields: content, url\)"):
        list(data.C4Examples(tokenizer, path=tmp_path / "other.json"))
    (tmp_path / "mixed").mkdir()  # files whose columns differ: pyarrow's CastError spread over nine lines
    (tmp_path / "mixed" / "a.jsonl").write_text('{"text": "a text of the first file", "label": 1}\n' * 3)
    (tmp_path / "mixed" / "b.jsonl").write_text('{"text": "a text of the second file", "url": "x"}\n' * 3)
    with pytest.raises(SystemExit) as err:
        list(data.C4Examples(tokenizer, path=tmp_path / "mixed"))
    assert str(err.value).startswith("error: cannot read the C4 files at") and "\n" not in str(err.value)


def test_a_civil_comments_record_is_toxic_from_half_its_raters():
    label = data.PROBE_SOURCES["civil_comments"][3]  # the toxicity probe's training labels
    assert [label({"toxicity": t}) for t in (0.0, 0.3, 0.5, 0.51, 1.0)] == [0, 0, 0, 1, 1]


def test_when_pip_reports_success_without_the_archive_it_comes_from_the_index(pypi, tmp_path, monkeypatch):
    """pip downloading into --dest under another name (or nothing, behind a broken index setting) is no archive:
    the simple index gives it instead of a sha256 check of a file that is not there."""
    from types import SimpleNamespace
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "pip" else find_spec(name, *a))
    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: SimpleNamespace(returncode=0))
    data.fetch_sdist(tmp_path / data.VADER_SDIST)
    assert (tmp_path / data.VADER_SDIST).read_bytes() == b"the archive's bytes"


def test_an_empty_data_path_does_not_exist_rather_than_naming_the_working_folder():
    with pytest.raises(SystemExit, match="^error: data file '' does not exist"):  # Path("") is "."
        data.load_local("")


def test_records_and_lines_without_a_text_are_skipped_not_trained_on(tmp_path):
    """A .jsonl whose records mostly have a `text` (some none, some blank), a .txt with a line of spaces, a .csv
    row that stops before its text column: each gives the texts there are."""
    (tmp_path / "some.jsonl").write_text('{"text": "a fine film"}\n{"title": "no text"}\n{"text": "   "}\n'
                                         '{"text": "a dull one"}\n')
    assert data.load_local(tmp_path / "some.jsonl") == [{"text": "a fine film"}, {"text": "a dull one"}]
    (tmp_path / "spaces.txt").write_text("a fine film\n   \t \na dull one\n")
    assert data.load_local(tmp_path / "spaces.txt") == [{"text": "a fine film"}, {"text": "a dull one"}]
    (tmp_path / "short.csv").write_text("id,text\n1,a fine film\n2\n3,a dull one\n")
    assert data.load_local(tmp_path / "short.csv") == [{"text": "a fine film"}, {"text": "a dull one"}]


def test_a_c4_glob_lists_its_files_sorted(tmp_path):
    """The stream's position counts files: a glob's files in the file system's order would be another stream."""
    names = [f"c4-train.{i:05d}-of-00012.json.gz" for i in range(12)]
    for name in reversed(names):
        (tmp_path / name).write_text("")
    assert [Path(f).name for f in data.c4_files(tmp_path / "c4-train.*.json.gz")] == names


def test_a_single_c4_files_fingerprint_holds_its_name_and_an_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "a.json").write_text("{}\n")
    (tmp_path / "b.json").write_text("{}\n")  # another file of the same size
    assert data.c4_fingerprint(tmp_path / "a.json")["sha256"] != data.c4_fingerprint(tmp_path / "b.json")["sha256"]
    monkeypatch.chdir(tmp_path)
    assert data.c4_fingerprint("a.json")["path"] == str(tmp_path / "a.json")  # a --resume may run elsewhere


def test_each_chunk_of_a_c4_document_is_split_at_a_point_of_its_own(c4_copy):
    """Chunks of one document, of about as many words each, are not all cut after the same number of words."""
    root, _, tokenizer = c4_copy
    stream = data.C4Examples(tokenizer, path=root, seed=0)
    splits = {}
    for ex in stream:
        splits.setdefault(stream.position["doc"], []).append(len(ex["prefix"].split()))
    assert len(splits[0]) > 3 and len(set(splits[0][:3])) > 1 and len(splits[3]) == 3 and len(set(splits[3])) > 1


def test_a_c4_window_splits_at_the_prefix_fraction_asked(c4_copy):
    root, _, tokenizer = c4_copy
    examples, _ = data.c4_window(tokenizer, root, 0, None, 6, 0.0)
    assert len(examples) == 6 and {ex["prefix"] for ex in examples} == {""}


def test_a_c4_path_from_the_environment_is_named_when_it_is_not_c4(c4_copy, tmp_path, monkeypatch):
    _, _, tokenizer = c4_copy
    (tmp_path / "notes.json").write_text("# not JSON\n")
    monkeypatch.setenv(data.C4_PATH_ENV, str(tmp_path / "notes.json"))
    with pytest.raises(SystemExit, match=f"^error: cannot read the C4 files at {tmp_path / 'notes.json'} "):
        list(data.C4Examples(tokenizer))


def test_the_prefix_split_follows_the_seed():
    rows = [{"text": f"a text of several words, number {i}"} for i in range(40)]
    split = lambda seed: [ex["prefix"] for ex in sum(data.make_examples(rows, seed, 1.0), [])]
    assert split(3) == split(3) and split(3) != split(4)


def test_labelled_records_without_a_text_or_with_a_label_outside_the_classes_are_skipped(tmp_path):
    """SST-2's test split labels its sentences -1; a record with an empty sentence trains no probe."""
    pytest.importorskip("datasets")
    from conftest import write_jsonl
    write_jsonl(tmp_path / "sst2.jsonl", [{"sentence": "a fine film", "label": 1}, {"sentence": "no label", "label": -1},
                                          {"sentence": "", "label": 0}, {"sentence": "a dull film", "label": 0},
                                          {"sentence": "too many", "label": 2}])
    assert data.read_labelled("sst2", 10, str(tmp_path)) == [("a fine film", 1, True), ("a dull film", 0, True)]
    write_jsonl(tmp_path / "sst2.jsonl", [{"sentence": "a fine film", "label": 1}, {"sentence": "a good one", "label": 1}])
    with pytest.raises(SystemExit, match=r"sst2 gave no examples of some class \(counts per class: \[0, 2\]\)"):
        data.read_labelled("sst2", 10, str(tmp_path))


def test_a_gzipped_local_copy_of_a_probe_data_set_is_read(tmp_path):
    import gzip
    pytest.importorskip("datasets")
    with gzip.open(tmp_path / "sst2.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"sentence": "a fine film", "label": 1}\n{"sentence": "a dull film", "label": 0}\n')
    assert [r[:2] for r in data.read_labelled("sst2", 10, str(tmp_path))] == [("a fine film", 1), ("a dull film", 0)]


def test_a_quote_that_never_closes_in_a_large_file_names_its_line(tmp_path):
    """Past csv's field limit (131072 characters) the open quote is named as in a small file, not as csv's error."""
    path = tmp_path / "labels.csv"
    path.write_text('text,label\nfine,pos\n"a great film,pos\n' + "".join(f"text number {i} here,neg\n" for i in range(8000)))
    with pytest.raises(SystemExit, match="a quote opens a text on line 3 and does not close"):
        data.read_labels(path)


def test_a_table_with_blank_lines_before_its_header_rows_of_commas_and_empty_column_names(tmp_path):
    """Blank lines above the header, a row of commas alone, trailing commas in the header (columns without a
    name, which are no column named twice) and a row that stops before its label."""
    path = tmp_path / "labels.csv"
    path.write_text("\n\ntext,label,,\nfine,pos,,\n,,\ndull,neg\n")
    assert data.read_labels(path) == [("fine", "pos"), ("dull", "neg")]
    path.write_text("text,label\nfine,pos\ndull\n")
    with pytest.raises(SystemExit, match="record 3 has an empty label"):
        data.read_labels(path)


def test_a_labels_file_is_tab_separated_by_its_extension_in_any_case_and_refused_in_another_format(tmp_path):
    (tmp_path / "LABELS.TSV").write_text("text\tlabel\nfine, really\tpos\n")
    assert data.read_labels(tmp_path / "LABELS.TSV") == [("fine, really", "pos")]
    (tmp_path / "labels.txt").write_text("text,label\nfine,pos\n")
    with pytest.raises(SystemExit, match="labels file .*labels.txt must be .csv, .tsv or .jsonl"):
        data.read_labels(tmp_path / "labels.txt")
    for name in ("empty.csv", "empty.jsonl"):
        (tmp_path / name).write_text("")
        with pytest.raises(SystemExit, match=f"^error: labels file .*{name} holds no examples$"):
            data.read_labels(tmp_path / name)
