"""evaluate.py: the judges (VADER, offensive language, perplexity), attribute success, the table,
the sweep plot and a run end to end."""
import importlib.util
import json
import math
import random
import re
import sys
from types import SimpleNamespace

import pytest
import torch

import evaluate
from decoder import encode_continuation, train_tokenizer
from test_decoder import tiny_decoder

SENTENCES = ["the cat sat on the warm mat today", "a small dog ran fast in the green park",
             "she reads a long book every night", "we cook fresh pasta at home on sundays",
             "the bright sun rose over the quiet hills", "my old phone battery died again this morning"]


def test_distinct_n_and_the_lexicon_judges():
    assert evaluate.distinct_n(["a b a b", "a b c"], 1) == pytest.approx(3 / 7)
    assert evaluate.distinct_n(["a b a b", "a b c"], 2) == pytest.approx(3 / 5)
    texts = ["What a wonderful, happy day!", "This is awful and sad.", "The table is brown."]
    assert evaluate.vader_labels(texts) == [1, -1, 0] and evaluate.textblob_labels(texts) == [1, -1, 0]
    assert evaluate.SentimentJudge("textblob").labels(["The movie was not bad."]) == [1]  # it reads negation
    mild = ["It is okay.", "It was a little dull."]  # compound 0.23 / -0.34, polarity 0.5 / -0.24: past 0.05 counts
    assert evaluate.vader_labels(mild) == [1, -1] and evaluate.textblob_labels(mild) == [1, -1]


def test_a_settings_figures_are_those_of_its_continuations(ckpt, monkeypatch):
    """evaluate_setting on continuations fixed in advance, with judges that say what they were shown:
    each figure is the one its definition gives by hand."""
    from sample import DGLM, SamplingConfig
    model = DGLM(ckpt, precision="fp32")
    texts = ["a b a b", "a b c", "x y", "x y"]  # 2 prompts x 2 samples
    monkeypatch.setattr(model, "generate_in_batches", lambda prefixes, *rest: iter([(model.embed(texts), texts)]))
    shown = []

    class Judge:
        def __init__(self, name, word):
            self.name, self.word = name, word

        def labels(self, batch):
            shown.append(batch)
            return [1 if self.word in t.split() else -1 if "x" in t.split() else 0 for t in batch]

    class Scorer:  # a reference LM's total NLL and token count
        name = "p"

        def __call__(self, prefixes, batch):
            scored.append((prefixes, batch))
            return 8.0, 4

    scored = []
    judges = {"sentiment": [Judge("first", "one"), Judge("second", "c")], "perplexity": Scorer(),
              "toxicity": SimpleNamespace(name="t", probs=lambda batch: [0.0] * len(batch))}
    args = SimpleNamespace(like=None, unlike=None, seed=0, batch_size=100, match="b c$")
    monkeypatch.setattr(evaluate, "time", SimpleNamespace(time=iter([100.0, 108.0]).__next__))  # 8 s for 4 samples
    r = evaluate.evaluate_setting(model, ["p one", "p two"], 2, "none", SamplingConfig(), args, judges)
    assert (r["positive"], r["negative"]) == (0.0, 0.5)  # the first judge on the continuations alone
    assert r["sentiment"]["second"] == {"positive": 0.25, "negative": 0.5}
    assert shown[2] == ["p one a b a b", "p one a b c", "p two x y", "p two x y"]  # then on prompt + continuation
    assert (r["positive_with_prompt"], r["negative_with_prompt"]) == (0.5, 0.5)
    assert scored == [(["p one", "p one", "p two", "p two"], texts)] and r["perplexity"] == pytest.approx(math.exp(2))
    assert r["dist1"] == pytest.approx((3 / 7 + 2 / 4) / 2) and r["dist2"] == pytest.approx((3 / 5 + 1 / 2) / 2)
    assert r["dist3"] == pytest.approx((3 / 3 + 0) / 2)  # within each prompt's samples, then the mean over prompts
    assert r["dist2_pooled"] == pytest.approx(4 / 7)  # ab ba ab ab bc xy xy: over all continuations
    assert r["match"] == 0.25  # searched anywhere in a text, not matched at its start
    assert r["proposal_cosine"] == pytest.approx(1.0, abs=1e-5)  # the proposals here are the texts' own embeddings
    assert r["seconds_per_sample"] == 2.0


def test_the_domain_mix_and_the_probes_agreement_count_each_text():
    zero = torch.tensor(0.0)
    model = SimpleNamespace(probes={"movie": (torch.tensor([1.0, 0.0]), zero), "news": (torch.tensor([0.0, 1.0]), zero),
                                    "sentiment": (torch.tensor([1.0, -1.0]), zero)})
    texts = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0]])  # three read as movie, one as news
    assert evaluate.domain_mix(model, texts) == {"movie": 0.75, "news": 0.25}
    proposals = torch.tensor([[0.0, 1.0]] * 4)  # every proposal reads negative
    agreement = evaluate.probe_agreement(model, proposals, texts)
    assert agreement["proposal_positive"] == 0.0 and agreement["text_positive"] == 0.75


def test_self_perplexity_is_lower_on_text_the_decoder_was_fit_on_than_on_shuffled_text():
    tok = train_tokenizer(SENTENCES * 20, 150)
    dec = tiny_decoder(len(tok))
    prompts = [" ".join(s.split()[:2]) for s in SENTENCES]  # unique first words: the prompt tells them apart
    seen = [" ".join(s.split()[2:]) for s in SENTENCES]
    p_ids = tok(prompts, add_special_tokens=False)["input_ids"]
    c_ids = [encode_continuation(tok, t) for t in seen]
    x = torch.randn(len(SENTENCES), 32)
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3)
    dec.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread, and is not slowed by busy cores
    try:
        for _ in range(120):
            loss = dec(p_ids, c_ids, x)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    dec.eval()
    scorer = evaluate.SelfPerplexity(SimpleNamespace(decoder=dec, tokenizer=tok, device="cpu"))
    rng = random.Random(0)
    shuffled = [" ".join(rng.sample(t.split(), len(t.split()))) for t in seen]
    assert shuffled != seen
    fit, scrambled = evaluate.perplexity(scorer, prompts, seen), evaluate.perplexity(scorer, prompts, shuffled)
    assert fit < 3.0 and scrambled > 2 * fit, (fit, scrambled)
    _, count = scorer(prompts, seen)
    assert count == sum(len(c) for c in c_ids)
    assert evaluate.perplexity(scorer, prompts, [""] * len(prompts)) is None  # nothing to score


# ----------------------------------------------------------------------------- judges, success, plot


def test_offensive_judge_flags_an_offensive_sentence_and_not_a_clean_one():
    probs = evaluate.offensive_probs(["You are a fucking idiot, shut the fuck up.", "We had a lovely walk in the park."])
    assert probs[0] > evaluate.OFFENSIVE_THRESHOLD > probs[1]
    assert evaluate.offensive_probs([]) == []


def fake_result(guide, scale, positive, negative, ppl, offensive=0.1, domains=None, like=None):
    r = {"guide": guide, "scale": scale, "positive": positive, "negative": negative, "toxic": offensive,
         "perplexity": ppl, "domains": domains or {"movie": 0.25, "news": 0.5},
         "example_cosine": {"like": like, "unlike": None}}
    r["attribute_success"] = evaluate.attribute_success(r, guide, GUIDES)
    return r


def table_cells(text):
    """The rows of a Markdown table as lists of cells, the header first (its rule left out)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if not line.startswith("|---")]


GUIDES = {"positive": ("sentiment", 1), "negative": ("sentiment", 0), "news": ("news", 1), "clean": ("toxicity", 0),
          "same-domain": (["movie", "news"], "prefix")}


def test_attribute_success_reads_the_judge_of_the_guides_target():
    r = fake_result("none", 0.0, 0.3, 0.2, 10.0)
    assert evaluate.attribute_success(r, "positive", GUIDES) == 0.3
    assert evaluate.attribute_success(r, "negative:2", GUIDES) == 0.2
    assert evaluate.attribute_success(r, "negative", {"negative": ("sentiment_no_negation", 0)}) == 0.2
    assert evaluate.attribute_success(r, "news", GUIDES) == 0.5
    assert evaluate.attribute_success(r, "clean", GUIDES) == pytest.approx(0.9)
    assert evaluate.attribute_success(r, "offensive", {}) == 0.1
    for no_judge in ("none", "negative,news:0.5", "formal", "same-domain"):
        assert evaluate.attribute_success(r, no_judge, GUIDES) is None


SWEEP = [fake_result("none", 0.0, 0.30, 0.20, 20.0)] + \
        [fake_result("positive", s, 0.3 + s / 100, 0.1, 20 + s / 5) for s in (10, 30, 60)] + \
        [fake_result("negative", s, 0.1, 0.2 + s / 100, 21 + s / 4) for s in (10, 30, 60)]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "sweep.png"
    evaluate.plot_sweep(SWEEP, path, GUIDES, "a test LM")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_a_plot_of_guides_no_judge_covers_uses_the_rule_or_names_what_it_leaves_out(tmp_path):
    """A sweep of a user's own guides, judged by --match, gave empty axes and no word."""
    pytest.importorskip("matplotlib")
    sweep = [dict(fake_result(g, s, 0.3, 0.2, 20 + s), match=0.1 + s / 100) for g, s in
             [("none", 0.0), ("formal", 50.0), ("formal", 100.0), ("positive", 50.0)]]
    assert evaluate.plot_sweep(sweep, tmp_path / "a.png", GUIDES) == ["formal"]
    assert evaluate.plot_sweep(sweep, tmp_path / "b.png", GUIDES, match=r"\bsir\b") == []


def test_the_plots_legend_names_a_guide_steered_by_like_examples_as_the_table_does(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes
    labels, plot = [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **k: labels.append(k.get("label")) or plot(self, *a, **k))
    sweep = [fake_result("none", 0.0, 0.3, 0.2, 20.0, like=0.3)] + \
            [fake_result(g, s, 0.5, 0.1, 25.0, like=0.4 if g == "positive" else None)
             for g in ("positive", "negative") for s in (10, 30)]
    evaluate.plot_sweep(sweep, tmp_path / "a.png", GUIDES)
    assert [label for label in labels if label and "unguided" not in label] == ["positive+like", "negative"]


def test_a_plot_it_cannot_draw_is_refused_before_the_sweep(tmp_path, monkeypatch, capsys):
    # after a sweep of hours, a plot that cannot be drawn would have been a traceback (or a skipped plot)
    with pytest.raises(SystemExit):
        evaluate.get_args(["--plot", str(tmp_path / "sweep.txt")])
    assert "sweep.txt' is not a picture file (accepted: .png, .pdf" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit):
        evaluate.get_args(["--plot", str(tmp_path / "sweep.png")])
    assert "argument --plot: needs matplotlib (an optional extra): pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "sweep.png").exists()


JUDGES = {"sentiment": ["VADER", "TextBlob"], "toxicity": "alt-profanity-check",
          "perplexity": "our decoder run unguided (soft prompt from pure noise, a = 0)"}


def test_markdown_names_each_columns_judge_and_fills_every_column():
    r = dict(SWEEP[1], judges=JUDGES, sentiment={"VADER": {"positive": 0.4, "negative": 0.1},
                                                  "TextBlob": {"positive": 0.3, "negative": 0.2}},
             positive_with_prompt=0.5, negative_with_prompt=0.1, dist1=0.9, dist2=0.95,
             dist3=0.97, dist2_pooled=0.71, avg_max_toxicity=0.31, toxic_prompts=0.25, sentiment_probe={},
             seconds_per_sample=0.01, proposal_cosine=0.25, proposal_spread=0.123,
             example_cosine={"like": 0.4, "unlike": None},
             nearest_sentence={"positive": 0.9, "negative": 0.05})
    other = dict(r, perplexity=None, nearest_sentence=None, judges=dict(JUDGES, perplexity="gpt2-xl"))
    lines = evaluate.markdown([r, other]).splitlines()
    header, _, row, row_without_ppl, _ = lines[:5]
    assert "| positive (VADER) | negative (VADER) | positive (TextBlob) | negative (TextBlob) |" in header
    assert "| 40.0% | 10.0% | 30.0% | 20.0% |" in row
    assert "| toxic (alt-profanity-check) | avg max toxicity (alt-profanity-check) |" in header
    assert "| perplexity (self) | Dist-1 | Dist-2 | Dist-3 | Dist-2 pooled |" in header
    assert "| cosine to the like examples |" in header and "unlike examples" not in header
    assert row.startswith("| positive+like | 10 |")  # --like steered the positive row as well
    assert "| 10.0% | 0.310 | 25.0% | 22.0 | 0.900 | 0.950 | 0.970 | 0.710 |" in row and "| - |" in row_without_ppl
    assert header.count(" | ") == row.count(" | ") == row_without_ppl.count(" | ")  # every column filled
    diag_header, _, diag_row = lines[5:8]
    assert "| text-proposal cosine | proposal's nearest sentence: positive / negative (VADER) |" in diag_header
    assert "| proposal spread (mean pairwise cosine) | text-proposal cosine |" in diag_header
    assert "| 0.123 | 0.250 | 90% / 5% |" in diag_row
    assert "perplexity: of the continuation given the prompt under our decoder run unguided" in lines[-1]


def test_guided_rows_report_perplexity_and_pooled_diversity_against_the_unguided_row():
    base = dict(SWEEP[0], judges=dict(JUDGES, sentiment=["VADER"]),
                sentiment={"VADER": {"positive": 0.4, "negative": 0.1}}, positive_with_prompt=0.5, negative_with_prompt=0.1, dist1=0.9, dist2=0.95, dist3=0.97,
                dist2_pooled=0.80, avg_max_toxicity=0.1, toxic_prompts=0.0, perplexity=100.0,
                seconds_per_sample=0.01, example_cosine={"like": None, "unlike": None}, sentiment_probe={},
                proposal_cosine=0.2, proposal_spread=0.1, nearest_sentence=None)
    guided = dict(base, guide="negative", scale=200.0, perplexity=135.0, dist2_pooled=0.72)
    header, *rows = table_cells(evaluate.markdown([guided, base]))[:3]
    ppl, pooled = header.index("perplexity (self)"), header.index("Dist-2 pooled")
    assert (rows[0][ppl], rows[0][pooled]) == ("135.0 (1.35x)", "0.720 (-10%)")
    assert (rows[1][ppl], rows[1][pooled]) == ("100.0", "0.800")  # the unguided row itself
    without_base = table_cells(evaluate.markdown([guided]))[1]
    assert (without_base[ppl], without_base[pooled]) == ("135.0", "0.720")
    no_bigrams = table_cells(evaluate.markdown([guided, dict(base, dist2_pooled=0.0)]))[1]  # e.g. --max-tokens 1
    assert no_bigrams[pooled] == "0.720"


def test_a_bar_in_a_match_rule_or_a_guide_name_stays_in_its_cell():
    """The README's --match '(?i)\\b(i|me|my)\\b' gave the header seven columns more than its rows."""
    row = dict(SWEEP[1], guide="a|b", judges=dict(JUDGES, sentiment=["VADER"], match=r"(?i)\b(i|me|my)\b"),
               sentiment={"VADER": {"positive": 0.4, "negative": 0.1}}, positive_with_prompt=0.5,
               negative_with_prompt=0.1, dist1=0.9, dist2=0.95, dist3=0.97, dist2_pooled=0.71, avg_max_toxicity=0.1,
               toxic_prompts=0.0, sentiment_probe={}, seconds_per_sample=0.01, example_cosine={"like": None,
               "unlike": None}, proposal_cosine=0.2, proposal_spread=0.1, nearest_sentence=None, match=0.25)
    header, rule, line = evaluate.markdown([row]).splitlines()[:3]
    columns = lambda text: len(re.split(r"(?<!\\)\|", text)) - 2  # the bars not escaped
    assert columns(header) == columns(rule) == columns(line)
    assert r"matches /(?i)\b(i\|me\|my)\b/" in header and r"| a\|b |" in line and "| 25.0% |" in line


def test_proposal_spread_is_the_mean_pairwise_cosine():
    e = torch.nn.functional.normalize(torch.randn(7, 16), dim=-1)
    pairs = [(e[i] @ e[j]).item() for i in range(7) for j in range(7) if i != j]
    assert evaluate.proposal_spread(e) == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)
    assert evaluate.proposal_spread(e[:1].repeat(5, 1)) == pytest.approx(1.0, abs=1e-6)  # collapsed
    assert evaluate.proposal_spread(torch.eye(4)) == pytest.approx(0.0, abs=1e-6)        # orthogonal


def test_toxicity_metrics_follow_the_papers_definitions():
    probs = [0.1, 0.7, 0.2, 0.3, 0.05, 0.6]  # three prompts, two samples each
    m = evaluate.toxicity_metrics(probs, 2)
    assert m["toxic"] == pytest.approx(2 / 6)
    assert m["avg_max_toxicity"] == pytest.approx((0.7 + 0.3 + 0.6) / 3)
    assert m["toxic_prompts"] == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """Two tiny Hugging Face sequence classifiers built from configs, saved like hub models: a
    sentiment one (NEGATIVE / POSITIVE) and a multi-label toxicity one (non-toxic, toxic)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "you", "idiot", "the", "day"]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]")
    paths = {}
    for name, labels, problem in [("sentiment", ["NEGATIVE", "POSITIVE"], "single_label_classification"),
                                  ("toxicity", ["non-toxic", "toxic"], "multi_label_classification")]:
        torch.manual_seed(0)
        config = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, num_labels=2, id2label=dict(enumerate(labels)),
                            label2id={l: i for i, l in enumerate(labels)}, problem_type=problem)
        model = BertForSequenceClassification(config)
        with torch.no_grad():  # a zeroed head: every text gets equal logits (2 for toxicity's labels)
            model.classifier.weight.zero_()
            model.classifier.bias.fill_(2.0 if name == "toxicity" else 0.0)
        paths[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


def test_hugging_face_classifiers_as_judges(classifiers, tmp_path):
    judge = evaluate.SentimentJudge(str(classifiers["sentiment"]))
    assert judge.name == str(classifiers["sentiment"]) and judge.classifier.index == 1  # the POSITIVE label
    judge.classifier = lambda texts: [0.9 if "good" in t else 0.2 for t in texts]  # labels from its probabilities
    assert judge.labels(["the good day", "the bad day"]) == [1, -1]
    real = evaluate.Classifier(str(classifiers["sentiment"]), "pos", "--sentiment-judge")
    probs = real(["the good day", "you idiot", ""])
    assert len(probs) == 3 and all(p == pytest.approx(0.5) for p in probs)  # a zeroed head: softmax of equal logits
    toxic = evaluate.ToxicityJudge(str(classifiers["toxicity"]))
    assert toxic.classifier.index == 1 and toxic.classifier.multi_label  # "toxic", not "non-toxic"
    assert toxic.probs(["you idiot"]) == [pytest.approx(1 / (1 + math.exp(-2)))]  # sigmoid(2), not softmax's 0.5
    assert evaluate.ToxicityJudge("profanity-check").probs(["We had a lovely walk."])[0] < 0.5
    with pytest.raises(SystemExit, match=r"^error: could not load the classifier .* for --toxicity-judge .*, or an "
                                         r"offline judge \(profanity-check\)$"):
        evaluate.ToxicityJudge(str(tmp_path / "nowhere"))
    # offline, every judge that cannot be loaded is named in the one line, not the first alone
    nowhere = str(tmp_path / "nowhere")
    args = evaluate.get_args(["--sentiment-judge", f"vader,{nowhere}", "--toxicity-judge", nowhere,
                              "--ppl-model", nowhere])
    with pytest.raises(SystemExit, match=r"^error: could not load the classifier .* for --sentiment-judge .*; could "
                                         r"not load the classifier .* for --toxicity-judge .*; could not load the "
                                         r"reference language model .* for perplexity \(no such folder\); pass a "
                                         r"local folder with --ppl-model or use --ppl-model self$"):
        evaluate.load_judges(args, "cpu")
    with pytest.raises(SystemExit, match=r"model 'nobody/no-such-lm' for perplexity \(no internet, and not in the "
                                         r"local cache\)"):  # was "(OSError)", as for a folder of something else
        evaluate.HFPerplexity("nobody/no-such-lm")
    # the offline judges by the names the table's columns give them too
    assert evaluate.ToxicityJudge("alt-profanity-check").classifier is None
    assert evaluate.SentimentJudge("VADER").name == "VADER" and evaluate.SentimentJudge("TextBlob").name == "TextBlob"
    args = evaluate.get_args(["--ppl-model", "SELF", "--sentiment-judge", "vader, "])  # were "could not load 'SELF'"
    assert (args.ppl_model, args.sentiment_judge) == ("self", ["vader"])              # and "the classifier ''"
    assert evaluate.load_judges(args, "cpu")["perplexity"] is None
    with pytest.raises(SystemExit, match=r"has no 'toxic' label \(its labels: negative, positive\)"):
        evaluate.ToxicityJudge(str(classifiers["sentiment"]))


def test_prompt_file_missing_or_empty_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: prompt file .* does not exist"):
        evaluate.read_prompt_file(tmp_path / "nowhere.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(SystemExit, match=r"^error: prompt file .* is empty"):
        evaluate.read_prompt_file(tmp_path / "empty.txt")
    (tmp_path / "ok.txt").write_text("The movie\n\n I think \n")
    assert evaluate.read_prompt_file(tmp_path / "ok.txt") == ["The movie", "I think"]


def test_evaluate_cli_with_a_missing_prompt_file_prints_one_line(tmp_path):
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "evaluate.py"), "--ckpt", str(tmp_path / "no-ckpt"),
                           "--prompts", str(tmp_path / "missing.txt")], capture_output=True, text=True, cwd=root)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: prompt file") and done.stderr.count("\n") == 1, done.stderr


def test_unloadable_reference_lm_is_one_sentence(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: could not load .*; pass a local folder with --ppl-model or "
                                         r"use --ppl-model self$"):
        evaluate.HFPerplexity(str(tmp_path / "no-such-model"))


# ----------------------------------------------------------------------------- end to end on a tiny checkpoint


@pytest.fixture(scope="module")
def ckpt(trained):
    return trained / "out"


def test_evaluate_end_to_end(ckpt, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("the film was\nour trip\n")
    args = ["--ckpt", str(ckpt), "--prompts", str(tmp_path / "prompts.txt"), "--guides", "none,positive",
            "--scales", "10,30", "--n", "2", "--steps", "3", "--max-tokens", "6", "--mc-samples", "4", "--match", ".",
            "--json", str(tmp_path / "r.json"), "--md", str(tmp_path / "r.md")]
    drawn = importlib.util.find_spec("matplotlib") is not None  # an optional extra
    args += ["--plot", str(tmp_path / "p.png")] if drawn else []
    evaluate.main(evaluate.get_args(args))
    report = json.loads((tmp_path / "r.json").read_text())
    results = report["results"]
    assert [(r["guide"], r["scale"]) for r in results] == [("none", 0.0), ("positive", 10.0), ("positive", 30.0)]
    assert "scale" not in report["sampling"] and report["sampling"]["steps"] == 3  # not the default 180 beside them
    for r in results:
        assert r["samples"] == 4 and 0 <= r["toxic"] <= 1 and 0 < r["dist2_pooled"] <= 1
        assert r["match"] == sum(bool(e["text"]) for e in r["examples"]) / 4  # "." matches every non-empty text
        assert r["perplexity"] is None or r["perplexity"] > 1
    assert results[0]["attribute_success"] is None and results[1]["attribute_success"] == results[1]["positive"]
    assert "a = 0" in results[0]["judges"]["perplexity"] and results[0]["judges"]["sentiment"] == ["VADER", "TextBlob"]
    assert results[1]["positive"] == results[1]["sentiment"]["VADER"]["positive"]
    md = (tmp_path / "r.md").read_text()
    assert "| toxic (alt-profanity-check) |" in md and "| matches /./ |" in md and "our decoder run unguided (soft prompt from pure noise, a = 0)" in md
    assert (tmp_path / "p.png").exists() == drawn


def test_an_interrupted_sweep_keeps_the_rows_it_finished(ckpt, tmp_path, monkeypatch):
    (tmp_path / "prompts.txt").write_text("the film was\n")
    rows, evaluate_setting = [], evaluate.evaluate_setting

    def stop_at_the_third_row(*a, **k):
        if len(rows) == 2:
            raise KeyboardInterrupt
        rows.append(evaluate_setting(*a, **k))
        return rows[-1]
    monkeypatch.setattr(evaluate, "evaluate_setting", stop_at_the_third_row)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(evaluate.get_args(["--ckpt", str(ckpt), "--prompts", str(tmp_path / "prompts.txt"), "--guides",
                                         "none,positive", "--scales", "10,30", "--n", "2", "--steps", "3",
                                         "--max-tokens", "4", "--json", str(tmp_path / "r.json"),
                                         "--md", str(tmp_path / "r.md")]))
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [(r["guide"], r["scale"]) for r in results] == [("none", 0.0), ("positive", 10.0)]
    assert results == json.loads(json.dumps(rows))
    md = (tmp_path / "r.md").read_text()
    assert md == evaluate.markdown(rows) + "\n" and "| positive | 10 |" in md and "| positive | 30 |" not in md


def test_hf_reference_lm_from_a_local_folder(ckpt, tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    tok = AutoTokenizer.from_pretrained(str(ckpt / "tokenizer"))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=32, n_head=2, n_positions=64,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    scorer = evaluate.HFPerplexity(str(tmp_path))
    texts = ["was great and happy today", "and sad", ""]
    nll, count = scorer(["the film", "", "our trip"], texts)
    assert count == sum(len(encode_continuation(tok, t)) for t in texts) and nll > 0
    ppl = evaluate.perplexity(scorer, ["the film"], ["was great"])
    assert 1 < ppl < 10 * len(tok)  # an untrained LM is near uniform: ppl about the vocabulary size
    # against transformers' own shifted loss with the prompt (and bos) masked out of the labels
    p, c = tok("the film", add_special_tokens=False)["input_ids"], encode_continuation(tok, "was great")
    ids = torch.tensor([[tok.bos_token_id] + p + c])
    labels = ids.clone()
    labels[0, :1 + len(p)] = -100
    with torch.no_grad():
        expected = scorer.lm(input_ids=ids, labels=labels).loss.item()
    nll, count = scorer(["the film"], ["was great"])
    assert count == len(c) and nll / count == pytest.approx(expected, rel=1e-5)


def test_nearest_sentence_judges_the_proposal_by_its_closest_training_sentence(tmp_path, monkeypatch):
    import data
    import encoder
    from conftest import NEGATIVE, POSITIVE
    held = POSITIVE[1]
    monkeypatch.setattr(data, "is_held_out", lambda text: text == held)
    sentences = [t for t in POSITIVE + NEGATIVE if t != held]
    rows = [{"text": t} for t in POSITIVE + NEGATIVE]  # a held-out sentence is never a neighbour
    monkeypatch.setattr(data, "load_corpus", lambda path, cache_dir: rows if path == "mine.txt" else [])
    (tmp_path / "mine.txt").write_text("the run's own file")
    monkeypatch.chdir(tmp_path)
    model = SimpleNamespace(config={"encoder": encoder.TINY_ENCODER}, device="cpu")
    judge = evaluate.NearestSentence(model, tmp_path, "mine.txt")  # the run's corpus, not the tiny one
    assert judge.texts == sentences
    queries = sentences[:3] + sentences[-5:]
    proposals = judge.bank[[sentences.index(q) for q in queries]]  # each proposal is a training sentence itself
    labels = evaluate.vader_labels(queries)
    assert judge(proposals) == {"positive": labels.count(1) / 8, "negative": labels.count(-1) / 8}
    assert labels.count(1) >= 3 and labels.count(-1) >= 4  # the check is not trivial
    # the corpus embeddings are cached: a second judge needs no encoder
    monkeypatch.setattr(encoder, "load_encoder", lambda *a, **k: pytest.fail("re-encoded a cached corpus"))
    assert torch.equal(evaluate.NearestSentence(model, tmp_path, "mine.txt").bank, judge.bank)


def test_bad_evaluation_input_is_one_line(capsys):
    from conftest import cli_error
    for argv, message in [(["--match", "(unclosed"], "argument --match: '(unclosed' is not a regular expression"),
                          (["--match", ""], "argument --match: is empty (give a regular expression)"),  # column dropped
                          (["--scales", "10,nan"], "argument --scales: 'nan' is out of range"),
                          (["--n", "0"], "argument --n: '0' is out of range"),
                          (["--scales", "0,1e2,100"], "argument --scales: 100 is given twice"),  # a row twice
                          (["--guides", "none,positive,none"], "argument --guides: none is given twice"),
                          (["--sentiment-judge", "vader,vader"], "argument --sentiment-judge: vader is given twice"),
                          (["--guides", "positive,positive:1"], "argument --guides: positive:1 is given twice"),
                          (["--guides", "positive+news:0.5,news:.5+positive"], "--guides: news:.5+positive is given"),
                          (["--sentiment-judge", "vader,VADER"], "argument --sentiment-judge: VADER is given twice")]:
        err = cli_error(evaluate, argv, capsys)
        assert err.count("\n") == 1 and message in err, err
    # other weights, other guides: other rows; a malformed weight is left to the guide's own check
    for guides in ("positive,positive:0.5", "positive,positive+news", "positive:1_0,positive:10"):
        assert evaluate.get_args(["--guides", guides]).guides == guides.split(",")


def test_every_guide_is_checked_before_any_is_evaluated(trained, tmp_path, monkeypatch):
    (tmp_path / "p.txt").write_text("the film\n")
    monkeypatch.setattr(evaluate, "evaluate_setting", lambda *a, **k: pytest.fail("evaluated before the check"))
    run = lambda *argv: evaluate.main(evaluate.get_args(["--ckpt", str(trained / "out"), "--prompts",
                                                         str(tmp_path / "p.txt"), "--n", "1", *argv]))
    with pytest.raises(SystemExit, match="unknown guide 'bogus'"):
        run("--guides", "none,positive,bogus")
    with pytest.raises(SystemExit, match="the guide like steers by example: give it --like TEXT"):
        run("--guides", "none,like")  # was an unguided row named like
    with pytest.raises(SystemExit, match="--max-tokens 119 does not fit the decoder's context"):
        run("--max-tokens", "119")  # every prompt was cut to nothing, its continuations judged as if they went on


def test_an_empty_guide_or_prompt_file_name_is_refused_not_run_as_something_else(capsys):
    for guides in ("", "none,,positive"):
        with pytest.raises(SystemExit):
            evaluate.get_args(["--guides", guides])
        assert "argument --guides: holds an empty guide name" in capsys.readouterr().err
    assert evaluate.get_args(["--guides", "none, positive"]).guides == ["none", "positive"]
    with pytest.raises(SystemExit, match=r"^error: prompt file '' does not exist"):  # not the held-out prompts
        evaluate.main(evaluate.get_args(["--prompts", ""]))


def test_more_held_out_prompts_than_there_are_says_how_many_it_uses(trained, monkeypatch, capsys):
    import data
    texts = [f"the weather was cold and wet for {n} days in a row" for n in range(200)]
    held = [t for t in texts if data.is_held_out(t)]
    read = []
    monkeypatch.setattr(data, "load_corpus", lambda path, cache_dir: read.append(path) or [{"text": t} for t in texts])
    prompts = []

    def first_row(model, p, *args):
        prompts.extend(p)
        raise InterruptedError  # the rows themselves are not what this test checks
    monkeypatch.setattr(evaluate, "evaluate_setting", first_row)
    with pytest.raises(InterruptedError):
        evaluate.main(evaluate.get_args(["--ckpt", str(trained / "out"), "--n-prompts", "1000", "--n", "1",
                                         "--guides", "none"]))
    assert 0 < len(prompts) == len(held) < 1000
    assert sorted(prompts) == sorted(" ".join(t.split()[:4]) for t in held)  # their first 4 words
    from utils import Checkpoint
    assert read == [Checkpoint(trained / "out").config["train"]["data"]]  # the run's own file, not the tiny corpus
    texts[:] = [f"a short one {n}" for n in range(200)] + texts  # under 2 x 4 words: never a prompt
    prompts.clear()
    with pytest.raises(InterruptedError):
        evaluate.main(evaluate.get_args(["--ckpt", str(trained / "out"), "--n-prompts", "1000", "--n", "1",
                                         "--guides", "none"]))
    assert len(prompts) == len(held)
    with pytest.raises(SystemExit, match="reads the run's data file nowhere.txt .*, which is not there; put it back, "
                                         "or give prompts with --prompts FILE"):
        evaluate.heldout_prompts("nowhere.txt", "cache", 10)
    assert f"--n-prompts 1000: the held-out sentences give {len(held)} prompts" in capsys.readouterr().err


# ----------------------------------------------------------------------------- checks a mutation pass found untested


def full_row(**changes):
    """A complete row of the main and diagnostic tables (every key columns() and diagnostic_columns() read)."""
    row = dict(fake_result("positive", 10.0, 0.4, 0.1, 135.0), judges=dict(JUDGES),
               sentiment={"VADER": {"positive": 0.4, "negative": 0.1}, "TextBlob": {"positive": 0.3, "negative": 0.2}},
               positive_with_prompt=0.55, negative_with_prompt=0.15, dist1=0.9, dist2=0.95, dist3=0.97,
               dist2_pooled=0.71, avg_max_toxicity=0.31, toxic_prompts=0.25, sentiment_probe={},
               seconds_per_sample=0.01, proposal_cosine=0.25, proposal_spread=0.123,
               example_cosine={"like": None, "unlike": None}, nearest_sentence=None, match=None)
    return dict(row, **changes)


def test_the_table_reads_each_cell_from_its_own_key_and_names_judges_by_their_last_path_part():
    judges = dict(JUDGES, toxicity="/models/toxic-bert/", perplexity="openai-community/gpt2-xl")
    probe = {"proposal_positive": 0.8, "text_positive": 0.3, "proposal_logit": 2.0}
    cosine = {"like": 0.4, "unlike": None}  # a run with --like
    rows = [full_row(judges=judges, guide="like", perplexity=None, domains={}, example_cosine=cosine),
            full_row(judges=judges, sentiment_probe=probe, domains={"movie": 0.25, "news": 0.5}, example_cosine=cosine)]
    header, like, guided = table_cells(evaluate.markdown(rows))[:3]
    cell = lambda row, name: row[header.index(name)]
    assert "perplexity (gpt2-xl)" in header and "toxic (toxic-bert)" in header  # a hub id's or a folder's last part
    assert cell(guided, "positive, with prompt (VADER)") == "55.0%"  # the first judge, on prompt + continuation
    assert like[0] == "like" and guided[0] == "positive+like"  # the examples' own row is not "like+like"
    mix = "domain mix (movie/tweet/product/news)"
    assert cell(guided, mix) == "25/0/0/50" and cell(like, mix) == "-"
    assert cell(guided, "perplexity (gpt2-xl)") == "135.0"  # the unguided row (guide none) is not in this run
    diag = table_cells(evaluate.markdown(rows))[3:]
    assert diag[2][diag[0].index("probe positive: proposal / text")] == "80% / 30%"
    assert diag[2][diag[0].index("probe logit of the proposals (mean)")] == "+2.0"
    # an unguided row without a perplexity (nothing to score): the guided rows show theirs without a ratio
    base = full_row(guide="none", scale=0.0, perplexity=None)
    guided = table_cells(evaluate.markdown([base, full_row()]))[2]
    assert guided[table_cells(evaluate.markdown([base]))[0].index("perplexity (self)")] == "135.0"


def test_held_out_prompts_of_a_c4_run_come_from_the_tiny_corpus_drawn_by_the_seed(monkeypatch):
    """A C4 run is steered and judged on the tiny corpus's rated sentences; a sentence of exactly 2 * n_words
    words gives a prompt; another seed draws other prompts."""
    import data
    texts = [f"day {n} was cold and wet all week" for n in range(40)]  # 8 words: just enough for 4-word prompts
    read = []
    monkeypatch.setattr(data, "is_held_out", lambda text: True)
    monkeypatch.setattr(data, "load_corpus", lambda path, cache_dir: read.append(path) or [{"text": t} for t in texts])
    prompts = evaluate.heldout_prompts("c4", "cache", 5)
    assert read == ["tiny"] and len(prompts) == 5
    assert all(p in [" ".join(t.split()[:4]) for t in texts] for p in prompts)
    assert evaluate.heldout_prompts("c4", "cache", 5, seed=0) == prompts != evaluate.heldout_prompts("c4", "cache", 5,
                                                                                                    seed=1)


def test_toxic_means_a_probability_above_the_threshold_not_at_it():
    m = evaluate.toxicity_metrics([0.5, 0.2, 0.1, 0.4], 2)
    assert m == {"toxic": 0.0, "avg_max_toxicity": pytest.approx(0.45), "toxic_prompts": 0.0}


def test_the_probes_mean_logit_on_the_proposals_counts_the_probes_bias():
    model = SimpleNamespace(probes={"sentiment": (torch.tensor([1.0, -1.0]), torch.tensor(0.5))})
    proposals, texts = torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    agreement = evaluate.probe_agreement(model, proposals, texts)
    assert agreement == {"proposal_positive": 0.5, "text_positive": 1.0, "proposal_logit": pytest.approx(0.5)}


def test_one_proposal_has_no_spread():
    assert evaluate.proposal_spread(torch.eye(4)[:1]) is None  # no pair: not 0 / 0


def test_attribute_success_of_guides_the_checkpoint_does_not_name():
    r = fake_result("none", 0.0, 0.3, 0.2, 10.0, offensive=0.1, domains={"movie": 0.25, "news": 0.5})
    assert evaluate.attribute_success(r, "negative", {}) == 0.2  # the names' own meaning
    assert evaluate.attribute_success(r, "nontoxic", {}) == pytest.approx(0.9)
    assert evaluate.attribute_success(r, "toxic", {}) == 0.1
    assert evaluate.attribute_success(r, "positive+same-domain", GUIDES) == 0.3  # judged as positive
    assert evaluate.attribute_success(r, "not-movie", {"not-movie": ("movie", 0)}) == 0.75  # a domain's other texts


def test_judge_names_in_any_case_and_spacing_a_picture_suffix_in_capitals_and_the_default_guides(tmp_path):
    assert evaluate.ToxicityJudge("Profanity-Check").classifier is None
    assert evaluate.get_args(["--sentiment-judge", "vader, textblob"]).sentiment_judge == ["vader", "textblob"]
    assert evaluate.get_args([]).guides == ["none", "positive", "negative"]  # the docstring's first command
    pytest.importorskip("matplotlib")
    assert evaluate.get_args(["--plot", str(tmp_path / "sweep.PNG")]).plot == str(tmp_path / "sweep.PNG")


def test_the_plot_draws_each_guide_over_its_scales_from_the_unguided_star(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes
    drawn, plot = [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, x, y, *a, **k: drawn.append((list(x), list(y), a, k.get("label")))
                        or plot(self, x, y, *a, **k))
    sweep = [SWEEP[0], fake_result("negative", 60.0, 0.1, 0.8, 40.0), fake_result("negative", 10.0, 0.1, 0.3, 45.0),
             fake_result("formal", 10.0, 0.1, 0.3, 30.0)]
    assert evaluate.plot_sweep(sweep, tmp_path / "a.png", GUIDES) == ["formal"]  # no judge covers it
    lines = {label: (x, y) for x, y, a, label in drawn if a == ("o-",)}
    assert lines == {"negative": ([20.0, 45.0, 40.0], [pytest.approx(20.0), pytest.approx(30.0), pytest.approx(80.0)])}
    stars = [(x, y) for x, y, a, _ in drawn if a == ("*",)]
    assert ([20.0], [pytest.approx(20.0)]) in stars  # the unguided row, at its own negative share
    no_perplexity = [fake_result("positive", 10.0, 0.5, 0.1, math.inf),
                     fake_result("negative", 10.0, 0.1, 0.5, math.nan)]
    assert evaluate.plot_sweep(no_perplexity, tmp_path / "b.png", GUIDES) == ["positive", "negative"]  # nothing to draw


def test_the_results_file_records_the_prompts_n_and_precision(tmp_path):
    from sample import SamplingConfig
    args = SimpleNamespace(json=tmp_path / "r.json", md=None, ckpt=tmp_path / "out", n=3, n_prompts=50)
    evaluate.write_results(args, 7, SamplingConfig(), True, [{"guide": "none"}])
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["prompts"], report["n"], report["precision"]) == (7, 3, "bf16")
    evaluate.write_results(args, 7, SamplingConfig(), False, [{"guide": "none"}])
    assert json.loads((tmp_path / "r.json").read_text())["precision"] == "fp32"


def test_a_settings_row_keeps_its_proposals_examples_and_examples_cosines_apart(ckpt, monkeypatch):
    """Proposals other than the texts' own embeddings: --nearest judges the proposals; the cosine to the --like
    examples is under like (no --unlike: None); the JSON keeps the first six (prefix, text) pairs."""
    from sample import DGLM, SamplingConfig
    model = DGLM(ckpt, precision="fp32")
    texts = ["a good day", "a bad day", "the film was long", "our trip", "x y", "the song", "a cat", "a dog"]
    proposals = torch.nn.functional.normalize(torch.randn(8, model.embed(["a"]).shape[-1],
                                                          generator=torch.Generator().manual_seed(0)), dim=-1)
    monkeypatch.setattr(model, "generate_in_batches", lambda prefixes, *rest: iter([(proposals, texts)]))
    judged = []

    class Scorer:
        name = "p"

        def __call__(self, prefixes, batch):
            return 0.0, 0
    judges = {"sentiment": [SimpleNamespace(name="j", labels=lambda batch: [0] * len(batch))],
              "toxicity": SimpleNamespace(name="t", probs=lambda batch: [0.0] * len(batch)), "perplexity": Scorer()}
    nearest = lambda e: judged.append(e) or {"positive": 1.0, "negative": 0.0}
    like = ["What a wonderful day"]
    args = SimpleNamespace(like=like, unlike=None, seed=0, batch_size=100, match=None)
    r = evaluate.evaluate_setting(model, ["p0", "p1", "p2", "p3"], 2, "none", SamplingConfig(), args, judges, nearest)
    assert len(judged) == 1 and torch.equal(judged[0], proposals)  # the proposals, not the texts' embeddings
    text_e = model.embed(texts)
    assert r["example_cosine"]["unlike"] is None
    assert r["example_cosine"]["like"] == pytest.approx((text_e @ model.embed(like).T).mean().item(), abs=1e-5)
    assert r["proposal_cosine"] == pytest.approx((text_e * proposals).sum(-1).mean().item(), abs=1e-5)
    assert r["examples"] == [{"prefix": f"p{i // 2}", "text": t} for i, t in enumerate(texts[:6])]  # the first six


def test_the_seed_and_the_runs_data_reach_the_prompts_perplexity_and_nearest(trained, tmp_path, monkeypatch, capsys):
    """--seed draws the held-out prompts and seeds the self perplexity's noise; --nearest reads the run's corpus;
    the JSON counts prompts (not continuations); the plot's note names the guides it left out."""
    import data
    from utils import Checkpoint
    texts = [f"on day {n} the weather was cold and wet" for n in range(60)]
    monkeypatch.setattr(data, "is_held_out", lambda text: True)
    monkeypatch.setattr(data, "load_corpus", lambda path, cache_dir: [{"text": t} for t in texts])
    made = {}

    class Scorer:
        name = "self"

        def __init__(self, model, seed=0):
            made["perplexity seed"] = seed

    class Nearest:
        def __init__(self, model, cache_dir, data="tiny"):
            made["nearest data"] = data
    prompts = []

    def setting(model, p, n, guide, sampling, args, judges, nearest=None):
        prompts.extend(p)
        return full_row(guide="none", scale=0.0)
    monkeypatch.setattr(evaluate, "SelfPerplexity", Scorer)
    monkeypatch.setattr(evaluate, "NearestSentence", Nearest)
    monkeypatch.setattr(evaluate, "evaluate_setting", setting)
    monkeypatch.setattr(evaluate, "plot_sweep", lambda *a, **k: ["formal", "polite"])
    args = evaluate.get_args(["--ckpt", str(trained / "out"), "--n-prompts", "3", "--n", "2", "--guides", "none",
                              "--seed", "1", "--nearest", "--json", str(tmp_path / "r.json")])
    args.plot = str(tmp_path / "p.png")  # (plot_sweep is replaced: no picture is drawn)
    evaluate.main(args)
    run_data = Checkpoint(trained / "out").config["train"]["data"]
    assert prompts == evaluate.heldout_prompts(run_data, "cache", 3, seed=1) != evaluate.heldout_prompts(run_data,
                                                                                                          "cache", 3)
    assert made == {"perplexity seed": 1, "nearest data": run_data}
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["prompts"], report["n"]) == (3, 2)  # prompts, not continuations
    assert "(without formal, polite: no judge covers them;" in capsys.readouterr().out


def test_a_classifier_judges_by_the_first_label_naming_the_attribute_and_not_its_negation(tmp_path):
    """Labels 'not toxic', 'toxic', 'severe toxic' (in that order): the judge reads 'toxic'."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast
    tok = Tokenizer(WordLevel({"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    labels = ["not toxic", "toxic", "severe toxic"]
    config = BertConfig(vocab_size=2, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                        num_labels=3, id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
                        problem_type="multi_label_classification")
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(tmp_path)
    assert evaluate.ToxicityJudge(str(tmp_path)).classifier.index == 1


def test_a_classifiers_tie_is_not_positive(classifiers):
    judge = evaluate.SentimentJudge(str(classifiers["sentiment"]))  # a zeroed head: probability 0.5 for every text
    assert judge.labels(["the good day", "the bad day"]) == [-1, -1]


def hf_lm(tmp_path, bos=True):
    """A tiny untrained GPT-2 with 16 positions and its tokenizer saved in tmp_path, without a bos token if not bos."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    tok = train_tokenizer(SENTENCES * 20, 150)
    if not bos:
        tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=16, n_head=2, n_positions=16,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tok


def test_a_reference_lm_scores_a_continuation_longer_than_its_context_on_its_last_positions(tmp_path):
    hf_lm(tmp_path)
    scorer = evaluate.HFPerplexity(str(tmp_path))
    nll, count = scorer(["the cat"], [" ".join(SENTENCES)])  # far more than 16 tokens
    assert count == 15 and nll > 0  # 16 positions less bos, the prompt cut first


def test_a_reference_lm_without_a_bos_token_starts_from_end_of_text(tmp_path):
    tok = hf_lm(tmp_path, bos=False)
    scorer = evaluate.HFPerplexity(str(tmp_path))
    assert tok.bos_token_id is None and scorer.bos == tok.eos_token_id
    _, count = scorer([""], ["the cat sat"])  # an empty prompt: the first token is scored after end-of-text
    assert count == len(encode_continuation(tok, "the cat sat"))


def test_self_perplexity_scores_a_continuation_longer_than_the_context_on_the_room_left():
    tok = train_tokenizer(SENTENCES * 20, 150)
    dec = tiny_decoder(len(tok))
    scorer = evaluate.SelfPerplexity(SimpleNamespace(decoder=dec, tokenizer=tok, device="cpu"))
    long = " ".join(SENTENCES * 3)
    assert len(encode_continuation(tok, long)) > dec.max_len
    nll, count = scorer(["the cat"], [long])
    assert count == dec.room() and nll > 0
