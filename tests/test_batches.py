"""batches.py: length-grouped batches, and windows that keep each example's embeddings and token ids
together. (The windows of C4, which a run moves through, are tested with the run in test_train.py.)"""
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import batches
from batches import Batches
from data import is_held_out
from decoder import encode_continuation, train_tokenizer


def test_batches_are_deterministic_length_grouped_and_cover_the_epoch():
    lengths = [random.Random(i).randint(1, 60) for i in range(400)]
    b = Batches(lengths, 50, seed=1)
    assert [x.tolist() for x in b.epoch(0)] == [x.tolist() for x in Batches(lengths, 50, seed=1).epoch(0)]
    flat = sorted(i for batch in b.epoch(0) for i in batch.tolist())
    assert flat == list(range(400))
    spread = sum(max(lengths[i] for i in batch) - min(lengths[i] for i in batch) for batch in b.epoch(0)) / 8
    assert spread < 30  # random batches of 50 would span ~55
    assert b.get(8)[0] in b.epoch(1)[0]


def test_each_epoch_has_its_own_order_and_shuffles_its_length_sorted_batches():
    lengths = [random.Random(i).randint(1, 60) for i in range(1600)]
    b = Batches(lengths, 50, seed=1)  # 32 batches: two blocks of 16, sorted by length within each
    first, second = b.epoch(0), b.epoch(1)
    assert [x.tolist() for x in first] != [x.tolist() for x in second]
    mean_length = [sum(lengths[i] for i in batch) / 50 for batch in first]
    assert mean_length[:16] != sorted(mean_length[:16])  # not the blocks' order: short to long, block by block


def test_a_window_keeps_each_examples_embeddings_and_ids_together_and_sets_the_held_out_apart(monkeypatch):
    monkeypatch.setattr(batches.data_lib, "is_held_out", lambda text: text.startswith("held"))
    texts = [f"{'held' if i % 3 == 0 else 'kept'} text number {i} goes on here" for i in range(12)]
    examples = [{"text": t, "prefix": " ".join(t.split()[:3]), "continuation": " ".join(t.split()[3:])} for t in texts]
    e_prefix = np.stack([np.full(4, i, dtype=np.float32) for i in range(12)])
    e_cont = -e_prefix - 100  # row i: -(i + 100)
    tokenizer = train_tokenizer(texts, 300)
    window = batches.Window(examples, e_prefix, e_cont, tokenizer, room=40, batch_size=4, seed=0, start=5)
    kept = [i for i in range(12) if i % 3]
    assert [ex["text"] for ex in window.examples] == [texts[i] for i in kept]
    assert [ex["text"] for ex in window.held_out] == [texts[i] for i in range(0, 12, 3)]
    assert window.e_prefix[:, 0].tolist() == kept and window.e_cont[:, 0].tolist() == [-i - 100 for i in kept]
    assert window.held_out_e_cont[:, 0].tolist() == [-i - 100 for i in range(0, 12, 3)]
    e_p, e_c, prefix_ids, cont_ids = window.batch(5)  # the window's first step: its first batch
    idx = window.batches.get(0).tolist()
    assert e_p[:, 0].tolist() == [kept[i] for i in idx] and e_c[:, 0].tolist() == [-kept[i] - 100 for i in idx]
    for i, p, c in zip(idx, prefix_ids, cont_ids):
        ex = window.examples[i]
        assert p == tokenizer(ex["prefix"], add_special_tokens=False)["input_ids"]
        assert c == encode_continuation(tokenizer, ex["continuation"])
    n = window.batches.per_epoch  # and the next epoch's first batch after it
    assert torch.equal(window.batch(5 + n)[0], window.e_prefix[window.batches.get(n)])


def test_a_corpus_window_holds_each_examples_own_prefix_and_continuation_embeddings(corpus, monkeypatch):
    """read_corpus: the continuation's embedding where the prior's target goes, the prefix's where its
    condition goes; the tiny tokenizer learns from the training texts alone."""
    seen, tokenizer_texts, fit = [], [], batches.train_tokenizer

    class Cache:  # each text's embedding is its index among the texts seen
        def encode(self, texts):
            seen.extend(t for t in dict.fromkeys(texts) if t not in seen)
            return np.array([[seen.index(t)] for t in texts], dtype=np.float32)

        def __len__(self):
            return len(seen)

    monkeypatch.setattr(batches, "train_tokenizer",
                        lambda texts, n: tokenizer_texts.extend(texts) or fit(texts, n))
    args = SimpleNamespace(data=str(corpus), cache_dir=None, seed=0, max_prefix_frac=0.5, batch_size=8,
                           lm=batches.TINY_LM, vocab_size=300)
    window, _ = batches.read_corpus(args, None, Cache(), room=40, report=False)
    assert [seen[int(i)] for i in window.e_cont[:, 0]] == [ex["continuation"] for ex in window.examples]
    assert [seen[int(i)] for i in window.e_prefix[:, 0]] == [ex["prefix"] for ex in window.examples]
    assert [seen[int(i)] for i in window.held_out_e_cont[:, 0]] == [ex["continuation"] for ex in window.held_out]
    assert window.held_out and tokenizer_texts and not any(is_held_out(t) for t in tokenizer_texts)


def test_the_batches_of_each_epoch_are_those_of_its_own_order_whatever_came_before():
    b = Batches([random.Random(i).randint(1, 60) for i in range(200)], 10, seed=2)
    n = b.per_epoch
    as_lists = lambda epoch: [x.tolist() for x in epoch]
    assert [b.get(s).tolist() for s in range(n)] == as_lists(b.epoch(0))
    assert [b.get(s).tolist() for s in range(n, 3 * n)] == as_lists(b.epoch(1)) + as_lists(b.epoch(2))
    assert b.get(0).tolist() == b.epoch(0)[0].tolist()  # back to an earlier epoch (a resume)


def test_a_batch_larger_than_the_training_texts_is_refused_however_many_are_held_out(corpus):
    """The held-out texts never reach a batch: a batch that needs them would be the whole corpus, smaller than asked."""
    from data import load_local, make_examples
    train, held_out = make_examples(load_local(corpus), 0, 0.5)
    assert held_out

    class Cache:
        def encode(self, texts):
            return np.ones((len(texts), 4), dtype=np.float32)

        def __len__(self):
            return 0

    args = lambda batch_size: SimpleNamespace(data=str(corpus), cache_dir=None, seed=0, max_prefix_frac=0.5,
                                              batch_size=batch_size, lm=batches.TINY_LM, vocab_size=300)
    with pytest.raises(SystemExit, match=f"--batch-size {len(train) + 1} is more than the {len(train)} training texts"):
        batches.read_corpus(args(len(train) + 1), None, Cache(), room=40, report=False)
    window, _ = batches.read_corpus(args(len(train)), None, Cache(), room=40, report=False)
    assert len(window.batches.get(0)) == len(train)
