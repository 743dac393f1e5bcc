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
    # hidden_cond (tiny tier) starts at zero: non-zero only if the decoder's optimiser trains it
    assert config["decoder"]["hidden_cond"] and tensors["decoder.hidden_cond.weight"].abs().sum() > 0


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


def test_bf16_precision_runs_the_networks_in_bf16_and_agrees_with_fp32(trained):
    from sample import DGLM
    bf16, fp32 = DGLM(trained / "out", precision="bf16"), DGLM(trained / "out", precision="fp32")
    seen = []
    for model in (bf16, fp32):
        for net in (model.prior.net.merge, model.decoder.lm.get_output_embeddings()):
            net.register_forward_hook(lambda module, inputs, out: seen.append(out.dtype))
    prefixes = ["the film", "this phone", "the city council", "i think"]
    e16 = bf16.sample_proposals(prefixes, steps=8)
    assert set(seen) == {torch.bfloat16}
    bf16.decode(prefixes, e16, max_new_tokens=3)
    assert set(seen) == {torch.bfloat16}  # the decoder too
    seen.clear()
    e32 = fp32.sample_proposals(prefixes, steps=8)
    assert set(seen) == {torch.float32}
    assert e16.dtype == torch.float32 and torch.allclose(e16.norm(dim=-1), torch.ones(4))
    assert (e16 * e32).sum(-1).min() > 0.95  # the same samples up to bf16 rounding
    guided = bf16.sample_proposals(prefixes, bf16.guidance("positive", 300.0), steps=8)  # backward in bf16
    assert torch.isfinite(guided).all()


def test_best_of_keeps_each_rows_candidate_closest_to_its_proposal(trained):
    from sample import DGLM
    model = DGLM(trained / "out", precision="fp32")
    prefixes = ["the film", "this phone", "i think"]
    e = model.sample_proposals(prefixes, steps=4)
    n = 4
    best = model.decode(prefixes, e, max_new_tokens=6, seed=5, best_of=n)
    # the candidates: the same decode call on the rows repeated n times (candidate k of row b at k * B + b)
    candidates = model.decode(prefixes * n, e.repeat(n, 1), max_new_tokens=6, seed=5)
    cosine = (model.embed(candidates) * e.repeat(n, 1)).sum(-1).view(n, len(prefixes))
    for b, text in enumerate(best):
        row = [candidates[k * len(prefixes) + b] for k in range(n)]
        assert text in row
        assert cosine[row.index(text), b] == cosine[:, b].max()
    assert len(set(candidates)) > len(prefixes)  # the candidates differ, so the choice is not trivial


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


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus, trained, tmp_path, monkeypatch, capsys):
    import diffusion
    shutil.copytree(trained / "cache", tmp_path / "cache")
    real_forward, calls = diffusion.Prior.forward, []

    def poisoned(self, x, prefix, shard=None):
        calls.append(1)
        loss = real_forward(self, x, prefix, shard)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(diffusion.Prior, "forward", poisoned)
    with pytest.raises(SystemExit) as exit_info:
        run_train(corpus, tmp_path, tmp_path / "out", "--steps", "8", "--save-every", "3")
    assert exit_info.value.code == 1
    assert "loss became nan (prior)" in capsys.readouterr().err
    _, step, _, tensors = train.read_checkpoint(tmp_path / "out")
    assert step == 3 and all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


def test_an_existing_checkpoint_is_never_silently_replaced(corpus, trained, tmp_path):
    shutil.copytree(trained / "cache", tmp_path / "cache")
    shutil.copytree(trained / "out", tmp_path / "out")
    before = (tmp_path / "out" / "checkpoint.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="already holds a checkpoint; continue it with --resume"):
        run_train(corpus, tmp_path, tmp_path / "out", "--steps", "2")
    assert (tmp_path / "out" / "checkpoint.safetensors").read_bytes() == before
    run_train(corpus, tmp_path, tmp_path / "out", "--steps", "2", "--overwrite")
    assert train.read_checkpoint(tmp_path / "out")[1] == 2


def test_mismatched_checkpoint_and_foreign_probes_are_refused(trained, tmp_path):
    import sample
    from safetensors.torch import load_file, save_file
    from guide import load_probes, save_probes
    bad = tmp_path / "mismatch"
    shutil.copytree(trained / "out", bad)
    config, step, meta, _ = train.read_checkpoint(bad)
    config["prior"]["width"] *= 2  # the config no longer describes the tensors
    save_file(load_file(str(bad / train.CHECKPOINT)), str(bad / train.CHECKPOINT), dict(meta, config=json.dumps(config)))
    with pytest.raises(SystemExit, match="does not match its config"):
        sample.main(sample.get_args(["--ckpt", str(bad)]))
    foreign = tmp_path / "foreign"
    shutil.copytree(trained / "out", foreign)
    probes, guides = load_probes(foreign / "probes.safetensors")
    save_probes(foreign / "probes.safetensors", probes, guides, "sentence-transformers/sentence-t5-xl")
    with pytest.raises(SystemExit, match="trained for encoder 'sentence-transformers/sentence-t5-xl'.*uses 'minilm'"):
        sample.main(sample.get_args(["--ckpt", str(foreign)]))


def test_prompts_longer_than_the_context_are_cut_with_a_warning(trained, tmp_path, capsys):
    import sample
    prompts = tmp_path / "long.txt"
    prompts.write_text(" ".join(["the film was good"] * 200) + "\nshort one\n")
    out_file = tmp_path / "s.jsonl"
    sample.main(sample.get_args(["--ckpt", str(trained / "out"), "--prompts", str(prompts), "--n", "1",
                                 "--steps", "3", "--out", str(out_file)]))
    assert "warning: prompts longer than" in capsys.readouterr().err
    assert len(out_file.read_text().splitlines()) == 2


def run_script(*argv, cwd=None):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(root / argv[0]), *argv[1:]], capture_output=True, text=True,
                          cwd=cwd, env=dict(__import__("os").environ, HF_HUB_OFFLINE="1"), timeout=300)


def test_bad_input_is_one_line_and_exit_code_2(trained, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases = [
        (["sample.py", "--ckpt", str(trained / "out"), "--guide", "joyful"], "unknown guide 'joyful' (available:"),
        (["sample.py", "--ckpt", str(tmp_path / "nowhere")], "no checkpoint at"),
        (["sample.py", "--scale", "big"], "--scale 'big' is not a number"),
        (["sample.py", "--best-of", "0"], "--n and --best-of must be at least 1"),
        (["train.py", "--steps", "lots"], "'lots' is not a count"),
        (["train.py", "--data", str(empty), "--out", str(tmp_path / "o")], "holds no texts"),
        (["train.py", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")], "does not exist"),
    ]
    for argv, message in cases:
        result = run_script(*argv, cwd=tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (argv, result.stderr[-500:])
        assert len(lines) <= 2 and message in lines[-1] and "Traceback" not in result.stderr, (argv, result.stderr)


def test_offline_hub_ids_fail_in_one_sentence(monkeypatch):
    from decoder import load_tokenizer
    from encoder import load_encoder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match="could not load the sentence encoder 'someone/not-here'.*--encoder"):
        load_encoder("someone/not-here")
    with pytest.raises(SystemExit, match="could not load the tokenizer 'someone/not-here'.*--lm"):
        load_tokenizer("someone/not-here")


# Runs train.py's own CLI in a child process; checkpoint writes go through safetensors' save_file,
# which this wrapper can make hang half-way through the HANG_AT_SAVE-th checkpoint (0: never).
KILLABLE_TRAIN = r"""
import os, sys, time
import safetensors.torch, train
real_save, saves = safetensors.torch.save_file, []
def save_file(tensors, filename, metadata=None):
    if str(filename).endswith("checkpoint.safetensors.tmp"):
        saves.append(filename)
        if len(saves) == int(os.environ["HANG_AT_SAVE"]):
            with open(filename, "wb") as f:
                f.write(b"half a checkpoint")
            print("HANGING IN SAVE", flush=True)
            time.sleep(600)
    return real_save(tensors, filename, metadata=metadata)
safetensors.torch.save_file = save_file
train.run_cli(lambda: train.main(train.get_args()))
"""


def start_killable(argv, hang_at_save, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = dict(os.environ, HANG_AT_SAVE=str(hang_at_save), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.Popen([sys.executable, "-u", "-c", KILLABLE_TRAIN, *argv], stdout=subprocess.PIPE,
                            stderr=open(tmp_path / "stderr.txt", "a"), text=True, env=env)


def kill_when(proc, marker):
    """SIGKILL the child as soon as a stdout line contains `marker`; returns the lines seen."""
    import signal
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            return lines
    raise AssertionError(f"the run ended before {marker!r}: {''.join(lines)[-800:]}")


def test_sigkill_mid_save_and_mid_run_loses_at_most_one_interval(corpus, trained, tmp_path):
    shutil.copytree(trained / "cache", tmp_path / "cache")
    out = tmp_path / "out"
    argv = ["--data", str(corpus), "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--batch-size", "16",
            "--decoder-batch", "8", "--warmup", "2", "--steps", "60", "--save-every", "10"]
    # 1. killed while writing the checkpoint of step 20: the one of step 10 is intact
    kill_when(start_killable(argv, 2, tmp_path), "HANGING IN SAVE")
    _, step, _, tensors = train.read_checkpoint(out)
    assert step == 10 and tensors["prior.net.merge.weight"].isfinite().all()
    # 2. resumed, then killed between saves right after the one of step 30 was announced
    lines = kill_when(start_killable([*argv, "--resume"], 0, tmp_path), "step 30:")
    assert any("resumed from" in l and "at step 10" in l for l in lines)
    step = train.read_checkpoint(out)[1]
    assert step >= 30 and step % 10 == 0
    # 3. resumed to the end: bit-for-bit the weights of an uninterrupted run
    run_train(corpus, tmp_path, out, "--steps", "60", "--save-every", "10", "--resume")
    run_train(corpus, tmp_path, tmp_path / "straight", "--steps", "60", "--save-every", "10")
    _, step, _, resumed = train.read_checkpoint(out)
    _, _, _, straight = train.read_checkpoint(tmp_path / "straight")
    assert step == 60
    for key in straight:
        if key.startswith(("prior.", "prior_ema.", "decoder.", "opt_")):
            assert torch.equal(resumed[key], straight[key]), key


def test_two_process_torchrun_matches_one_process(corpus, trained, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    shutil.copytree(trained / "cache", tmp_path / "cache")
    common = ["--data", str(corpus), "--cache-dir", str(tmp_path / "cache"), "--batch-size", "16",
              "--decoder-batch", "8", "--warmup", "2", "--steps", "4", "--save-every", "100", "--device", "cpu"]
    run_train(corpus, tmp_path, tmp_path / "one", "--steps", "4", "--save-every", "100")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(29500 + os.getpid() % 1000), str(root / "train.py"), *common,
                             "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "device cpu x 2" in result.stdout
    one = [json.loads(l) for l in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    two = [json.loads(l) for l in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert a["prior"] == pytest.approx(b["prior"], rel=1e-4) and a["decoder"] == pytest.approx(b["decoder"], rel=1e-4)
    _, _, _, w1 = train.read_checkpoint(tmp_path / "one")
    _, _, _, w2 = train.read_checkpoint(tmp_path / "two")
    for key in ["prior.net.merge.weight", "decoder.soft.out.weight", "decoder.lm.transformer.h.0.attn.c_attn.weight"]:
        torch.testing.assert_close(w1[key], w2[key], atol=1e-5, rtol=1e-4)


def test_paper_tier_configs_build_the_published_sizes(capsys):
    sizes = train.model_sizes("paper", 768)
    assert 115e6 < sizes["prior"] < 125e6           # DGLM: ~120M
    assert 50e6 < sizes["soft_prompt"] < 60e6       # DGLM: ~54M at width 768
    train.main(get_args(["--tier", "paper", "--sizes"]))
    assert "paper: prior 119.3M params" in capsys.readouterr().out
