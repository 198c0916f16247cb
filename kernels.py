"""
The selective scan of Mamba-1, as a readable reference and as Triton kernels.

    h_t = exp(Delta_t * A) * h_{t-1} + Delta_t * B_t * u_t      (per channel d, per state n)
    y_t = sum_n C_t[n] * h_t[n] + D * u_t,  then  y_t *= silu(z_t)

Layouts are mamba_ssm's `selective_scan_fn` / `selective_state_update`, so either can be swapped in:
  u, delta, z (b, di, l); A (di, n); B, C (b, g, n, l), channel d uses group d // (di // g);
  D, delta_bias (di,); states (b, di, n) in float32.
A Mamba layer's decoding is fused further: `mamba_step` and `mamba_verify` start from its one input
projection and do the conv too. Each fast function has a `_ref` twin with the same signature (argmax's
is torch.argmax); `scan`, `step`, `verify`, `add_norm` and `argmax` pick one through BACKEND (auto |
triton | ref | mamba_ssm: the official kernels, imported when installed) and say once which path runs.
`python kernels.py` benchmarks them, side by side with mamba_ssm's when it imports.
"""
import math
import os
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # e.g. macOS: the reference is the only path, and `use_triton` says so
    triton, tl, HAVE_TRITON = SimpleNamespace(jit=lambda f: f), SimpleNamespace(constexpr=float), False

BACKEND = "auto"  # auto: Triton on CUDA tensors (or on CPU under TRITON_INTERPRET=1); ref: the loop
CHUNK = 32  # time steps per chunk: the forward saves the state at chunk starts for the backward
SSD_CHUNK = 64  # Mamba-2's chunked scans (ssd_chunked, the Triton SSD): time steps per chunk
TILE = 8  # time steps the scan kernels load at once: 16 bytes of bf16 per channel
FWD = {16: (256, 1), 64: (512, 2)}  # the forward's launch shapes by d_state, (states per warp, warps), and ...
BWD = {16: (128, 1), 64: (128, 1)}  # ... the backward's: the sweep of 2026-12-03 (H200; then one shape for both)
PER_SM = 4  # forward programs per SM below which a program takes fewer channels (down to 8)
CHANNELS = 16  # channels per program at most ...
WARPS = 1  # ... and warps per program, for the decode kernels
PROGRAMS = 256  # ... which take fewer channels per program until they have this many (a step is latency)
PIECES = 0  # long prompts at small batch: pieces of time run in parallel (0: as many as fill the GPU)
ARGMAX_BLOCK = 16384  # elements of a row the argmax kernel reads at once (SmolLM2's 49152: three)
POISON = False  # tests set it: outputs start as NaN, so an element a kernel forgets to write fails

# -----------------------------------------------------------------------------------------------
# The readable references: float32 loops over time that read like the equations


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None):
    """mamba_ssm's selective_scan_ref: float32, a plain loop over time. Like it, it materializes the
    per-step decays and inputs, and the states, as (l, b, di, n) tensors: simple, not frugal."""
    dtype, (b, di, _), g = u.dtype, u.shape, B.shape[1]
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    B = B.float().repeat_interleave(di // g, dim=1)  # (b, di, n, l): channel d reads group d // (di / g)
    C = C.float().repeat_interleave(di // g, dim=1)
    decay = torch.exp(torch.einsum("bdl,dn->lbdn", delta, A.float()))  # exp(Delta_t A)   (l, b, di, n)
    inp = torch.einsum("bdl,bdnl->lbdn", delta * u, B)  # Delta_t B_t u_t                  (l, b, di, n)
    h = initial_state.float() if initial_state is not None else u.new_zeros(b, di, A.shape[1])  # (b, di, n)
    hs = []
    for decay_t, inp_t in zip(decay, inp):  # over time
        h = decay_t * h + inp_t
        hs.append(h)
    y = torch.einsum("lbdn,bdnl->bdl", torch.stack(hs), C)  # y_t = C_t . h_t             (b, di, l)
    if D is not None:
        y = y + D.float()[:, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    return (y.to(dtype), h) if return_last_state else y.to(dtype)


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decode step: state (b, di, n) float32 is updated in place; x, dt, z (b, di); B, C (b, g, n)."""
    dt = dt.float() if dt_bias is None else dt.float() + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    rep = x.shape[1] // B.shape[1]
    B, C = B.float().repeat_interleave(rep, dim=1), C.float().repeat_interleave(rep, dim=1)  # (b, di, n)
    state.copy_(torch.exp(dt[..., None] * A) * state + (dt * x.float())[..., None] * B)
    y = (state * C).sum(-1)  # (b, di)
    if D is not None:
        y = y + D.float() * x.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)

def selective_state_verify_ref(state, x_prev, dt_prev, B_prev, replay, x, dt, A, B, C, D=None, z=None,
                               dt_bias=None, dt_softplus=False):
    """Algorithm 2's verification step as a loop of `selective_state_update_ref`. First replay, into
    the committed state (b, di, n), the first replay[b] of the previously verified tokens (x_prev,
    dt_prev (b, di, w); B_prev (b, g, n, w)): their outputs are known already. Then step through the
    new tokens (x, dt, z (b, di, l); B, C (b, g, n, l)) from a copy, emitting y (b, di, l); the
    committed state stays at the last accepted token. The new x and dt are stored into x_prev and
    dt_prev for the next verification (B_prev is the caller's to update: every channel of a group
    reads it)."""
    for i in range(x_prev.shape[-1]):
        stepped = state.clone()
        selective_state_update_ref(stepped, x_prev[..., i], dt_prev[..., i], A, B_prev[..., i], B_prev[..., i],
                                   dt_bias=dt_bias, dt_softplus=dt_softplus)
        state.copy_(torch.where((i < replay)[:, None, None], stepped, state))  # rows replay their own count
    h = state.clone()
    y = torch.stack([selective_state_update_ref(h, x[..., t], dt[..., t], A, B[..., t], C[..., t], D,
                                                z[..., t] if z is not None else None, dt_bias, dt_softplus)
                     for t in range(x.shape[-1])], dim=-1)
    x_prev[..., :x.shape[-1]], dt_prev[..., :x.shape[-1]] = x, dt
    return y



def ssd_scan_ref(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, initial_state=None,
                 return_last_state=False):
    """Mamba-2's scan in mamba_ssm's layout (`mamba_chunk_scan_combined`'s), a float32 loop over time.
    One scalar decay per head and step: h_t = exp(Delta_t A) h_{t-1} + Delta_t x_t B_t^T, a (p, n) state
    per head, y_t = h_t C_t + D x_t, times silu(z_t). x, z (b, l, h, p); dt (b, l, h); A, dt_bias (h,);
    B, C (b, l, g, n), head i reading group i // (h / g); D (h,) or (h, p); states (b, h, p, n)."""
    (b, l, h, p), (g, n) = x.shape, B.shape[2:]
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0)
    dt = F.softplus(dt) if dt_softplus else dt  # (b, l, h)
    B, C = (t.float().repeat_interleave(h // g, dim=2) for t in (B, C))  # (b, l, h, n)
    state = initial_state.float() if initial_state is not None else x.new_zeros(b, h, p, n, dtype=torch.float32)
    ys = []
    for t in range(l):  # over time
        decay = torch.exp(dt[:, t] * A.float())[..., None, None]  # (b, h, 1, 1)
        state = decay * state + (dt[:, t, :, None] * x[:, t].float())[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = torch.stack(ys, dim=1)  # (b, l, h, p)
    if D is not None:
        y = y + (D.float()[:, None] if D.dim() == 1 else D.float()) * x.float()
    if z is not None:
        y = y * F.silu(z.float())
    return (y.to(x.dtype), state) if return_last_state else y.to(x.dtype)


def _ssd_decays(dt, A, dt_bias, dt_softplus, chunk):
    """Delta (b, l, h) float32; the same in chunks, padded with Delta = 0 (which leaves a state alone),
    (b, h, c, q); and S, each chunk's log decay since its start, cumsum(Delta A) (b, h, c, q)."""
    Delta = dt.float() + (dt_bias.float() if dt_bias is not None else 0)
    Delta = F.softplus(Delta) if dt_softplus else Delta
    Delta_c = rearrange(F.pad(Delta, (0, 0, 0, -dt.shape[1] % chunk)), "b (c q) h -> b h c q", q=chunk).contiguous()
    return Delta, Delta_c, torch.cumsum(Delta_c * A.float()[:, None, None], dim=-1).contiguous()


def ssd_chunked(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, initial_state=None,
                return_last_state=False, chunk=SSD_CHUNK):
    """The same scan in Mamba-2's chunked matmul form ("state space duality"), the contract of
    `ssd_scan_ref`, in float32 PyTorch (its backward is autograd's): time cut into chunks of `chunk`
    steps; within a chunk the outputs are a masked matrix product, across chunks a short scan of
    states. The path where Triton does not run."""
    (b, l, h, p), (g, n) = x.shape, B.shape[2:]
    dt, _, S = _ssd_decays(dt, A, dt_bias, dt_softplus, chunk)  # (b, l, h); S (b, h, c, q)
    pad = -l % chunk
    chunks = lambda t, names: rearrange(F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)), f"b (c q) {names}", q=chunk)
    xdt = chunks(x.float() * dt[..., None], "h p -> b c q h p")  # Delta_s x_s
    B, C = (chunks(t.float().repeat_interleave(h // g, dim=2), "h n -> b c q h n") for t in (B, C))
    # 1. within each chunk: y_t = sum_{s<=t} (C_t . B_s) exp(S_t - S_s) Delta_s x_s
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp((S[..., :, None] - S[..., None, :]).masked_fill(~causal, -math.inf))  # (b, h, c, t, s)
    y = torch.einsum("bcthn,bcshn,bhcts,bcshp->bcthp", C, B, decay, xdt)
    # 2. each chunk's final state from zero: sum_s exp(S_last - S_s) Delta_s x_s B_s^T   (b, c, h, p, n)
    own = torch.einsum("bcshn,bhcs,bcshp->bchpn", B, torch.exp(S[..., -1:] - S), xdt)
    # 3. the state entering each chunk: a scan over chunks, each decaying by its whole exp(S_last)
    state = initial_state.float() if initial_state is not None else x.new_zeros(b, h, p, n, dtype=torch.float32)
    entering = []
    for c in range(own.shape[1]):
        entering.append(state)
        state = torch.exp(S[:, :, c, -1])[..., None, None] * state + own[:, c]
    # 4. what the entering state adds to each output: exp(S_t) C_t . h_in
    y = y + torch.einsum("bcthn,bchpn,bhct->bcthp", C, torch.stack(entering, dim=1), torch.exp(S))
    y = rearrange(y, "b c q h p -> b (c q) h p")[:, :l]
    if D is not None:
        y = y + (D.float()[:, None] if D.dim() == 1 else D.float()) * x.float()
    if z is not None:
        y = y * F.silu(z.float())
    return (y.to(x.dtype), state) if return_last_state else y.to(x.dtype)


# A Mamba layer's decoding, from its one input projection xBCzdt (b, g p + g n + h n + 2 di) per token:
# x and B per KV head (g of them), C per head, z and Delta per channel (di = h p; head i reads KV head
# i // (h / g), as GQA pairs them). mil.py derives that projection's weight once per caches.


def _fields(xBCzdt, heads, n, di):  # -> x (.., di) repeated over each KV head's heads, B (.., g, n), C (.., h, n), z, dt
    p = di // heads
    g = (xBCzdt.shape[-1] - heads * n - 2 * di) // (p + n)
    x, B, C, z, dt = xBCzdt.split([g * p, g * n, heads * n, di, di], dim=-1)
    x = repeat(x, "... (g p) -> ... (g r p)", r=heads // g, p=p)
    return x, B.unflatten(-1, (g, n)), C.unflatten(-1, (heads, n)), z, dt


def mamba_step_ref(state, conv, xBCzdt, conv_weight, conv_bias, A, D, dt_bias, heads, update=None):
    """One decode step: the causal conv over the cached last k inputs conv (b, di, k) (shifted in
    place) and the new x, SiLU, then `selective_state_update_ref` on state (b, di, n), or `update` (e.g.
    mamba_ssm's). conv_weight (di, k + 1), conv_bias, A (di, n), D, dt_bias: float32. Returns y (b, di)."""
    x, B, C, z, dt = _fields(xBCzdt, heads, state.shape[2], state.shape[1])
    window = torch.cat([conv, x[..., None]], dim=-1)  # (b, di, k + 1)
    conv.copy_(window[..., 1:])
    x = F.silu((window.float() * conv_weight).sum(-1) + conv_bias).to(x.dtype)
    B = B.repeat_interleave(heads // B.shape[1], dim=1)  # (b, h, n), as C
    return (update or selective_state_update_ref)(state, x, dt, A, B, C, D, z, dt_bias, True)


def mamba_prefill_ref(state, conv, xBCzdt, conv_weight, conv_bias, A, D, dt_bias, heads):
    """A prompt's l tokens xBCzdt (b, l, ..) after the cached state: the causal conv over the cached k
    inputs conv (b, di, k) and the new x, SiLU, then `selective_scan_ref` from state (b, di, n). Both
    caches are updated in place. Returns y (b, l, di)."""
    (b, di, n), k = state.shape, conv.shape[-1]
    x, B, C, z, dt = (rearrange(t, "b l ... -> b ... l") for t in _fields(xBCzdt, heads, n, di))
    window = torch.cat([conv, x], dim=-1)  # (b, di, k + l)
    conv.copy_(window[..., window.shape[-1] - k:])
    x = F.silu(F.conv1d(window.float(), conv_weight[:, None], conv_bias, groups=di)).to(x.dtype)
    B = B.repeat_interleave(heads // B.shape[1], dim=1)  # (b, h, n, l), as C
    y, last = selective_scan_ref(x, dt, A, B, C, D, z, dt_bias, True, return_last_state=True, initial_state=state)
    state.copy_(last)
    return y.transpose(1, 2)


def mamba_verify_ref(state, conv, conv_window, x_prev, dt_prev, B_prev, replay, xBCzdt, conv_weight, conv_bias,
                     A, D, dt_bias, heads):
    """Algorithm 2's verification of l tokens xBCzdt (b, l, ..): their raw x after the cached k go to
    conv_window (b, di, k + l..), from which accepting m tokens keeps the k before token m; the conv,
    SiLU, then `selective_state_verify_ref`, with B_prev (b, g, n, w) per KV head, which is updated
    here too. Returns y (b, l, di)."""
    (b, di, n), l, k = state.shape, xBCzdt.shape[1], conv.shape[-1]
    x, B, C, z, dt = (rearrange(t, "b l ... -> b ... l") for t in _fields(xBCzdt, heads, n, di))
    conv_window[..., :k + l] = torch.cat([conv, x], dim=-1)
    x = F.silu(F.conv1d(conv_window[..., :k + l].float(), conv_weight[:, None], conv_bias, groups=di)).to(x.dtype)
    y = selective_state_verify_ref(state, x_prev, dt_prev, B_prev, replay, x, dt, A,
                                   B.repeat_interleave(heads // B.shape[1], dim=1), C, D, z, dt_bias, True)
    B_prev[..., :l] = B
    return y.transpose(1, 2)


def add_rms_norm_ref(x, r, weight, eps):
    """The residual add and the RMSNorm after it: (x + r, RMSNorm(x + r)), x, r (.., d)."""
    s = x + r
    return s, F.rms_norm(s, (s.shape[-1],), weight, eps)


# -----------------------------------------------------------------------------------------------
# Triton kernels. One program owns BLOCK_D channels of one batch row (all in one group, so they share
# B_t and C_t) and keeps their states in registers while it walks time. The scan kernels read time in
# tiles of TILE steps: u, Delta, z as [BLOCK_D, TILE] tiles (16-byte loads), B and C as [BLOCK_N, TILE];
# column s of a tile is picked with a compile-time mask (`_col`), outputs gather into a tile (`_put`).
# The decode kernels hold the states as [BLOCK_N, BLOCK_D]. Not `tl.associative_scan` along time: it does
# more work and moves a [channels, states, time] tile through registers.

LOG2E, LN2 = tl.constexpr(1.4426950408889634), tl.constexpr(0.6931471805599453)  # exp(x) = exp2(x * log2(e))


@triton.jit
def _softplus(x):  # log(1 + e^x), linear past 20 as in PyTorch
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


@triton.jit
def _col(x, k: tl.constexpr, idx):  # column k of a [rows, TILE] tile: a register pick where time sits in one
    # thread, else a few shuffles: the scan kernels' 8- and 16-channel tiles spread time over 2-4 lanes
    return tl.sum(tl.where(idx[None, :] == k, x, -0.0), axis=1)


@triton.jit
def _put(x, k: tl.constexpr, idx, v):  # the same tile with column k set to v [rows]
    return tl.where(idx[None, :] == k, v[:, None], x)


@triton.jit
def _delta(dt, bias, mt, SOFTPLUS: tl.constexpr):  # Delta for a [d, TILE] tile; 0 past L, which leaves h alone
    dt = dt + bias[:, None]
    if SOFTPLUS:
        dt = _softplus(dt)
    return tl.where(mt[None, :], dt, 0.0)


@triton.jit
def _conv_tile(x_ptr, past_ptr, cw_ptr, cb, xrows, prow, d, tt, mt, s_xt, K: tl.constexpr, dtype):
    """u for a [d, TILE] tile of times tt where the scan runs the causal conv itself: SiLU of the conv
    over the raw x at tt - K .. tt (before time 0: the cached window past (b, di, K)), rounded to dtype
    as a stored u would be."""
    u = cb[:, None]
    for i in tl.static_range(K + 1):
        ti = tt - K + i  # [TILE]
        x = tl.load(x_ptr + xrows + (i - K) * s_xt, mask=mt[None, :] & (ti >= 0)[None, :], other=0.0)
        if K > 0:
            x += tl.load(past_ptr + prow[:, None] + (K + ti)[None, :], mask=mt[None, :] & (ti < 0)[None, :], other=0.0)
        u = u + tl.load(cw_ptr + d * (K + 1) + i)[:, None] * x.to(tl.float32)
    return (u * tl.sigmoid(u)).to(dtype).to(tl.float32)


@triton.jit
def _scan_fwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, out_ptr, y_ptr, hc_ptr,
                     last_ptr, dtsum_ptr, ends_ptr, cw_ptr, cb_ptr, past_ptr, L, T, P, DI, N, REP, BREP, n_chunks,
                     s_ub, s_uc, s_ut, s_Bb, s_Bg, s_Bn, s_Bt, s_ob, s_oc, s_ot, HAS_D: tl.constexpr,
                     HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr, SOFTPLUS: tl.constexpr,
                     OUTPUT: tl.constexpr, CARRY: tl.constexpr, SAVE_CHUNKS: tl.constexpr, CONV: tl.constexpr,
                     CHUNK: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program walks T steps of BLOCK_D channels: piece row % P of batch row row // P (P = 1, T = L:
    the whole sequence). OUTPUT=False (the first pass of a prefill in pieces) computes only the end
    state and the sum of Delta; CARRY (its second pass) first folds those of the earlier pieces into
    its start state; SAVE_CHUNKS keeps what the backward reads: the chunk-start states and, with z, the
    output before its gate (as mamba_ssm does; the backward's dz needs it). Any strides: u, Delta and z
    share theirs (s_u*), B and C theirs, out and y theirs. With CONV = k >= 0 (a Mamba layer's prefill,
    read in place from its input projection) u is the raw x per B group of BREP groups of C (a KV head
    of BREP heads), and the conv over the cached k inputs past (b, di, k) and SiLU make the scan's u
    (CONV = -1: u is the scan's input)."""
    row, pd = tl.program_id(0).to(tl.int64), tl.program_id(1)
    b, start = row // P, (row % P) * T
    d = pd * BLOCK_D + tl.arange(0, BLOCK_D)  # this program's channels
    n = tl.arange(0, BLOCK_N)
    k = tl.arange(0, TILE)  # time within a tile
    mn = n < N
    g = (pd * BLOCK_D) // REP  # their group of C, and of B: g // BREP
    xc = (d // (REP * BREP)) * REP + d % REP  # their channels of u: d, or the KV head's that the conv reads
    dn = d[:, None] * N + n[None, :]  # offsets into (di, n) tensors
    # stage 1: per-channel constants, A pre-scaled so that exp(dt * A) = exp2(dt * A2)
    A2 = tl.load(A_ptr + dn, mask=mn[None, :], other=0.0) * LOG2E
    Dv = tl.load(D_ptr + d) if HAS_D else tl.zeros([BLOCK_D], dtype=tl.float32)
    bias = tl.load(bias_ptr + d) if HAS_BIAS else tl.zeros([BLOCK_D], dtype=tl.float32)
    cb = tl.load(cb_ptr + d) if CONV >= 0 else bias
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_H0:  # per batch row in the pieces' second pass, else per program row
        h = tl.load(h0_ptr + (b if CARRY else row) * DI * N + dn, mask=mn[None, :], other=0.0)
    if CARRY:  # the true start: fold in the earlier pieces' end states, h = exp(A * their sum of Delta) h + end
        for q in range(b * P, row):
            h = tl.exp2(A2 * tl.load(dtsum_ptr + q * DI + d)[:, None]) * h + \
                tl.load(ends_ptr + q * DI * N + dn, mask=mn[None, :], other=0.0)
    dt_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    tt = start + k  # [TILE] tiles of u, delta, z, out (16-byte loads along time where its stride is 1)
    rows, xrows = b * s_ub + d[:, None] * s_uc + tt[None, :] * s_ut, b * s_ub + xc[:, None] * s_uc + tt[None, :] * s_ut
    u_p, t_p, z_p = u_ptr + xrows, dt_ptr + rows, z_ptr + rows
    orows = b * s_ob + d[:, None] * s_oc + tt[None, :] * s_ot
    o_p, y_p = out_ptr + orows, y_ptr + orows
    bc = b * s_Bb + n[:, None] * s_Bn + tt[None, :] * s_Bt  # [n, TILE] tiles of B and C
    B_p, C_p = B_ptr + bc + (g // BREP) * s_Bg, C_ptr + bc + g * s_Bg
    prow = (b * DI + d) * CONV  # the conv's cached inputs
    hc_p = hc_ptr + (row * DI * n_chunks + d[:, None] * n_chunks) * N + n[None, :]  # (b, di, chunks, n)
    # stage 2: walk time a tile at a time; the next tile's loads are issued before this one's math
    mt = k < T
    if CONV >= 0:
        u_n = _conv_tile(u_ptr, past_ptr, cw_ptr, cb, xrows, prow, d, tt, mt, s_ut, CONV, out_ptr.dtype.element_ty)
    else:
        u_n = tl.load(u_p, mask=mt[None, :], other=0.0)
    t_n = tl.load(t_p, mask=mt[None, :], other=0.0)
    z_n = tl.load(z_p, mask=mt[None, :], other=0.0) if HAS_Z and OUTPUT else u_n
    B_n = tl.load(B_p, mask=mn[:, None] & mt[None, :], other=0.0)
    C_n = tl.load(C_p, mask=mn[:, None] & mt[None, :], other=0.0) if OUTPUT else B_n
    for t0 in range(0, T, TILE):
        if SAVE_CHUNKS and t0 % CHUNK == 0:  # the backward restarts each chunk from here
            tl.store(hc_p + (t0 // CHUNK) * N, h, mask=mn[None, :])
        u, dt, z, Bt, Ct = u_n.to(tl.float32), t_n.to(tl.float32), z_n.to(tl.float32), B_n.to(tl.float32), C_n.to(tl.float32)
        mt, mt_n = (t0 + k) < T, (t0 + TILE + k) < T
        if CONV >= 0:
            u_n = _conv_tile(u_ptr, past_ptr, cw_ptr, cb, xrows + (t0 + TILE) * s_ut, prow, d, tt + t0 + TILE, mt_n,
                             s_ut, CONV, out_ptr.dtype.element_ty)
        else:
            u_n = tl.load(u_p + (t0 + TILE) * s_ut, mask=mt_n[None, :], other=0.0)
        t_n = tl.load(t_p + (t0 + TILE) * s_ut, mask=mt_n[None, :], other=0.0)
        if HAS_Z and OUTPUT:
            z_n = tl.load(z_p + (t0 + TILE) * s_ut, mask=mt_n[None, :], other=0.0)
        B_n = tl.load(B_p + (t0 + TILE) * s_Bt, mask=mn[:, None] & mt_n[None, :], other=0.0)
        if OUTPUT:
            C_n = tl.load(C_p + (t0 + TILE) * s_Bt, mask=mn[:, None] & mt_n[None, :], other=0.0)
        # stage 3: Delta for the whole tile
        dt = _delta(dt, bias, mt, SOFTPLUS)
        dtu = dt * u
        if OUTPUT:
            # stage 4: the recurrence, one step per column: h = exp(Delta A) h + Delta B u; y = C . h
            y = tl.zeros([BLOCK_D, TILE], dtype=tl.float32)
            for s in tl.static_range(TILE):
                B_s, C_s = _col(Bt, s, k), _col(Ct, s, k)
                h = tl.exp2(_col(dt, s, k)[:, None] * A2) * h + _col(dtu, s, k)[:, None] * B_s[None, :]
                y = _put(y, s, k, tl.sum(h * C_s[None, :], axis=1))
            # stage 5: + D u, gated by silu(z), stored a tile at a time
            y += Dv[:, None] * u
            if HAS_Z:
                if SAVE_CHUNKS:
                    tl.store(y_p + t0 * s_ot, y.to(y_ptr.dtype.element_ty), mask=mt[None, :])
                y = y * z * tl.sigmoid(z)
            tl.store(o_p + t0 * s_ot, y.to(out_ptr.dtype.element_ty), mask=mt[None, :])
        else:  # the state alone, and the Delta that the pieces' decays are made of
            for s in tl.static_range(TILE):
                h = tl.exp2(_col(dt, s, k)[:, None] * A2) * h + _col(dtu, s, k)[:, None] * _col(Bt, s, k)[None, :]
            dt_sum += tl.sum(dt, axis=1)
    tl.store(last_ptr + row * DI * N + dn, h, mask=mn[None, :])
    if not OUTPUT:
        tl.store(dtsum_ptr + row * DI + d, dt_sum)


@triton.jit
def _scan_bwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, hc_ptr, dout_ptr, scratch_ptr,
                     du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, dh0_ptr,
                     L, DI, N, REP, n_chunks, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     CHUNK: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Walks the chunks from last to first. Per chunk: recompute its states from the saved chunk-start
    state into a small per-program scratch (CHUNK + 1 tiles, reused by every chunk), then walk back
    through it carrying dh. dA, dD, dbias are summed in registers; dB and dC are summed over the
    program's channels and added to the group's float32 sums with relaxed atomics (on the H200 that
    took S2's backward from 12.4 to 9.1 ms: per-program partials wrote and re-read 17 GB there)."""
    b, pd = tl.program_id(0).to(tl.int64), tl.program_id(1)
    d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    k = tl.arange(0, TILE)
    mn = n < N
    g = (pd * BLOCK_D) // REP
    dn = d[:, None] * N + n[None, :]
    tile = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + n[None, :]  # a scratch tile [d, n]
    scratch = scratch_ptr + (b * tl.num_programs(1) + pd) * (CHUNK + 1) * BLOCK_D * BLOCK_N + tile
    A2 = tl.load(A_ptr + dn, mask=mn[None, :], other=0.0) * LOG2E
    Dv = tl.load(D_ptr + d) if HAS_D else tl.zeros([BLOCK_D], dtype=tl.float32)
    bias = tl.load(bias_ptr + d) if HAS_BIAS else tl.zeros([BLOCK_D], dtype=tl.float32)
    rows = (b * DI + d)[:, None] * L + k[None, :]  # [d, TILE] tiles, as in the forward
    u_p, t_p, z_p, o_p, y_p = u_ptr + rows, dt_ptr + rows, z_ptr + rows, dout_ptr + rows, y_ptr + rows
    du_p, ddt_p, dz_p = du_ptr + rows, ddt_ptr + rows, dz_ptr + rows
    bc = ((b * (DI // REP) + g) * N + n)[:, None] * L + k[None, :]  # [n, TILE]
    B_p, C_p = B_ptr + bc, C_ptr + bc
    dBC = ((b * (DI // REP) + g) * L) * N + n  # dB, dC (b, g, l, n): every program of the group adds to them
    dh = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dA = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dD = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(n_chunks):
        t0 = (n_chunks - 1 - i) * CHUNK
        steps = tl.minimum(CHUNK, L - t0)
        # stage 1: recompute this chunk's states h_{t0-1} .. into the scratch (steps past L repeat h)
        h = tl.load(hc_ptr + (b * DI * n_chunks + d[:, None] * n_chunks + t0 // CHUNK) * N + n[None, :],
                    mask=mn[None, :], other=0.0)
        tl.store(scratch, h)
        for j in range(0, steps, TILE):
            mt = (t0 + j + k) < L
            dt = _delta(tl.load(t_p + (t0 + j), mask=mt[None, :], other=0.0).to(tl.float32), bias, mt, SOFTPLUS)
            dtu = dt * tl.load(u_p + (t0 + j), mask=mt[None, :], other=0.0).to(tl.float32)
            Bt = tl.load(B_p + (t0 + j), mask=mn[:, None] & mt[None, :], other=0.0).to(tl.float32)
            for s in tl.static_range(TILE):
                h = tl.exp2(_col(dt, s, k)[:, None] * A2) * h + _col(dtu, s, k)[:, None] * _col(Bt, s, k)[None, :]
                tl.store(scratch + (j + s + 1) * BLOCK_D * BLOCK_N, h)
        tl.debug_barrier()
        # stage 2: walk back through the chunk, a tile at a time, a step at a time; h is h_t, h_prev h_{t-1}
        n_tiles = tl.cdiv(steps, TILE)
        for jj in range(n_tiles):
            j = (n_tiles - 1 - jj) * TILE
            t = t0 + j
            mt = (t + k) < L
            dt_raw = tl.load(t_p + t, mask=mt[None, :], other=0.0).to(tl.float32) + bias[:, None]
            dt = tl.where(mt[None, :], _softplus(dt_raw) if SOFTPLUS else dt_raw, 0.0)
            u = tl.load(u_p + t, mask=mt[None, :], other=0.0).to(tl.float32)
            Bt = tl.load(B_p + t, mask=mn[:, None] & mt[None, :], other=0.0).to(tl.float32)
            Ct = tl.load(C_p + t, mask=mn[:, None] & mt[None, :], other=0.0).to(tl.float32)
            dy = tl.load(o_p + t, mask=mt[None, :], other=0.0).to(tl.float32)  # dL/dout
            if HAS_Z:  # out = y * silu(z): dz = dout * y * silu'(z) (y saved by the forward), and dy = dout * silu(z)
                z = tl.load(z_p + t, mask=mt[None, :], other=0.0).to(tl.float32)
                sz = tl.sigmoid(z)
                y = tl.load(y_p + t, mask=mt[None, :], other=0.0).to(tl.float32)
                tl.store(dz_p + t, (dy * sz * (1.0 + z * (1.0 - sz)) * y).to(dz_ptr.dtype.element_ty), mask=mt[None, :])
                dy = dy * z * sz
            dtu = dt * u
            dhB = tl.zeros([BLOCK_D, TILE], dtype=tl.float32)  # sum_n dh_t B_t, column by column
            ddt = tl.zeros([BLOCK_D, TILE], dtype=tl.float32)
            h = tl.load(scratch + (j + TILE) * BLOCK_D * BLOCK_N)
            for s in tl.static_range(TILE - 1, -1, -1):
                h_prev = tl.load(scratch + (j + s) * BLOCK_D * BLOCK_N)
                C_s, B_s, dy_s, dt_s = _col(Ct, s, k), _col(Bt, s, k), _col(dy, s, k), _col(dt, s, k)
                dh += dy_s[:, None] * C_s[None, :]  # dL/dh_t
                ok = mn & (t + s + 0 * n < L)  # this step is inside the sequence
                dC_s, dB_s = tl.sum(dy_s[:, None] * h, axis=0), tl.sum(dh * _col(dtu, s, k)[:, None], axis=0)
                tl.atomic_add(dC_ptr + dBC + (t + s) * N, dC_s, mask=ok, sem="relaxed")  # no ordering needed: a sum
                tl.atomic_add(dB_ptr + dBC + (t + s) * N, dB_s, mask=ok, sem="relaxed")
                dhB_s = tl.sum(dh * B_s[None, :], axis=1)
                dh_a = dh * tl.exp2(dt_s[:, None] * A2)  # dL/dh_{t-1}, through the decay exp(dt A)
                da = dh_a * h_prev  # dL/d(dt * A), times log2(e) below as A2 is
                ddt = _put(ddt, s, k, dhB_s * _col(u, s, k) + tl.sum(da * A2, axis=1) * LN2)
                dhB = _put(dhB, s, k, dhB_s)
                dA += da * dt_s[:, None]
                dh = dh_a
                h = h_prev
            # stage 3: the tile's per-channel gradients, stored a tile at a time
            tl.store(du_p + t, (dy * Dv[:, None] + dhB * dt).to(du_ptr.dtype.element_ty), mask=mt[None, :])
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(dt_raw)
            ddt = tl.where(mt[None, :], ddt, 0.0)
            tl.store(ddt_p + t, ddt.to(ddt_ptr.dtype.element_ty), mask=mt[None, :])
            dD += tl.sum(dy * u, axis=1)
            dbias += tl.sum(ddt, axis=1)
        tl.debug_barrier()  # the next chunk overwrites the scratch
    tl.store(dA_ptr + b * DI * N + dn, dA, mask=mn[None, :])  # per-batch partials, summed by the caller
    tl.store(dD_ptr + b * DI + d, dD)
    tl.store(dbias_ptr + b * DI + d, dbias)
    tl.store(dh0_ptr + b * DI * N + dn, dh, mask=mn[None, :])


@triton.jit
def _decode_tile(state_ptr, A_ptr, DI, N, REP, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """What a decoding program starts from: its row b, channels d, states n (and their mask), group,
    state pointers, the state tile h [n, d] and A2 = A * log2(e)."""
    b, pd = tl.program_id(0).to(tl.int64), tl.program_id(1)
    d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    mn = n < N
    sp = state_ptr + b * DI * N + d[None, :] * N + n[:, None]
    h = tl.load(sp, mask=mn[:, None], other=0.0)
    A2 = tl.load(A_ptr + d[None, :] * N + n[:, None], mask=mn[:, None], other=0.0) * LOG2E
    return b, d, n, mn, (pd * BLOCK_D) // REP, sp, h, A2


@triton.jit
def _step_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
                 DI, N, REP, s_xb, s_xd, s_tb, s_td, s_zb, s_zd, s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn, s_ob,
                 HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """One decode step, the state read once and written once."""
    b, d, n, mn, g, sp, h, A2 = _decode_tile(state_ptr, A_ptr, DI, N, REP, BLOCK_D, BLOCK_N)
    x = tl.load(x_ptr + b * s_xb + d * s_xd).to(tl.float32)
    dt = tl.load(dt_ptr + b * s_tb + d * s_td).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + d)
    if SOFTPLUS:
        dt = _softplus(dt)
    Bt = tl.load(B_ptr + b * s_Bb + g * s_Bg + n * s_Bn, mask=mn, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + b * s_Cb + g * s_Cg + n * s_Cn, mask=mn, other=0.0).to(tl.float32)
    h = tl.exp2(dt[None, :] * A2) * h + (dt * x)[None, :] * Bt[:, None]
    tl.store(sp, h, mask=mn[:, None])
    y = tl.sum(h * Ct[:, None], axis=0)
    if HAS_D:
        y += tl.load(D_ptr + d) * x
    if HAS_Z:
        z = tl.load(z_ptr + b * s_zb + d * s_zd).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(out_ptr + b * s_ob + d, y.to(out_ptr.dtype.element_ty))


@triton.jit
def _layer_tile(state_ptr, A_ptr, p_ptr, DI, N, P, REP, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """_decode_tile for a Mamba layer's fused decoding (groups of P channels: heads), and the offsets
    of the program's fields in a row of the projection xBCzdt (see `_fields`)."""
    b, d, n, mn, head, sp, h, A2 = _decode_tile(state_ptr, A_ptr, DI, N, P, BLOCK_D, BLOCK_N)
    kv, G, H = head // REP, DI // P // REP, DI // P  # this head's KV head; the numbers of KV heads, heads
    ox, oB, oC = kv * P + d % P, G * P + kv * N + n, G * (P + N) + head * N + n  # x, B, C
    oz, odt = G * (P + N) + H * N + d, G * (P + N) + H * N + DI + d  # z, Delta
    return b, d, n, mn, kv, G, sp, h, A2, ox, oB, oC, oz, odt


@triton.jit
def _conv_silu(win_ptr, cw_ptr, cb_ptr, d, K: tl.constexpr, dtype):  # SiLU of the causal conv over K + 1 inputs
    x = tl.load(cb_ptr + d)
    for i in tl.static_range(K + 1):
        x += tl.load(cw_ptr + d * (K + 1) + i) * tl.load(win_ptr + i).to(tl.float32)
    return (x * tl.sigmoid(x)).to(dtype).to(tl.float32)  # rounded as stored, so that a replay sees the same x


@triton.jit
def _mamba_step_kernel(state_ptr, conv_ptr, p_ptr, cw_ptr, cb_ptr, A_ptr, D_ptr, bias_ptr, out_ptr, DI, N, P, REP,
                       s_pb, K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """A Mamba layer's decode step after its input projection: x and B read in place from their KV
    head's rows (no repeated copies); the conv window (b, di, K) shifted in place; conv, SiLU,
    softplus(Delta + bias), the state update, C . h + D x, the gate; y (b, di) for o_proj."""
    b, d, n, mn, kv, G, sp, h, A2, ox, oB, oC, oz, odt = _layer_tile(state_ptr, A_ptr, p_ptr, DI, N, P, REP,
                                                                     BLOCK_D, BLOCK_N)
    row, win = p_ptr + b * s_pb, conv_ptr + (b * DI + d) * K
    x_raw = tl.load(row + ox).to(conv_ptr.dtype.element_ty)
    x = tl.load(cb_ptr + d)
    for i in tl.static_range(K):  # the conv over the window, in _conv_silu's order, shifted as it is read
        w = tl.load(win + i)
        x += tl.load(cw_ptr + d * (K + 1) + i) * w.to(tl.float32)
        if i > 0:
            tl.store(win + i - 1, w)
    if K > 0:
        tl.store(win + K - 1, x_raw)
    x += tl.load(cw_ptr + d * (K + 1) + K) * x_raw.to(tl.float32)
    x = (x * tl.sigmoid(x)).to(out_ptr.dtype.element_ty).to(tl.float32)  # rounded as _conv_silu rounds it
    dt = _softplus(tl.load(row + odt).to(tl.float32) + tl.load(bias_ptr + d))
    Bt = tl.load(row + oB, mask=mn, other=0.0).to(tl.float32)
    Ct = tl.load(row + oC, mask=mn, other=0.0).to(tl.float32)
    h = tl.exp2(dt[None, :] * A2) * h + (dt * x)[None, :] * Bt[:, None]
    tl.store(sp, h, mask=mn[:, None])
    z = tl.load(row + oz).to(tl.float32)
    y = (tl.sum(h * Ct[:, None], axis=0) + tl.load(D_ptr + d) * x) * z * tl.sigmoid(z)
    tl.store(out_ptr + b * DI + d, y.to(out_ptr.dtype.element_ty))


@triton.jit
def _mamba_verify_kernel(state_ptr, conv_ptr, win_ptr, xp_ptr, tp_ptr, Bp_ptr, replay_ptr, p_ptr, cw_ptr, cb_ptr,
                         A_ptr, D_ptr, bias_ptr, out_ptr, L, W, DI, N, P, REP, s_pb, s_pl,
                         K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Algorithm 2's MultiStep for a Mamba layer after its input projection: load the committed state,
    replay the accepted prefix of the last verified tokens (no outputs), store it as the new committed
    state; then the new tokens: their raw x after the cached window into the conv window, conv, SiLU,
    outputs (b, l, di), writing no state, only their x and Delta over the replayed ones (a program's
    own channels: no other program reads them)."""
    b, d, n, mn, kv, G, sp, h, A2, ox, oB, oC, oz, odt = _layer_tile(state_ptr, A_ptr, p_ptr, DI, N, P, REP,
                                                                     BLOCK_D, BLOCK_N)
    bias, Dv = tl.load(bias_ptr + d), tl.load(D_ptr + d)
    prev, win = (b * DI + d) * W, win_ptr + (b * DI + d) * (K + W)  # this row's channels in x_prev, the window
    # stage 1: replay the accepted tokens of the previous verification (this row's count of them)
    for i in range(tl.load(replay_ptr + b)):
        x = tl.load(xp_ptr + prev + i).to(tl.float32)
        dt = _softplus(tl.load(tp_ptr + prev + i).to(tl.float32) + bias)
        Bt = tl.load(Bp_ptr + ((b * G + kv) * N + n) * W + i, mask=mn, other=0.0).to(tl.float32)
        h = tl.exp2(dt[None, :] * A2) * h + (dt * x)[None, :] * Bt[:, None]
    tl.store(sp, h, mask=mn[:, None])
    # stage 2: the conv window: the cached K inputs, then the new tokens' raw x
    for i in tl.static_range(K):
        tl.store(win + i, tl.load(conv_ptr + (b * DI + d) * K + i))
    for t in range(L):
        tl.store(win + K + t, tl.load(p_ptr + b * s_pb + t * s_pl + ox).to(win_ptr.dtype.element_ty))
    tl.debug_barrier()  # every replayed input and window entry is in place before stage 3 reads and overwrites
    # stage 3: the new tokens, outputs only
    for t in range(L):
        row = p_ptr + b * s_pb + t * s_pl
        x = _conv_silu(win + t, cw_ptr, cb_ptr, d, K, out_ptr.dtype.element_ty)
        dt_raw = tl.load(row + odt)
        tl.store(xp_ptr + prev + t, x.to(xp_ptr.dtype.element_ty))
        tl.store(tp_ptr + prev + t, dt_raw.to(tp_ptr.dtype.element_ty))
        dt = _softplus(dt_raw.to(tl.float32) + bias)
        Bt = tl.load(row + oB, mask=mn, other=0.0).to(tl.float32)
        Ct = tl.load(row + oC, mask=mn, other=0.0).to(tl.float32)
        h = tl.exp2(dt[None, :] * A2) * h + (dt * x)[None, :] * Bt[:, None]
        z = tl.load(row + oz).to(tl.float32)
        y = (tl.sum(h * Ct[:, None], axis=0) + Dv * x) * z * tl.sigmoid(z)
        tl.store(out_ptr + (b * L + t) * DI + d, y.to(out_ptr.dtype.element_ty))


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, s_ptr, y_ptr, D, eps, BLOCK: tl.constexpr):
    """One row: s = x + r (stored in x's dtype), y = s / sqrt(mean(s^2) + eps) * weight."""
    row, i = tl.program_id(0).to(tl.int64), tl.arange(0, BLOCK)
    m = i < D
    s = (tl.load(x_ptr + row * D + i, mask=m, other=0.0).to(tl.float32) +
         tl.load(r_ptr + row * D + i, mask=m, other=0.0).to(tl.float32)).to(s_ptr.dtype.element_ty)
    tl.store(s_ptr + row * D + i, s, mask=m)
    s = s.to(tl.float32)
    y = s * tl.rsqrt(tl.sum(s * s, axis=0) / D + eps) * tl.load(w_ptr + i, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + i, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _argmax_kernel(x_ptr, out_ptr, V, s_row, BLOCK: tl.constexpr):
    """One row of x: the index of its largest element, the first on ties (as torch.argmax). Each lane
    keeps its own running best over the row's blocks (strictly greater: its first), then the lanes agree."""
    row, i = tl.program_id(0).to(tl.int64), tl.arange(0, BLOCK)
    best, where = tl.full([BLOCK], float("-inf"), tl.float32), tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, V, BLOCK):
        v = tl.load(x_ptr + row * s_row + start + i, mask=start + i < V, other=float("-inf")).to(tl.float32)
        better = v > best
        best, where = tl.where(better, v, best), tl.where(better, start + i, where)
    top = tl.max(best, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(best == top, where, V), axis=0).to(tl.int64))


# -----------------------------------------------------------------------------------------------
# Python wrappers: shapes checked, optional inputs as constexpr flags; the scan kernels take contiguous
# tensors, the decode kernels any strides (passed explicitly)


# Mamba-2's SSD forward (the chunked form of `ssd_chunked`, one kernel per stage): per chunk and head the
# chunk's own final state (a tile product), a scan of states over the chunks, then the outputs: the masked
# (t, s) matrix of the chunk times x, plus the entering state's part. Tiles: Q steps, P channels, N states.


@triton.jit
def _ssd_tile(L, H, REP, NC, sxb, sxl, sxh, sBb, sBl, sBg, Q: tl.constexpr, P: tl.constexpr, N: tl.constexpr):
    """A program's chunk c of head h in batch row b: its steps i (t in the sequence), which are live, the offsets of its
    (Q, P) tile of x (z, y, dy alike), of its (Q, N) tile of B (C alike), of its (P, N) states, of its S row."""
    bc, h = tl.program_id(0), tl.program_id(1)
    b, c, i = bc // NC, bc % NC, tl.arange(0, Q)
    t = c * Q + i
    xy = b * sxb + t[:, None] * sxl + h * sxh + tl.arange(0, P)[None, :]
    BC = b * sBb + t[:, None] * sBl + (h // REP) * sBg + tl.arange(0, N)[None, :]
    state = ((b * NC + c) * H + h) * P * N + tl.arange(0, P)[:, None] * N + tl.arange(0, N)[None, :]
    return b, h, i, t, (t < L)[:, None], xy, BC, state, ((b * H + h) * NC + c) * Q


@triton.jit
def _ssd_chunk_state_kernel(x_ptr, B_ptr, dt_ptr, S_ptr, own_ptr, L, H, REP, NC, sxb, sxl, sxh, sBb, sBl, sBg,
                            Q: tl.constexpr, P: tl.constexpr, N: tl.constexpr, F32: tl.constexpr, PRECISION: tl.constexpr):
    # one chunk of one head: own = sum_s exp(S_last - S_s) Delta_s x_s B_s^T   (P, N)
    b, h, i, t, live, xy, BC, state, row = _ssd_tile(L, H, REP, NC, sxb, sxl, sxh, sBb, sBl, sBg, Q, P, N)
    dtype = tl.float32 if F32 else x_ptr.dtype.element_ty
    x = tl.load(x_ptr + xy, mask=live, other=0.0).to(tl.float32)
    B = tl.load(B_ptr + BC, mask=live, other=0.0)
    S, dt, S_last = tl.load(S_ptr + row + i), tl.load(dt_ptr + row + i), tl.load(S_ptr + row + Q - 1)
    w = tl.exp(S_last - S) * dt  # (Q,)
    own = tl.dot(tl.trans(x * w[:, None]).to(dtype), B.to(dtype), input_precision=PRECISION)  # (P, N)
    tl.store(own_ptr + state, own)


@triton.jit
def _ssd_state_passing_kernel(own_ptr, S_ptr, h0_ptr, enter_ptr, last_ptr, H, NC,
                              Q: tl.constexpr, P: tl.constexpr, N: tl.constexpr, HAS_H0: tl.constexpr):
    # the states entering each chunk, a scan over chunks: h_in[c+1] = exp(S_last[c]) h_in[c] + own[c]
    b, h = tl.program_id(0), tl.program_id(1)
    tile = tl.arange(0, P)[:, None] * N + tl.arange(0, N)[None, :]
    state = tl.zeros((P, N), dtype=tl.float32)
    if HAS_H0:
        state = tl.load(h0_ptr + (b * H + h) * P * N + tile)
    for c in range(NC):
        at = ((b * NC + c) * H + h) * P * N
        tl.store(enter_ptr + at + tile, state)
        decay = tl.exp(tl.load(S_ptr + ((b * H + h) * NC + c) * Q + Q - 1))
        state = decay * state + tl.load(own_ptr + at + tile)
    tl.store(last_ptr + (b * H + h) * P * N + tile, state)


@triton.jit
def _ssd_chunk_output_kernel(x_ptr, B_ptr, C_ptr, dt_ptr, S_ptr, enter_ptr, D_ptr, z_ptr, y_ptr, L, H, REP, NC,
                             sxb, sxl, sxh, sBb, sBl, sBg, Q: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
                             HAS_D: tl.constexpr, HAS_Z: tl.constexpr, F32: tl.constexpr, PRECISION: tl.constexpr):
    # one chunk of one head: y_t = sum_{s<=t} (C_t . B_s) exp(S_t - S_s) Delta_s x_s + exp(S_t) C_t . h_in
    b, h, i, t, live, xy, BC, state, row = _ssd_tile(L, H, REP, NC, sxb, sxl, sxh, sBb, sBl, sBg, Q, P, N)
    dtype = tl.float32 if F32 else x_ptr.dtype.element_ty
    x = tl.load(x_ptr + xy, mask=live, other=0.0)
    B, C = tl.load(B_ptr + BC, mask=live, other=0.0).to(dtype), tl.load(C_ptr + BC, mask=live, other=0.0).to(dtype)
    S, dt = tl.load(S_ptr + row + i), tl.load(dt_ptr + row + i)
    decay = tl.where(i[:, None] >= i[None, :], tl.exp(S[:, None] - S[None, :]), 0.0)  # (Q, Q), causal
    M = tl.dot(C, tl.trans(B), input_precision=PRECISION) * decay * dt[None, :]  # the chunk's (t, s) matrix
    h_in = tl.load(enter_ptr + state)  # (P, N)
    y = tl.dot(M.to(dtype), x.to(dtype), input_precision=PRECISION) + \
        tl.exp(S)[:, None] * tl.dot(C, tl.trans(h_in).to(dtype), input_precision=PRECISION)  # (Q, P)
    if HAS_D:
        y += tl.load(D_ptr + h) * x.to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + xy, mask=live, other=0.0).to(tl.float32)
        y *= z / (1 + tl.exp(-z))
    tl.store(y_ptr + xy, y.to(y_ptr.dtype.element_ty), mask=live)


@triton.jit
def _ssd_bwd_entering_kernel(dy_ptr, C_ptr, S_ptr, dh_ptr, L, H, REP, NC, sxb, sxl, sxh, sBb, sBl, sBg,
                             Q: tl.constexpr, P: tl.constexpr, N: tl.constexpr, PRECISION: tl.constexpr):
    # what each chunk's outputs ask of the state entering it: sum_t exp(S_t) dy_t C_t^T   (P, N)
    b, h, i, t, live, xy, BC, state, row = _ssd_tile(L, H, REP, NC, sxb, sxl, sxh, sBb, sBl, sBg, Q, P, N)
    dy = tl.load(dy_ptr + xy, mask=live, other=0.0).to(tl.float32)
    C = tl.load(C_ptr + BC, mask=live, other=0.0).to(tl.float32)
    S = tl.load(S_ptr + row + i)
    tl.store(dh_ptr + state, tl.dot(tl.trans(dy * tl.exp(S)[:, None]), C, input_precision=PRECISION))


@triton.jit
def _ssd_bwd_passing_kernel(dh_ptr, enter_ptr, S_ptr, dlast_ptr, down_ptr, dSlast_ptr, dh0_ptr, H, NC,
                            Q: tl.constexpr, P: tl.constexpr, N: tl.constexpr, HAS_DLAST: tl.constexpr):
    # the state passing run backwards: g_c = dh_c + exp(S_last[c]) g_{c+1}; d own[c] = g_{c+1}
    b, h = tl.program_id(0), tl.program_id(1)
    tile = tl.arange(0, P)[:, None] * N + tl.arange(0, N)[None, :]
    g = tl.zeros((P, N), dtype=tl.float32)
    if HAS_DLAST:
        g = tl.load(dlast_ptr + (b * H + h) * P * N + tile)
    for k in range(NC):
        c = NC - 1 - k
        at = ((b * NC + c) * H + h) * P * N
        tl.store(down_ptr + at + tile, g)
        decay = tl.exp(tl.load(S_ptr + ((b * H + h) * NC + c) * Q + Q - 1))
        tl.store(dSlast_ptr + (b * H + h) * NC + c, decay * tl.sum(tl.sum(g * tl.load(enter_ptr + at + tile), 1), 0))
        g = tl.load(dh_ptr + at + tile) + decay * g
    tl.store(dh0_ptr + (b * H + h) * P * N + tile, g)


@triton.jit
def _ssd_bwd_chunk_kernel(x_ptr, B_ptr, C_ptr, dt_ptr, S_ptr, enter_ptr, down_ptr, dSlast_ptr, dy_ptr,
                          du_ptr, dB_ptr, dC_ptr, dS_ptr, L, H, REP, NC, sxb, sxl, sxh, sBb, sBl, sBg,
                          Q: tl.constexpr, P: tl.constexpr, N: tl.constexpr, PRECISION: tl.constexpr):
    # one chunk of one head, backward through its outputs and its own state: d(Delta x), dB, dC (per head),
    # dS; float32 tiles (their products TF32 for 16-bit inputs)
    b, h, i, t, live, xy, BC, state, row = _ssd_tile(L, H, REP, NC, sxb, sxl, sxh, sBb, sBl, sBg, Q, P, N)
    x = tl.load(x_ptr + xy, mask=live, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + xy, mask=live, other=0.0).to(tl.float32)
    B = tl.load(B_ptr + BC, mask=live, other=0.0).to(tl.float32)
    C = tl.load(C_ptr + BC, mask=live, other=0.0).to(tl.float32)
    S, dt, S_last = tl.load(S_ptr + row + i), tl.load(dt_ptr + row + i), tl.load(S_ptr + row + Q - 1)
    h_in, G = tl.load(enter_ptr + state), tl.load(down_ptr + state)  # (P, N) each: the entering state, d own
    u = x * dt[:, None]  # (Q, P)
    E = tl.where(i[:, None] >= i[None, :], tl.exp(S[:, None] - S[None, :]), 0.0)  # (Q, Q)
    CB = tl.dot(C, tl.trans(B), input_precision=PRECISION)
    dM = tl.dot(dy, tl.trans(u), input_precision=PRECISION) * E  # dy u^T, where the chunk's matrix lives
    du = tl.dot(tl.trans(CB * E), dy, input_precision=PRECISION)  # (Q, P)
    dCB = dM  # d(CB) = dM * E, already
    dC = tl.dot(dCB, B, input_precision=PRECISION)
    dB = tl.dot(tl.trans(dCB), C, input_precision=PRECISION)
    q = dM * CB  # d(S_t - S_s) of each (t, s)
    dS = tl.sum(q, 1) - tl.sum(q, 0)
    eS = tl.exp(S)
    V = tl.dot(dy, h_in, input_precision=PRECISION)  # (Q, N): the entering state's part
    dC += eS[:, None] * V
    dS += eS * tl.sum(C * V, 1)
    w = tl.exp(S_last - S)  # the chunk's own state
    T = tl.dot(B, tl.trans(G), input_precision=PRECISION)  # (Q, P)
    du += w[:, None] * T
    dB += w[:, None] * tl.dot(u, G, input_precision=PRECISION)
    dw = w * tl.sum(u * T, 1)
    dS -= dw
    dS += tl.where(i == Q - 1, tl.sum(dw, 0) + tl.load(dSlast_ptr + row // Q), 0.0)
    tl.store(du_ptr + xy, du, mask=live)  # (x is contiguous: du shares its offsets)
    per_head = ((b * L + t[:, None]) * H + h) * N + tl.arange(0, N)[None, :]  # dB, dC per head (b, l, h, n)
    tl.store(dB_ptr + per_head, dB, mask=live)
    tl.store(dC_ptr + per_head, dC, mask=live)
    tl.store(dS_ptr + row + i, dS)


def _blocks(di, groups, n, channels=None):
    """BLOCK_D: the largest power of two up to `channels` (CHANNELS) that divides the channels per group
    (so that a program has one group); BLOCK_N: n rounded up to a power of two."""
    assert di % groups == 0, f"dim {di} is not a multiple of groups {groups}"
    rep, block_d = di // groups, 1
    while rep % (2 * block_d) == 0 and 2 * block_d <= (channels or CHANNELS):
        block_d *= 2
    return block_d, triton.next_power_of_2(n)


def _decode_blocks(b, di, groups, n):  # BLOCK_D, BLOCK_N of the decode kernels
    channels = CHANNELS
    while channels > 1 and b * di // channels < PROGRAMS:
        channels //= 2
    return _blocks(di, groups, n, channels)


def _scan_blocks(di, groups, n, shape, rows=0, sms=0):
    """The scan kernels' BLOCK_D, BLOCK_N and warps from a (states per warp, warps) shape, or from a
    dict of them by d_state (the nearest): a program holds about that many states per warp. With rows
    of programs (batch rows) on sms multiprocessors, the channels halve, down to 8, while the launch
    would have fewer than PER_SM programs per SM (a walk over time is latency: idle SMs cost the most)."""
    if isinstance(shape, dict):
        shape = shape[min(shape, key=lambda k: abs(math.log2(k / n)))]
    states, warps = shape
    block_n = triton.next_power_of_2(n)
    block_d = _blocks(di, groups, n, channels=max(1, states * warps // block_n))[0]
    while block_d > 8 and rows * di // block_d < PER_SM * sms:
        block_d, warps = block_d // 2, max(1, warps // 2)
    return block_d, block_n, warps


def _sms(device):  # multiprocessors of a CUDA device; 0 elsewhere (the interpreter)
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def _alloc_like(t):  # same strides as t, so that a kernel can index both with t's strides
    return torch.empty_like(t).fill_(float("nan")) if POISON else torch.empty_like(t)


def _alloc(*shape, like, dtype=None):
    dtype = dtype or like.dtype
    if POISON:
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def _check(u, delta, A, B, C, z):
    b, di, L = u.shape
    assert delta.shape == u.shape and (z is None or z.shape == u.shape), "u, delta, z must all be (b, di, l)"
    assert A.shape[0] == di and B.shape[:2] == C.shape[:2] and B.shape[0] == b and B.shape[2:] == (A.shape[1], L), \
        f"expected A (di, n), B and C (b, g, n, l); got {tuple(A.shape)}, {tuple(B.shape)}, {tuple(C.shape)}"


def _tile():
    tile = min(TILE, CHUNK)
    assert CHUNK % tile == 0, f"CHUNK ({CHUNK}) must be a multiple of TILE ({TILE})"
    return tile


def _flat(*ts):  # the scan kernels index (b, di, l) and (b, g, n, l) tensors as contiguous
    return [t.contiguous() if t is not None else None for t in ts]


def _scan_fwd(u, delta, A, B, C, D, z, bias, h0, softplus, pieces=1, output=True, save_chunks=False, carry=None,
              conv=None, out=None):
    """Launch the forward kernel: b * pieces rows of programs, each walking L / pieces steps. Returns
    out (b, di, l) or None; with save_chunks, what the backward reads: the chunk-start states and, with
    z, the output before the gate (else Nones); the end states (b * pieces, di, n) and, without
    output, each piece's sum of Delta (b * pieces, di). carry: the first pass's end states and sums of
    Delta, from which the second pass starts each piece. conv: (weight (di, k + 1), bias, the cached k
    inputs (b, di, k)), with u the raw x of B's groups: the kernel runs the conv. Any strides, as long
    as u, delta and z share theirs and B and C theirs; out: where to write (default: like u)."""
    (b, di, L), (n, g) = delta.shape, (A.shape[1], C.shape[1])
    same = lambda a, c: a is None or all(i == j for i, j, m in zip(a.stride(), c.stride(), a.shape) if m > 1)
    assert same(u, delta) and same(z, delta) and same(B, C), "u, delta and z must share strides, B and C theirs"
    block_d, block_n, warps = _scan_blocks(di, g, n, FWD, b * pieces, _sms(u.device))
    n_chunks = triton.cdiv(L, CHUNK)
    out = (_alloc_like(u) if out is None else out) if output else None
    y = _alloc_like(u) if save_chunks and z is not None else None  # the output before the gate, for dz
    chunk_states = _alloc(b, di, n_chunks, n, like=u, dtype=torch.float32) if save_chunks else None
    last = _alloc(b * pieces, di, n, like=u, dtype=torch.float32)
    ends, dt_sums = carry or (A, None if output else _alloc(b * pieces, di, like=u, dtype=torch.float32))
    cw, cb, past = conv or (A, A, A)
    _scan_fwd_kernel[(b * pieces, di // block_d)](
        u, delta, A, B, C, D if D is not None else A, z if z is not None else u, bias if bias is not None else A,
        h0 if h0 is not None else A, out if output else u, y if y is not None else u, chunk_states if save_chunks else A, last,
        dt_sums if dt_sums is not None else A, ends, cw, cb, past, L, L // pieces, pieces, di, n, di // g,
        g // B.shape[1], n_chunks, *delta.stride(), *C.stride(), *(out if output else delta).stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, HAS_H0=h0 is not None,
        SOFTPLUS=softplus, OUTPUT=output, CARRY=carry is not None, SAVE_CHUNKS=save_chunks,
        CONV=past.shape[-1] if conv else -1, CHUNK=CHUNK, TILE=_tile(), BLOCK_D=block_d, BLOCK_N=block_n, num_warps=warps)
    return out, (chunk_states, y), last, dt_sums


def _floats(*ts):  # A, D, Delta's bias, the initial state: float32, contiguous
    return [t.float().contiguous() if t is not None else None for t in ts]


class SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
        u, delta, B, C, z = _flat(u, delta, B, C, z)
        A, D, bias, h0 = _floats(A, D, delta_bias, initial_state)
        out, (chunk_states, y), last, _ = _scan_fwd(u, delta, A, B, C, D, z, bias, h0, delta_softplus,
                                                    save_chunks=any(ctx.needs_input_grad))
        ctx.save_for_backward(u, delta, A, B, C, D, z, bias, chunk_states, y)
        ctx.flags = (delta_softplus, initial_state is not None, delta_bias is not None and delta_bias.dtype)
        ctx.mark_non_differentiable(last)
        return out, last

    @staticmethod
    def backward(ctx, dout, _dlast):
        u, delta, A, B, C, D, z, bias, chunk_states, y = ctx.saved_tensors
        softplus, has_h0, bias_dtype = ctx.flags
        (b, di, L), (n, g) = u.shape, (A.shape[1], B.shape[1])
        block_d, block_n, warps = _scan_blocks(di, g, n, BWD)
        programs = di // block_d
        n_chunks = chunk_states.shape[2]
        dout = dout.contiguous()
        du, ddelta, dz = _alloc_like(u), _alloc_like(delta), _alloc_like(z) if z is not None else u
        dB, dC = torch.zeros(b, g, L, n, device=u.device), torch.zeros(b, g, L, n, device=u.device)  # float32 sums
        dA, dh0 = _alloc(b, di, n, like=u, dtype=torch.float32), _alloc(b, di, n, like=u, dtype=torch.float32)
        dD, dbias = _alloc(b, di, like=u, dtype=torch.float32), _alloc(b, di, like=u, dtype=torch.float32)
        scratch = torch.empty(b * programs * (CHUNK + 1) * block_d * block_n, device=u.device)
        _scan_bwd_kernel[(b, programs)](
            u, delta, A, B, C, D if D is not None else A, z if z is not None else u, bias if bias is not None else A,
            y if y is not None else u, chunk_states, dout, scratch, du, ddelta, dA, dB, dC, dD, dz, dbias, dh0, L, di, n, di // g, n_chunks,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus,
            CHUNK=CHUNK, TILE=_tile(), BLOCK_D=block_d, BLOCK_N=block_n, num_warps=warps)
        dB, dC = (x.transpose(2, 3).to(B.dtype) for x in (dB, dC))  # (b, g, n, l), as B and C
        return (du, ddelta, dA.sum(0), dB, dC, dD.sum(0) if D is not None else None, dz if z is not None else None,
                dbias.sum(0).to(bias_dtype) if bias_dtype else None, dh0 if has_h0 else None, None)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None):
    """Triton forward and backward; the contract of `selective_scan_ref`."""
    _check(u, delta, A, B, C, z)
    pieces = _pieces(delta, B.shape[1], A.shape[1])
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z))
    if pieces > 1 and not needs_grad:
        u, delta, B, C, z = _flat(u, delta, B, C, z)
        A, D, bias, h0 = _floats(A, D, delta_bias, initial_state)
        out, last = _scan_in_pieces(u, delta, A, B, C, D, z, bias, h0, delta_softplus, pieces)
        return (out, last) if return_last_state else out
    out, last = SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)
    return (out, last) if return_last_state else out


def _pieces(delta, groups, n):
    """How many pieces to cut time into for a long prompt at small batch, where the b * di / BLOCK_D
    programs of one walk over time would leave most of the GPU idle; pieces of at least 128 steps, as
    shorter ones gain less than their second launch costs (PIECES overrides it)."""
    (b, di, L), shortest = delta.shape, 1 if PIECES else 128
    if PIECES:
        pieces = PIECES
    elif delta.is_cuda:  # measured (`python kernels.py prefill`): pieces pay only while one walk has fewer programs
        sms = _sms(delta.device)  # than SMs, most at about 8 per SM
        programs = b * di // _scan_blocks(di, groups, n, FWD, b, sms)[0]
        pieces = 2 ** round(math.log2(8 * sms / programs)) if programs < sms else 1
    else:
        return 1
    while pieces > 1 and (L % pieces or L // pieces < shortest):
        pieces //= 2
    return pieces


def _scan_in_pieces(u, delta, A, B, C, D, z, bias, h0, softplus, pieces, conv=None, out=None):
    """Prefill of a long prompt (no gradients), with time cut into P pieces run as extra rows of
    programs, two launches: (1) each piece from a zero state, for its end state and its sum of Delta
    (no outputs); (2) each piece again, for the outputs, from its true start, which its program first
    folds from the earlier pieces' end states (h = exp(A * a piece's sum of Delta) h + its end, from
    h0). About twice the work of one walk, P times shorter walks. Returns out and the last state."""
    b, di = delta.shape[:2]
    _, _, ends, dt_sums = _scan_fwd(u, delta, A, B, C, None, None, bias, None, softplus, pieces, output=False, conv=conv)
    y, _, last, _ = _scan_fwd(u, delta, A, B, C, D, z, bias, h0, softplus, pieces, carry=(ends, dt_sums), conv=conv,
                              out=out)
    return y, last.view(b, pieces, di, -1)[:, -1]


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """Triton decode step; the contract of `selective_state_update_ref` (state updated in place)."""
    (b, di), (n, g) = x.shape, (A.shape[1], B.shape[1])
    assert state.shape == (b, di, n) and state.dtype == torch.float32 and state.is_contiguous(), \
        "state must be a contiguous float32 (b, di, n) tensor"
    block_d, block_n = _decode_blocks(b, di, g, n)
    out = _alloc(b, di, like=x)
    zz = z if z is not None else x
    A = A.float().contiguous()
    _step_kernel[(b, di // block_d)](
        state, x, dt, A, B, C, D.float() if D is not None else A, zz, dt_bias.float() if dt_bias is not None else A,
        out, di, n, di // g, *x.stride(), *dt.stride(), *zz.stride(), *B.stride(), *C.stride(), out.stride(0),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=dt_softplus, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=WARPS)
    return out


def _layer_checks(state, conv, xBCzdt, heads, *constants):
    (b, di, n), p = state.shape, state.shape[1] // heads
    g = (xBCzdt.shape[-1] - heads * n - 2 * di) // (p + n)
    assert state.dtype == torch.float32 and state.is_contiguous(), "state must be a contiguous float32 (b, di, n) tensor"
    assert xBCzdt.shape[-1] == g * (p + n) + heads * n + 2 * di and heads % g == 0 and xBCzdt.stride(-1) == 1, \
        f"xBCzdt must be (.., g p + g n + h n + 2 di) with {heads} heads; got {tuple(xBCzdt.shape)}"
    assert conv.is_contiguous() and all(c.dtype == torch.float32 and c.is_contiguous() for c in constants), \
        "the conv window contiguous; conv weight and bias, A, D, Delta's bias float32 and contiguous"
    return b, di, n, p, g, _decode_blocks(b, di, heads, n)


def mamba_step(state, conv, xBCzdt, conv_weight, conv_bias, A, D, dt_bias, heads):
    """Triton fused decode step; the contract of `mamba_step_ref`."""
    b, di, n, p, g, (block_d, block_n) = _layer_checks(state, conv, xBCzdt, heads, conv_weight, conv_bias, A, D, dt_bias)
    out = _alloc(b, di, like=xBCzdt)
    _mamba_step_kernel[(b, di // block_d)](state, conv, xBCzdt, conv_weight, conv_bias, A, D, dt_bias, out, di, n, p,
                                           heads // g, xBCzdt.stride(0), K=conv.shape[-1], BLOCK_D=block_d,
                                           BLOCK_N=block_n, num_warps=WARPS)
    return out


def mamba_verify(state, conv, conv_window, x_prev, dt_prev, B_prev, replay, xBCzdt, conv_weight, conv_bias, A, D,
                 dt_bias, heads):
    """Triton fused MultiStep verification; the contract of `mamba_verify_ref`."""
    b, di, n, p, g, (block_d, block_n) = _layer_checks(state, conv, xBCzdt, heads, conv_weight, conv_bias, A, D, dt_bias)
    l, w = xBCzdt.shape[1], x_prev.shape[-1]
    assert all(t.is_contiguous() for t in (conv_window, x_prev, dt_prev, B_prev)) and replay.shape == (b,) and w >= l
    out = _alloc(b, l, di, like=xBCzdt)
    _mamba_verify_kernel[(b, di // block_d)](
        state, conv, conv_window, x_prev, dt_prev, B_prev, replay, xBCzdt, conv_weight, conv_bias, A, D, dt_bias, out,
        l, w, di, n, p, heads // g, xBCzdt.stride(0), xBCzdt.stride(1), K=conv.shape[-1], BLOCK_D=block_d,
        BLOCK_N=block_n, num_warps=WARPS)
    B_prev[..., :l] = rearrange(xBCzdt[..., g * p:g * (p + n)], "b l (g n) -> b g n l", n=n)  # after the kernel's replay
    return out


def mamba_prefill(state, conv, xBCzdt, conv_weight, conv_bias, A, D, dt_bias, heads):
    """Triton prefill of a Mamba layer after its input projection; the contract of `mamba_prefill_ref`.
    The scan reads x, B, C, z and Delta in place from xBCzdt (x and B per KV head, no repeated copies)
    and runs the conv itself: one launch, or two in pieces; y is written (b, l, di), as o_proj reads it."""
    b, di, n, p, g, _ = _layer_checks(state, conv, xBCzdt, heads, conv_weight, conv_bias, A, D, dt_bias)
    l, k = xBCzdt.shape[1], conv.shape[-1]
    x, B, C, z, dt = xBCzdt.split([g * p, g * n, heads * n, di, di], dim=-1)  # (b, l, ..) views
    x, z, dt = (t.transpose(1, 2) for t in (x, z, dt))  # (b, channels, l), strided: the scan's layout
    B, C = (t.unflatten(-1, (-1, n)).permute(0, 2, 3, 1) for t in (B, C))  # (b, groups, n, l)
    out = _alloc(b, l, di, like=xBCzdt)
    pieces, fused = _pieces(dt, heads, n), dict(conv=(conv_weight, conv_bias, conv), out=out.transpose(1, 2))
    if pieces > 1:
        last = _scan_in_pieces(x, dt, A, B, C, D, z, dt_bias, state, True, pieces, **fused)[1]
    else:
        last = _scan_fwd(x, dt, A, B, C, D, z, dt_bias, state, True, **fused)[2]
    if l >= k:  # the conv's cache: the last k raw inputs, repeated over each KV head's heads
        conv.unflatten(1, (g, heads // g, p)).copy_(x[..., l - k:].unflatten(1, (g, 1, p)))
    else:
        conv.copy_(torch.cat([conv, repeat(x, "b (g p) l -> b (g r p) l", r=heads // g, p=p)], dim=-1)[..., l:])
    state.copy_(last)
    return out


def add_rms_norm(x, r, weight, eps):
    """Triton residual add and RMSNorm in one kernel; the contract of `add_rms_norm_ref`."""
    assert x.shape == r.shape and x.is_contiguous() and r.is_contiguous() and weight.shape == x.shape[-1:]
    s, y = _alloc_like(x), _alloc_like(x)
    _add_rms_norm_kernel[(x.numel() // x.shape[-1],)](x, r, weight, s, y, x.shape[-1], eps,
                                                     BLOCK=triton.next_power_of_2(x.shape[-1]))
    return s, y


def argmax_rows(x):
    """Triton argmax over the last dim (..., v) -> (...,) int64, one program per row: a decode step's
    few rows of logits, where torch's reduction costs several times the read (`python kernels.py`)."""
    assert x.stride(-1) == 1 and x.dtype.is_floating_point, "rows of floats, contiguous within each"
    rows = x.reshape(-1, x.shape[-1])  # a view for the slices decoding takes (logits[:, -1])
    out = torch.empty(rows.shape[0], dtype=torch.long, device=x.device)
    block = min(ARGMAX_BLOCK, triton.next_power_of_2(x.shape[-1]))
    _argmax_kernel[(rows.shape[0],)](rows, out, x.shape[-1], rows.stride(0), BLOCK=block,
                                     num_warps=max(1, min(16, block // 1024)))
    return out.view(x.shape[:-1])


# -----------------------------------------------------------------------------------------------
# Dispatch: one switch, and one line saying which path runs

_said = set()


def say_once(msg):
    if msg not in _said:
        _said.add(msg)
        print(msg, file=sys.stderr)


_chosen = {}  # (BACKEND, device type) -> use_triton's answer, decided (and said) once: it runs per layer and step


def use_triton(device):
    key = (BACKEND, device.type)
    if key not in _chosen:  # a refusal raises here, every time
        _chosen[key] = _choose(device)
    return _chosen[key]


def _choose(device):
    if BACKEND not in ("auto", "triton", "ref", "mamba_ssm"):
        raise ValueError(f"scan backend must be auto, triton, ref or mamba_ssm; got {BACKEND!r}")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    can = HAVE_TRITON and (device.type == "cuda" or (device.type == "cpu" and interpreted))
    if BACKEND == "triton" and not can:
        raise RuntimeError("the triton backend needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 on the CPU)")
    if BACKEND == "mamba_ssm":
        official(device)
        say_once("using mamba_ssm's CUDA scan and its Triton decode step (after the conv and SiLU in PyTorch); "
                 "mil's Triton kernels where it has none: a scan from a cached state, the verification, add + RMSNorm")
        return True
    fast = can and BACKEND != "ref"
    why = ("" if fast else " (asked for)" if BACKEND == "ref" else " (no Triton)" if not HAVE_TRITON else
           f" (Triton runs on CUDA, or on the CPU under TRITON_INTERPRET=1; this is {device.type})")
    say_once(f"using Triton selective scan{' (interpreter)' if interpreted else ''}" if fast else
             f"falling back to the reference selective scan{why}")
    return fast


def official(device):
    """mamba_ssm's kernels, imported (nothing of them is copied here): its CUDA selective scan and its
    Triton decode step. With mamba_ssm installed, or built from ../shared/official-kernels (its README)."""
    try:
        import selective_scan_cuda
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update as official_step
    except ImportError as e:
        raise RuntimeError(f"the mamba_ssm backend needs mamba_ssm's selective_scan_cuda ({e})") from None
    if device.type != "cuda":
        raise RuntimeError(f"the mamba_ssm backend runs on CUDA; this is {device.type}")
    return selective_scan_cuda, official_step


def official_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """mamba_ssm's Triton step with the contract of `selective_state_update_ref`: it takes a group's
    channels as a head, so every tensor is viewed per head ((b, h, p, n) states, updated in place)."""
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    h = C.shape[1]
    heads = lambda t, dim: t.unflatten(dim, (h, -1)) if t is not None else None
    return selective_state_update(heads(state, 1), heads(x, 1), heads(dt, 1), heads(A, 0), B, C, heads(D, 0),
                                  heads(z, 1), heads(dt_bias, 0), dt_softplus).flatten(1)


class OfficialScanFn(torch.autograd.Function):
    """mamba_ssm's CUDA scan, called as its selective_scan_interface does (inputs contiguous in time)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        cuda = official(u.device)[0]
        u, delta, B, C, z = _flat(u, delta, B, C, z)
        A, D, delta_bias = _floats(A, D, delta_bias)
        out, x, *rest = cuda.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, x, out)
        ctx.delta_softplus = delta_softplus
        last = x[:, :, -1, 1::2].contiguous()  # the last state (b, di, n): x holds (a, h) pairs per chunk
        ctx.mark_non_differentiable(last)
        return rest[0] if z is not None else out, last

    @staticmethod
    def backward(ctx, dout, _dlast):
        u, delta, A, B, C, D, z, delta_bias, x, out = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = official(u.device)[0].bwd(
            u, delta, A, B, C, D, z, delta_bias, dout.contiguous(), x, out, None, ctx.delta_softplus, False)
        return (du, ddelta, dA, dB, dC, dD if D is not None else None, rest[0] if z is not None else None,
                ddelta_bias if delta_bias is not None else None, None)


def official_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    out, last = OfficialScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last) if return_last_state else out


def scan(u, delta, A, B, C, initial_state=None, **kw):
    if BACKEND == "mamba_ssm" and initial_state is None:
        return official_scan(u, delta, A, B, C, **kw)
    fn = selective_scan if use_triton(u.device) else selective_scan_ref
    return fn(u, delta, A, B, C, initial_state=initial_state, **kw)


def ssd_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, initial_state=None,
             return_last_state=False):
    """Mamba-2's scan with the contract of `ssd_scan_ref`. Where Triton runs: the Triton SSD
    (`ssd_chunk_scan`) for 16-bit inputs whose head and state sizes it takes, else Mamba-1's scan over the
    h p channels with Delta and A the same for every channel of a head (also under --scan=mamba_ssm);
    elsewhere `ssd_chunked` (the loop with --scan=ref). It says which once."""
    kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, initial_state=initial_state,
              return_last_state=return_last_state)
    if BACKEND != "mamba_ssm" and not use_triton(x.device):
        say_once("Mamba-2: " + ("the reference loop" if BACKEND == "ref" else "the chunked (SSD) scan in PyTorch"))
        return (ssd_scan_ref if BACKEND == "ref" else ssd_chunked)(x, dt, A, B, C, **kw)
    p, n = x.shape[-1], B.shape[-1]
    if BACKEND != "mamba_ssm" and x.dtype != torch.float32 and _ssd_sizes_ok(p, n, D):
        say_once("Mamba-2: the Triton SSD (chunked matmul form)")
        return ssd_chunk_scan(x, dt, A, B, C, **kw)
    say_once("Mamba-2 runs on the Mamba-1 scan: Delta and A broadcast over each head's channels")
    return ssd_by_channels(x, dt, A, B, C, **kw)


def ssd_by_channels(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, initial_state=None,
                    return_last_state=False):
    """Mamba-2's scan as Mamba-1's (`scan`) over the h p channels, Delta and A the same for a head's."""
    (b, l, h, p), n = x.shape, B.shape[-1]
    per_channel = lambda t: t.repeat_interleave(p, dim=-1) if t is not None else None  # (.., h) -> (.., h p)
    by_time = lambda t: rearrange(t, "b l ... -> b (...) l") if t is not None else None
    y, last = scan(by_time(x), by_time(per_channel(dt)), per_channel(A.float())[:, None].expand(h * p, n),
                   rearrange(B, "b l g n -> b g n l"), rearrange(C, "b l g n -> b g n l"),
                   D=D.flatten() if D is not None and D.dim() == 2 else per_channel(D), z=by_time(z),
                   delta_bias=per_channel(dt_bias), delta_softplus=dt_softplus, return_last_state=True,
                   initial_state=initial_state.flatten(1, 2) if initial_state is not None else None)
    y = rearrange(y, "b (h p) l -> b l h p", p=p)
    return (y, last.unflatten(1, (h, p))) if return_last_state else y


class SSDChunkScanFn(torch.autograd.Function):
    """The Triton SSD, forward and backward (mamba_ssm's chunked form, as `ssd_chunked` writes it)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus, chunk):
        (b, l, h, p), (g, n) = x.shape, B.shape[2:]
        Delta, Delta_c, S = _ssd_decays(dt, A, dt_bias, dt_softplus, chunk)
        nc = S.shape[2]
        x, B, C, z = _flat(x, B, C, z)
        own = torch.empty(b, nc, h, p, n, device=x.device, dtype=torch.float32)  # each chunk's state from zero
        enter, last = torch.empty_like(own), torch.empty(b, h, p, n, device=x.device, dtype=torch.float32)
        ctx.grid, ctx.sizes = (b * nc, h), (l, h, h // g, nc, *x.stride()[:3], *B.stride()[:3])
        _ssd_chunk_state_kernel[ctx.grid](x, B, Delta_c, S, own, *ctx.sizes, Q=chunk, P=p, N=n, **_ssd_dots(x))
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        _ssd_state_passing_kernel[(b, h)](own, S, h0 if h0 is not None else last, enter, last, h, nc, Q=chunk, P=p,
                                          N=n, HAS_H0=h0 is not None)
        y = _ssd_outputs(ctx, x, B, C, Delta_c, S, enter, D, z, chunk)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, Delta, Delta_c, S, enter)
        ctx.dt_softplus, ctx.chunk, ctx.has_h0 = dt_softplus, chunk, h0 is not None
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        x, dt, A, B, C, D, z, dt_bias, Delta, Delta_c, S, enter = ctx.saved_tensors
        (b, l, h, p), (g, n), nc = x.shape, B.shape[2:], ctx.sizes[3]
        dz = dD = None
        dy = dy.float()
        if z is not None:  # through the gate: y = y0 silu(z)
            y0, sig = _ssd_outputs(ctx, x, B, C, Delta_c, S, enter, D, None, ctx.chunk).float(), torch.sigmoid(z.float())
            dz = (dy * y0 * sig * (1 + z.float() * (1 - sig))).to(z.dtype)
            dy = dy * z.float() * sig
        if D is not None:  # y0 = scan + D x
            dD = (dy * x.float()).sum((0, 1, 3))
        dy = dy.contiguous()
        f32 = dict(device=x.device, dtype=torch.float32)
        shape, kw = (b, nc, h, p, n), dict(Q=ctx.chunk, P=p, N=n)
        dh, down, dSlast, dh0 = torch.empty(shape, **f32), torch.empty(shape, **f32), torch.empty(b, h, nc, **f32), \
            torch.empty(b, h, p, n, **f32)
        dots = dict(**kw, PRECISION=_ssd_dots(x)["PRECISION"])
        _ssd_bwd_entering_kernel[ctx.grid](dy, C, S, dh, *ctx.sizes, **dots)
        _ssd_bwd_passing_kernel[(b, h)](dh, enter, S, dlast.contiguous(), down, dSlast, dh0, h, nc, **kw, HAS_DLAST=True)
        du, dBh, dCh, dS = torch.empty(b, l, h, p, **f32), torch.empty(b, l, h, n, **f32), \
            torch.empty(b, l, h, n, **f32), torch.empty_like(S)
        _ssd_bwd_chunk_kernel[ctx.grid](x, B, C, Delta_c, S, enter, down, dSlast, dy, du, dBh, dCh, dS, *ctx.sizes, **dots)
        da = rearrange(torch.flip(torch.cumsum(torch.flip(dS, [-1]), -1), [-1]), "b h c q -> b (c q) h")[:, :l]
        dDelta = da * A.float() + (du * x.float()).sum(-1)  # S = cumsum(Delta A); u = Delta x
        dx = du * Delta[..., None] + (D.float()[:, None] * dy if D is not None else 0)
        ddt = dDelta * torch.sigmoid(dt.float() + (dt_bias.float() if dt_bias is not None else 0)) if ctx.dt_softplus \
            else dDelta
        group = lambda t: t.unflatten(2, (g, h // g)).sum(3).to(B.dtype)  # heads -> their group
        return (dx.to(x.dtype), ddt.to(dt.dtype), (da * Delta).sum((0, 1)), group(dBh), group(dCh), dD, dz,
                ddt.sum((0, 1)) if dt_bias is not None else None, dh0 if ctx.has_h0 else None, None, None)


def _ssd_dots(x):  # tensor-core tile products: forward in the inputs' dtype, backward TF32; exact float32 for
    # float32 inputs and under the interpreter, whose 16-bit tile products are wrong
    f32 = x.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    return dict(F32=f32, PRECISION="ieee" if f32 else "tf32")


def _ssd_outputs(ctx, x, B, C, Delta_c, S, enter, D, z, chunk):
    y = _alloc_like(x)
    _ssd_chunk_output_kernel[ctx.grid](x, B, C, Delta_c, S, enter, D.float().contiguous() if D is not None else S,
                                       z if z is not None else x, y, *ctx.sizes, Q=chunk, P=x.shape[3], N=B.shape[3],
                                       HAS_D=D is not None, HAS_Z=z is not None, **_ssd_dots(x))
    return y


def _ssd_sizes_ok(p, n, D, chunk=SSD_CHUNK):  # what the Triton SSD takes: powers of two from 16, D per head
    pow2 = lambda v: v >= 16 and v & (v - 1) == 0
    return pow2(p) and pow2(n) and pow2(chunk) and (D is None or D.dim() == 1)


def ssd_chunk_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, initial_state=None,
                   return_last_state=False, chunk=SSD_CHUNK):
    """The Triton SSD, forward and backward (mamba_ssm's `mamba_chunk_scan_combined` form), with the
    contract of `ssd_scan_ref`; head and state sizes powers of two from 16, D per head. Tile products in
    the inputs' dtype forward, TF32 backward (float32 exactly for float32 inputs: slow, their tiles spill)."""
    p, n = x.shape[-1], B.shape[-1]
    assert _ssd_sizes_ok(p, n, D, chunk), \
        f"ssd_chunk_scan takes head and state sizes and a chunk that are powers of two from 16, and D per head; " \
        f"got {p}, {n}, {chunk}, D {None if D is None else tuple(D.shape)}"
    y, last = SSDChunkScanFn.apply(x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus, chunk)
    return (y, last) if return_last_state else y


def ssd_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One Mamba-2 decode step in mamba_ssm's layout: state (b, h, p, n) float32, updated in place;
    x, z (b, h, p); dt (b, h); A, dt_bias, D (h,); B, C (b, g, n). Returns y (b, h, p). Mamba-1's step
    kernel over the h p channels (mamba_ssm's under --scan=mamba_ssm), Delta and A broadcast per head."""
    (b, h, p), n = x.shape, B.shape[-1]
    per_channel = lambda t: t.repeat_interleave(p, dim=-1) if t is not None else None  # (.., h) -> (.., h p)
    update = official_update if BACKEND == "mamba_ssm" else \
        selective_state_update if use_triton(x.device) else selective_state_update_ref
    y = update(state.view(b, h * p, n), x.flatten(1), per_channel(dt), per_channel(A)[:, None].expand(h * p, n), B, C,
               per_channel(D), z.flatten(1) if z is not None else None, per_channel(dt_bias), dt_softplus)
    return y.unflatten(1, (h, p))


def step(*args):
    if BACKEND == "mamba_ssm":
        return mamba_step_ref(*args, update=official_update)
    return (mamba_step if use_triton(args[0].device) else mamba_step_ref)(*args)


def prefill(*args):
    return (mamba_prefill if use_triton(args[0].device) else mamba_prefill_ref)(*args)


def verify(*args):
    return (mamba_verify if use_triton(args[0].device) else mamba_verify_ref)(*args)


def add_norm(x, r, norm):  # norm: an nn.RMSNorm
    return (add_rms_norm if use_triton(x.device) else add_rms_norm_ref)(x, r, norm.weight, norm.eps)


def argmax(x):  # x (..., v) -> (...,): greedy decoding's token, torch.argmax(x, -1) where Triton cannot run
    return argmax_rows(x) if use_triton(x.device) else x.argmax(-1)


# -----------------------------------------------------------------------------------------------
# `python kernels.py`: the benchmark


SHAPES = {  # (batch, channels, d_state, groups, L): long scans, and the shapes mil trains
    "S1": (8, 2048, 16, 1, 2048), "S2": (8, 2048, 64, 32, 2048), "S3": (8, 2048, 16, 1, 8192),
    "gpu preset 50%": (32, 384, 64, 6, 512), "SmolLM2-135M": (16, 576, 64, 9, 512), "SmolLM2-135M long": (8, 576, 64, 9, 2048)}


def scan_inputs(b, di, n, g, L, device):  # bf16 with z, D, delta_bias, as a trained layer runs the scan
    r = lambda *s: torch.randn(*s, device=device)
    return dict(u=r(b, di, L).bfloat16(), delta=(0.5 * r(b, di, L)).bfloat16(), A=-torch.rand(di, n, device=device) - 0.5,
                B=r(b, g, n, L).bfloat16(), C=r(b, g, n, L).bfloat16(), D=r(di), z=r(b, di, L).bfloat16(),
                delta_bias=0.5 * r(di))


def rel_err(a, b):  # max |a - b| / max |b|
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def benchmark():
    from triton.testing import do_bench, do_bench_cudagraph

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    bench = (lambda f: do_bench(f, warmup=10, rep=50, return_mode="median") / 1e3) if cuda else \
        (lambda f: min(__import__("timeit").repeat(f, number=1, repeat=3)))
    graph_bench = (lambda f: do_bench_cudagraph(f, rep=50) / 1e3) if cuda else bench

    def side_by_side(fns, rounds=5 if cuda else 1):  # {name: fn} -> {name: median seconds}, interleaved rounds
        times = {k: [] for k in fns}
        for _ in range(rounds):
            for k, f in fns.items():
                times[k].append(f())
        return {k: sorted(v)[len(v) // 2] for k, v in times.items()}

    if not cuda:
        print("no GPU: a small smoke run through the Triton interpreter; numbers on a CPU mean little")
    print(f"{torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}, triton {triton.__version__}")
    sections = [a for a in sys.argv[1:] if not a.startswith("--")] or ["scan", "decode", "argmax", "prefill", "ssd"]
    official_step, official_scan_ok = None, False
    try:  # the Triton decode step needs only mamba_ssm's sources; the scan, its built selective_scan_cuda
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update as official_step
        official(dev)
        official_scan_ok = True
    except (ImportError, RuntimeError) as e:
        print(f"mamba_ssm: {'only its decode step imports' if official_step else 'not installed here'} ({e})")
    if official_step:
        print("mamba_ssm's kernels are timed beside mil's, on the same inputs, in interleaved rounds")
    x = torch.empty(2 ** 30 if cuda else 2 ** 22, dtype=torch.uint8, device=dev)  # the memory ceiling
    print(f"copy bandwidth {2 * x.numel() / bench(lambda: x.clone()) / 1e9:.0f} GB/s")
    del x
    if cuda and "--sweep" in sys.argv:
        sweep(bench)
    shapes = SHAPES if cuda else {"smoke": (1, 16, 4, 2, 64)}
    ratio = lambda a, b: f"{a / b:.3f}x" if b else "-"
    us = lambda t: f"{t * 1e6:.1f}" if t else "not installed"
    # the scan: forward with and without gradients, backward, both; then each against the float32 reference
    print("\n| shape | b, channels, d_state, groups, L | pass | mil us | mamba_ssm us | mil / mamba_ssm |")
    print("| --- | --- | --- | --- | --- | --- |")
    errors = []
    for name, (b, di, n, g, L) in shapes.items() if "scan" in sections else ():
        impls = {"mil": selective_scan} | ({"mamba_ssm": official_scan} if official_scan_ok else {})
        ins = {k: v.requires_grad_() for k, v in scan_inputs(b, di, n, g, L, dev).items()}
        ys = {k: fn(**ins, delta_softplus=True) for k, fn in impls.items()}
        dy = torch.randn_like(ys["mil"])

        def no_grad(fn):
            with torch.no_grad():
                fn(**ins, delta_softplus=True)

        cells = {"forward, grad on": lambda fn, k: lambda: bench(lambda: fn(**ins, delta_softplus=True)),
                 "forward, no grad": lambda fn, k: lambda: bench(lambda: no_grad(fn)),
                 "backward": lambda fn, k: lambda: bench(lambda: ys[k].backward(dy, retain_graph=True)),
                 "forward+backward": lambda fn, k: lambda: bench(lambda: fn(**ins, delta_softplus=True).backward(dy))}
        for cell, timer in cells.items():
            t = side_by_side({k: timer(fn, k) for k, fn in impls.items()})
            print(f"| {name} | {b}, {di}, {n}, {g}, {L} | {cell} | {us(t['mil'])} | {us(t.get('mamba_ssm'))} | "
                  f"{ratio(t['mil'], t.get('mamba_ssm'))} |", flush=True)
        del ins, ys
        # exactness: outputs and gradients against the float32 reference, on the first 1024 steps
        ins = {k: v.requires_grad_() for k, v in scan_inputs(b, di, n, g, min(L, 1024), dev).items()}
        grads = {}
        for k, fn in {"ref": selective_scan_ref, **impls}.items():
            y = fn(**{a: v.float() if a != "A" and k == "ref" else v for a, v in ins.items()}, delta_softplus=True)
            grads[k] = [y] + list(torch.autograd.grad(y, list(ins.values()), dy[..., :y.shape[-1]].to(y.dtype)))
        errors.append(f"| {name} | " + " | ".join(
            f"{max(rel_err(a, r) for a, r in zip(grads[k][:1], grads['ref'][:1])):.1e} / "
            f"{max(rel_err(a, r) for a, r in zip(grads[k][1:], grads['ref'][1:])):.1e}" if k in grads else "-"
            for k in ("mil", "mamba_ssm")) + " |")
        del ins, grads
    print("\nMax relative error against the float32 reference (output / worst gradient), first 1024 steps:\n")
    print("| shape | mil | mamba_ssm |\n| --- | --- | --- |\n" + "\n".join(errors))
    # decoding: a Mamba layer's step after its input projection, fused (one kernel) against the same work
    # with mamba_ssm's step kernel (the conv, SiLU and casts in PyTorch); the bare state updates side by side
    print("\n| decode step | batch | d_state (heads) | mil us | with mamba_ssm us | mil / mamba_ssm |")
    print("| --- | --- | --- | --- | --- | --- |")
    di = 2048 if cuda else 16
    for n, heads in (((16, 128), (64, 32)) if cuda else ((4, 4),)) if "decode" in sections else ():
        for b in (1, 64) if cuda else (1, 4):
            r = lambda *s: torch.randn(*s, device=dev)
            kv = heads // 4 if heads >= 4 else 1
            state, conv, p = r(b, di, n), r(b, di, 3).bfloat16(), r(b, 2 * kv * (di // heads) + heads * n + 2 * di).bfloat16()
            consts = (r(di, 4) / 4, r(di), -torch.rand(di, n, device=dev) - 0.5, r(di), r(di))
            t = side_by_side({"mil": lambda: graph_bench(lambda: mamba_step(state, conv, p, *consts, heads))} |
                             ({"mamba_ssm": lambda: graph_bench(lambda: mamba_step_ref(state, conv, p, *consts, heads,
                                                                                       update=official_update))}
                              if official_step else {}))
            print(f"| layer (conv, SiLU, update, gate) | {b} | {n} ({heads}) | {us(t['mil'])} | "
                  f"{us(t.get('mamba_ssm'))} | {ratio(t['mil'], t.get('mamba_ssm'))} |")
            x, dt, z = r(b, di).bfloat16(), r(b, di).bfloat16(), r(b, di).bfloat16()
            Bt, Ct = r(b, heads, n).bfloat16(), r(b, heads, n).bfloat16()
            args = (state, x, dt, consts[2], Bt, Ct, consts[3], z, consts[4], True)
            t = side_by_side({"mil": lambda: graph_bench(lambda: selective_state_update(*args))} |
                             ({"mamba_ssm": lambda: graph_bench(lambda: official_update(*args))} if official_step else {}))
            print(f"| selective_state_update | {b} | {n} ({heads}) | {us(t['mil'])} | "
                  f"{us(t.get('mamba_ssm'))} | {ratio(t['mil'], t.get('mamba_ssm'))} |")
            # Algorithm 2: the fused verification of K+1 = 5 tokens against 5 steps that save every state
            W, k = 5, 3
            ps = r(b, W, p.shape[-1]).bfloat16()
            window, x_prev, dt_prev = r(b, di, k + W).bfloat16(), r(b, di, W).bfloat16(), r(b, di, W).bfloat16()
            B_prev, replay = r(b, kv, n, W).bfloat16(), torch.full((b,), 3, dtype=torch.int32, device=dev)
            states, convs = torch.empty(W, b, di, n, device=dev), torch.empty(W, b, di, k, device=dev, dtype=conv.dtype)

            def five_steps():
                for i in range(W):
                    states[i].copy_(states[i - 1] if i else state)
                    convs[i].copy_(convs[i - 1] if i else conv)
                    mamba_step(states[i], convs[i], ps[:, i], *consts, heads)

            t_fused = graph_bench(lambda: mamba_verify(state, conv, window, x_prev, dt_prev, B_prev, replay, ps, *consts, heads))
            t_naive = graph_bench(five_steps)
            print(f"| verify K+1=5 (vs 5 state-saving steps: {t_naive * 1e6:.1f} us) | {b} | {n} ({heads}) | "
                  f"{t_fused * 1e6:.1f} | - | {t_naive / t_fused:.1f}x faster than the steps |")
    # greedy decoding's argmax over a vocabulary (SmolLM2's, the toy's): a step's row, a verification's K+1
    global ARGMAX_BLOCK, PIECES
    blocks, default = (4096, 8192, 16384, 32768), ARGMAX_BLOCK
    print("\n| argmax, CUDA graph | rows, vocabulary | torch us | " + " | ".join(f"mil block {k} us" for k in blocks) +
          f" | mil / torch (block {default}) |\n|" + " --- |" * (4 + len(blocks)))
    for rows, v in ((1, 49152), (7, 49152), (64, 49152), (1, 4096), (7, 4096)) if cuda else ((2, 1000),):
        if "argmax" not in sections:
            break
        logits = torch.randn(rows, v, device=dev).bfloat16()
        t = {"torch": graph_bench(lambda: logits.argmax(-1))}
        for ARGMAX_BLOCK in blocks:
            t[ARGMAX_BLOCK] = graph_bench(lambda: argmax_rows(logits))
        ARGMAX_BLOCK = default
        print(f"| | {rows}, {v} | {us(t['torch'])} | " + " | ".join(us(t[k]) for k in blocks) +
              f" | {ratio(t[default], t['torch'])} |", flush=True)
    # a long prompt without gradients: time cut into P pieces run in parallel, against one walk (P = 1)
    print("\n| prefill, no grad | b, channels, d_state, L | " + " | ".join(f"P={p} us" for p in (1, 2, 4, 8, 16, 32)) +
          " | auto |\n|" + " --- |" * 9)
    prefills = ((1, 384, 64, 6, 2048), (1, 576, 64, 9, 2048), (1, 2048, 16, 1, 8192), (1, 384, 64, 6, 8192),
                (1, 576, 64, 9, 8192), (1, 384, 64, 6, 32768),
                (8, 2048, 16, 1, 2048), (8, 2048, 16, 1, 8192), (4, 576, 64, 9, 2048)) if cuda else ((1, 16, 4, 2, 64),)
    for b, di, n, g, L in prefills if "prefill" in sections else ():
        ins = scan_inputs(b, di, n, g, L, dev)
        cells = []
        for pieces in (1, 2, 4, 8, 16, 32, 0):
            PIECES = pieces
            with torch.no_grad():
                cells.append(bench(lambda: selective_scan(**ins, delta_softplus=True)))
        PIECES = 0
        print(f"| | {b}, {di}, {n}, {L} | " + " | ".join(f"{t * 1e6:.0f}" for t in cells[:-1]) +
              f" | {cells[-1] * 1e6:.0f} (P={_pieces(ins['u'], g, n)}) |", flush=True)
    # Mamba-2's scan four ways: the Mamba-1 Triton scan per channel, chunked PyTorch, mil's Triton SSD
    # (Mamba2Mixer's path on a GPU), mamba_ssm's SSD kernel (Triton: PYTHONPATH=../shared/official-kernels)
    impls = {"Mamba-1 scan": ssd_by_channels, "chunked": ssd_chunked, "Triton SSD": ssd_chunk_scan}
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        impls["mamba_ssm"] = lambda *a, **kw: mamba_chunk_scan_combined(*a, chunk_size=256, **kw)
    except ImportError as e:
        print(f"\nmamba_ssm's mamba_chunk_scan_combined: not timed ({e})")
    if not cuda:
        impls.pop("mamba_ssm", None)
    print("\n| Mamba-2 scan | b, heads x channels, d_state, groups, L | pass | " +
          " | ".join(f"{k} us" for k in impls) + " | max rel. error vs the loop (first 256 steps) |\n|" + " --- |" * (4 + len(impls)))
    ssd_shapes = {"SSD issue": (8, 32, 64, 64, 32, 2048), "SmolLM2-135M": (16, 9, 64, 64, 9, 512)} if cuda else \
        {"smoke": (1, 2, 16, 16, 2, 24)}
    for name, (b, h, p, n, g, L) in ssd_shapes.items() if "ssd" in sections else ():
        r = lambda *s: torch.randn(*s, device=dev)
        ins = dict(x=r(b, L, h, p).bfloat16(), dt=(0.5 * r(b, L, h)).bfloat16(), A=-0.5 - torch.rand(h, device=dev),
                   B=r(b, L, g, n).bfloat16(), C=r(b, L, g, n).bfloat16())
        kw = dict(D=r(h), dt_bias=0.5 * r(h), dt_softplus=True)
        for v in ins.values():
            v.requires_grad_()
        dy = torch.randn(b, L, h, p, device=dev, dtype=torch.bfloat16)
        first = {k: v[:, :256] if k != "A" else v for k, v in ins.items()}
        y_ref = ssd_scan_ref(**first, **kw)
        err = {k: f"{rel_err(fn(**first, **kw), y_ref):.1e}" for k, fn in impls.items()}
        for cell, run in (("forward", lambda fn: fn(**ins, **kw)), ("forward+backward", lambda fn: fn(**ins, **kw).backward(dy))):
            t = side_by_side({k: (lambda fn=fn: bench(lambda: run(fn))) for k, fn in impls.items()})
            print(f"| {name} | {b}, {h} x {p}, {n}, {g}, {L} | {cell} | " + " | ".join(us(t[k]) for k in impls) +
                  f" | {', '.join(f'{k} {e}' for k, e in err.items())} |", flush=True)


def sweep(bench):
    """The scan kernels' launch shapes, (states per warp, warps), timed on S1 (d_state 16) and on S2 and
    the two shapes mil trains (64): forward and backward each keep, per d_state, the shape whose times
    summed relative to each shape's best are least."""
    global FWD, BWD
    names, fwd, bwd = ("S1", "S2", "gpu preset 50%", "SmolLM2-135M"), {}, {}  # (states, warps) -> [us per shape]
    print("\n| states / warp | warps | " + " | ".join(f"{k} fwd us | {k} bwd us" for k in names) + " |\n|" + " --- |" * 10)
    for shape in ((64, 1), (128, 1), (256, 1), (512, 1), (256, 2), (512, 2), (512, 4)):
        FWD = BWD = shape
        fwd[shape], bwd[shape] = [], []
        for name in names:
            ins = {k: v.requires_grad_() for k, v in scan_inputs(*SHAPES[name], "cuda").items()}
            y = selective_scan(**ins, delta_softplus=True)
            dy = torch.randn_like(y)
            fwd[shape].append(bench(lambda: selective_scan(**ins, delta_softplus=True)))
            bwd[shape].append(bench(lambda: y.backward(dy, retain_graph=True)))
        print(f"| {shape[0]} | {shape[1]} | " + " | ".join(f"{f * 1e6:.0f} | {b * 1e6:.0f}" for f, b in
                                                          zip(fwd[shape], bwd[shape])) + " |", flush=True)
    best = lambda times, cols: min(times, key=lambda s: sum(times[s][i] / min(t[i] for t in times.values()) for i in cols))
    FWD, BWD = {16: best(fwd, [0]), 64: best(fwd, [1, 2, 3])}, {16: best(bwd, [0]), 64: best(bwd, [1, 2, 3])}
    print(f"the table below uses FWD = {FWD}, BWD = {BWD} (states per warp, warps)")


if __name__ == "__main__":
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no GPU: run the smoke version as `TRITON_INTERPRET=1 python kernels.py`")
    benchmark()
