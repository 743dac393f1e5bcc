"""The DGLM decoder: a soft-prompt generator plus an auto-regressive GPT-2 (DGLM sec. 3.1).

A semantic proposal, the standardised latent x of a sentence embedding, becomes k soft-prompt
vectors placed between the prefix and the continuation:

    [bos][prefix tokens][k soft-prompt slots][continuation tokens][eos]

and GPT-2 is trained with the usual next-token loss on prefix and continuation tokens (not on
the slots). Noise augmentation makes the decoder robust to imperfect proposals:

    t ~ U(0, 1),  a = sigmoid(logit(cos^2(pi t / 2)) + 2 ln 3)      (median a = 0.9)
    z = sqrt(a) x + sqrt(1 - a) eps,   soft_prompt = G(z, a)

At inference the proposal is re-noised at a fixed a = 0.95. a -> 1 follows the proposal,
a -> 0 leaves a plain prefix language model.

Tiny tier only (`hidden_cond`, a departure from the paper): a GPT-2 trained from scratch for a few
minutes learns to read the soft prompt slowly, so the noised proposal is also projected (Linear,
zero-initialised), scaled by the signal level a and added to GPT-2's last hidden state at every
position:

    logits_t = W_tok (h_t + a (C z + c))      (W_tok: the tied token embeddings; C, c a Linear layer)

i.e. a bias on every next-token distribution toward the words of the proposal (its effect is
measured in the README, "Why these defaults"). At a = 0 the decoder is a plain prefix LM.

Tiny tier: a small GPT2Config trained from scratch with a byte-level BPE trained on the corpus.
Paper tier: pretrained `gpt2` / `gpt2-large` and its tokenizer, through the same code.
Names: *_ids token-id lists, x a standardised latent, z its noised version at signal level a.
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusion import Block, RMSNorm, check_heads, logsnr_cosine, q_sample, timestep_embedding

TINY_LM = "tiny"
# Training pads a batch's length to a multiple of PAD_LENGTH and its scored positions to one of PAD_SCORED,
# so that few tensor shapes recur: on a CPU, oneDNN builds and keeps kernels for every new shape, and with
# each batch's own shapes the process's memory grew all run long and every step, the prior's too, slowed.
PAD_LENGTH, PAD_SCORED = 8, 64
# Generation asks whether every row has ended once every END_CHECK_EVERY tokens (8 where the device is not
# listed). On a GPU each ask waits for the device's queue to empty, and decoding there is launch-bound, so
# an ask per token would serialise the host's work and the GPU's; on a CPU an ask costs nothing.
END_CHECK_EVERY = {"cpu": 1}


@dataclass
class DecoderConfig:
    """The tiny tier's decoder; train.TIERS["paper"] overrides the soft-prompt sizes and turns
    hidden_cond off (the GPT-2 sizes below only apply to the LM trained from scratch)."""
    lm: str = TINY_LM         # "tiny" (GPT-2 config from scratch) or a GPT-2 hub id / local folder
    dim: int = 384            # sentence-embedding width d
    n_soft: int = 8           # k soft-prompt slots
    soft_token_dim: int = 64  # Linear d -> k * c  (paper: c = 384)
    soft_width: int = 128     # soft-prompt transformer width (paper: 768)
    soft_depth: int = 2       # (paper: 6)
    soft_heads: int = 4       # (paper: 12)
    noise_shift: float = 2 * math.log(3)  # a = sigmoid(logit(cos^2(pi t/2)) + shift)
    noise_augmentation: bool = True       # False: trained on clean proposals (a = 1), a teaching switch
    inference_a: float = 0.95             # signal level of the re-noised proposal at inference
    hidden_cond: bool = True  # also add a Linear(z) to GPT-2's last hidden state (tiny tier; see above)
    # the tiny tier's GPT-2, trained from scratch (ignored for pretrained models)
    n_layer: int = 4
    n_embd: int = 192
    n_head: int = 4
    n_positions: int = 128
    vocab_size: int = 8192    # of the BPE trained on the corpus

    def __post_init__(self):
        check_heads("DecoderConfig: soft_width / soft_heads", self.soft_width, self.soft_heads)
        check_heads("DecoderConfig: n_embd / n_head", self.n_embd, self.n_head)

    def lm_config(self, vocab_size, eos_id):
        """The GPT2Config (as a dict) of the language model trained from scratch. No dropout (a few
        epochs do not overfit); attention written out ("eager"), which for sequences this short beats
        the fused kernel on a CPU in bf16, as in diffusion.Block."""
        return dict(vocab_size=vocab_size, n_layer=self.n_layer, n_embd=self.n_embd, n_head=self.n_head,
                    n_positions=self.n_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    bos_token_id=eos_id, eos_token_id=eos_id, attn_implementation="eager")


class SoftPromptGenerator(nn.Module):
    """G(z, a): Linear d -> k tokens, bidirectional transformer with adaLN on the noise level a,
    then Linear to the decoder width."""

    def __init__(self, config: DecoderConfig, lm_width):
        super().__init__()
        self.config = config
        W = config.soft_width
        self.split = nn.Linear(config.dim, config.n_soft * config.soft_token_dim)
        self.embed = nn.Linear(config.soft_token_dim, W)
        self.pos = nn.Parameter(torch.randn(config.n_soft, W) * 0.02)
        self.noise_level = nn.Sequential(nn.Linear(W, W // 2), nn.SiLU(), nn.Linear(W // 2, W // 2))
        self.blocks = nn.ModuleList(Block(W, config.soft_heads, 4, W // 2) for _ in range(config.soft_depth))
        self.norm = RMSNorm(W)
        self.out = nn.Linear(W, lm_width)

    def forward(self, z, a):
        """z (B, d) noised standardised latent, a (B,) its signal level -> (B, k, lm_width)."""
        B = z.shape[0]
        h = self.embed(self.split(z).view(B, self.config.n_soft, -1)) + self.pos  # (B, k, W)
        logsnr = torch.logit(a.float().clamp(1e-6, 1 - 1e-6))
        cond = F.silu(self.noise_level(timestep_embedding(logsnr, self.config.soft_width).to(h.dtype)))
        for block in self.blocks:
            h = block(h, cond)
        return self.out(self.norm(h))


def augmentation_level(n, shift, device=None):
    """a = sigmoid(logit(cos^2(pi t / 2)) + shift), t ~ U(0, 1); logit(cos^2(pi t/2)) = -2 log tan(pi t/2)."""
    t = torch.rand(n, device=device)
    return torch.sigmoid(logsnr_cosine(t) + shift)


class Decoder(nn.Module):
    def __init__(self, config: DecoderConfig, lm_config: dict, bos_id: int, eos_id: int, pretrained=False):
        """lm_config: a GPT2Config as a dict, saved in the checkpoint so loading downloads nothing."""
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel
        self.config = config
        self.bos_id, self.eos_id = bos_id, eos_id
        if pretrained:
            try:
                self.lm = GPT2LMHeadModel.from_pretrained(config.lm)
            except (OSError, ValueError) as err:
                if os.path.isdir(config.lm):
                    from utils import not_a_model  # (utils imports this file)
                    raise not_a_model(config.lm, "GPT-2 model", err) from None
                raise SystemExit(f"error: could not load the language model {config.lm!r} from the hub or disk; "
                                 "without internet pass a local GPT-2 folder with --lm, or use the tiny tier "
                                 f"(--lm {TINY_LM})") from None
        else:
            self.lm = GPT2LMHeadModel(GPT2Config(**lm_config))
        self.lm.config.loss_type = "ForCausalLM"  # the plain next-token loss (silences a transformers warning)
        if self.lm.config.activation_function == "gelu_new":  # GPT-2's, pretrained or not
            # the tanh approximation of GELU written as eight elementwise ops, each output kept for the
            # backward pass; PyTorch's fused kernel computes the same function in one (less memory, and
            # fewer kernel launches per token while generating)
            from transformers.activations import ACT2FN
            self.lm.config.activation_function = "gelu_pytorch_tanh"
            for block in self.lm.transformer.h:
                block.mlp.act = ACT2FN["gelu_pytorch_tanh"]
        self.soft = SoftPromptGenerator(config, self.lm.config.n_embd)
        self.hidden_cond = nn.Linear(config.dim, self.lm.config.n_embd) if config.hidden_cond else None
        if self.hidden_cond is not None:  # starts as a plain soft-prompt decoder
            nn.init.zeros_(self.hidden_cond.weight)
            nn.init.zeros_(self.hidden_cond.bias)

    @property
    def max_len(self):
        return self.lm.config.n_positions

    def room(self, used=0):
        """Context positions left after bos, the k slots and `used` other tokens."""
        return self.max_len - 1 - self.config.n_soft - used

    def _layout(self, prefix_ids, continuation_ids, left_pad):
        """Token ids (B, T) with the slots marked: [bos] prefix [slots] continuation; and masks."""
        k = self.config.n_soft
        rows = [[self.bos_id] + p + [-1] * k + c for p, c in zip(prefix_ids, continuation_ids)]
        T = max(len(r) for r in rows)
        if not left_pad:  # training (see PAD_LENGTH); generation keeps its own length
            T = -(-T // PAD_LENGTH) * PAD_LENGTH
        ids = torch.full((len(rows), T), self.eos_id, dtype=torch.long)
        attn = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(T - len(r), T) if left_pad else slice(0, len(r))
            ids[i, sl] = torch.tensor(r)
            attn[i, sl] = 1
        slots = ids == -1
        ids[slots] = 0
        return ids, slots, attn

    def condition(self, z, a):
        """Noised latent z (B, d) at signal level a (B,) -> (soft prompt (B, k, D), hidden bias (B, D) or None)."""
        if self.hidden_cond is None:
            return self.soft(z, a), None
        return self.soft(z, a), a[:, None].to(z.dtype) * self.hidden_cond(z)  # a = 0: a plain prefix LM

    def checkpoint_activations(self):
        """--grad-checkpointing: GPT-2's blocks are recomputed in the backward pass instead of keeping their
        activations (activation_checkpointing_enable: the name that transformers 6 keeps)."""
        enable = getattr(self.lm, "activation_checkpointing_enable", None) or self.lm.gradient_checkpointing_enable
        enable()

    def _hidden(self, bias, **lm_inputs):
        """GPT-2's last hidden states (B, T, D) and its key/value cache, with `bias` (B, D) added at
        every position when hidden_cond."""
        out = self.lm.transformer(**lm_inputs)
        h = out.last_hidden_state
        if bias is not None:
            h = h + bias[:, None].to(h.dtype)
        return h, out.cache

    def _logits(self, bias, **lm_inputs):
        """GPT-2's next-token logits (B, T, V) and its key/value cache (see _hidden)."""
        h, cache = self._hidden(bias, **lm_inputs)
        return self.lm.lm_head(h), cache

    def _embed(self, ids, slots, soft):
        emb = self.lm.get_input_embeddings()(ids)            # (B, T, D)
        return emb.masked_scatter(slots[..., None], soft.to(emb.dtype))  # k slots per row, in order

    def draw_noise(self, n, device):
        """The noise augmentation of n examples: {a: (n,), eps: (n, d)}, drawn for a whole batch at once
        (see Prior.draw_noise). Without noise augmentation a = 1: the clean proposal."""
        if self.config.noise_augmentation:
            a = augmentation_level(n, self.config.noise_shift, device)
        else:
            a = torch.ones(n, device=device)
        return {"a": a, "eps": torch.randn(n, self.config.dim, device=device)}

    def forward(self, prefix_ids, continuation_ids, x, noise=None, n_tokens=None):
        """Summed next-token loss over the prefix, continuation and eos tokens of a batch, divided by
        n_tokens (default: this batch's count, i.e. the mean). prefix_ids, continuation_ids: lists of
        token-id lists; x (B, d) the clean standardised latents of the continuations.

        noise: rows of draw_noise() (default: drawn here). A micro-batch or a data-parallel shard passes
        its rows of the whole batch's noise and the whole batch's token count, so the parts' losses
        add up to the loss of the whole batch.
        """
        device = x.device
        continuation_ids = [c + [self.eos_id] for c in continuation_ids]
        if n_tokens is None:
            n_tokens = sum(len(p) + len(c) for p, c in zip(prefix_ids, continuation_ids))
        noise = self.draw_noise(len(x), device) if noise is None else noise
        z = q_sample(x, noise["eps"], noise["a"])  # z = sqrt(a) x + sqrt(1-a) eps
        ids, slots, attn = (t.to(device) for t in self._layout(prefix_ids, continuation_ids, left_pad=False))
        soft, bias = self.condition(z, noise["a"])
        h, _ = self._hidden(bias, inputs_embeds=self._embed(ids, slots, soft), attention_mask=attn, use_cache=False)
        targets = ids[:, 1:]                                       # position t predicts token t + 1 ...
        scored = ~(slots | (attn == 0))[:, 1:]                     # ... unless that is a slot or padding
        rows = scored.flatten().nonzero().squeeze(1)               # the vocabulary only where scored, plus
        pad = rows.new_zeros((-len(rows)) % PAD_SCORED)            # copies of row 0 up to PAD_SCORED's multiple
        logits = self.lm.lm_head(h[:, :-1].flatten(0, 1)[torch.cat([rows, pad])])      # (tokens + pad, V)
        labels = torch.cat([targets.flatten()[rows], torch.full_like(pad, -100)])      # -100: not in the loss
        nll = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
        return nll / n_tokens

    @torch.no_grad()
    def score(self, prefix_ids, continuation_ids, x, a, generator=None):
        """Per-example log-likelihood of continuations: -> (nll (B,) summed over tokens, n_tokens (B,)).

        The same sequence as `forward` ([bos][prefix][k slots][continuation], built with `_layout`,
        `_embed` and the soft-prompt generator `soft`), but the latent x (B, d) is noised at the
        fixed signal level `a` instead of the augmentation draw: z = sqrt(a) x + sqrt(1-a) eps,
        eps from `generator`. Only continuation tokens are scored: the prefix is context and no eos
        is appended (a continuation cut at a length limit has not ended; append eos_id to a
        continuation to score the end too). a = 0 makes the soft prompt pure noise, i.e. the
        decoder as a plain, unguided prefix language model. Call in eval mode (no dropout).
        """
        device = x.device
        ids, slots, attn = (t.to(device) for t in self._layout(prefix_ids, continuation_ids, left_pad=False))
        a = torch.full((len(prefix_ids),), float(a), device=device)
        eps = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
        soft, bias = self.condition(q_sample(x, eps, a), a)
        logits, _ = self._logits(bias, inputs_embeds=self._embed(ids, slots, soft), attention_mask=attn)
        logits = logits[:, :-1].float()  # predicts ids[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")        # (B, T-1)
        start = torch.tensor([1 + len(p) + self.config.n_soft for p in prefix_ids], device=device)  # first continuation slot
        end = start + torch.tensor([len(c) for c in continuation_ids], device=device)
        position = torch.arange(1, ids.shape[1], device=device)[None]                     # positions of the targets
        scored = (position >= start[:, None]) & (position < end[:, None])
        return nll.masked_fill(~scored, 0.0).sum(-1), scored.sum(-1)

    @torch.no_grad()
    def generate(self, prefix_ids, x, *, a=None, max_new_tokens, top_p, temperature, repetition_penalty,
                 min_new_tokens=0, barred_ids=None, generator=None):
        """Sample continuations of token-id lists `prefix_ids` given standardised latents x (B, d).

        x is re-noised at signal level `a` (default config.inference_a); top-p sampling with a
        CTRL-style repetition penalty on the prefix's and the generated tokens (not on bos, the
        padding or the slots); temperature 0 decodes greedily; end-of-text cannot be drawn before
        min_new_tokens tokens, nor the tokens of `barred_ids` (a list, see barred_token_ids) ever.
        Returns token-id lists. Prefixes too long for the context keep their last tokens.
        """
        B, device = len(prefix_ids), x.device
        a = torch.full((B,), self.config.inference_a if a is None else a, device=device)
        room = self.room(max_new_tokens)  # prefix tokens that fit
        prefix_ids = [p[-room:] if room > 0 else [] for p in prefix_ids]  # keep the prompt's end
        ids, slots, attn = (t.to(device) for t in self._layout(prefix_ids, [[] for _ in prefix_ids], left_pad=True))
        soft, bias = self.condition(q_sample(x, torch.randn(x.shape, generator=generator, device=device), a), a)
        position = (attn.cumsum(-1) - 1).clamp_min(0)
        logits, cache = self._logits(bias, inputs_embeds=self._embed(ids, slots, soft), attention_mask=attn,
                                     position_ids=position, use_cache=True)
        # the repetition penalty's memory (B, V): prefix tokens, later every generated one
        seen = torch.zeros(B, logits.shape[-1], dtype=torch.bool, device=device)
        rows, cols = ((attn == 1) & ~slots & (position > 0)).nonzero(as_tuple=True)  # position 0: bos
        seen[rows, ids[rows, cols]] = True
        generated = torch.empty(B, 0, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        barred = torch.tensor(barred_ids, dtype=torch.long, device=device) if barred_ids else None  # once, not per step
        check_every = END_CHECK_EVERY.get(device.type, 8)
        for step in range(max_new_tokens):
            logits = logits[:, -1].float()
            if step < min_new_tokens:
                logits[:, self.eos_id] = float("-inf")
            if barred is not None:
                logits[:, barred] = float("-inf")
            if repetition_penalty != 1.0:  # CTRL: divide a positive logit, multiply a negative one
                penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
                logits = torch.where(seen, penalised, logits)
            token = sample_top_p(logits, top_p, temperature, generator)
            token = torch.where(done, torch.full_like(token, self.eos_id), token)
            generated = torch.cat([generated, token[:, None]], 1)
            seen[torch.arange(B, device=device), token] = True
            done |= token == self.eos_id
            if (step + 1) % check_every == 0 and done.all():  # rows that ended write end-of-text meanwhile
                break
            attn = torch.cat([attn, torch.ones(B, 1, dtype=attn.dtype, device=device)], 1)
            position = position[:, -1:] + 1
            logits, cache = self._logits(bias, input_ids=token[:, None], attention_mask=attn, position_ids=position,
                                         cache=cache, use_cache=True)
        result = []
        for row in generated.tolist():
            result.append(row[:row.index(self.eos_id)] if self.eos_id in row else row)
        return result

    def flops_per_sequence(self, n):
        """Forward FLOPs of one training sequence of n tokens (gpt2_sequence_flops)."""
        c = self.lm.config
        return gpt2_sequence_flops(c.n_layer, c.n_embd, c.vocab_size, n, self.config.n_soft)


def gpt2_flops_per_token(n_layer, n_embd, vocab_size, context):
    """Forward FLOPs per token of GPT-2 at sequence length `context` (2 per multiply-add): the weight
    matrices of every layer, attention over the context (q k^T and the weighted sum of v, counted over
    the whole context as is usual for MFU) and the LM head."""
    layer = 2 * 12 * n_embd ** 2 + 2 * 2 * context * n_embd
    return n_layer * layer + 2 * n_embd * vocab_size


def gpt2_sequence_flops(n_layer, n_embd, vocab_size, n, n_soft):
    """Forward FLOPs of one training sequence of n tokens, [bos][prefix][k slots][continuation][eos]: every
    token through GPT-2's layers, the LM head only at the n - k - 1 positions Decoder.forward scores (on the
    tiny tier the head is half a token's FLOPs). The soft-prompt generator (a few small matrices per example)
    is left out."""
    return n * gpt2_flops_per_token(n_layer, n_embd, vocab_size, n) - (n_soft + 1) * 2 * n_embd * vocab_size


def fit_length(prefix_ids, continuation_ids, room):
    """Trim a (prefix, continuation) pair of token lists to at most `room` tokens (the prefix first)."""
    cut = max(0, len(prefix_ids) + len(continuation_ids) - room)
    prefix_ids = prefix_ids[min(cut, len(prefix_ids)):]
    return prefix_ids, continuation_ids[:room - len(prefix_ids)]


def sample_top_p(logits, top_p, temperature, generator=None):
    """Nucleus sampling (Holtzman et al. 2020): sample from the smallest set with mass >= top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the token that crosses top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


# ----------------------------------------------------------------------------- tokenizers


def barred_token_ids(tokenizer, words):
    """Ids of the tokens that write one of `words` (lower case) whole: the word with its leading space, or
    a word's ending that starts with an apostrophe ("'t" of "don't"). A token inside a word ("pia|no")
    stays; a rarer word that the tokenizer spells with a barred token (" no|se") is barred with it."""
    ids = []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        word = text.strip().lower()
        if word in words and (text[:1].isspace() or word[:1] in "'’"):
            ids.append(i)
    return ids


def train_tokenizer(texts, vocab_size):
    """Byte-level BPE trained on the corpus (tiny tier), wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def load_tokenizer(path_or_id, flag="--lm"):
    """A tokenizer by hub id or folder; offline, one line naming `flag`, the option that takes a local copy."""
    from transformers import AutoTokenizer
    from utils import hub_answers, not_a_model  # (utils imports this file)
    hub_answers(path_or_id)  # offline, a tokenizer not in the local cache fails at once instead of retrying
    try:
        return AutoTokenizer.from_pretrained(path_or_id)
    except (OSError, ValueError) as err:
        if os.path.isdir(path_or_id):
            raise not_a_model(path_or_id, "tokenizer", err) from None
        tiny = f", or use the tiny tier (--lm {TINY_LM})" if flag == "--lm" else ""
        raise SystemExit(f"error: could not load the tokenizer {path_or_id!r}; without internet pass a local "
                         f"GPT-2 folder with {flag}{tiny}") from None


def encode_continuation(tokenizer, text):
    """Continuations follow the prefix (and the slots) after a space, as in running text."""
    return tokenizer.encode(" " + text, add_special_tokens=False) if text else []
