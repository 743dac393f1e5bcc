"""budget.py: analytic FLOPs against counted ones, the memory estimate and the micro-batch plan."""
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import budget
from diffusion import Prior, PriorConfig
from test_decoder import tiny_decoder


def counted_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_the_priors_analytic_flops_match_the_counted_matrix_products():
    prior = Prior(PriorConfig(dim=48, n_tokens=6, token_dim=16, width=64, depth=4, heads=4)).eval()
    B = 5
    z, lam, x_prefix = torch.randn(B, 48), torch.zeros(B), torch.randn(B, 48)
    counted = counted_flops(lambda: prior.net(z, lam, x_prefix))
    assert prior.flops_per_example() * B == pytest.approx(counted, rel=0.01)


def test_the_decoders_analytic_flops_per_token_match_gpt2_counted():
    from decoder import gpt2_flops_per_token
    decoder = tiny_decoder(300, dim=16)
    decoder.lm.set_attn_implementation("eager")  # attention as matrix products the counter sees
    T = 20
    ids = torch.randint(0, 300, (2, T))
    counted = counted_flops(lambda: decoder.lm(input_ids=ids))
    # counted attention covers the whole context (no causal saving in the matrix products): the formula's convention
    c = decoder.lm.config
    assert gpt2_flops_per_token(c.n_layer, c.n_embd, c.vocab_size, T) * 2 * T == pytest.approx(counted, rel=0.01)


def test_a_training_sequences_flops_count_the_lm_head_only_where_a_token_is_scored():
    """Throughput counted the LM head at every position, slots and bos included, where Decoder.forward
    computes it at the scored ones alone: the tiny tier's decoder MFU read about an eighth too high."""
    decoder = tiny_decoder(300, dim=16)
    decoder.lm.set_attn_implementation("eager")
    prefix_ids, cont_ids = [[5, 6, 7]] * 16, [list(range(10, 18))] * 16  # 1 + 3 + 3 slots + 8 + eos = 16 tokens,
    n = 16                                                                  # 12 scored a row: no padding of either
    x, noise = torch.randn(16, 16), {"a": torch.full((16,), 0.9), "eps": torch.randn(16, 16)}
    counted = counted_flops(lambda: decoder(prefix_ids, cont_ids, x, noise)) - \
        counted_flops(lambda: decoder.condition(x, noise["a"]))  # the soft-prompt generator, left out
    assert 16 * decoder.flops_per_sequence(n) == pytest.approx(counted, rel=0.01)
    head = 2 * decoder.lm.config.n_embd * 300
    assert decoder.flops_per_sequence(n) == pytest.approx(counted_flops(lambda: decoder.lm(
        input_ids=torch.zeros(1, n, dtype=torch.long))) - 4 * head, rel=0.01)  # bos and the 3 slots score nothing


def test_step_flops_count_the_three_models_and_the_texts_a_c4_step_embeds():
    config = PriorConfig(dim=48, n_tokens=6, token_dim=16, width=64, depth=4, heads=4)
    decoder = tiny_decoder(300, dim=16)
    lm = decoder.lm.config.to_dict()
    flops = budget.step_flops(config, lm, 20, 3, 8, 4)
    assert flops["prior"] == 3 * 8 * Prior(config).flops_per_example()        # forward + backward, per example
    assert flops["decoder"] == 3 * 4 * decoder.flops_per_sequence(20)        # each sequence of 20 tokens, 3 slots
    assert flops["embedding"] == 0                                             # a corpus is embedded once, up front
    assert budget.step_flops(config, lm, 20, 3, 8, 4, encoder_params=1e6, embed_len=16)["embedding"] == \
        2 * 1e6 * 16 * 8


def test_memory_estimate_grows_with_the_micro_batch_and_checkpointing_saves_activations():
    sizes = {"prior": 119e6, "soft_prompt": 57e6, "lm": 774e6, "encoder": 1.24e9}
    prior = dict(n_tokens=32, width=768, depth=12)
    lm = dict(n_embd=1280, n_layer=36, vocab_size=50257)
    small, large = (budget.memory_estimate(sizes, prior, lm, 138, 64, m) for m in (1, 16))
    assert large["total"] > small["total"]
    static = 16 * (119e6 + 57e6 + 774e6) + 4 * 119e6 + 2 * (119e6 + 57e6 + 774e6) + 2 * 1.24e9
    assert small["total"] - small["activations (the larger of the two steps)"] == pytest.approx(static + budget.GiB)
    checkpointed = budget.memory_estimate(sizes, prior, lm, 138, 64, 16, checkpointing=True)
    assert checkpointed["total"] < large["total"]
    p, d, estimate = budget.plan_micro_batches(sizes, prior, lm, 138, 256, 64, 80 * budget.GiB)
    assert 256 % p == 0 and 64 % d == 0 and estimate["total"] <= 0.9 * 80 * budget.GiB
    assert budget.plan_micro_batches(sizes, prior, lm, 138, 256, 64, 8 * budget.GiB)[0] is None


def test_a_c4_run_counts_the_encoder_embedding_the_next_window_beside_training(capsys):
    import train
    # sentence-t5-xl is T5-3B's encoder: width 1024, feed-forward 16384, 32 heads; 88 GPT-2 tokens -> 132 of its own
    t = 132
    expected = 128 * t * (4 * 16384 + 12 * 1024) + 2 * 128 * 32 * t * t
    assert budget.embedding_activations("sentence-transformers/sentence-t5-xl", 128, 88) == expected
    assert budget.embedding_activations("some/unknown-encoder", 128, 88) == 0
    sizes = {"prior": 119e6, "soft_prompt": 57e6, "lm": 774e6, "encoder": 1.24e9}
    prior, lm = dict(n_tokens=32, width=768, depth=12), dict(n_embd=1280, n_layer=36, vocab_size=50257)
    alone = budget.memory_estimate(sizes, prior, lm, 98, 64, 4)
    beside = budget.memory_estimate(sizes, prior, lm, 98, 64, 4, embedding=expected)
    assert beside["total"] - alone["total"] == expected
    # on a 24 GiB card the plan makes room for it with smaller micro-batches
    plain = budget.plan_micro_batches(sizes, prior, lm, 98, 256, 64, 24 * budget.GiB)
    room = budget.plan_micro_batches(sizes, prior, lm, 98, 256, 64, 24 * budget.GiB, embedding=expected)
    assert room[0] * room[1] < plain[0] * plain[1] and room[2]["total"] <= 0.9 * 24 * budget.GiB
    # what train.py prints: the part is there for C4 only (a corpus is embedded before training)
    for data, counted in (("c4", True), ("tiny", False)):
        args = train.get_args(["--data", data, "--sizes", "--gpu-memory", "24"])
        budget.describe_run(args, *train.planned_configs(args))
        assert ("encoder activations (next C4 window)" in capsys.readouterr().out) == counted


def test_a_local_encoder_folder_is_sized_from_its_files_not_its_name(tiny_t5):
    """A local copy of sentence-t5-xl under another name counted no encoder (about 3.7 GiB too little); a
    small model in a folder named like a large one counted the large one."""
    from sentence_transformers import SentenceTransformer
    params = sum(p.numel() for p in SentenceTransformer(tiny_t5, device="cpu").parameters())
    assert budget.encoder_shape(tiny_t5) == (params, 32, 64, 4)  # T5's width, feed-forward and heads
    assert budget.encoder_params("sentence-transformers/sentence-t5-xl") == 1.24e9  # a hub id: by its name
    assert budget.encoder_shape("/no/such/folder") is None


def test_the_disk_a_run_needs_is_named_and_a_small_disk_warned_of(tmp_path, monkeypatch):
    import shutil
    from types import SimpleNamespace

    import train
    sizes = {"prior": 119e6, "soft_prompt": 57e6, "lm": 774e6, "encoder": 1.24e9}
    args = train.get_args(["--data", "c4", "--steps", "100k", "--out", str(tmp_path / "out"),
                           "--cache-dir", str(tmp_path / "cache")])
    line, warning = budget.disk_line(args, sizes, 768)
    # weights + 2 AdamW moments of 950M trained parameters and the prior's EMA, fp32; 200k texts a window, 4% held
    # out, 750 steps of 256 each: 134 windows of 200k prefixes and continuations x 768 in fp16
    assert f"checkpoint {4 * (3 * 950e6 + 119e6) / budget.GiB:.1f} GiB" in line
    assert f"134 windows of {200_000 * 2 * 768 * 2 / budget.GiB:.2f} GiB over 100000 steps" in line
    free = lambda gib: monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(free=gib * budget.GiB))
    free(1000)
    assert budget.disk_line(args, sizes, 768)[1] is None
    free(50)  # 77 GiB of windows and two checkpoints of 11 GiB on one disk
    warning = budget.disk_line(args, sizes, 768)[1]
    assert warning.startswith("warning: 99 GiB needed on the disk of") and "or --drop-windows" in warning
    args.drop_windows = True  # the windows since the last checkpoint (2000 steps), the current one and the next
    line, warning = budget.disk_line(args, sizes, 768)
    assert "at most 5 windows" in line and warning is None


def test_throughput_reports_mfu_against_the_peak():
    prior = Prior(PriorConfig())
    decoder = tiny_decoder(300, dim=384)
    meter = budget.Throughput(prior, decoder, peak=1e12)
    meter.add(0.5, 0.25, 256, [20] * 32)
    r = meter.report()
    assert r["prior_samples_s"] == pytest.approx(512) and r["decoder_tokens_s"] == pytest.approx(640 / 0.25)
    assert r["prior_mfu"] == pytest.approx(3 * prior.flops_per_example() * 256 / 0.5 / 1e12)
    assert budget.peak_flops("cpu", False)[0] > 1e8  # measured on a CPU
    assert budget.peak_flops("cpu", False, given_tflops=5)[0] == 5e12


def test_the_time_at_a_given_peak_is_in_a_unit_that_shows_it(capsys):
    import train
    for argv, expected in ((["--peak-tflops", "989"], r"about \d+\.\d s of training steps"),  # was "0.0 h"
                           (["--data", "c4", "--steps", "100k", "--peak-tflops", "989"],
                            r"about \d+\.\d h of training steps and \d+\.\d h of embedding")):
        args = train.get_args(argv + ["--sizes"])
        budget.describe_run(args, *train.planned_configs(args))
        assert re.search(expected, capsys.readouterr().out), argv
