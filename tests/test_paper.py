"""The paper tier's data and probes, offline: C4 preparation from local files in the C4 record
format, a tiny sentence-T5-shaped encoder, the embedding cache filled ahead of training, and the
paper probes trained from local copies of their data sets. Same code paths as the real thing."""
import gzip
import itertools
import json
import math
import random

import numpy as np
import pytest
import torch

import data
import encoder as encoder_lib
import guide
from conftest import NEGATIVE, POSITIVE

# ----------------------------------------------------------------------------- a tiny sentence-T5

T5_TEXTS = ["The cat sat on the mat.", "A dog ran in the park!", "Stocks fell sharply today.",
            "The team won the final match.", "New chips make phones faster.", "the cat ran"]


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A random T5 encoder + mean pooling + Dense + Normalize, laid out like sentence-t5 on disk."""
    import re

    from sentence_transformers import SentenceTransformer
    try:
        from sentence_transformers.sentence_transformer import modules as models  # 6.x
    except ImportError:
        from sentence_transformers import models  # 5.x
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = sorted({w for t in T5_TEXTS for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=64)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    hf_dir = tmp_path_factory.mktemp("t5")
    T5EncoderModel(config).save_pretrained(str(hf_dir))
    tokenizer.save_pretrained(str(hf_dir))
    modules = [models.Transformer(str(hf_dir), max_seq_length=64), models.Pooling(32, "mean"),
               models.Dense(32, 24, bias=False, activation_function=torch.nn.Identity()), models.Normalize()]
    path = tmp_path_factory.mktemp("sentence-t5-tiny")
    SentenceTransformer(modules=modules, device="cpu").save(str(path))
    return str(path)


def _no_encoder(*args, **kwargs):
    raise AssertionError("the encoder was loaded although every text is cached")


def test_tiny_sentence_t5_loads_and_the_cache_never_encodes_twice(tiny_t5, tmp_path, monkeypatch):
    model = encoder_lib.load_encoder(tiny_t5)
    e = encoder_lib.embed(model, T5_TEXTS)
    assert e.shape == (len(T5_TEXTS), 24) and e.dtype == np.float32  # the Dense layer's width
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)

    cache = encoder_lib.EmbeddingCache(tmp_path / "cache", tiny_t5)
    np.testing.assert_allclose(cache.encode(T5_TEXTS, show_progress=False), e, atol=1e-5)
    monkeypatch.setattr(encoder_lib, "load_encoder", _no_encoder)
    cache.model = None
    again = cache.encode(T5_TEXTS[::-1], show_progress=False)        # same instance: all hits
    warm = encoder_lib.EmbeddingCache(tmp_path / "cache", tiny_t5)   # fresh instance, from disk
    np.testing.assert_array_equal(warm.encode(T5_TEXTS, show_progress=False), again[::-1])
    assert len(list((tmp_path / "cache").glob("shard-*.safetensors"))) == 1


def test_half_precision_encoder_still_gives_unit_vectors(tiny_t5):
    e32 = encoder_lib.embed(encoder_lib.load_encoder(tiny_t5), T5_TEXTS)
    e16 = encoder_lib.embed(encoder_lib.load_encoder(tiny_t5, dtype="bf16"), T5_TEXTS)
    np.testing.assert_allclose(np.linalg.norm(e16, axis=1), 1.0, atol=1e-5)
    assert (e16 * e32).sum(1).min() > 0.98


def test_precompute_writes_bounded_shards_that_the_cache_reads(tiny_t5, tmp_path, monkeypatch):
    texts = T5_TEXTS + T5_TEXTS[:2] + [f"the cat ran {i}" for i in range(4)]  # 10 distinct, 2 repeats
    encoded, skipped = encoder_lib.precompute(iter(texts), tmp_path, tiny_t5, shard_size=4)
    assert (encoded, skipped) == (10, 2)
    assert len(list(tmp_path.glob("shard-*.safetensors"))) == 3  # 4 + 4 + 2
    expected = encoder_lib.embed(encoder_lib.load_encoder(tiny_t5), texts)
    monkeypatch.setattr(encoder_lib, "load_encoder", _no_encoder)
    assert encoder_lib.precompute(texts, tmp_path, tiny_t5, shard_size=4) == (0, 12)
    cache = encoder_lib.EmbeddingCache(tmp_path, tiny_t5)
    np.testing.assert_allclose(cache.encode(texts, show_progress=False), expected, atol=1e-5)


# ----------------------------------------------------------------------------- C4 preparation

WORDS = ("garden morning history village musician different remember building children mountain "
         "question language everything together beautiful yesterday important government "
         "president business science kitchen hospital evening").split()


def _document(rng, n_words):
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return " ".join(w + ("." if i % 11 == 10 else "") for i, w in enumerate(words))


@pytest.fixture(scope="module")
def c4_copy(tmp_path_factory):
    """Two C4-format shards (.json.gz, {text, timestamp, url} per line) and a small GPT-2-style BPE."""
    from decoder import train_tokenizer
    rng = random.Random(0)
    docs = [_document(rng, 400), "".join(rng.choice("#$%&@!QXZJKV0123456789 ") for _ in range(600)),
            _document(rng, 60), _document(rng, 300), _document(rng, 150)]
    root = tmp_path_factory.mktemp("c4") / "en"
    root.mkdir()
    for shard, chunk in enumerate((docs[:3], docs[3:])):
        with gzip.open(root / f"c4-train.{shard:05d}-of-00002.json.gz", "wt", encoding="utf-8") as f:
            for i, text in enumerate(chunk):
                f.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z",
                                    "url": f"https://example.com/{shard}/{i}"}) + "\n")
    tokenizer = train_tokenizer([d for i, d in enumerate(docs) if i != 1], vocab_size=1000)
    return root, docs, tokenizer


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


def test_c4_ranks_stream_disjoint_parts_that_cover_the_corpus(c4_copy):
    root, _, tokenizer = c4_copy
    full = [ex["text"] for ex in data.C4Examples(tokenizer, path=root)]
    parts = [[ex["text"] for ex in data.C4Examples(tokenizer, path=root, rank=r, world_size=2)] for r in (0, 1)]
    assert parts[0] and parts[1] and sorted(parts[0] + parts[1]) == sorted(full)


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


def test_encoder_cli_fills_the_cache_with_the_c4_examples(c4_copy, tiny_t5, tmp_path, monkeypatch):
    root, _, tokenizer = c4_copy
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    encoder_lib.main(["--data", "c4", "--c4-path", str(root), "--tokenizer", str(tmp_path / "tok"),
                      "--max-texts", "5", "--cache-dir", str(tmp_path / "cache"), "--encoder", tiny_t5,
                      "--device", "cpu", "--shard-size", "4"])
    examples = list(itertools.islice(data.C4Examples(tokenizer, path=root), 5))
    monkeypatch.setattr(encoder_lib, "load_encoder", _no_encoder)
    cache = encoder_lib.EmbeddingCache(encoder_lib.cache_dir_for(tmp_path / "cache", tiny_t5), tiny_t5)
    texts = [ex["prefix"] for ex in examples] + [ex["continuation"] for ex in examples]
    assert len(cache) == len(set(texts)) and cache.encode(texts, show_progress=False).shape == (10, 24)


# ----------------------------------------------------------------------------- paper probes

TOXIC = [
    "You are a stupid idiot and everyone hates you.",
    "Shut up, you pathetic moron.",
    "What a worthless piece of garbage you are.",
    "Go away, nobody wants your dumb opinion, loser.",
    "You are an ugly, disgusting freak.",
    "Only a brainless fool would write this crap.",
    "I hope you choke, you miserable jerk.",
    "This author is a lying scumbag.",
    "Get lost, you ignorant clown.",
    "You people are filthy animals.",
    "Screw you and your idiotic ideas.",
    "He is a spineless coward and a creep.",
    "Typical moronic garbage from a hateful bigot.",
    "You are too dumb to breathe.",
    "Nobody cares about you, pathetic troll.",
    "What a disgusting, stupid pig.",
    "Shut your mouth, you fat idiot.",
    "Your brain must be rotten, you imbecile.",
    "Die in a fire, you worthless creep.",
    "Such a vile, stupid hypocrite.",
]
NONTOXIC = [
    "Thanks for sharing this article, it was very informative.",
    "I think the council should review the budget.",
    "The new bus schedule starts next Monday.",
    "I respectfully disagree with the author's conclusion.",
    "Great point about the housing market.",
    "Has anyone read the full report yet?",
    "The park clean-up was a success, thanks to all volunteers.",
    "I would like to see more data on this.",
    "Good luck to the students graduating this year.",
    "The bridge repairs should finish in spring.",
    "Interesting perspective, I had not considered that.",
    "Our library extended its opening hours.",
    "Please correct the date in the second paragraph.",
    "I enjoyed the concert at the community hall.",
    "The weather should improve by the weekend.",
    "This policy could help small farmers.",
    "Can someone explain how the new tax works?",
    "Well written and balanced piece.",
    "The school board meets on Thursday evening.",
    "Congratulations to the local team on their win.",
]
TOPICS = {
    "world": [
        "The prime minister met foreign leaders at the summit in Geneva.",
        "Rebels clashed with government troops near the border.",
        "The United Nations called for a ceasefire in the region.",
        "Elections were held across the country amid protests.",
        "The embassy was evacuated after the attack.",
        "Diplomats discussed the peace treaty in Cairo.",
        "Thousands fled the capital as fighting spread.",
        "The president signed a trade pact with neighbouring states.",
    ],
    "sports": [
        "The striker scored twice as the club won the league.",
        "She won the tennis final in straight sets.",
        "The quarterback threw three touchdowns on Sunday.",
        "The coach was fired after a losing season.",
        "The sprinter set a new world record in the 100 metres.",
        "The team clinched the championship in overtime.",
        "The pitcher struck out ten batters.",
        "The golfer won the open by four strokes.",
    ],
    "business": [
        "Shares rose after the company reported record quarterly profits.",
        "The central bank raised interest rates.",
        "The retailer announced plans to cut 2,000 jobs.",
        "Oil prices fell as supply increased.",
        "The merger will create the largest airline in Europe.",
        "Investors sold bonds as inflation fears grew.",
        "The firm's revenue beat analysts' forecasts.",
        "The automaker recalled a million vehicles.",
    ],
    "scitech": [
        "Researchers unveiled a faster computer chip.",
        "The new smartphone software update fixes security flaws.",
        "Scientists discovered a new species of frog in the rainforest.",
        "NASA launched a probe to study Mars.",
        "The software giant released a new operating system.",
        "A study found a gene linked to memory.",
        "Hackers exploited a flaw in the web browser.",
        "The telescope captured images of a distant galaxy.",
    ],
}
HELD_OUT = {  # sentences no probe trains on: (label 1, label 0)
    "sentiment": (["A lovely, delightful film that made me happy.", "Wonderful quality, I am thrilled with it."],
                 ["A dreadful, boring mess of a film.", "Terrible quality, it broke after a day."]),
    "toxicity": (["You are a disgusting, stupid loser.", "Shut up, you brainless idiot."],
                ["The meeting has been moved to Friday.", "Thank you for the helpful summary."]),
}
TOPIC_HELD_OUT = {
    "world": "Troops withdrew from the disputed border after peace talks.",
    "sports": "The goalkeeper saved a penalty in the cup final.",
    "business": "The bank's profits fell as loan losses mounted.",
    "scitech": "Engineers built a robot that learns to walk.",
}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory):
    """Local copies of the four data sets with the hub's field names."""
    d = tmp_path_factory.mktemp("probe-data")
    _write_jsonl(d / "sst2.jsonl", [{"idx": i, "sentence": t, "label": int(i < len(POSITIVE))}
                                    for i, t in enumerate(POSITIVE + NEGATIVE)])
    reviews = [(1, "Five stars", "Excellent blender, works great and I love it."),
               (1, "Superb", "Wonderful book, a joy to read."),
               (1, "Happy", "Great value, my kids adore this toy."),
               (1, "Perfect fit", "Comfortable shoes, very pleased."),
               (0, "Junk", "Awful blender, it broke in a week."),
               (0, "Boring", "Terrible book, a chore to read."),
               (0, "Waste", "Cheap toy, my kids hated it and it fell apart."),
               (0, "Painful", "Uncomfortable shoes, very disappointed.")]
    _write_jsonl(d / "amazon_polarity.jsonl", [{"label": y, "title": t, "content": c} for y, t, c in reviews])
    _write_jsonl(d / "civil_comments.jsonl",
                 [{"text": t, "toxicity": 0.9, "insult": 0.8} for t in TOXIC] +
                 [{"text": t, "toxicity": 0.0, "insult": 0.0} for t in NONTOXIC] +
                 [{"text": "A borderline remark.", "toxicity": 0.5, "insult": 0.2}])
    _write_jsonl(d / "ag_news.jsonl", [{"text": t, "label": k} for k, topic in enumerate(guide.AG_NEWS_TOPICS)
                                       for t in TOPICS[topic]])
    return d


def test_paper_probes_from_local_copies_are_merged_and_beat_chance(probe_data, tmp_path):
    from encoder import TINY_ENCODER, embed, load_encoder
    ckpt = tmp_path / "out"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"encoder": TINY_ENCODER}))
    tiny = {name: (torch.randn(384), torch.tensor(0.0)) for name in ("sentiment", "movie", "tweet", "product", "news")}
    guide.save_probes(ckpt / "probes.safetensors", tiny, guide.TINY_GUIDES, TINY_ENCODER)

    report = guide.main(["--ckpt", str(ckpt), "--probes", "paper", "--data-dir", str(probe_data),
                         "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    assert set(report) == {"sentiment", "toxicity", "world", "sports", "business", "scitech"}
    assert min(report.values()) >= 0.75  # held-out balanced accuracy (every 10th example per class); chance 0.5
    probes, guides = guide.load_probes(ckpt / "probes.safetensors", TINY_ENCODER)
    for name in ("nontoxic", "toxic", "world", "sports", "business", "scitech", "positive", "negative", "movie"):
        assert name in guides  # sample.py --guide NAME works; the tiny domain guides are kept
    assert torch.equal(probes["movie"][0], tiny["movie"][0])
    assert not torch.equal(probes["sentiment"][0], tiny["sentiment"][0])  # replaced by the paper probe

    model = load_encoder(TINY_ENCODER)
    for probe, (ones, zeros) in HELD_OUT.items():
        e = torch.from_numpy(embed(model, ones + zeros))
        y = torch.tensor([1.0] * len(ones) + [0.0] * len(zeros))
        assert guide.accuracy(*probes[probe], e, y) >= 0.75, probe  # chance is 0.5
    e = torch.from_numpy(embed(model, list(TOPIC_HELD_OUT.values())))
    logits = torch.stack([e @ probes[t][0] + probes[t][1] for t in guide.AG_NEWS_TOPICS], 1)
    assert (logits.argmax(1) == torch.arange(4)).float().mean() >= 0.75  # chance is 0.25


def test_probe_data_offline_fails_with_one_sentence(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as err:
        guide.read_labelled("civil_comments", 10, data_dir=str(tmp_path))  # no local copy there
    message = str(err.value)
    assert "google/civil_comments" in message and "civil_comments.jsonl" in message
    assert "--data-dir" in message and "\n" not in message


# ----------------------------------------------------------------------------- training on C4, windows and resume


def test_train_on_c4_through_windows_resumes_exactly(tiny_t5, tmp_path):
    """train.py --data c4 with a local C4 copy, a GPT-2 loaded from a folder (as `gpt2-large` would
    be) and a sentence-T5-shaped encoder: the stream is trained in windows, and a run stopped inside
    the second window and resumed ends with the weights of an uninterrupted run."""
    import train
    from decoder import train_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel
    rng = random.Random(1)
    root = tmp_path / "c4" / "en"
    root.mkdir(parents=True)
    docs = [_document(rng, 250) for _ in range(12)]
    with gzip.open(root / "c4-train.00000-of-00001.json.gz", "wt", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://e.com/{i}"}) + "\n")
    tokenizer = train_tokenizer(docs, vocab_size=500)
    gpt2 = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=2, n_positions=160,
                               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)

    def run(out, *extra):
        train.main(train.get_args(["--data", "c4", "--c4-path", str(root), "--lm", str(gpt2), "--encoder", tiny_t5,
                                   "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4",
                                   "--decoder-batch", "2", "--window", "10", "--steps", "5", "--save-every", "100",
                                   "--warmup", "1", "--max-len", "40", *extra]))

    run(tmp_path / "straight")
    run(tmp_path / "resumed", "--stop-at", "3")
    _, step, meta, _ = train.read_checkpoint(tmp_path / "resumed")
    window = json.loads(meta["data"])
    assert step == 3 and window["start"] == 2 and window["position"]["doc"] > 0  # inside the second window
    run(tmp_path / "resumed", "--resume")
    _, _, meta, resumed = train.read_checkpoint(tmp_path / "resumed")
    _, _, meta_straight, straight = train.read_checkpoint(tmp_path / "straight")
    assert meta["data"] == meta_straight["data"] and json.loads(meta["data"])["start"] == 4  # a third window
    for key in straight:
        if key.startswith(("prior.", "decoder.", "opt_")):
            assert torch.equal(resumed[key], straight[key]), key
