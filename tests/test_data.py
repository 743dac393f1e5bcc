import itertools
import random

import pytest

import data
from evaluate import distinct_n, vader_labels


def test_split_text_is_at_a_word_boundary_and_respects_the_prefix_fraction():
    rng = random.Random(0)
    text = "one two three four five six seven eight nine ten"
    seen = set()
    for _ in range(300):
        prefix, continuation = data.split_text(text, rng, max_prefix_frac=0.5)
        assert (prefix + " " + continuation).strip() == text
        seen.add(len(prefix.split()))
    assert seen == {0, 1, 2, 3, 4}  # U{0 .. floor(0.5 * 9)}: the prefix may be empty


def test_make_examples_holds_out_by_text_hash():
    rows = [{"text": f"sentence number {i} here"} for i in range(500)]
    train, held = data.make_examples(rows, seed=0, max_prefix_frac=1.0)
    assert len(train) + len(held) == 500 and 5 <= len(held) <= 40
    assert all(data.is_held_out(ex["text"]) for ex in held)
    assert not any(data.is_held_out(ex["text"]) for ex in train)


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
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(SystemExit, match="cannot read"):
        data.load_local(tmp_path / "bad.jsonl")


def test_tiny_corpus_checksum_is_verified(tmp_path):
    (tmp_path / data.VADER_SDIST).write_bytes(b"not the real archive")
    with pytest.raises(SystemExit, match="unexpected sha256"):
        data.prepare_tiny(tmp_path)


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


def test_distinct_n_and_vader_judge():
    assert distinct_n(["a b a b", "a b c"], 1) == pytest.approx(3 / 7)
    assert distinct_n(["a b a b", "a b c"], 2) == pytest.approx(3 / 5)
    assert vader_labels(["What a wonderful, happy day!", "This is awful and sad.", "The table is brown."]) == [1, -1, 0]
