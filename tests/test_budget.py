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


def test_the_peak_table_takes_the_longest_name_that_matches(monkeypatch):
    """An L40S matches L40S, L40 and L4, an H100 PCIe H100 PCIe and H100: the longest is the card."""
    for name, key, tflops in (("NVIDIA L40S", "L40S", 362), ("NVIDIA H100 PCIe", "H100 PCIe", 756),
                              ("NVIDIA L4", "L4", 121), ("NVIDIA A100-SXM4-80GB", "A100", 312)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        assert budget.peak_flops("cuda", True) == (tflops * 1e12, f"{key} bf16 table"), name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA X")
    assert budget.peak_flops("cuda", True) == (None, "NVIDIA X not in the table")


def test_a_cpus_measured_peak_counts_two_flops_per_multiply_add(monkeypatch):
    """A 1024^3 matrix product is 2 x 1024^3 FLOPs: two products timed in 0.5 s are 8 x 1024^3 FLOP/s."""
    clock = iter([0.0, 0.125, 0.25, 0.375, 0.5])  # start, two products in the 0.3 s, the check that ends it, the end
    monkeypatch.setattr(budget.time, "perf_counter", lambda: next(clock))
    assert budget.peak_flops("cpu", False) == (8 * 1024 ** 3, "measured float32 matmul")


def test_an_encoder_is_known_by_its_name_with_a_trailing_slash_or_a_folder_without_safetensors(tmp_path):
    """A folder whose weights are not in safetensors (pytorch_model.bin) falls back to its name, not 0
    parameters; a name typed with a trailing slash is known."""
    assert budget.encoder_shape("sentence-transformers/sentence-t5-xl/") == budget.ENCODERS["sentence-t5-xl"]
    folder = tmp_path / "sentence-t5-large"
    folder.mkdir()
    (folder / "config.json").write_text('{"d_model": 1024, "d_ff": 4096, "num_heads": 16}')
    (folder / "pytorch_model.bin").write_bytes(b"")
    assert budget.encoder_shape(folder) == (335e6, 1024, 4096, 16)
    assert budget.encoder_params(folder) == 335e6


def test_throughput_counts_each_decoder_sequence_three_times_its_forward_and_starts_again_after_a_report():
    """The decoder's MFU and samples/s, and the reset: a second report covers only the steps since the first."""
    prior = Prior(PriorConfig(dim=48, n_tokens=6, token_dim=16, width=64, depth=4, heads=4))
    decoder = tiny_decoder(300, dim=16)
    meter = budget.Throughput(prior, decoder, peak=1e12)
    meter.add(0.25, 0.5, 8, [10, 20])
    meter.add(0.25, 0.5, 8, [10])
    r = meter.report()
    assert r["decoder_samples_s"] == pytest.approx(3 / 1.0) and r["decoder_tokens_s"] == pytest.approx(40 / 1.0)
    forward = 2 * decoder.flops_per_sequence(10) + decoder.flops_per_sequence(20)
    assert r["decoder_tflops"] == pytest.approx(3 * forward / 1e12) and r["decoder_mfu"] == pytest.approx(3 * forward / 1e12)
    assert r["prior_samples_s"] == pytest.approx(16 / 0.5)
    meter.add(1.0, 1.0, 4, [5])
    r = meter.report()
    assert (r["prior_samples_s"], r["decoder_samples_s"], r["decoder_tokens_s"]) == (4.0, 1.0, 5.0)


def test_memory_estimate_part_by_part_worked_out_by_hand():
    """Every term of the estimate: 34 s b h bytes a layer (2 s b h checkpointed, plus one layer's 34 s b h
    recomputed), 10 bytes a logit, the prior's 34 bytes per token, width and layer, and the larger of the two."""
    sizes = {"prior": 1000, "soft_prompt": 100, "lm": 10_000, "encoder": None}
    prior, lm = dict(n_tokens=4, width=8, depth=2), dict(n_embd=16, n_layer=2, vocab_size=50)
    static = {"weights, gradients, AdamW (fp32)": 16 * 11_100, "prior EMA": 4 * 1000,
              "autocast bf16 weight copies": 2 * 11_100, "frozen encoder (bf16)": 0}
    act = "activations (the larger of the two steps)"
    # sequences of 10 tokens, decoder micro-batch 5: 2 layers x 34 x 10 x 5 x 16 + 10 x 5 x 10 x 50 logits
    for prior_micro, checkpointing, activations in (
            (3, False, 2 * 34 * 10 * 5 * 16 + 10 * 5 * 10 * 50),                     # 79400; prior 34 x 4 x 8 x 2 x 3
            (3, True, 2 * 2 * 10 * 5 * 16 + 34 * 10 * 5 * 16 + 10 * 5 * 10 * 50),     # 55400
            (100, False, 34 * 4 * 8 * 2 * 100)):                                       # the prior's 217600 is larger
        parts = budget.memory_estimate(sizes, prior, lm, 10, prior_micro, 5, checkpointing)
        assert parts == {**static, act: activations, "CUDA context and allocator slack": budget.GiB,
                         "total": sum(static.values()) + activations + budget.GiB}, (prior_micro, checkpointing)


def test_the_plan_takes_the_largest_divisor_that_fits_each_step_on_its_own():
    """With nothing but activations and the 1 GiB of slack: a decoder micro-batch costs 168000 bytes
    (10 tokens x (34 x 2 layers x 100 + 10 x 1000 logits)), a prior one 3400 (34 x 1 x 100 x 1)."""
    sizes = {"prior": 0, "soft_prompt": 0, "lm": 0, "encoder": None}
    prior, lm = dict(n_tokens=1, width=100, depth=1), dict(n_embd=100, n_layer=2, vocab_size=1000)
    device = budget.GiB + 168_000 * 7.5  # room for 7 decoder rows, or 370 prior rows beside one decoder row
    plan = budget.plan_micro_batches(sizes, prior, lm, 10, 500, 12, device, fill=1.0)
    assert plan[:2] == (250, 6)  # the largest divisors of 500 and 12 below 370 and 7
    assert plan[2]["total"] == 168_000 * 6 + budget.GiB
    # micro-batches given are taken as they are; where the other does not fit even at 1, neither is planned
    assert budget.plan_micro_batches(sizes, prior, lm, 10, 500, 12, device, fill=1.0, chosen=(3, None))[:2] == (3, 6)
    none_fits = budget.plan_micro_batches(sizes, prior, lm, 10, 500, 12, budget.GiB, fill=1.0, chosen=(4, None))
    assert none_fits[:2] == (None, None) and none_fits[2]["total"] == 168_000 + budget.GiB


def test_describe_run_plans_per_process_and_sets_the_first_gpus_micro_batches(capsys):
    """Under torchrun each process takes its share of the batch; the micro-batches of the first --gpu-memory
    size are the run's (not unset, nor the last size's)."""
    import train
    args = train.get_args(["--data", "c4", "--sizes", "--gpu-memory", "24,80"])
    budget.describe_run(args, *train.planned_configs(args))
    plans = [line for line in capsys.readouterr().out.splitlines() if line.startswith("GPU ")]
    first = re.search(r"prior (\d+) of 256, decoder (\d+) of 64 per process", plans[0])
    assert (args.micro_batch, args.decoder_micro_batch) == (int(first[1]), int(first[2]))
    assert "prior 256 of 256, decoder 64 of 64 per process" in plans[1]
    args = train.get_args(["--data", "c4", "--sizes", "--gpu-memory", "80"])
    budget.describe_run(args, *train.planned_configs(args), world=2)
    assert "micro-batches prior 128 of 128, decoder 32 of 32 per process" in capsys.readouterr().out


def test_the_compute_line_sizes_the_sequence_and_shares_the_hours_among_the_gpus(monkeypatch):
    """A C4 text's 88 tokens with bos, the slots and eos; two GPUs take half the time; a CPU without
    --peak-tflops gives no hours (its measured matmul is no GPU's peak)."""
    import train
    args = train.get_args(["--data", "c4", "--sizes", "--steps", "100k", "--peak-tflops", "989"])
    prior_config, decoder_config, lm_config = train.planned_configs(args)
    seen, step_flops = [], budget.step_flops
    monkeypatch.setattr(budget, "step_flops", lambda *a: seen.append(a) or step_flops(*a))
    hours = lambda world: [float(h) for h in re.findall(r"([\d.]+) h", budget.compute_line(
        args, prior_config, decoder_config, lm_config, 1.24e9, "cpu", world))]
    one, two = hours(1), hours(2)
    assert seen[0][2:4] == (88 + decoder_config.n_soft + 2, decoder_config.n_soft)
    assert len(one) == 2 and all(b == pytest.approx(a / 2, abs=0.06) for a, b in zip(one, two))
    args = train.get_args(["--sizes"])
    assert "MFU" not in budget.compute_line(args, *train.planned_configs(args), None, "cpu", 1)


def test_the_disk_line_counts_what_is_there_already(tmp_path, monkeypatch):
    """A checkpoint already in --out is replaced by one of the same size (one more, not two); windows in
    the cache need no room again; --drop-windows keeps no more windows than a short run makes."""
    import shutil
    from types import SimpleNamespace

    import train
    sizes = {"prior": 119e6, "soft_prompt": 57e6, "lm": 774e6, "encoder": 1.24e9}
    checkpoint = 4 * (3 * 950e6 + 119e6)  # 11.06 GiB
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(free=15 * budget.GiB))
    args = train.get_args(["--sizes", "--out", str(tmp_path / "out")])
    assert budget.disk_line(args, sizes, 768)[1].startswith("warning: 22 GiB needed")  # two checkpoints at once
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "checkpoint.safetensors").write_bytes(b"")
    assert budget.disk_line(args, sizes, 768)[1] is None  # 11 GiB more
    # 134 windows of 0.57 GiB, 70 GiB of them embedded already: 7 GiB more, and 11 for the checkpoint there
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(free=20 * budget.GiB))
    args = train.get_args(["--data", "c4", "--steps", "100k", "--out", str(tmp_path / "out"),
                           "--cache-dir", str(tmp_path / "cache")])
    monkeypatch.setattr(budget, "disk_usage", lambda folder: 70 * budget.GiB)
    line, warning = budget.disk_line(args, sizes, 768)
    assert "; 70 GiB there now)" in line and warning is None
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(free=17 * budget.GiB))
    assert budget.disk_line(args, sizes, 768)[1].startswith(
        f"warning: {(134 * 200_000 * 2 * 768 * 2 - 70 * budget.GiB + checkpoint) / budget.GiB:.0f} GiB needed")
    # 1000 steps of 256 are 2 windows of 750 steps: --drop-windows keeps those 2, not the 5 of a long run
    args = train.get_args(["--data", "c4", "--steps", "1000", "--drop-windows", "--out", str(tmp_path / "out"),
                           "--cache-dir", str(tmp_path / "cache")])
    assert "at most 2 windows" in budget.disk_line(args, sizes, 768)[0]


def test_micro_batches_given_are_marked_once_they_pass_the_90_percent_planned_for(capsys):
    """The note on micro-batches given starts at 90% of the GPU, the share the plan fills, not at 100%."""
    import train
    args = train.get_args(["--data", "c4", "--sizes", "--gpu-memory", "80", "--micro-batch", "8",
                           "--decoder-micro-batch", "8"])
    prior_config, decoder_config, lm_config = train.planned_configs(args)
    budget.describe_run(args, prior_config, decoder_config, lm_config)
    total = float(re.search(r"total ([\d.]+) GiB", capsys.readouterr().out)[1])
    for gib, marked in ((total / 0.95, True), (total / 0.85, False)):
        args = train.get_args(["--data", "c4", "--sizes", "--gpu-memory", f"{gib:.2f}", "--micro-batch", "8",
                               "--decoder-micro-batch", "8"])
        budget.describe_run(args, prior_config, decoder_config, lm_config)
        assert ("(as given: more than the 90% of the GPU planned for" in capsys.readouterr().out) == marked, gib
