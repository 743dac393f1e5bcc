"""What train.py trains on, batch by batch: unit embeddings and token ids of (prefix, continuation) pairs.

  Batches      deterministic, length-grouped batches: an epoch's order depends only on (seed, epoch)
  Window       examples ready to train on: embeddings (held-out rows set apart), token ids, batches
  Corpus       a corpus read whole (tiny, a file): one Window, trained on for as many epochs as the steps need
  C4Windows    --data c4: consecutive windows of the stream, each embedded once (stored on disk) and prepared
               in a background thread while the previous one trains; under torchrun every process embeds
               its share of each window
  load_data    the data source of a run, its tokenizer and its embedding cache

Every source answers batch(step) -> (e_prefix (B, d), e_cont (B, d), prefix_ids, cont_ids), and state()
(what --resume needs to rebuild it), saved() (a checkpoint was written) and close() (the run ended).
"""
import concurrent.futures
import json
import math
import threading
import time

import numpy as np
import torch
from tqdm import tqdm

import data as data_lib
from decoder import TINY_LM, encode_continuation, fit_length, load_tokenizer, train_tokenizer
from encoder import (EmbeddingCache, cache_dir_for, disk_usage, embed_share, join_shares, window_embeddings,
                     window_file)
from utils import checkpoint_tokenizer


class Batches:
    """Deterministic, length-grouped batches: an epoch's order depends only on (seed, epoch).

    Texts of similar length share a batch (sorted inside blocks of 16 batches), which
    removes most padding from the decoder step; the batch order is shuffled.
    """

    def __init__(self, lengths, batch_size, seed):
        self.lengths, self.batch_size, self.seed = np.asarray(lengths), batch_size, seed
        self.per_epoch = max(1, len(lengths) // batch_size)
        self.current = (None, None)  # (epoch, its batches): computed once per epoch, not per step

    def epoch(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        block = 16 * self.batch_size
        for i in range(0, len(order), block):
            part = order[i:i + block]
            order[i:i + block] = part[np.argsort(self.lengths[part], kind="stable")]
        batches = [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(self.per_epoch)]
        return [rng.permutation(batches[i]) for i in rng.permutation(len(batches))]

    def get(self, step):
        epoch = step // self.per_epoch
        if self.current[0] != epoch:
            self.current = (epoch, self.epoch(epoch))
        return self.current[1][step % self.per_epoch]


class Window:
    """Examples ready to train on: unit embeddings, token ids and length-grouped batches.

    A corpus read whole (tiny, a file) is one window trained on for as many epochs as the steps
    need; C4 is a sequence of windows, each trained on once, from step `start` to `end`.
    """

    def __init__(self, examples, e_prefix, e_cont, tokenizer, room, batch_size, seed, start=0, position=None):
        self.held = held = np.array([data_lib.is_held_out(ex["text"]) for ex in examples], dtype=bool)
        self.examples = [ex for ex, h in zip(examples, held) if not h]
        self.held_out = [ex for ex, h in zip(examples, held) if h]
        if e_prefix is not None:  # else set_embeddings, once they are ready (C4 under torchrun)
            self.set_embeddings(e_prefix, e_cont)
        prefix_ids = tokenizer([ex["prefix"] for ex in self.examples], add_special_tokens=False)["input_ids"]
        pairs = [fit_length(p, encode_continuation(tokenizer, ex["continuation"]), room)
                 for p, ex in zip(prefix_ids, self.examples)]
        self.prefix_ids, self.cont_ids = [p for p, _ in pairs], [c for _, c in pairs]
        self.batches = Batches([len(p) + len(c) for p, c in pairs], batch_size, seed)
        self.start, self.position = start, position  # position: where this window starts in the C4 stream
        self.end = math.inf  # a corpus read whole; a C4 window ends after one pass (C4Windows.load)

    def set_embeddings(self, e_prefix, e_cont):
        """The unit embeddings (n, d) of every example, in the order given; held-out rows set apart."""
        self.e_prefix, self.e_cont = torch.from_numpy(e_prefix[~self.held]), torch.from_numpy(e_cont[~self.held])
        self.held_out_e_cont = torch.from_numpy(e_cont[self.held])

    def batch(self, step):
        """-> e_prefix (B, d), e_cont (B, d), prefix_ids, cont_ids of the batch of `step`."""
        idx = self.batches.get(step - self.start)
        return (self.e_prefix[idx], self.e_cont[idx], [self.prefix_ids[i] for i in idx],
                [self.cont_ids[i] for i in idx])


class Corpus:
    """A corpus read whole (tiny, a file): one Window, trained on for as many epochs as the steps need."""

    def __init__(self, window):
        self.window = window

    def batch(self, step):
        return self.window.batch(step)

    def state(self):
        return None  # batches are a function of the seed and the step: nothing else to resume

    def saved(self):
        pass  # nothing on disk to let go of

    def close(self):
        pass  # nothing runs in the background


class C4Windows:
    """--data c4: consecutive windows of --window examples of the stream. Each is embedded once
    (stored on disk by encoder.window_embeddings) and prepared in a background thread while the
    previous window trains; the time training waits for it is reported. Under torchrun every process
    prepares each window (the first included) and embeds its share of the texts (encoder.embed_share);
    the main process joins the shares into the window's file (joined)."""
    PART = 8192  # texts embedded at a time: a run that ends stops its background thread between two parts

    def __init__(self, args, tokenizer, cache, room, dist, state=None):
        self.args, self.tokenizer, self.cache, self.room, self.dist = args, tokenizer, cache, room, dist
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.stopping = threading.Event()
        self.next = None  # the future of the next window
        self.trained = []  # --drop-windows: files of the windows trained past, deleted at the next save
        self.started, self.log = time.time(), None
        state = state or {"start": 0, "position": None}
        if dist.is_main:
            print(f"C4: reading the window from step {state['start']} ({args.window} examples), then embedding it "
                  "unless the cache has it")
        self.window = self.joined(self.load(state["start"], state["position"], dist.world > 1, dist.is_main))
        cache.encoder()  # here, not first in the background thread that embeds the next window

    def batch(self, step):
        """The batch of `step`, moving on to the next window (prepared in the background) when due."""
        if step >= self.window.end:
            began = time.time()
            if self.args.drop_windows and self.dist.is_main:
                self.trained.append(window_file(self.window.source, self.cache.dir)[1])
            self.window = self.joined(self.next.result())
            self.prefetch()
            self.report(time.time() - began)
        return self.window.batch(step)

    def joined(self, window):
        """Under torchrun, `window` with its embeddings, once every process has stored its share and the
        main process has joined them into the window's file (encoder.join_shares)."""
        if self.dist.world > 1:
            self.dist.barrier()  # every process has stored its share of the window's embeddings
            if self.dist.is_main:
                join_shares(window.source, self.cache.dir, self.dist.world)
            self.dist.barrier()  # the window's file is whole
            window.set_embeddings(*window_embeddings(window.source, self.cache.dir, self.cache.embed))
        return window

    def embed(self, texts, show_progress=False):
        """The encoder's embeddings of texts (EmbeddingCache.embed), PART texts at a time, stopping
        between two parts once the run has ended (close): Python's exit waits for this thread."""
        parts = []
        bar = tqdm(total=len(texts), unit=" texts", desc="embedding its prefixes and continuations",
                   disable=not show_progress)
        with bar:
            for i in range(0, len(texts), self.PART):
                if self.stopping.is_set():  # (before the first part too: the run may end while the window is read)
                    raise RuntimeError("the run ended while this window was being prepared")
                parts.append(self.cache.embed(texts[i:i + self.PART]))
                bar.update(len(parts[-1]))
        return np.concatenate(parts) if parts else self.cache.embed(texts)

    def close(self):
        """Stop preparing the next window: a Ctrl-C or --stop-at exits once the window's texts are read,
        or after at most one more part of their embedding."""
        self.stopping.set()
        self.pool.shutdown(cancel_futures=True)

    def state(self):
        """Where the current window starts (step and stream position): --resume rebuilds it from this."""
        return {"start": self.window.start, "position": self.window.position}

    def saved(self):
        """A checkpoint in the current window was written: with --drop-windows, the files of the windows
        before it go (no --resume needs them again; the next window, maybe in preparation, stays)."""
        for path in self.trained:
            path.unlink(missing_ok=True)
        self.trained = []

    def report(self, waited):
        wall = time.time() - self.started
        if self.dist.is_main:
            tqdm.write(f"C4 window from step {self.window.start}: {len(self.window.examples)} examples, prepared in "
                       f"{self.window.seconds:.0f} s in the background; training waited {waited:.1f} s "
                       f"({100 * waited / wall:.1f}% of the wall time); embedding cache "
                       f"{disk_usage(self.cache.dir) / 1e9:.2f} GB on disk")
        if self.log:
            self.log.write(self.window.start, window_seconds=self.window.seconds, window_wait_seconds=waited)

    def load(self, start, position, share=False, show_progress=False):
        """The window that starts at `position` of the stream and at step `start`; with share, only this
        process's share of its embeddings is computed (set_embeddings follows once they are joined)."""
        began = time.time()
        examples, next_position = data_lib.c4_window(self.tokenizer, self.args.c4_path, self.args.seed, position,
                                                     self.args.window, self.args.max_prefix_frac)
        trained = sum(not data_lib.is_held_out(ex["text"]) for ex in examples)
        if trained < self.args.batch_size:  # else the window's one batch would be smaller than asked
            if len(examples) < self.args.window:
                raise SystemExit(f"error: the C4 stream ran out ({trained} training examples left, a batch needs "
                                 f"{self.args.batch_size})")
            raise SystemExit(f"error: the window from step {start} holds {trained} training examples once the "
                             f"held-out ones ({data_lib.HELD_OUT_PERCENT}%) are set apart, fewer than a batch of "
                             f"{self.args.batch_size}; give a larger --window")
        if show_progress and not window_file(examples, self.cache.dir)[1].exists() \
                and any(self.cache.dir.glob("window-*.safetensors")):  # the first window, in the main process
            print("note: the cache holds other C4 windows but not this one; a window is found by its texts, which "
                  "--seed, --max-prefix-frac, --window, the tokenizer and the C4 copy change (encoder.py --data c4 "
                  "fills windows with its own flags: give it the run's)")
        if share:
            embed_share(examples, self.cache.dir, self.embed, self.dist.rank, self.dist.world, show_progress)
        e_prefix, e_cont = (None, None) if share else \
            window_embeddings(examples, self.cache.dir, self.embed, show_progress)
        window = Window(examples, e_prefix, e_cont, self.tokenizer, self.room, self.args.batch_size, self.args.seed,
                        start, position)
        window.source = examples
        window.end = start + window.batches.per_epoch
        window.next_position, window.seconds = next_position, time.time() - began
        return window

    def prefetch(self):
        """Start preparing the next window (under torchrun in every process, each embedding its share),
        unless the run ends (--steps, --stop-at) before it."""
        if self.window.end < min(self.args.steps, self.args.stop_at or self.args.steps):
            self.next = self.pool.submit(self.load, self.window.end, self.window.next_position, self.dist.world > 1)


def read_corpus(args, tokenizer, cache, room, report=True):
    """--data tiny or a file -> (one Window over the whole corpus, tokenizer); trains the tiny BPE."""
    rows = data_lib.load_corpus(args.data, args.cache_dir)
    if args.data != "tiny":  # a --resume may find the file elsewhere: its content says it is the same
        args.data_sha256 = data_lib.sha256_of(args.data)
    train, held_out = data_lib.make_examples(rows, args.seed, args.max_prefix_frac)
    if len(train) < args.batch_size:  # else every batch would be the whole corpus, smaller than asked
        raise SystemExit(f"error: --batch-size {args.batch_size} is more than the {len(train)} training texts of "
                         f"{args.data}; pass a smaller --batch-size (and --decoder-batch), or more texts")
    began = time.time()
    if tokenizer is None:
        tokenizer = train_tokenizer([ex["text"] for ex in train], args.vocab_size) if args.lm == TINY_LM \
            else load_tokenizer(args.lm)
    examples, tokenized = train + held_out, time.time()
    e_cont = cache.encode([ex["continuation"] for ex in examples])
    e_prefix = cache.encode([ex["prefix"] for ex in examples])
    if report:  # the main process's line; under torchrun the others read the same corpus
        print(f"data: {len(train)} training texts, {len(held_out)} held out; {len(cache)} texts in the embedding "
              f"cache (tokenizer {tokenized - began:.0f} s, embedding {time.time() - tokenized:.0f} s)")
    return Window(examples, e_prefix, e_cont, tokenizer, room, args.batch_size, args.seed), tokenizer


def load_data(args, ckpt, dist):
    """-> (Corpus or C4Windows, tokenizer, embedding cache). A corpus: the main process goes first (it
    trains the tokenizer and fills the embedding cache), the others read its work. C4: every process
    reads the tokenizer (GPT-2's, or the checkpoint's) and embeds its share of the first window, as of
    every later one."""
    corpus = args.data != "c4"
    if corpus and not dist.is_main:
        dist.barrier()  # the main process has written the tokenizer and the cache (setup)
    tokenizer = checkpoint_tokenizer(args.out) if ckpt or (corpus and not dist.is_main) else \
        load_tokenizer(args.lm) if args.lm != TINY_LM else None
    cache = EmbeddingCache(cache_dir_for(args.cache_dir, args.encoder), args.encoder, args.encode_device,
                           dtype="bf16" if args.bf16 else None)
    if corpus:
        window, tokenizer = read_corpus(args, tokenizer, cache, args.max_len, report=dist.is_main)
        return Corpus(window), tokenizer, cache
    c4 = C4Windows(args, tokenizer, cache, args.max_len, dist, json.loads(ckpt.meta.get("data", "null")) if ckpt else None)
    if dist.is_main:
        print(f"C4 window from step {c4.window.start}: {len(c4.window.examples)} examples, prepared in "
              f"{c4.window.seconds:.0f} s; embedding cache {disk_usage(cache.dir) / 1e9:.2f} GB on disk (fp16)")
    return c4, tokenizer, cache
