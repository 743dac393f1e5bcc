"""utils.py: argument types with stated ranges, one-line errors, the hub asked once, and checkpoint writes."""
import argparse
import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, UNREACHABLE_HUB, hub_cache, run_python
from utils import (ArgumentParser, Checkpoint, LossLog, RawHelpFormatter, atomic_save, bounded, comma_list, count,
                   folder, free_text, keep_freed_memory, nonempty, nonempty_text, out_flag, output_file, path_arg,
                   pick_device, run_cache_dir, run_cli, use_bf16)


def test_count_accepts_suffixes_and_rejects_junk():
    assert count("100k") == 100_000 and count("2.5M") == 2_500_000 and count("300") == 300
    assert count("1e5") == 100_000 and count("2.4E3") == 2400 and count("1e9") == 10 ** 9
    with pytest.raises(argparse.ArgumentTypeError, match="'1e12' is too large"):
        count("1e12")
    for bad in ["ten", "1.5", "-3", "0", "5g", "", "nan", "inf", "1e400", "1e-3", "1.5e0"]:
        with pytest.raises(argparse.ArgumentTypeError):
            count(bad)


def test_bounded_checks_kind_range_and_finiteness():
    unit = bounded(float, 0, 1, low_open=True)
    assert unit("1") == 1.0 and unit("0.5") == 0.5
    for bad, why in [("0", "out of range (accepted: (0, 1])"), ("1.5", "out of range"), ("nan", "out of range"),
                     ("-inf", "out of range"), ("x", "'x' is not a number (accepted: (0, 1])")]:
        with pytest.raises(argparse.ArgumentTypeError, match=__import__("re").escape(why)):
            unit(bad)
    below_one = bounded(float, 0, 1, high_open=True)  # [0, 1): an EMA's decay, say
    assert below_one("0") == 0.0 and below_one("0.999") == 0.999
    with pytest.raises(argparse.ArgumentTypeError, match=r"'1' is out of range \(accepted: \[0, 1\)\)"):
        below_one("1")
    assert bounded(int, 1)("7") == 7
    assert bounded(int, 1)("1e2") == 100  # an exponent, as counts take it
    for bad in ["2.5", "1e-3", "inf"]:
        with pytest.raises(argparse.ArgumentTypeError, match=f"'{bad}' is not a whole number"):
            bounded(int, 1)(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="'1e9' is out of range"):
        bounded(int, 1, 1000)("1e9")  # the range is what is wrong, not the form
    for kind in (float, int):  # Python reads '1_0' as 10
        with pytest.raises(argparse.ArgumentTypeError, match="'1_0' is not a"):
            bounded(kind, 0)("1_0")
    with pytest.raises(argparse.ArgumentTypeError, match="'big' is not a count"):
        bounded(count, 1, 10)("big")  # counts keep their own message
    with pytest.raises(argparse.ArgumentTypeError, match="out of range"):
        bounded(count, 1, 10)("1k")


def test_comma_list_parses_each_value_with_its_kind():
    scales = comma_list(bounded(float, 0, 10))
    assert scales("1,2.5, 3") == [1.0, 2.5, 3.0]
    with pytest.raises(argparse.ArgumentTypeError, match="'nan' is out of range"):
        scales("1,nan")


def test_output_file_is_checked_before_the_work_that_fills_it(tmp_path):
    assert output_file(str(tmp_path / "results.json")) == str(tmp_path / "results.json")
    with pytest.raises(argparse.ArgumentTypeError, match="the folder .*nowhere' does not exist"):
        output_file(str(tmp_path / "nowhere" / "results.json"))
    with pytest.raises(argparse.ArgumentTypeError, match="is a folder"):
        output_file(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match="^is empty"):  # it said "'' is a folder"
        output_file("")
    assert not (tmp_path / "results.json").exists()  # the check leaves no empty file behind
    (tmp_path / "old.json").write_text("kept")
    assert output_file(str(tmp_path / "old.json")) and (tmp_path / "old.json").read_text() == "kept"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_output_file_refuses_a_folder_that_takes_no_files_even_as_root():
    with pytest.raises(argparse.ArgumentTypeError, match="cannot be written"):
        output_file("/proc/dglm-results.md")


def test_usage_errors_and_raised_errors_are_one_line_with_exit_code_2(capsys):
    p = ArgumentParser(prog="x.py")
    p.add_argument("--steps", type=count, default=1)
    with pytest.raises(SystemExit) as exit_info:
        p.parse_args(["--steps", "lots"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: argument --steps: 'lots' is not a count (accepted: 300, 20k, 1.5M, 1e5) (see python x.py --help)\n"

    def fails():
        raise SystemExit("error: something precise")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(fails)
    assert exit_info.value.code == 2 and capsys.readouterr().err == "error: something precise\n"

    def ctrl_c():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as exit_info:
        run_cli(ctrl_c, interrupted="interrupted: kept")
    assert exit_info.value.code == 130 and capsys.readouterr().err == "\ninterrupted: kept\n"


def test_help_gives_each_flags_default_once():
    """sample.py --help named no default for --n, --steps, --seed and a dozen more."""
    p = ArgumentParser(prog="x.py")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--sizes", type=comma_list(int), default=[1, 64], help="batch sizes")
    p.add_argument("--scale", type=float, default=180.0, help="guidance scale (default %(default)g)")
    p.add_argument("--fast", action="store_true", help="go fast")
    p.add_argument("--no-bars", dest="bars", action="store_false", help="no bars")
    p.add_argument("--prefix", default=None, help="a prefix")
    text = " ".join(p.format_help().split())
    assert "random seed (default: 0)" in text and "batch sizes (default: 1,64)" in text
    assert "guidance scale (default 180) " in text and text.count("default") == 3  # none for switches and None
    raw = ArgumentParser(prog="x.py", description="a docstring\n    laid out by hand", formatter_class=RawHelpFormatter)
    raw.add_argument("--n", type=int, default=2, help="samples")
    assert "a docstring\n    laid out by hand" in raw.format_help() and "samples (default: 2)" in raw.format_help()


def test_a_learners_edit_that_breaks_a_config_or_an_old_checkpoint_is_one_line(trained):
    """heads 3 at width 128 was a reshape error deep in diffusion.py (for the decoder's soft_heads too, which
    named neither), after the data and probes; a renamed field, a TypeError traceback when loading."""
    from decoder import DecoderConfig
    from diffusion import PriorConfig
    from utils import build_models
    with pytest.raises(SystemExit, match="PriorConfig: width / heads 128 / 3: the width must be even"):
        PriorConfig(heads=3)
    with pytest.raises(SystemExit, match="DecoderConfig: soft_width / soft_heads 128 / 3: the width must be even"):
        DecoderConfig(soft_heads=3)
    config = Checkpoint(trained / "out").config
    renamed = dict(config, prior={("mlp_mult" if k == "mlp_ratio" else k): v for k, v in config["prior"].items()})
    with pytest.raises(SystemExit, match=r"^error: the checkpoint's config was written by other code \(.*'mlp_mult'"):
        build_models(renamed)


def test_pick_device_refuses_a_device_that_is_not_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto") == "cpu" and pick_device("cpu") == "cpu"
    for name in ("cuda", "mps"):
        with pytest.raises(SystemExit, match=f"--device {name} but"):
            pick_device(name)


def test_saved_tensors_are_readable_as_any_new_file(tmp_path):
    """safetensors writes 0600: a checkpoint trained as root in a container (or by a teammate) could not be
    opened by another user, and said "No such file or directory"."""
    import numpy as np
    from encoder import write_shard
    umask = os.umask(0o022)
    try:
        atomic_save({"a": torch.zeros(3)}, tmp_path / "ckpt.safetensors")
        shard = write_shard(tmp_path / "cache", [b"k" * 20], np.zeros((1, 4), dtype=np.float32))
    finally:
        os.umask(umask)
    assert [oct(p.stat().st_mode & 0o777) for p in (tmp_path / "ckpt.safetensors", shard)] == ["0o644", "0o644"]


def test_a_cache_folder_that_refuses_a_file_is_one_line(tmp_path):
    """A read-only --cache-dir: the encoder's shard write was a SafetensorError traceback in train.py."""
    import numpy as np
    from encoder import write_shard
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit, match="^error: cannot write the embedding cache in .*a-file/minilm .*; give a "
                                         "--cache-dir you can write$"):
        write_shard(tmp_path / "a-file" / "minilm", [b"k" * 20], np.zeros((1, 4), dtype=np.float32))


def test_atomic_save_keeps_the_old_file_when_a_save_fails(tmp_path, monkeypatch):
    import safetensors.torch
    path = tmp_path / "t.safetensors"
    atomic_save({"a": torch.ones(3)}, path)

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        atomic_save({"a": torch.zeros(3)}, path)
    assert torch.equal(safetensors.torch.load_file(str(path))["a"], torch.ones(3))


def test_a_run_that_takes_its_folder_removes_what_a_killed_save_left_and_nothing_else(tmp_path, capsys):
    """A kill during a save left safetensors' own temporary (.tmp and six characters; 11 GiB at the paper
    tier) or checkpoint.safetensors.tmp, one more each kill, and no later run removed them."""
    from utils import hold, release
    atomic_save({"a": torch.ones(1000)}, tmp_path / "whole.safetensors")
    half = (tmp_path / "whole.safetensors").read_bytes()[:2000]  # what a save killed midway leaves
    for name in (".tmpAb12Cd", "checkpoint.safetensors.tmp", "probes.safetensors.tmp"):
        (tmp_path / name).write_bytes(half)
    for name in (".tmpXy34Ef", "notes.tmp", "data.safetensors.tmp"):  # a user's files in an --out of other files
        (tmp_path / name).write_text("mine")
    for f in tmp_path.iterdir():
        os.utime(f, (0, 0))  # long untouched: a killed save's
    (tmp_path / ".tmpNow123").write_bytes(half)  # being written now (guide.py adding probes, say)
    hold(tmp_path)
    release(tmp_path)
    left = sorted(f.name for f in tmp_path.iterdir())
    assert left == [".tmpNow123", ".tmpXy34Ef", "data.safetensors.tmp", "notes.tmp", "train.lock", "whole.safetensors"]
    assert f"note: removed 5.9 KiB of files that a save stopped midway left in {tmp_path}" in capsys.readouterr().out


def test_text_files_are_utf8_whatever_the_locale(tmp_path):
    """evaluate.py's tables name guides, and a guide of the user's own labels may be any text: written as UTF-8
    under a locale whose encoding is ASCII (C, with Python's UTF-8 mode off), not a UnicodeEncodeError."""
    path = tmp_path / "table.md"
    result = run_python(f"import utils; utils.atomic_write_text({str(path)!r}, 'caf\\u00e9 \\u263a')",
                        env={"LC_ALL": "C", "PYTHONUTF8": "0"})
    assert result.returncode == 0, result.stderr[-800:]
    assert path.read_bytes() == "caf\u00e9 \u263a".encode("utf-8")


def test_a_log_line_that_is_not_one_is_left_out_not_a_traceback(tmp_path, capsys):
    """A blank line an editor added, a line cut short by a crash or a full disk: --resume was a JSONDecodeError
    (or UnicodeDecodeError), and sample.py's no-checkpoint message read the log as UTF-8."""
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"step": 1, "prior": 1.1}\n\n{"step": 2, "prior": 1.0}\ngarbage\n\xff\n{"step": 3}\n'
                    b'{"step": 2, "pri')
    LossLog(log, 2).file.close()
    assert log.read_text() == '{"step": 1, "prior": 1.1}\n{"step": 2, "prior": 1.0}\n'
    assert "3 unreadable line(s) left out" in capsys.readouterr().err
    (tmp_path / "train.lock").touch()  # the run that logged ended (no process holds the lock)
    with pytest.raises(SystemExit, match="stopped before its first checkpoint .*; run its train.py command again"):
        Checkpoint(tmp_path)


def test_a_table_is_written_through_a_link_and_into_what_is_not_a_file(tmp_path):
    """evaluate.py --md LINK replaced the link by a file and left the file it named as it was; --md
    /dev/stdout printed nothing and, as root, replaced /dev/stdout itself."""
    (tmp_path / "t.md").write_text("old")
    (tmp_path / "link.md").symlink_to(tmp_path / "t.md")
    (tmp_path / "stdout").symlink_to("/proc/self/fd/1")
    result = run_python(f"import utils; utils.atomic_write_text({str(tmp_path / 'link.md')!r}, 'new'); "
                        f"utils.atomic_write_text({str(tmp_path / 'stdout')!r}, 'table')")
    assert result.returncode == 0, result.stderr[-800:]
    assert (tmp_path / "link.md").is_symlink() and (tmp_path / "t.md").read_text() == "new"
    assert (tmp_path / "stdout").is_symlink() and result.stdout == "table"
    (tmp_path / "new.md").symlink_to(tmp_path / "made-later.md")  # the check before the work leaves it a link
    assert output_file(str(tmp_path / "new.md")) and (tmp_path / "new.md").is_symlink()
    assert not (tmp_path / "made-later.md").exists()


def test_a_leading_tilde_is_home_in_every_path_flag_as_the_shell_would_make_it(tmp_path, monkeypatch):
    """--out=~/runs and a quoted "~/runs" reach the script unexpanded: they made a folder named ~ in the
    working folder, and a model folder ~/enc was tried as a hub id."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    home = str(tmp_path / "home")
    assert folder("~/runs") == path_arg("~/runs") == nonempty("a folder")("~/runs") == f"{home}/runs"
    assert output_file("~/t.md") == f"{home}/t.md" and not (tmp_path / "home" / "t.md").exists()
    import train
    args = train.get_args(["--out=~/r", "--data", "~/texts.txt", "--cache-dir", "~/c", "--encoder", "~/enc"])
    assert (args.out, args.data, args.cache_dir, args.encoder) == (f"{home}/r", f"{home}/texts.txt", f"{home}/c",
                                                                   f"{home}/enc")
    assert nonempty_text("~/ is a smile") == "~/ is a smile"  # text is text


def test_a_link_to_a_missing_folder_is_one_line_before_any_work(tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")  # was a FileExistsError traceback after the data work
    with pytest.raises(argparse.ArgumentTypeError, match="is a link to .*nowhere', which does not exist"):
        folder(str(tmp_path / "dangling"))


def test_a_closed_pipe_ends_quietly_and_a_full_disk_is_one_line():
    """`sample.py | head -2` and `sample.py --out /dev/full` ended in tracebacks."""
    code = "import utils; utils.run_cli(lambda: [print(i) for i in range(10 ** 6)])"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.stdout.readline() == b"0\n"
    child.stdout.close()  # as `head -1` does
    assert child.wait(timeout=120) == 141 and child.stderr.read() == b""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    code = "import utils\ndef fill():\n    with open('/dev/full', 'w') as f:\n        f.write('x')\nutils.run_cli(fill)"
    result = run_python(code)
    assert result.returncode == 2 and result.stderr.startswith("error: No space left on device: free some space")
    assert len(result.stderr.splitlines()) == 1


def test_non_ascii_arguments_and_output_work_in_the_c_locale():
    """LC_ALL=C hands Python a prefix such as "Caf\u00e9" as surrogate escapes, which the tokenizers refuse
    (a TypeError); utils.free_text decodes them as UTF-8, and run_cli prints what the terminal cannot show as "?"."""
    code = ("import sys, utils; p = utils.ArgumentParser(); p.add_argument('--prefix', type=utils.free_text); "
            "utils.run_cli(lambda: print(ascii(p.parse_args(sys.argv[1:]).prefix), p.parse_args(sys.argv[1:]).prefix))")
    result = subprocess.run([sys.executable, "-c", code, "--prefix", "Caf\u00e9"], capture_output=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "LC_ALL": "C", "PYTHONUTF8": "0"}, timeout=120)
    assert result.returncode == 0, result.stderr[-800:]
    assert result.stdout.decode("ascii").split() == ["'Caf\\xe9'", "Caf?"]
    assert free_text("Caf\udcc3\udca9") == "Caf\u00e9" and free_text("Caf\udce9") == "Caf\ufffd"  # not UTF-8


def test_suggested_commands_quote_a_path_with_a_space(tmp_path):
    """`python train.py --out /tmp/my run`, pasted as suggested, trained into /tmp/my with `run` left over."""
    folder = tmp_path / "my run"
    with pytest.raises(SystemExit, match=f"train one with `python train.py --out '{folder}'`"):
        Checkpoint(folder)
    with pytest.raises(SystemExit, match="--ckpt is empty"):  # it suggested `train.py --out ''`, which train.py refuses
        Checkpoint("")
    assert out_flag(folder) == f" --out '{folder}'" and out_flag("runs/a") == " --out runs/a" and out_flag("out") == ""


def test_evaluate_and_guide_find_the_runs_cache_from_any_folder(trained, tmp_path, monkeypatch):
    """evaluate.py run from another folder fetched and embedded the corpus again into ./cache."""
    config = Checkpoint(trained / "out").config
    assert run_cache_dir(config) == str(trained / "cache")  # kept as an absolute path
    monkeypatch.chdir(tmp_path)
    assert run_cache_dir(config) == str(trained / "cache")
    assert run_cache_dir({"train": {"cache_dir": "/a/machine/it/was/trained/on"}}) == run_cache_dir({}) == "cache"


def test_checkpoint_reads_one_group_of_tensors_at_a_time(trained):
    ckpt = Checkpoint(trained / "out")
    stats = ckpt.tensors("stats")
    assert set(stats) == {"mu", "s"} and stats["mu"].shape == (384,)
    assert all(k.startswith("net.") or k.startswith("noise_levels.") for k in ckpt.tensors("prior_ema"))


def test_a_gpu_runs_random_stream_is_saved_and_restored_on_a_gpu(tmp_path, monkeypatch):
    """Training on CUDA draws the batch's noise there: a resumed run continues that stream, not the seed's."""
    from utils import save_checkpoint
    gpu = {"state": torch.arange(16, dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": gpu["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": gpu.update(state=state, at=device))
    cpu = torch.get_rng_state()
    save_checkpoint(tmp_path, {}, 1, {}, {}, {})
    torch.rand(5)
    gpu["state"] = torch.zeros(16, dtype=torch.uint8)
    Checkpoint(tmp_path).restore_rng("cpu")  # a CPU run leaves the GPU's stream alone
    assert torch.equal(torch.get_rng_state(), cpu) and not gpu["state"].any()
    Checkpoint(tmp_path).restore_rng("cuda:1")
    assert torch.equal(gpu["state"], torch.arange(16, dtype=torch.uint8)) and gpu["at"] == "cuda:1"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_keep_freed_memory_reuses_a_freed_heap_top_without_faulting_it_in_again():
    """200 MB of 1 MB tensors, written and freed, four times: glibc's default (and the 128 MB trim
    threshold before) hands the freed top of the heap back, so every round faults its pages in again;
    kept, only the first round does."""
    import resource
    keep_freed_memory()
    pages, faults = 200 * (1 << 20) // resource.getpagesize(), []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [torch.ones(256, 1024) for _ in range(200)]
        del blocks
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert max(faults[1:]) < pages // 20, faults  # the 128 MB threshold: about 33,000 a round


HUB_OFFLINE_SCRIPT = """
import time
import huggingface_hub.utils
import utils
from transformers import AutoConfig
def no_retries(seconds):
    raise AssertionError(f"a retry after {seconds} s")
time.sleep = no_retries
asked, get_session = [], huggingface_hub.utils.get_session
huggingface_hub.utils.get_session = lambda: asked.append(1) or get_session()
assert utils.hub_answers(".") is None and asked == []  # a local folder needs no hub: the tiny tier asks nothing
assert utils.hub_answers() is False and asked == [1]
assert AutoConfig.from_pretrained("someone/cached").n_embd == 32  # from the local cache, at once
try:
    AutoConfig.from_pretrained("someone/absent")
    raise AssertionError("loaded a model that is nowhere")
except OSError:
    pass
assert utils.hub_answers() is False and asked == [1]  # asked once a process
print("ok")
"""


def test_an_unreachable_hub_is_asked_once_then_the_cache_serves_without_retries(tmp_path):
    """Offline without HF_HUB_OFFLINE (an address nothing listens on): a cached model loads, an absent one
    fails at once (huggingface_hub would otherwise sleep between retries), and the hub is not asked again."""
    (tmp_path / "cached").mkdir()
    (tmp_path / "cached" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32}))
    hub_cache(tmp_path / "hub", "someone/cached", tmp_path / "cached")
    result = run_python(HUB_OFFLINE_SCRIPT, {**UNREACHABLE_HUB, "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-1500:]
    assert "Retrying" not in result.stderr


@pytest.mark.parametrize("first_download", [
    "decoder.load_tokenizer('someone/absent')",
    "encoder.load_encoder('someone/absent')",
])  # (data.stream_from_hub: tests/test_train.py, C4 offline)
def test_each_first_download_asks_the_hub_before_it_tries(first_download):
    """Whichever load comes first in a process, offline it fails at once in one line, without retries."""
    script = ("import sys, time, decoder, encoder\n"
              "time.sleep = lambda s: sys.exit(f'a retry after {s} s')\n"
              f"{first_download}")
    result = run_python(script, UNREACHABLE_HUB)
    assert result.returncode == 1 and "Retrying" not in result.stderr, result.stderr[-1500:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "someone/absent" in result.stderr


# ----------------------------------------------------------------------------- checks a mutation pass found untested


def test_a_blank_folder_name_is_refused_as_an_empty_one():
    with pytest.raises(argparse.ArgumentTypeError, match="^is empty"):
        folder(" ")


def test_auto_takes_cuda_before_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == "mps"


def test_precision_fp32_and_bf16_are_obeyed_and_auto_follows_the_hardware(monkeypatch):
    import utils
    for native in (False, True):
        monkeypatch.setattr(utils, "native_bf16", lambda device: native)
        assert (use_bf16("fp32", "cpu"), use_bf16("bf16", "cpu"), use_bf16("auto", "cpu")) == (False, True, native)


def test_a_run_writes_its_own_process_id_over_the_last_ones(tmp_path):
    """train.lock holds the training process's id alone, not those of every run that held the folder before."""
    from utils import hold, release, training_in
    (tmp_path / "train.lock").write_text("4242\n")  # a run that ended
    hold(tmp_path)
    try:
        assert training_in(tmp_path) == str(os.getpid())
    finally:
        release(tmp_path)
    assert training_in(tmp_path) is None


def test_a_folder_held_by_a_relative_path_is_given_back_by_it(tmp_path, monkeypatch):
    """release finds the folder under the key hold kept it by: an in-process run (a test, a notebook) into
    `out` gives it back when it ends."""
    from utils import hold, release, training_in
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    hold("out")
    release("out")
    assert training_in(tmp_path / "out") is None


def test_a_log_of_no_readable_step_and_no_checkpoint_asks_for_a_first_run(tmp_path):
    """Unreadable log lines are no logged step: a folder with no checkpoint and a log of garbage is not a run
    that stopped before its first checkpoint."""
    (tmp_path / "log.jsonl").write_bytes(b"garbage\n\xff\n")
    with pytest.raises(SystemExit, match="no checkpoint at .*; train one with `python train.py"):
        Checkpoint(tmp_path)


def test_an_optimizer_of_other_parameters_is_refused_not_loaded(trained):
    """The optimiser state of a checkpoint does not go into an optimiser of other parameters (the code
    changed), its moments shaped for parameters it does not have."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(SystemExit, match="holds the opt_prior state of other parameters than the model's"):
        Checkpoint(trained / "out").load_optimizer(opt, "opt_prior")


def test_weights_the_model_has_no_place_for_are_refused(trained):
    """Weights of a part the model does not have (the code's models changed) are refused as missing ones are,
    not loaded without a word, that part's training lost."""
    with pytest.raises(SystemExit, match=r"does not match its config \(prior: missing \[\], unexpected \['net\."):
        Checkpoint(trained / "out").load_model(torch.nn.Module(), "prior")
