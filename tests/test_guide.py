"""guide.py: guidance of the prior (against closed forms and on a toy prior), guides, and probes."""
import json
import re

import pytest
import torch

import data
import guide
from conftest import HELD_OUT, NEGATIVE, POSITIVE, TOPIC_HELD_OUT
from diffusion import Prior, PriorConfig
from encoder import embed, unstandardize
from guide import (Guidance, accuracy, balanced_weights, build_guidance, negation_direction, parse_guides,
                   probe_without, train_probe)
from sample import SamplingConfig

GUIDE_MAX_LOGSNR = SamplingConfig.guide_max_logsnr


def test_probe_beats_chance_on_held_out_sentences(sentiment_embeddings):
    e, y = sentiment_embeddings
    held = torch.arange(len(y)) % 4 == 0
    w, b = train_probe(e[~held], y[~held])
    assert accuracy(w, b, e[held], y[held]) >= 0.8  # chance is 0.5


def test_without_the_negation_direction_negating_a_sentence_flips_the_probe(encoder, sentiment_embeddings):
    """MiniLM moves every sentence the same way when "not" is added, so a sentiment probe calls "not sad"
    as negative as "sad"; with that common direction projected out, negation reads as a flip."""
    e, y = sentiment_embeddings
    w, _ = train_probe(e, y)
    encode = lambda texts: torch.from_numpy(embed(encoder, texts))
    d = negation_direction(POSITIVE + NEGATIVE, encode)
    w_perp, _ = probe_without(e, y, None, d)
    assert abs(float(w_perp @ d)) < 1e-4 * float(w_perp.norm())

    def shift(probe, sentences):  # mean change of the probe's logit when each sentence is negated
        negated = [s.replace(" was ", " was not ").replace(" were ", " were not ") for s in sentences]
        return float(((encode(negated) - encode(sentences)) @ probe).mean())
    good = ["The movie was good.", "The hotel was clean.", "The staff were friendly.", "The price was fair."]
    bad = ["The ending was sad.", "The food was cold.", "The service was slow.", "The plot was thin."]
    assert shift(w, bad) < 0 < shift(w_perp, bad)  # "not sad": more negative, then less
    assert shift(w_perp, good) < 0  # "not good" still reads less positive
    assert negation_direction(["Great day!", "It is not again."], encode) is None  # nothing to negate


def test_tiny_probes_keep_the_whole_sentiment_probe_when_no_text_can_be_negated(capsys):
    label = torch.tensor([i % 2 for i in range(40)], dtype=torch.float32)
    e = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    e[:, 0] += 4 * label - 2
    rows = [{"rating": 4 * y - 2, "domain": "ab"[i // 2 % 2], "continuation": ["sad day", "great day"][int(y)]}
            for i, y in enumerate(label.tolist())]
    probes, report = guide.train_tiny_probes(e, rows, e, rows, encode=lambda texts: pytest.fail("nothing to negate"))
    assert torch.equal(probes["sentiment_no_negation"][0], probes["sentiment"][0]) and report["sentiment"] > 0.9
    assert "no training text to negate" in capsys.readouterr().out


def test_the_sentiment_probes_read_both_signs_and_share_a_boundary_at_the_whole_probes_norm():
    """sentiment_no_negation is the sentiment probe fitted without the negation direction, then rescaled to the
    whole probe's norm: the fit's decisions (its bias scaled with it) at the norm a guide's scale was set for."""
    label = torch.tensor([i % 2 for i in range(40)], dtype=torch.float32)
    e = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    e[:, 0] += 2 * label - 0.5  # sentiment, its boundary off the origin
    e[:, 1] += 2 * (1 - label)  # the negatives hold more negations
    rows = [{"rating": 4 * y - 2, "domain": "ab"[i // 2 % 2], "continuation": ["it was sad", "it was great"][int(y)]}
            for i, y in enumerate(label.tolist())]
    negation = lambda texts: torch.tensor([[0.0, float(" not " in t)] + [0.0] * 6 for t in texts])  # along dim 1
    probes, _ = guide.train_tiny_probes(e, rows, e, rows, encode=negation)
    (w, b), (w_n, b_n) = probes["sentiment"], probes["sentiment_no_negation"]
    assert guide.accuracy(w, b, e, label) > 0.9  # fitted on the negative ratings as well as the positive
    fit_w, fit_b = probe_without(e, label, balanced_weights(label, [r["domain"] for r in rows]), torch.eye(8)[1])
    assert fit_w.norm() < 0.5 * w.norm()  # the rescaling matters here
    assert w_n.norm().item() == pytest.approx(w.norm().item(), rel=1e-5)
    torch.testing.assert_close(torch.cat([w_n, b_n[None]]) / w_n.norm(), torch.cat([fit_w, fit_b[None]]) / fit_w.norm())


def test_balanced_weights_give_each_group_and_label_equal_mass():
    y = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0, 0.0])
    groups = ["a", "a", "a", "a", "b", "b", "b", "b", "b"]
    w = balanced_weights(y, groups)
    for g in "ab":
        for label in (0, 1):
            cell = [i for i in range(9) if groups[i] == g and y[i] == label]
            assert w[cell].sum().item() == pytest.approx(0.25)


def test_parse_guides():
    available = {"positive": ("sentiment", 1), "news": ("news", 1)}
    assert parse_guides("positive,news:0.5", available) == [("positive", 1.0), ("news", 0.5)]
    assert parse_guides("none", available) == []
    with pytest.raises(SystemExit, match="unknown guide 'happy'.*available: news, positive"):
        parse_guides("happy", available)
    with pytest.raises(SystemExit, match=r"unknown guide 'toxic' \(available: news, positive, none; 'toxic' is one of "
                                         r"the paper tier's guides: `python guide.py --ckpt runs/a --probes paper` adds "
                                         r"them \(their data sets come from the hub, or --probe-data DIR\)\)$"):
        parse_guides("toxic", available, "runs/a")  # a tiny checkpoint asked for a paper guide: where it comes from
    for spec in ("positive+", ",news", "positive,,news"):
        with pytest.raises(SystemExit, match="empty guide name"):
            parse_guides(spec, available)
    for spec in ("news:lots", "news:", "positive:1:2"):
        with pytest.raises(SystemExit, match="not a number"):
            parse_guides(spec, available)
    for weight in ("inf", "nan", "-1", "1e5"):
        with pytest.raises(SystemExit, match="out of range"):
            parse_guides(f"positive:{weight}", available)
    assert parse_guides("positive:0", available) == [("positive", 0.0)]
    with pytest.raises(SystemExit, match="none \\(no guidance\\) takes no weight"):  # said "unknown guide 'none'"
        parse_guides("none:0.5", available)
    with pytest.raises(SystemExit, match="'1e' in 'positive:1e' is not a number .*write 1e2, not 1e\\+2"):
        parse_guides("positive:1e+2", available)
    assert parse_guides("positive,like", available) == [("positive", 1.0)]  # the examples come with --like
    for spec in ("positive,like:7", "like:banana"):  # a weight there was ignored, a word as much as a number
        with pytest.raises(SystemExit, match="like takes no weight; --like-weight sets the pull"):
            parse_guides(spec, available)


def _toy(dim=16):
    torch.manual_seed(0)
    prior = Prior(PriorConfig(dim=dim, n_tokens=4, token_dim=8, width=32, depth=2, heads=2)).eval()
    for p in prior.parameters():
        torch.nn.init.normal_(p, std=0.05)
    mu, s = torch.full((dim,), 0.01), torch.full((dim,), 0.25)
    w = torch.nn.functional.normalize(torch.randn(dim), dim=0) * 8
    return prior, mu, s, w


def _logits(prior, mu, s, w, guidance, seed=3):
    x = prior.sample(torch.zeros(64, 16), steps=20, method="ddim", guidance=guidance,
                     generator=torch.Generator().manual_seed(seed))
    return unstandardize(x, mu, s) @ w, x


def _guidance(terms, mu, s, scale, max_logsnr=15.0, n_samples=32, **kwargs):
    return Guidance(terms, mu, s, scale, n_samples=n_samples, max_logsnr=max_logsnr, **kwargs)


# every step at scale 5; the default interval (the first 5 of these 20 steps) needs a larger scale on this
# random toy prior, whose noisy steps do not settle the attribute as a trained prior's do
@pytest.mark.parametrize("max_logsnr,scale", [(15.0, 5.0), (GUIDE_MAX_LOGSNR, 20.0)])
def test_guidance_moves_the_probe_logit_in_the_requested_direction(max_logsnr, scale):
    prior, mu, s, w = _toy()
    base, _ = _logits(prior, mu, s, w, None)
    guide = lambda target: _guidance([(w, torch.tensor(0.0), target, 1.0)], mu, s, scale, max_logsnr)
    up, _ = _logits(prior, mu, s, w, guide(1))
    down, _ = _logits(prior, mu, s, w, guide(0))
    assert up.mean() > base.mean() + 1.0 and down.mean() < base.mean() - 1.0
    assert (up > 0).float().mean() > 0.9 and (down < 0).float().mean() > 0.9


def test_scale_zero_gives_exactly_the_unguided_sample():
    prior, mu, s, w = _toy()
    _, plain = _logits(prior, mu, s, w, None)
    _, zero = _logits(prior, mu, s, w, _guidance([(w, torch.tensor(0.0), 1, 1.0)], mu, s, scale=0.0))
    assert torch.equal(plain, zero)


def test_guidance_acts_only_on_steps_up_to_max_logsnr():
    prior, mu, s, w = _toy()
    term = [(w, torch.tensor(0.0), 1, 1.0)]
    g = _guidance(term, mu, s, scale=5.0, max_logsnr=-2.0)
    predict = lambda z, lam: prior.predict(z, lam, torch.zeros(len(z), 16), 1.0)
    z = torch.randn(8, 16)
    lam = torch.tensor([-8.0, -4.0, -2.0, -2.0, -1.9, 0.0, 3.0, 10.0])  # one noise level per example
    _, eps_guided = g(predict, z, lam)
    _, eps_plain = predict(z, lam)
    changed = (eps_guided != eps_plain).any(-1)
    assert changed.tolist() == [True] * 4 + [False] * 4
    # a threshold below every step's logSNR leaves the whole sample exactly unguided
    _, plain = _logits(prior, mu, s, w, None)
    _, never = _logits(prior, mu, s, w, _guidance(term, mu, s, scale=5.0, max_logsnr=-100.0))
    assert torch.equal(plain, never)


@pytest.mark.parametrize("n_samples,aggregate", [(0, "reference"), (5, "reference"), (5, "lgd"), (5, "mean")])
def test_loss_from_dot_products_equals_the_loss_on_the_k_samples_themselves(n_samples, aggregate):
    """Guidance.loss never forms the K x B x d samples; written out directly they give the same loss."""
    torch.manual_seed(0)
    d, B = 12, 3
    mu, s = torch.randn(d) * 0.1, torch.rand(d) + 0.5
    x_hat = torch.randn(B, d, requires_grad=True)
    a = torch.tensor([0.05, 0.5, 0.9])
    terms = [(torch.randn(d), torch.tensor(0.3), 1, 1.0),
             (torch.randn(d), torch.tensor(-0.2), torch.tensor([0.0, 1, 0.5]), 0.5),  # per-example targets
             (torch.randn(d), torch.tensor(0.8), "prefix", 2.0)]  # the probe's own probability on each prefix
    e_prefix = torch.nn.functional.normalize(torch.randn(B, d), dim=-1)
    g = _guidance(terms, mu, s, 1.0, n_samples=n_samples, aggregate=aggregate)
    fast = g.bind(e_prefix, seed=7).loss(x_hat, a)
    K = max(n_samples, 1)
    noise = torch.randn(n_samples, d, generator=torch.Generator().manual_seed(7)) if n_samples else torch.zeros(1, d)
    x = x_hat[None] + ((1 - a) / a).sqrt()[None, :, None] * noise[:, None]          # (K, B, d)
    e = unstandardize(x, mu, s)
    target = lambda w, b, t: torch.sigmoid(e_prefix @ w + b) if t == "prefix" else torch.as_tensor(t).float()
    total = sum(weight * torch.nn.functional.binary_cross_entropy_with_logits(
        e @ w + b, target(w, b, t).expand(K, B), reduction="none") for w, b, t, weight in terms)  # (K, B): per draw
    log_k = torch.log(torch.tensor(float(K)))
    slow = {"reference": torch.logsumexp(total, 0) - log_k,     # log mean_k exp(L_k)
            "lgd": -(torch.logsumexp(-total, 0) - log_k),       # -log mean_k exp(-L_k)
            "mean": total.mean(0)}[aggregate]
    torch.testing.assert_close(fast, slow)
    g_fast, = torch.autograd.grad(fast.sum(), x_hat, retain_graph=True)
    g_slow, = torch.autograd.grad(slow.sum(), x_hat)
    torch.testing.assert_close(g_fast, g_slow)


@pytest.mark.parametrize("aggregate", ["reference", "lgd", "mean"])
def test_weights_add_linearly_in_the_gradient(aggregate):
    torch.manual_seed(0)
    mu, s = torch.zeros(8), torch.ones(8)
    w1, w2 = torch.randn(8), torch.randn(8)
    x = torch.randn(4, 8, requires_grad=True)
    a = torch.full((4,), 0.7)

    def grad(terms):
        g = _guidance(terms, mu, s, 1.0, n_samples=0, aggregate=aggregate)
        return torch.autograd.grad(g.loss(x, a).sum(), x)[0]

    b = torch.tensor(0.0)
    combined = grad([(w1, b, 1, 2.0), (w2, b, 0, 0.5)])
    torch.testing.assert_close(combined, 2.0 * grad([(w1, b, 1, 1.0)]) + 0.5 * grad([(w2, b, 0, 1.0)]))


def test_build_guidance_from_names():
    probes = {"sentiment": (torch.randn(8), torch.tensor(0.1))}
    guides = {"positive": ("sentiment", 1), "negative": ("sentiment", 0)}
    kw = dict(n_samples=4, max_logsnr=-2.0)
    g = build_guidance("negative:2", probes, guides, torch.zeros(8), torch.ones(8), 10.0, **kw)
    assert g.terms[0][2] == 0 and g.terms[0][3] == 2.0 and g.scale == 10.0 and g.n_samples == 4
    assert build_guidance("none", probes, guides, torch.zeros(8), torch.ones(8), 10.0, **kw) is None
    # weight 0 steers nothing: the unguided sample itself (the guided path's rounding in bf16 made other text)
    assert build_guidance("negative:0", probes, guides, torch.zeros(8), torch.ones(8), 10.0, **kw) is None
    g = build_guidance("negative:0,positive", probes, guides, torch.zeros(8), torch.ones(8), 10.0, **kw)
    assert [term[2:] for term in g.terms] == [(1, 1.0)]


def test_same_domain_targets_come_from_each_prefix():
    from guide import TINY_GUIDES, build_guidance
    torch.manual_seed(0)
    d = 8
    probes = {n: (torch.randn(d), torch.randn(())) for n in ["sentiment", "movie", "tweet", "product", "news"]}
    mu, s = torch.zeros(d), torch.ones(d)
    g = build_guidance("positive,same-domain:2", probes, TINY_GUIDES, mu, s, 1.0, n_samples=0, max_logsnr=15.0)
    assert [t[2] for t in g.terms] == [1, "prefix", "prefix", "prefix", "prefix"]
    e_p = torch.nn.functional.normalize(torch.randn(3, d), dim=-1)
    bound = g.bind(e_p, seed=0)
    w, b = probes["news"]
    torch.testing.assert_close(bound.terms[4][2], torch.sigmoid(e_p @ w + b))
    assert g.terms[4][2] == "prefix"  # the unbound guidance is unchanged
    # at x_hat = the prefix itself, the same-domain loss is at its minimum: its gradient is zero
    only_domain = build_guidance("same-domain", probes, TINY_GUIDES, mu, s, 1.0, n_samples=0,
                                 max_logsnr=15.0).bind(e_p, seed=0)
    x = e_p.clone().requires_grad_(True)
    only_domain.loss(x, torch.full((3,), 0.5)).sum().backward()
    tangent = x.grad - (x.grad * e_p).sum(-1, keepdim=True) * e_p  # normalisation removes the radial part
    assert tangent.abs().max() < 1e-5


def test_the_same_seed_gives_the_same_guided_sample_every_time():
    """The Monte Carlo noise comes from bind()'s generator: two generations with one seed agree, in one
    process, and another seed differs."""
    prior, mu, s, w = _toy()
    g = _guidance([(w, torch.tensor(0.0), 1, 1.0)], mu, s, 5.0, n_samples=8)
    e_prefix = torch.zeros(64, 16)
    sample = lambda seed: _logits(prior, mu, s, w, g.bind(e_prefix, seed), seed=3)[1]
    first, second, other = sample(0), sample(0), sample(1)
    assert torch.equal(first, second) and not torch.equal(first, other)


def test_paper_probes_from_local_copies_are_merged_and_beat_chance(probe_data, ckpt_copy, tmp_path, capsys):
    from encoder import TINY_ENCODER, embed, load_encoder
    ckpt = ckpt_copy
    tiny = {name: (torch.randn(384), torch.tensor(0.0)) for name in ("sentiment", "movie", "tweet", "product", "news")}
    guide.save_probes(ckpt / "probes.safetensors", tiny, guide.TINY_GUIDES, TINY_ENCODER)

    report = guide.main(["--ckpt", str(ckpt), "--probes", "paper", "--probe-data", str(probe_data),
                         "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    assert set(report) == {"sentiment", "toxicity", "world", "sports", "business", "scitech"}
    assert "the guides negative, positive are replaced by the new ones of those names" in capsys.readouterr().out
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
    logits = torch.stack([e @ probes[t][0] + probes[t][1] for t in data.AG_NEWS_TOPICS], 1)
    assert (logits.argmax(1) == torch.arange(4)).float().mean() >= 0.75  # chance is 0.25


def test_paper_probes_refuse_to_fit_on_too_few_or_to_take_a_probe_a_users_guide_reads(probe_data, ckpt_copy,
                                                                                        tmp_path, capsys):
    """--max-per-class 1 held every example out and saved probes of zeros over the run's own; a user's
    guides on a probe named sports were re-pointed to the AG News one. Neither touches probes.safetensors now."""
    from encoder import TINY_ENCODER
    path = ckpt_copy / "probes.safetensors"
    mine = {"sentiment": (torch.randn(384), torch.tensor(0.0)), "sports": (torch.randn(384), torch.tensor(0.0))}
    guide.save_probes(path, mine, {**guide.TINY_GUIDES, "happy": ("sports", 1), "sad": ("sports", 0)}, TINY_ENCODER)
    before = path.read_bytes()
    argv = ["--ckpt", str(ckpt_copy), "--probes", "paper", "--probe-data", str(probe_data),
            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    with pytest.raises(SystemExit, match=r"the guide\(s\) happy, sad of .* read a probe named 'sports', which the "
                                         "paper probes would replace"):
        guide.main(argv)
    assert path.read_bytes() == before
    guide.save_probes(path, mine, guide.TINY_GUIDES, TINY_ENCODER)
    before = path.read_bytes()
    with pytest.raises(SystemExit, match="the sentiment probe would be fitted on 0 / 0 examples of its two classes"):
        guide.main(argv + ["--max-per-class", "1"])
    assert path.read_bytes() == before and not (tmp_path / "cache").exists()  # refused before any encoding
    with pytest.raises(SystemExit):
        guide.main(argv + ["--name", "mine"])  # ignored before: --name names a --labels probe
    assert "--name is for --labels FILE" in capsys.readouterr().err


def test_a_text_is_read_once_with_each_label(tmp_path):
    from conftest import write_jsonl
    texts = ["good", "bad", "good", "fine", "good", "bad", "meh"]  # "good" twice as 1, once as 0
    write_jsonl(tmp_path / "sst2.jsonl", [{"sentence": t, "label": int(k != 4 and t in ("good", "fine"))}
                                          for k, t in enumerate(texts)])
    rows = data.read_labelled("sst2", 10, data_dir=str(tmp_path))
    assert [(t, y) for t, y, _ in rows] == [("good", 1), ("bad", 0), ("fine", 1), ("good", 0), ("meh", 0)]
    assert [h for _, _, h in rows] == [True, True, False, False, False]  # the 1st of each class, then every 10th


def test_paper_probes_are_fitted_on_training_rows_and_scored_on_held_out_ones(probe_data, monkeypatch):
    """The reported accuracy is on rows the probe never saw: scored on its training rows, it would read high."""
    class Cache:  # row i of a task's texts -> (i, noise): which rows reach the fit and the score
        def encode(self, texts, show_progress=True):
            noise = torch.randn(len(texts), 7, generator=torch.Generator().manual_seed(0))
            return torch.cat([torch.arange(len(texts), dtype=torch.float32)[:, None], noise], 1).numpy()

    fitted, scored = [], []
    fit, score = guide.train_probe, guide.balanced_accuracy
    monkeypatch.setattr(guide, "train_probe", lambda e, y, w: fitted.append(e[:, 0].int().tolist()) or fit(e, y, w))
    monkeypatch.setattr(guide, "balanced_accuracy",
                        lambda w, b, e, y: scored.append(e[:, 0].int().tolist()) or score(w, b, e, y))
    probes, report = guide.train_paper_probes(Cache(), 10, str(probe_data), show_progress=False)
    rows = [data.read_labelled("sst2", 10, str(probe_data)) + data.read_labelled("amazon_polarity", 10, str(probe_data)),
            data.read_labelled("civil_comments", 10, str(probe_data))] + [data.read_labelled("ag_news", 10,
                                                                                             str(probe_data))] * 4
    assert list(report) == ["sentiment", "toxicity", "world", "sports", "business", "scitech"]
    assert scored == [[i for i, (_, _, held) in enumerate(task) if held] for task in rows]
    assert fitted == [[i for i, (_, _, held) in enumerate(task) if not held] for task in rows]


def test_probe_data_offline_fails_with_one_sentence(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as err:
        data.read_labelled("civil_comments", 10, data_dir=str(tmp_path))  # no local copy there
    message = str(err.value)
    assert "google/civil_comments" in message and "civil_comments.jsonl" in message
    assert "--probe-data" in message and "\n" not in message
    # a local copy without the hub's field names, or not JSON lines: one line naming the file, not a KeyError
    (tmp_path / "sst2.jsonl").write_text('{"text": "a fine film", "label": 1}\n')
    (tmp_path / "ag_news.jsonl").write_text("text,label\na fine film,1\n")
    for name, field, why in (("sst2", "sentence", "KeyError"), ("ag_news", "text", "")):
        with pytest.raises(SystemExit) as err:
            data.read_labelled(name, 10, data_dir=str(tmp_path))
        assert str(err.value).startswith(f"error: cannot read {tmp_path / name}.jsonl as {name} with the hub's field "
                                         f"names ('{field}' and its label): {why}") and "\n" not in str(err.value)
    with pytest.raises(SystemExit, match="--probe-data .*nowhere is not a folder"):
        data.read_labelled("sst2", 10, data_dir=str(tmp_path / "nowhere"))
    # guide.py --probes paper with one local copy of four: the others named at once, not one per try
    (tmp_path / "ag_news.jsonl").unlink()
    with pytest.raises(SystemExit, match=r"^error: could not stream fancyzhx/amazon_polarity .*--probe-data DIR "
                                         r"\(likewise civil_comments, ag_news: DIR/<name>.jsonl each\)$"):
        guide.train_paper_probes(None, 10, str(tmp_path))
    with pytest.raises(SystemExit, match="--probe-data .*nowhere is not a folder$"):  # the same for all: said once
        guide.train_paper_probes(None, 10, str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- a user's labels and steering by example


def labels_file(path, rows, header=("text", "label"), sep=","):
    import csv
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=sep)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def ckpt_copy(trained, tmp_path):
    import shutil
    shutil.copytree(trained / "out", tmp_path / "out")
    return tmp_path / "out"


def test_a_probe_from_a_labelled_file_beats_chance_and_its_guides_steer(ckpt_copy, tmp_path, capsys):
    from conftest import NEGATIVE, POSITIVE
    from sample import DGLM, SamplingConfig
    path = labels_file(tmp_path / "mood.csv", [(t, "cheerful") for t in POSITIVE] + [(t, "gloomy") for t in NEGATIVE])
    accuracy_ = guide.main(["--ckpt", str(ckpt_copy), "--labels", str(path), "--cache-dir", str(tmp_path / "cache"),
                            "--device", "cpu"])
    assert accuracy_ >= 0.75 and "(chance 0.500)" in capsys.readouterr().out  # held out: every 5th of each label
    probes, guides = guide.load_probes(ckpt_copy / "probes.safetensors", "minilm")
    assert guides["cheerful"] == ("mood", 0) and guides["gloomy"] == ("mood", 1)  # sorted: the second is class 1
    assert "positive" in guides and "sentiment" in probes  # the tier's probes are kept beside the new one
    model = DGLM(ckpt_copy, precision="fp32")
    w, b = model.probes["mood"]
    every_step = SamplingConfig(steps=12, scale=50.0, guide_max_logsnr=15.0, mc_samples=8)
    prompts = ["the film", "our trip", "a day", "this song"] * 4
    logit = lambda g: (model.sample_proposals(prompts, g, every_step, seed=0) @ w + b).mean().item()
    base = logit(None)
    assert logit(model.guidance("gloomy", every_step)) > base + 0.5    # toward class 1
    assert logit(model.guidance("cheerful", every_step)) < base - 0.5  # toward class 0


def test_labels_the_embeddings_do_not_show_are_saved_with_a_warning(ckpt_copy, tmp_path, capsys):
    from conftest import NEGATIVE, POSITIVE
    texts = POSITIVE + NEGATIVE  # each text once with each label: the same texts are held out for both
    path = labels_file(tmp_path / "coin.csv", [(t, "heads") for t in texts] + [(t, "tails") for t in texts])
    accuracy_ = guide.main(["--ckpt", str(ckpt_copy), "--labels", str(path), "--cache-dir", str(tmp_path / "cache"),
                            "--device", "cpu"])
    assert accuracy_ == pytest.approx(0.5) and "warning: the probe is no better than chance" in capsys.readouterr().err
    assert "heads" in guide.load_probes(ckpt_copy / "probes.safetensors", "minilm")[1]  # saved all the same
    path = labels_file(tmp_path / "mood.csv", [(t, "cheerful") for t in POSITIVE] + [(t, "gloomy") for t in NEGATIVE])
    guide.main(["--ckpt", str(ckpt_copy), "--labels", str(path), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    assert "warning" not in capsys.readouterr().err


def test_copies_of_a_row_are_held_out_with_it(ckpt_copy, tmp_path, capsys):
    from conftest import NEGATIVE, POSITIVE
    texts, labels = ["a", "b", "a", "c", "a", "b"], ["x", "x", "x", "x", "y", "x"]
    assert guide.held_out(texts, labels).tolist() == [True, False, True, False, True, False]  # ("a", "y"): y's first
    # labels the text does not show (every other sentence), each row five times: held-out copies of training rows
    # would let the probe be scored on what it was fitted to (balanced accuracy 1.0)
    rows = [(t, "odd" if i % 2 else "even") for i, t in enumerate(POSITIVE + NEGATIVE) for _ in range(5)]
    accuracy_ = guide.main(["--ckpt", str(ckpt_copy), "--labels", str(labels_file(tmp_path / "parity.csv", rows)),
                            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    out = capsys.readouterr()
    assert accuracy_ < 0.7 and "200 examples (160 copies of earlier rows, each on its row's side" in out.out
    few = labels_file(tmp_path / "few.csv", rows[:90])  # 45 rows of each label, 9 texts
    with pytest.raises(SystemExit, match="at least 10 different texts; .* has 9 of 'even', 9 of 'odd'"):
        guide.main(["--ckpt", str(ckpt_copy), "--labels", str(few), "--cache-dir", str(tmp_path / "cache")])


def test_a_label_that_starts_with_a_dash_comes_with_how_to_name_its_guide(ckpt_copy, tmp_path, capsys):
    """`sample.py --guide -x` is argparse's "expected one argument"; `--guide=-x` steers."""
    from conftest import NEGATIVE, POSITIVE
    import sample
    path = labels_file(tmp_path / "signs.csv", [(t, "-x") for t in POSITIVE] + [(t, "x") for t in NEGATIVE])
    guide.main(["--ckpt", str(ckpt_copy), "--labels", str(path), "--cache-dir", str(tmp_path / "cache")])
    assert "note: give a guide that starts with '-' after '=': sample.py --guide=-x\n" in capsys.readouterr().out
    assert sample.get_args(["--ckpt", str(ckpt_copy), "--guide=-x"]).guide == "-x"


def test_more_than_two_labels_give_one_vs_rest_probes(ckpt_copy, tmp_path):
    from conftest import NEGATIVE, POSITIVE, TOXIC
    rows = [(t, "kind") for t in POSITIVE] + [(t, "sad") for t in NEGATIVE] + [(t, "rude") for t in TOXIC]
    path = tmp_path / "tone.jsonl"
    path.write_text("".join(json.dumps({"sentence": t, "tone": label}) + "\n" for t, label in rows))
    accuracy_ = guide.main(["--ckpt", str(ckpt_copy), "--labels", str(path), "--text-column", "sentence",
                            "--label-column", "tone", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    assert accuracy_ > 0.6  # chance 1/3
    probes, guides = guide.load_probes(ckpt_copy / "probes.safetensors", "minilm")
    assert {guides[k] for k in ("kind", "sad", "rude")} == {("tone-kind", 1), ("tone-sad", 1), ("tone-rude", 1)}


def test_damaged_probes_point_to_a_fix_that_works_and_guide_py_replaces_them(ckpt_copy, tmp_path, capsys):
    """The advice was `retrain with train.py` (a whole run again), and guide.py --labels refused the file too."""
    import sample
    from conftest import cli_error
    probes = ckpt_copy / "probes.safetensors"
    probes.write_bytes(probes.read_bytes()[:300])
    err = cli_error(sample, ["--ckpt", str(ckpt_copy), "--guide", "positive"], capsys)
    assert f"cannot read probes {probes} (" in err
    assert f"`python guide.py --ckpt {ckpt_copy}` with its tier's own" in err
    mood = labels_file(tmp_path / "mood.csv", [(t, "cheerful") for t in POSITIVE] + [(t, "gloomy") for t in NEGATIVE])
    assert guide.main(["--ckpt", str(ckpt_copy), "--cache-dir", str(tmp_path / "cache"), "--labels", str(mood)]) > 0.5
    assert f"note: replacing {probes}: cannot read probes" in capsys.readouterr().out
    assert set(guide.load_probes(probes, "minilm")[1]) == {"cheerful", "gloomy"}


def test_the_runs_own_probes_are_fitted_again_with_an_edited_guide(trained, ckpt_copy, monkeypatch, capsys):
    """An edit of TINY_GUIDES reached a trained run only through a --resume that trained on: a finished run
    refused it. guide.py fits the tier's probes again: the same tensors as the run's, the edited guides."""
    from safetensors.torch import load_file
    from utils import run_cli
    path = ckpt_copy / "probes.safetensors"
    path.unlink()
    monkeypatch.setitem(guide.TINY_GUIDES, "positive", ("sentiment", 1, 0.8))
    report = guide.main(["--ckpt", str(ckpt_copy)])  # --probes tiny, the run's tier; the run's own cache
    assert set(report) == {"sentiment", "sentiment_no_negation", "movie", "tweet"} and report["sentiment"] > 0.8
    before, after = load_file(trained / "out" / "probes.safetensors"), load_file(path)
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert guide.load_probes(path, "minilm")[1]["positive"] == ("sentiment", 1, 0.8)
    assert "held-out accuracy: sentiment" in capsys.readouterr().out
    probes, guides = guide.load_probes(path, "minilm")  # a guide of the user's own: kept, and said to be
    mine = {**probes, "mine": (torch.randn(384), torch.tensor(0.0))}
    guide.save_probes(path, mine, {**guides, "cheery": ("mine", 1)}, "minilm")
    guide.main(["--ckpt", str(ckpt_copy)])
    assert "same-domain; kept: cheery" in capsys.readouterr().out
    assert guide.load_probes(path, "minilm")[1]["cheery"] == ("mine", 1)

    def error(*argv):
        with pytest.raises(SystemExit):
            run_cli(lambda: guide.main(["--ckpt", str(ckpt_copy), "--probes", "tiny", *argv]))
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err

    assert "--max-per-class is for --probes paper" in error("--max-per-class", "5")
    monkeypatch.setattr(data, "load_corpus", lambda *a: [{"text": f"a plain text {i}"} for i in range(50)])
    assert "has no rating and domain in every row" in error()
    monkeypatch.setattr(data, "sha256_of", lambda path: "0" * 64)  # the run's file, edited since
    assert "has changed since the run trained on it" in error()
    assert torch.equal(load_file(path)["sentiment.weight"], before["sentiment.weight"])  # nothing written


def test_labelled_file_errors_are_one_line(ckpt_copy, tmp_path, capsys):
    from conftest import NEGATIVE, POSITIVE
    from utils import run_cli

    def error(*argv):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda: guide.main(["--ckpt", str(ckpt_copy), "--cache-dir", str(tmp_path / "cache"), *argv]))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1, err
        return err

    good = [(t, "cheerful") for t in POSITIVE] + [(t, "gloomy") for t in NEGATIVE]
    few = labels_file(tmp_path / "few.csv", good[:25])
    assert "every label needs at least 10 different texts" in error("--labels", str(few)) and "5 of 'gloomy'" in \
        error("--labels", str(few))
    # the texts' column named as the labels': a line that names the column, not one of every text
    mixed_up = error("--labels", str(labels_file(tmp_path / "texts.csv", good)), "--label-column", "text")
    assert " and 35 more labels; is 'text' the column of labels?" in mixed_up and len(mixed_up) < 500
    assert "a single label ('cheerful')" in error("--labels", str(labels_file(tmp_path / "one.csv", good[:20])))
    # a file named after a probe the tier's guides read would replace that probe under them
    clash = labels_file(tmp_path / "sentiment.csv", [(t, "sunny") for t in POSITIVE] + [(t, "grey") for t in NEGATIVE])
    assert "probe named 'sentiment', which the guide(s) positive use" in error("--labels", str(clash), "--overwrite")
    assert guide.main(["--ckpt", str(ckpt_copy), "--cache-dir", str(tmp_path / "cache"), "--labels", str(clash),
                       "--name", "weather"]) > 0.5
    probes, guides = guide.load_probes(ckpt_copy / "probes.safetensors", "minilm")
    assert guides["positive"][0] == "sentiment" and guides["sunny"] == ("weather", 1)
    taken = labels_file(tmp_path / "taken.csv", [(t, "positive") for t in POSITIVE] + [(t, "meh") for t in NEGATIVE])
    assert "already has a guide named 'positive'; pass --overwrite" in error("--labels", str(taken))
    assert guide.main(["--ckpt", str(ckpt_copy), "--cache-dir", str(tmp_path / "cache"), "--labels", str(taken),
                       "--overwrite"]) > 0.5
    held = labels_file(tmp_path / "held.csv", [(t, "same-domain") for t in POSITIVE] + [(t, "away") for t in NEGATIVE])
    capsys.readouterr()
    assert guide.main(["--ckpt", str(ckpt_copy), "--cache-dir", str(tmp_path / "cache"), "--labels", str(held),
                       "--overwrite"]) > 0.5  # the tiny tier's negative holds same-domain: it changed, unsaid
    assert "note: the guide(s) negative hold same-domain, which now steers as your labels do" in capsys.readouterr().out
    empty = labels_file(tmp_path / "empty.tsv", good[:30] + [("", "cheerful")], sep="\t")
    assert "record 32 has an empty text" in error("--labels", str(empty))
    assert "has no `text` or `label` column" in error("--labels", str(labels_file(tmp_path / "cols.csv", good,
                                                                                 header=("sentence", "tag"))))
    (tmp_path / "bad.jsonl").write_bytes(b"\xff\xfe not utf-8")
    assert "cannot read labels file" in error("--labels", str(tmp_path / "bad.jsonl"))
    assert "does not exist" in error("--labels", str(tmp_path / "missing.csv"))
    assert f"no checkpoint at {tmp_path / 'nowhere' / 'checkpoint.safetensors'}; train one" in \
        error("--labels", str(few), "--ckpt", str(tmp_path / "nowhere"))
    (ckpt_copy / "config.json").write_text("{bad")  # a copy for reading: the checkpoint itself names the encoder
    assert guide.main(["--ckpt", str(ckpt_copy), "--cache-dir", str(tmp_path / "cache"), "--labels", str(taken),
                       "--overwrite"]) > 0.5
    assert "is a folder" in error("--labels", str(tmp_path))
    assert "argument --name: '' names no probe" in error("--labels", str(few), "--name", "")  # took the file's name
    assert "argument --labels: is empty" in error("--labels", "")  # it trained the paper probes instead
    assert "--probes, --max-per-class are for the tier's probes, a run of their own; --labels trains" in \
        error("--labels", str(few), "--probes", "paper", "--max-per-class", "5")  # each was ignored
    assert "cannot name a guide" in error("--labels", str(labels_file(tmp_path / "comma.csv",
                                                                       [(t, "a,b") for t in POSITIVE] + good[20:])))


def test_like_raises_the_cosine_to_the_example_and_unlike_lowers_it(trained):
    from sample import DGLM, SamplingConfig
    model = DGLM(trained / "out", precision="fp32")
    every_step = SamplingConfig(steps=12, scale=50.0, guide_max_logsnr=15.0, mc_samples=8)
    example = "What a wonderful and lovely day, I am so happy."
    prompts = ["the film", "our trip", "a day", "this song"] * 4
    target = model.embed([example])[0]
    cosine = lambda g: (model.sample_proposals(prompts, g, every_step, seed=0) @ target).mean().item()
    base = cosine(None)
    assert cosine(model.guidance("none", every_step, like=[example])) > base + 0.05
    assert cosine(model.guidance("none", every_step, unlike=[example])) < base - 0.05
    both = model.guidance("positive", every_step, like=[example])  # composes with a probe's guide
    assert [t[2] for t in both.terms] == [1, "like"]


def test_a_guides_strength_multiplies_its_weight():
    probes = {n: (torch.randn(8), torch.tensor(0.0))
              for n in ["sentiment", "sentiment_no_negation", "movie", "tweet", "product", "news"]}
    g = build_guidance("positive:2,movie", probes, guide.TINY_GUIDES, torch.zeros(8), torch.ones(8), 1.0,
                       n_samples=0, max_logsnr=15.0)
    assert [t[3] for t in g.terms] == [2 * guide.TINY_GUIDES["positive"][2], 1.0]


def test_a_guide_holds_the_guides_it_names_at_weights_relative_to_its_own(tmp_path):
    probes = {n: (torch.randn(8), torch.tensor(0.0))
              for n in ["sentiment", "sentiment_no_negation", "movie", "tweet", "product", "news"]}
    guides = {"negative": ("sentiment_no_negation", 0, 1.25, "same-domain:0.25"),
              "same-domain": (["movie", "tweet", "product", "news"], "prefix")}
    terms = lambda spec, g=guides: [(t[2], t[3]) for t in guide.probe_terms(spec, probes, g)]
    assert terms("negative") == [(0, 1.25)] + [("prefix", 0.3125)] * 4
    assert terms("negative:2") == [(0, 2.5)] + [("prefix", 0.625)] * 4  # the hold follows the guide's weight
    assert terms("negative+same-domain") == [(0, 1.25)] + [("prefix", 0.3125)] * 4 + [("prefix", 1.0)] * 4
    assert terms("negative:0") == [(0, 0.0)] + [("prefix", 0.0)] * 4
    guide.save_probes(tmp_path / "probes.safetensors", probes, guides, "enc")  # the definition survives the file
    _, loaded = guide.load_probes(tmp_path / "probes.safetensors", "enc")
    assert terms("negative", loaded) == terms("negative")
    del probes["product"], probes["news"]  # a corpus of two domains: the hold uses the two domain probes
    assert terms("negative") == [(0, 1.25)] + [("prefix", 0.3125)] * 2
    del probes["sentiment_no_negation"]
    with pytest.raises(SystemExit, match="guide 'negative' needs the probe 'sentiment_no_negation'"):
        terms("negative")


def test_a_guide_bars_its_words_where_it_steers(tmp_path):
    """The tiny tier's negative guide bars negations from its text; positive, a guide at weight 0 and a held
    guide bar nothing; a guide file of a later version with unknown bars is refused in one line."""
    probes = {n: (torch.randn(8), torch.tensor(0.0))
              for n in ["sentiment", "sentiment_no_negation", "movie", "tweet", "product", "news"]}
    bars = lambda spec, guides=guide.TINY_GUIDES: build_guidance(spec, probes, guides, torch.zeros(8), torch.ones(8),
                                                                 1.0, n_samples=0, max_logsnr=15.0).barred
    negation = guide.WORD_BARS["negation"]
    assert {"not", "no", "never", "'t", "don"} <= negation and not {"can", "won", "nose"} & negation
    assert bars("negative") == bars("negative+tweet") == bars("positive:0,negative:2") == negation
    assert bars("positive") == bars("positive+same-domain") == bars("negative:0,positive") == frozenset()
    guide.save_probes(tmp_path / "probes.safetensors", probes, guide.TINY_GUIDES, "enc")  # kept in the file
    _, loaded = guide.load_probes(tmp_path / "probes.safetensors", "enc")
    assert bars("negative", loaded) == negation
    with pytest.raises(SystemExit, match="guide 'negative' bars the words 'rudeness', which this version does not"):
        bars("negative", {**loaded, "negative": ("sentiment", 0, 1.0, None, "rudeness")})


def test_a_checkpoint_folder_that_refuses_the_probes_is_said_before_the_work(ckpt_copy, tmp_path, monkeypatch):
    """A read-only checkpoint folder: the probes were fitted, then saving them was a SafetensorError traceback.
    (Root writes into a read-only folder, so the refusal is the system's answer, faked here.)"""
    import tempfile

    def refuse(dir=None, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(guide, "EmbeddingCache", lambda *a, **k: pytest.fail("encoded before the check"))
    labels = labels_file(tmp_path / "mood.csv", [("a fine day", "up")] * 10 + [("a dull day", "down")] * 10)
    with pytest.raises(SystemExit, match=f"^error: cannot write probes into {ckpt_copy} \\(Permission denied\\); "
                                         "copy the checkpoint folder somewhere writable"):
        guide.main(["--ckpt", str(ckpt_copy), "--labels", str(labels)])


# ----------------------------------------------------------------------------- spec parsing, probes I/O, a user's labels


def test_parse_guides_reads_spaces_the_weight_range_and_none_alone():
    available = {"positive": ("sentiment", 1), "news": ("news", 1)}
    assert parse_guides(" positive , news:0.5 ", available) == [("positive", 1.0), ("news", 0.5)]
    assert parse_guides("positive+news:0.25", available) == [("positive", 1.0), ("news", 0.25)]
    assert parse_guides("positive:10000", available) == [("positive", 1e4)]  # the top of the range is accepted
    with pytest.raises(SystemExit, match="guide weight '1_0' in 'positive:1_0' is not a number"):
        parse_guides("positive:1_0", available)  # float() reads it as 10
    with pytest.raises(SystemExit, match="none \\(no guidance\\) stands alone"):
        parse_guides("none,positive", available)
    assert guide.guide_names("negative:1+news:0.5, positive") == ["negative", "news", "positive"]


def test_accuracy_reads_logits_at_zero_and_balanced_accuracy_averages_the_classes():
    w, b = torch.tensor([1.0]), torch.tensor(-0.2)
    e = torch.tensor([[-2.0], [0.1], [0.5], [1.0], [3.0]])  # logits -2.2, -0.1, 0.3, 0.8, 2.8
    y = torch.tensor([0.0, 1, 1, 1, 1])  # the 0.3 logit is class 1: the boundary is at logit 0, not 0.5
    assert accuracy(w, b, e, y) == pytest.approx(0.8)
    assert guide.balanced_accuracy(w, b, e, y) == pytest.approx(0.5 * (1.0 + 0.75))
    assert guide.balanced_accuracy(w, b, e, 1 - y) == pytest.approx(0.5 * (0.0 + 0.25))


def test_probes_round_trip_with_dots_in_names_and_refuse_another_encoder(tmp_path):
    path = tmp_path / "probes.safetensors"
    probes = {"mood.v2": (torch.randn(8), torch.tensor(0.5)), "sentiment": (torch.randn(8), torch.tensor(-0.25))}
    guides = {"up": ("mood.v2", 1), "down": ("mood.v2", 0)}
    guide.save_probes(path, probes, guides, "enc")  # --name mood.v2 names the probe as given
    loaded, loaded_guides = guide.load_probes(path, "enc")
    assert set(loaded) == set(probes) and loaded_guides == guides
    for n in probes:
        assert torch.equal(loaded[n][0], probes[n][0]) and torch.equal(loaded[n][1], probes[n][1])
    with pytest.raises(SystemExit, match="trained for encoder 'enc', but the checkpoint uses 'other'"):
        guide.load_probes(path, "other")
    assert guide.guides_on_disk(path, "other") == {} and guide.guides_on_disk(path, "enc") == guides


def test_merge_probes_replaces_probes_and_guides_of_the_same_name_and_keeps_the_rest(tmp_path, capsys):
    path = tmp_path / "probes.safetensors"
    old = {"sentiment": (torch.randn(8), torch.tensor(0.0)), "movie": (torch.randn(8), torch.tensor(0.0))}
    guide.save_probes(path, old, {"positive": ("sentiment", 1), "movie": ("movie", 1)}, "enc")
    new = {"sentiment": (torch.randn(8), torch.tensor(1.0)), "mood": (torch.randn(8), torch.tensor(0.0))}
    guide.merge_probes(path, new, {"positive": ("mood", 1), "gloomy": ("mood", 0)}, "enc")
    assert "the guide positive is replaced by the new one of that name" in capsys.readouterr().out
    probes, guides = guide.load_probes(path, "enc")
    assert guides == {"positive": ("mood", 1), "movie": ("movie", 1), "gloomy": ("mood", 0)}
    assert torch.equal(probes["sentiment"][0], new["sentiment"][0]) and torch.equal(probes["movie"][0], old["movie"][0])
    # another encoder's probes are not kept: their guides would steer this encoder's embeddings at random
    guide.merge_probes(path, {"x": (torch.randn(8), torch.tensor(0.0))}, {"ex": ("x", 1)}, "other")
    assert "note: replacing" in capsys.readouterr().out
    probes, guides = guide.load_probes(path, "other")
    assert set(probes) == {"x"} and guides == {"ex": ("x", 1)}


def _labelled(labels_per_text, n=15, d=6, seed=0):
    """n different texts of each label, their embeddings about one axis per label."""
    gen = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for k, label in enumerate(labels_per_text):
        texts += [f"{label} text {i}" for i in range(n)]
        labels += [label] * n
    axis = {label: k for k, label in enumerate(labels_per_text)}
    e = 0.3 * torch.randn(len(texts), d, generator=gen)
    e[torch.arange(len(texts)), torch.tensor([axis[label] for label in labels])] += 1.0
    return e, texts, labels


def test_label_probes_are_fitted_without_the_held_out_rows_and_scored_on_them():
    e, texts, labels = _labelled(["sad", "kind", "rude"])
    probes, guides, acc, chance = guide.train_label_probes(e, texts, labels, "tone")
    assert guides == {"kind": ("tone-kind", 1), "rude": ("tone-rude", 1), "sad": ("tone-sad", 1)}
    assert chance == pytest.approx(1 / 3) and acc == 1.0  # well apart: every held-out text is named right
    held = guide.held_out(texts, labels)
    assert held.sum() == 9  # the 1st, 6th and 11th of each label
    moved = e.clone()
    moved[held] = torch.randn(int(held.sum()), e.shape[1], generator=torch.Generator().manual_seed(1))
    again, _, acc_moved, _ = guide.train_label_probes(moved, texts, labels, "tone")
    assert all(torch.equal(again[n][0], probes[n][0]) and torch.equal(again[n][1], probes[n][1]) for n in probes)
    assert acc_moved < 1.0  # the held-out rows alone measure it
    e2, texts2, labels2 = _labelled(["zeta", "alpha"])  # the second label in sorted order is class 1
    probes2, guides2, _, chance2 = guide.train_label_probes(e2, texts2, labels2, "mood")
    assert guides2 == {"zeta": ("mood", 1), "alpha": ("mood", 0)} and chance2 == 0.5
    w, b = probes2["mood"]
    assert float(e2[labels2.index("zeta")] @ w + b) > 0 > float(e2[labels2.index("alpha")] @ w + b)


@pytest.mark.parametrize("label", ["a+b", "none", "like"])
def test_a_label_that_cannot_name_a_guide_is_refused(ckpt_copy, tmp_path, label):
    rows = [(t, label) for t in POSITIVE] + [(t, "plain") for t in NEGATIVE]
    with pytest.raises(SystemExit, match=re.escape(f"label {label!r} cannot name a guide")):
        guide.main(["--ckpt", str(ckpt_copy), "--labels", str(labels_file(tmp_path / "odd.csv", rows)),
                    "--cache-dir", str(tmp_path / "cache")])


def test_train_probe_fits_a_boundary_off_the_origin_and_reads_weights_as_relative():
    x = torch.linspace(0.5, 4.0, 20)[:, None]  # every embedding on one side of the origin: only a bias separates
    y = (x[:, 0] > 2.0).float()
    w, b = train_probe(x, y)
    assert accuracy(w, b, x, y) == 1.0 and float(b) < 0
    weights = torch.rand(20, generator=torch.Generator().manual_seed(0)) + 0.5
    for a, c in zip(train_probe(x, y, weights), train_probe(x, y, 10 * weights)):  # only their ratios matter
        torch.testing.assert_close(a, c)
    for a, c in zip(train_probe(x, y), train_probe(x, y, torch.ones(20))):  # no weights: every row alike
        torch.testing.assert_close(a, c)


def test_probe_without_a_direction_keeps_the_sample_weights():
    gen = torch.Generator().manual_seed(0)
    e, y = torch.randn(40, 4, generator=gen), (torch.arange(40) % 2).float()
    e[:, 0] += 2 * y - 1
    d = torch.nn.functional.normalize(torch.tensor([0.0, 1.0, 1.0, 0.0]), dim=0)
    weights = (torch.arange(40) < 20).float()  # rows of weight 0 take no part in the fit
    # the same fit, its sums taken over other rows in another order: equal to about 1e-5 relative, by how
    # wide the CPU's vectors are (ignoring the weights moves every entry by 0.9 or more)
    for a, c in zip(probe_without(e, y, weights, d), probe_without(e[:20], y[:20], None, d)):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


def test_a_label_with_fewer_texts_weighs_as_much_as_the_other():
    """Classes weighted to equal mass: embeddings that show nothing give a probe that leans to neither label
    (unweighted, the 9 / 38 training rows would set its bias near log(9 / 38))."""
    labels = ["rare"] * 12 + ["common"] * 48
    texts = [f"text {i}" for i in range(60)]
    probes, guides, _, _ = guide.train_label_probes(torch.zeros(60, 4), texts, labels, "odds")
    assert guides == {"rare": ("odds", 1), "common": ("odds", 0)} and abs(float(probes["odds"][1])) < 1e-3


def test_labels_that_would_replace_a_probe_another_guide_reads_are_refused(ckpt_copy, tmp_path):
    from conftest import TOXIC
    path = ckpt_copy / "probes.safetensors"
    probes, guides = guide.load_probes(path, "minilm")
    guide.save_probes(path, {**probes, "tone-kind": (torch.randn(384), torch.tensor(0.0))},
                      {**guides, "gentle": ("tone-kind", 1)}, "minilm")
    rows = [(t, "kind") for t in POSITIVE] + [(t, "sad") for t in NEGATIVE] + [(t, "rude") for t in TOXIC]
    with pytest.raises(SystemExit, match=r"probe named 'tone-kind', which the guide\(s\) gentle use"):
        guide.main(["--ckpt", str(ckpt_copy), "--labels", str(labels_file(tmp_path / "tone.csv", rows)),
                    "--cache-dir", str(tmp_path / "cache")])
