"""
mil: The Mamba in the Llama (Wang, Paliotta, May, Rush, Dao; NeurIPS 2024), in one file.

Read top to bottom: options, tokenizer and data, the Llama pieces (RMSNorm, RoPE, attention, MLP),
the Mamba mixer laid out to be initialized from attention, the model, Algorithm 1 (a hybrid from a
teacher), and cached generation. `python mil.py` retrains the tokenizer.

Dimension letters used in shape comments:
  b  batch                 l  sequence length (time)      t  cache length
  d  d_model               v  vocab_size
  h  n_head (query heads)  g  n_kv_head (key/value heads)  e  head_dim
  di d_inner = h * e (Mamba channels, one per attention value channel)
  n  d_state = e (Mamba state size: one key dimension per state)
"""
import base64
import math
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, fields, replace
from heapq import heapify, heappop, heappush

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


def parse_options(defaults, argv=None, doc=""):
    """Return a copy of `defaults` with `--key=value` overrides from argv, type-checked."""
    argv = sys.argv[1:] if argv is None else argv
    opts = dict(defaults)
    valid = ", ".join(f"--{k}" for k in defaults)
    for arg in argv:
        if arg in ("-h", "--help"):
            print(doc.strip() + "\n\noptions (--key=value, defaults shown):")
            for k, v in defaults.items():
                print(f"  --{k}={v}")
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
    """Loads the trained ranks into tiktoken for speed; `encode_py` is the same BPE in plain Python."""

    def __init__(self, path=TOKENIZER_FILE):
        retrain = "retrain it with `python mil.py`"
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer file {path} is missing; {retrain}")
        self.ranks = {}
        with open(path, "rb") as f:
            for i, line in enumerate(f):
                try:
                    tok, r = line.split()
                    self.ranks[base64.b64decode(tok, validate=True)] = int(r)
                except ValueError:
                    raise ValueError(f"{path}:{i + 1} is not a `base64 rank` line; {retrain}") from None
        ok = (len(self.ranks) == VOCAB_SIZE - 1 and sorted(self.ranks.values()) == list(range(VOCAB_SIZE - 1))
              and all(self.ranks.get(bytes([b])) == b for b in range(256)))
        if not ok:
            raise ValueError(f"{path} is not a {VOCAB_SIZE - 1}-rank byte-level BPE file "
                             f"(ranks 0..{VOCAB_SIZE - 2}, bytes first); {retrain}")
        self.eot = VOCAB_SIZE - 1
        self.enc = tiktoken.Encoding("shakespeare-4k", pat_str=GPT4_SPLIT, mergeable_ranks=self.ranks,
                                     special_tokens={EOT: self.eot})
        self.vocab_size = VOCAB_SIZE

    def encode(self, text):
        return self.enc.encode(text, allowed_special={EOT})

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def encode_py(self, text):
        """tiktoken's algorithm: in each pre-token, merge the adjacent pair of lowest rank until none."""
        ids = []
        for piece in regex.findall(GPT4_SPLIT, text):
            parts = [bytes([b]) for b in piece.encode()]
            while len(parts) > 1:
                ranks = [self.ranks.get(a + b, math.inf) for a, b in zip(parts, parts[1:])]
                i = min(range(len(ranks)), key=ranks.__getitem__)
                if ranks[i] == math.inf:
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            ids += [self.ranks[p] for p in parts]
        return ids


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
    """One uint16 stream of token ids, EOT before each work."""
    ids = []
    for w in works:
        ids += [tok.eot] + tok.enc.encode_ordinary(w)
    return np.array(ids, dtype=np.uint16)


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
    rope_theta: float = 10000.0

    def __post_init__(self):
        assert self.d_model % self.n_head == 0 and self.n_head % self.n_kv_head == 0
        self.head_dim = self.d_model // self.n_head
        self.d_ff = self.d_ff or 32 * math.ceil(8 * self.d_model / 3 / 32)
        self.dt_rank = self.dt_rank or math.ceil(self.d_model / 16)
        self.attn_layers = tuple(range(self.n_layer)) if self.attn_layers is None else tuple(sorted(self.attn_layers))
        assert all(0 <= i < self.n_layer for i in self.attn_layers), self.attn_layers
        assert self.conv_init in ("identity", "default"), self.conv_init

    def to_dict(self):  # the fields a checkpoint stores (derived ones are rebuilt)
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


def kept_attention(n_layer, fraction):
    """Evenly spaced attention layers, the last one always kept (§3: for 8 layers, 50% keeps 1, 3, 5, 7)."""
    keep = round(n_layer * fraction)
    step = n_layer / keep if keep else 0
    return tuple(sorted(n_layer - 1 - int(i * step) for i in range(keep)))


# -----------------------------------------------------------------------------------------------
# The Llama pieces


class RMSNorm(nn.RMSNorm):  # x / sqrt(mean(x^2) + eps) * weight, one fused kernel on GPU
    def __init__(self, dim, eps=1e-5):
        super().__init__(dim, eps=eps)


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
        self.max_len, self.draft_len, self.where = max_len, draft_len, None
        self.room = 16 * math.ceil(max_len / 16)  # positions allocated: aligned rows for the attention kernel
        self.steps = torch.arange(self.room, device=device)
        self.cos, self.sin = rope_tables(model.inv_freq.to(device), self.steps, dtype) if cfg.attn_layers else \
            (None, None)  # (room, 1, e) each; a model without attention has no positions to encode
        self.blocked = torch.tensor(-math.inf, dtype=dtype, device=device)  # the mask where a query must not look
        di, w = cfg.n_head * cfg.head_dim, draft_len + 1  # with draft_len K: the K+1 verified tokens
        self.conv = torch.zeros(len(mamba), batch, di, k, device=device, dtype=dtype)  # the last k conv inputs
        self.conv_window = torch.zeros(len(mamba), batch, di, k + w, device=device, dtype=dtype) if draft_len else None
        self.replay = torch.zeros(batch, dtype=torch.int32, device=device)  # verified tokens to replay (Algorithm 2)
        # decoding's Delta: the two low-rank weights multiplied once, d -> di (cuBLAS is slow at a few rows
        # through rank r). A list: constants, which graphs need not restore and which are not cache memory
        self.dt_weights = [(m.dt_proj.weight.float() @ m.dt_in_proj.weight.float()).detach().to(device, dtype)
                           for m in (model.layers[i].mixer for i in mamba)]  # (di, d) each
        super().__init__(MambaCache(self, mamba.index(i), cfg, batch, device, dtype) if i in mamba
                         else AttnCache(self, cfg, batch, device, dtype) for i in range(cfg.n_layer))

    def begin(self, length):
        """Before a forward appends `length` positions: check the room, and (past the prefill) set
        `where`, the new tokens' positions (l,) and the additive attention mask over the cache
        (l, t), -inf where a query must not look, shared by every attention layer and head. Returns
        the new positions' RoPE tables, read from the caches' own (None without attention layers)."""
        if self.len is not None and self.len + length > self.max_len:
            raise ValueError(f"the caches hold {self.max_len} positions, asked for {self.len + length}")
        idx = self.pos + self.steps[:length]  # positions of the new tokens
        self.where = None
        if self.len != 0:
            future = self.steps > idx[:, None]  # query i sees keys up to its own position
            self.where = idx, torch.where(future, self.blocked, 0.0)
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
        mask = None
        if cache is not None:
            k, v, mask = cache.append(k, v)  # (b, g, t, e); mask (l, t) past the prefill
        # training, prefill: causal; decoding: the mask over the cache. The n_head / n_kv_head query heads
        # of a KV head read it in place (enable_gqa), never a repeated copy: one cuDNN kernel on the H200
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return self.o_proj(rearrange(y, "b h l e -> b l (h e)"))


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


class MambaCache:
    """Recurrent state of one Mamba layer: the SSM state (float32) and its rows of the stacked conv
    inputs. With draft_len K it also holds what Algorithm 2 needs for speculative verification: the
    conv window widened by K+1, and the per-token inputs (x, Delta, B) of the last verified tokens,
    whose accepted prefix the next verification replays into the committed state."""

    def __init__(self, caches, j, cfg, batch, device, dtype):
        di, n, g, w = cfg.n_head * cfg.head_dim, cfg.head_dim, cfg.n_head, caches.draft_len + 1
        self.seq, self.j, self.conv, self.replay = caches, j, caches.conv[j], caches.replay  # conv (b, di, d_conv-1)
        self.ssm = torch.zeros(batch, di, n, device=device, dtype=torch.float32)  # (b, di, n): committed state
        if caches.draft_len:
            self.conv_window = caches.conv_window[j]  # (b, di, d_conv-1 + K+1)
            self.x = torch.zeros(batch, di, w, device=device, dtype=dtype)  # after conv and SiLU
            self.dt = torch.zeros(batch, di, w, device=device, dtype=dtype)
            self.B = torch.zeros(batch, g, n, w, device=device, dtype=dtype)


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
        dt = torch.exp(torch.rand(di) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(bias) = dt in [1e-3, 0.1]
        nn.init.kaiming_uniform_(self.dt_in_proj.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.z_proj.weight, a=math.sqrt(5))
        if self.cfg.conv_init == "identity":  # conv(x)_t = x_t: the layer starts from x = silu(W_V o)
            self.conv1d.weight.zero_()
            self.conv1d.weight[:, 0, -1] = 1.0
            self.conv1d.bias.zero_()
        else:
            self.conv1d.reset_parameters()

    def project(self, o):
        """The SSM's inputs from the layer input o (b, l, d), in the scan's layout."""
        rep, e = self.cfg.n_head // self.cfg.n_kv_head, self.cfg.head_dim
        x = repeat(self.v_proj(o), "b l (g e) -> b (g r e) l", r=rep, e=e)  # (b, di, l), head-major
        B = repeat(self.k_proj(o), "b l (g e) -> b (g r) e l", r=rep, e=e)  # (b, h, n, l)
        C = rearrange(self.q_proj(o), "b l (h e) -> b h e l", e=e)  # (b, h, n, l)
        return x, B.contiguous(), C

    def forward(self, o, rope=None, cache=None):  # o (b, l, d); rope is unused: no positions here
        x, B, C = self.project(o)
        z = rearrange(self.z_proj(o), "b l di -> b di l")
        # Delta, low rank d -> r -> di (dt_proj's bias goes to the scan); decoding: the weights multiplied once
        dt = F.linear(o, cache.seq.dt_weights[cache.j]) if cache is not None else \
            F.linear(self.dt_in_proj(o), self.dt_proj.weight)
        dt = rearrange(dt, "b l di -> b di l")
        # causal conv over time: left-pad with zeros, or with the cached last inputs when decoding
        k = self.cfg.d_conv - 1
        past = cache.conv if cache is not None else x.new_zeros(x.shape[0], x.shape[1], k)
        verify = cache is not None and cache.seq.draft_len and cache.seq.where is not None
        x_pad = torch.cat([past, x], dim=-1, out=cache.conv_window if verify else None)  # (b, di, k + l)
        x = F.silu(F.conv1d(x_pad, self.conv1d.weight, self.conv1d.bias, groups=x.shape[1]))  # (b, di, l)
        A = -torch.exp(self.A_log.float())  # (di, n)
        args = dict(D=self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        if cache is None:
            return self.o_proj(rearrange(kernels.scan(x, dt, A, B, C, **args), "b di l -> b l di"))
        if verify:  # speculative verification (Algorithm 2): one fused kernel; x_pad went to the conv window
            y = kernels.verify(cache.ssm, cache.x, cache.dt, cache.B, cache.replay, x, dt, A, B, C, **args)
            cache.B.copy_(B)  # the kernel stored x and Delta: the next verification replays a prefix of these
        elif o.shape[1] == 1:  # one decode step updates the state in place
            y = kernels.step(cache.ssm, x[..., 0], dt[..., 0], A, B[..., 0], C[..., 0], D=args["D"], z=z[..., 0],
                             dt_bias=args["delta_bias"], dt_softplus=True)[..., None]
            cache.conv.copy_(x_pad[..., -k:])
        else:  # several tokens at once (prefill): scan from the cached state
            y, last = kernels.scan(x, dt, A, B, C, **args, return_last_state=True, initial_state=cache.ssm)
            cache.ssm.copy_(last)
            cache.conv.copy_(x_pad[..., -k:])
        return self.o_proj(rearrange(y, "b di l -> b l di"))


# -----------------------------------------------------------------------------------------------
# The model: one class for the teacher and every hybrid; the config says which layers are attention


class Block(nn.Module):
    def __init__(self, cfg, attention):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(cfg.d_model), RMSNorm(cfg.d_model)
        self.mixer = Attention(cfg) if attention else MambaMixer(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, cache=None):
        x = x + self.mixer(self.attn_norm(x), rope, cache)
        return x + self.mlp(self.mlp_norm(x))


class Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i in cfg.attn_layers) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        e = cfg.head_dim
        self.register_buffer("inv_freq", cfg.rope_theta ** -(torch.arange(0, e, 2).float() / e), persistent=False)
        for name, p in self.named_parameters():  # GPT-2 / nanoGPT init; residual outputs scaled down
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
        for block in self.layers:
            if isinstance(block.mixer, MambaMixer):
                block.mixer.reset_ssm_parameters()

    def forward(self, idx, targets=None, caches=None):  # idx (b, l) -> logits (b, l, v)
        x = self.embed(idx)  # (b, l, d)
        # RoPE tables: the caches' rows at their device position (so that graphs replay), else 0 .. l-1
        rope = caches.begin(idx.shape[1]) if caches else \
            rope_tables(self.inv_freq, torch.arange(idx.shape[1], device=idx.device), x.dtype)
        for i, block in enumerate(self.layers):
            x = block(x, rope, caches[i] if caches else None)
        if caches:
            caches.advance(idx.shape[1])
        logits = self.lm_head(self.norm(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def new_caches(self, batch, max_len, device=None, dtype=None, draft_len=0):
        """One cache per layer; draft_len K > 0 prepares the Mamba layers for verifying K drafts."""
        weight = self.lm_head.weight
        return Caches(self, batch, max_len, device or weight.device, dtype or weight.dtype, draft_len)


# -----------------------------------------------------------------------------------------------
# Algorithm 1: a hybrid from a trained teacher


@torch.no_grad()
def hybrid_from_teacher(teacher, attn_layers, init="attention", student=None, conv_init=None):
    """Algorithm 1 (PAPER §2). Builds a model whose `attn_layers` stay attention and whose other
    layers are Mamba. Embeddings, norms, MLPs and kept attention layers are copied from the teacher.
    Each Mamba layer takes its attention layer's q/k/v/o_proj (-> C, B, x, output): the names match,
    so this is a copy by name; Delta, A, D, the conv and the gate are new. init="random" leaves the
    Mamba layers at their fresh initialization (the paper's ablation). With `student` (the previous
    step of stepwise distillation), layers that are Mamba there are carried over from it instead."""
    assert init in ("attention", "random"), init
    cfg = replace(teacher.cfg, attn_layers=tuple(attn_layers), conv_init=conv_init or teacher.cfg.conv_init)
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
# Generation with the static caches: prefill, then one token per step


def probabilities(logits, temperature=1.0, top_k=0):  # logits (..., v) -> probs (..., v), float32
    logits = logits.float() / max(temperature, 1e-8)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return F.softmax(logits, dim=-1)


def sample(logits, temperature=1.0, top_k=0, generator=None):  # (b, v) -> (b, 1); temperature 0: greedy
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    return sample_probs(probabilities(logits, temperature, top_k), generator)


def sample_probs(p, generator=None):  # p (b, v) >= 0, not necessarily normalized -> (b, 1)
    """The exponential race: argmax_i p_i / E_i, with E_i ~ Exp(1), is i with probability p_i / sum(p).
    Unlike torch.multinomial it never waits for the host, so it can sit inside a CUDA graph."""
    race = torch.empty_like(p).exponential_(generator=generator).clamp_(min=1e-30)  # 0 would make p / E nan
    return (p / race).argmax(-1, keepdim=True)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=0, generator=None):
    """idx (b, l) -> (b, l + max_new_tokens), with the same code for teacher and hybrids."""
    caches = model.new_caches(idx.shape[0], idx.shape[1] + max_new_tokens)
    logits, _ = model(idx, caches=caches)  # prefill
    out = [idx]
    for _ in range(max_new_tokens):
        out.append(sample(logits[:, -1], temperature, top_k, generator))
        logits, _ = model(out[-1], caches=caches)
    return torch.cat(out, dim=1)


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
    cfg = Config(**{**ckpt["config"], "attn_layers": tuple(ckpt["config"]["attn_layers"])})
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
