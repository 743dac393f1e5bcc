"""train.py: the tiers and flags, the schedule, the two steps (micro-batches, torchrun), the
self-describing checkpoint, resume after a kill, C4 windows with flat memory, probes as part of the run."""
import gzip
import json
import random
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import batches
import train
from conftest import ROOT, UNREACHABLE_HUB, assert_one_line_error, cli_error, document, run_script, run_train
from diffusion import Prior, PriorConfig
from guide import load_probes
from train import cosine_lr, get_args
from utils import CHECKPOINT, Checkpoint, load_for_inference


def tensors_of(out):
    return load_file(str(out / "checkpoint.safetensors"))


def assert_same_weights(a, b, prefixes=("prior.", "prior_ema.", "decoder.", "opt_")):
    for key in b:
        if key.startswith(prefixes):
            assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- config and data


def test_the_tier_follows_the_data_and_the_help_shows_its_defaults(capsys):
    tiny, paper = get_args([]), get_args(["--data", "c4"])
    assert (tiny.tier, tiny.lm, tiny.encoder, tiny.decoder_batch, tiny.decoder_lr) == ("tiny", "tiny", "minilm", 32, 3e-3)
    assert (paper.tier, paper.lm, paper.encoder) == ("paper", "gpt2-large", "sentence-transformers/sentence-t5-xl")
    assert (paper.decoder_batch, paper.decoder_lr, paper.max_len, paper.batch_size) == (64, 5e-6, 128, 256)
    assert get_args(["--data", "c4", "--lm", "gpt2"]).tier == "paper"
    assert get_args(["--data", "c4", "--tier", "tiny", "--lm", "gpt2"]).decoder_batch == 32
    assert get_args(["--data", "c4", "--decoder-batch", "16"]).decoder_batch == 16  # a flag beats the tier
    with pytest.raises(SystemExit):
        get_args(["--data", "c4", "--help"])
    assert "(default 64)" in capsys.readouterr().out


def test_configs_have_one_source_the_dataclasses_are_the_tiny_tier():
    args = get_args([])
    prior, decoder = train.model_configs(args, 384)
    assert prior == PriorConfig() and decoder.n_embd == 192 and decoder.hidden_cond
    paper_prior, paper_decoder = train.model_configs(get_args(["--data", "c4"]), 768)
    assert (paper_prior.width, paper_prior.depth, paper_prior.n_tokens) == (768, 12, 32)
    assert not paper_decoder.hidden_cond and paper_decoder.soft_width == 768
    switched = train.model_configs(get_args(["--no-noise-augmentation", "--no-loss-weight", "--no-adaptive-noise",
                                             "--no-null-prefix"]), 384)
    assert (switched[0].loss_weight, switched[0].adaptive_noise, switched[0].p_uncond) == (False, False, 0.0)
    assert (switched[1].noise_augmentation, switched[1].inference_a) == (False, 1.0)


def test_bad_training_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    few = tmp_path / "few.txt"
    few.write_text("".join(f"text number {i} is here\n" for i in range(30)))
    out = ["--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "cache")]
    cases = [
        (["--steps", "lots"], "'lots' is not a count"),
        (["--steps", "0"], "must be a positive whole number"),
        (["--prior-lr", "nan"], "out of range"),
        (["--ema", "1"], "out of range (accepted: [0, 1))"),
        (["--batch-size", "-4"], "is not a count"),
        (["--sizes", "--gpu-memory", "24,lots"], "argument --gpu-memory: 'lots' is not a number"),
        (["--gpu-memory", "1.3", *out], "--gpu-memory plans for GPUs with --sizes"),  # it set a CPU run's micro-batches
        (["--data", str(empty), *out], "holds no texts"),
        (["--data", str(tmp_path / "missing.txt"), *out], "does not exist"),
        (["--data", str(tmp_path), *out], "is a folder"),
        (["--cache-dir", str(empty)], f"argument --cache-dir: '{empty}' is a file (give a folder)"),
        (["--out", ""], "argument --out: is empty (give a folder; . names this one)"),  # was the working folder
        (["--data", str(few), *out], "--batch-size 256 is more than the"),  # each batch would be the whole file
        (["--decoder-batch", "64", "--batch-size", "32", *out], "larger than --batch-size"),
        (["--data", "c4", "--lm", "tiny", *out], "use the paper tier"),
        # a local path that is not there is named so, not as a failed download
        (["--lm", str(tmp_path / "gpt2"), *out], f"--lm {tmp_path / 'gpt2'}: no such folder"),
        (["--encoder", "./st5", *out], "--encoder ./st5: no such folder"),
        (["--data", "c4", "--c4-path", str(tmp_path / "c4"), *out], f"no C4 files at {tmp_path / 'c4'}"),
        # a warning after the first window was embedded (minutes at 200k examples)
        (["--data", "c4", "--probe-data", str(tmp_path / "probes"), *out],
         f"--probe-data {tmp_path / 'probes'}: no such"),
        (["--lm", "someone/gpt2", *out], "could not download someone/gpt2 (--lm); without internet pass local "
                                         "copies with the flags named, or leave them at the tiny tier's"),
    ]
    for argv, message in cases:
        lines = cli_error(train, argv, capsys).strip().splitlines()
        assert message in lines[-1] and lines[-1].startswith("error: "), (argv, lines)
    # and as a user runs it: one line, exit code 2, no traceback
    assert_one_line_error(run_script("train.py", "--steps", "lots", cwd=tmp_path), "'lots' is not a count")


def test_a_data_file_that_is_not_there_empty_or_unreadable_is_named_before_anything_is_printed(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
    for path, why in ((tmp_path / "missing.txt", "data file .* does not exist"), (tmp_path, "data file .* is a folder"),
                      (tmp_path / "empty.txt", ".*empty.txt holds no texts"), (tmp_path / "bad.jsonl", "cannot read")):
        capsys.readouterr()
        with pytest.raises(SystemExit, match=f"^error: {why}"):
            train.main(get_args(["--data", str(path), "--out", str(tmp_path / "o")]))
        assert capsys.readouterr().out == ""  # not the run's description first


def test_a_rating_field_of_the_users_own_is_not_taken_for_the_tiny_corpus(tmp_path, capsys):
    """A .jsonl with a "rating" but not the tiny corpus's domains was a KeyError (no domain), a TypeError (a
    string rating), or tiny-tier guides over probes of one class whose negative guide could not run."""
    from types import SimpleNamespace
    import data
    tiny = [{"text": "a", "rating": 2.0, "domain": "movie"}, {"text": "b", "rating": -1, "domain": "news"}]
    assert data.tiny_format(tiny)
    for rows in ([{"text": "a", "rating": 5}], [dict(r, rating="5") for r in tiny],
                 [dict(r, domain="shop") for r in tiny], [dict(r, rating=True) for r in tiny], []):
        assert not data.tiny_format(rows)
        args = SimpleNamespace(data="mine.jsonl", tier="tiny", encoder="minilm")
        window = SimpleNamespace(examples=rows, held_out=rows)
        assert train.train_probes(args, window, tmp_path, cache=None) is None
        assert "no probes: train.py fits them on the tiny corpus's ratings alone" in capsys.readouterr().out
    assert not (tmp_path / "probes.safetensors").exists()
    c4 = SimpleNamespace(data="c4", tier="tiny", encoder="minilm")  # C4 has no label column to suggest
    assert train.train_probes(c4, SimpleNamespace(examples=[], held_out=[]), tmp_path, cache=None) is None
    assert "(a text and a label a row), or steer" in capsys.readouterr().out


def test_a_model_folder_is_kept_by_its_absolute_path(tmp_path, monkeypatch, capsys):
    """`--encoder enc` was kept as typed: sample.py run from another folder loaded another `enc`, or none."""
    for folder in ("enc", "lm", "minilm"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path)
    args = get_args(["--encoder", "enc", "--lm", "lm"])
    assert (args.encoder, args.lm) == (str(tmp_path / "enc"), str(tmp_path / "lm"))
    assert train.train_settings(args)["encoder"] == str(tmp_path / "enc")
    args = get_args(["--encoder", "someone/st5", "--lm", "gpt2"])  # hub ids stay ids; minilm is the shipped model
    assert (args.encoder, args.lm, get_args([]).encoder) == ("someone/st5", "gpt2", "minilm")
    for flag in ("--encoder", "--lm"):  # "could not download  (--encoder)"
        with pytest.raises(SystemExit):
            get_args([flag, " "])
        assert f"argument {flag}: is empty" in capsys.readouterr().err


def test_a_folder_that_holds_no_language_model_is_named_before_any_work(tmp_path, capsys):
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "notes.csv").write_text("a,b\n")
    err = cli_error(train, ["--lm", str(tmp_path / "lm"), "--out", str(tmp_path / "out")], capsys)
    assert err.startswith(f"error: the folder {tmp_path / 'lm'} holds no GPT-2 model that loads (")


def test_offline_the_paper_tier_names_every_download_it_could_not_make(tmp_path):
    result = run_script("train.py", "--data", "c4", "--steps", "100k", "--out", str(tmp_path / "o"), cwd=tmp_path,
                        env={"DGLM_C4_PATH": ""})
    assert_one_line_error(result, "error: the paper tier could not download gpt2-large (--lm), "
                                  "sentence-transformers/sentence-t5-xl (--encoder), allenai/c4 (--c4-path)")


def test_offline_without_hf_hub_offline_the_paper_tier_fails_at_once_and_quietly(tmp_path):
    """A user offline seldom sets HF_HUB_OFFLINE: the hub is asked once, then the libraries go offline (else
    huggingface_hub retries each download with backoff, printing six warnings a file before the one line)."""
    result = run_script("train.py", "--data", "c4", "--steps", "100k", "--out", str(tmp_path / "o"), cwd=tmp_path,
                        env={"DGLM_C4_PATH": "", **UNREACHABLE_HUB})
    assert "Retrying" not in result.stdout + result.stderr
    assert_one_line_error(result, "error: the paper tier could not download gpt2-large (--lm), "
                                  "sentence-transformers/sentence-t5-xl (--encoder), allenai/c4 (--c4-path)")


def test_the_paper_tier_stops_before_its_downloads_when_pytorch_sees_no_gpu(corpus, tmp_path, monkeypatch):
    """--device auto on a machine whose PyTorch sees no GPU (a CPU build of torch, or a driver too old for its
    CUDA build): one line naming the cause, nothing written; --device cpu and the tiny tier go on."""
    from transformers import GPT2Config
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")  # local folders: the preflight
    (tmp_path / "st5").mkdir()                                                    # downloads nothing
    result = run_script("train.py", "--tier", "paper", "--data", str(corpus), "--lm", str(tmp_path / "gpt2"),
                        "--encoder", str(tmp_path / "st5"), "--out", str(tmp_path / "o"), cwd=tmp_path,
                        env={"CUDA_VISIBLE_DEVICES": ""})
    assert_one_line_error(result, f"error: the paper tier trains on a CUDA GPU and this PyTorch sees none (torch "
                                  f"{torch.__version__} is ")
    assert not (tmp_path / "o").exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for cuda, why in ((None, "is a CPU build; install a CUDA build from pytorch.org)"),
                      ("13.0", "is built for CUDA 13.0 and finds no GPU; check the driver with nvidia-smi)")):
        monkeypatch.setattr(torch.version, "cuda", cuda)
        with pytest.raises(SystemExit) as stop:
            train.check_gpu(get_args(["--data", "c4"]))
        assert f"sees none (torch {torch.__version__} {why}; --device cpu trains there anyway" in str(stop.value)
    for argv in (["--data", "c4", "--device", "cpu"], []):
        assert train.check_gpu(get_args(argv)) is None


def test_sizes_and_the_memory_plan_for_gpus_of_24_40_and_80_gb(capsys):
    train.main(get_args(["--data", "c4", "--sizes", "--gpu-memory", "24,40,80"]))
    out = capsys.readouterr().out
    assert "tier paper | encoder sentence-transformers/sentence-t5-xl (1240.0M) | language model gpt2-large (774.0M)" \
           " | prior 119.3M | soft prompt 57.2M" in out
    # gpt2-large's 98-token sequences, 64 a step, against sentence-T5 XL over the 256 new texts of 88 tokens
    assert "decoder 2.9e+13), and 5.6e+13 to embed its 256 new C4 examples" in out
    train.main(get_args(["--data", "c4", "--sizes", "--steps", "100k", "--peak-tflops", "989"]))
    assert "at 40% MFU about 2.4 h of training steps and 3.9 h of embedding, in the background" in capsys.readouterr().out
    plans = [line for line in out.splitlines() if line.startswith("GPU ")]
    assert [p.split(":")[0] for p in plans] == ["GPU 24 GiB", "GPU 40 GiB", "GPU 80 GiB"]
    micro = [int(p.split("decoder ")[1].split(" of")[0]) for p in plans]
    assert micro == sorted(micro) and micro[-1] == 64 and micro[0] < 64  # more memory, larger micro-batches
    with pytest.raises(SystemExit, match="does not fit in 8 GiB of GPU memory even at micro-batch 1"):
        train.main(get_args(["--data", "c4", "--sizes", "--gpu-memory", "8"]))
    train.main(get_args(["--data", "c4", "--sizes", "--gpu-memory", "8,24.5"]))  # stopped at 8 before 24.5's plan
    out = capsys.readouterr().out
    assert "GPU 8 GiB: training does not fit" in out and "GPU 24.5 GiB: micro-batches prior" in out
    # micro-batches given are estimated as given (the plan ignored them), with a note where they overflow
    train.main(get_args(["--data", "c4", "--sizes", "--gpu-memory", "24,80", "--micro-batch", "8",
                         "--decoder-micro-batch", "64"]))
    out = capsys.readouterr().out
    assert "GPU 24 GiB: micro-batches prior 8 of 256, decoder 64 of 64 per process (as given: more than the 90% " \
           "of the GPU planned for" in out and "GPU 80 GiB: micro-batches prior 8 of 256, decoder 64 of 64 per " \
           "process; estimate" in out


def test_cosine_lr_warms_up_and_decays():
    assert cosine_lr(0, 100, 10) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 10) == pytest.approx(1.0)
    assert cosine_lr(10, 100, 10) == pytest.approx(1.0)  # the decay's first step is the peak, not past it
    assert cosine_lr(100, 100, 10) == pytest.approx(0.1)
    assert cosine_lr(55, 100, 10) < cosine_lr(20, 100, 10)


# ----------------------------------------------------------------------------- the two steps


def test_micro_batches_split_each_process_rows():
    assert train.micro_batches(8, 0, 1, 8) == [slice(0, 8)]
    assert train.micro_batches(8, 0, 1, 3) == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert train.micro_batches(8, 1, 2, 2) == [slice(4, 6), slice(6, 8)]


def test_k_accumulated_micro_batches_give_the_update_of_the_whole_batch():
    """prior_step and decoder_step with 4 micro-batches against 1: the same losses, weights and
    importance-sampler state after an optimiser step (the batch's noise is drawn once for all parts)."""
    from test_decoder import tiny_decoder
    torch.manual_seed(0)
    prior = Prior(PriorConfig(dim=16, n_tokens=4, token_dim=8, width=32, depth=2, heads=2))
    decoder = tiny_decoder(40, dim=16).train()
    x, x_prefix = torch.randn(8, 16), torch.randn(8, 16)
    prefix_ids = [[1, 2], [], [3], [4, 5, 6], [7], [8, 9], [], [10]]
    cont_ids = [[11, 12, 13], [14], [15, 16], [17], [18, 19, 20, 21], [22], [23, 24], [25, 26]]
    amp = lambda: torch.autocast("cpu", enabled=False)
    results = []
    for micro in (8, 2):
        p = Prior(prior.config)
        p.load_state_dict(prior.state_dict())
        d = tiny_decoder(40, dim=16).train()
        d.load_state_dict(decoder.state_dict())
        # SGD: the update is proportional to the gradient (Adam's first step, g / |g|, would amplify rounding)
        opt_p, opt_d = torch.optim.SGD(p.parameters(), lr=0.1), torch.optim.SGD(d.parameters(), lr=0.1)
        torch.manual_seed(1)
        rows = train.micro_batches(8, 0, 1, micro)
        lp = train.prior_step(p, p, opt_p, x, x_prefix, rows, 1, amp)
        ld = train.decoder_step(d, d, opt_d, x, prefix_ids, cont_ids, rows, 1, amp)
        results.append((lp, ld, p.state_dict(), d.state_dict()))
    (lp1, ld1, p1, d1), (lp4, ld4, p4, d4) = results
    torch.testing.assert_close(lp1, lp4)
    torch.testing.assert_close(ld1, ld4)
    for one, four in ((p1, p4), (d1, d4)):
        for key in one:
            torch.testing.assert_close(one[key], four[key], atol=1e-6, rtol=1e-5, msg=key)
    assert not torch.equal(p1["net.merge.weight"], prior.state_dict()["net.merge.weight"])  # a step was taken
    assert not torch.equal(p1["noise_levels.bin_loss"], torch.ones(100, dtype=torch.float64))  # the sampler learned


def test_the_decoder_steps_loss_is_its_mean_over_every_scored_token_eos_included():
    from test_decoder import tiny_decoder
    torch.manual_seed(0)
    decoder = tiny_decoder(40, dim=16).train()
    x, prefix_ids, cont_ids = torch.randn(3, 16), [[1, 2], [], [3]], [[11, 12, 13], [14], [15, 16]]
    amp = lambda: torch.autocast("cpu", enabled=False)
    torch.manual_seed(1)
    loss = train.decoder_step(decoder, decoder, torch.optim.SGD(decoder.parameters(), lr=0.0), x, prefix_ids,
                              cont_ids, [slice(0, 3)], 1, amp)
    torch.manual_seed(1)  # the same noise and dropout: the decoder's own mean (n_tokens left to it)
    torch.testing.assert_close(loss, decoder(prefix_ids, cont_ids, x))


def test_each_step_trains_the_prior_then_the_decoder_on_the_same_latents(corpus, trained, tmp_path, monkeypatch):
    """The loop's plumbing: the prior learns continuation given prefix, the decoder the first rows of
    the same standardised continuations, and the EMA follows the prior with its warm-up decay."""
    calls = {"batch": [], "prior": [], "decoder": [], "ema": []}

    def spy(name, fn, keep):
        def wrapped(*args):
            calls[name].append(keep(*args))
            return fn(*args)
        return wrapped

    monkeypatch.setattr(batches.Corpus, "batch",
                        spy("batch", batches.Corpus.batch, lambda self, step: self.window.batch(step)))
    monkeypatch.setattr(train, "prior_step",
                        spy("prior", train.prior_step, lambda p, r, o, x, x_prefix, *_: (x, x_prefix)))
    monkeypatch.setattr(train, "decoder_step",
                        spy("decoder", train.decoder_step, lambda d, r, o, x, p_ids, c_ids, *_: (x, c_ids)))
    monkeypatch.setattr(train, "ema_update", spy("ema", train.ema_update, lambda ema, prior, decay: decay))
    shutil.copytree(trained / "cache", tmp_path / "cache")
    run_train(corpus, tmp_path, tmp_path / "out", "--steps", "2")
    mu, s = load_for_inference(tmp_path / "out")[-2:]
    assert len(calls["batch"]) == len(calls["prior"]) == len(calls["decoder"]) == 2
    for (e_prefix, e_cont, _, cont_ids), (x, x_prefix), (x_dec, cont_dec) in zip(calls["batch"], calls["prior"],
                                                                                 calls["decoder"]):
        torch.testing.assert_close(x, (e_cont - mu) / s)
        torch.testing.assert_close(x_prefix, (e_prefix - mu) / s)
        torch.testing.assert_close(x_dec, x[:8])  # --decoder-batch 8
        assert cont_dec == cont_ids[:8]
    assert calls["ema"] == pytest.approx([1 / 10, 2 / 11])  # min(--ema, (1 + step) / (10 + step))


def test_under_torchrun_each_process_draws_its_own_dropout_and_the_shared_noise():
    """Every process seeds the shared stream alike (the batch's noise is drawn alike everywhere); the
    decoder's dropout draws from each process's own stream, seeded by (seed, rank, step), and leaves the
    shared stream where the noise left it. One process draws everything from the shared stream."""
    from decoder import Decoder, DecoderConfig
    config = DecoderConfig(dim=16, n_soft=3, soft_token_dim=8, soft_width=32, soft_depth=1, soft_heads=2)
    lm = dict(vocab_size=30, n_layer=1, n_embd=32, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0,
              resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)
    torch.manual_seed(0)
    decoder = Decoder(config, lm, bos_id=0, eos_id=0).train()
    x, prefix_ids, cont_ids = torch.randn(2, 16), [[1, 2], [3]], [[4, 5, 6], [7, 8]]
    dist = train.Distributed("cpu")
    amp = lambda: torch.autocast("cpu", enabled=False)

    def step(world, rank, step):
        dist.world, dist.rank = world, rank
        torch.manual_seed(1)
        loss = train.decoder_step(decoder, decoder, torch.optim.SGD(decoder.parameters(), lr=0.0), x, prefix_ids,
                                  cont_ids, [slice(0, 2)], 1, amp, dist.own_random_numbers(0, step))
        return loss.item(), torch.rand(1).item()  # the shared stream's next number

    (l0, r0), (l1, r1), (l0_again, r0_again), (l0_next, _) = step(2, 0, 5), step(2, 1, 5), step(2, 0, 5), step(2, 0, 6)
    assert r0 == r1 == r0_again  # every process's shared stream is where the noise left it
    assert l0 == l0_again and l0 != l1 and l0 != l0_next  # other units dropped in another process or step
    assert step(1, 0, 5)[1] != r0  # one process: dropout drew from the shared stream


def torchrun_train(tmp_path, port, patch, *argv, after=""):
    """train.py main under torchrun, 2 CPU processes (gloo), each running `patch` (Python, with `train`
    imported) before it and `after` after it. port: this test's offset, so two tests never share one.
    A process's lines for the test go out in one os.write each: print's pieces interleave between them."""
    import os
    import subprocess
    import sys
    script = tmp_path / "patched_train.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport train\n{patch}\n"
                      f"train.main(train.get_args())\n{after}\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29500 + (os.getpid() + port) % 1000), str(script), *argv],
                          capture_output=True, text=True, env=env, timeout=300)


def test_two_process_torchrun_matches_one_process(corpus, trained, tmp_path):
    shutil.copytree(trained / "cache", tmp_path / "cache")
    # fp32: in bf16 a matrix product's rounding depends on its shape, and the shapes differ by design
    common = ["--data", str(corpus), "--cache-dir", str(tmp_path / "cache"), "--batch-size", "16",
              "--decoder-batch", "8", "--warmup", "2", "--steps", "4", "--save-every", "100", "--device", "cpu",
              "--precision", "fp32"]
    run_train(corpus, tmp_path, tmp_path / "one", "--steps", "4", "--save-every", "100", "--precision", "fp32")
    # train.py whose main process plans micro-batches of 4 rows (as budget.describe_run does for a GPU's memory)
    result = torchrun_train(tmp_path, 0, """import budget, os
real = budget.describe_run
def describe_run(args, *rest):
    real(args, *rest)
    args.micro_batch = 4
budget.describe_run = describe_run
split = train.micro_batches
def micro_batches(n, rank, world, micro):
    rows = split(n, rank, world, micro)
    os.write(1, f"rank {rank} rows of {n} {[(r.start, r.stop) for r in rows]}\\n".encode())
    return rows
train.micro_batches = micro_batches
""", *common, "--out", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "training on cpu x 2" in result.stdout and "prior 2 x 4, decoder 1 x 4" in result.stdout  # 2 micro-batches a process
    assert "rank 1 rows of 16 [(8, 12), (12, 16)]" in result.stdout  # the main process's plan, in every process
    assert result.stdout.count("data: ") == 1  # the run's own lines once, not once a process
    one = [json.loads(l) for l in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    two = [json.loads(l) for l in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert a["prior"] == pytest.approx(b["prior"], rel=1e-4) and a["decoder"] == pytest.approx(b["decoder"], rel=1e-4)
    w1, w2 = tensors_of(tmp_path / "one"), tensors_of(tmp_path / "two")
    # AdamW's first steps divide by |g|: a rounding-level difference in a near-zero gradient moves a weight by
    # up to lr * 1e-2 (summation order differs with micro-batches and processes)
    for key in ["prior.net.merge.weight", "decoder.soft.out.weight", "decoder.lm.transformer.h.0.attn.c_attn.weight"]:
        torch.testing.assert_close(w1[key], w2[key], atol=5e-5, rtol=1e-4)


def test_finish_frees_the_ddp_wrappers_before_it_ends_the_process_group(monkeypatch):
    # freed after destroy_process_group, a wrapper ends the gloo group with the GIL held: a rare hang at exit
    import weakref
    dist = train.Distributed("cpu")
    runners = dist.wrap(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    alive = lambda refs=[weakref.ref(r) for r in runners]: any(ref() is not None for ref in refs)
    dist.world, events = 2, []  # as under torchrun, with the collective calls recorded instead of run
    monkeypatch.setattr(torch.distributed, "barrier", lambda: events.append(("barrier", alive())))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: events.append(("destroy", alive())))
    dist.finish()
    assert events == [("barrier", False), ("destroy", False)] and runners == []


# ----------------------------------------------------------------------------- the run and its checkpoint


def test_training_writes_a_self_describing_checkpoint(trained):
    out = trained / "out"
    for name in ["checkpoint.safetensors", "config.json", "tokenizer/tokenizer.json", "probes.safetensors"]:
        assert (out / name).exists(), name
    ckpt, tensors = Checkpoint(out), tensors_of(out)
    assert ckpt.step == 6 and ckpt.config["encoder"] == "minilm"
    assert json.loads((out / "config.json").read_text()) == dict(ckpt.config, step=6)  # the copy for reading
    assert set(ckpt.config["decoder"]) >= {"noise_augmentation", "inference_a", "hidden_cond", "n_layer"}  # in full
    assert "decoder.lm.lm_head.weight" not in tensors  # tied to wte, stored once
    config, prior, decoder, tokenizer, mu, s = load_for_inference(out)
    torch.testing.assert_close(prior.net.merge.weight, tensors["prior_ema.net.merge.weight"])
    assert decoder.lm.lm_head.weight.data_ptr() == decoder.lm.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(decoder.lm.lm_head.weight, tensors["decoder.lm.transformer.wte.weight"])
    # hidden_cond (tiny tier) starts at zero: non-zero only if the decoder's optimiser trains it
    assert config["decoder"]["hidden_cond"] and tensors["decoder.hidden_cond.weight"].abs().sum() > 0
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert log[-1]["prior_samples_s"] > 0 and log[-1]["decoder_tokens_s"] > 0 and 0 < log[-1]["prior_mfu"] < 1


def test_the_reconstruction_report_decodes_eagerly_under_compile(trained):
    """--compile compiles GPT-2's transformer for the training steps; the report's generation, whose
    key/value cache changes shape every token, must not recompile it (a counting backend, no compiler)."""
    from torch._dynamo.testing import CompileCounter
    from encoder import EmbeddingCache, cache_dir_for
    config, prior, decoder, tokenizer, mu, s = load_for_inference(trained / "out")
    counter = CompileCounter()
    decoder.lm.transformer.compile(backend=counter)
    try:
        cache = EmbeddingCache(cache_dir_for(trained / "cache", "minilm"), "minilm")
        cos, decoded = train.reconstruction_cosine(decoder, tokenizer, cache, ["A fine film.", "It broke."], mu, s, "cpu")
        assert len(decoded) == 2 and -1 <= cos <= 1 and counter.frame_count == 0
    finally:
        torch._dynamo.reset()


def test_a_checkpoint_without_its_files_digest_refuses_other_data_in_one_line(trained, tmp_path):
    """A tiny-tier run, or an earlier release's file run, keeps no data_sha256: a --resume with another --data
    was a KeyError."""
    from safetensors.torch import load_file, save_file
    ckpt = Checkpoint(trained / "out")
    shutil.copytree(trained / "out", tmp_path / "out")
    config = dict(ckpt.config, train={k: v for k, v in ckpt.config["train"].items() if k != "data_sha256"})
    save_file(load_file(str(ckpt.path)), str(tmp_path / "out" / CHECKPOINT), dict(ckpt.meta, config=json.dumps(config)))
    other = tmp_path / "other.txt"
    other.write_text("a text\n")
    with pytest.raises(SystemExit, match=r"would change it: --data .*other.txt \(trained with .*\); leave them "
                                         r"out, or start a new run with another --out \(a data file that moved"):
        train.get_args(["--out", str(tmp_path / "out"), "--resume", "--data", str(other)])


def test_micro_batches_are_planned_again_on_resume(trained, tmp_path):
    """A run planned on an 80 GB GPU and resumed on a 24 GB one kept the 80 GB micro-batches."""
    from safetensors.torch import load_file, save_file
    ckpt = Checkpoint(trained / "out")
    shutil.copytree(trained / "out", tmp_path / "out")
    config = dict(ckpt.config, train=dict(ckpt.config["train"], micro_batch=8, decoder_micro_batch=4))
    save_file(load_file(str(ckpt.path)), str(tmp_path / "out" / CHECKPOINT), dict(ckpt.meta, config=json.dumps(config)))
    args = train.get_args(["--out", str(tmp_path / "out"), "--resume"])
    assert (args.micro_batch, args.decoder_micro_batch, args.batch_size) == (None, None, 16)


def test_resume_matches_an_uninterrupted_run(corpus, trained, tmp_path, monkeypatch):
    # the session's run saved at step 3 then 6: redo 0..3, then resume 3..6 and compare
    shutil.copytree(trained / "cache", tmp_path / "cache")
    data = tmp_path / "toy.jsonl"  # a copy of the corpus, moved before the resume
    shutil.copy(corpus, data)
    monkeypatch.chdir(tmp_path)  # started with relative paths, resumed from another folder: the same data and cache
    run_train("toy.jsonl", Path("."), "out", "--steps", "6", "--save-every", "3", "--stop-at", "3")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert Checkpoint(tmp_path / "out").step == 3
    resume = lambda *flags: train.main(train.get_args(["--out", str(tmp_path / "out"), "--resume", *flags]))
    assert train.get_args(["--out", str(tmp_path / "out"), "--resume"]).cache_dir == str(tmp_path / "cache")
    with pytest.raises(SystemExit, match=r"would change it: --batch-size 32 \(trained with 16\), "
                                         r"--seed 1 \(trained with 0\); leave them out"):
        resume("--seed", "1", "--batch-size", "32")
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text() + "\n" + json.dumps({"text": "one more text", "rating": 2.0, "domain": "movie"}))
    with pytest.raises(SystemExit, match=r"--data .*other.jsonl \(trained with .*\); .*other.jsonl holds other texts "
                                         r"than the file it was trained on"):
        resume("--data", str(other))
    with pytest.raises(SystemExit, match=r"\(there is no file at .*nowhere.jsonl\)"):
        resume("--data", str(tmp_path / "nowhere.jsonl"))
    kept = data.read_text()  # edited in place: the resume trained on the new texts and took their sha256
    data.write_text(kept + "\n" + json.dumps({"text": "one more text", "rating": 2.0, "domain": "movie"}))
    with pytest.raises(SystemExit, match=r"toy.jsonl has changed since the run in .* trained on it \(another sha256\), "
                                         r"so --resume would train on other texts; restore it"):
        resume()
    data.write_text(kept)
    with pytest.raises(SystemExit, match=r"--stop-at 3 is not after step 3, where the run in .* stands"):
        resume("--stop-at", "3")  # it would be ignored, and a C4 run would not prepare the windows after it
    moved = tmp_path / "moved" / "toy.jsonl"  # the same texts elsewhere: its sha256 says so
    moved.parent.mkdir()
    shutil.move(data, moved)
    with pytest.raises(SystemExit, match=r"data file .*toy.jsonl, which the run in .* trained on, does not exist; if "
                                         r"it was moved, python train.py --resume --data NEW_PATH finds it"):
        resume()
    probes = tmp_path / "out" / "probes.safetensors"
    probes.write_bytes(probes.read_bytes()[:300])  # damaged: the resume trains the tier's probes again
    resume("--data", str(moved))  # cache, batch sizes, learning rates, --steps 6, --save-every 3: the checkpoint's
    assert Checkpoint(tmp_path / "out").step == 6
    assert {"positive", "negative"} <= set(load_probes(probes, "minilm")[1])
    assert_same_weights(tensors_of(tmp_path / "out"), tensors_of(trained / "out"), ("prior.", "decoder.", "opt_"))
    with pytest.raises(SystemExit, match="already at step 6; --resume trains on to --steps, so give more than 6"):
        resume()
    before = tensors_of(tmp_path / "out")
    with pytest.raises(SystemExit, match="already at step 6"):
        resume("--steps", "4")
    assert_same_weights(tensors_of(tmp_path / "out"), before)
    resume("--steps", "7", "--decoder-lr", "1e-3")  # a longer run; the checkpoint keeps its flags for the next --resume
    ckpt = Checkpoint(tmp_path / "out")
    assert ckpt.step == 7 and ckpt.config["train"]["steps"] == 7 and ckpt.config["train"]["decoder_lr"] == 1e-3
    # and step 7 trained at it: the optimizer's groups came back from the checkpoint with the old peak
    assert [g["peak_lr"] for g in json.loads(ckpt.meta["opt_decoder.param_groups"])] == [1e-3, 1e-3]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus, trained, tmp_path, monkeypatch, capsys):
    import diffusion
    shutil.copytree(trained / "cache", tmp_path / "cache")
    real_forward, calls = diffusion.Prior.forward, []

    def poisoned(self, x, x_prefix, noise=None):
        calls.append(1)
        loss = real_forward(self, x, x_prefix, noise)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(diffusion.Prior, "forward", poisoned)
    with pytest.raises(SystemExit) as exit_info:
        run_train(corpus, tmp_path, tmp_path / "out", "--steps", "8", "--save-every", "3")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "\nerror: the loss became nan (prior)" in err and "the last good checkpoint in" in err  # not on the bar
    assert Checkpoint(tmp_path / "out").step == 3
    assert all(torch.isfinite(v).all() for v in tensors_of(tmp_path / "out").values() if v.is_floating_point())
    calls.clear()  # at step 5 again, with no checkpoint yet: none is "kept"
    with pytest.raises(SystemExit):
        run_train(corpus, tmp_path, tmp_path / "first", "--steps", "8", "--save-every", "6")
    assert "stopped without saving, before a first checkpoint (try a lower learning rate, and train again)" in \
        capsys.readouterr().err


def test_a_run_ends_by_saying_where_its_wall_time_went(corpus, trained, tmp_path, monkeypatch, capsys):
    import re
    import time
    shutil.copytree(trained / "cache", tmp_path / "cache")
    real_step = train.prior_step
    monkeypatch.setattr(train, "prior_step", lambda *a: (time.sleep(0.4), real_step(*a))[1])  # 4 steps: >= 1.6 s
    run_train(corpus, tmp_path, tmp_path / "out", "--steps", "4", "--save-every", "4")
    out = capsys.readouterr().out
    assert re.search(r"data: .* \(tokenizer \d+ s, embedding \d+ s\)", out)
    done = re.search(r"done in [\d.]+ min: (\d+) s before the first step .*, (\d+) s in 4 prior steps, (\d+) s in as "
                     r"many decoder steps, (\d+) s around them", out)
    assert done and int(done[2]) >= 2  # the prior's own seconds, not the sleep-free decoder's
    assert not re.search(r"step 4: prior [\d.]+ \| decoder", out)  # the last step saves once, with the final report


def test_a_cuda_run_reports_its_peak_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 30 * 2 ** 30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 33.5 * 2 ** 30)
    assert train.peak_gpu_memory("cuda").startswith("peak GPU memory: 30.0 GiB allocated, 33.5 GiB reserved")


def test_an_existing_checkpoint_is_never_silently_replaced(corpus, trained, tmp_path, capsys):
    shutil.copytree(trained / "cache", tmp_path / "cache")
    shutil.copytree(trained / "out", tmp_path / "out")
    before = (tmp_path / "out" / "checkpoint.safetensors").read_bytes()
    run = f"already holds a run \\(the tiny tier on --data {corpus}, "
    with pytest.raises(SystemExit, match=run + "finished at step 6\\); train it on with --resume --steps 12, "):
        run_train(corpus, tmp_path, tmp_path / "out", "--steps", "2")
    # another kind of run (the paper tier) is not sent to --resume, which would refuse its flags
    with pytest.raises(SystemExit, match="already holds another run \\(the tiny tier .*\\); train this one into "
                                         "another --out \\(then sample.py --ckpt with it\\), or pass --overwrite"):
        run_train(corpus, tmp_path, tmp_path / "out", "--tier", "paper")
    with pytest.raises(SystemExit, match="data file .*missing.txt' does not exist"):  # not sent to another --out
        train.main(get_args(["--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")]))
    assert (tmp_path / "out" / "checkpoint.safetensors").read_bytes() == before
    capsys.readouterr()
    run_train(corpus, tmp_path, tmp_path / "out", "--steps", "3", "--stop-at", "2", "--overwrite")
    assert Checkpoint(tmp_path / "out").step == 2
    assert "2/3" in capsys.readouterr().err  # the bar closed with the step it stopped at (it stood at 1/3, open)
    with pytest.raises(SystemExit, match=run + "step 2 of 3\\); continue it with --resume, train into another --out"):
        run_train(corpus, tmp_path, tmp_path / "out", "--steps", "3")
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(SystemExit):
        run_train(corpus, tmp_path, tmp_path / "a-file", "--steps", "2")
    assert "argument --out: '" + str(tmp_path / "a-file") + "' is a file (give a folder)" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot write the checkpoint folder --out .*a-file/out"):
        run_train(corpus, tmp_path, tmp_path / "a-file" / "out", "--steps", "2")


def test_more_threads_than_cores_is_a_warning(corpus, trained, tmp_path, monkeypatch, capsys):
    shutil.copytree(trained / "cache", tmp_path / "cache")
    monkeypatch.setattr(train.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(train.torch, "set_num_threads", lambda n: None)  # this process's threads stay as they are
    run_train(corpus, tmp_path, tmp_path / "out", "--steps", "1", "--threads", "3")
    assert "warning: --threads 3 is more than the 2 CPU cores here; the work will be far slower" in capsys.readouterr().err


def test_ctrl_c_names_what_it_leaves_in_out_and_the_command_that_goes_on(corpus, trained, tmp_path, monkeypatch, capsys):
    shutil.copytree(trained / "cache", tmp_path / "cache")
    out, prior_step = tmp_path / "run", train.prior_step

    def ctrl_c_at(step):
        calls = []

        def prior_step_until(*a, **k):
            if len(calls) == step:
                raise KeyboardInterrupt
            calls.append(step)
            return prior_step(*a, **k)
        monkeypatch.setattr(train, "prior_step", prior_step_until)
        with pytest.raises(SystemExit) as exit_info:
            train.run_cli(lambda: run_train(corpus, tmp_path, out, "--steps", "6", "--save-every", "3"))
        assert exit_info.value.code == 130
        return capsys.readouterr().err.strip().splitlines()[-1]
    # the command again, as typed: `python train.py --out run` alone trained another run (the tiny corpus, 2400 steps)
    assert ctrl_c_at(2) == "interrupted before the first checkpoint (--save-every steps), so there is none to " \
        f"resume: train again with the same command, python train.py --data {corpus} --out {out} --cache-dir " \
        f"{tmp_path / 'cache'} --batch-size 16 --decoder-batch 8 --warmup 2 --steps 6 --save-every 3"
    assert ctrl_c_at(4).endswith(f"is kept; continue it with python train.py --resume --out {out}")
    assert Checkpoint(out).step == 3
    monkeypatch.setenv("WORLD_SIZE", "8")  # under torchrun: the command that started it, not python's
    assert train.interrupted(train.get_args(["--out", str(out)])).endswith(
        f"continue it with torchrun --nproc_per_node 8 train.py --resume --out {out}")


def test_sigterm_stops_a_run_as_ctrl_c_does_with_the_line_that_says_how_to_go_on(corpus, trained, tmp_path):
    """A scheduler's, docker stop's or timeout's SIGTERM ended the run with no word (exit 143)."""
    import os
    import signal
    import subprocess
    import sys
    shutil.copytree(trained / "cache", tmp_path / "cache")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--data", str(corpus), "--out", str(out),
                             "--cache-dir", str(tmp_path / "cache"), "--batch-size", "16", "--decoder-batch", "8",
                             "--warmup", "2", "--steps", "100000", "--save-every", "5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 240
    while not (out / CHECKPOINT).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, err[-800:]  # 128 + SIGTERM, as a shell reports it
    assert err.strip().splitlines()[-1].endswith(f"is kept; continue it with python train.py --resume --out {out}")
    assert Checkpoint(out).step >= 5


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
    env = dict(os.environ, HANG_AT_SAVE=str(hang_at_save), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-u", "-c", KILLABLE_TRAIN, *argv], stdout=subprocess.PIPE,
                            stderr=open(tmp_path / "stderr.txt", "a"), text=True, env=env)


def kill_when(proc, marker, meanwhile=lambda: None):
    """SIGKILL the child as soon as a stdout line contains `marker` (after calling `meanwhile`); returns the
    lines seen."""
    import signal
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            meanwhile()
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            return lines
    raise AssertionError(f"the run ended before {marker!r}: {''.join(lines)[-800:]}")


def test_sigkill_mid_save_and_mid_run_loses_at_most_one_interval(corpus, trained, tmp_path):
    shutil.copytree(trained / "cache", tmp_path / "cache")
    out = tmp_path / "out"
    argv = ["--data", str(corpus), "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--batch-size", "16",
            "--decoder-batch", "8", "--warmup", "2", "--steps", "60", "--save-every", "10"]
    # 1. killed while writing the checkpoint of step 20: the one of step 10 is intact. Until then the run
    # holds out/: a second train.py there (say a --resume from another terminal) stops before it reads it
    def second_run():
        with pytest.raises(SystemExit, match=f"another train.py is training into {out}/ \\(process \\d+\\); wait"):
            run_train(corpus, tmp_path, out, "--steps", "60", "--resume")
    kill_when(start_killable(argv, 2, tmp_path), "HANGING IN SAVE", second_run)
    assert Checkpoint(out).step == 10 and tensors_of(out)["prior.net.merge.weight"].isfinite().all()
    # 2. resumed, then killed between saves right after the one of step 30 was announced
    lines = kill_when(start_killable([*argv, "--resume"], 0, tmp_path), "step 30:")
    assert any("resumed from" in l and "at step 10" in l for l in lines)
    step = Checkpoint(out).step
    assert step >= 30 and step % 10 == 0
    # 3. resumed to the end: bit-for-bit the weights of an uninterrupted run
    run_train(corpus, tmp_path, out, "--steps", "60", "--save-every", "10", "--resume")
    run_train(corpus, tmp_path, tmp_path / "straight", "--steps", "60", "--save-every", "10")
    assert Checkpoint(out).step == 60
    assert_same_weights(tensors_of(out), tensors_of(tmp_path / "straight"))


# ----------------------------------------------------------------------------- C4 windows


@pytest.fixture(scope="module")
def c4_run(tiny_t5, tmp_path_factory):
    """A local C4 copy of 12 documents and a GPT-2 folder (as `gpt2-large` would be, tiny)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from decoder import train_tokenizer
    tmp = tmp_path_factory.mktemp("c4run")
    rng = random.Random(1)
    root = tmp / "c4" / "en"
    root.mkdir(parents=True)
    docs = [document(rng, 250) for _ in range(12)]
    with gzip.open(root / "c4-train.00000-of-00001.json.gz", "wt", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://e.com/{i}"}) + "\n")
    tokenizer = train_tokenizer(docs, vocab_size=500)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=2, n_positions=160,
                               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).save_pretrained(tmp / "gpt2")
    tokenizer.save_pretrained(tmp / "gpt2")

    def run(out, *extra):
        train.main(get_args(["--data", "c4", "--tier", "tiny", "--c4-path", str(root), "--lm", str(tmp / "gpt2"),
                             "--encoder", tiny_t5, "--out", str(out), "--cache-dir", str(tmp / "cache"),
                             "--batch-size", "4", "--decoder-batch", "2", "--window", "10", "--steps", "5",
                             "--save-every", "100", "--warmup", "1", "--max-len", "40", *extra]))
    return tmp, run


def test_train_on_c4_through_windows_resumes_exactly(c4_run, tmp_path):
    """The stream is trained in windows; a run stopped inside the second window and resumed ends with
    the weights of an uninterrupted run. The resume needs no language model but the checkpoint's."""
    tmp, run = c4_run
    run(tmp / "straight")
    lm = tmp_path / "gpt2"  # the same pretrained model, gone by the time of the resume
    shutil.copytree(tmp / "gpt2", lm)
    run(tmp / "resumed", "--stop-at", "3", "--lm", str(lm))
    ckpt = Checkpoint(tmp / "resumed")
    window = json.loads(ckpt.meta["data"])
    assert ckpt.step == 3 and window["start"] == 2 and window["position"]["doc"] > 0  # inside the second window
    shutil.rmtree(lm)
    other = tmp_path / "other" / "en"  # another C4 copy: the saved position would point elsewhere in it
    shutil.copytree(tmp / "c4" / "en", other)
    with gzip.open(other / "c4-train.00000-of-00001.json.gz", "at", encoding="utf-8") as f:
        f.write(json.dumps({"text": "one more document", "timestamp": "", "url": ""}) + "\n")
    with pytest.raises(SystemExit, match=r"read the C4 files at .*en, and .*other.en does not begin with the same"):
        run(tmp / "resumed", "--resume", "--lm", str(lm), "--c4-path", str(other))
    run(tmp / "resumed", "--resume", "--lm", str(lm), "--c4-path", str(tmp / "c4"))  # the folder above: the same files
    meta, meta_straight = Checkpoint(tmp / "resumed").meta, Checkpoint(tmp / "straight").meta
    assert meta["data"] == meta_straight["data"] and json.loads(meta["data"])["start"] == 4  # a third window
    assert_same_weights(tensors_of(tmp / "resumed"), tensors_of(tmp / "straight"), ("prior.", "decoder.", "opt_"))


def test_the_checkpoint_keeps_a_relative_c4_glob_absolute(tmp_path, monkeypatch):
    """--c4-path 'c4/*.json.gz' was kept relative, so a --resume from another folder found no C4 files."""
    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "c4-train.00000-of-00001.json.gz").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert train.local_path("c4_path", "c4/*.json.gz") == str(tmp_path / "c4" / "*.json.gz")
    assert train.local_path("c4_path", "c4") == str(tmp_path / "c4")
    assert train.local_path("data", "c4") == "c4"  # --data c4 names the stream, not a folder
    assert train.local_path("c4_path", "elsewhere/*.json.gz") == "elsewhere/*.json.gz"  # matches nothing: as given


def test_a_window_too_small_for_a_batch_is_refused_before_it_is_embedded(c4_run, tmp_path, monkeypatch, capsys):
    """A window of 4 with 1 held out trained a batch of 3 without a word; one of 3 said the stream ran out."""
    tmp, run = c4_run
    assert "--window 3 is smaller than a batch (--batch-size 4)" in cli_error(train, ["--data", "c4", "--window", "3",
                                                                                     "--batch-size", "4"], capsys)
    monkeypatch.setattr(batches.data_lib, "is_held_out", lambda text: True)  # every example held out
    with pytest.raises(SystemExit, match=r"the window from step 0 holds 0 training examples once the held-out ones "
                                         r"\(4%\) are set apart, fewer than a batch of 4; give a larger --window"):
        run(tmp_path / "out", "--window", "4", "--cache-dir", str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("window-*"))  # nothing embedded
    monkeypatch.setattr(batches.data_lib, "is_held_out", lambda text: False)  # a first window with none held out
    capsys.readouterr()
    run(tmp_path / "out", "--window", "8", "--steps", "2", "--cache-dir", str(tmp_path / "cache"))
    out = capsys.readouterr().out  # it ended at the progress bar: no time, no GPU memory
    assert "no reconstruction cosine: the run holds no held-out text (on C4, in its first window)" in out
    assert "done in " in out


def test_a_c4_copy_that_ends_before_a_batch_is_said_to_run_out(c4_run, tmp_path):
    """A window the stream could not fill (a small local copy) is not a window too small for its flags."""
    _, run = c4_run
    with pytest.raises(SystemExit, match=r"^error: the C4 stream ran out \(\d+ training examples left, a batch needs 64\)$"):
        run(tmp_path / "out", "--window", "1000", "--batch-size", "64", "--cache-dir", str(tmp_path / "cache"))


def test_a_cache_of_other_windows_is_named_before_the_run_embeds_its_own(c4_run, tmp_path, capsys):
    """Windows filled with other flags (encoder.py's --max-prefix-frac 1.0 for a run's 0.5, another --seed)
    were embedded again with no word: hours at paper scale."""
    tmp, run = c4_run
    cache = ["--cache-dir", str(tmp_path / "cache"), "--steps", "2"]
    run(tmp_path / "a", *cache)
    assert "note: the cache holds other C4 windows" not in capsys.readouterr().out
    run(tmp_path / "b", *cache)  # the same windows: read, not embedded
    assert "note: the cache holds other C4 windows" not in capsys.readouterr().out
    run(tmp_path / "c", *cache, "--seed", "1")
    assert "note: the cache holds other C4 windows but not this one; a window is found by its texts, which --seed" \
        in capsys.readouterr().out


def test_two_processes_share_the_embedding_of_each_c4_window(c4_run, tiny_t5, tmp_path):
    """Under torchrun each process embeds its share of each window, the first (in the main thread,
    before training) included; the joined files equal the one process's, and so does the training."""
    import numpy as np
    from safetensors.numpy import load_file
    tmp, run = c4_run
    shutil.copytree(tmp / "gpt2", tmp_path / "gpt2")  # without dropout: its masks are drawn per process
    config = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(dict(config, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)))
    flags = ["--cache-dir", str(tmp_path / "cache"), "--precision", "fp32", "--steps", "6", "--window", "5",
             "--lm", str(tmp_path / "gpt2")]
    run(tmp_path / "one", *flags)
    one = {f.name: load_file(str(f))["emb"] for f in (tmp_path / "cache").rglob("window-*.safetensors")}
    shutil.rmtree(tmp_path / "cache")
    # train.py, counting the texts each process embeds in its main thread
    result = torchrun_train(tmp_path, 1, """import os, threading
import batches
texts = []
real = batches.EmbeddingCache.embed
def embed(self, batch, show_progress=False):
    texts.extend(batch if threading.current_thread() is threading.main_thread() else [])
    return real(self, batch, show_progress)
batches.EmbeddingCache.embed = embed
""", "--data", "c4", "--tier", "tiny", "--c4-path", str(tmp / "c4"), "--encoder", tiny_t5,
        "--out", str(tmp_path / "two"), "--batch-size", "4", "--decoder-batch", "2", "--save-every", "100",
        "--warmup", "1", "--max-len", "40", "--device", "cpu", *flags,
        after='os.write(1, f"rank {os.environ[\'RANK\']} embedded {len(texts)} texts in its main thread\\n".encode())')
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rank 1 embedded 5 texts" in result.stdout  # half of the first window's 10 (5 prefixes, 5 continuations)
    two = {f.name: load_file(str(f))["emb"] for f in (tmp_path / "cache").rglob("window-*.safetensors")}
    # a window a step (5 texts, batch 4), none past the end; every share joined into its window, then removed
    assert len(one) == 6 and set(two) == set(one) and not list((tmp_path / "cache").rglob("*.share-*"))
    for name in two:  # the same texts embedded in other batches: equal to fp16 rounding
        np.testing.assert_allclose(two[name].astype(np.float32), one[name].astype(np.float32), atol=2e-3)
    losses = lambda out: [r[k] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "prior" in r
                          for k in ("prior", "decoder")]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)


def test_a_run_embeds_no_window_past_its_end_and_stops_the_one_in_preparation(c4_run, monkeypatch, tmp_path):
    """The next window is prepared only when the run will train on it; a run that stops (Ctrl-C, an
    error) stops embedding the window in preparation between two parts, instead of making its exit
    wait for the whole window, and --resume embeds that window again."""
    import threading
    tmp, run = c4_run
    real = batches.EmbeddingCache.embed

    def slow_in_the_background(self, texts, show_progress=False):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.5)
        return real(self, texts, show_progress)

    def ctrl_c_at_step_2(self, step, *rest):
        update(self, step, *rest)
        if step == 2:
            raise KeyboardInterrupt

    update = train.Progress.update
    monkeypatch.setattr(train.Progress, "update", ctrl_c_at_step_2)
    monkeypatch.setattr(batches.C4Windows, "PART", 1)
    monkeypatch.setattr(batches.EmbeddingCache, "embed", slow_in_the_background)
    flags = ["--window", "5", "--steps", "6", "--save-every", "1", "--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "out", *flags)  # windows 0 and 1 trained; window 2 (~10 texts, ~5 s) begun
    windows = lambda: list((tmp_path / "cache").rglob("window-*.safetensors"))
    assert len(windows()) == 2
    monkeypatch.undo()
    run(tmp_path / "out", *flags, "--resume")  # from step 1
    assert len(windows()) == 6  # one a step (5 texts, batch 4), none past the end
    run(tmp_path / "stop", *flags, "--stop-at", "3", "--cache-dir", str(tmp_path / "cache-3"))
    assert len(list((tmp_path / "cache-3").rglob("window-*.safetensors"))) == 3  # none prepared past --stop-at


def test_drop_windows_keeps_only_the_windows_a_resume_needs(c4_run, tmp_path):
    """--drop-windows: a window's file goes once a checkpoint lies past it; stopped and resumed, the run
    trains as one that keeps every window."""
    tmp, run = c4_run
    flags = ["--window", "5", "--steps", "6", "--save-every", "2", "--cache-dir", str(tmp_path / "cache")]
    windows = lambda: {f.name for f in (tmp_path / "cache").rglob("window-*.safetensors")}
    run(tmp_path / "keep", *flags)
    every = windows()
    assert len(every) == 6  # a window a step (5 texts, batch 4)
    shutil.rmtree(tmp_path / "cache")
    run(tmp_path / "drop", *flags, "--drop-windows", "--stop-at", "3")
    assert len(windows()) == 1 and windows() < every  # the checkpoint's window; those before it went
    resumed = lambda *flag: get_args(["--out", str(tmp_path / "drop"), "--resume", *flag]).drop_windows
    assert resumed() is True and resumed("--no-drop-windows") is False  # kept as trained, unless turned off
    run(tmp_path / "drop", *flags, "--resume")
    assert len(windows()) == 1 and windows() < every
    assert_same_weights(tensors_of(tmp_path / "drop"), tensors_of(tmp_path / "keep"), ("prior.", "decoder.", "opt_"))


def test_host_memory_holds_one_window_at_a_time(c4_run, tiny_t5, monkeypatch):
    """Each window reads only its own embeddings (the window's texts, never the earlier windows'), and
    the content-addressed cache holds no more than the held-out texts of the reconstruction report."""
    import encoder
    tmp, run = c4_run
    loaded = []
    real = encoder.window_embeddings

    def counting(examples, directory, encode, show_progress=False):
        e_prefix, e_cont = real(examples, directory, encode, show_progress)
        loaded.append(len(e_prefix) + len(e_cont))
        return e_prefix, e_cont

    monkeypatch.setattr(batches, "window_embeddings", counting)
    run(tmp / "memory", "--steps", "6", "--window", "5")
    assert len(loaded) >= 6 and set(loaded) == {10}  # 5 examples a window: prefix + continuation, every time
    windows = list((tmp / "cache" / "embeddings").rglob("window-*.safetensors"))
    assert len(windows) >= 6 and all(f.stat().st_size < 20 * 24 * 2 + 400 for f in windows)  # fp16 on disk
    assert len(batches.EmbeddingCache(encoder.cache_dir_for(tmp / "cache", tiny_t5), tiny_t5)) <= 64  # held-out texts


def test_paper_tier_probes_are_part_of_the_run_or_a_warning(probe_data, tmp_path, capsys):
    """train_probes with the paper tier: from local copies of the data sets; unreachable ones give one
    warning that names the command that adds the probes later, and training goes on."""
    from types import SimpleNamespace

    from encoder import EmbeddingCache
    from guide import load_probes
    args = get_args(["--data", "c4", "--encoder", "minilm", "--probe-data", str(probe_data)])
    args.encode_device, args.bf16 = "cpu", False
    window = SimpleNamespace(examples=[{"text": "a", "prefix": "", "continuation": "a"}], held_out=[])
    cache = EmbeddingCache(tmp_path / "cache", "minilm")
    report = train.train_probes(args, window, tmp_path, cache)
    assert set(report) == {"sentiment", "toxicity", "world", "sports", "business", "scitech"}
    assert "nontoxic" in load_probes(tmp_path / "probes.safetensors", "minilm")[1]
    (tmp_path / "probes.safetensors").unlink()
    args.probe_data = str(tmp_path / "empty")  # no local copies there: the hub, which does not answer
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert train.train_probes(args, window, tmp_path, cache) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: no probes (could not stream stanfordnlp/sst2")
    assert f"add them later with `python guide.py --ckpt {tmp_path} --probes paper`" in err
    args.probe_data = str(tmp_path / "nowhere")  # a folder that is not there is named, not passed over for the hub
    assert train.train_probes(args, window, tmp_path, cache) is None
    assert capsys.readouterr().err.startswith(f"warning: no probes (--probe-data {tmp_path / 'nowhere'} is not a folder)")
    args.probe_data, args.probe_examples = str(probe_data), 1  # too few: train.py's flag, not guide.py's
    assert train.train_probes(args, window, tmp_path, cache) is None
    assert "more data, or a larger --probe-examples); training goes on" in capsys.readouterr().err


def test_a_max_len_beyond_the_context_names_the_soft_prompt_slots_beside_it(corpus, trained, tmp_path):
    """With n_soft raised in an edit, the error blamed --max-len alone."""
    shutil.copytree(trained / "cache", tmp_path / "cache")
    with pytest.raises(SystemExit, match=r"--max-len 200 does not fit the language model's context of 128 positions "
                                         r"beside the 8 soft-prompt slots, bos and end of text \(at most 118\)"):
        run_train(corpus, tmp_path, tmp_path / "o", "--max-len", "200", "--steps", "2")
    with pytest.raises(SystemExit, match=r"--max-len 119 does not fit .* \(at most 118\)"):  # one past the end
        run_train(corpus, tmp_path, tmp_path / "o", "--max-len", "119", "--steps", "2")


def test_a_resume_whose_cache_folder_is_gone_uses_the_working_folders_and_says_so(trained, tmp_path, monkeypatch,
                                                                                   capsys):
    """A moved clone's --resume made the old cache folder again, fetched and embedded the corpus there, and said
    nothing; sample.py and evaluate.py read `cache` in the working folder in that case."""
    from safetensors.torch import save_file
    shutil.copytree(trained / "out", tmp_path / "out")
    ckpt = Checkpoint(tmp_path / "out")
    config = dict(ckpt.config, train=dict(ckpt.config["train"], cache_dir=str(tmp_path / "gone")))
    save_file(load_file(str(ckpt.path)), str(ckpt.path), dict(ckpt.meta, config=json.dumps(config)))
    monkeypatch.chdir(tmp_path)
    assert get_args(["--resume"]).cache_dir == "cache"
    assert f"note: the run's cache folder {tmp_path / 'gone'} is gone; using {tmp_path / 'cache'}" in \
        capsys.readouterr().out
    assert get_args(["--resume", "--cache-dir", "mine"]).cache_dir == "mine"
    monkeypatch.setenv("RANK", "1")  # another process under torchrun: the same folder, no second note
    assert get_args(["--resume"]).cache_dir == "cache" and "note:" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- checks a mutation pass found untested


def test_the_tier_of_c4_on_the_tiny_lm_and_an_unknown_tier(capsys):
    """--data c4 --lm tiny is the tiny tier (then refused with its reason), and a misspelt --tier is argparse's one
    line, not a KeyError from the tier table; --threads 0 and --warmup 0 are the accepted lower ends."""
    assert get_args(["--data", "c4", "--lm", "tiny"]).tier == "tiny"
    with pytest.raises(SystemExit):
        get_args(["--tier", "huge"])
    assert "argument --tier: invalid choice: 'huge'" in capsys.readouterr().err
    args = get_args(["--threads", "0", "--warmup", "0"])
    assert (args.threads, args.warmup) == (0, 0)


def test_a_resume_refuses_every_flag_that_changes_what_the_run_is(trained):
    """RUN_SETTINGS: a --resume with another --decoder-batch, --max-len, --encoder or teaching switch would train
    the rest of the run as another run; each is refused, as --seed is."""
    out = str(trained / "out")
    for flag in (["--tier", "paper"], ["--encoder", "someone/st5"], ["--lm", "gpt2"], ["--max-prefix-frac", "0.25"],
                 ["--max-len", "40"], ["--vocab-size", "4000"], ["--window", "1000"], ["--batch-size", "32"],
                 ["--decoder-batch", "4"], ["--seed", "1"], ["--no-noise-augmentation"], ["--no-loss-weight"],
                 ["--no-adaptive-noise"], ["--no-null-prefix"]):
        with pytest.raises(SystemExit, match=f"these flags would change it: {flag[0]} .* \\(trained with "):
            get_args(["--out", out, "--resume", *flag])
    args = get_args(["--out", out, "--resume", "--steps", "12", "--decoder-lr", "1e-3", "--save-every", "4"])
    assert (args.steps, args.decoder_lr, args.save_every, args.decoder_batch) == (12, 1e-3, 4, 8)


def test_a_resume_on_a_local_c4_copy_needs_that_copy_as_it_was(tmp_path):
    """check_c4_copy: without --c4-path, or with a copy of as many files whose sizes differ, the saved stream
    position would point elsewhere; a shard added after the run's files is fine."""
    import data as data_lib
    root = tmp_path / "c4" / "en"
    root.mkdir(parents=True)
    for shard in range(2):
        (root / f"c4-train.{shard:05d}-of-00003.json.gz").write_bytes(b"x" * (10 + shard))
    fingerprint = data_lib.c4_fingerprint(root)
    train.check_c4_copy(str(root), fingerprint, tmp_path / "out")
    with pytest.raises(SystemExit, match=r"read a local copy of C4 \(.*en\); pass it with --c4-path"):
        train.check_c4_copy(None, fingerprint, tmp_path / "out")
    (root / "c4-train.00002-of-00003.json.gz").write_bytes(b"x")  # downloaded since: after the run's files
    train.check_c4_copy(str(root), fingerprint, tmp_path / "out")
    (root / "c4-train.00001-of-00003.json.gz").write_bytes(b"x" * 99)  # the same names, another size
    with pytest.raises(SystemExit, match="does not begin with the same files"):
        train.check_c4_copy(str(root), fingerprint, tmp_path / "out")


def test_ctrl_c_from_the_command_line_repeats_its_arguments_as_typed(tmp_path, monkeypatch):
    """get_args() reads sys.argv without the script's own name, or the suggested command says train.py twice."""
    out = str(tmp_path / "o")
    monkeypatch.setattr(sys, "argv", ["train.py", "--out", out, "--steps", "3"])
    args = get_args()
    assert args.argv == ["--out", out, "--steps", "3"]
    assert train.interrupted(args).endswith(f"python train.py --out {out} --steps 3")


class Reached(Exception):
    """Raised by a stand-in once setup has come as far as a test looks."""


class Processes:
    """train.Distributed's stand-in: `world` processes, this one the main one; stop_at_main: raise Reached where
    setup first asks whether it is (after the checks of flags, threads and devices)."""

    def __init__(self, world=1, stop_at_main=False):
        self.world, self.rank, self.device, self.stop_at_main = world, 0, "cpu", stop_at_main

    @property
    def is_main(self):
        if self.stop_at_main:
            raise Reached
        return True

    def from_main(self, *values):
        return list(values)


def test_setup_checks_the_batches_against_the_processes_and_sets_the_threads(corpus, tmp_path, monkeypatch, capsys):
    """Each of --batch-size and --decoder-batch must split evenly over the processes (either one
    alone is refused); --threads sets torch's threads, and warns only past the cores there are."""
    threads = []
    monkeypatch.setattr(train.torch, "set_num_threads", threads.append)
    monkeypatch.setattr(train.os, "cpu_count", lambda: 2)
    argv = ["--data", str(corpus), "--out", str(tmp_path / "o"), "--batch-size", "16"]
    monkeypatch.setattr(train, "Distributed", lambda device: Processes(world=4, stop_at_main=True))
    for batch, decoder_batch in (("16", "6"), ("18", "8")):
        with pytest.raises(SystemExit, match=f"--batch-size {batch} and --decoder-batch {decoder_batch} must be "
                                             "multiples of the 4 processes"):
            train.setup(get_args([*argv, "--batch-size", batch, "--decoder-batch", decoder_batch]))
    with pytest.raises(Reached):
        train.setup(get_args([*argv, "--decoder-batch", "8"]))
    monkeypatch.setattr(train, "Distributed", lambda device: Processes(stop_at_main=True))
    capsys.readouterr()
    for n in ("2", "3"):
        with pytest.raises(Reached):
            train.setup(get_args([*argv, "--decoder-batch", "8", "--threads", n]))
    assert threads == [2, 3]
    assert capsys.readouterr().err.count("warning: --threads") == 1  # 3 on 2 cores, not 2


def test_overwrite_replaces_the_old_run_once_the_new_one_writes_and_not_before(corpus, trained, tmp_path,
                                                                                monkeypatch):
    """--overwrite removes the old run's probes (else the new run takes them as its own) and its checkpoint as
    the new run's tokenizer is written: kept until the first save, a Ctrl-C before it offered to resume the old
    run with the new run's tokenizer. A start that fails before it writes keeps the old run whole."""
    from utils import release
    out = tmp_path / "out"
    shutil.copytree(trained / "out", out)
    argv = ["--data", str(corpus), "--out", str(out), "--batch-size", "16", "--decoder-batch", "8", "--overwrite",
            "--cache-dir", str(tmp_path / "cache")]  # its own: the working folder is the whole suite's

    def start(**stand_ins):  # setup until a stand-in stops it -> which of the old run's files are left
        with monkeypatch.context() as m:
            m.setattr(train, "Distributed", lambda device: Processes())
            for name, stand_in in stand_ins.items():
                m.setattr(train, name, stand_in)
            try:
                with pytest.raises(Reached):
                    train.setup(get_args(argv))
            finally:
                release(out)
        return [(out / name).exists() for name in (CHECKPOINT, "config.json", "probes.safetensors")]

    stop = lambda *a: (_ for _ in ()).throw(Reached())
    assert start(load_data=stop) == [True] * 3  # a failed start
    assert start(Models=stop) == [False] * 3  # the new run's tokenizer written, its models being built
    assert "interrupted before the first checkpoint" in train.interrupted(get_args(argv))


def resumed_setup(trained, tmp_path, *flags):
    """A copy of the session's run, and the arguments of its --resume (into the copy's own cache)."""
    shutil.copytree(trained / "out", tmp_path / "out")
    shutil.copytree(trained / "cache", tmp_path / "cache")
    return get_args(["--out", str(tmp_path / "out"), "--resume", "--steps", "12", "--cache-dir",
                     str(tmp_path / "cache"), *flags])


def test_a_resume_keeps_the_runs_probes_and_plans_the_decoders_micro_batches_apart(trained, tmp_path, monkeypatch):
    """A --resume does not train the tier's probes again, the run's being there; --micro-batch does not split
    the decoder's batch (its rows are --decoder-micro-batch's, by default the whole decoder batch)."""
    def no_probes(*args):
        raise AssertionError("the run's probes were trained again")

    def progress(args, dist, run, data, prior_rows, decoder_rows, *rest):
        raise Reached(prior_rows, decoder_rows)
    monkeypatch.setattr(train, "train_probes", no_probes)
    monkeypatch.setattr(train, "Progress", progress)
    with pytest.raises(Reached) as reached:
        train.main(resumed_setup(trained, tmp_path, "--micro-batch", "4"))
    assert reached.value.args == ([slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 16)], [slice(0, 8)])


def test_a_nan_decoder_loss_stops_the_run_as_a_nan_prior_loss_does(tmp_path, capsys):
    from tqdm import tqdm
    progress = train.Progress.__new__(train.Progress)  # the parts update reads before it stops
    progress.args, progress.dist, progress.bar = SimpleNamespace(out=str(tmp_path)), SimpleNamespace(is_main=True), \
        tqdm(disable=True)
    with pytest.raises(SystemExit) as exit_info:
        progress.update(4, [0.5, float("nan")], 0.0, 0.0, [], [])
    assert exit_info.value.code == 1
    assert "error: the loss became 0.5 (prior) / nan (decoder) at step 4; stopped" in capsys.readouterr().err


def test_the_log_keeps_the_learning_rates_scale_of_each_step(trained):
    """lr_scale is the schedule's factor (lr / peak), the same for every model, not the prior's lr itself."""
    log = [json.loads(l) for l in (trained / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["lr_scale"] for r in log] == pytest.approx([cosine_lr(s, 6, 2) for s in range(6)], abs=1e-6)


def test_the_checks_before_the_data_work_refuse_only_what_they_name(tmp_path):
    """A decoder batch as large as the batch is the whole batch (fine); a --probe-data folder that is gone is
    refused for a new run, but not for a --resume, whose probes were made (or warned about) when it began."""
    out = tmp_path / "o"
    train.check_args(get_args(["--batch-size", "16", "--decoder-batch", "16", "--out", str(out)]), out)
    args = get_args(["--data", "c4", "--probe-data", str(tmp_path / "gone"), "--out", str(out)])
    with pytest.raises(SystemExit, match="--probe-data .*gone: no such folder"):
        train.check_args(args, out)
    args.resume = True
    train.check_args(args, out)


def test_an_out_with_a_run_on_a_data_file_that_moved_is_sent_to_resume(corpus, trained, tmp_path):
    """A run on a file, asked for again with the file at another path, is the same kind of run (a --resume with
    --data NEW_PATH finds it by its content); a run on C4 is another one."""
    moved = tmp_path / "moved.jsonl"
    shutil.copy(corpus, moved)
    message = train.existing_run(get_args(["--data", str(moved)]), trained / "out")
    assert "already holds a run (the tiny tier on --data" in message and "--resume --steps 12" in message
    assert "already holds another run" in train.existing_run(get_args(["--data", "c4", "--tier", "tiny"]),
                                                             trained / "out")


def test_an_out_whose_checkpoint_keeps_no_run_settings_is_still_one_line(trained, tmp_path):
    """A checkpoint of an earlier release, its config without the run's flags: one line, not a KeyError."""
    from safetensors.torch import save_file
    ckpt = Checkpoint(trained / "out")
    shutil.copytree(trained / "out", tmp_path / "out")
    config = dict(ckpt.config, train={})
    save_file(load_file(str(ckpt.path)), str(tmp_path / "out" / CHECKPOINT), dict(ckpt.meta, config=json.dumps(config)))
    assert train.existing_run(get_args([]), tmp_path / "out").endswith(
        "already holds a checkpoint; continue it with --resume, train into another --out, or pass --overwrite to "
        "replace it")


def test_a_tiny_format_corpus_with_no_held_out_text_gets_no_probes_not_a_crash(tmp_path, capsys):
    rows = [{"text": "a", "rating": 2.0, "domain": "movie"}, {"text": "b", "rating": -1, "domain": "news"}]
    args = SimpleNamespace(data="mine.jsonl", tier="tiny", encoder="minilm")
    assert train.train_probes(args, SimpleNamespace(examples=rows, held_out=[]), tmp_path, cache=None) is None
    assert "no probes: no held-out text to measure them on;" in capsys.readouterr().out


def test_soft_prompt_lr_is_the_peak_of_the_soft_prompt_generator_alone(trained):
    """--soft-prompt-lr reaches the soft prompt and hidden_cond; GPT-2 trains at --decoder-lr."""
    ckpt = Checkpoint(trained / "out")
    stats = ckpt.tensors("stats")
    for flags, peaks in (([], [3e-3, 3e-3]), (["--soft-prompt-lr", "1e-4"], [3e-3, 1e-4])):
        run = train.Models(get_args(flags), ckpt.config, stats["mu"], stats["s"], "cpu")
        assert [g["peak_lr"] for g in run.opt_decoder.param_groups] == peaks
