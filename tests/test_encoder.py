"""encoder.py: the sentence encoder (a tiny sentence-T5 built from configs), the embedding cache,
the C4 window files and standardisation."""
import numpy as np
import pytest
import torch

import data
import encoder as encoder_lib
from conftest import T5_TEXTS, UNREACHABLE_HUB, hub_cache, no_encoder, run_python


def test_tiny_sentence_t5_loads_and_the_cache_never_encodes_twice(tiny_t5, tmp_path, monkeypatch):
    model = encoder_lib.load_encoder(tiny_t5)
    e = encoder_lib.embed(model, T5_TEXTS)
    assert e.shape == (len(T5_TEXTS), 24) and e.dtype == np.float32  # the Dense layer's width
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)

    cache = encoder_lib.EmbeddingCache(tmp_path / "cache", tiny_t5)
    np.testing.assert_allclose(cache.encode(T5_TEXTS, show_progress=False), e, atol=1e-5)
    monkeypatch.setattr(encoder_lib, "load_encoder", no_encoder)
    cache.model = None
    again = cache.encode(T5_TEXTS[::-1], show_progress=False)        # same instance: all hits
    warm = encoder_lib.EmbeddingCache(tmp_path / "cache", tiny_t5)   # fresh instance, from disk
    np.testing.assert_array_equal(warm.encode(T5_TEXTS, show_progress=False), again[::-1])
    assert len(list((tmp_path / "cache").glob("shard-*.safetensors"))) == 1


def test_half_precision_encoder_still_gives_unit_vectors(tiny_t5):
    e32 = encoder_lib.embed(encoder_lib.load_encoder(tiny_t5), T5_TEXTS)
    e16 = encoder_lib.embed(encoder_lib.load_encoder(tiny_t5, dtype="bf16"), T5_TEXTS)
    np.testing.assert_allclose(np.linalg.norm(e16, axis=1), 1.0, atol=1e-5)
    assert (e16 * e32).sum(1).min() > 0.98


def test_standardize_round_trip_and_the_projection_onto_the_sphere():
    torch.manual_seed(0)
    e = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    mu, s = encoder_lib.latent_stats(torch.nn.functional.normalize(torch.randn(100, 16), dim=-1))
    x = encoder_lib.standardize(e, mu, s)
    torch.testing.assert_close(encoder_lib.unstandardize(x, mu, s), e)                # latents of unit vectors
    torch.testing.assert_close(encoder_lib.project_to_sphere(x, mu, s), x, atol=1e-5, rtol=1e-5)  # are fixed
    off = x + torch.randn_like(x)  # a prior sample is not the latent of a unit vector ...
    projected = encoder_lib.project_to_sphere(off, mu, s)
    assert (projected - off).abs().max() > 0.1
    torch.testing.assert_close(encoder_lib.project_to_sphere(projected, mu, s), projected, atol=1e-5, rtol=1e-5)
    assert torch.allclose((mu + s * projected).norm(dim=-1), torch.ones(5), atol=1e-5)  # ... its projection is


def test_the_embedding_cache_tells_texts_apart_by_case():
    assert encoder_lib.text_key("Good") != encoder_lib.text_key("good")  # sentence-T5 is cased


def test_latents_are_standardised_dimension_by_dimension():
    # unit vectors whose dimensions spread unequally: each dimension gets its own mean and std
    e = torch.nn.functional.normalize(torch.randn(2000, 8) * torch.tensor([4.0, 2, 1, 1, 1, 1, 0.5, 0.1]) + 0.3, dim=-1)
    mu, s = encoder_lib.latent_stats(e)
    x = encoder_lib.standardize(e, mu, s)
    torch.testing.assert_close(x.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(0), torch.ones(8))


def window_of(texts):
    return [{"text": t, "prefix": " ".join(t.split()[:2]), "continuation": " ".join(t.split()[2:])} for t in texts]


def test_window_embeddings_are_computed_once_stored_in_fp16_and_read_back(tiny_t5, tmp_path, monkeypatch):
    model = encoder_lib.load_encoder(tiny_t5)
    calls = []
    encode = lambda texts, show_progress=False: calls.append(len(texts)) or encoder_lib.embed(model, texts)
    examples = window_of(T5_TEXTS[:5] + ["The cat ran"])  # "The cat" is a prefix twice: embedded once
    e_prefix, e_cont = encoder_lib.window_embeddings(examples, tmp_path, encode)
    assert e_prefix.shape == e_cont.shape == (6, 24) and e_prefix.dtype == np.float32
    texts = [ex["prefix"] for ex in examples] + [ex["continuation"] for ex in examples]
    assert calls == [len(set(texts))]
    exact = encoder_lib.embed(model, [ex["continuation"] for ex in examples])
    np.testing.assert_allclose(e_cont, exact, atol=1e-3)  # fp16 on disk
    files = list(tmp_path.glob("window-*.safetensors"))
    assert len(files) == 1 and files[0].stat().st_size < 2 * 12 * 24 + 400  # 2 bytes a component + header
    again = encoder_lib.window_embeddings(examples, tmp_path, lambda *a, **k: pytest.fail("encoded twice"))
    np.testing.assert_array_equal(again[1], e_cont)
    encoder_lib.window_embeddings(window_of(T5_TEXTS[2:]), tmp_path, encode)  # another window: its own file
    assert len(list(tmp_path.glob("window-*.safetensors"))) == 2


def test_encoder_cli_fills_the_windows_that_training_reads(c4_copy, tiny_t5, tmp_path, monkeypatch):
    root, _, tokenizer = c4_copy
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    encoder_lib.main(["--data", "c4", "--c4-path", str(root), "--tokenizer", str(tmp_path / "tok"), "--window", "4",
                      "--max-texts", "8", "--cache-dir", str(tmp_path / "cache"), "--encoder", tiny_t5,
                      "--device", "cpu", "--seed", "5"])  # a seed of the run's own: its prefix split
    directory = encoder_lib.cache_dir_for(tmp_path / "cache", tiny_t5)
    assert len(list(directory.glob("window-*.safetensors"))) == 2
    position = None
    for _ in range(2):  # train.py's windows of the same size find their embeddings on disk
        examples, position = data.c4_window(tokenizer, root, 5, position, 4, 1.0)
        e_prefix, _ = encoder_lib.window_embeddings(examples, directory, lambda *a, **k: pytest.fail("re-encoded"))
        assert e_prefix.shape == (4, 24)
    for w in directory.glob("window-*.safetensors"):
        w.unlink()
    encoder_lib.main(["--data", "c4", "--c4-path", str(root), "--tokenizer", str(tmp_path / "tok"), "--window", "4",
                      "--first-window", "1", "--max-texts", "4", "--cache-dir", str(tmp_path / "cache"),
                      "--encoder", tiny_t5, "--device", "cpu"])  # the second window alone, as another GPU would
    _, position = data.c4_window(tokenizer, root, 0, None, 4, 1.0)
    second, _ = data.c4_window(tokenizer, root, 0, position, 4, 1.0)
    assert encoder_lib.window_embeddings(second, directory, lambda *a, **k: pytest.fail("re-encoded"))[0].shape == (4, 24)
    assert len(list(directory.glob("window-*.safetensors"))) == 1  # the first one was only read


def test_an_encoder_that_cannot_be_downloaded_fails_in_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match="could not load the sentence encoder 'someone/not-here'.*--encoder"):
        encoder_lib.load_encoder("someone/not-here")
    # a local folder that is not there is named as one (sentence-transformers printed a hub warning first)
    for name in ("/no/such/st5", "./st5", "~/no-such-st5"):
        with pytest.raises(SystemExit, match=f"the sentence encoder folder '{name}' does not exist"):
            encoder_lib.load_encoder(name)


def test_encoder_cli_offline_names_every_download_it_needs_in_one_line(tmp_path):
    """It named the tokenizer, then on the next try C4, then the encoder: three runs to learn what it lacks."""
    from conftest import assert_one_line_error, run_script
    result = run_script("encoder.py", "--data", "c4", "--encoder", "sentence-transformers/sentence-t5-xl",
                        "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path,
                        env={"DGLM_C4_PATH": "", "HF_HUB_CACHE": str(tmp_path / "hub"), **UNREACHABLE_HUB})
    assert_one_line_error(result, "error: could not download gpt2 (--tokenizer), sentence-transformers/sentence-t5-xl "
                                  "(--encoder), allenai/c4 (--c4-path); without internet pass local copies")


def test_offline_without_hf_hub_offline_an_encoder_in_the_hub_cache_loads_by_its_hub_id(tiny_t5, tmp_path):
    """The paper tier's path: trained online, sampled offline. The hub does not answer (an address nothing
    listens on), so hub_answers switches the libraries offline and the cached copy loads at once."""
    hub_cache(tmp_path / "hub", "someone/st5", tiny_t5)
    script = ("import sys, time, numpy as np, encoder\n"
              "time.sleep = lambda s: sys.exit(f'a retry after {s} s')\n"
              "by_id = encoder.embed(encoder.load_encoder('someone/st5'), ['the cat sat'])\n"
              f"by_folder = encoder.embed(encoder.load_encoder({tiny_t5!r}), ['the cat sat'])\n"
              "np.testing.assert_allclose(by_id, by_folder, atol=1e-6)\n"
              "print('ok')")
    result = run_python(script, {**UNREACHABLE_HUB, "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-1500:]
    assert "Retrying" not in result.stderr


def test_the_encoder_runs_in_bf16_by_default_only_where_the_device_computes_it_natively(monkeypatch):
    monkeypatch.setattr(encoder_lib, "native_bf16", lambda device: device == "cuda")
    assert encoder_lib.default_dtype("cuda") == "bf16" and encoder_lib.default_dtype("cpu") is None


def test_non_finite_embeddings_are_refused_in_one_line_naming_a_text():
    class MeanPoolingOverNoTokens:  # what a tokenizer that gives "" no token does to mean pooling
        def encode(self, texts, **kwargs):
            return np.array([[np.nan, np.nan] if not t else [0.6, 0.8] for t in texts], dtype=np.float32)

        def parameters(self):
            return iter([torch.zeros(1)])

    assert encoder_lib.embed(MeanPoolingOverNoTokens(), ["a", "b"]).shape == (2, 2)
    with pytest.raises(SystemExit, match=r"non-finite embeddings for 1 of 3 texts \(the first: ''\)"):
        encoder_lib.embed(MeanPoolingOverNoTokens(), ["a", "", "b"])


def test_shares_of_a_window_join_into_the_one_process_file_and_stale_shares_go(tmp_path):
    """Each process embeds every world-th distinct text (embed_share); join_shares makes the file one
    process would have stored, then removes the shares, and removes a stopped run's shares when the
    window's file was stored meanwhile (encoder.py ahead of the run)."""
    examples = [{"prefix": p, "continuation": c} for p, c in [("", "a b"), ("a", "b c"), ("", "d"), ("x y", "a b")]]
    texts = dict.fromkeys(t for ex in examples for t in ex.values())
    vectors = {t: np.full(4, i, dtype=np.float32) for i, t in enumerate(texts)}  # a vector of its own for each text
    encode = lambda texts, show_progress=False: np.stack([vectors[t] for t in texts])
    one, two = tmp_path / "one", tmp_path / "two"
    e_one = encoder_lib.window_embeddings(examples, one, encode)
    for rank in (0, 1):
        encoder_lib.embed_share(examples, two, encode, rank, 2)
    assert len(list(two.glob("*.share-*"))) == 2
    encoder_lib.join_shares(examples, two, 2)
    assert not list(two.glob("*.share-*"))
    for a, b in zip(e_one, encoder_lib.window_embeddings(examples, two, lambda *a: pytest.fail("embedded again"))):
        np.testing.assert_array_equal(a, b)
    encoder_lib.embed_share(examples, tmp_path / "three", encode, 1, 2)  # a run stopped after its share...
    _, path = encoder_lib.window_file(examples, tmp_path / "three")
    encoder_lib.window_embeddings(examples, tmp_path / "three", encode)  # ...and the window stored meanwhile
    encoder_lib.join_shares(examples, tmp_path / "three", 2)
    assert path.exists() and not list((tmp_path / "three").glob("*.share-*"))


def test_an_encoder_stored_in_fp16_loads_in_fp32_unless_asked(tiny_t5, tmp_path):
    """sentence-t5-xl's checkpoint is fp16; T5 overflows in fp16, and dtype None means fp32."""
    encoder_lib.load_encoder(tiny_t5).half().save(str(tmp_path / "fp16"))
    dtypes = lambda model: {p.dtype for p in model.parameters()}
    assert dtypes(encoder_lib.load_encoder(str(tmp_path / "fp16"))) == {torch.float32}
    assert dtypes(encoder_lib.load_encoder(str(tmp_path / "fp16"), dtype="bf16")) == {torch.bfloat16}


def test_each_encoder_folder_has_a_cache_of_its_own_whatever_its_name(tmp_path, monkeypatch):
    """The cache was named by --encoder as typed, `/` turned into `_`: `enc` typed in two working folders (two
    models) shared one cache, as did `x/enc` and `x_enc`, and a run trained on the other model's embeddings."""
    for folder in ("a/enc", "b/enc", "x/enc", "x_enc", "minilm"):
        (tmp_path / folder).mkdir(parents=True)
    name = lambda encoder: encoder_lib.cache_dir_for("cache", encoder).relative_to("cache/embeddings")
    monkeypatch.chdir(tmp_path / "a")
    in_a = name("enc")
    assert name(str(tmp_path / "a" / "enc")) == in_a  # one folder, however it is typed
    monkeypatch.chdir(tmp_path / "b")
    assert name("enc") != in_a
    monkeypatch.chdir(tmp_path)
    names = [name(n) for n in ("x/enc", "x_enc", "someone/st5", "someone_st5", "minilm")]
    assert len(set(names)) == len(names) and len(names[0].parts) == 1
    assert str(names[-1]) == "minilm"  # the shipped model's alias, not the folder of that name


def test_a_damaged_cache_file_is_named_in_one_line(tiny_t5, tmp_path):
    cache = encoder_lib.EmbeddingCache(tmp_path / "cache", tiny_t5)
    cache.encode(T5_TEXTS, show_progress=False)
    shard = next((tmp_path / "cache").glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:len(shard.read_bytes()) // 2])  # as a full disk or a crash leaves it
    with pytest.raises(SystemExit, match=f"^error: the embedding cache file {shard} is damaged .*; delete it"):
        encoder_lib.EmbeddingCache(tmp_path / "cache", tiny_t5)
    examples = [{"prefix": "", "continuation": "a b"}]
    encode = lambda texts, show_progress=False: np.ones((len(texts), 4), dtype=np.float32)
    encoder_lib.window_embeddings(examples, tmp_path / "windows", encode)
    _, window = encoder_lib.window_file(examples, tmp_path / "windows")
    window.write_bytes(b"not safetensors")
    with pytest.raises(SystemExit, match=f"^error: the embedding cache file {window} is damaged"):
        encoder_lib.window_embeddings(examples, tmp_path / "windows", encode)


def test_a_folder_that_holds_no_model_and_an_empty_name_are_one_line(tmp_path):
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match=f"^error: the folder {tmp_path} holds no sentence-transformers model"):
        encoder_lib.load_encoder(str(tmp_path))
    with pytest.raises(SystemExit, match="^error: the sentence encoder's name is empty"):
        encoder_lib.load_encoder("")  # an empty model that failed at its first text with an AttributeError
    from decoder import load_tokenizer
    with pytest.raises(SystemExit, match=f"^error: the folder {tmp_path} holds no tokenizer that loads"):
        load_tokenizer(str(tmp_path))


def test_encoder_cli_says_when_the_stream_ends_before_its_first_window(c4_copy, tiny_t5, tmp_path, capsys,
                                                                         monkeypatch):
    root, _, tokenizer = c4_copy
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    args = ["--data", "c4", "--c4-path", str(root), "--tokenizer", str(tmp_path / "tok"), "--window", "4",
            "--cache-dir", str(tmp_path / "cache"), "--encoder", tiny_t5, "--device", "cpu"]
    with pytest.raises(SystemExit, match=r"^error: the C4 stream ends after \d+ windows of 4 \(--first-window 1000\); "
                                         "nothing to embed"):  # it read on for a while and ended without a word
        encoder_lib.main(args + ["--first-window", "1000"])
    made, real = [], encoder_lib.EmbeddingCache
    monkeypatch.setattr(encoder_lib, "EmbeddingCache", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    encoder_lib.main(args + ["--max-texts", "1000"])
    assert made[0].batch_size == encoder_lib.CPU_EMBED_BATCH  # as train.py embeds on a CPU (it ran 256 a pass)
    out = capsys.readouterr().out.splitlines()
    windows = len(list(encoder_lib.cache_dir_for(tmp_path / "cache", tiny_t5).glob("window-*")))
    assert out[-1] == f"the C4 stream ends after {windows} windows"


def test_loading_the_encoder_leaves_the_random_number_generator_as_it_was(tiny_t5):
    """Building the modules draws random numbers: training's draws after it are those of its seed."""
    torch.manual_seed(0)
    state = torch.get_rng_state()
    encoder_lib.load_encoder(tiny_t5)
    assert torch.equal(torch.get_rng_state(), state)


def test_non_finite_embeddings_name_the_first_text_that_gave_them():
    class MeanPoolingOverNoTokens:
        def encode(self, texts, **kwargs):
            return np.array([[np.nan, np.nan] if not t.strip() else [0.6, 0.8] for t in texts], dtype=np.float32)

        def parameters(self):
            return iter([torch.zeros(1)])

    with pytest.raises(SystemExit, match=r"non-finite embeddings for 2 of 4 texts \(the first: ''\)"):
        encoder_lib.embed(MeanPoolingOverNoTokens(), ["a", "", "b", " "])


def test_a_cache_on_the_cpu_as_a_torch_device_embeds_in_the_cpus_batch(tmp_path):
    """evaluate.py passes the model's device, a torch.device, not a string."""
    cache = lambda device: encoder_lib.EmbeddingCache(tmp_path, "minilm", device)
    assert cache(torch.device("cpu")).batch_size == cache("cpu").batch_size == encoder_lib.CPU_EMBED_BATCH
    assert cache("cuda").batch_size == encoder_lib.EMBED_BATCH


def test_windows_whose_texts_join_alike_have_files_of_their_own(tmp_path):
    """The same words split elsewhere (another --seed or --max-prefix-frac) are other texts to embed."""
    one = [{"prefix": "", "continuation": "a"}, {"prefix": "b", "continuation": "c"}]   # texts "", "b", "a", "c"
    two = [{"prefix": "b", "continuation": "a"}, {"prefix": "", "continuation": "c"}]   # texts "b", "", "a", "c"
    assert encoder_lib.window_file(one, tmp_path)[1] != encoder_lib.window_file(two, tmp_path)[1]


def test_a_share_is_used_only_by_a_run_of_as_many_processes_and_never_once_the_window_is_stored(tmp_path):
    """A share stored by a stopped run of two processes holds every 2nd text: a resume on three embeds its own
    thirds. Once the window's file is there, no process embeds anything."""
    examples = [{"prefix": p, "continuation": c} for p, c in [("", "a b"), ("a", "b c"), ("x", "d"), ("x y", "e")]]
    texts = list(dict.fromkeys(t for ex in examples for t in (ex["prefix"], ex["continuation"])))
    vectors = {t: np.full(4, i, dtype=np.float32) for i, t in enumerate(texts)}
    encode = lambda texts, show_progress=False: np.stack([vectors[t] for t in texts])
    one = encoder_lib.window_embeddings(examples, tmp_path / "one", encode)
    encoder_lib.embed_share(examples, tmp_path, encode, 0, 2)  # the stopped run's
    for rank in range(3):
        encoder_lib.embed_share(examples, tmp_path, encode, rank, 3)
    encoder_lib.join_shares(examples, tmp_path, 3)
    fail = lambda *a, **k: pytest.fail("embedded again")
    for a, b in zip(one, encoder_lib.window_embeddings(examples, tmp_path, fail)):
        np.testing.assert_array_equal(a, b)
    for rank in range(2):
        encoder_lib.embed_share(examples, tmp_path, fail, rank, 2)
    assert {f.name for f in tmp_path.glob("*.share-*")} <= {encoder_lib.share_file(encoder_lib.window_file(
        examples, tmp_path)[1], 0, 2).name}  # only the stopped run's own share, which no one reads


def test_encoder_cli_fills_the_cache_that_training_on_a_file_reads(corpus, tiny_t5, tmp_path, monkeypatch):
    """encoder.py --data FILE embeds every text train.py reads with the same --seed and its default prefix
    fraction, held-out texts included: the run then loads no encoder."""
    import train
    encoder_lib.main(["--data", str(corpus), "--seed", "3", "--cache-dir", str(tmp_path / "cache"), "--encoder",
                      tiny_t5, "--device", "cpu"])
    args = train.get_args(["--data", str(corpus), "--seed", "3"])
    examples = sum(data.make_examples(data.load_local(corpus), args.seed, args.max_prefix_frac), [])
    monkeypatch.setattr(encoder_lib, "load_encoder", no_encoder)
    cache = encoder_lib.EmbeddingCache(encoder_lib.cache_dir_for(tmp_path / "cache", tiny_t5), tiny_t5)
    cache.encode([t for ex in examples for t in (ex["prefix"], ex["continuation"])], show_progress=False)


def test_a_file_named_as_the_encoder_is_not_taken_for_a_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match=r"^error: could not load the sentence encoder 'notes.csv' "):
        encoder_lib.load_encoder("notes.csv")


def test_the_windows_of_c4_beside_the_shards_never_make_a_shard_replace_another(tmp_path):
    """A corpus's shards and C4's window files share the encoder's cache folder; --drop-windows deletes windows."""
    encoder_lib.save_fp16(np.ones((2, 4)), tmp_path / "window-0123456789abcdef01234567.safetensors")
    for i in range(2):
        encoder_lib.write_shard(tmp_path, [bytes([i]) * 20], np.full((1, 4), i, dtype=np.float32))
    (tmp_path / "window-0123456789abcdef01234567.safetensors").unlink()
    encoder_lib.write_shard(tmp_path, [bytes([2]) * 20], np.full((1, 4), 2, dtype=np.float32))
    cache = encoder_lib.EmbeddingCache(tmp_path, "minilm")
    assert len(cache) == 3 and sorted(cache.shards[row][i, 0] for row, i in cache.index.values()) == [0, 1, 2]


def test_a_new_shard_never_replaces_one_on_disk_after_a_damaged_one_was_deleted(tmp_path):
    """The damaged-file error says: delete it, and its texts are embedded again; those of the others are kept."""
    for i in range(3):
        encoder_lib.write_shard(tmp_path, [bytes([i]) * 20], np.full((1, 4), i, dtype=np.float32))
    (tmp_path / "shard-00000.safetensors").unlink()
    new = encoder_lib.write_shard(tmp_path, [b"n" * 20], np.full((1, 4), 9, dtype=np.float32))
    assert new.name == "shard-00003.safetensors"
    assert [encoder_lib.read_cache_file(tmp_path / f"shard-0000{i}.safetensors")["emb"][0, 0] for i in (1, 2, 3)] == \
        [1, 2, 9]
