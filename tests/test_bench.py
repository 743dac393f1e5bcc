"""bench.py: plain decoding against DGLM generation, timed in one process."""
import re

import pytest
import torch

import bench
from test_decoder import tiny_decoder

SAMPLING = dict(top_p=0.9, temperature=1.0, repetition_penalty=1.2)


def test_bench_runs_end_to_end_and_ends_with_the_ratio(trained, capsys):
    ckpt = trained / "out"
    bench.main(bench.get_args(["--ckpt", str(ckpt), "--device", "cpu", "--steps", "3", "--max-tokens", "5",
                               "--batch-sizes", "1,3", "--repeats", "1", "--mc-samples", "4", "--profile"]))
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"ratio guided/plain = \d+\.\d\d", lines[-1]), lines[-1]
    assert "profile of one guided generation, batch 3 (top ops by self_cpu_time_total):" in lines
    assert "batch 3" in lines[-2] and any(l.split("|")[0].strip() == "1" for l in lines)


def test_the_guided_row_decodes_without_the_guides_words_as_sample_py_does(trained, monkeypatch):
    """--guide negative timed its decoding without the negation bars that sample.py decodes with."""
    from sample import DGLM
    seen, decode = [], DGLM.decode
    monkeypatch.setattr(DGLM, "decode", lambda self, *a, barred=frozenset(), **k: seen.append(barred) or
                        decode(self, *a, barred=barred, **k))
    bench.main(bench.get_args(["--ckpt", str(trained / "out"), "--device", "cpu", "--steps", "2", "--max-tokens", "3",
                               "--batch-sizes", "1", "--repeats", "1", "--mc-samples", "2", "--guide", "negative"]))
    assert "not" in set().union(*seen) and frozenset() in seen  # the guided row's bars; the others' none


def test_a_max_tokens_beyond_the_context_is_refused_before_anything_is_printed(trained, capsys):
    with pytest.raises(SystemExit, match="--max-tokens 200 does not fit the decoder's context"):
        bench.main(bench.get_args(["--ckpt", str(trained / "out"), "--device", "cpu", "--max-tokens", "200"]))
    assert capsys.readouterr().out == ""


def test_bench_paper_config_builds_random_models_without_downloads(monkeypatch, capsys):
    """--config paper with the sizes shrunk (the real ones need ~4 GB and minutes on a CPU)."""
    shrink_paper_tier(monkeypatch)
    bench.main(bench.get_args(["--config", "paper", "--device", "cpu", "--steps", "2", "--max-tokens", "3",
                               "--batch-sizes", "2", "--repeats", "1", "--mc-samples", "2"]))
    out = capsys.readouterr().out
    assert "random paper-sized models" in out
    assert re.fullmatch(r"ratio guided/plain = \d+\.\d\d", out.strip().splitlines()[-1])


def test_rows_are_timed_in_turn_so_a_slow_spell_leaves_the_ratio_alone(monkeypatch):
    """The machine runs at half speed for the second half of the time: timed row after row, plain would
    take it all; taken in turn each round, every row shares it and the paired ratio stays 2."""
    clock = {"now": 0.0, "calls": 0}
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["now"])

    def work(seconds):
        def run():
            clock["calls"] += 1
            clock["now"] += seconds * (2 if clock["calls"] > 6 else 1)  # slow from the 7th run on
        return run
    times = bench.timed_rounds({"guided": work(2.0), "plain": work(1.0)}, "cpu", 6)
    assert [len(t) for t in times.values()] == [6, 6]
    assert bench.paired_ratio(times, "guided", "plain") == 2.0
    assert times["plain"] == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]


def test_fixed_length_holds_end_of_text_back_for_every_token_whatever_min_tokens_says():
    dec = tiny_decoder(12)
    eager = dec.lm.get_output_embeddings().register_forward_hook(  # an LM that wants to end at once
        lambda module, inputs, logits: logits.index_add(-1, torch.tensor([dec.eos_id]), torch.full_like(logits[..., :1], 100.0)))
    x, gen = torch.randn(2, 32), lambda: torch.Generator().manual_seed(0)
    assert dec.generate([[1], [2, 3]], x, max_new_tokens=7, generator=gen(), **SAMPLING) == [[], []]
    sampling = bench.fixed_length(bench.get_args(["--max-tokens", "7", "--min-tokens", "2"]))
    assert (sampling.min_tokens, sampling.max_tokens) == (7, 7)
    rows = dec.generate([[1], [2, 3]], x, max_new_tokens=7, min_new_tokens=sampling.min_tokens, generator=gen(), **SAMPLING)
    assert [len(r) for r in rows] == [7, 7]
    assert dec.generate([[1], [2, 3]], x, max_new_tokens=7, generator=gen(), **SAMPLING) == [[], []]  # the default: 0
    eager.remove()


def shrink_paper_tier(monkeypatch):
    monkeypatch.setitem(bench.train.TIERS, "paper", dict(bench.train.TIERS["paper"],
                        prior=dict(n_tokens=4, token_dim=8, width=32, depth=2, heads=2),
                        decoder=dict(n_soft=2, soft_token_dim=8, soft_width=32, soft_depth=1, soft_heads=2)))
    monkeypatch.setattr(bench, "PAPER_DIM", 48)
    monkeypatch.setattr(bench, "PAPER_LM", dict(vocab_size=300, n_layer=1, n_embd=32, n_head=2, n_positions=128))


def test_bench_train_times_both_steps_with_micro_batches_and_reports_mfu(monkeypatch, capsys):
    """--train --config paper on a CPU with the sizes shrunk: the paper batch (256 / 64) in micro-batches."""
    shrink_paper_tier(monkeypatch)
    report = bench.main(bench.get_args(["--train", "--config", "paper", "--device", "cpu", "--repeats", "1",
                                        "--micro-batch", "64", "--decoder-micro-batch", "16", "--peak-tflops", "1"]))
    out = capsys.readouterr().out
    assert "prior step: batch 256 in micro-batches of 64:" in out and "decoder step: batch 64 in micro-batches of 16:" in out
    for name in ("prior", "decoder"):
        assert report[name]["seconds"] > 0 and 0 < report[name]["mfu"] < 1 and report[name]["memory"] is None
    bench.main(bench.get_args(["--train", "--config", "paper", "--device", "cpu", "--repeats", "1",
                               "--micro-batch", "1000", "--decoder-micro-batch", "64"]))
    assert "prior step: batch 256 in micro-batches of 256:" in capsys.readouterr().out  # not of 1000


def test_bench_train_on_a_checkpoint_times_its_runs_batches(trained, capsys):
    """--ckpt timed the tiny tier's default batches (256 / 32), whatever batches its run trained on."""
    bench.main(bench.get_args(["--train", "--ckpt", str(trained / "out"), "--device", "cpu", "--repeats", "1"]))
    out = capsys.readouterr().out
    assert "prior step: batch 16 in micro-batches of 16:" in out
    assert "decoder step: batch 8 in micro-batches of 8:" in out


def test_bench_train_on_a_device_of_unknown_peak_reports_no_mfu(monkeypatch, capsys):
    """A GPU missing from budget.py's table has no peak: the times, and MFU n/a, not a TypeError."""
    shrink_paper_tier(monkeypatch)
    monkeypatch.setattr(bench.budget, "peak_flops", lambda *a: (None, "NVIDIA X not in the table"))
    report = bench.main(bench.get_args(["--train", "--config", "paper", "--device", "cpu", "--repeats", "1",
                                        "--micro-batch", "256", "--decoder-micro-batch", "64"]))
    out = capsys.readouterr().out
    assert "peak unknown, no MFU (pass --peak-tflops) (NVIDIA X not in the table)" in out and "MFU n/a" in out
    assert report["prior"]["seconds"] > 0 and report["prior"]["mfu"] is None


def test_bench_train_compile_compiles_what_train_py_compiles(monkeypatch, capsys):
    """--compile compiles the denoiser and GPT-2's transformer (what the steps call), as train.py does; the
    compiler itself is stubbed (it takes a minute on a CPU)."""
    shrink_paper_tier(monkeypatch)
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    bench.main(bench.get_args(["--train", "--config", "paper", "--device", "cpu", "--repeats", "1", "--compile",
                               "--micro-batch", "256", "--decoder-micro-batch", "64"]))
    assert sorted(compiled) == ["Denoiser", "GPT2Model"] and "torch.compile" in capsys.readouterr().out


def test_bench_embed_times_the_encoder_at_each_batch_and_counts_only_its_linear_layers(tmp_path, capsys):
    """--embed on MiniLM: one row per --batch-sizes value; FLOPs from the 10.8M weights of its linear
    layers (its 22.7M parameters include 11.7M of word embeddings, which do no multiply-adds)."""
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"sentence number {i} about a film that was rather good" for i in range(40)))
    report = bench.main(bench.get_args(["--embed", "--encoder", "minilm", "--texts", str(texts), "--n-texts", "30",
                                        "--batch-sizes", "4,16", "--repeats", "1", "--device", "cpu",
                                        "--peak-tflops", "1", "--profile"]))
    out = capsys.readouterr().out
    assert "30 texts of" in out and "linear layers 10.8M weights" in out
    assert "profile of embedding the 30 texts, batch 16" in out and "aten::addmm" in out
    assert sorted(report) == [4, 16] and all(r["texts_per_s"] > 0 and 0 < r["mfu"] < 1 for r in report.values())
    with pytest.raises(SystemExit, match="^error: --train and --embed"):
        bench.main(bench.get_args(["--train", "--embed"]))


def test_profile_of_the_training_steps_names_their_ops_and_the_share_in_matrix_products(monkeypatch, capsys):
    """--train --profile: a profile of each step after the timing; the share counts mm / addmm / bmm alone."""
    shrink_paper_tier(monkeypatch)
    report = bench.main(bench.get_args(["--train", "--config", "paper", "--device", "cpu", "--repeats", "1",
                                        "--micro-batch", "256", "--decoder-micro-batch", "64", "--profile"]))
    out = capsys.readouterr().out
    assert "profile of one prior step, batch 256" in out and "profile of one decoder step, batch 64" in out
    assert "aten::addmm" in out and all(0 < report[name]["matmul_share"] < 1 for name in ("prior", "decoder"))
    a = torch.randn(256, 256)
    assert bench.print_profile(lambda: [a @ a for _ in range(20)], "cpu", "products") > 0.9
    assert bench.print_profile(lambda: [a.exp() for _ in range(20)], "cpu", "exponentials") == 0


def test_the_ratio_is_the_median_of_the_rounds_ratios_not_their_mean():
    """One slow round of one row must not move the ratio (a mean would read 4.0 here)."""
    times = {"guided": [1.0, 1.0, 10.0], "plain": [1.0, 1.0, 1.0]}
    assert bench.paired_ratio(times, "guided", "plain") == 1.0


def test_each_row_of_a_batch_runs_what_it_names_and_reports_its_own_median(monkeypatch):
    """plain decodes at a = 0 with no prior; unguided samples without guidance; guided with it and its
    word bars; the breakdown's K = 0 row with no Monte Carlo samples; guided/plain is guided's ratio."""
    shrink_paper_tier(monkeypatch)
    model = bench.RandomDGLM()
    row, seen = ["warm-up"], []
    propose, decode = model.sample_proposals, model.decode
    model.sample_proposals = lambda p, g, s, seed: seen.append((row[0], "prior", g)) or propose(p, g, s, seed)
    model.decode = lambda p, e, s, seed, barred: seen.append((row[0], "decode", s.signal_level)) or \
        decode(p, e, s, seed, barred)
    rounds = {"plain": [1.0, 3.0, 2.0], "unguided": [2.0, 6.0, 4.0], "guided": [5.0, 9.0, 6.0]}

    def timed_rounds(runs, device, repeats):  # each run once, then the times above
        for name, fn in runs.items():
            row[0] = name
            fn()
        return {name: rounds.get(name, [1.0, 1.0, 1.0]) for name in runs}
    monkeypatch.setattr(bench, "timed_rounds", timed_rounds)
    args = bench.get_args(["--steps", "2", "--max-tokens", "3", "--mc-samples", "2", "--repeats", "3"])
    t = bench.bench_batch(model, 2, args)
    assert (t["plain"], t["unguided"], t["guided"]) == (2.0, 4.0, 6.0)  # medians, not the fastest round
    assert (t["unguided/plain"], t["guided/plain"]) == (2.0, 3.0)
    runs = {name: [(kind, v) for r, kind, v in seen if r == name] for name in t}
    assert runs["plain"] == [("decode", 0.0)]
    assert [kind for kind, _ in runs["unguided"]] == ["prior", "decode"] and runs["unguided"][0][1] is None
    assert runs["unguided"][1][1] is None and runs["guided"][0][1].n_samples == 2
    assert runs["prior_guided"][0][1] is not None and runs["prior_guided_k0"][0][1].n_samples == 0


def test_bench_refuses_a_guide_that_steers_nothing(monkeypatch, capsys):
    from conftest import cli_error
    shrink_paper_tier(monkeypatch)
    assert "--guide none has nothing to compare" in cli_error(
        bench, ["--config", "paper", "--device", "cpu", "--guide", "none", "--max-tokens", "3"], capsys)


def test_the_defaults_are_those_the_help_names():
    """The docstring's defaults: DDIM 15 steps, 32 tokens, batch 64 for the final ratio; medians of 5 rounds."""
    args = bench.get_args([])
    assert (args.sampler, args.steps, args.max_tokens, args.batch_sizes, args.repeats) == ("ddim", 15, 32, [1, 64], 5)


def test_bench_train_feeds_each_step_its_micro_batches_and_counts_its_flops(monkeypatch, capsys):
    """The decoder step gets its own micro-batches, not the prior's; its FLOPs, MFU and tokens/s are of sequences of
    bos + 88 text tokens + the slots + eos, three times the forward of the whole batch, at --peak-tflops."""
    shrink_paper_tier(monkeypatch)
    made, fed, random_models = [], {}, bench.random_models
    monkeypatch.setattr(bench, "random_models", lambda *a: made.append(random_models(*a)) or made[-1])
    for name in ("prior_step", "decoder_step"):
        step = getattr(bench.train, name)
        monkeypatch.setattr(bench.train, name, lambda *a, step=step, name=name: fed.setdefault(name, a) and step(*a))
    report = bench.main(bench.get_args(["--train", "--config", "paper", "--device", "cpu", "--repeats", "1",
                                        "--micro-batch", "64", "--decoder-micro-batch", "16", "--peak-tflops", "2"]))
    out = capsys.readouterr().out
    _, prior, decoder = made[0]
    assert fed["prior_step"][5] == [slice(i, i + 64) for i in range(0, 256, 64)]
    assert fed["decoder_step"][6] == [slice(i, i + 16) for i in range(0, 64, 16)]
    assert torch.equal(fed["decoder_step"][3], fed["prior_step"][3][:64])  # the first 64 of the prior's latents
    n = 88 + 2 + 2  # the shrunk paper tier's 2 slots
    flops = {"prior": 3 * 256 * prior.flops_per_example(), "decoder": 3 * 64 * decoder.flops_per_sequence(n)}
    for name in ("prior", "decoder"):
        r = report[name]
        assert r["mfu"] == pytest.approx(flops[name] / r["seconds"] / 2e12), name
    assert f"decoder step: batch 64 in micro-batches of 16: {report['decoder']['seconds']:.3f} s, " \
           f"{64 * n / report['decoder']['seconds']:.0f} tokens/s" in out


def test_bench_embed_counts_two_flops_per_linear_weight_and_token_up_to_the_encoders_length(tmp_path, capsys):
    """MiniLM's linear layers: 6 layers of 4 x 384^2 + 2 x 384 x 1536 weights and the 384^2 pooler, 10764288;
    each short text is 12 tokens ([CLS] sentence number N about a film that was rather good [SEP]); a long
    text counts the 256 the encoder reads, not all it has."""
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"sentence number {i} about a film that was rather good" for i in range(40)))
    report = bench.main(bench.get_args(["--embed", "--encoder", "minilm", "--texts", str(texts), "--n-texts", "30",
                                        "--batch-sizes", "8", "--repeats", "1", "--device", "cpu", "--peak-tflops", "1",
                                        "--precision", "fp32"]))
    assert "30 texts of" in (out := capsys.readouterr().out) and "12.0 tokens each on average" in out
    r = report[8]
    assert r["texts_per_s"] == pytest.approx(30 / r["seconds"])
    assert r["mfu"] == pytest.approx(2 * 10_764_288 * 30 * 12 / r["seconds"] / 1e12)
    texts.write_text("\n".join(" ".join(["word"] * 400) for _ in range(4)))
    bench.main(bench.get_args(["--embed", "--encoder", "minilm", "--texts", str(texts), "--n-texts", "4",
                               "--batch-sizes", "4", "--repeats", "1", "--device", "cpu", "--precision", "fp32"]))
    assert "256.0 tokens each on average" in capsys.readouterr().out


def test_bench_embed_loads_the_paper_tiers_encoder_at_the_precision_asked_and_refuses_c4(tmp_path, monkeypatch, capsys):
    from conftest import cli_error
    texts = tmp_path / "texts.txt"
    texts.write_text("a text\nanother one\n")
    loaded = []
    monkeypatch.setattr(bench, "load_encoder", lambda *a: loaded.append(a) or (_ for _ in ()).throw(SystemExit("stop")))
    for precision, dtype in (("bf16", "bf16"), ("fp32", None)):
        with pytest.raises(SystemExit, match="stop"):
            bench.main(bench.get_args(["--embed", "--config", "paper", "--texts", str(texts), "--device", "cpu",
                                       "--precision", precision]))
        assert loaded.pop() == ("sentence-transformers/sentence-t5-xl", "cpu", dtype)
    for where in (["--config", "paper"], ["--ckpt", str(tmp_path / "none")]):  # not "no checkpoint" first
        assert "error: --texts c4 is a stream, not a file to sample" in \
            cli_error(bench, ["--embed", *where, "--texts", "c4"], capsys)
