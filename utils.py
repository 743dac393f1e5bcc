"""The plumbing every script shares: the command line, devices and precision, and the checkpoint.

Command line: an ArgumentParser whose errors are one line with exit code 2, argument types that
check their range when arguments are parsed (counts such as 100k, bounded numbers), and run_cli,
which turns an `error: ...` raised anywhere into that same one line.

Checkpoint: one self-describing directory (--out / --ckpt) holding everything sample.py needs:

    checkpoint.safetensors   weights (prior, its EMA, decoder), latent statistics, optimiser state,
                             the torch RNG; the run's config (JSON) and step in its metadata
    config.json              a copy of the config, for reading
    tokenizer/               the decoder's tokenizer
    probes.safetensors       linear probes and the guides built on them (guide.py)
    log.jsonl                losses and throughput, one line per step (C4: and one per window)
    train.lock               held (flock) by the train.py training into the directory, while it does

Tensors are stored with safetensors and configs as JSON: loading never unpickles. The checkpoint, its
config and the probes are written to a temporary name and renamed into place, so a kill during a save
keeps the last one; the log is appended to, the tokenizer written once before the first step.
"""
import argparse
import errno
import json
import math
import os
import re
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from decoder import Decoder, DecoderConfig
from diffusion import Prior, PriorConfig

CHECKPOINT = "checkpoint.safetensors"
SAVED_FILES = (CHECKPOINT, "config.json", "probes.safetensors")  # written by renaming a PATH.tmp into place

# ----------------------------------------------------------------------------- command line


class HelpFormatter(argparse.HelpFormatter):
    """--help gives each flag's default, where its help does not say it already and there is one to give."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is argparse.SUPPRESS or isinstance(default, bool) \
                or default in ([], ""):  # a switch's True/False reads as the opposite of what it does
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)  # as typed
        return f"{text} (default: {shown.replace('%', '%%')})"


class RawHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """HelpFormatter for a description laid out by hand (a module's docstring): printed as it is."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (exit code 2, as argparse does) and the defaults in --help."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"formatter_class": HelpFormatter, **kwargs})

    def error(self, message):
        self.exit(2, f"error: {message} (see python {self.prog} --help)\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where it arrives (train.stop_on_sigterm): run_cli handles it as Ctrl-C, exit code 143."""


def run_cli(fn, interrupted="interrupted"):
    """Run a script's fn(): an `error: ...` (bad input, missing file, offline hub) or a full disk becomes one
    line on stderr and exit code 2, with no traceback, like the usage errors of ArgumentParser above;
    a closed pipe (`| head`) ends it quietly;
    Ctrl-C prints `interrupted` (what is kept, for a script that saves; a KeyboardInterrupt raised with a
    message of its own, as train.py's names its --out, prints that) and exits with 130 (143 for Terminated)."""
    if hasattr(sys.stdout, "reconfigure"):  # a terminal that cannot show a character gets "?", not a traceback
        sys.stdout.reconfigure(errors="replace")  # (stderr's default already never fails)
    try:
        fn()
        sys.stdout.flush()  # in here: a closed pipe's error at exit would be a traceback
    except BrokenPipeError:  # `| head` has what it wanted; what is left to print goes nowhere, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None  # 128 + SIGPIPE, as a shell reports a process a closed pipe stopped
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: {err.strerror}{f' ({err.filename})' if err.filename else ''}: free some space and run again "
              "(files saved before, such as checkpoints, are as they were)", file=sys.stderr)
        raise SystemExit(2) from None
    except SystemExit as err:
        if isinstance(err.code, str):
            print(err.code, file=sys.stderr)
            raise SystemExit(2) from None
        raise
    except KeyboardInterrupt as err:
        print(f"\n{err.args[0] if err.args else interrupted}", file=sys.stderr)
        raise SystemExit(143 if isinstance(err, Terminated) else 130) from None  # 128 + the signal, as a shell says


MAX_COUNT = 10 ** 9  # steps, texts, examples: more is a typo (1e12 steps would run for decades)


def count(text):
    """'100k' -> 100000, '2.5M' -> 2500000, '1e5' -> 100000, '300' -> 300: a positive whole number up
    to MAX_COUNT."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:[eE]\d+)?)\s*([kKmM]?)\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (accepted: 300, 20k, 1.5M, 1e5)")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]
    if not math.isfinite(value) or value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive whole number")
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{text!r} is too large (at most {MAX_COUNT:.0e})")
    return int(value)


def whole_number(text):
    """'1e3' -> 1000; None where the text is not a finite whole number."""
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if math.isfinite(value) and value == int(value) else None


def bounded(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: a finite number of `kind` (int, float or count) in [low, high] (or open ends).

    bounded(float, 0, 1, low_open=True) accepts (0, 1]; the error names the accepted range."""
    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    accepted = f"{lo or '(-inf'}, {hi or 'inf)'}"

    def parse(text):
        try:
            value = None if "_" in str(text) else kind(text)  # Python reads '1_0' as 10: a typo, not a number
        except ValueError:
            value = whole_number(text) if kind is int else None  # int() reads no exponent: '1e3'
        if value is None:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} (accepted: {accepted})")
        if not math.isfinite(value) or (low is not None and (value < low or (low_open and value == low))) \
                or (high is not None and (value > high or (high_open and value == high))):
            raise argparse.ArgumentTypeError(f"{text!r} is out of range (accepted: {accepted})")
        return value

    parse.__name__ = getattr(kind, "__name__", "number")  # argparse names the type in its messages
    return parse


def comma_list(kind):
    """An argparse type: comma-separated values, each parsed by `kind` (e.g. a bounded number)."""
    def parse(text):
        return [kind(v.strip()) for v in str(text).split(",")]

    parse.__name__ = "list"
    return parse


def path_arg(value):
    """An argparse type: a file, folder or model path, a leading ~ expanded here too, where the shell
    leaves it (--out=~/runs, a quoted "~/runs"), which would otherwise make a folder named ~."""
    return os.path.expanduser(value)


def output_file(value):
    """An argparse type: a file a run writes (at its end or as it goes), checked before the run's work begins."""
    if not str(value).strip():  # Path("") is the working folder
        raise argparse.ArgumentTypeError("is empty (give a file name)")
    value = path_arg(value)
    path = Path(value)
    if path.is_symlink() and not path.exists():  # a link to a file yet to be made: the check makes and removes that
        path = Path(os.path.realpath(path))
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"'{value}' is a folder (give a file name)")
    folder = path.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"'{value}': the folder {str(folder)!r} does not exist")
    existed = path.exists()
    try:  # a real open, not os.access: root passes os.access for folders such as /proc that refuse files
        with open(path, "a"):  # append mode leaves an existing file as it was
            pass
    except OSError as err:
        raise argparse.ArgumentTypeError(f"'{value}' cannot be written ({err.strerror})") from None
    if not existed:
        path.unlink()
    return value


def refusal(folder):
    """Why `folder` refuses a new file (the system's words), or None: a real write, not os.access, which
    root passes for folders such as /proc that refuse files."""
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder))
    except OSError as err:
        return err.strerror
    return None


def folder(value):
    """An argparse type: a folder a run reads and writes (made when missing), never a file."""
    if not str(value).strip():  # Path("") is the working folder: a checkpoint among the sources, say
        raise argparse.ArgumentTypeError("is empty (give a folder; . names this one)")
    value = path_arg(value)
    if Path(value).exists() and not Path(value).is_dir():
        raise argparse.ArgumentTypeError(f"'{value}' is a file (give a folder)")
    if Path(value).is_symlink() and not Path(value).exists():  # mkdir would fail on the link itself
        raise argparse.ArgumentTypeError(f"'{value}' is a link to {os.readlink(value)!r}, which does not exist "
                                         "(make that folder, or give another)")
    return value


def missing_folder(name):
    """True when a model name reads as a local path (absolute, ./ ../ ~, or in a folder that exists here,
    which a hub id's owner does not) and no folder is there: worth one line of its own, not a download."""
    name = str(name)
    local = os.path.isabs(name) or name.startswith((".", "~")) or (os.sep in name and Path(name).parent.is_dir())
    return local and not os.path.isdir(os.path.expanduser(name))


def not_a_model(folder, what, err):
    """The one line for a local folder that a model or tokenizer would not load from: the library's reason,
    its first line (a hub id that did not load gets its caller's line instead, naming what to pass offline)."""
    why = (str(err).strip().splitlines() or [type(err).__name__])[0][:200].rstrip(": ")  # a list follows a colon
    return SystemExit(f"error: the folder {folder} holds no {what} that loads ({why})")


HUB_ANSWERS = None  # whether the Hugging Face hub answered (hub_answers), asked once a process


def failed_downloads(checks):
    """[(name, flag, check)] of what a run needs from the hub, each check() loading a little of it (a config)
    -> ["name (flag)" of each that fails], so that one line names them all. The hub is asked once first
    (hub_answers): offline they fail at once."""
    if checks:
        hub_answers()
    failed = []
    for name, flag, check in checks:
        try:
            check()
        except (OSError, SystemExit, ValueError):
            failed.append(f"{name} ({flag})")
    return failed


def hub_answers(name=None):
    """Whether the Hugging Face hub answers, asked once a process before its first download. If one request
    gets no answer, huggingface_hub, transformers and datasets go offline for the rest of the process: a
    model in the local cache then loads at once and anything else fails at once, in its caller's one line.
    (Left online, huggingface_hub retries each file of an unreachable hub with backoff: about 25 s and six
    warnings a file before that line.) HF_HUB_OFFLINE=1 asks nothing; nor does `name`, the model about to
    be loaded, when it is a local folder (-> None)."""
    global HUB_ANSWERS
    if name is not None and os.path.isdir(str(name)):
        return None
    if HUB_ANSWERS is None:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session
        HUB_ANSWERS = False
        if not constants.HF_HUB_OFFLINE:
            try:
                get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
                HUB_ANSWERS = True  # any HTTP status: the hub, or a proxy before it, answers
            except Exception:  # no answer at all: no DNS, refused, timed out, TLS
                pass
        if not HUB_ANSWERS:
            constants.HF_HUB_OFFLINE = True  # what transformers and sentence-transformers ask too
            try:
                import datasets.config
                datasets.config.HF_HUB_OFFLINE = True  # datasets reads the variable once, at import
            except ImportError:
                pass
    return HUB_ANSWERS


def free_text(value):
    """An argparse type for free text (a prefix, an example). In the C locale (LC_ALL=C) Python hands
    non-ASCII arguments over as surrogate escapes, which the tokenizers refuse: decode them as UTF-8."""
    try:
        return os.fsencode(value).decode("utf-8")
    except UnicodeDecodeError:  # bytes that are not UTF-8: keep what can be read
        return os.fsencode(value).decode("utf-8", "replace")


def nonempty(what, kind=path_arg):
    """An argparse type: a value with something in it, read by kind (a path by default); `what` names what to
    give instead of an empty one."""
    def parse(value):
        if not str(value).strip():
            raise argparse.ArgumentTypeError(f"is empty (give {what})")
        return kind(value)
    return parse


def nonempty_text(value):
    """An argparse type: a text with something in it (an example to steer by, say)."""
    return nonempty("a sentence", free_text)(value)


def pick_device(name):
    """--device auto|cpu|cuda|mps -> a device string; auto takes CUDA, then MPS, then the CPU."""
    has_mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA GPU is visible (accepted: auto, cpu, cuda, mps)")
    if name == "mps" and not has_mps:
        raise SystemExit("error: --device mps but this PyTorch sees no Apple GPU (accepted: auto, cpu, cuda, mps)")
    return name


def native_bf16(device):
    """Whether `device` runs bf16 matrix products natively (else autocast to bf16 would be slower)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)  # Ampere or later
    if kind == "cpu":  # AVX512-BF16 (e.g. AMD Zen 4, Intel Cooper Lake) or AMX (Intel Sapphire Rapids)
        return any(getattr(torch.cpu, check, lambda: False)()
                   for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def use_bf16(precision, device):
    """precision "auto" | "fp32" | "bf16" -> whether to run under bf16 autocast."""
    return precision == "bf16" or (precision == "auto" and native_bf16(device))


def threads_flag(add):
    """The --threads flag of train.py, sample.py, evaluate.py and bench.py (`add`: a parser's add_argument),
    read by set_threads."""
    add("--threads", type=bounded(int, 0, 1024), default=0,
        help="CPU threads (0: torch's default); --threads 1 beside another run on two cores")


def set_threads(n):
    """--threads: torch's CPU threads (0 keeps torch's default, a thread per core). Two runs that share the
    cores each take a thread per core by default, and their threads then wait on each other; splitting the
    cores between them (--threads 1 each on two cores) keeps both at full speed."""
    if not n:
        return
    if n > (os.cpu_count() or 1):  # threads that wait on each other: many times slower, not faster
        print(f"warning: --threads {n} is more than the {os.cpu_count()} CPU cores here; the work will be far slower "
              "than with --threads 0 (torch's default)", file=sys.stderr)
    torch.set_num_threads(n)


def keep_freed_memory():
    """Ask glibc to keep freed memory for reuse (Linux). By default it hands large blocks back to the
    kernel, and a training step that allocates them (the logits and their gradient) page-faults them
    in again every time: on a small CPU that costs up to a third of the run in kernel time. Likewise the
    heap's top: when the activations a step frees leave more than the trim threshold free there, glibc
    gives it back and the next step faults it in again, so the threshold is set above what a step frees."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)   # blocks below this come from the reusable heap
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)    # and the heap keeps up to 1 GB free at its top
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def autocast(device, bf16):
    """bf16 autocast on `device` when bf16, else a context that changes nothing."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)


# ----------------------------------------------------------------------------- checkpoints


def atomic_save(tensors, path, metadata=None):
    """safetensors file written to PATH.tmp, then renamed: a kill during the save leaves the old file."""
    from safetensors.torch import save_file
    tmp = f"{path}.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    publish(tmp, path)


def publish(tmp, path):
    """Rename a finished temporary safetensors file into place, readable as any new file here (the umask):
    safetensors writes its files 0600, which kept a checkpoint from the other users of a machine or from a
    container's non-root user ("No such file or directory", since it could not be opened)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def atomic_write_text(path, text):
    """UTF-8 whatever the locale (a label of the user's own may be any text), to PATH.tmp, then renamed over
    the file (through a link, over the file it names). What is not a file (/dev/stdout, a pipe) is written into."""
    if os.path.exists(path) and not os.path.isfile(path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return
    path = os.path.realpath(path)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def model_config(prior_config: PriorConfig, decoder_config: DecoderConfig, encoder, lm_config, eos_id, train):
    """The checkpoint's config: everything needed to rebuild the models without a download."""
    return dict(encoder=encoder, prior=asdict(prior_config), decoder=asdict(decoder_config), lm_config=lm_config,
                bos_id=eos_id, eos_id=eos_id, train=train)


def build_models(config, pretrained_lm=False):
    """(Prior, Decoder) from a checkpoint config; pretrained_lm loads GPT-2's weights by name."""
    try:
        prior_config, decoder_config = PriorConfig(**config["prior"]), DecoderConfig(**config["decoder"])
    except TypeError as err:  # a field this code does not have: renamed in an edit, say
        raise SystemExit(f"error: the checkpoint's config was written by other code ({err}); train again with this "
                         "code, or go back to that one") from None
    prior = Prior(prior_config)
    decoder = Decoder(decoder_config, config["lm_config"], config["bos_id"], config["eos_id"], pretrained=pretrained_lm)
    return prior, decoder


def save_checkpoint(out, config, step, models, optimizers, extra_tensors, data_state=None):
    """models {name: module}, optimizers {name: optimizer}: one safetensors file plus config.json."""
    tensors = dict(extra_tensors)
    for name, model in models.items():
        seen = set()
        for k, v in model.state_dict().items():
            if v.data_ptr() not in seen:  # tied weights (GPT-2's lm_head = wte) are stored once
                seen.add(v.data_ptr())
                tensors[f"{name}.{k}"] = v
    meta = {"config": json.dumps(config), "step": str(step), "data": json.dumps(data_state)}
    for name, opt in optimizers.items():
        state = opt.state_dict()
        tensors.update({f"{name}.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()})
        meta[f"{name}.param_groups"] = json.dumps(state["param_groups"])
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_initialized():  # training on a GPU draws its noise there (Checkpoint.restore_rng)
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_save(tensors, Path(out) / CHECKPOINT, meta)
    atomic_write_text(Path(out) / "config.json", json.dumps(dict(config, step=step), indent=2))  # after: never ahead


HELD = {}  # the --out folders this process holds: resolved path -> its open lock file
LOCK = "train.lock"


def shell(path):
    """A path as a suggested command line gives it: quoted where a shell would split it (a space, say)."""
    return shlex.quote(str(path))


def out_flag(out):
    """` --out OUT` for a command line that names the run's folder; nothing for train.py's default."""
    return f" --out {shell(out)}" if Path(out) != Path("out") else ""


def hold(out):
    """Keep --out to this run. A second train.py into the same folder (from another terminal, or a --resume
    while the first still trains) would train there too, each saving over the other's checkpoints. An
    advisory lock (flock) on out/train.lock: the system releases it when the process ends, however it ends,
    so no lock outlives its run. Where there is no flock (Windows) nothing is held."""
    key = str(Path(out).resolve())
    if key in HELD or os.environ.get("RANK", "0") != "0":  # under torchrun: the main process
        return
    try:
        import fcntl
    except ImportError:
        return
    f = open(Path(out) / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise SystemExit(f"error: another train.py is training into {out}/ (process {training_in(out)}); wait for "
                         f"it to end (python train.py --resume{out_flag(out)} then trains it on), stop it, or train "
                         "into another --out") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    HELD[key] = f
    freed = remove_partial_saves(out)  # the folder is this run's now (guide.py may still write its probes)
    if freed:
        k, unit = next((k, unit) for k, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB"), (0, "bytes")) if freed >= 2 ** k)
        print(f"note: removed {freed / 2 ** k:.1f} {unit} of files that a save stopped midway left in {out}")


def remove_partial_saves(out, idle=60):
    """What a save killed midway leaves in `out`: the PATH.tmp of a checkpoint's files (atomic_save,
    atomic_write_text) and the temporary file safetensors itself writes before it renames it (.tmp and six
    characters, a safetensors header at its start), untouched for `idle` seconds (a file being written, by a
    guide.py adding probes, say, is newer). Nothing else: --out may be a folder of other files. -> bytes freed"""
    ours = {f"{name}.tmp" for name in SAVED_FILES}
    freed = 0
    for f in Path(out).iterdir():
        if not f.is_file() or time.time() - f.stat().st_mtime <= idle:
            continue
        if f.name in ours or (re.fullmatch(r"\.tmp[A-Za-z0-9]{6}", f.name) and is_safetensors(f)):
            freed += f.stat().st_size
            f.unlink()
    return freed


def is_safetensors(path):
    """Whether a file starts as safetensors does: 8 bytes of header length, then the JSON header's '{'."""
    try:
        with open(path, "rb") as f:
            return f.read(9)[8:] == b"{"
    except OSError:  # unreadable: not ours to remove
        return False


def release(out):
    f = HELD.pop(str(Path(out).resolve()), None)
    if f:
        f.close()


def training_in(out):
    """The process id of the train.py training into `out` now ("?" if it has not written it yet); None if
    none is, and where there is no flock to tell."""
    try:
        import fcntl
        f = open(Path(out) / LOCK)
    except (ImportError, OSError):
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return f.read().strip() or "?"
    return None


def run_cache_dir(config):
    """The cache folder a checkpoint's run used, where it is still there (train.py keeps it as an absolute
    path); else `cache` in the working folder. An explicit --cache-dir wins over both."""
    kept = config.get("train", {}).get("cache_dir")
    return kept if kept and os.path.isdir(kept) else "cache"


def refuse_a_file(out):
    """A checkpoint is the folder train.py wrote; its checkpoint.safetensors alone is a one-line error."""
    if not str(out).strip():  # Path("") is the working folder: the error would suggest train.py --out ''
        raise SystemExit("error: --ckpt is empty (give the folder train.py wrote; . names this one)")
    if Path(out).is_file():
        raise SystemExit(f"error: {out} is a file; a checkpoint is the folder train.py wrote (try {Path(out).parent})")


class Checkpoint:
    """A checkpoint file opened for reading: config, step and metadata at once; tensors on demand,
    one group at a time (so resuming a large run never holds every tensor twice)."""

    def __init__(self, out):
        from safetensors import safe_open
        self.path = Path(out) / CHECKPOINT
        refuse_a_file(out)
        if not self.path.exists():
            log, train = Path(out) / "log.jsonl", f"`python train.py --out {shell(out)}`"
            steps = len({logged_step(line) for line in log.read_bytes().splitlines()} - {None}) if log.exists() else 0
            pid, locked = training_in(out), (Path(out) / LOCK).exists()  # no lock file: no flock here (Windows)
            if pid or (steps and not locked):
                raise SystemExit(f"error: no checkpoint at {self.path} yet: the run training into {out}"
                                 + (f" (process {pid})" if pid else "") + f" has logged {steps} steps and saves its "
                                 "first checkpoint after --save-every steps (by default 500 on the tiny tier, 2000 on "
                                 "the paper tier); wait for it"
                                 + ("" if pid else " (a run stopped before then saved none: train again)"))
            if steps:
                raise SystemExit(f"error: no checkpoint at {self.path}: the run that trained into {out} stopped "
                                 "before its first checkpoint (--save-every steps); run its train.py command again")
            raise SystemExit(f"error: no checkpoint at {self.path}; train one with {train}")
        try:
            with safe_open(str(self.path), "pt") as f:
                self.meta = f.metadata() or {}
                self.keys = list(f.keys())
            self.config = json.loads(self.meta["config"])
            self.step = int(self.meta["step"])
        except Exception as err:  # truncated file, bad header, missing metadata
            self.fail(f"is unreadable or incomplete ({type(err).__name__}: {err}); retrain or restore it")

    def fail(self, why):
        raise SystemExit(f"error: checkpoint {self.path} {why}") from None

    def tensors(self, prefix):
        """{key without `prefix.`: tensor} for the keys under `prefix.`."""
        from safetensors import safe_open
        try:
            with safe_open(str(self.path), "pt") as f:
                return {k[len(prefix) + 1:]: f.get_tensor(k) for k in self.keys if k.startswith(prefix + ".")}
        except Exception as err:
            self.fail(f"is unreadable or incomplete ({type(err).__name__}: {err}); retrain or restore it")

    def load_model(self, model, name):
        """Load the weights stored under `name.` into model; a mismatch is a one-line error."""
        try:
            missing, unexpected = model.load_state_dict(self.tensors(name), strict=False)
        except RuntimeError as err:
            lines = str(err).strip().splitlines()
            self.fail(f"does not match its config ({name}: {lines[1 if len(lines) > 1 else 0].strip()}; or the "
                      "code's models changed since it was written)")
        tied = {k for k in missing if k.endswith("lm_head.weight")}
        if set(missing) - tied or unexpected:
            self.fail(f"does not match its config ({name}: missing {sorted(set(missing) - tied)[:3]}, "
                      f"unexpected {sorted(unexpected)[:3]}; or the code's models changed since it was written)")

    def restore_rng(self, device):
        """The random streams as they were at the save: the CPU's, and the GPU's where the saved run and
        this one train on one (the batch's noise is drawn on the training device)."""
        rng = self.tensors("rng")
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and str(device).startswith("cuda"):
            torch.cuda.set_rng_state(rng["cuda"], device)

    def load_optimizer(self, opt, name):
        """AdamW's moments and step counts from the checkpoint; the groups' learning rates stay as this
        command built the optimizer, so that a --resume may lower them (after a nan loss, say)."""
        state = {}
        for key, value in self.tensors(name).items():
            i, k = key.split(".", 1)
            state.setdefault(int(i), {})[k] = value
        saved, built = json.loads(self.meta[f"{name}.param_groups"]), opt.state_dict()["param_groups"]
        if [len(g["params"]) for g in saved] != [len(g["params"]) for g in built]:
            self.fail(f"holds the {name} state of other parameters than the model's (the code may have changed)")
        opt.load_state_dict({"state": state, "param_groups": built})


def checkpoint_tokenizer(out):
    """The tokenizer train.py saved beside a checkpoint; a one-line error when its folder is missing."""
    folder = Path(out) / "tokenizer"
    if not folder.is_dir():
        raise SystemExit(f"error: {out} has no tokenizer/ folder (train.py writes it beside {CHECKPOINT}); "
                         "copy the whole checkpoint folder")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(folder))  # a folder of the run's own: nothing to download
    except (ValueError, OSError) as err:  # a damaged tokenizer.json (UnicodeDecodeError too), an emptied folder
        raise SystemExit(f"error: the tokenizer in {folder} is unreadable or incomplete ({type(err).__name__}); "
                         "copy the checkpoint folder again, or retrain") from None


def load_for_inference(out, device="cpu"):
    """Rebuild (config, EMA prior, decoder, tokenizer, mu, s) from a checkpoint directory alone."""
    ckpt = Checkpoint(out)
    prior, decoder = build_models(ckpt.config)
    ckpt.load_model(prior, "prior_ema")
    ckpt.load_model(decoder, "decoder")
    tokenizer = checkpoint_tokenizer(out)
    stats = ckpt.tensors("stats")
    return ckpt.config, prior.to(device).eval(), decoder.to(device).eval(), tokenizer, \
        stats["mu"].to(device), stats["s"].to(device)


def logged_step(line):
    """The step of one log.jsonl line, or None for what is not a line of the log (blank, cut short, edited)."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, TypeError, KeyError):  # not JSON (or not UTF-8), or JSON without a step
        return None
    return step if isinstance(step, int) else None


class LossLog:
    """out/log.jsonl: one line of losses (and, every --log-every steps, throughput) per step, and on C4 one
    per window (its preparation time). On
    --resume the lines after the checkpoint's step are dropped: the log of an uninterrupted run."""

    def __init__(self, path, start_step):
        self.path = Path(path)
        lines = self.path.read_bytes().splitlines() if start_step and self.path.exists() else []
        steps = [logged_step(line) for line in lines]
        kept = [line.decode() for line, step in zip(lines, steps) if step is not None and step <= start_step]
        unreadable = sum(step is None and bool(line.strip()) for line, step in zip(lines, steps))
        if unreadable:  # a line cut short by a crash or a full disk, or an edit: the losses of the others are kept
            print(f"note: {self.path}: {unreadable} unreadable line(s) left out", file=sys.stderr)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(l + "\n" for l in kept))
        self.file = open(self.path, "a")

    def write(self, step, **values):
        rounded = {k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()}
        self.file.write(json.dumps(dict(step=step, **rounded)) + "\n")
        self.file.flush()
