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

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # e.g. macOS: the reference is the only path, and `use_triton` says so
    triton, tl, HAVE_TRITON = SimpleNamespace(jit=lambda f: f), SimpleNamespace(constexpr=int), False

BACKEND = "auto"  # auto: Triton on CUDA tensors (or on CPU under TRITON_INTERPRET=1); ref: the loop
CHUNK = 64  # time steps per chunk: the forward saves the state at chunk starts for the backward
POISON = False  # tests set it: outputs start as NaN, so an element a kernel forgets to write fails

# -----------------------------------------------------------------------------------------------
# The readable references: float32 loops over time that read like the equations


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None):
    """mamba_ssm's selective_scan_ref: float32, a plain loop over time. Like it, it materializes the
    per-step decays and inputs, and the states, as (l, b, di, n) tensors: simple, not frugal."""
    dtype, (b, di, L), g = u.dtype, u.shape, B.shape[1]
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


# -----------------------------------------------------------------------------------------------
# Triton kernels. One program owns BLOCK_D channels of one batch row (all in one group, so they share
# B_t and C_t) and keeps their states, a [BLOCK_D, BLOCK_N] float32 tile, in registers while it walks
# time step by step. Why not `tl.associative_scan` along time: see the README (it does more work and
# moves a [channels, states, time] tile through registers; the sequential walk does the minimum).

LOG2E = 1.4426950408889634


@triton.jit
def _softplus(x):  # log(1 + e^x), linear past 20 as in PyTorch
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


@triton.jit
def _scan_fwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, out_ptr, hc_ptr, last_ptr,
                     L, DI, N, REP, n_chunks,
                     s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_zb, s_zd, s_zl, s_Bb, s_Bg, s_Bn, s_Bl,
                     s_Cb, s_Cg, s_Cn, s_Cl, s_ob, s_od, s_ol,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
                     SOFTPLUS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    b, pd = tl.program_id(0).to(tl.int64), tl.program_id(1)
    d = pd * BLOCK_D + tl.arange(0, BLOCK_D)  # this program's channels
    n = tl.arange(0, BLOCK_N)
    mn = n < N
    g = (pd * BLOCK_D) // REP  # their group
    dn = d[:, None] * N + n[None, :]  # offsets into (di, n) tensors
    # stage 1: per-channel constants, A pre-scaled so that exp(dt * A) = exp2(dt * A2)
    A2 = tl.load(A_ptr + dn, mask=mn[None, :], other=0.0) * LOG2E
    Dv = tl.load(D_ptr + d) if HAS_D else 0.0
    bias = tl.load(bias_ptr + d) if HAS_BIAS else 0.0
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + b * DI * N + dn, mask=mn[None, :], other=0.0)
    u_p, t_p, z_p = u_ptr + b * s_ub + d * s_ud, dt_ptr + b * s_tb + d * s_td, z_ptr + b * s_zb + d * s_zd
    B_p, C_p = B_ptr + b * s_Bb + g * s_Bg + n * s_Bn, C_ptr + b * s_Cb + g * s_Cg + n * s_Cn
    o_p = out_ptr + b * s_ob + d * s_od
    hc_p = hc_ptr + (b * DI * n_chunks + d[:, None] * n_chunks) * N + n[None, :]  # (b, di, chunks, n)
    # stage 2: load step 0; each step then prefetches the next one before it computes
    u = tl.load(u_p).to(tl.float32)
    dt = tl.load(t_p).to(tl.float32)
    Bt = tl.load(B_p, mask=mn, other=0.0).to(tl.float32)
    Ct = tl.load(C_p, mask=mn, other=0.0).to(tl.float32)
    z = tl.load(z_p).to(tl.float32) if HAS_Z else 0.0
    for t in range(L):
        if t % CHUNK == 0:  # the backward restarts each chunk from here
            tl.store(hc_p + (t // CHUNK) * N, h, mask=mn[None, :])
        nxt_d, nxt_n = (d * 0 + t + 1) < L, mn & ((n * 0 + t + 1) < L)
        u_n = tl.load(u_p + (t + 1) * s_ul, mask=nxt_d, other=0.0)
        dt_n = tl.load(t_p + (t + 1) * s_tl, mask=nxt_d, other=0.0)
        B_n = tl.load(B_p + (t + 1) * s_Bl, mask=nxt_n, other=0.0)
        C_n = tl.load(C_p + (t + 1) * s_Cl, mask=nxt_n, other=0.0)
        z_n = tl.load(z_p + (t + 1) * s_zl, mask=nxt_d, other=0.0) if HAS_Z else 0.0
        # stage 3: Delta, the state update, and y = C . h + D u, gated by silu(z)
        dt = dt + bias
        if SOFTPLUS:
            dt = _softplus(dt)
        h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * Bt[None, :]
        y = tl.sum(h * Ct[None, :], axis=1) + Dv * u
        if HAS_Z:
            y = y * z * tl.sigmoid(z)
        tl.store(o_p + t * s_ol, y.to(out_ptr.dtype.element_ty))
        u, dt, Bt, Ct = u_n.to(tl.float32), dt_n.to(tl.float32), B_n.to(tl.float32), C_n.to(tl.float32)
        if HAS_Z:
            z = z_n.to(tl.float32)
    tl.store(last_ptr + b * DI * N + dn, h, mask=mn[None, :])


@triton.jit
def _scan_bwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, hc_ptr, dout_ptr, scratch_ptr,
                     du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, dh0_ptr,
                     L, DI, N, REP, n_chunks,
                     s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_zb, s_zd, s_zl, s_Bb, s_Bg, s_Bn, s_Bl,
                     s_Cb, s_Cg, s_Cn, s_Cl, s_ob, s_od, s_ol,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Walks the chunks from last to first. Per chunk: recompute its states from the saved chunk-start
    state into a small per-program scratch (CHUNK + 1 tiles, reused by every chunk), then walk back
    through it carrying dh. dA, dD, dbias are summed in registers; dB and dC are summed over the
    program's channels, then added atomically (other programs share the group)."""
    b, pd = tl.program_id(0).to(tl.int64), tl.program_id(1)
    d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    mn = n < N
    g = (pd * BLOCK_D) // REP
    dn = d[:, None] * N + n[None, :]
    tile = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + n[None, :]
    scratch = scratch_ptr + (b * tl.num_programs(1) + pd) * (CHUNK + 1) * BLOCK_D * BLOCK_N + tile
    A = tl.load(A_ptr + dn, mask=mn[None, :], other=0.0)
    A2 = A * LOG2E
    Dv = tl.load(D_ptr + d) if HAS_D else 0.0
    bias = tl.load(bias_ptr + d) if HAS_BIAS else 0.0
    u_p, t_p, z_p = u_ptr + b * s_ub + d * s_ud, dt_ptr + b * s_tb + d * s_td, z_ptr + b * s_zb + d * s_zd
    du_p, ddt_p, dz_p = du_ptr + b * s_ub + d * s_ud, ddt_ptr + b * s_tb + d * s_td, dz_ptr + b * s_zb + d * s_zd
    o_p = dout_ptr + b * s_ob + d * s_od
    B_p, C_p = B_ptr + b * s_Bb + g * s_Bg + n * s_Bn, C_ptr + b * s_Cb + g * s_Cg + n * s_Cn
    dBC = (b * (DI // REP) + g) * N * L + n * L  # dB, dC are float32 (b, g, n, l) contiguous
    dh = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dA = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dD = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        t0 = c * CHUNK
        steps = tl.minimum(CHUNK, L - t0)
        # stage 1: recompute this chunk's states h_{t0-1} .. h_{t0+steps-1} into the scratch
        h = tl.load(hc_ptr + (b * DI * n_chunks + d[:, None] * n_chunks + c) * N + n[None, :], mask=mn[None, :], other=0.0)
        tl.store(scratch, h)
        for s in range(steps):
            t = t0 + s
            dt = tl.load(t_p + t * s_tl).to(tl.float32) + bias
            if SOFTPLUS:
                dt = _softplus(dt)
            u = tl.load(u_p + t * s_ul).to(tl.float32)
            Bt = tl.load(B_p + t * s_Bl, mask=mn, other=0.0).to(tl.float32)
            h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * Bt[None, :]
            tl.store(scratch + (s + 1) * BLOCK_D * BLOCK_N, h)
        tl.debug_barrier()
        # stage 2: walk back through the chunk; h is h_t, h_prev is h_{t-1}
        for j in range(steps):
            s = steps - 1 - j
            t = t0 + s
            h_prev = tl.load(scratch + s * BLOCK_D * BLOCK_N)
            dt_raw = tl.load(t_p + t * s_tl).to(tl.float32) + bias
            dt = _softplus(dt_raw) if SOFTPLUS else dt_raw
            u = tl.load(u_p + t * s_ul).to(tl.float32)
            Bt = tl.load(B_p + t * s_Bl, mask=mn, other=0.0).to(tl.float32)
            Ct = tl.load(C_p + t * s_Cl, mask=mn, other=0.0).to(tl.float32)
            dy = tl.load(o_p + t * s_ol).to(tl.float32)
            if HAS_Z:  # out = y * silu(z): split dout into dy and dz
                z = tl.load(z_p + t * s_zl).to(tl.float32)
                y = tl.sum(h * Ct[None, :], axis=1) + Dv * u
                sz = tl.sigmoid(z)
                tl.store(dz_p + t * s_zl, (dy * y * sz * (1.0 + z * (1.0 - sz))).to(dz_ptr.dtype.element_ty))
                dy = dy * z * sz
            a = tl.exp2(dt[:, None] * A2)
            dh += dy[:, None] * Ct[None, :]  # dL/dh_t
            tl.atomic_add(dC_ptr + dBC + t, tl.sum(dy[:, None] * h, axis=0), mask=mn)
            tl.atomic_add(dB_ptr + dBC + t, tl.sum(dh * (dt * u)[:, None], axis=0), mask=mn)
            dhB = tl.sum(dh * Bt[None, :], axis=1)
            da = dh * h_prev * a  # dL/d(dt * A)
            ddt = dhB * u + tl.sum(da * A, axis=1)
            tl.store(du_p + t * s_ul, (dhB * dt + dy * Dv).to(du_ptr.dtype.element_ty))
            dA += da * dt[:, None]
            dD += dy * u
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(dt_raw)
            dbias += ddt
            tl.store(ddt_p + t * s_tl, ddt.to(ddt_ptr.dtype.element_ty))
            dh = dh * a  # dL/dh_{t-1}, through the decay
            h = h_prev
        tl.debug_barrier()  # the next chunk overwrites the scratch
    tl.store(dA_ptr + b * DI * N + dn, dA, mask=mn[None, :])  # per-batch partials, summed by the caller
    tl.store(dD_ptr + b * DI + d, dD)
    tl.store(dbias_ptr + b * DI + d, dbias)
    tl.store(dh0_ptr + b * DI * N + dn, dh, mask=mn[None, :])


@triton.jit
def _step_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
                 DI, N, REP, s_xb, s_xd, s_tb, s_td, s_zb, s_zd, s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn, s_ob,
                 HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """One decode step, the state read once and written once."""
    b, pd = tl.program_id(0).to(tl.int64), tl.program_id(1)
    d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    mn = n < N
    g = (pd * BLOCK_D) // REP
    sp = state_ptr + b * DI * N + d[:, None] * N + n[None, :]
    h = tl.load(sp, mask=mn[None, :], other=0.0)
    A2 = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mn[None, :], other=0.0) * LOG2E
    x = tl.load(x_ptr + b * s_xb + d * s_xd).to(tl.float32)
    dt = tl.load(dt_ptr + b * s_tb + d * s_td).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + d)
    if SOFTPLUS:
        dt = _softplus(dt)
    Bt = tl.load(B_ptr + b * s_Bb + g * s_Bg + n * s_Bn, mask=mn, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + b * s_Cb + g * s_Cg + n * s_Cn, mask=mn, other=0.0).to(tl.float32)
    h = tl.exp2(dt[:, None] * A2) * h + (dt * x)[:, None] * Bt[None, :]
    tl.store(sp, h, mask=mn[None, :])
    y = tl.sum(h * Ct[None, :], axis=1)
    if HAS_D:
        y += tl.load(D_ptr + d) * x
    if HAS_Z:
        z = tl.load(z_ptr + b * s_zb + d * s_zd).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(out_ptr + b * s_ob + d, y.to(out_ptr.dtype.element_ty))


# -----------------------------------------------------------------------------------------------
# Python wrappers: shapes checked, strides passed explicitly, optional inputs as constexpr flags


def _blocks(di, groups, n):
    """BLOCK_D: a power of two dividing the channels per group (so a program has one group), about
    256 states per program; BLOCK_N: n rounded up to a power of two."""
    assert di % groups == 0, f"dim {di} is not a multiple of groups {groups}"
    rep, block_n = di // groups, triton.next_power_of_2(n)
    block_d = 1
    while rep % (2 * block_d) == 0 and 2 * block_d * block_n <= max(256, block_n):
        block_d *= 2
    return block_d, block_n


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


class SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
        (b, di, L), (n, g) = u.shape, (A.shape[1], B.shape[1])
        A, D, bias = A.float().contiguous(), D.float().contiguous() if D is not None else None, \
            delta_bias.float().contiguous() if delta_bias is not None else None
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        block_d, block_n = _blocks(di, g, n)
        n_chunks = triton.cdiv(L, CHUNK)
        out = _alloc_like(u)
        chunk_states = _alloc(b, di, n_chunks, n, like=u, dtype=torch.float32)
        last = _alloc(b, di, n, like=u, dtype=torch.float32)
        zz = z if z is not None else u
        _scan_fwd_kernel[(b, di // block_d)](
            u, delta, A, B, C, D if D is not None else A, zz, bias if bias is not None else A, h0 if h0 is not None else A,
            out, chunk_states, last, L, di, n, di // g, n_chunks, *u.stride(), *delta.stride(), *zz.stride(),
            *B.stride(), *C.stride(), *out.stride(), HAS_D=D is not None, HAS_Z=z is not None,
            HAS_BIAS=bias is not None, HAS_H0=h0 is not None, SOFTPLUS=delta_softplus, CHUNK=CHUNK,
            BLOCK_D=block_d, BLOCK_N=block_n)
        ctx.save_for_backward(u, delta, A, B, C, D, z, bias, chunk_states)
        ctx.flags = (delta_softplus, initial_state is not None, delta_bias is not None and delta_bias.dtype)
        ctx.mark_non_differentiable(last)
        return out, last

    @staticmethod
    def backward(ctx, dout, _dlast):
        u, delta, A, B, C, D, z, bias, chunk_states = ctx.saved_tensors
        softplus, has_h0, bias_dtype = ctx.flags
        (b, di, L), (n, g) = u.shape, (A.shape[1], B.shape[1])
        block_d, block_n = _blocks(di, g, n)
        n_chunks = chunk_states.shape[2]
        du, ddelta, dz = _alloc_like(u), _alloc_like(delta), _alloc_like(z) if z is not None else u
        dB, dC = torch.zeros(B.shape, device=u.device), torch.zeros(C.shape, device=u.device)  # float32 atomics
        dA, dh0 = _alloc(b, di, n, like=u, dtype=torch.float32), _alloc(b, di, n, like=u, dtype=torch.float32)
        dD, dbias = _alloc(b, di, like=u, dtype=torch.float32), _alloc(b, di, like=u, dtype=torch.float32)
        grid = (b, di // block_d)
        scratch = torch.empty(b * grid[1] * (CHUNK + 1) * block_d * block_n, device=u.device)
        zz = z if z is not None else u
        _scan_bwd_kernel[grid](
            u, delta, A, B.contiguous(), C.contiguous(), D if D is not None else A, zz, bias if bias is not None else A,
            chunk_states, dout, scratch, du, ddelta, dA, dB, dC, dD, dz, dbias, dh0, L, di, n, di // g, n_chunks,
            *u.stride(), *delta.stride(), *zz.stride(), *B.contiguous().stride(), *C.contiguous().stride(), *dout.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus,
            CHUNK=CHUNK, BLOCK_D=block_d, BLOCK_N=block_n)
        return (du, ddelta, dA.sum(0), dB.to(B.dtype), dC.to(C.dtype), dD.sum(0) if D is not None else None,
                dz if z is not None else None, dbias.sum(0).to(bias_dtype) if bias_dtype else None,
                dh0 if has_h0 else None, None)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None):
    """Triton forward and backward; the contract of `selective_scan_ref`."""
    _check(u, delta, A, B, C, z)
    out, last = SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)
    return (out, last) if return_last_state else out


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """Triton decode step; the contract of `selective_state_update_ref` (state updated in place)."""
    (b, di), (n, g) = x.shape, (A.shape[1], B.shape[1])
    assert state.shape == (b, di, n) and state.dtype == torch.float32 and state.is_contiguous(), \
        "state must be a contiguous float32 (b, di, n) tensor"
    block_d, block_n = _blocks(di, g, n)
    out = _alloc(b, di, like=x)
    zz = z if z is not None else x
    A = A.float().contiguous()
    _step_kernel[(b, di // block_d)](
        state, x, dt, A, B, C, D.float() if D is not None else A, zz, dt_bias.float() if dt_bias is not None else A,
        out, di, n, di // g, *x.stride(), *dt.stride(), *zz.stride(), *B.stride(), *C.stride(), out.stride(0), HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=dt_softplus, BLOCK_D=block_d, BLOCK_N=block_n)
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
