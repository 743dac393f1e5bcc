"""decoder.py: the soft-prompt layout, the training loss and scoring, generation, the repetition penalty."""
import contextlib

import pytest
import torch

import decoder as decoder_module
from decoder import (Decoder, DecoderConfig, augmentation_level, encode_continuation, fit_length, sample_top_p,
                     train_tokenizer)
from encoder import embed, latent_stats, standardize

GREEDY = dict(temperature=0, top_p=0.9)

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "she reads a long book",
             "we cook pasta at night", "the sun is very bright", "my phone battery died"]


def small_decoder(vocab_size, dim=384, hidden_cond=False, **kw):
    config = DecoderConfig(dim=dim, n_soft=4, soft_token_dim=16, soft_width=64, soft_depth=1, soft_heads=2,
                           hidden_cond=hidden_cond, **kw)
    lm = dict(vocab_size=vocab_size, n_layer=2, n_embd=64, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    return Decoder(config, lm, bos_id=0, eos_id=0)


def tiny_decoder(vocab_size, dim=32):
    torch.manual_seed(0)
    config = DecoderConfig(dim=dim, n_soft=3, soft_token_dim=8, soft_width=32, soft_depth=1, soft_heads=2,
                           hidden_cond=False)
    lm = dict(vocab_size=vocab_size, n_layer=2, n_embd=48, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0,
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return Decoder(config, lm, bos_id=0, eos_id=0).eval()


def test_gpt2_runs_the_fused_gelu_and_computes_what_its_own_gelu_did():
    """GPT-2's gelu_new (eight elementwise ops, each output saved for backward) becomes PyTorch's fused
    tanh GELU: the same function, so the same logits in fp32."""
    from transformers import GPT2LMHeadModel
    from transformers.activations import ACT2FN
    decoder = tiny_decoder(50)
    assert decoder.lm.config.activation_function == "gelu_pytorch_tanh"
    assert all(type(block.mlp.act) is type(ACT2FN["gelu_pytorch_tanh"]) for block in decoder.lm.transformer.h)
    unfused = GPT2LMHeadModel(decoder.lm.config.__class__(**{**decoder.lm.config.to_dict(),
                                                             "activation_function": "gelu_new"})).eval()
    unfused.load_state_dict(decoder.lm.state_dict())
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(decoder.lm(ids).logits, unfused(ids).logits, atol=1e-5)


def test_augmentation_level_has_median_0_9_and_the_switch_turns_it_off():
    torch.manual_seed(0)
    a = augmentation_level(100_000, DecoderConfig().noise_shift)
    off = small_decoder(50, noise_augmentation=False).draw_noise(10, "cpu")["a"]
    assert torch.equal(off, torch.ones(10))
    assert a.median().item() == pytest.approx(0.9, abs=0.005)  # sigmoid(0 + 2 ln 3) = 0.9
    assert 0 < a.min().item() and a.max().item() <= 1


def test_layout_puts_slots_between_prefix_and_continuation_and_masks_them():
    torch.manual_seed(0)
    dec = small_decoder(50)
    ids, slots, attn = dec._layout([[5, 6], []], [[7, 8, 9], [10]], left_pad=False)
    assert ids[0].tolist()[:3] == [0, 5, 6] and slots[0, 3:7].all() and ids[0, 7:10].tolist() == [7, 8, 9]
    assert ids[1, 0].item() == 0 and slots[1, 1:5].all() and ids[1, 5].item() == 10
    assert attn[1].tolist() == [1] * 6 + [0] * 10  # training pads to a multiple of PAD_LENGTH (8)
    soft = torch.randn(2, 4, 64)
    emb = dec._embed(ids, slots, soft)
    torch.testing.assert_close(emb[0, 3:7], soft[0])
    torch.testing.assert_close(emb[1, 1:5], soft[1])
    # ids, slots, attn = left padded for generation: the last row element is always the last slot
    ids, slots, attn = dec._layout([[5, 6], []], [[], []], left_pad=True)
    assert slots[:, -1].all() and attn[1].tolist() == [0, 0, 1, 1, 1, 1, 1]


def test_padding_to_few_shapes_leaves_the_loss_as_it_was(monkeypatch):
    torch.manual_seed(0)
    dec = small_decoder(50).eval()
    prefixes, continuations = [[5, 6], [], [7] * 9], [[7, 8, 9], [10], [11, 12]]
    x = torch.randn(3, 384)
    noise = dec.draw_noise(3, "cpu")
    padded = dec(prefixes, continuations, x, noise)
    monkeypatch.setattr(decoder_module, "PAD_LENGTH", 1)
    monkeypatch.setattr(decoder_module, "PAD_SCORED", 1)
    assert dec._layout(prefixes, continuations, left_pad=False)[0].shape[1] == 1 + 9 + 4 + 2
    torch.testing.assert_close(padded, dec(prefixes, continuations, x, noise))


def test_activation_checkpointing_gives_the_same_gradients_without_a_warning(capfd):
    """--grad-checkpointing printed transformers' FutureWarning (the old name) and its use_cache line."""
    import warnings
    torch.manual_seed(0)
    dec = small_decoder(50).train()  # checkpointing acts in training only; dropout is drawn again alike
    prefixes, continuations = [[5, 6], [], [7] * 9], [[7, 8, 9], [10], [11, 12]]
    x, noise = torch.randn(3, 384), dec.draw_noise(3, "cpu")

    def gradients():
        dec.zero_grad()
        torch.manual_seed(1)  # the same dropout masks
        dec(prefixes, continuations, x, noise).backward()
        return [p.grad.clone() for p in dec.lm.parameters() if p.grad is not None]

    plain = gradients()
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning fails the test
        dec.checkpoint_activations()
        checkpointed = gradients()
    assert capfd.readouterr().err == ""
    assert len(plain) == len(checkpointed) and all(torch.allclose(a, b) for a, b in zip(plain, checkpointed))


@pytest.mark.parametrize("hidden_cond", [False, True])
def test_batched_left_padded_generation_matches_one_by_one(hidden_cond):
    torch.manual_seed(0)
    dec = small_decoder(60, hidden_cond=hidden_cond).eval()
    if hidden_cond:  # zero-initialised: give it weights, so each row's bias must stay with its row
        torch.nn.init.normal_(dec.hidden_cond.weight, std=0.1)
    prefixes, x = [[5, 6, 7], [], [9]], torch.randn(3, 384)
    batch = dec.generate(prefixes, x, a=1.0 - 1e-6, max_new_tokens=6, repetition_penalty=1.3, **GREEDY)
    for i in range(3):
        alone = dec.generate(prefixes[i:i + 1], x[i:i + 1], a=1.0 - 1e-6, max_new_tokens=6, repetition_penalty=1.3,
                             **GREEDY)
        assert alone[0] == batch[i][:len(alone[0])]


def test_hidden_cond_bias_reaches_every_position_in_training_and_generation():
    """hidden_cond adds a * Linear(z) to the last hidden state; logits = W_tok (h + c) with tied embeddings,
    so c = K * W_tok[t] makes token t the argmax at every step of generation, not only the first."""
    torch.manual_seed(0)
    dec = small_decoder(60, hidden_cond=True).eval()
    x, t = torch.randn(2, 384), 17
    scored = lambda a=0.9: dec.score([[5], []], [[t] * 6, [t] * 3], x, a,
                                     generator=torch.Generator().manual_seed(0))[0]  # the training sequence
    assert (scored() > 1.0).all()
    plain = scored(a=0.0)
    with torch.no_grad():
        dec.hidden_cond.bias.copy_(2000 * dec.lm.get_input_embeddings().weight[t])
    assert (scored() < 0.01).all()  # every continuation token became near-certain
    torch.testing.assert_close(scored(a=0.0), plain)  # scaled by a: at a = 0 a plain prefix LM
    out = dec.generate([[5, 6], []], x, max_new_tokens=6, repetition_penalty=1.0, **GREEDY)
    assert out == [[t] * 6, [t] * 6]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    picks = {sample_top_p(logits, 0.7, 1.0, g).item() for _ in range(200)}
    assert picks == {0, 1}  # 0.5 < 0.7 needs the second token; the third is never needed


def test_decoder_reconstructs_sentences_from_clean_embeddings(encoder):
    """A short overfit: the soft prompt alone must tell the sentences apart (empty prefix)."""
    torch.manual_seed(0)
    tok = train_tokenizer(SENTENCES * 20, 120)
    e = torch.from_numpy(embed(encoder, SENTENCES))
    mu, s = latent_stats(e)
    x = standardize(e, mu, s)
    dec = small_decoder(len(tok))
    ids = [encode_continuation(tok, t) for t in SENTENCES]
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3)
    for _ in range(150):
        loss = dec([[] for _ in SENTENCES], ids, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5
    out = dec.eval().generate([[] for _ in SENTENCES], x, a=1.0 - 1e-6, max_new_tokens=40, repetition_penalty=1.0,
                              **GREEDY)
    decoded = [tok.decode(o).strip() for o in out]
    assert sum(d == t for d, t in zip(decoded, SENTENCES)) >= 5, decoded


def test_fit_length_trims_prefix_first():
    assert fit_length([1, 2, 3], [4, 5], 4) == ([2, 3], [4, 5])
    assert fit_length([1, 2], [3, 4, 5, 6, 7], 4) == ([], [3, 4, 5, 6])


@contextlib.contextmanager
def fixed_logits(dec, bias):
    """The decoder's next-token logits replaced by `bias` (V,) at every position; `bias` may change inside."""
    hook = dec.lm.get_output_embeddings().register_forward_hook(
        lambda module, inputs, logits: logits * 0 + bias.to(logits.dtype))
    try:
        yield
    finally:
        hook.remove()


def test_min_new_tokens_holds_end_of_text_back_then_lets_it_end():
    """Here end-of-text is always the likeliest token: greedy decoding ends at once, unless min_new_tokens
    masks it, and then it ends right after that many tokens (the next best, token 5)."""
    dec = tiny_decoder(12)
    bias = torch.full((12,), -30.0)
    bias[dec.eos_id], bias[5] = 2.0, 1.0
    x = torch.randn(2, 32)
    with fixed_logits(dec, bias):
        assert dec.generate([[3], []], x, max_new_tokens=6, repetition_penalty=1.0, **GREEDY) == [[], []]
        assert dec.generate([[3], []], x, max_new_tokens=6, repetition_penalty=1.0, min_new_tokens=3,
                            **GREEDY) == [[5, 5, 5], [5, 5, 5]]
        assert dec.generate([[3]], x[:1], max_new_tokens=2, repetition_penalty=1.0, min_new_tokens=4,
                            **GREEDY) == [[5, 5]]


def test_repetition_penalty_spares_end_of_text_bos_and_padding():
    """bos and the left padding are the eos token: a penalty that counted them would always push
    end-of-text down. Here eos (logit 2.0) narrowly beats token 5 (1.9): with the penalty 1.2 on the
    prompt's tokens only, greedy decoding must still end at once; token 7, in the prompt, is penalised."""
    dec = tiny_decoder(12)
    bias = torch.full((12,), -30.0)
    bias[dec.eos_id], bias[5] = 2.0, 1.9
    x = torch.randn(3, 32)
    prompts = [[3], [], [1, 2, 4]]  # different lengths: the shorter ones are left-padded with eos
    with fixed_logits(dec, bias):
        assert dec.generate(prompts, x, max_new_tokens=4, repetition_penalty=1.2, **GREEDY) == [[], [], []]
        bias[7] = 2.5
        out = dec.generate([[7], [3, 7]], x[:2], max_new_tokens=1, repetition_penalty=1.5, **GREEDY)
        assert out == [[], []]  # 7 (2.5 / 1.5 = 1.67) lost to eos (2.0); without the penalty 7 would win
        assert dec.generate([[7]], x[:1], max_new_tokens=1, repetition_penalty=1.0, **GREEDY) == [[7]]


def test_repetition_penalty_pushes_a_seen_negative_logit_down_and_counts_the_generated_tokens():
    """CTRL: a seen token's logit is divided by the penalty when positive, multiplied when negative (dividing
    would raise it), and every generated token is seen from then on, not only the prompt's."""
    dec = tiny_decoder(12)
    bias = torch.full((12,), -30.0)
    bias[7], bias[8] = -1.0, -1.3
    x = torch.randn(1, 32)
    with fixed_logits(dec, bias):
        assert dec.generate([[7]], x, max_new_tokens=1, repetition_penalty=1.5, **GREEDY) == [[8]]  # -1.5 < -1.3
        bias[:] = -30.0
        bias[5], bias[6] = 2.0, 1.9
        out = dec.generate([[3]], x, max_new_tokens=3, repetition_penalty=1.2, min_new_tokens=3, **GREEDY)
        assert out == [[5, 6, 5]]  # 5, then 5 seen (1.67) loses to 6 (1.9), then 6 seen too (1.58) loses to 5


def test_a_prompt_too_long_for_the_context_keeps_its_last_tokens():
    dec = tiny_decoder(40)
    room = dec.room(8)
    prompt = torch.randint(1, 40, (room + 20,), generator=torch.Generator().manual_seed(0)).tolist()
    x = torch.randn(1, 32)
    run = lambda p: dec.generate([p], x, max_new_tokens=8, repetition_penalty=1.0, top_p=1.0, temperature=1.0,
                                 generator=torch.Generator().manual_seed(0))
    assert run(prompt) == run(prompt[-room:]) != run(prompt[:room])


def test_every_parameter_of_the_decoder_takes_part_in_the_training_loss():
    """A parameter the forward pass leaves out (the soft prompt's position embedding, say) is saved in every
    checkpoint and learns nothing."""
    torch.manual_seed(0)
    dec = small_decoder(50, hidden_cond=True)
    dec([[5, 6], []], [[7, 8, 9], [10]], torch.randn(2, 384)).backward()
    # None: not in the graph at all (a zero-initialised gate's gradient is 0, not None)
    assert [name for name, p in dec.named_parameters() if p.grad is None] == []


def test_barred_tokens_are_never_drawn_however_likely():
    """Tokens 5 and 6 are the likeliest (then 4): barred, greedy decoding and sampling at a high
    temperature write neither, also where end-of-text is held back."""
    dec = tiny_decoder(12)
    bias = torch.full((12,), -30.0)
    bias[5], bias[6], bias[4], bias[dec.eos_id] = 3.0, 2.9, 1.0, -1.0
    x = torch.randn(2, 32)
    with fixed_logits(dec, bias):
        assert dec.generate([[3], []], x, max_new_tokens=3, repetition_penalty=1.0, **GREEDY) == [[5, 5, 5]] * 2
        assert dec.generate([[3], []], x, max_new_tokens=3, repetition_penalty=1.0, barred_ids=[5, 6],
                            min_new_tokens=3, **GREEDY) == [[4, 4, 4]] * 2
        bias[:] = 0.0  # every token as likely
        drawn = dec.generate([[3]] * 8, torch.randn(8, 32), max_new_tokens=8, repetition_penalty=1.0, top_p=1.0,
                             temperature=5.0, barred_ids=[5, 6], min_new_tokens=8,
                             generator=torch.Generator().manual_seed(0))
        assert not {5, 6} & {t for row in drawn for t in row} and len({t for row in drawn for t in row}) > 4


def test_barred_token_ids_are_the_tokens_that_write_a_barred_word_whole():
    tok = train_tokenizer(["I do not know, no idea", "it is not bad", "no problem at all, do not worry", "a piano",
                           "she didn't go", "we don't care", "nobody knows"] * 20, 400)
    barred = {tok.decode([i]) for i in decoder_module.barred_token_ids(tok, {"not", "no", "'t", "didn", "don"})}
    assert {" not", " no"} <= barred and barred <= {" not", " no", "'t", " didn", " don"}
    ids = tok(" knows a piano")["input_ids"]  # words that hold "no" inside stay
    assert not set(ids) & set(decoder_module.barred_token_ids(tok, {"not", "no"}))
    assert decoder_module.barred_token_ids(tok, set()) == []


# ----------------------------------------------------------------------------- Decoder.score


def test_score_equals_the_training_loss_at_a_fixed_signal_level(monkeypatch):
    dec = tiny_decoder(40)
    continuations = [[5, 6, 7], [8], [9, 10, 11, 12]]
    x = torch.randn(3, 32)
    monkeypatch.setattr(decoder_module, "augmentation_level", lambda n, shift, device=None: torch.full((n,), 0.7))
    torch.manual_seed(1)
    with torch.no_grad():
        loss = dec([[], [], []], continuations, x)  # empty prefixes: forward scores continuation + eos only
    torch.manual_seed(1)  # score without a generator draws the same eps as forward's randn_like
    nll, n = dec.score([[], [], []], [c + [dec.eos_id] for c in continuations], x, a=0.7)
    assert n.tolist() == [4, 2, 5]
    assert (nll.sum() / n.sum()).item() == pytest.approx(loss.item(), rel=1e-5)


def test_score_scores_only_continuation_tokens_and_ignores_padding():
    """Hand-computed per row (a = 1: the soft prompt is G(x), no noise) against the padded batch."""
    dec = tiny_decoder(40)
    prefixes, continuations = [[3, 4, 5, 6], [], [7]], [[8, 9], [10, 11, 12, 13], [14]]
    x = torch.randn(3, 32)
    nll, n = dec.score(prefixes, continuations, x, a=1.0)
    assert n.tolist() == [2, 4, 1]
    with torch.no_grad():
        for i, (p, c) in enumerate(zip(prefixes, continuations)):
            wte = dec.lm.get_input_embeddings()
            soft = dec.soft(x[i:i + 1], torch.ones(1))[0]
            seq = torch.cat([wte(torch.tensor([dec.bos_id] + p)), soft, wte(torch.tensor(c))])
            logp = dec.lm(inputs_embeds=seq[None]).logits[0].log_softmax(-1)
            first = 1 + len(p) + dec.config.n_soft  # the first continuation token's position
            expected = -sum(logp[first + j - 1, tok] for j, tok in enumerate(c))
            assert nll[i].item() == pytest.approx(expected.item(), rel=1e-4)


def test_score_at_signal_level_zero_ignores_the_proposal_and_is_reproducible():
    dec = tiny_decoder(40)
    args = ([[3, 4], [5]], [[6, 7, 8], [9, 10]])
    a, _ = dec.score(*args, torch.randn(2, 32), a=0.0, generator=torch.Generator().manual_seed(5))
    b, _ = dec.score(*args, torch.randn(2, 32), a=0.0, generator=torch.Generator().manual_seed(5))
    c, _ = dec.score(*args, torch.randn(2, 32), a=0.0, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b)  # pure noise at a = 0: the proposal x does not matter, the seed fixes it
    assert not torch.equal(a, c)


def test_a_tokenizer_that_cannot_be_downloaded_fails_in_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match="could not load the tokenizer 'someone/not-here'.*--lm"):
        decoder_module.load_tokenizer("someone/not-here")


def test_checking_for_the_end_every_few_tokens_changes_no_output(monkeypatch):
    """On a GPU generate asks whether all rows have ended only every few tokens (END_CHECK_EVERY): rows
    that ended meanwhile write end-of-text, so the token lists must be those of asking at every token."""
    torch.manual_seed(0)
    dec = tiny_decoder(12).eval()
    x = torch.randn(6, 32)
    run = lambda: dec.generate([[3], [], [1, 2]] * 2, x, max_new_tokens=30, repetition_penalty=1.0, top_p=1.0,
                               temperature=1.5, generator=torch.Generator().manual_seed(0))
    every_token = run()
    assert len({len(row) for row in every_token}) > 2 and max(map(len, every_token)) < 30  # rows end at other steps
    for every in (3, 8):
        monkeypatch.setattr(decoder_module, "END_CHECK_EVERY", {"cpu": every})
        assert run() == every_token


# ----------------------------------------------------------------------------- checks a mutation pass found untested


def test_a_barred_word_is_barred_in_capitals_too():
    tok = train_tokenizer(["I said No to it", "she said No again", "no way"] * 20, 300)
    assert " No" in {tok.decode([i]) for i in decoder_module.barred_token_ids(tok, {"no"})}


def test_the_signal_level_reaches_the_soft_prompt_and_defaults_to_0_95(monkeypatch):
    dec = tiny_decoder(12)
    levels, condition = [], dec.condition
    monkeypatch.setattr(dec, "condition", lambda z, a: levels.append(a.tolist()) or condition(z, a))
    x = torch.randn(2, 32)
    dec.generate([[3], []], x, max_new_tokens=2, repetition_penalty=1.0, **GREEDY)
    dec.generate([[3], []], x, a=0.3, max_new_tokens=2, repetition_penalty=1.0, **GREEDY)
    assert levels == [[pytest.approx(0.95)] * 2, [pytest.approx(0.3)] * 2]


def test_a_generation_that_fills_the_context_drops_the_whole_prompt():
    """Room for no prompt token at all beside max_new_tokens: the prompt is left out, not kept whole."""
    dec = tiny_decoder(12)
    bias = torch.full((12,), -30.0)
    bias[5] = 1.0
    x = torch.randn(1, 32)
    n = dec.room()  # every position after bos and the slots
    with fixed_logits(dec, bias):
        out = dec.generate([[3, 4, 6]], x, max_new_tokens=n, repetition_penalty=1.0, **GREEDY)
    assert out == [[5] * n]


def test_the_tiny_lm_has_no_dropout_and_the_paper_tier_no_hidden_cond_layer():
    lm = DecoderConfig().lm_config(100, 0)
    assert lm["resid_pdrop"] == lm["embd_pdrop"] == lm["attn_pdrop"] == 0.0
    dec = small_decoder(50, hidden_cond=False)
    assert dec.hidden_cond is None and not [name for name in dec.state_dict() if "hidden_cond" in name]


def test_a_missing_tokenizer_of_another_option_does_not_suggest_the_tiny_tier(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as err:
        decoder_module.load_tokenizer("someone/not-here", flag="--tokenizer")
    assert str(err.value).endswith("pass a local GPT-2 folder with --tokenizer") and "tiny tier" not in str(err.value)


def test_a_continuation_is_encoded_without_the_special_tokens_a_tokenizer_would_add():
    """A reference LM's tokenizer may add its bos to every text it encodes (Llama's does): a continuation follows
    its prompt, so it gets none."""
    from tokenizers import processors
    tok = train_tokenizer(SENTENCES * 20, 120)
    eos = tok.eos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                                         special_tokens=[("<|endoftext|>", eos)])
    assert tok(" the cat")["input_ids"][0] == eos  # the tokenizer adds it by default
    assert encode_continuation(tok, "the cat") == tok(" the cat", add_special_tokens=False)["input_ids"]
