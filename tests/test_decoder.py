import pytest
import torch

from decoder import Decoder, DecoderConfig, augmentation_alpha, encode_continuation, sample_top_p, train_tokenizer
from encoder import embed, latent_stats, standardize

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "she reads a long book",
             "we cook pasta at night", "the sun is very bright", "my phone battery died"]


def small_decoder(vocab_size, dim=384, **kw):
    cfg = DecoderConfig(dim=dim, n_soft=4, soft_token_dim=16, soft_width=64, soft_depth=1, soft_heads=2, **kw)
    lm = dict(vocab_size=vocab_size, n_layer=2, n_embd=64, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    return Decoder(cfg, lm, bos_id=0, eos_id=0)


def test_augmentation_alpha_has_median_0_9():
    torch.manual_seed(0)
    a = augmentation_alpha(100_000, DecoderConfig().noise_shift)
    assert a.median().item() == pytest.approx(0.9, abs=0.005)  # sigmoid(0 + 2 ln 3) = 0.9
    assert 0 < a.min().item() and a.max().item() <= 1


def test_layout_puts_slots_between_prefix_and_continuation_and_masks_them():
    torch.manual_seed(0)
    dec = small_decoder(50)
    ids, slots, attn = dec._layout([[5, 6], []], [[7, 8, 9], [10]], left_pad=False)
    assert ids[0].tolist()[:3] == [0, 5, 6] and slots[0, 3:7].all() and ids[0, 7:10].tolist() == [7, 8, 9]
    assert ids[1, 0].item() == 0 and slots[1, 1:5].all() and ids[1, 5].item() == 10
    assert attn[1].tolist() == [1] * 6 + [0] * 4
    soft = torch.randn(2, 4, 64)
    emb = dec._embed(ids, slots, soft)
    torch.testing.assert_close(emb[0, 3:7], soft[0])
    torch.testing.assert_close(emb[1, 1:5], soft[1])
    # ids, slots, attn = left padded for generation: the last row element is always the last slot
    ids, slots, attn = dec._layout([[5, 6], []], [[], []], left_pad=True)
    assert slots[:, -1].all() and attn[1].tolist() == [0, 0, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("hidden_cond", [False, True])
def test_batched_left_padded_generation_matches_one_by_one(hidden_cond):
    torch.manual_seed(0)
    dec = small_decoder(60, hidden_cond=hidden_cond).eval()
    if hidden_cond:  # zero-initialised: give it weights, so each row's bias must stay with its row
        torch.nn.init.normal_(dec.hidden_cond.weight, std=0.1)
    prefixes, x = [[5, 6, 7], [], [9]], torch.randn(3, 384)
    batch = dec.generate(prefixes, x, alpha=1.0 - 1e-6, max_new_tokens=6, temperature=0, repetition_penalty=1.3)
    for i in range(3):
        alone = dec.generate(prefixes[i:i + 1], x[i:i + 1], alpha=1.0 - 1e-6, max_new_tokens=6, temperature=0,
                             repetition_penalty=1.3)
        assert alone[0] == batch[i][:len(alone[0])]


def test_hidden_cond_bias_reaches_every_position_in_training_and_generation():
    """hidden_cond adds a * Linear(z) to the last hidden state; logits = W_tok (h + c) with tied embeddings,
    so c = K * W_tok[t] makes token t the argmax at every step of generation, not only the first."""
    torch.manual_seed(0)
    dec = small_decoder(60, hidden_cond=True).eval()
    x, t = torch.randn(2, 384), 17
    scored = lambda alpha=0.9: dec.score([[5], []], [[t] * 6, [t] * 3], x, alpha,
                                         generator=torch.Generator().manual_seed(0))[0]  # the training sequence
    assert (scored() > 1.0).all()
    plain = scored(alpha=0.0)
    with torch.no_grad():
        dec.hidden_cond.bias.copy_(2000 * dec.lm.get_input_embeddings().weight[t])
    assert (scored() < 0.01).all()  # every continuation token became near-certain
    torch.testing.assert_close(scored(alpha=0.0), plain)  # scaled by a: at a = 0 a plain prefix LM
    out = dec.generate([[5, 6], []], x, max_new_tokens=6, temperature=0, repetition_penalty=1.0)
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
    out = dec.eval().generate([[] for _ in SENTENCES], x, alpha=1.0 - 1e-6, max_new_tokens=40, temperature=0,
                              repetition_penalty=1.0)
    decoded = [tok.decode(o).strip() for o in out]
    assert sum(d == t for d, t in zip(decoded, SENTENCES)) >= 5, decoded
