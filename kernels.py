"""
The selective scan of Mamba-1, as a readable reference and as Triton kernels.

    h_t = exp(Delta_t * A) * h_{t-1} + Delta_t * B_t * u_t      (per channel d, per state n)
    y_t = sum_n C_t[n] * h_t[n] + D * u_t,  then  y_t *= silu(z_t)

Layouts are mamba_ssm's `selective_scan_fn` / `selective_state_update`, so either can be swapped in:
  u, delta, z (b, di, l); A (di, n); B, C (b, g, n, l), channel d uses group d // (di // g);
  D, delta_bias (di,); states (b, di, n) in float32.
Each fast function has a `_ref` twin with the same signature; `scan` and `step` pick one through
BACKEND (auto | triton | ref) and say once which path runs. `python kernels.py` benchmarks them.
"""
import math
import os
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from einops import rearrange

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # e.g. macOS: the reference is the only path, and `use_triton` says so
    triton, tl, HAVE_TRITON = SimpleNamespace(jit=lambda f: f), SimpleNamespace(constexpr=float), False

BACKEND = "auto"  # auto: Triton on CUDA tensors (or on CPU under TRITON_INTERPRET=1); ref: the loop
CHUNK = 32  # time steps per chunk: the forward saves the state at chunk starts for the backward
TILE = 8  # time steps the scan kernels load at once: 16 bytes of bf16 per channel
FWD, BWD = (512, 1), (128, 1)  # the scan kernels' launch shapes, (states per warp, warps), chosen by `python kernels.py --sweep`
CHANNELS = 16  # channels per program at most ...
WARPS = 1  # ... and warps per program, for the decode kernels
PROGRAMS = 256  # ... which take fewer channels per program until they have this many (a step is latency)
PIECES = 0  # long prompts at small batch: pieces of time run in parallel (0: as many as fill the GPU)
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


# -----------------------------------------------------------------------------------------------
# Triton kernels. One program owns BLOCK_D channels of one batch row (all in one group, so they share
# B_t and C_t) and keeps their states in registers while it walks time. The scan kernels read time in
# tiles of TILE steps: u, Delta, z as [BLOCK_D, TILE] tiles (16-byte loads), B and C as [BLOCK_N, TILE];
# column s of a tile is picked with a compile-time mask (`_col`), outputs gather into a tile (`_put`).
# The decode kernels hold the states as [BLOCK_N, BLOCK_D]. Why not `tl.associative_scan` along time:
# see the README (it does more work and moves a [channels, states, time] tile through registers).

LOG2E, LN2 = tl.constexpr(1.4426950408889634), tl.constexpr(0.6931471805599453)  # exp(x) = exp2(x * log2(e))


@triton.jit
def _softplus(x):  # log(1 + e^x), linear past 20 as in PyTorch
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


@triton.jit
def _col(x, k: tl.constexpr, idx):  # column k of a [rows, TILE] tile: a register pick where time sits in one
    # thread (the forward's 32-channel tiles), a few shuffles where it spans lanes (the backward's 8 channels)
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
def _scan_fwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, out_ptr, y_ptr, hc_ptr,
                     last_ptr, dtsum_ptr, L, T, P, DI, N, REP, n_chunks, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr, SOFTPLUS: tl.constexpr, OUTPUT: tl.constexpr,
                     SAVE_CHUNKS: tl.constexpr, CHUNK: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """One program walks T steps of BLOCK_D channels: piece row % P of batch row row // P (P = 1, T = L:
    the whole sequence). OUTPUT=False (the first pass of a prefill in pieces) computes only the end
    state and the sum of Delta; SAVE_CHUNKS keeps what the backward reads: the chunk-start states and,
    with z, the output before its gate (as mamba_ssm does; the backward's dz needs it)."""
    row, pd = tl.program_id(0).to(tl.int64), tl.program_id(1)
    b, start = row // P, (row % P) * T
    d = pd * BLOCK_D + tl.arange(0, BLOCK_D)  # this program's channels
    n = tl.arange(0, BLOCK_N)
    k = tl.arange(0, TILE)  # time within a tile
    mn = n < N
    g = (pd * BLOCK_D) // REP  # their group
    dn = d[:, None] * N + n[None, :]  # offsets into (di, n) tensors
    # stage 1: per-channel constants, A pre-scaled so that exp(dt * A) = exp2(dt * A2)
    A2 = tl.load(A_ptr + dn, mask=mn[None, :], other=0.0) * LOG2E
    Dv = tl.load(D_ptr + d) if HAS_D else tl.zeros([BLOCK_D], dtype=tl.float32)
    bias = tl.load(bias_ptr + d) if HAS_BIAS else tl.zeros([BLOCK_D], dtype=tl.float32)
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + row * DI * N + dn, mask=mn[None, :], other=0.0)
    dt_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    rows = (b * DI + d)[:, None] * L + start + k[None, :]  # [d, TILE] tiles of u, delta, z, out: 16-byte loads along time
    u_p, t_p, z_p, o_p, y_p = u_ptr + rows, dt_ptr + rows, z_ptr + rows, out_ptr + rows, y_ptr + rows
    bc = ((b * (DI // REP) + g) * N + n)[:, None] * L + start + k[None, :]  # [n, TILE] tiles of B and C
    B_p, C_p = B_ptr + bc, C_ptr + bc
    hc_p = hc_ptr + (row * DI * n_chunks + d[:, None] * n_chunks) * N + n[None, :]  # (b, di, chunks, n)
    # stage 2: walk time a tile at a time; the next tile's loads are issued before this one's math
    mt = k < T
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
        u_n = tl.load(u_p + (t0 + TILE), mask=mt_n[None, :], other=0.0)
        t_n = tl.load(t_p + (t0 + TILE), mask=mt_n[None, :], other=0.0)
        if HAS_Z and OUTPUT:
            z_n = tl.load(z_p + (t0 + TILE), mask=mt_n[None, :], other=0.0)
        B_n = tl.load(B_p + (t0 + TILE), mask=mn[:, None] & mt_n[None, :], other=0.0)
        if OUTPUT:
            C_n = tl.load(C_p + (t0 + TILE), mask=mn[:, None] & mt_n[None, :], other=0.0)
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
                    tl.store(y_p + t0, y.to(y_ptr.dtype.element_ty), mask=mt[None, :])
                y = y * z * tl.sigmoid(z)
            tl.store(o_p + t0, y.to(out_ptr.dtype.element_ty), mask=mt[None, :])
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
def _verify_kernel(state_ptr, xp_ptr, tp_ptr, Bp_ptr, replay_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr,
                   bias_ptr, out_ptr, L, DI, N, REP,
                   s_pb, s_pd, s_pw, s_Pb, s_Pg, s_Pn, s_Pw, s_xb, s_xd, s_xl, s_tb, s_td, s_tl, s_zb, s_zd, s_zl,
                   s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_ob, s_od, s_ol,
                   HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Algorithm 2's MultiStep: load the committed state, replay the accepted prefix of the last
    verified tokens (no outputs), store it as the new committed state, then step through the new
    tokens emitting outputs and writing no state, only their x and Delta over the replayed ones (a
    program's own channels: no other program reads them)."""
    b, d, n, mn, g, sp, h, A2 = _decode_tile(state_ptr, A_ptr, DI, N, REP, BLOCK_D, BLOCK_N)
    bias = tl.load(bias_ptr + d) if HAS_BIAS else 0.0
    Dv = tl.load(D_ptr + d) if HAS_D else 0.0
    # stage 1: replay the accepted tokens of the previous verification (this row's count of them)
    for i in range(tl.load(replay_ptr + b)):
        x = tl.load(xp_ptr + b * s_pb + d * s_pd + i * s_pw).to(tl.float32)
        dt = tl.load(tp_ptr + b * s_pb + d * s_pd + i * s_pw).to(tl.float32) + bias
        if SOFTPLUS:
            dt = _softplus(dt)
        Bt = tl.load(Bp_ptr + b * s_Pb + g * s_Pg + n * s_Pn + i * s_Pw, mask=mn, other=0.0).to(tl.float32)
        h = tl.exp2(dt[None, :] * A2) * h + (dt * x)[None, :] * Bt[:, None]
    tl.store(sp, h, mask=mn[:, None])
    tl.debug_barrier()  # every replayed input is read before stage 2 overwrites it
    # stage 2: the new tokens, outputs only
    for t in range(L):
        x = tl.load(x_ptr + b * s_xb + d * s_xd + t * s_xl)
        dt = tl.load(dt_ptr + b * s_tb + d * s_td + t * s_tl)
        tl.store(xp_ptr + b * s_pb + d * s_pd + t * s_pw, x.to(xp_ptr.dtype.element_ty))
        tl.store(tp_ptr + b * s_pb + d * s_pd + t * s_pw, dt.to(tp_ptr.dtype.element_ty))
        x, dt = x.to(tl.float32), dt.to(tl.float32) + bias
        if SOFTPLUS:
            dt = _softplus(dt)
        Bt = tl.load(B_ptr + b * s_Bb + g * s_Bg + n * s_Bn + t * s_Bl, mask=mn, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + b * s_Cb + g * s_Cg + n * s_Cn + t * s_Cl, mask=mn, other=0.0).to(tl.float32)
        h = tl.exp2(dt[None, :] * A2) * h + (dt * x)[None, :] * Bt[:, None]
        y = tl.sum(h * Ct[:, None], axis=0) + Dv * x
        if HAS_Z:
            z = tl.load(z_ptr + b * s_zb + d * s_zd + t * s_zl).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + b * s_ob + d * s_od + t * s_ol, y.to(out_ptr.dtype.element_ty))


# -----------------------------------------------------------------------------------------------
# Python wrappers: shapes checked, optional inputs as constexpr flags; the scan kernels take contiguous
# tensors, the decode kernels any strides (passed explicitly)


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


def _scan_blocks(di, groups, n, shape):
    """The scan kernels' BLOCK_D, BLOCK_N and warps from a (states per warp, warps) shape: a program
    holds about that many states per warp, so that d_state 16 gets more channels than d_state 64."""
    states, warps = shape
    block_n = triton.next_power_of_2(n)
    return _blocks(di, groups, n, channels=max(1, states * warps // block_n))[0], block_n, warps


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


def _scan_fwd(u, delta, A, B, C, D, z, bias, h0, softplus, pieces=1, output=True, save_chunks=False):
    """Launch the forward kernel: b * pieces rows of programs, each walking L / pieces steps. Returns
    out (b, di, l) or None; with save_chunks, what the backward reads: the chunk-start states and, with
    z, the output before the gate (else Nones); the end states (b * pieces, di, n) and, without
    output, each piece's sum of Delta (b * pieces, di)."""
    (b, di, L), (n, g) = u.shape, (A.shape[1], B.shape[1])
    block_d, block_n, warps = _scan_blocks(di, g, n, FWD)
    n_chunks = triton.cdiv(L, CHUNK)
    out = _alloc_like(u) if output else None
    y = _alloc_like(u) if save_chunks and z is not None else None  # the output before the gate, for dz
    chunk_states = _alloc(b, di, n_chunks, n, like=u, dtype=torch.float32) if save_chunks else None
    last = _alloc(b * pieces, di, n, like=u, dtype=torch.float32)
    dt_sums = None if output else _alloc(b * pieces, di, like=u, dtype=torch.float32)
    _scan_fwd_kernel[(b * pieces, di // block_d)](
        u, delta, A, B, C, D if D is not None else A, z if z is not None else u, bias if bias is not None else A,
        h0 if h0 is not None else A, out if output else u, y if y is not None else u, chunk_states if save_chunks else A, last,
        dt_sums if not output else A, L, L // pieces, pieces, di, n, di // g, n_chunks,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, HAS_H0=h0 is not None,
        SOFTPLUS=softplus, OUTPUT=output, SAVE_CHUNKS=save_chunks, CHUNK=CHUNK, TILE=_tile(), BLOCK_D=block_d,
        BLOCK_N=block_n, num_warps=warps)
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
    pieces = _pieces(u, B.shape[1], A.shape[1])
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z))
    if pieces > 1 and not needs_grad:
        out, last = _scan_in_pieces(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, pieces)
        return (out, last) if return_last_state else out
    out, last = SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)
    return (out, last) if return_last_state else out


def _pieces(u, groups, n):
    """How many pieces to cut time into for a long prompt at small batch, where the b * di / BLOCK_D
    programs of one walk over time would leave most of the GPU idle; pieces of at least 1024 steps, as
    shorter prompts gain less on the GPU than the stitching costs on the host (PIECES overrides it)."""
    (b, di, L), shortest = u.shape, 1 if PIECES else 1024
    if PIECES:
        pieces = PIECES
    elif u.is_cuda:
        sms = torch.cuda.get_device_properties(u.device).multi_processor_count
        pieces = 2 ** int(math.log2(max(1, 8 * sms * _scan_blocks(di, groups, n, FWD)[0] // (b * di))))
    else:
        return 1
    while pieces > 1 and (L % pieces or L // pieces < shortest):
        pieces //= 2
    return pieces


def _scan_in_pieces(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, pieces):
    """Prefill of a long prompt (no gradients), with time cut into P pieces run as extra rows of
    programs: (1) each piece from a zero state, for its end state and its sum of Delta (no outputs);
    (2) the true start states, h_start[p] = sum_{q<p} exp(A * Delta summed from q's end to p's start)
    end[q], one einsum; (3) each piece again from its true start, for the outputs. About 1.6x the
    work of one walk, P times shorter walks."""
    b, di, L = u.shape
    u, delta, B, C, z = _flat(u, delta, B, C, z)
    A, D, bias, h0 = _floats(A, D, delta_bias, initial_state)
    _, _, ends, dt_sums = _scan_fwd(u, delta, A, B, C, None, None, bias, None, delta_softplus, pieces, output=False)
    with torch.autocast(u.device.type, enabled=False):  # under autocast too, the stitching stays in float32
        dt_sums = rearrange(dt_sums, "(b p) d -> b d p", p=pieces)
        log_decay = A[None, :, :, None] * dt_sums[:, :, None, :]  # (b, di, n, p)
        S = A[None, :, :, None] * dt_sums.cumsum(-1)[:, :, None, :]  # log decay from the start to piece p's end
        S_before = S - log_decay  # ... to piece p's start
        p = torch.arange(pieces, device=u.device)
        gap = (S_before[..., :, None] - S[..., None, :]).masked_fill(p[None, :] >= p[:, None], -math.inf)  # (.., p, q<p)
        ends = rearrange(ends, "(b p) d n -> b d n p", p=pieces)
        starts = torch.einsum("bdnpq,bdnq->bdnp", gap.exp(), ends)  # all that the earlier pieces carry in
        if h0 is not None:
            starts = starts + S_before.exp() * h0[..., None]
        h = log_decay[..., -1].exp() * starts[..., -1] + ends[..., -1]
    y, _, _, _ = _scan_fwd(u, delta, A, B, C, D, z, bias, rearrange(starts, "b d n p -> (b p) d n").contiguous(),
                           delta_softplus, pieces)
    return y, h


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


def selective_state_verify(state, x_prev, dt_prev, B_prev, replay, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                           dt_softplus=False):
    """Triton MultiStep verification; the contract of `selective_state_verify_ref`."""
    (b, di, L), (n, g) = x.shape, (A.shape[1], B.shape[1])
    assert state.shape == (b, di, n) and state.dtype == torch.float32 and state.is_contiguous()
    assert dt_prev.stride() == x_prev.stride() and replay.shape == (b,) and x_prev.shape[-1] >= L
    block_d, block_n = _decode_blocks(b, di, g, n)
    out = _alloc(b, L, di, like=x).transpose(1, 2)  # (b, di, l) laid out as (b, l, di), as o_proj reads it
    zz = z if z is not None else x
    A = A.float().contiguous()
    _verify_kernel[(b, di // block_d)](
        state, x_prev, dt_prev, B_prev, replay, x, dt, A, B, C, D.float() if D is not None else A, zz,
        dt_bias.float() if dt_bias is not None else A, out, L, di, n, di // g, *x_prev.stride(), *B_prev.stride(),
        *x.stride(), *dt.stride(), *zz.stride(), *B.stride(), *C.stride(), *out.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        BLOCK_D=block_d, BLOCK_N=block_n, num_warps=WARPS)
    return out


# -----------------------------------------------------------------------------------------------
# Dispatch: one switch, and one line saying which path runs

_said = set()


def use_triton(device):
    if BACKEND not in ("auto", "triton", "ref"):
        raise ValueError(f"scan backend must be auto, triton or ref; got {BACKEND!r}")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    can = HAVE_TRITON and (device.type == "cuda" or (device.type == "cpu" and interpreted))
    if BACKEND == "triton" and not can:
        raise RuntimeError("--scan=triton needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 on the CPU)")
    fast = can and BACKEND != "ref"
    why = ("" if fast else " (asked for)" if BACKEND == "ref" else " (no Triton)" if not HAVE_TRITON else
           f" (Triton runs on CUDA, or on the CPU under TRITON_INTERPRET=1; this is {device.type})")
    msg = f"using Triton selective scan{' (interpreter)' if interpreted else ''}" if fast else \
        f"falling back to the reference selective scan{why}"
    if msg not in _said:
        _said.add(msg)
        print(msg, file=sys.stderr)
    return fast


def scan(u, delta, A, B, C, **kw):
    return (selective_scan if use_triton(u.device) else selective_scan_ref)(u, delta, A, B, C, **kw)


def step(state, x, dt, A, B, C, **kw):
    return (selective_state_update if use_triton(x.device) else selective_state_update_ref)(state, x, dt, A, B, C, **kw)


def verify(state, x_prev, dt_prev, B_prev, replay, x, dt, A, B, C, D=None, z=None, delta_bias=None,
           delta_softplus=False):
    fn = selective_state_verify if use_triton(x.device) else selective_state_verify_ref
    return fn(state, x_prev, dt_prev, B_prev, replay, x, dt, A, B, C, D=D, z=z, dt_bias=delta_bias,
              dt_softplus=delta_softplus)


# -----------------------------------------------------------------------------------------------
# `python kernels.py`: the benchmark


def selective_scan_parallel(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, chunk=32):
    """A plain PyTorch parallel formulation, for the benchmark: within a chunk of T steps,
    h_t = sum_{s<=t} exp(S_t - S_s) Delta_s B_s u_s + exp(S_t - S_start) h_start, S = cumsum(Delta A);
    it materializes (b, di, n, T, T) per chunk and carries h across chunks."""
    (b, di, L), g = u.shape, B.shape[1]
    u, delta = u.float(), delta.float() + (delta_bias.float()[:, None] if delta_bias is not None else 0)
    delta = F.softplus(delta) if delta_softplus else delta
    h, ys = u.new_zeros(b, di, A.shape[1], 1), []
    for t0 in range(0, L, chunk):
        sl = slice(t0, min(L, t0 + chunk))
        Bc, Cc = (X[..., sl].float().repeat_interleave(di // g, 1) for X in (B, C))  # (b, di, n, T)
        S = torch.cumsum(delta[:, :, None, sl] * A[None, :, :, None], dim=-1)  # (b, di, n, T)
        T = S.shape[-1]
        causal = torch.ones(T, T, dtype=torch.bool, device=u.device).tril()
        seg = (S[..., :, None] - S[..., None, :]).masked_fill(~causal, -math.inf)  # S_t - S_s, s <= t
        hs = seg.exp() @ ((delta * u)[:, :, None, sl] * Bc)[..., None] + S.exp()[..., None] * h[..., None, :]
        ys.append((hs[..., 0] * Cc).sum(2))
        h = hs[..., -1, :]
    y = torch.cat(ys, dim=-1) + (D.float()[:, None] * u if D is not None else 0)
    return (y * F.silu(z.float()) if z is not None else y).to(B.dtype)


def benchmark():
    from triton.testing import do_bench, do_bench_cudagraph

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    bench = (lambda f: do_bench(f, warmup=25, rep=200, return_mode="median") / 1e3) if cuda else \
        (lambda f: min(__import__("timeit").repeat(f, number=1, repeat=3)))
    if not cuda:
        print("no GPU: a small smoke run through the Triton interpreter; numbers on a CPU mean little")
    print(f"{torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}, triton {triton.__version__}")
    # the memory ceiling: a device-to-device copy, counting bytes read and written
    x = torch.empty(2 ** 30 if cuda else 2 ** 22, dtype=torch.uint8, device=dev)
    bw = 2 * x.numel() / bench(lambda: x.clone())
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    del x
    if cuda and "--sweep" in sys.argv:
        sweep(bench)
    shapes = {"S1": (8, 2048, 16, 1, 2048), "S2": (8, 2048, 64, 32, 2048), "S3": (8, 2048, 16, 1, 8192)} if cuda else \
        {"smoke": (1, 16, 4, 2, 64)}
    print("\n| shape | pass | Triton us | floor us | x floor | reference us | speedup | PyTorch parallel us | speedup |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, (b, di, n, g, L) in shapes.items():
        r = lambda *s: torch.randn(*s, device=dev)
        make = lambda L: dict(u=r(b, di, L).bfloat16(), delta=(0.5 * r(b, di, L)).bfloat16(), A=-torch.rand(di, n, device=dev) - 0.5,
                              B=r(b, g, n, L).bfloat16(), C=r(b, g, n, L).bfloat16(), D=r(di), z=r(b, di, L).bfloat16(),
                              delta_bias=r(di) * 0.5)
        io = 2 * (4 * b * di * L + 2 * b * g * n * L) + 4 * (di * n + 2 * di)  # u, delta, z, y; B, C; A, D, bias
        bytes_ = {"forward": io, "backward": 2 * io + 2 * b * di * L, "forward+backward": 3 * io + 2 * b * di * L}
        L_ref = min(L, 256)  # the loop over time is slow: run it shorter and scale
        times = {}
        for impl, length in (("triton", L), ("ref", L_ref), ("parallel", L_ref)):
            ins = make(length)
            fn = {"triton": selective_scan, "ref": selective_scan_ref, "parallel": selective_scan_parallel}[impl]
            leaves = {k: v.requires_grad_() for k, v in ins.items()}
            fwd = lambda: fn(**leaves, delta_softplus=True)
            y = fwd()
            dy = torch.randn_like(y)
            scale = L / length
            times[impl, "forward"] = bench(lambda: fwd()) * scale
            times[impl, "backward"] = bench(lambda: y.backward(dy, retain_graph=True)) * scale
            times[impl, "forward+backward"] = bench(lambda: fwd().backward(dy)) * scale
            del y, leaves, ins
        for p in ("forward", "backward", "forward+backward"):
            t, floor = times["triton", p], bytes_[p] / bw
            print(f"| {name} | {p} | {t * 1e6:.0f} | {floor * 1e6:.0f} | {t / floor:.1f}x | {times['ref', p] * 1e6:.0f} | "
                  f"{times['ref', p] / t:.0f}x | {times['parallel', p] * 1e6:.0f} | {times['parallel', p] / t:.1f}x |")
    # decoding: one step, and Algorithm 2's fused verification against K+1 = 5 steps that save every state
    print("\n| decode | batch | d_state | Triton us | reference us | speedup |")
    print("| --- | --- | --- | --- | --- | --- |")
    graph_bench = (lambda f: do_bench_cudagraph(f, rep=100) / 1e3) if cuda else bench
    di = 2048 if cuda else 16
    for n, g in ((16, 1), (64, 32)) if cuda else ((4, 2),):
        for b in (1, 64) if cuda else (1, 4):
            r = lambda *s: torch.randn(*s, device=dev)
            A, D, bias = -torch.rand(di, n, device=dev) - 0.5, r(di), r(di)
            state = r(b, di, n)
            x, dt, z = r(b, di).bfloat16(), r(b, di).bfloat16(), r(b, di).bfloat16()
            Bt, Ct = r(b, g, n).bfloat16(), r(b, g, n).bfloat16()
            args = lambda f: (lambda: f(state, x, dt, A, Bt, Ct, D, z, bias, True))
            t, t_ref = graph_bench(args(selective_state_update)), graph_bench(args(selective_state_update_ref))
            print(f"| step | {b} | {n} | {t * 1e6:.1f} | {t_ref * 1e6:.1f} | {t_ref / t:.1f}x |")
            W = 5
            xs, dts, zs = r(b, di, W).bfloat16(), r(b, di, W).bfloat16(), r(b, di, W).bfloat16()
            Bs, Cs = r(b, g, n, W).bfloat16(), r(b, g, n, W).bfloat16()
            replay = torch.full((b,), 3, dtype=torch.int32, device=dev)
            states = torch.empty(W, b, di, n, device=dev)

            def five_steps():  # the naive way: a step per token, each state saved for rollback
                prev = state
                for i in range(W):
                    states[i].copy_(prev)
                    selective_state_update(states[i], xs[..., i], dts[..., i], A, Bs[..., i], Cs[..., i], D, zs[..., i], bias, True)
                    prev = states[i]

            x_prev, dt_prev = xs.clone(), dts.clone()  # the fused kernel stores the new x, Delta here
            t_fused = graph_bench(lambda: selective_state_verify(state, x_prev, dt_prev, Bs, replay, xs, dts, A, Bs, Cs, D,
                                                                 zs, bias, True))
            t_naive = graph_bench(five_steps)
            print(f"| verify K+1=5 (fused vs 5 saving steps: {t_naive * 1e6:.1f} us) | {b} | {n} | {t_fused * 1e6:.1f} | "
                  f"- | {t_naive / t_fused:.1f}x |")
    if cuda:
        training_speed()


def sweep(bench):
    """The scan kernels' launch shapes, (states per warp, warps), timed on S1 and S2; the forward and
    the backward each keep their best."""
    global FWD, BWD
    fwd, bwd = {}, {}
    print("\n| states / warp | warps | S1 fwd us | S2 fwd us | S1 bwd us | S2 bwd us |\n| --- | --- | --- | --- | --- | --- |")
    for shape in ((128, 1), (256, 1), (512, 1), (256, 2), (512, 2), (512, 4)):
        FWD = BWD = shape
        cells = []
        for b, di, n, g, L in ((8, 2048, 16, 1, 2048), (8, 2048, 64, 32, 2048)):
            r = lambda *s: torch.randn(*s, device="cuda")
            ins = dict(u=r(b, di, L).bfloat16(), delta=(0.5 * r(b, di, L)).bfloat16(), A=-torch.rand(di, n, device="cuda") - 0.5,
                       B=r(b, g, n, L).bfloat16(), C=r(b, g, n, L).bfloat16(), D=r(di), z=r(b, di, L).bfloat16(), delta_bias=r(di))
            leaves = {k: v.requires_grad_() for k, v in ins.items()}
            y = selective_scan(**leaves, delta_softplus=True)
            dy = torch.randn_like(y)
            cells += [bench(lambda: selective_scan(**leaves, delta_softplus=True)), bench(lambda: y.backward(dy, retain_graph=True))]
        fwd[shape], bwd[shape] = cells[0] + cells[2], cells[1] + cells[3]
        print(f"| {shape[0]} | {shape[1]} | " + " | ".join(f"{cells[i] * 1e6:.0f}" for i in (0, 2, 1, 3)) + " |", flush=True)
    FWD, BWD = min(fwd, key=fwd.get), min(bwd, key=bwd.get)
    print(f"the table below uses FWD = {FWD}, BWD = {BWD} (states per warp, warps)")


def training_speed():
    """A distillation-shaped training step of the gpu preset's 50% hybrid (random weights) at L = 512,
    batch 16 and the preset's 32, through the Triton scan and through the reference loop."""
    import kernels  # the module mil uses: under `python kernels.py` this file is __main__
    import mil

    cfg = mil.Config(n_layer=8, d_model=384, n_head=6, n_kv_head=2, block_size=512, attn_layers=(1, 3, 5, 7))
    model = mil.Model(cfg).cuda()
    kernels.FWD, kernels.BWD = FWD, BWD  # what the sweep chose, if it ran
    for batch in (16, 32):
        idx = torch.randint(0, cfg.vocab_size, (batch, 512), device="cuda")
        times = {}
        for backend in ("triton", "ref"):
            kernels.BACKEND = backend

            def train_step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(idx, idx)[1]
                loss.backward()

            train_step()
            torch.cuda.synchronize()
            times[backend] = min(__import__("timeit").repeat(lambda: (train_step(), torch.cuda.synchronize()), number=1, repeat=3))
        print(f"training step, gpu preset 50% hybrid, batch {batch} x 512: Triton {batch * 512 / times['triton']:,.0f} tokens/s, "
              f"reference {batch * 512 / times['ref']:,.0f} tokens/s: {times['ref'] / times['triton']:.1f}x", flush=True)
    kernels.BACKEND = "auto"


if __name__ == "__main__":
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no GPU: run the smoke version as `TRITON_INTERPRET=1 python kernels.py`")
    benchmark()
