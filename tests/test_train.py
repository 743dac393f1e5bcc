import argparse
import json
import random
import shutil

import pytest
import torch

import train
from train import Batches, cosine_lr, fit_length, get_args, parse_count

WORDS = {1: ["great", "lovely", "wonderful", "happy", "excellent"], 0: ["awful", "terrible", "sad", "horrible", "bad"]}


def test_parse_count_accepts_suffixes_and_rejects_junk():
    assert parse_count("100k") == 100_000 and parse_count("2.5M") == 2_500_000 and parse_count("300") == 300
    for bad in ["ten", "1.5", "-3", "0", "5g", ""]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse_count(bad)


def test_malformed_steps_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        get_args(["--steps", "lots"])
    assert exit_info.value.code == 2
    assert "'lots' is not a count (accepted: 300, 20k, 1.5M)" in capsys.readouterr().err


def test_batches_are_deterministic_length_grouped_and_cover_the_epoch():
    lengths = [random.Random(i).randint(1, 60) for i in range(400)]
    b = Batches(lengths, 50, seed=1)
    assert [x.tolist() for x in b.epoch(0)] == [x.tolist() for x in Batches(lengths, 50, seed=1).epoch(0)]
    flat = sorted(i for batch in b.epoch(0) for i in batch.tolist())
    assert flat == list(range(400))
    spread = sum(max(lengths[i] for i in batch) - min(lengths[i] for i in batch) for batch in b.epoch(0)) / 8
    assert spread < 30  # random batches of 50 would span ~55
    assert b.get(8)[0] in b.epoch(1)[0]


def test_cosine_lr_warms_up_and_decays():
    assert cosine_lr(0, 100, 10) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 10) == pytest.approx(1.0)
    assert cosine_lr(100, 100, 10) == pytest.approx(0.1)
    assert cosine_lr(55, 100, 10) < cosine_lr(20, 100, 10)


def test_fit_length_trims_prefix_first():
    assert fit_length([1, 2, 3], [4, 5], 4) == ([2, 3], [4, 5])
    assert fit_length([1, 2], [3, 4, 5, 6, 7], 4) == ([], [3, 4, 5, 6])


@pytest.fixture(scope="module")
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
    args = get_args(["--data", str(corpus), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                     "--batch-size", "16", "--decoder-batch", "8", "--warmup", "2", *extra])
    train.main(args)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    run_train(corpus, tmp, tmp / "out", "--steps", "6", "--save-every", "3")
    return tmp


def test_training_writes_a_self_describing_checkpoint(trained):
    out = trained / "out"
    for name in ["checkpoint.safetensors", "config.json", "tokenizer/tokenizer.json", "probes.safetensors"]:
        assert (out / name).exists(), name
    config, step, _, tensors = train.read_checkpoint(out)
    assert step == 6 and config["encoder"] == "minilm"
    assert "decoder.lm.lm_head.weight" not in tensors  # tied to wte, stored once
    cfg, prior, decoder, tokenizer, mu, s = train.load_for_inference(out)
    torch.testing.assert_close(prior.net.merge.weight, tensors["prior_ema.net.merge.weight"])
    assert decoder.lm.lm_head.weight.data_ptr() == decoder.lm.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(decoder.lm.lm_head.weight, tensors["decoder.lm.transformer.wte.weight"])


def test_resume_matches_an_uninterrupted_run(corpus, trained, tmp_path):
    # the module run saved at step 3 then 6: redo 0..3, then resume 3..6 and compare
    shutil.copytree(trained / "cache", tmp_path / "cache")
    run_train(corpus, tmp_path, tmp_path / "out", "--steps", "6", "--save-every", "3", "--stop-at", "3")
    assert train.read_checkpoint(tmp_path / "out")[1] == 3
    run_train(corpus, tmp_path, tmp_path / "out", "--steps", "6", "--save-every", "3", "--resume")
    _, step, _, resumed = train.read_checkpoint(tmp_path / "out")
    _, _, _, straight = train.read_checkpoint(trained / "out")
    assert step == 6
    for key in straight:
        if key.startswith(("prior.", "decoder.", "opt_")):
            assert torch.equal(resumed[key], straight[key]), key


def test_sample_cli_writes_jsonl_and_steers(trained, tmp_path, capsys):
    import sample
    out_file = tmp_path / "s.jsonl"
    sample.main(sample.get_args(["--ckpt", str(trained / "out"), "--guide", "positive", "--prefix", "the film",
                                 "--n", "3", "--steps", "5", "--out", str(out_file)]))
    rows = [json.loads(l) for l in out_file.read_text().splitlines()]
    assert len(rows) == 3 and all({"prefix", "text", "guide"} <= set(r) for r in rows)
    sample.main(sample.get_args(["--ckpt", str(trained / "out"), "--guide", "negative", "--prefix", "a",
                                 "--n", "1", "--steps", "3"]))
    printed = capsys.readouterr().out
    assert "unguided |" in printed and "negative |" in printed


def test_sample_rejects_bad_input(trained, tmp_path):
    import sample
    with pytest.raises(SystemExit, match="unknown guide 'joyful'.*available:.*positive"):
        sample.main(sample.get_args(["--ckpt", str(trained / "out"), "--guide", "joyful"]))
    with pytest.raises(SystemExit, match="no checkpoint"):
        sample.main(sample.get_args(["--ckpt", str(tmp_path / "nowhere")]))
    broken = tmp_path / "broken"
    shutil.copytree(trained / "out", broken)
    data = (broken / "checkpoint.safetensors").read_bytes()
    (broken / "checkpoint.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match="unreadable or incomplete"):
        sample.main(sample.get_args(["--ckpt", str(broken)]))
    with pytest.raises(SystemExit):
        sample.get_args(["--scale", "big"])
