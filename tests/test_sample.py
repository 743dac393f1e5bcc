"""sample.py: generation from a checkpoint, precision, best-of, seeds, long prompts and bad input."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import sample
from conftest import ROOT, assert_one_line_error, cli_error, run_script
from guide import load_probes, save_probes
from sample import DGLM, SamplingConfig
from utils import CHECKPOINT, Checkpoint

FAST = SamplingConfig(steps=8, max_tokens=6, mc_samples=4)


def test_sample_cli_writes_jsonl_and_prints_unguided_beside_guided(trained, tmp_path, capsys):
    out_file = tmp_path / "s.jsonl"
    sample.main(sample.get_args(["--ckpt", str(trained / "out"), "--guide", "positive", "--prefix", "the film",
                                 "--n", "3", "--steps", "5", "--out", str(out_file)]))
    rows = [json.loads(l) for l in out_file.read_text().splitlines()]
    assert len(rows) == 3 and all({"prefix", "text", "guide", "like", "unlike", "seed"} <= set(r) for r in rows)
    assert {r["batch_size"] for r in rows} == {100}  # with the seed, what draws a row's noise (README)
    assert {r["scale"] for r in rows} == {180.0}
    sample.main(sample.get_args(["--ckpt", str(trained / "out"), "--guide", "none", "--prefix", "the film",
                                 "--n", "1", "--steps", "2", "--max-tokens", "2", "--out", str(out_file)]))
    assert json.loads(out_file.read_text())["scale"] == 0.0  # unguided rows said 180, as if guided
    assert "wrote 1 sample to " in capsys.readouterr().out
    sample.main(sample.get_args(["--ckpt", str(trained / "out"), "--guide", "positive:0", "--prefix", "the film",
                                 "--n", "1", "--steps", "2", "--max-tokens", "2"]))
    printed = capsys.readouterr()  # the unguided row alone, without a word
    assert "unguided |" in printed.out and "positive:0 |" not in printed.out
    assert "note: --guide positive:0 steers nothing (every weight is 0): the samples are unguided" in printed.err
    sample.main(sample.get_args(["--ckpt", str(trained / "out"), "--guide", "negative", "--prefix", "a",
                                 "--n", "1", "--steps", "3"]))
    printed = capsys.readouterr()
    assert "unguided |" in printed.out and "negative |" in printed.out
    assert "samples" not in printed.err  # one batch: no progress bar
    sample.main(sample.get_args(["--ckpt", str(trained / "out"), "--guide", "negative", "--prefix", "a",
                                 "--n", "3", "--steps", "3", "--batch-size", "2"]))
    err = capsys.readouterr().err  # two batches: one bar over the rows, each batch shown beside its unguided twin
    assert "negative: " in err and "2/3" in err and "unguided: " not in err


def ctrl_c_in_decode(call, decode=DGLM.decode):
    """A DGLM.decode that is interrupted (Ctrl-C) in its call-th call, counting from 1."""
    calls = []

    def decode_or_stop(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return decode(self, *args, **kwargs)
    return decode_or_stop


def test_out_is_written_batch_by_batch_so_an_interrupted_run_keeps_what_it_made(trained, tmp_path, monkeypatch):
    prompts, out = tmp_path / "prompts.txt", tmp_path / "s.jsonl"
    prompts.write_text("the film\nour trip\na day\n")
    argv = ["--ckpt", str(trained / "out"), "--prompts", str(prompts), "--n", "2", "--batch-size", "2",
            "--steps", "3", "--max-tokens", "6", "--out", str(out)]
    sample.main(sample.get_args(argv))
    whole = [json.loads(line) for line in out.read_text().splitlines()]
    out.write_text("an earlier run\n")

    monkeypatch.setattr(DGLM, "decode", ctrl_c_in_decode(1))
    with pytest.raises(KeyboardInterrupt):
        sample.main(sample.get_args(argv))
    assert out.read_text() == "an earlier run\n"  # nothing made yet: the earlier file is left as it was
    monkeypatch.setattr(DGLM, "decode", ctrl_c_in_decode(3))  # batch 3 (rows 4-5) interrupted
    with pytest.raises(KeyboardInterrupt):
        sample.main(sample.get_args(argv))
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prefix"] for r in kept] == ["the film", "the film", "our trip", "our trip"]
    assert kept == whole[:4]


def test_rows_are_printed_batch_by_batch_so_an_interrupted_run_shows_what_it_made(trained, capsys, monkeypatch):
    argv = ["--ckpt", str(trained / "out"), "--guide", "negative", "--prefix", "the film", "--n", "3",
            "--batch-size", "2", "--steps", "3", "--max-tokens", "6"]
    sample.main(sample.get_args(argv))
    whole = capsys.readouterr().out.splitlines()
    assert sum("| the film" in line for line in whole) == 6  # three rows, each unguided and guided
    monkeypatch.setattr(DGLM, "decode", ctrl_c_in_decode(3))  # batch 1 guided and unguided done, batch 2 interrupted
    with pytest.raises(KeyboardInterrupt):
        sample.main(sample.get_args(argv))
    kept = capsys.readouterr().out.splitlines()
    assert sum("| the film" in line for line in kept) == 4 and kept == whole[:len(kept)]


def test_the_same_seed_gives_the_same_text_in_one_process_and_across_processes(trained, tmp_path):
    model = DGLM(trained / "out", precision="fp32")
    prompts = ["the film", "our trip", "a day"]
    for guide in (None, "positive"):
        g = model.guidance(guide, FAST)
        first, second = (model.generate(prompts, g, FAST, seed=3) for _ in range(2))
        assert first == second, guide
    out = tmp_path / "s.jsonl"  # another process, the same seed: the same texts as this one
    result = run_script("sample.py", "--ckpt", str(trained / "out"), "--guide", "positive", "--prefix", "the film",
                        "--n", "2", "--steps", "8", "--max-tokens", "6", "--mc-samples", "4", "--seed", "3",
                        "--precision", "fp32", "--out", str(out))
    assert result.returncode == 0, result.stderr[-800:]
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert texts == model.generate(["the film", "the film"], model.guidance("positive", FAST), FAST, seed=3)
    assert texts != model.generate(["the film", "the film"], model.guidance("positive", FAST), FAST, seed=4)


def test_generation_runs_in_batches_each_seeded_by_its_first_row(trained):
    model = DGLM(trained / "out", precision="fp32")
    prompts, g = ["the film", "our trip", "a day", "the food", "it"], model.guidance("positive", FAST)
    batched = model.generate(prompts, g, FAST, seed=3, batch_size=2)  # rows 0-1, 2-3 and 4: seeds 3, 5 and 7
    assert batched == (model.generate(prompts[:2], g, FAST, seed=3) + model.generate(prompts[2:4], g, FAST, seed=5) +
                       model.generate(prompts[4:], g, FAST, seed=7))


def test_a_generations_kinds_of_noise_are_streams_of_their_own(trained, monkeypatch):
    """The guidance's Monte Carlo draws are not rows of the prior's starting noise (one CPU generator seeded
    alike would make them so), and the decoding's noise is not the next seed's starting noise."""
    model = DGLM(trained / "out", precision="fp32")
    drawn, randn = [], torch.randn
    monkeypatch.setattr(torch, "randn", lambda *args, **kwargs: drawn.append(randn(*args, **kwargs)) or drawn[-1])
    prompts = ["the film", "our trip", "a day", "the food"]
    e = model.sample_proposals(prompts, model.guidance("positive", FAST), FAST, seed=3)
    start, *mc = drawn  # z_1 (4, d), then the K = 4 draws of each guided step (4, d)
    assert len(mc) >= 1 and all(not torch.isclose(m[:, None], start[None]).all(-1).any() for m in mc)
    drawn.clear()
    model.decode(prompts, e, FAST, seed=3)
    model.sample_proposals(prompts, None, FAST, seed=4)
    decoding, next_start = drawn
    assert decoding.shape == next_start.shape and not torch.equal(decoding, next_start)


def test_bf16_precision_runs_the_networks_in_bf16_and_agrees_with_fp32(trained):
    bf16, fp32 = DGLM(trained / "out", precision="bf16"), DGLM(trained / "out", precision="fp32")
    seen = []
    for model in (bf16, fp32):
        for net in (model.prior.net.merge, model.decoder.lm.get_output_embeddings()):
            net.register_forward_hook(lambda module, inputs, out: seen.append(out.dtype))
    prefixes = ["the film", "this phone", "the city council", "i think"]
    e16 = bf16.sample_proposals(prefixes, None, FAST, 0)
    assert set(seen) == {torch.bfloat16}
    bf16.decode(prefixes, e16, FAST, 0)
    assert set(seen) == {torch.bfloat16}  # the decoder too
    seen.clear()
    e32 = fp32.sample_proposals(prefixes, None, FAST, 0)
    assert set(seen) == {torch.float32}
    assert e16.dtype == torch.float32 and torch.allclose(e16.norm(dim=-1), torch.ones(4))
    assert (e16 * e32).sum(-1).min() > 0.95  # the same samples up to bf16 rounding
    guided = bf16.sample_proposals(prefixes, bf16.guidance("positive", FAST), FAST, 0)  # backward in bf16
    assert torch.isfinite(guided).all()


def test_the_sampling_options_reach_the_guidance_and_the_decoder(trained, monkeypatch):
    """The guidance is bound to the prefixes' unit embeddings and steers up to guide_max_logsnr; the decoder
    reads the proposals' standardised latents and every decoding option, none left at its default."""
    import guide
    from encoder import standardize
    model = DGLM(trained / "out", precision="fp32")
    options = SamplingConfig(steps=2, scale=50.0, guide_max_logsnr=1.5, mc_samples=2, signal_level=0.6, max_tokens=5,
                             min_tokens=3, top_p=0.8, temperature=0.5, repetition_penalty=1.7)
    bound, fed = [], []
    bind, generate = guide.Guidance.bind, model.decoder.generate
    monkeypatch.setattr(guide.Guidance, "bind", lambda self, e, seed: bound.append(e) or bind(self, e, seed))
    monkeypatch.setattr(model.decoder, "generate", lambda ids, x, **kw: fed.append((x, kw)) or generate(ids, x, **kw))
    prompts = ["the film", "our trip"]
    g = model.guidance("positive", options)
    assert (g.scale, g.max_logsnr, g.n_samples) == (50.0, 1.5, 2)
    e = model.sample_proposals(prompts, g, options, seed=0)
    torch.testing.assert_close(bound[0], model.embed(prompts))  # not their standardised latents
    model.decode(prompts, e, options, seed=0)
    (x, kw), = fed
    torch.testing.assert_close(x, standardize(e, model.mu, model.s))
    assert {k: kw[k] for k in ("a", "max_new_tokens", "min_new_tokens", "top_p", "temperature", "repetition_penalty")} \
        == dict(a=0.6, max_new_tokens=5, min_new_tokens=3, top_p=0.8, temperature=0.5, repetition_penalty=1.7)


def test_best_of_keeps_each_rows_candidate_closest_to_its_proposal(trained):
    model = DGLM(trained / "out", precision="fp32")
    prefixes = ["the film", "this phone", "i think"]
    e = model.sample_proposals(prefixes, None, FAST, 0)
    n = 4
    best = model.decode(prefixes, e, SamplingConfig(max_tokens=6, best_of=n), seed=5)
    # the candidates: the same decode call on the rows repeated n times (candidate k of row b at k * B + b)
    candidates = model.decode(prefixes * n, e.repeat(n, 1), SamplingConfig(max_tokens=6), seed=5)
    cosine = (model.embed(candidates) * e.repeat(n, 1)).sum(-1).view(n, len(prefixes))
    for b, text in enumerate(best):
        row = [candidates[k * len(prefixes) + b] for k in range(n)]
        assert text in row
        assert cosine[row.index(text), b] == cosine[:, b].max()
    assert len(set(candidates)) > len(prefixes)  # the candidates differ, so the choice is not trivial


def test_a_guides_barred_words_are_never_decoded_and_no_word_bars_lets_them_in(trained):
    from collections import Counter
    from dataclasses import replace
    import guide
    model = DGLM(trained / "out", precision="fp32")
    prefixes = ["the film", "this phone", "i think", "our trip"] * 4
    e = model.sample_proposals(prefixes, None, FAST, 0)
    hot = replace(FAST, max_tokens=12, min_tokens=12, temperature=2.0, top_p=1.0)  # a 6-step model: many words
    free = model.decode(prefixes, e, hot, seed=1)
    words = frozenset(w for w, _ in Counter(w.lower() for t in free for w in t.split()[1:]).most_common(3))
    barred = model.decode(prefixes, e, hot, seed=1, barred=words)
    assert not words & {w.lower() for t in barred for w in t.split()[1:]}  # after the first: mid-word tokens differ
    assert model.decode(prefixes, e, replace(hot, word_bars=False), seed=1, barred=words) == free
    negative = model.guidance("negative", FAST)  # the checkpoint's negative guide bars negations ...
    assert negative.barred == guide.WORD_BARS["negation"] and model.guidance("positive", FAST).barred == frozenset()
    passed = []  # ... and its text is decoded without them
    decode = model.decode
    model.decode = lambda *args: passed.append(args[4]) or decode(*args)
    model.generate(prefixes[:2], negative, FAST, seed=0)
    assert passed == [guide.WORD_BARS["negation"]]
    args = sample.get_args(["--no-word-bars"])
    assert sample.sampling_config(args).word_bars is False and SamplingConfig().word_bars is True


def test_prompts_longer_than_the_context_are_cut_and_max_tokens_beyond_it_refused(trained, tmp_path, capsys):
    prompts = tmp_path / "long.txt"
    prompts.write_text(" ".join(["the film was good"] * 200) + "\nshort one\n")
    sample.main(sample.get_args(["--ckpt", str(trained / "out"), "--prompts", str(prompts), "--n", "1",
                                 "--steps", "3", "--guide", "positive"]))
    out = capsys.readouterr()  # the unguided and the guided rows are decoded from the same cut prompts: one warning
    assert out.err.count("warning: prompts longer than 87 tokens are cut to their last 87 tokens") == 1
    assert out.out.count("=== ") == 2 and out.out.count("  positive | ") == 2
    for max_tokens in ("100000", "119"):  # 119 cut every prompt to nothing, and the text read as if it went on
        with pytest.raises(SystemExit, match=rf"--max-tokens {max_tokens} does not fit the decoder's context of 128 "
                                             r"positions \(at most 118 new tokens"):
            sample.main(sample.get_args(["--ckpt", str(trained / "out"), "--max-tokens", max_tokens, "--steps", "2"]))


def test_min_tokens_defaults_to_24_and_shrinks_to_a_smaller_max_tokens():
    config = lambda *argv: sample.sampling_config(sample.get_args(list(argv)))
    assert (config().min_tokens, config().max_tokens) == (24, 32)
    assert config("--max-tokens", "8").min_tokens == 8
    assert config("--min-tokens", "0").min_tokens == 0
    assert config("--min-tokens", "20", "--max-tokens", "20").min_tokens == 20


def test_bad_input_is_one_line_and_exit_code_2(trained, tmp_path, capsys):
    ckpt = ["--ckpt", str(trained / "out")]
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "log.jsonl").write_text('{"step": 1, "prior": 1.1}\n{"step": 2, "prior": 1.0}\n'
                                                     '{"step": 2, "window_seconds": 9.5}\n')  # a C4 window's line
    cases = [
        ([*ckpt, "--guide", "joyful"], "unknown guide 'joyful' (available:"),
        ([*ckpt, "--prefix", "The movie", "--prompts", str(tmp_path / "p.txt")], "--prefix and --prompts: give one"),
        ([*ckpt, "--guide", " "], "argument --guide: is empty"),  # it meant positive
        # evaluate.py's --guides none,positive is two rows; here it was "unknown guide 'none' (available: ..., none)"
        ([*ckpt, "--guide", "none,positive"], "guide 'none,positive': none (no guidance) stands alone"),
        ([*ckpt, "--guide", "positive+like"], "the guide like steers by example: give it --like TEXT"),  # was unguided
        (["--show-steps", "--prompts", "p.txt"], "--show-steps prints one sample's denoising to the screen: give it "
                                                 "--prefix, not --prompts, --out or --n"),  # it showed the first
        (["--show-steps", "--n", "3"], "give it --prefix, not --prompts, --out or --n"),  # it showed one, said nothing
        ([*ckpt, "--guide", "toxic"], f"`python guide.py --ckpt {trained / 'out'} --probes paper` adds them"),
        (["--ckpt", str(tmp_path / "nowhere")], "no checkpoint at"),
        # a run still before its first save (sampled from another terminal): not "train one"
        (["--ckpt", str(tmp_path / "training")], "checkpoint.safetensors yet: the run training into "
                                                 f"{tmp_path / 'training'} has logged 2 steps and saves its first"),
        (["--ckpt", str(trained / "out" / "checkpoint.safetensors")], "is a file; a checkpoint is the folder"),
        (["--scale", "big"], "argument --scale: 'big' is not a number (accepted: [0, 1e+06])"),
        (["--scale", "nan"], "argument --scale: 'nan' is out of range"),
        (["--scale", "inf"], "argument --scale: 'inf' is out of range"),
        (["--scale", "-1"], "argument --scale: '-1' is out of range"),
        (["--steps", "0"], "argument --steps: '0' is out of range (accepted: [1, 10000])"),
        (["--temperature", "-1"], "argument --temperature: '-1' is out of range"),
        (["--top-p", "2"], "argument --top-p: '2' is out of range (accepted: (0, 1])"),
        (["--top-p", "0"], "argument --top-p: '0' is out of range"),
        (["--best-of", "0"], "argument --best-of: '0' is out of range"),
        (["--min-tokens", "-1"], "argument --min-tokens: '-1' is out of range"),
        ([*ckpt, "--min-tokens", "40"], "--min-tokens 40 is more than --max-tokens 32"),
        (["--n", "1e9"], "argument --n: '1e9' is out of range"),
        (["--like", " "], "argument --like: is empty (give a sentence)"),
        (["--unlike", ""], "argument --unlike: is empty"),
        ([*ckpt, "--max-tokens", "100000"], "--max-tokens 100000 does not fit the decoder's context"),
        ([*ckpt, "--prompts", str(tmp_path / "missing.txt")], "prompt file"),
        ([*ckpt, "--prompts", ""], "prompt file '' does not exist"),  # not the demo prompts in its place
        ([*ckpt, "--prompts", str(tmp_path)], "is a folder"),
        ([*ckpt, "--guide", "positive:inf"], "guide weight 'inf' in 'positive:inf' is out of range"),
        (["--out", str(tmp_path / "nowhere" / "samples.jsonl")], "nowhere' does not exist"),  # before sampling
    ]
    for argv, message in cases:
        lines = cli_error(sample, argv, capsys).strip().splitlines()
        assert message in lines[-1] and lines[-1].startswith("error: "), (argv, lines)
    # and as a user runs it: one line, exit code 2, no traceback
    assert_one_line_error(run_script("sample.py", *ckpt, "--max-tokens", "100000", cwd=tmp_path),
                          "--max-tokens 100000 does not fit the decoder's context")


def test_before_the_first_checkpoint_the_error_says_whether_a_run_is_training_there(tmp_path, capsys):
    import subprocess
    import sys
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "prior": 1.1}\n{"step": 2, "prior": 1.0}\n')
    # another process holds out/ as train.py does while it trains there
    trainer = subprocess.Popen([sys.executable, "-c", f"import time, utils; utils.hold({str(out)!r}); print('held', "
                                "flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert trainer.stdout.readline().strip() == "held"
        assert f"yet: the run training into {out} (process {trainer.pid}) has logged 2 steps and saves its first " \
               "checkpoint after --save-every steps (by default 500 on the tiny tier, 2000 on the paper tier); " \
               "wait for it\n" in cli_error(sample, ["--ckpt", str(out)], capsys)
        import train  # the defaults the message names
        assert (train.get_args([]).save_every, train.get_args(["--data", "c4"]).save_every) == (500, 2000)
    finally:
        trainer.kill()
        trainer.wait()
    assert f"no checkpoint at {out / CHECKPOINT}: the run that trained into {out} stopped before its first " \
           "checkpoint (--save-every steps); run its train.py command again" in \
           cli_error(sample, ["--ckpt", str(out)], capsys)


def test_a_missing_corrupt_or_mismatched_checkpoint_and_foreign_probes_are_refused(trained, tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        sample.main(sample.get_args(["--ckpt", str(tmp_path / "nowhere")]))
    broken = tmp_path / "broken"
    shutil.copytree(trained / "out", broken)
    data = (broken / CHECKPOINT).read_bytes()
    (broken / CHECKPOINT).write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match="unreadable or incomplete"):
        sample.main(sample.get_args(["--ckpt", str(broken)]))
    bad = tmp_path / "mismatch"
    shutil.copytree(trained / "out", bad)
    ckpt = Checkpoint(bad)
    config = dict(ckpt.config, prior=dict(ckpt.config["prior"], width=2 * ckpt.config["prior"]["width"]))
    save_file(load_file(str(bad / CHECKPOINT)), str(bad / CHECKPOINT), dict(ckpt.meta, config=json.dumps(config)))
    with pytest.raises(SystemExit, match="does not match its config"):
        sample.main(sample.get_args(["--ckpt", str(bad)]))
    tensors = load_file(str(trained / "out" / CHECKPOINT))  # a tensor short: not random weights in its place
    del tensors["decoder.soft.pos"]
    save_file(tensors, str(bad / CHECKPOINT), Checkpoint(trained / "out").meta)
    with pytest.raises(SystemExit, match=r"does not match its config \(decoder: missing \['soft.pos'\]"):
        sample.main(sample.get_args(["--ckpt", str(bad)]))
    foreign = tmp_path / "foreign"
    shutil.copytree(trained / "out", foreign)
    probes, guides = load_probes(foreign / "probes.safetensors")
    save_probes(foreign / "probes.safetensors", probes, guides, "sentence-transformers/sentence-t5-xl")
    with pytest.raises(SystemExit, match="trained for encoder 'sentence-transformers/sentence-t5-xl'.*uses 'minilm'"):
        sample.main(sample.get_args(["--ckpt", str(foreign)]))
    partial = tmp_path / "partial"  # the checkpoint file copied without the folders beside it
    shutil.copytree(trained / "out", partial)
    shutil.rmtree(partial / "tokenizer")
    with pytest.raises(SystemExit, match="has no tokenizer/ folder .*copy the whole checkpoint folder"):
        sample.main(sample.get_args(["--ckpt", str(partial)]))
    (partial / "tokenizer").mkdir()  # emptied, then a damaged tokenizer.json
    for damage in (lambda: None, lambda: (partial / "tokenizer" / "tokenizer.json").write_text("garbage{")):
        damage()
        with pytest.raises(SystemExit, match="the tokenizer in .*tokenizer is unreadable or incomplete \\(.*Error\\)"):
            sample.main(sample.get_args(["--ckpt", str(partial)]))
    unlabelled = tmp_path / "unlabelled"  # trained on a data file without labels: no probes, so only --like steers
    shutil.copytree(trained / "out", unlabelled)
    (unlabelled / "probes.safetensors").unlink()
    with pytest.raises(SystemExit, match="has no probes.safetensors; add probes with `python guide.py --ckpt .* "
                                         "--labels.*, or sample unguided with --guide none$"):
        sample.main(sample.get_args(["--ckpt", str(unlabelled), "--guide", "positive"]))
    model = DGLM(unlabelled)  # the paper tier: its probes' data sets were out of reach while it trained
    model.config["train"]["tier"] = "paper"
    with pytest.raises(SystemExit, match="add probes with `python guide.py --ckpt .* --probes paper` \\(--probe-data"):
        model.guidance("positive", FAST)


def test_like_and_unlike_from_the_command_line_compose_with_a_guide(trained, capsys):
    ckpt = ["--ckpt", str(trained / "out"), "--prefix", "the film", "--n", "1", "--steps", "4", "--max-tokens", "4"]
    sample.main(sample.get_args([*ckpt, "--like", "What a great day"]))  # no --guide: the example alone
    assert "like 'What a great day' | the film" in capsys.readouterr().out
    sample.main(sample.get_args([*ckpt, "--guide", "positive+like", "--like", "What a great day"]))
    assert "  positive+like 'What a great day' | the film" in capsys.readouterr().out  # not positive+like+like '...'
    sample.main(sample.get_args([*ckpt, "--guide", "negative", "--unlike", "I love it", "--show-steps"]))
    out = capsys.readouterr().out
    assert "[negative+unlike 'I love it'] 'the film': the proposal x_hat while denoising" in out
    assert out.count("  step ") == 2 * 4  # the steps 1, 2, 3 and 4, unguided and guided
    sample.main(sample.get_args([*ckpt, "--guide", "none", "--show-steps"]))
    assert capsys.readouterr().out.count("  step ") == 4  # unguided once (it showed the same steps again under "[]")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bash .ci/gpu runs it)")
def test_guided_sampling_and_evaluation_run_on_cuda(trained, tmp_path):
    """Everything guidance reads (probes, like-examples, mu and s) lives on the sampling device."""
    model = DGLM(trained / "out", device="cuda")
    assert all(w.is_cuda and b.is_cuda for w, b in model.probes.values())
    for spec, like in (("positive", ()), ("negative", ("What a great day",))):  # negative holds the prefix's domain
        assert len(model.generate(["the film", "a day"], model.guidance(spec, FAST, like=like), FAST, seed=0)) == 2
    import evaluate
    (tmp_path / "prompts.txt").write_text("the film was\nour trip\n")
    evaluate.main(evaluate.get_args(["--ckpt", str(trained / "out"), "--prompts", str(tmp_path / "prompts.txt"),
                                     "--guides", "none,positive", "--n", "2", "--steps", "3", "--max-tokens", "6",
                                     "--device", "cuda"]))


def test_a_prompt_file_saved_with_a_byte_order_mark_reads_as_without(tmp_path):
    (tmp_path / "prompts.txt").write_bytes(b"\xef\xbb\xbfThe movie\r\nDinner last night\r\n")  # Notepad's UTF-8
    assert sample.read_prompt_file(tmp_path / "prompts.txt") == ["The movie", "Dinner last night"]


def test_prompt_is_the_prefix_not_an_abbreviation_of_the_prompts_file():
    """argparse took `--prompt "The movie"` for --prompts, a file, and failed on a missing file."""
    assert sample.get_args(["--prompt", "The movie"]).prefix == "The movie"
    assert sample.get_args(["--prompt", "The movie"]).prompts is None


def test_cfg_on_a_prior_without_a_trained_null_prefix_is_refused(trained):
    """--no-null-prefix trains no null prefix: --cfg-scale sampled with the untrained one, without a word."""
    from sample import DGLM, SamplingConfig
    model = DGLM(trained / "out", precision="fp32")
    model.prior.config.p_uncond = 0.0  # as a run with --no-null-prefix has it
    with pytest.raises(SystemExit, match="--cfg-scale 2 needs the learned null prefix"):
        model.sample_proposals(["the film"], None, SamplingConfig(steps=2, cfg_scale=2.0), seed=0)
    assert model.sample_proposals(["the film"], None, SamplingConfig(steps=2), seed=0).shape[0] == 1


def test_the_command_lines_checks_and_defaults(tmp_path):
    """An empty --prefix is a prefix too (refused beside --prompts); --show-steps shows one sample, so --n 2
    and --out are refused with it; --n is 2 by default."""
    for argv in (["--prefix", "", "--prompts", "p.txt"], ["--show-steps", "--n", "2"],
                 ["--show-steps", "--out", str(tmp_path / "s.jsonl")]):
        with pytest.raises(SystemExit) as stop:
            sample.get_args(argv)
        assert stop.value.code == 2, argv
    assert sample.get_args([]).n == 2 and sample.get_args(["--show-steps", "--n", "1"]).n == 1


def test_an_empty_prompt_file_is_refused(trained, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    err = cli_error(sample, ["--ckpt", str(trained / "out"), "--prompts", str(tmp_path / "empty.txt")], capsys)
    assert "is empty (expected one prompt per line)" in err


def test_main_prints_what_it_was_asked_for_and_nothing_more(trained, tmp_path, capsys):
    """--unlike alone steers by the example (no positive guide added); --prefix '' continues the empty
    prompt, not the demo prompts; --guide none has no note; --show-steps and --out print no rows."""
    ckpt = ["--ckpt", str(trained / "out"), "--n", "1", "--steps", "1", "--max-tokens", "2"]
    sample.main(sample.get_args([*ckpt, "--prefix", "the film", "--unlike", "I love it"]))
    out = capsys.readouterr().out
    assert "  unlike 'I love it' | the film" in out and "positive" not in out
    sample.main(sample.get_args([*ckpt, "--prefix", "", "--guide", "none"]))
    printed = capsys.readouterr()
    assert "=== ''" in printed.out and "The movie" not in printed.out and "steers nothing" not in printed.err
    sample.main(sample.get_args([*ckpt, "--prefix", "the film", "--guide", "none", "--show-steps"]))
    assert "unguided |" not in capsys.readouterr().out
    sample.main(sample.get_args([*ckpt, "--prefix", "the film", "--out", str(tmp_path / "s.jsonl")]))
    assert capsys.readouterr().out == f"wrote 1 sample to {tmp_path / 's.jsonl'}\n"


def test_out_records_the_seed_examples_and_batch_size_that_drew_each_row(trained, tmp_path, monkeypatch):
    """The seed, --like / --unlike and --batch-size written are those the rows were generated with."""
    calls, generate = [], DGLM.generate
    monkeypatch.setattr(DGLM, "generate", lambda self, p, g, s, seed, batch_size=100, *a, **k:
                        calls.append((len(p), seed, batch_size)) or generate(self, p, g, s, seed, batch_size, *a, **k))
    out = tmp_path / "s.jsonl"
    sample.main(sample.get_args(["--ckpt", str(trained / "out"), "--prefix", "the film", "--n", "3", "--steps", "1",
                                 "--max-tokens", "2", "--seed", "7", "--batch-size", "2", "--like", "What a great day",
                                 "--unlike", "I hate it", "--out", str(out)]))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert calls == [(3, 7, 2)]
    assert [(r["seed"], r["batch_size"], r["like"], r["unlike"], r["guide"]) for r in rows] == \
        [(7, 2, ["What a great day"], ["I hate it"], "none")] * 3


def test_each_printed_batchs_unguided_twin_has_the_batchs_own_seed(trained, monkeypatch, capsys):
    """The unguided rows beside batch 2 (rows 2-3) are drawn with seed + 2, as generate draws the guided ones."""
    calls, generate = [], DGLM.generate
    monkeypatch.setattr(DGLM, "generate", lambda self, p, g, s, seed, batch_size=100, *a, **k:
                        calls.append((len(p), g is None, seed, batch_size)) or
                        generate(self, p, g, s, seed, batch_size, *a, **k))
    sample.main(sample.get_args(["--ckpt", str(trained / "out"), "--prefix", "the film", "--n", "3", "--steps", "1",
                                 "--max-tokens", "2", "--seed", "5", "--batch-size", "2", "--guide", "positive"]))
    assert calls == [(3, False, 5, 2), (2, True, 5, 2), (1, True, 7, 1)]
    assert capsys.readouterr().out.count("positive | the film") == 3


def test_the_decodings_noise_is_not_the_guidances_monte_carlo_draws(trained, monkeypatch):
    """Each kind of noise takes a seed of its own role: with one role for both, the decoding's noise would be
    the guidance's first Monte Carlo draw."""
    model = DGLM(trained / "out", precision="fp32")
    drawn, randn = [], torch.randn
    monkeypatch.setattr(torch, "randn", lambda *args, **kwargs: drawn.append(randn(*args, **kwargs)) or drawn[-1])
    prompts = ["the film", "our trip", "a day", "the food"]  # 4 rows, K = 4 draws: the same shapes
    e = model.sample_proposals(prompts, model.guidance("positive", FAST), FAST, seed=3)
    start, *mc = drawn
    drawn.clear()
    model.decode(prompts, e, FAST, seed=3)
    assert len(mc) >= 1 and drawn[0].shape == mc[0].shape and not any(torch.equal(drawn[0], m) for m in mc)


def test_threads_sets_torchs_threads_in_sample_and_evaluate(trained, tmp_path, monkeypatch, capsys):
    """--threads N, as train.py's: N CPU threads for the run (0, the default, leaves torch's); a second run
    beside a training on two cores takes one each instead of both fighting for both."""
    import evaluate
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)  # this process's threads stay as they are
    ckpt = ["--ckpt", str(trained / "out")]
    sample.main(sample.get_args([*ckpt, "--prefix", "a", "--n", "1", "--steps", "2", "--max-tokens", "2",
                                 "--threads", "1"]))
    sample.main(sample.get_args([*ckpt, "--prefix", "a", "--n", "1", "--steps", "2", "--max-tokens", "2"]))
    assert threads == [1]
    (tmp_path / "p.txt").write_text("the film\n")
    with pytest.raises(SystemExit, match="unknown guide 'bogus'"):  # the threads are set before anything else
        evaluate.main(evaluate.get_args([*ckpt, "--prompts", str(tmp_path / "p.txt"), "--threads", "1",
                                         "--guides", "none,bogus"]))
    assert threads == [1, 1]
    for script in (sample, evaluate):
        assert "argument --threads: '-1' is out of range" in cli_error(script, ["--threads", "-1"], capsys)
