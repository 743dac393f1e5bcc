import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# What the tests and libraries write goes to a scratch folder removed when pytest exits, not into the clone,
# the user's home or /tmp: the tests run from it (a relative default such as out/ or cache/ lands there; a
# cache/ left in the clone would feed a later `python train.py`), `datasets` leaves a lock file in its cache for
# each local file it streams, and torchrun a log folder in the temporary folder (subprocesses inherit TMPDIR).
SCRATCH = tempfile.TemporaryDirectory(prefix="dglm-tests-")
os.environ["HF_DATASETS_CACHE"] = os.path.join(SCRATCH.name, "datasets")
os.environ["TMPDIR"] = SCRATCH.name
os.chdir(SCRATCH.name)
torch.set_num_threads(2)

POSITIVE = ["I love this, it is wonderful.", "What a great and happy day!", "This is the best movie ever made.",
            "Absolutely fantastic service, thank you!", "She was delighted with the beautiful gift.",
            "An excellent, brilliant performance.", "I am so glad and grateful today.", "Such a lovely, charming place.",
            "The food was amazing and the staff were kind.", "A joyful, uplifting story.", "Perfect, I enjoyed every minute.",
            "Great product, works perfectly.", "We had a wonderful time together.", "This made me smile all day.",
            "Brilliant idea, I really like it.", "The concert was awesome and fun.", "Such good news, congratulations!",
            "The hotel was clean, cozy and pleasant.", "A masterpiece, truly inspiring.", "I feel happy and loved."]
NEGATIVE = ["I hate this, it is awful.", "What a terrible and sad day.", "This is the worst movie ever made.",
            "Horrible service, never again.", "She was furious about the ugly gift.", "A boring, dreadful performance.",
            "I am so angry and upset today.", "Such a nasty, dirty place.", "The food was disgusting and the staff rude.",
            "A depressing, miserable story.", "Useless, I regret every minute.", "Broken product, a total waste.",
            "We had a painful time together.", "This ruined my whole day.", "Stupid idea, I really dislike it.",
            "The concert was a disaster and dull.", "Such bad news, I am sorry.", "The hotel was filthy and unpleasant.",
            "A failure, truly disappointing.", "I feel lonely and hurt."]


@pytest.fixture(scope="session")
def encoder():
    from encoder import TINY_ENCODER, load_encoder
    return load_encoder(TINY_ENCODER)


@pytest.fixture(scope="session")
def sentiment_embeddings(encoder):
    from encoder import embed
    e = torch.from_numpy(embed(encoder, POSITIVE + NEGATIVE))
    y = torch.tensor([1.0] * len(POSITIVE) + [0.0] * len(NEGATIVE))
    return e, y


ROOT = Path(__file__).resolve().parents[1]
WORDS = {1: ["great", "lovely", "wonderful", "happy", "excellent"], 0: ["awful", "terrible", "sad", "horrible", "bad"]}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small labelled .jsonl in the tiny corpus's format (text, rating, domain)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "toy.jsonl"
    rows = []
    for i in range(120):
        label = i % 2
        domain = ["movie", "tweet"][i // 2 % 2]
        words = [rng.choice(["the", "a", "this", "our"]), rng.choice(["film", "day", "song", "trip"]),
                 "was", rng.choice(WORDS[label]), "and", rng.choice(WORDS[label]), "today"]
        rows.append({"text": " ".join(words) + f" {i}", "rating": 2.0 if label else -2.0, "domain": domain})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def run_train(corpus, tmp_path, out, *extra):
    """train.py on the toy corpus with a small batch (in this process)."""
    import train
    train.main(train.get_args(["--data", str(corpus), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                               "--batch-size", "16", "--decoder-batch", "8", "--warmup", "2", *extra]))


@pytest.fixture(scope="session")
def trained(corpus, tmp_path_factory):
    """A 6-step checkpoint with probes, saved at steps 3 and 6; -> the run's folder (out/, cache/)."""
    tmp = tmp_path_factory.mktemp("run")
    run_train(corpus, tmp, tmp / "out", "--steps", "6", "--save-every", "3")
    return tmp


def run_script(*argv, cwd=None, env=None):
    """A script of the repository in a child process, offline: -> CompletedProcess (text)."""
    return subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=300)


UNREACHABLE_HUB = {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}  # offline as users are: no variable set


def run_python(code, env=None):
    """Python code in a child process, the repository on its path: -> CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=120)


def hub_cache(root, repo_id, folder):
    """Lay out `folder` as the Hugging Face cache's copy of the model `repo_id` under `root`."""
    commit = "0" * 40
    repo = Path(root) / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def cli_error(module, argv, capsys):
    """A script's command line run in this process (its main under utils.run_cli, as `python X.py` runs
    it): asserts exit code 2 and returns what it printed on stderr."""
    from utils import run_cli
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: module.main(module.get_args(argv)))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def assert_one_line_error(result, message):
    """Exit code 2, one line on stderr containing `message`, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-800:]
    assert len(lines) <= 2 and message in lines[-1] and "Traceback" not in result.stderr, result.stderr[-800:]


# ----------------------------------------------------------------------------- a tiny sentence-T5

T5_TEXTS = ["The cat sat on the mat.", "A dog ran in the park!", "Stocks fell sharply today.",
            "The team won the final match.", "New chips make phones faster.", "the cat ran"]


@pytest.fixture(scope="session")
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


def no_encoder(*args, **kwargs):
    raise AssertionError("the encoder was loaded although every text is cached")


# ----------------------------------------------------------------------------- C4 preparation

C4_WORDS = ("garden morning history village musician different remember building children mountain "
            "question language everything together beautiful yesterday important government "
            "president business science kitchen hospital evening").split()


def document(rng, n_words):
    words = [rng.choice(C4_WORDS) for _ in range(n_words)]
    return " ".join(w + ("." if i % 11 == 10 else "") for i, w in enumerate(words))


@pytest.fixture(scope="session")
def c4_copy(tmp_path_factory):
    """Two C4-format shards (.json.gz, {text, timestamp, url} per line) and a small GPT-2-style BPE."""
    from decoder import train_tokenizer
    rng = random.Random(0)
    docs = [document(rng, 400), "".join(rng.choice("#$%&@!QXZJKV0123456789 ") for _ in range(600)),
            document(rng, 60), document(rng, 300), document(rng, 150)]
    root = tmp_path_factory.mktemp("c4") / "en"
    root.mkdir()
    for shard, chunk in enumerate((docs[:3], docs[3:])):
        with gzip.open(root / f"c4-train.{shard:05d}-of-00002.json.gz", "wt", encoding="utf-8") as f:
            for i, text in enumerate(chunk):
                f.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z",
                                    "url": f"https://example.com/{shard}/{i}"}) + "\n")
    tokenizer = train_tokenizer([d for i, d in enumerate(docs) if i != 1], vocab_size=1000)
    return root, docs, tokenizer


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


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="session")
def probe_data(tmp_path_factory):
    """Local copies of the four data sets with the hub's field names."""
    from data import AG_NEWS_TOPICS
    d = tmp_path_factory.mktemp("probe-data")
    write_jsonl(d / "sst2.jsonl", [{"idx": i, "sentence": t, "label": int(i < len(POSITIVE))}
                                    for i, t in enumerate(POSITIVE + NEGATIVE)])
    reviews = [(1, "Five stars", "Excellent blender, works great and I love it."),
               (1, "Superb", "Wonderful book, a joy to read."),
               (1, "Happy", "Great value, my kids adore this toy."),
               (1, "Perfect fit", "Comfortable shoes, very pleased."),
               (0, "Junk", "Awful blender, it broke in a week."),
               (0, "Boring", "Terrible book, a chore to read."),
               (0, "Waste", "Cheap toy, my kids hated it and it fell apart."),
               (0, "Painful", "Uncomfortable shoes, very disappointed.")]
    write_jsonl(d / "amazon_polarity.jsonl", [{"label": y, "title": t, "content": c} for y, t, c in reviews])
    write_jsonl(d / "civil_comments.jsonl",
                 [{"text": t, "toxicity": 0.9, "insult": 0.8} for t in TOXIC] +
                 [{"text": t, "toxicity": 0.0, "insult": 0.0} for t in NONTOXIC] +
                 [{"text": "A borderline remark.", "toxicity": 0.5, "insult": 0.2}])
    write_jsonl(d / "ag_news.jsonl", [{"text": t, "label": k} for k, topic in enumerate(AG_NEWS_TOPICS)
                                       for t in TOPICS[topic]])
    return d
