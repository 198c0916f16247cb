"""Tests: every fast path against its readable reference, and the behaviour a user sees.

    python -m pytest -q test_mil.py

Without a GPU the Triton kernels run in Triton's interpreter (a small tier of cases); on a GPU the
full parametrized product runs compiled.
"""
import itertools
import json
import math
import os
from dataclasses import replace
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():  # must be set before triton is first imported (kernels imports it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import gguf
import pytest
import torch.nn.functional as F

import distill
import kernels
import mil
import speculative

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
TOL = {torch.float32: dict(rtol=6e-4, atol=2e-3), torch.float16: dict(rtol=3e-3, atol=5e-3),  # mamba_ssm's
       torch.bfloat16: dict(rtol=3e-2, atol=5e-2)}
GRAD_TOL = {torch.float32: dict(rtol=1e-3, atol=5e-3), torch.float16: dict(rtol=1e-2, atol=2e-2),
            torch.bfloat16: dict(rtol=6e-2, atol=1e-1)}


@pytest.fixture(autouse=True)
def seeded_reference_backend():
    torch.manual_seed(0)
    kernels.BACKEND = "ref"  # model tests use the readable scan; kernel tests call the kernels directly
    yield
    kernels.BACKEND = "auto"


def small_config(**kw):
    return mil.Config(**{**dict(n_layer=4, d_model=32, n_head=4, n_kv_head=2, block_size=32), **kw})


def trained_looking(model):  # random weights of a trained scale, so that errors cannot hide in tiny values
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3 / math.sqrt(p.shape[1]) * 3)
    return model


# -----------------------------------------------------------------------------------------------
# Algorithm 1: the identity behind attention-initialized Mamba (the first test a reader meets)


def test_mamba_from_attention_is_linear_attention():
    """With Delta = 1 passed directly, A = 0, D = 0, no conv, no gate, a Mamba layer made from an
    attention layer computes causal linear attention of that layer's own pre-RoPE projections:
    y_t = sum_{s<=t} (q_t . k_s) v_s per query head (KV heads repeated as in GQA), then o_proj."""
    cfg = small_config(n_layer=1, attn_layers=(0,))
    teacher = trained_looking(mil.Model(cfg))
    attn = teacher.layers[0].mixer
    mixer = mil.hybrid_from_teacher(teacher, attn_layers=()).layers[0].mixer
    o = torch.randn(2, 24, cfg.d_model)
    x, B, C = mixer.scan_layout(mixer.v_proj(o), mixer.k_proj(o), mixer.q_proj(o))  # (b, di, l), (b, h, n, l) x2
    y = kernels.selective_scan_ref(x, torch.ones_like(x), torch.zeros(x.shape[1], cfg.head_dim), B, C)
    mamba_out = mixer.o_proj(y.transpose(1, 2))
    # causal linear attention, written directly from the attention layer
    rep, e = cfg.n_head // cfg.n_kv_head, cfg.head_dim
    q = attn.q_proj(o).view(2, 24, cfg.n_head, e).transpose(1, 2)  # (b, h, l, e)
    k = attn.k_proj(o).view(2, 24, cfg.n_kv_head, e).transpose(1, 2).repeat_interleave(rep, dim=1)
    v = attn.v_proj(o).view(2, 24, cfg.n_kv_head, e).transpose(1, 2).repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)).tril()  # no softmax, no 1/sqrt(e)
    lin_attn = attn.o_proj((scores @ v).transpose(1, 2).flatten(2))
    torch.testing.assert_close(mamba_out, lin_attn, rtol=1e-5, atol=1e-5 * lin_attn.abs().max().item())


def test_mamba2_from_attention_is_linear_attention():
    """The same identity for Mamba-2 (Mamba2InLlama's layout: mamba_ssm's (b, l, heads, channels)):
    Delta = 1, A = 0, no D, no conv, no gate, no norm gives causal linear attention per head."""
    cfg = small_config(n_layer=1, attn_layers=(0,))
    teacher = trained_looking(mil.Model(cfg))
    attn = teacher.layers[0].mixer
    mixer = mil.hybrid_from_teacher(teacher, attn_layers=(), mixer="mamba2").layers[0].mixer
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):  # Algorithm 1: a copy by name
        assert torch.equal(getattr(mixer, name).weight, getattr(attn, name).weight), name
    o, rep, e = torch.randn(2, 24, cfg.d_model), cfg.n_head // cfg.n_kv_head, cfg.head_dim
    heads = lambda t: t.unflatten(-1, (-1, e))  # (b, l, heads, e)
    x, B, C = heads(mixer.v_proj(o)).repeat_interleave(rep, 2), heads(mixer.k_proj(o)).repeat_interleave(rep, 2), \
        heads(mixer.q_proj(o))
    y = kernels.ssd_scan_ref(x, torch.ones(2, 24, cfg.n_head), torch.zeros(cfg.n_head), B, C)
    mamba_out = mixer.o_proj(y.flatten(2))
    scores = torch.einsum("bthe,bshe->bhts", C, B).tril()  # q_t . k_s, no softmax, no 1/sqrt(e)
    lin_attn = attn.o_proj(torch.einsum("bhts,bshe->bthe", scores, x).flatten(2))
    torch.testing.assert_close(mamba_out, lin_attn, rtol=1e-5, atol=1e-5 * lin_attn.abs().max().item())


# -----------------------------------------------------------------------------------------------
# The reference scan against an independent formulation


def scan_closed_form(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None):
    """float64, no recurrence: h_t = sum_{s<=t} exp(S_t - S_s) Delta_s B_s u_s + exp(S_t) h_0, with
    S_t = sum_{r<=t} Delta_r A. Returns (y, last state)."""
    u, delta, A, B, C = u.double(), delta.double(), A.double(), B.double(), C.double()
    di, L = u.shape[1:]
    delta = delta + (delta_bias.double()[:, None] if delta_bias is not None else 0)
    delta = F.softplus(delta) if delta_softplus else delta
    B, C = B.repeat_interleave(di // B.shape[1], 1), C.repeat_interleave(di // C.shape[1], 1)  # (b, di, n, l)
    S = torch.cumsum(delta[:, :, None, :] * A[None, :, :, None], dim=-1)  # (b, di, n, l)
    seg = (S[..., :, None] - S[..., None, :]).masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), -math.inf)
    h = torch.einsum("bdnts,bdns->bdnt", seg.exp(), (delta * u)[:, :, None, :] * B)  # (b, di, n, l)
    if initial_state is not None:
        h = h + S.exp() * initial_state.double()[..., None]
    y = (h * C).sum(2)
    y = y + (D.double()[:, None] * u if D is not None else 0)
    y = y * F.silu(z.double()) if z is not None else y
    return y, h[..., -1]


def slow_and_fast(*shape, device="cpu"):  # A < 0, log-uniform in [-1.5, -0.02]: states that fade within a few
    # steps and states carried across chunks, tiles and pieces of time, where a wrong carry would show
    return -0.02 * 75 ** torch.rand(*shape, device=device)


def scan_inputs(b=2, di=8, L=13, n=4, groups=2, dtype=torch.float32, device="cpu", options=(1, 1, 1, 1)):
    """Fresh random inputs (never zeros). options: which of D, z, delta_bias, initial_state are given.
    u, delta, B are contiguous (mamba_ssm's layout); C and z are views in the layout mil.py passes."""
    has_D, has_z, has_bias, has_h0 = options
    r = lambda *s: torch.randn(*s, device=device)
    return dict(u=r(b, di, L).to(dtype), delta=(0.5 * r(b, di, L)).to(dtype), A=slow_and_fast(di, n, device=device),
                B=r(b, groups, n, L).to(dtype), C=r(b, L, groups, n).permute(0, 2, 3, 1).to(dtype),  # C, z strided
                D=r(di) if has_D else None, z=r(b, L, di).transpose(1, 2).to(dtype) if has_z else None,  # as in mil.py
                delta_bias=0.5 * r(di) if has_bias else None, initial_state=r(b, di, n) if has_h0 else None)


@pytest.mark.parametrize("L,groups,options", [(1, 1, (1, 1, 1, 1)), (13, 2, (0, 0, 0, 0)), (13, 1, (1, 1, 1, 1)),
                                              (29, 4, (1, 0, 1, 0)), (29, 2, (0, 1, 0, 1))])
def test_reference_scan_matches_closed_form(L, groups, options):
    x = scan_inputs(L=L, groups=groups, options=options)
    y, last = kernels.selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    y2, last2 = scan_closed_form(**x, delta_softplus=True)
    torch.testing.assert_close(y.double(), y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last.double(), last2, rtol=1e-5, atol=1e-5)


def test_reference_step_matches_reference_scan():
    x = scan_inputs(L=9, groups=2)
    y, last = kernels.selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    state = x["initial_state"].clone()
    ys = [kernels.selective_state_update_ref(state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t],
                                             x["C"][..., t], x["D"], x["z"][..., t], x["delta_bias"], True)
          for t in range(9)]
    torch.testing.assert_close(torch.stack(ys, -1), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, last, rtol=1e-5, atol=1e-5)


def ssd_closed_form(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, initial_state=None):
    """float64, the SSD matrix form (no recurrence): per head, y = M x with M[t, s] = (C_t . B_s)
    exp(S_t - S_s) Delta_s for s <= t, S_t = A sum_{r<=t} Delta_r, plus exp(S_t) h_0 C_t. Returns (y, last)."""
    x, A, h, L = x.double(), A.double(), x.shape[2], x.shape[1]
    dt = dt.double() + (dt_bias.double() if dt_bias is not None else 0)
    dt = F.softplus(dt) if dt_softplus else dt  # (b, l, h)
    B, C = (t.double().repeat_interleave(h // t.shape[2], dim=2) for t in (B, C))  # (b, l, h, n)
    S = torch.cumsum(dt * A, dim=1)  # (b, l, h)
    decay = (S[:, :, None] - S[:, None]).masked_fill(~torch.ones(L, L, dtype=torch.bool).tril()[..., None], -math.inf)
    M = torch.einsum("bthn,bshn->btsh", C, B) * decay.exp() * dt[:, None]  # (b, t, s, h)
    y = torch.einsum("btsh,bshp->bthp", M, x)
    last = torch.einsum("bsh,bshp,bshn->bhpn", (S[:, -1:] - S).exp() * dt, x, B)
    if initial_state is not None:
        y = y + torch.einsum("bthn,bhpn->bthp", C, initial_state.double()) * S.exp()[..., None]
        last = last + S[:, -1].exp()[..., None, None] * initial_state.double()
    y = y + ((D.double()[:, None] if D.dim() == 1 else D.double()) * x if D is not None else 0)
    return (y * F.silu(z.double()) if z is not None else y), last


def ssd_inputs(b=2, L=13, h=4, p=3, g=2, n=4, dtype=torch.float32, device="cpu", options=(1, 1, 1, 1)):
    """Fresh random inputs in mamba_ssm's layout; options: which of D (1: per head, 2: per channel),
    z, dt_bias, initial_state are given."""
    has_D, has_z, has_bias, has_h0 = options
    r = lambda *s: torch.randn(*s, device=device)
    return dict(x=r(b, L, h, p).to(dtype), dt=(0.5 * r(b, L, h)).to(dtype), A=slow_and_fast(h, device=device),
                B=r(b, L, g, n).to(dtype), C=r(b, L, g, n).to(dtype), D=(r(h) if has_D == 1 else r(h, p)) if has_D else None,
                z=r(b, L, h, p).to(dtype) if has_z else None, dt_bias=0.5 * r(h) if has_bias else None,
                initial_state=r(b, h, p, n) if has_h0 else None)


def check_against_ssd_reference(scan, x, dtype, **kw):
    """`scan` against the loop on inputs x: outputs, last state and every gradient, per-dtype tolerances."""
    ref_in, in_ = ({k: v.clone().requires_grad_() if v is not None else None for k, v in x.items()} for _ in range(2))
    y, last = scan(**in_, dt_softplus=True, return_last_state=True, **kw)
    y_ref, last_ref = kernels.ssd_scan_ref(**ref_in, dt_softplus=True, return_last_state=True)
    for out, ref in ((y, y_ref), (last, last_ref)):  # atol against the reference's RMS: 16-bit tile products (the
        # Triton SSD's, mamba_ssm's) round each of the chunk's terms, an error of the terms' scale, not of y_t's
        scale = max(1.0, ref.float().pow(2).mean().sqrt().item())
        torch.testing.assert_close(out, ref, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale)
    dy, dlast = torch.randn_like(y), torch.randn_like(last) * last.requires_grad  # (the Mamba-1 scan's: no dlast)
    torch.autograd.backward([y, last] if last.requires_grad else [y], [dy, dlast] if last.requires_grad else [dy])
    torch.autograd.backward([y_ref, last_ref], [dy, dlast])
    for k in x:
        if x[k] is not None:
            grad, grad_ref, tol = in_[k].grad.float(), ref_in[k].grad.float(), GRAD_TOL[dtype]
            torch.testing.assert_close(grad, grad_ref, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, grad_ref.abs().max().item()),
                                       msg=lambda m: f"gradient of {k}: {m}")


@pytest.mark.parametrize("L,g,options", [(1, 1, (1, 1, 1, 1)), (13, 2, (0, 0, 0, 0)), (13, 4, (2, 1, 1, 1)),
                                         (29, 1, (1, 0, 1, 0)), (29, 2, (0, 1, 0, 1))])
def test_ssd_reference_matches_closed_form(L, g, options):
    x = ssd_inputs(L=L, g=g, options=options)
    y, last = kernels.ssd_scan_ref(**x, dt_softplus=True, return_last_state=True)
    y2, last2 = ssd_closed_form(**x, dt_softplus=True)
    torch.testing.assert_close(y.double(), y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last.double(), last2, rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------------------------
# The Triton kernels against the reference: a small interpreter tier on CPU, the full product on GPU

CPU_CASES = [  # (dtype, L, groups, n, options D/z/bias/h0); CHUNK = 8 so that L > 8 spans chunks
    (torch.float32, 1, 1, 4, (1, 1, 1, 1)),
    (torch.float32, 13, 2, 4, (0, 0, 0, 0)),
    (torch.float32, 21, 2, 16, (1, 1, 1, 1)),
    (torch.float32, 21, 4, 4, (0, 1, 0, 1)),
    (torch.float32, 8, 1, 8, (0, 0, 1, 0)),
    (torch.float32, 19, 1, 5, (1, 1, 1, 0)),
    (torch.float32, 21, 8, 4, (1, 0, 0, 1)),
    (torch.bfloat16, 21, 1, 16, (1, 1, 1, 1)),
    (torch.bfloat16, 13, 2, 4, (1, 0, 0, 0)),
    (torch.bfloat16, 1, 2, 4, (0, 1, 1, 1)),
    (torch.bfloat16, 24, 4, 8, (0, 0, 1, 1)),
    (torch.float16, 17, 2, 4, (1, 1, 1, 0)),
]
GPU_CASES = [(dt, L, g, n, o) for dt, L, g, n, o in itertools.product(
    [torch.float32, torch.bfloat16], [1, 200, 700], [1, 4], [16, 64],
    [(1, 1, 1, 1), (0, 0, 0, 0), (1, 1, 0, 0), (0, 0, 1, 1)])]


@pytest.mark.parametrize("dtype,L,groups,n,options", GPU_CASES if GPU else CPU_CASES)
def test_triton_scan_matches_reference(dtype, L, groups, n, options, monkeypatch):
    monkeypatch.setattr(kernels, "POISON", True)  # outputs start as NaN: an unwritten element fails
    monkeypatch.setattr(kernels, "PER_SM", 4 if L % 2 else 0)  # GPU, L even: FWD's shapes, not the 8 channels
    # that so small a batch gets where it would leave SMs idle
    if not GPU:  # chunks of 8 steps, read in tiles of 4 or 8: both loops of the kernels run more than once
        monkeypatch.setattr(kernels, "CHUNK", 8)
        monkeypatch.setattr(kernels, "TILE", 4 if L % 2 else 8)
    di = 64 if GPU else 8
    x = scan_inputs(b=2, di=di, L=L, n=n, groups=groups, dtype=dtype, device=DEV, options=options)
    for v in x.values():
        if v is not None:
            v.requires_grad_()
    y, last = kernels.selective_scan(**x, delta_softplus=True, return_last_state=True)
    ref_in = {k: v.detach().clone().requires_grad_() if v is not None else None for k, v in x.items()}
    y_ref, last_ref = kernels.selective_scan_ref(**ref_in, delta_softplus=True, return_last_state=True)
    assert y.dtype == dtype and last.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(last, last_ref, **TOL[dtype])
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    for k in x:
        if x[k] is not None:
            g, g_ref = x[k].grad, ref_in[k].grad
            scale = g_ref.abs().max().item()  # dB, dC, dA sum over many terms: compare against their scale
            tol = GRAD_TOL[dtype]
            torch.testing.assert_close(g.float(), g_ref.float(), rtol=tol["rtol"], atol=tol["atol"] * max(1.0, scale),
                                       msg=lambda m: f"gradient of {k}: {m}")


@pytest.mark.parametrize("L,g,options,chunk", [(13, 2, (1, 1, 1, 1), 4), (29, 4, (2, 0, 1, 1), 8),
                                               (8, 1, (0, 0, 0, 0), 8), (1, 2, (1, 1, 0, 1), 4)])
def test_ssd_chunked_matches_reference(L, g, options, chunk):
    """The chunked matmul form, lengths not multiples of the chunk."""
    check_against_ssd_reference(kernels.ssd_chunked, ssd_inputs(L=L, g=g, options=options), torch.float32, chunk=chunk)


SSD_TRITON_CASES = [(dt, L, g, o) for dt, L, g, o in itertools.product([torch.float32, torch.bfloat16], [1, 64, 300], [1, 4],
                                                                       [(1, 1, 1, 1), (0, 0, 0, 0)])] if GPU else \
    [(torch.float32, 40, 2, (1, 1, 1, 1)), (torch.bfloat16, 7, 1, (1, 0, 1, 1)), (torch.float32, 16, 4, (0, 0, 0, 0))]


@pytest.mark.parametrize("dtype,L,g,options", SSD_TRITON_CASES)
def test_triton_ssd_matches_reference(dtype, L, g, options, monkeypatch):
    """The Triton SSD, forward and backward (chunks of 16 on the CPU: several chunks, a partial last
    one; groups; with and without D, z, Delta's bias, an initial state)."""
    monkeypatch.setattr(kernels, "POISON", True)
    h, p, n, chunk = (8, 64, 64, 64) if GPU else (4, 16, 16, 16)
    x = ssd_inputs(b=2, L=L, h=h, p=p, g=g, n=n, dtype=dtype, device=DEV, options=options)
    check_against_ssd_reference(kernels.ssd_chunk_scan, x, dtype, chunk=chunk)


@pytest.mark.parametrize("backend", ["ref", "auto"])
def test_ssd_step_matches_reference_scan(backend, monkeypatch):
    """Mamba-2's decode step (Mamba-1's step kernel over each head's channels; the interpreter on the
    CPU), five in a row from an initial state, against the reference scan."""
    monkeypatch.setattr(kernels, "POISON", True)
    kernels.BACKEND = backend
    x = ssd_inputs(b=2, L=5, h=4, p=4, g=2, n=8, device=DEV)
    y, last = kernels.ssd_scan_ref(**x, dt_softplus=True, return_last_state=True)
    state = x["initial_state"].clone()
    ys = [kernels.ssd_step(state, x["x"][:, t], x["dt"][:, t], x["A"], x["B"][:, t], x["C"][:, t], x["D"], x["z"][:, t],
                           x["dt_bias"], True) for t in range(5)]
    torch.testing.assert_close(torch.stack(ys, 1), y, **TOL[torch.float32])
    torch.testing.assert_close(state, last, **TOL[torch.float32])


SSD_CASES = [(dt, L, g, o, 16) for dt, L, g, o in itertools.product([torch.float32, torch.bfloat16], [1, 300], [1, 4],
                                                                     [(1, 1, 1, 1), (0, 0, 0, 0), (2, 0, 1, 1)])] if GPU else \
    [(torch.float32, 13, 2, (1, 1, 1, 1), 2), (torch.bfloat16, 9, 1, (2, 0, 1, 1), 2), (torch.float32, 1, 2, (0, 0, 0, 0), 2),
     (torch.bfloat16, 20, 2, (1, 1, 1, 1), 16)]


@pytest.mark.parametrize("dtype,L,g,options,p", SSD_CASES)
def test_ssd_scan_matches_reference(dtype, L, g, options, p, monkeypatch):
    """Mamba-2's scan where Triton runs: the Triton SSD for 16-bit inputs with head and state sizes it
    takes (powers of two from 16) and D per head, else the Mamba-1 Triton scan (Delta and A broadcast
    over a head's channels)."""
    monkeypatch.setattr(kernels, "POISON", True)
    kernels.BACKEND = "auto"
    if not GPU:
        monkeypatch.setattr(kernels, "CHUNK", 8)
    h, n = (8, 16) if GPU else (4, 4 if p < 16 else 16)
    x = ssd_inputs(b=2, L=L, h=h, p=p, g=g, n=n, dtype=dtype, device=DEV, options=options)
    check_against_ssd_reference(kernels.ssd_scan, x, dtype)


@pytest.mark.parametrize("b,autocast,pieces,h0", [(1, False, 4, 1), (2, True, 8, 1), (2, False, 2, 0)])
def test_long_prefill_in_pieces_matches_reference(b, autocast, pieces, h0, monkeypatch):
    """A long prompt at small batch is scanned as pieces of time in parallel, each started from what
    the earlier pieces (and the initial state) carry in (in float32, also under bf16 autocast, as in
    distill.py's evaluation)."""
    monkeypatch.setattr(kernels, "PIECES", pieces)
    monkeypatch.setattr(kernels, "CHUNK", 4)
    x = scan_inputs(b=b, di=8, L=64, n=4, groups=2, device=DEV, options=(1, 1, 1, h0))
    with torch.no_grad(), torch.autocast(DEV, dtype=torch.bfloat16, enabled=autocast):
        y, last = kernels.selective_scan(**x, delta_softplus=True, return_last_state=True)
    y_ref, last_ref = kernels.selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    torch.testing.assert_close(last, last_ref, **TOL[torch.float32])


@pytest.mark.parametrize("groups,n,options,programs",
                         [(1, 4, (1, 1, 1), 1), (2, 16, (0, 0, 0), 256), (4, 5, (1, 0, 1), 1)])
def test_triton_step_matches_reference_and_scan(groups, n, options, programs, monkeypatch):
    """One decode step against the reference step; N steps against one scan of length N. `programs`
    1 lets a program take several channels (16 and 4 here), 256 one channel each."""
    monkeypatch.setattr(kernels, "POISON", True)
    monkeypatch.setattr(kernels, "PROGRAMS", programs)
    has_D, has_z, has_bias = options
    x = scan_inputs(b=3, di=16, L=5, n=n, groups=groups, device=DEV, options=(has_D, has_z, has_bias, 1))
    state, state_ref = x["initial_state"].clone(), x["initial_state"].clone()
    ys = []
    for t in range(5):
        at = lambda v: v[..., t] if v is not None else None
        args = (x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t], x["C"][..., t])
        kw = dict(D=x["D"], z=at(x["z"]), dt_bias=x["delta_bias"], dt_softplus=True)
        ys.append(kernels.selective_state_update(state, *args, **kw))
        y_ref = kernels.selective_state_update_ref(state_ref, *args, **kw)
        torch.testing.assert_close(ys[-1], y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state, state_ref, rtol=1e-5, atol=1e-5)
    y_scan, last = kernels.selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(torch.stack(ys, -1), y_scan, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, last, rtol=1e-5, atol=1e-5)


def test_mamba_ssm_backend_matches_reference():
    """--scan=mamba_ssm (when mamba_ssm imports, on a GPU): its CUDA scan through mil's wrapper, output,
    last state and gradients, and a layer's decode step with its step kernel, against the references."""
    try:
        kernels.official(torch.device(DEV))
    except RuntimeError as e:
        pytest.skip(str(e))
    x = scan_inputs(b=2, di=64, L=300, n=16, groups=4, dtype=torch.bfloat16, device=DEV, options=(1, 1, 1, 0))
    del x["initial_state"]
    leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    ref_in = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    y, last = kernels.official_scan(**leaves, delta_softplus=True, return_last_state=True)
    y_ref, last_ref = kernels.selective_scan_ref(**ref_in, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(y, y_ref, **TOL[torch.bfloat16])
    torch.testing.assert_close(last, last_ref, **TOL[torch.bfloat16])
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    for k in x:
        scale = ref_in[k].grad.abs().max().item()
        torch.testing.assert_close(leaves[k].grad.float(), ref_in[k].grad.float(), rtol=GRAD_TOL[torch.bfloat16]["rtol"],
                                   atol=GRAD_TOL[torch.bfloat16]["atol"] * max(1.0, scale), msg=lambda m: f"d{k}: {m}")
    state, conv, p, constants = layer_inputs(3, 4, 2, 4, dtype=torch.bfloat16)
    y = kernels.mamba_step_ref(state.clone(), conv.clone(), p, *constants, 4, update=kernels.official_update)
    torch.testing.assert_close(y, kernels.mamba_step_ref(state, conv, p, *constants, 4), **TOL[torch.bfloat16])


# -----------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trip_and_tiktoken_matches_pure_python():
    tok = mil.Tokenizer()
    _, val = mil.load_works()
    text = val[1][5000:9000] + "  odd bytes: \u00e9\u4e2d\U0001f600\t\r\n\x00 end"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_py(text) == ids  # our BPE in plain Python == tiktoken's, on held-out text
    assert len(ids) < len(text.encode()) / 2.5  # it compresses Shakespeare
    assert tok.encode(mil.EOT + "Hamlet") == [tok.eot] + tok.encode("Hamlet")
    assert tok.decode([tok.eot]) == mil.EOT


def test_corrupt_tokenizer_file_is_refused(tmp_path):
    good = open(mil.TOKENIZER_FILE).read().splitlines()
    for bad in (good[:-5], good[:100] + ["!!notbase64 100"] + good[101:], [good[1]] + good[1:]):
        p = tmp_path / "bad.tiktoken"
        p.write_text("\n".join(bad) + "\n")
        with pytest.raises(ValueError, match="python mil.py"):
            mil.Tokenizer(str(p))
    with pytest.raises(FileNotFoundError, match="python mil.py"):
        mil.Tokenizer(str(tmp_path / "missing.tiktoken"))


def test_corpus_split_keeps_validation_plays_out_of_training():
    train, val = mil.load_works()
    assert len(train) == 38 and [w.split("\n")[0] for w in val] == list(mil.VAL_TITLES)
    assert not any("Enter HAMLET" in w or "PROSPERO" in w for w in train)


# -----------------------------------------------------------------------------------------------
# A real pretrained Llama: GGUF files and Hugging Face directories written here, then SmolLM2 itself

Q = gguf.GGMLQuantizationType


def toy_bpe_file():
    """The toy tokenizer as a byte-level BPE file spells it: vocab {token text: id}, merges, specials."""
    tok, chars = mil.Tokenizer(), {b: c for c, b in mil.byte_chars().items()}
    text = lambda bs: "".join(chars[b] for b in bs)
    merges = []
    for t, i in sorted(tok.ranks.items(), key=lambda x: x[1])[256:]:  # each merged token's two older parts
        k = next(k for k in range(1, len(t)) if tok.ranks.get(t[:k], i) < i and tok.ranks.get(t[k:], i) < i)
        merges.append((text(t[:k]), text(t[k:])))
    return {text(t): i for t, i in tok.ranks.items()}, merges, {mil.EOT: tok.eot}


def tiny_llama(tie):  # a random Llama whose inner dimensions hold whole quantization blocks of 32
    cfg = mil.Config(n_layer=2, d_model=64, n_head=4, n_kv_head=2, block_size=128, rope_theta=50000.0,
                     norm_eps=1e-6, tie_embeddings=tie)
    model = trained_looking(mil.Model(cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)  # norms not all ones
    return model.eval()


def file_names(model, table, layer_prefix):  # {a file format's name: (mil's name, tensor)}; a tied head once
    of, out = {v: k for k, v in table.items()}, {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue
        parts = name.split(".")
        stem = ".".join(parts[2:-1]) if parts[0] == "layers" else ".".join(parts[:-1])
        out[(f"{layer_prefix}{parts[1]}." if parts[0] == "layers" else "") + of[stem] + ".weight"] = (name, t)
    return out


def write_gguf(path, model, qtypes, arch="llama", tokenizer="gpt2", pre="llama-bpe", chat_template=None):
    """Writes `model` as llama.cpp's converter would: its names, q/k rows permuted for its RoPE,
    tensors quantized by qtypes {mil name fragment: type}. Returns the weights mil should load back
    (the quantized ones dequantized), by mil's names."""
    cfg = model.cfg
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layer), w.add_context_length(cfg.block_size), w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff), w.add_head_count(cfg.n_head), w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_freq_base(cfg.rope_theta), w.add_layer_norm_rms_eps(cfg.norm_eps), w.add_vocab_size(cfg.vocab_size)
    vocab, merges, special = toy_bpe_file()
    tokens = sorted({**vocab, **special}.items(), key=lambda x: x[1])
    w.add_tokenizer_model(tokenizer), w.add_tokenizer_pre(pre), w.add_token_list([t for t, _ in tokens])
    w.add_token_types([3 if t in special else 1 for t, _ in tokens]), w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_eos_token_id(special[mil.EOT]), w.add_bos_token_id(special[mil.EOT]), w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)
    expect = {}
    for gname, (name, t) in file_names(model, mil.GGUF_NAMES, "blk.").items():
        a = t.numpy().copy()
        qtype = next((q for frag, q in qtypes.items() if frag in name), Q.F32)
        if qtype != Q.F32:
            a = gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)  # what the file will hold
        expect[name] = torch.from_numpy(a.copy())
        if "q_proj" in name or "k_proj" in name:  # llama.cpp's permute: rows (h, 2, e/2) -> (h, e/2, 2)
            h = cfg.n_head if "q_proj" in name else cfg.n_kv_head
            a = a.reshape(h, 2, a.shape[0] // h // 2, a.shape[1]).swapaxes(1, 2).reshape(a.shape)
        if qtype == Q.F32:
            w.add_tensor(gname, a)
        else:
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return expect


def logits_of(model, weights, idx):
    ref = mil.Model(model.cfg).eval()
    ref.load_state_dict({**weights, **({"lm_head.weight": weights["embed.weight"]} if model.cfg.tie_embeddings else {})})
    return ref(idx)[0]


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_file_loads_into_the_same_model(tmp_path, tie):
    model = tiny_llama(tie)
    qtypes = {"embed": Q.Q8_0, "q_proj": Q.Q8_0, "k_proj": Q.Q4_1, "mlp.": Q.Q4_1}
    expect = write_gguf(tmp_path / "tiny.gguf", model, qtypes)
    loaded, tok = mil.load_pretrained(str(tmp_path / "tiny.gguf"))
    assert loaded.cfg == model.cfg and (loaded.lm_head.weight is loaded.embed.weight) == tie
    idx = torch.randint(0, 4096, (2, 24))
    torch.testing.assert_close(loaded(idx)[0], logits_of(model, expect, idx), rtol=1e-5, atol=1e-5)
    text = mil.load_works()[1][0][:3000] + " 12345  \t odd \u00e9\U0001f600"
    assert tok.encode(text) == mil.Tokenizer().encode(text) and tok.decode(tok.encode(text)) == text
    assert tok.encode(mil.EOT + "x") == [tok.eot] + tok.encode("x") and tok.stop == (tok.eot,)


def write_hf_dir(path, model, shards=2, pre=None, **config):
    """A Hugging Face Llama directory: config.json, sharded safetensors with their index, tokenizer.json."""
    from safetensors.torch import save_file
    cfg = model.cfg
    path.mkdir()
    names = {key: t.contiguous() for key, (_, t) in file_names(model, mil.HF_NAMES, "model.layers.").items()}
    keys, weight_map = sorted(names), {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: names[k].to(torch.bfloat16) for k in keys[s::shards]}, str(path / file))
        weight_map.update({k: file for k in keys[s::shards]})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.block_size, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings, **config}))
    vocab, merges, special = toy_bpe_file()
    (path / "tokenizer.json").write_text(json.dumps({
        "added_tokens": [{"id": i, "content": t, "special": True} for t, i in special.items()], "normalizer": None,
        "pre_tokenizer": pre or {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]},
        "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": mil.EOT}},
                                                                     {"Sequence": {"id": "A"}}]},
        "model": {"type": "BPE", "vocab": vocab, "merges": [" ".join(m) for m in merges]}}))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": mil.EOT}))
    return {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}


def test_hugging_face_directory_loads_into_the_same_model(tmp_path):
    model = tiny_llama(tie=True)
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)
    expect = write_hf_dir(tmp_path / "hf", model, rope_scaling=scaling)
    loaded, tok = mil.load_pretrained(str(tmp_path / "hf"))
    assert loaded.cfg == replace(model.cfg, rope_scaling=(8.0, 1.0, 4.0, 32))
    idx = torch.randint(0, 4096, (2, 24))
    ref = mil.Model(loaded.cfg).eval()
    ref.load_state_dict(expect)
    torch.testing.assert_close(loaded(idx)[0], ref(idx)[0], rtol=1e-5, atol=1e-5)
    text = "Digits 2024, split one by one:  12   34.\n\tEnd \u00e9"
    ids = tok.encode(text)
    assert ids[0] == tok.eot == tok.bos and tok.decode(ids[1:]) == text and ids[1:] == tok.encode_py(text)
    assert [tok.decode([i]) for i in tok.encode_ordinary(" 2024")] == [" ", "2", "0", "2", "4"]  # SmolLM's digit rule


def test_llama3_rope_scaling_matches_its_formula():
    """Llama 3.1's scaling, written as Hugging Face's _compute_llama3_parameters states it."""
    cfg = mil.Config(n_layer=1, d_model=256, n_head=2, rope_theta=500000.0, rope_scaling=(32.0, 1.0, 4.0, 8192))
    factor, low, high, old = cfg.rope_scaling
    want = []
    for f in (500000.0 ** -(torch.arange(0, 128, 2, dtype=torch.float64) / 128)).tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            want.append(f)
        elif wavelen > old / low:
            want.append(f / factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            want.append((1 - smooth) * f / factor + smooth * f)
    got = mil.rope_inv_freq(cfg)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=1e-6, atol=0)
    plain = mil.rope_inv_freq(replace(cfg, rope_scaling=None))
    assert (got == plain).any() and (got == plain / 32).any() and ((got < plain) & (got > plain / 32)).any()


def test_bad_model_sources_are_refused_in_one_line(tmp_path):
    model = tiny_llama(tie=True)
    cases = [(str(tmp_path / "nope.gguf"), "no model at"), (str(tmp_path / "empty"), "no config.json")]
    (tmp_path / "empty").mkdir()
    write_gguf(tmp_path / "gpt2.gguf", model, {}, arch="gpt2")
    write_gguf(tmp_path / "spm.gguf", model, {}, tokenizer="llama")
    write_gguf(tmp_path / "pre.gguf", model, {}, pre="qwen2")
    cases += [(str(tmp_path / "gpt2.gguf"), "'gpt2' model; mil loads Llama"), (str(tmp_path / "spm.gguf"), "sentencepiece"),
              (str(tmp_path / "pre.gguf"), "pre-tokenizer 'qwen2' has no rule")]
    write_hf_dir(tmp_path / "cut", model, shards=1)
    shard = next((tmp_path / "cut").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    write_hf_dir(tmp_path / "unigram", model, pre={"type": "Metaspace"})
    write_hf_dir(tmp_path / "mistral", model)
    (tmp_path / "mistral" / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    cases += [(str(tmp_path / "cut"), "not a readable safetensors file"), (str(tmp_path / "unigram"), "not a byte-level BPE"),
              (str(tmp_path / "mistral"), "'mistral' model")]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for source, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message) as e:
            mil.load_pretrained(source)
        assert "\n" not in str(e.value), str(e.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def smollm2_or_skip():
    try:
        mil.smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2():
    smollm2_or_skip()
    model, tok = mil.load_pretrained("smollm2")
    return model.eval(), tok


# Recorded once from Hugging Face's own tokenizer and LlamaForCausalLM (transformers 5.24) on the same
# file: ids from its tokenizer.json (Digits then ByteLevel); logits of the dequantized weights, float32.
SMOLLM2_IDS = {"Hello world": [19556, 905], "a   1": [81, 333, 33],
               "x 123 4567 89": [104, 216, 33, 34, 35, 216, 36, 37, 38, 39, 216, 40, 41],
               "caf\u00e9 \u4e2d\u6587 \U0001f600": [83, 1939, 2756, 216, 28589, 29184, 40303, 218],
               "<|im_start|>user\nHi<|im_end|>": [1, 4093, 198, 26843, 2]}
SMOLLM2_PROMPT = "The capital of France is Paris. The capital of Italy is"
SMOLLM2_TOP5 = ([7268, 19997, 7158, 312, 41130], [14.9478, 12.5836, 12.2814, 12.1648, 11.8987])


def test_smollm2_tokenizer_matches_hugging_face(smollm2):
    _, tok = smollm2
    for text, ids in SMOLLM2_IDS.items():
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == text
    assert [tok.decode([i]) for i in tok.stop] == ["<|endoftext|>", "<|im_end|>"]
    chat = tok.decode(tok.chat([{"role": "user", "content": "Hi"}]))
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_logits_match_hugging_face_and_cached_decoding(smollm2):
    model, tok = smollm2
    idx = torch.tensor([tok.encode(SMOLLM2_PROMPT)])
    with torch.no_grad():
        top = model(idx)[0][0, -1].topk(5)
    assert top.indices.tolist() == SMOLLM2_TOP5[0]
    torch.testing.assert_close(top.values, torch.tensor(SMOLLM2_TOP5[1]), rtol=0, atol=2e-3)
    out = mil.generate(model, idx, 6, temperature=0)
    x = idx
    for _ in range(6):  # no cache: re-run the whole sequence
        x = torch.cat([x, model(x)[0][:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, x) and tok.decode(out[0, idx.shape[1]:]).startswith(" Rome")
    reply = mil.chat(model, tok, [{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=20)
    assert "Paris" in reply and "<|im_end|>" not in reply


# -----------------------------------------------------------------------------------------------
# Models and caches


def check_cached_decoding(model, idx):
    """Prefill, a one-token step, a multi-token append, a truncation and re-append (attention
    only), then the rest (more than mil.FOLD tokens): each equals the full forward's logits. At the
    batch given and at batch 1, where a few tokens attend as batch rows (Attention.forward's fold)."""
    assert idx.shape[1] > 11 + mil.FOLD, "the last append takes the attention path of long appends"
    for idx in (idx, idx[:1]):
        full, _ = model(idx)
        caches = model.new_caches(idx.shape[0], idx.shape[1])
        parts = [model(idx[:, :5], caches=caches)[0], model(idx[:, 5:6], caches=caches)[0],
                 model(idx[:, 6:11], caches=caches)[0]]
        if all(isinstance(c, mil.AttnCache) for c in caches):
            caches.truncate(8)
            parts[-1] = torch.cat([parts[-1][:, :2], model(idx[:, 8:11], caches=caches)[0]], dim=1)
        parts.append(model(idx[:, 11:], caches=caches)[0])
        torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)


def test_teacher_cached_decoding_matches_forward():
    model = trained_looking(mil.Model(small_config()))
    check_cached_decoding(model, torch.randint(0, 4096, (2, 32)))


@pytest.mark.parametrize("mixer,name", [("mamba1", "MambaMixer"), ("mamba2", "Mamba2Mixer")])
def test_hybrid_cached_decoding_matches_forward(mixer, name):
    teacher = trained_looking(mil.Model(small_config()))
    hybrid = mil.hybrid_from_teacher(teacher, attn_layers=(1, 3), mixer=mixer)
    assert [type(b.mixer).__name__ for b in hybrid.layers] == [name, "Attention"] * 2
    check_cached_decoding(hybrid, torch.randint(0, 4096, (2, 32)))
    no_rope = mil.hybrid_from_teacher(teacher, attn_layers=(), mixer=mixer)
    check_cached_decoding(no_rope, torch.randint(0, 4096, (2, 32)))


def test_hybrid_copies_teacher_exactly():
    teacher = trained_looking(mil.Model(small_config()))
    same = mil.hybrid_from_teacher(teacher, attn_layers=range(4))
    idx = torch.randint(0, 4096, (2, 12))
    assert torch.equal(same(idx)[0], teacher(idx)[0])  # all-attention "hybrid" is the teacher
    hybrid = mil.hybrid_from_teacher(teacher, attn_layers=(3,))
    t, h = teacher.state_dict(), hybrid.state_dict()
    for name, v in t.items():  # embeddings, norms, MLPs, kept attention AND the mapped q/k/v/o_proj
        assert torch.equal(h[name], v), name
    assert sum(p.numel() for p in hybrid.parameters()) > sum(p.numel() for p in teacher.parameters())
    rand = mil.hybrid_from_teacher(teacher, attn_layers=(3,), init="random")
    assert not torch.equal(rand.state_dict()["layers.0.mixer.q_proj.weight"], t["layers.0.mixer.q_proj.weight"])
    assert torch.equal(rand.state_dict()["layers.0.mlp.up_proj.weight"], t["layers.0.mlp.up_proj.weight"])
    quiet = mil.hybrid_from_teacher(teacher, attn_layers=(3,), mixer="mamba2", gate_norm_init=0.05)
    assert quiet.cfg.gate_norm_init == 0.05 and torch.all(quiet.layers[0].mixer.norm_weight == 0.05)
    # stepwise: the next student keeps the previous student's Mamba layers, maps the newly replaced ones
    with torch.no_grad():
        hybrid.layers[0].mixer.A_log.add_(1.0)
    half = mil.hybrid_from_teacher(teacher, attn_layers=(1, 3))
    with torch.no_grad():
        half.layers[0].mixer.D.add_(1.0)
    quarter = mil.hybrid_from_teacher(teacher, attn_layers=(3,), student=half)
    assert torch.equal(quarter.layers[0].mixer.D, half.layers[0].mixer.D)
    assert torch.equal(quarter.layers[1].mixer.q_proj.weight, teacher.layers[1].mixer.q_proj.weight)


def test_generate_is_greedy_and_deterministic():
    model = trained_looking(mil.Model(small_config()))
    idx = torch.randint(0, 4096, (1, 6))
    out = mil.generate(model, idx, 8, temperature=0)
    x = idx
    for _ in range(8):  # no cache: re-run the whole sequence
        x = torch.cat([x, model(x)[0][:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, x)


# -----------------------------------------------------------------------------------------------
# Options and checkpoints


def test_options_reject_unknown_keys_and_bad_types():
    defaults = dict(steps=10, lr=0.1, name="x", flag=False)
    assert mil.parse_options(defaults, ["--steps=3", "--lr=1e-3", "--flag"]) == dict(steps=3, lr=1e-3, name="x", flag=True)
    with pytest.raises(SystemExit, match="--stpes.*valid options: --steps, --lr"):
        mil.parse_options(defaults, ["--stpes=3"])
    with pytest.raises(SystemExit, match="--steps takes an integer, got 'ten'"):
        mil.parse_options(defaults, ["--steps=ten"])


@pytest.mark.parametrize("script,key", [(distill, "targets"), (speculative, "k")])
def test_help_lists_each_option_with_its_default_and_its_comment(script, key, capsys):
    with pytest.raises(SystemExit) as done:
        script.resolve(["--help"])
    note = mil.option_notes(script.__file__)[key]  # the comment beside key=... in the script's DEFAULTS
    assert done.value.code == 0 and note
    assert any(line.startswith(f"  --{key}={script.DEFAULTS[key]} ") and line.endswith(" " + note)
               for line in capsys.readouterr().out.splitlines())


BAD_OPTIONS = [  # (argv, what the one-line message must say)
    (["--preset=tpu"], "--preset=tpu: takes cpu, gpu, smollm2 or auto"),
    (["--d_model=65"], "--d_model=65: takes a multiple of --n_head=4"),
    (["--n_head=5", "--d_model=60"], "--n_head=5: takes a multiple of --n_kv_head=2"),
    (["--d_model=60", "--n_head=4", "--n_kv_head=1"], "--d_model=60: takes d_model / n_head (head_dim) even"),
    (["--attn_fractions=0.3,abc"], "--attn_fractions=0.3,abc: takes attention fractions of 8 layers"),
    (["--attn_fractions=1.0"], "--attn_fractions=1.0: takes attention fractions"),
    (["--attn_fractions=0.25,0.5"], "strictly decreasing"),
    (["--attn_fractions=0.0625"], "from 1/2, 1/4, 1/8"),
    (["--batch_size=0"], "--batch_size=0: takes a positive integer"),
    (["--lr=-1"], "--lr=-1.0: takes a positive number"),
    (["--dropout=1.5"], "--dropout=1.5: takes a rate in [0, 1)"),
    (["--teacher_wd=-1"], "--teacher_wd=-1.0: takes 0 or more"),
    (["--draft_layers=99"], "--draft_layers=99: takes 0 (no draft) to 8"),
    (["--draft_teacher=attn7"], "--draft_teacher=attn7: takes teacher or hybrids this run makes"),
    (["--targets=web"], "--targets=web: takes corpus, teacher or mix"),
    (["--scan=cuda"], "--scan=cuda: scan backend must be auto, triton, ref or mamba_ssm"),
    (["--bench=infer"], "--bench=infer: takes train"),
    (["--align_steps=-1"], "--align_steps=-1: takes 0 or more"),
    (["--ft_lr=-1"], "--ft_lr=-1.0: takes 0 or more"),
    (["--gate_norm_init=0"], "--gate_norm_init=0.0: takes a positive number"),
    (["--mixer=mamba3"], "--mixer=mamba3: takes mamba1, mamba2 or both"),
    (["--teacher=/no/such/model.gguf"], "--teacher=/no/such/model.gguf: no model at"),
    (["--teacher=smollm2", "--n_layer=4"], "--n_layer=4: a pretrained teacher brings its own architecture"),
] + ([] if GPU else [(["--device=cuda"], "--device=cuda: takes cpu, or cuda on a machine with a CUDA GPU"),
                     (["--scan=mamba_ssm"], "--scan=mamba_ssm: the mamba_ssm backend needs mamba_ssm's selective_scan_cuda")])


@pytest.mark.parametrize("argv, message", BAD_OPTIONS)
def test_bad_options_are_refused_in_one_line_before_any_work(tmp_path, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        distill.main(["--preset=cpu"] + argv + [f"--out_dir={out}"])
    assert isinstance(stop.value.code, str) and message in stop.value.code and "\n" not in stop.value.code
    assert not out.exists()  # nothing trained, nothing written


def test_bad_options_exit_nonzero_without_a_traceback(tmp_path):
    import subprocess
    import sys
    for script, argv in (("distill.py", ["--d_model=65"]), ("speculative.py", ["--k=0"]),
                         ("speculative.py", [f"--out_dir={tmp_path}", "--models=attn50"])):
        run = subprocess.run([sys.executable, os.path.join(mil.HERE, script), "--preset=cpu", *argv],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.strip().splitlines()[-1].startswith("--"), run.stderr
    assert not any(tmp_path.iterdir())


def test_alignment_loss_is_each_mamba_layers_error_against_its_attention_layer():
    """--align_steps: the loss is, per Mamba layer, the MSE between its mixer's output and the
    teacher's attention output from the teacher's own normalized input there (computed here by
    walking the teacher's blocks), over that output's mean square; training on it moves only the
    Mamba mixers and lowers it."""
    teacher = trained_looking(mil.Model(small_config())).requires_grad_(False)
    student = mil.hybrid_from_teacher(teacher, attn_layers=(1, 3))
    idx = torch.randint(0, 4096, (2, 16))
    loss_fn = distill.align_loss(student, teacher)
    x, rope = teacher.embed(idx), mil.rope_tables(teacher.inv_freq, torch.arange(16), torch.float32)
    errors = []
    for i, block in enumerate(teacher.layers):
        if i in (0, 2):
            h = block.attn_norm(x)
            want = block.mixer(h, rope)
            errors.append(F.mse_loss(student.layers[i].mixer(h), want) / want.pow(2).mean())
        x = block(x, rope)
    torch.testing.assert_close(loss_fn(student, idx, idx), sum(errors) / 2)
    params = distill.trainable(student, "mamba")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    opt = torch.optim.Adam(params, lr=1e-3)
    losses = []
    for _ in range(20):
        loss = loss_fn(student, idx, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("layers.0.mixer.", "layers.2.mixer.")) for k in changed), changed


def test_checkpoint_with_another_config_is_refused(tmp_path):
    cfg = small_config()
    path = str(tmp_path / "teacher.pt")
    mil.save_checkpoint(path, model=mil.Model(cfg).state_dict(), config=cfg.to_dict())
    model, _ = mil.load_model(path, expect=cfg)
    with pytest.raises(ValueError, match="another config.*d_model"):
        mil.load_model(path, expect=small_config(d_model=64, n_head=4))
    with pytest.raises(FileNotFoundError, match="python distill.py"):
        mil.load_model(str(tmp_path / "nope.pt"))


# -----------------------------------------------------------------------------------------------
# Speculative decoding


def peaked_models(mixer="mamba1"):
    """A hybrid target and a 2-layer Transformer draft whose layers add little to the embedding's
    own prediction, so that most drafts are accepted and some are not: both paths get exercised."""
    cfg = small_config(n_layer=4, block_size=40)
    teacher = trained_looking(mil.Model(cfg))
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(0.15)
    target = mil.hybrid_from_teacher(teacher, attn_layers=(1, 3), mixer=mixer)
    draft = mil.Model(mil.Config(**{**cfg.to_dict(), "n_layer": 2, "attn_layers": None}))
    draft.load_state_dict({k.replace("layers.3.", "layers.1.", 1): v for k, v in teacher.state_dict().items()
                           if not k.startswith(("layers.1.", "layers.2."))})
    return target.eval(), draft.eval()


@pytest.mark.parametrize("backend", ["ref", "auto"] if GPU else ["ref"])  # the interpreter's: below
@pytest.mark.parametrize("mixer", ["mamba1", "mamba2"])
def test_greedy_speculative_decoding_equals_plain_greedy(backend, mixer):
    kernels.BACKEND = backend
    target, draft = (m.to(DEV) for m in peaked_models(mixer))
    accepted = tested = 0
    for k in (1, 2, 4):
        for seed in range(2):
            prompt = torch.randint(0, 4096, (1, 5), generator=torch.Generator().manual_seed(seed)).to(DEV)
            n_new = 40 - 5  # up to the length limit
            plain, _ = speculative.plain_generate(target, prompt, n_new, temperature=0)
            assert torch.equal(plain, mil.generate(target, prompt, n_new, temperature=0))
            spec, stats = speculative.speculative_generate(target, draft, prompt, n_new, k, temperature=0)
            assert torch.equal(spec, plain), f"K={k}, prompt {seed}"
            accepted, tested = accepted + stats["accepted"], tested + stats["tested"]
    assert 0 < accepted < tested  # both acceptance and rejection happened


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("stage", ["align", "distill"])
def test_cuda_graph_training_matches_eager(stage, tmp_path):
    """--graphs: training steps whose loss forward and backward replay as CUDA graphs log the eager
    steps' losses and train the same weights, from the same start on the same (fresh) batches."""
    kernels.BACKEND = "auto"
    teacher = trained_looking(mil.Model(small_config())).cuda().requires_grad_(False).eval()
    tokens = torch.randint(0, 4096, (4096,))
    data = SimpleNamespace(device=torch.device("cuda"), batch=lambda b, gen, pool: (
        lambda w: (w[:, :-1].cuda(), w[:, 1:].cuda()))(tokens[torch.randint(4000, (b, 1), generator=gen) + torch.arange(33)]))
    cfg = dict(distill.DEFAULTS, out_dir=str(tmp_path), batch_size=4, block_size=32, warmup=2, log_every=100)
    trained = []
    for graphs in (False, True):
        torch.manual_seed(0)
        student = mil.hybrid_from_teacher(teacher, attn_layers=(1, 3))
        start = [p.detach().clone() for p in distill.trainable(student, "mamba")]
        loss_fn = distill.align_loss(student, teacher) if stage == "align" else distill.distill_loss(teacher, cfg)
        log = distill.train("s", student, dict(cfg, graphs=graphs), data, 6, 1e-3, loss_fn,
                            distill.trainable(student, "mamba"), save=False)["log"]
        trained.append((log, [p.detach() for p in distill.trainable(student, "mamba")]))
    (eager_log, eager), (graph_log, graphed) = trained
    assert len(set(eager_log)) == 6  # fresh batches: every step's loss differs
    torch.testing.assert_close(graph_log, eager_log, rtol=1e-3, atol=1e-5)
    moved = sum((e - s).norm() ** 2 for e, s in zip(eager, start)) ** 0.5
    apart = sum((g - e).norm() ** 2 for g, e in zip(graphed, eager)) ** 0.5
    assert moved > 0 and apart < 0.02 * moved, (apart, moved)


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("mixer", ["mamba1", "mamba2"])
def test_cuda_graph_decoding_matches_eager(temperature, mixer):
    """The same decoding replayed as CUDA graphs (one per token; one per speculative round, with the
    acceptance and rollback on the device) gives the eager run's tokens. Sampling draws from the
    default generator in both, seeded alike."""
    kernels.BACKEND = "auto"
    target, draft = (m.cuda() for m in peaked_models(mixer))
    prompt = torch.randint(0, 4096, (1, 5), device="cuda")
    for fn, args in ((speculative.plain_generate, ()), (speculative.speculative_generate, (draft,))):
        runs = []
        for graphs in (False, True):
            torch.manual_seed(1)
            runs.append(fn(target, *args, prompt, 30, *((3,) if args else ()), temperature=temperature, graphs=graphs)[0])
        assert torch.equal(runs[0], runs[1]), fn.__name__
    batch = torch.randint(0, 4096, (3, 5), device="cuda")  # mil.generate: a batch, a row that stops midway
    torch.manual_seed(1)
    stop = (int(mil.generate(target, batch, 40, temperature)[0, 12]),)
    runs = []
    for graphs in (False, True):
        torch.manual_seed(1)
        runs.append(mil.generate(target, batch, 40, temperature, stop=stop, graphs=graphs))
    assert torch.equal(runs[0], runs[1]) and (runs[0][0, 12:] == stop[0]).all()


def layer_inputs(b, heads, kv_heads, d_conv, e=4, l=None, dtype=torch.float32):
    """Fresh random decode-time inputs of one Mamba layer (kernels.mamba_step's layout): the state, the
    conv window, the fused projection (b, g e + g e + h e + 2 di) (with l: (b, l, ..)), the float32
    constants. Delta's raw values near 0, as trained layers have them."""
    r = lambda *s: torch.randn(*s, device=DEV)
    di = heads * e
    p = r(b, *([l] if l else []), 2 * kv_heads * e + heads * e + 2 * di)
    p[..., -di:] = 0.5 * p[..., -di:]
    constants = (r(di, d_conv) / d_conv, r(di), slow_and_fast(di, e, device=DEV), r(di), 0.5 * r(di))
    return r(b, di, e), r(b, di, d_conv - 1).to(dtype), p.to(dtype), constants


GQA_CASES = [(4, 2, 4, 1), (4, 4, 2, 256), (4, 1, 1, 1), (2, 1, 3, 256)]  # heads, kv heads, d_conv, programs


@pytest.mark.parametrize("heads,kv_heads,d_conv,programs", GQA_CASES)
def test_fused_decode_step_matches_reference(heads, kv_heads, d_conv, programs, monkeypatch):
    """The fused decode step (conv, SiLU, Delta, state update, gate in one kernel) against its reference,
    five steps in a row (state and conv window carried), for GQA ratios 1, 2, 4 and conv widths 1-4.
    `programs` 1 lets a program take several channels, 256 one channel each. That the reference step
    is the layer's forward: check_cached_decoding."""
    monkeypatch.setattr(kernels, "POISON", True)
    monkeypatch.setattr(kernels, "PROGRAMS", programs)
    for dtype in (torch.float32, torch.bfloat16):
        state, conv, _, constants = layer_inputs(3, heads, kv_heads, d_conv, dtype=dtype)
        state_ref, conv_ref = state.clone(), conv.clone()
        for _ in range(5):
            p = layer_inputs(3, heads, kv_heads, d_conv, dtype=dtype)[2]
            y = kernels.mamba_step(state, conv, p, *constants, heads)
            y_ref = kernels.mamba_step_ref(state_ref, conv_ref, p, *constants, heads)
            torch.testing.assert_close(y, y_ref, **TOL[dtype])
            torch.testing.assert_close(state, state_ref, **TOL[dtype])
            assert torch.equal(conv, conv_ref)


@pytest.mark.parametrize("heads,kv_heads,d_conv,programs", GQA_CASES)
def test_fused_verify_matches_reference_for_every_replay_count(heads, kv_heads, d_conv, programs, monkeypatch):
    """Algorithm 2's fused MultiStep kernel against its reference, for every number of replayed tokens
    0 .. K+1 (each row of the batch its own): outputs, committed state, the conv window, and the new
    tokens' x, Delta and B stored for the next verification; then the committed state against r
    reference steps of the replayed tokens."""
    monkeypatch.setattr(kernels, "POISON", True)
    monkeypatch.setattr(kernels, "PROGRAMS", programs)
    K, e = 3, 4
    b, di, k = K + 2, heads * e, d_conv - 1
    state, conv, p, constants = layer_inputs(b, heads, kv_heads, d_conv, l=K + 1)
    r = lambda *s: torch.randn(*s, device=DEV)
    prev = (r(b, di, k + K + 1), r(b, di, K + 1), r(b, di, K + 1), r(b, kv_heads, e, K + 1))  # window, x, Delta, B
    replay = torch.arange(b, dtype=torch.int32, device=DEV)  # row r replays r tokens
    runs = []
    for verify in (kernels.mamba_verify, kernels.mamba_verify_ref):
        s, bufs = state.clone(), [t.clone() for t in prev]
        y = verify(s, conv, *bufs[:1], *bufs[1:], replay, p, *constants, heads)
        runs.append([y, s, *bufs])
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _, committed, window, x_prev, dt_prev, B_prev = runs[0]
    assert torch.equal(window[..., :k], conv) and torch.equal(dt_prev, p[..., -di:].transpose(1, 2))
    for row in range(b):  # the committed state is the state after exactly r replayed tokens
        h = state[row:row + 1].clone()
        for i in range(row):
            kernels.selective_state_update_ref(h, prev[1][row:row + 1, :, i], prev[2][row:row + 1, :, i], constants[2],
                                               prev[3][row:row + 1, ..., i], prev[3][row:row + 1, ..., i],
                                               dt_bias=constants[4], dt_softplus=True)
        torch.testing.assert_close(committed[row:row + 1], h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,d_conv,programs", GQA_CASES)
def test_fused_prefill_matches_reference(heads, kv_heads, d_conv, programs, monkeypatch):
    """A Mamba layer's prefill from its caches (the scan reading its input projection in place, the
    conv inside it) against its reference, three prompts in a row (state and conv window carried): as
    one walk, in 4 pieces of time, and a prompt shorter than the conv window."""
    monkeypatch.setattr(kernels, "POISON", True)
    monkeypatch.setattr(kernels, "CHUNK", 8)
    for dtype in (torch.float32, torch.bfloat16):
        state, conv, _, constants = layer_inputs(2, heads, kv_heads, d_conv, dtype=dtype)
        state_ref, conv_ref = state.clone(), conv.clone()
        for l, pieces in ((24, 1), (32, 4), (2, 1)):
            monkeypatch.setattr(kernels, "PIECES", pieces)
            p = layer_inputs(2, heads, kv_heads, d_conv, l=l, dtype=dtype)[2]
            y = kernels.mamba_prefill(state, conv, p, *constants, heads)
            y_ref = kernels.mamba_prefill_ref(state_ref, conv_ref, p, *constants, heads)
            torch.testing.assert_close(y, y_ref, **TOL[dtype])
            torch.testing.assert_close(state, state_ref, **TOL[dtype])
            assert torch.equal(conv, conv_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_matches_reference(dtype, monkeypatch):
    monkeypatch.setattr(kernels, "POISON", True)
    x, r, w = (torch.randn(*s, device=DEV) for s in ((3, 5, 24), (3, 5, 24), (24,)))
    s, y = kernels.add_rms_norm(x.to(dtype), r.to(dtype), w.to(dtype), 1e-5)
    s_ref, y_ref = kernels.add_rms_norm_ref(x.to(dtype), r.to(dtype), w.to(dtype), 1e-5)
    torch.testing.assert_close(s, s_ref, **TOL[dtype])  # (the interpreter rounds to bf16 toward zero)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_matches_torch(dtype, monkeypatch):
    """Rows of few distinct values, so that most have ties (the first index wins, as in torch), and of
    normal noise with -inf entries (top-k masking); a row longer than the kernel's block (its loop),
    a strided slice of a batch of logits as decoding takes it (logits[:, -1])."""
    monkeypatch.setattr(kernels, "ARGMAX_BLOCK", 256)
    ties = torch.randint(0, 5, (3, 4, 1000), device=DEV).to(dtype)
    noise = torch.randn(2, 3, 700, device=DEV).to(dtype)
    noise[noise < -1] = -math.inf
    for x in (ties, noise, noise[:, -1], ties[:1, :, :100]):
        assert torch.equal(kernels.argmax_rows(x), x.argmax(-1))


@pytest.mark.parametrize("mixer", ["mamba1", "mamba2"])
def test_triton_decoding_matches_forward_and_plain_greedy(mixer):
    """The model with the Triton kernels (the interpreter on CPU): cached decoding equals the forward,
    and greedy speculative decoding equals plain greedy."""
    kernels.BACKEND = "auto"
    teacher = trained_looking(mil.Model(small_config()))
    check_cached_decoding(mil.hybrid_from_teacher(teacher, attn_layers=(1, 3), mixer=mixer), torch.randint(0, 4096, (2, 32)))
    target, draft = (m.to(DEV) for m in peaked_models(mixer))
    prompt = torch.randint(0, 4096, (1, 5), device=DEV)
    plain, _ = speculative.plain_generate(target, prompt, 6, temperature=0)
    assert torch.equal(speculative.speculative_generate(target, draft, prompt, 6, 2, temperature=0)[0], plain)


def two_token_samples(accept, trials=200_000, v=5, seed=0):
    """Sample the first two tokens by speculative sampling (K=2, then K=1 if the first round gave only
    one token) from table models: target p1 (v,), p2 (v, v) = p(x2 | x1); draft q1, q2 likewise.
    Returns (counts (v, v), expected joint p1[x1] p2[x1, x2])."""
    g = torch.Generator().manual_seed(seed)
    p1, q1 = torch.rand(v, generator=g).softmax(0), torch.rand(v, generator=g).softmax(0)
    p2, q2 = (3 * torch.rand(v, v, generator=g)).softmax(1), (3 * torch.rand(v, v, generator=g)).softmax(1)
    d1 = torch.multinomial(q1.expand(trials, v), 1, generator=g)[:, 0]
    d2 = torch.multinomial(q2[d1], 1, generator=g)[:, 0]
    P = torch.stack([p1.expand(trials, v), p2[d1], p2[d2]], dim=1)  # the bonus row's table does not matter here
    n, nxt = accept(P, torch.stack([q1.expand(trials, v), q2[d1]], 1), torch.stack([d1, d2], 1), 1.0, g)
    x1 = torch.where(n >= 1, d1, nxt)
    e = torch.multinomial(q2[x1], 1, generator=g)[:, 0]  # a second round, K=1, for rows that need it
    m, nxt2 = accept(torch.stack([p2[x1], p2[e]], 1), q2[x1][:, None], e[:, None], 1.0, g)
    x2 = torch.where(n >= 2, d2, torch.where(n == 1, nxt, torch.where(m >= 1, e, nxt2)))
    counts = torch.bincount(x1 * v + x2, minlength=v * v).double()
    return counts, (p1[:, None] * p2).flatten().double() * trials


def chi_square_critical(df, z=3.09):  # Wilson-Hilferty: the p = 0.001 critical value
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_speculative_sampling_keeps_the_target_distribution():
    counts, expected = two_token_samples(speculative.accept_drafts)
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < chi_square_critical(24), chi2


def test_chi_square_catches_a_wrong_acceptance_rule():
    """The companion: resampling from p instead of the residual max(0, p - q) after a rejection is
    the classic mistake; the same test statistic rejects it by a wide margin."""

    def wrong(p, q, drafts, temperature, generator):
        n, _ = speculative.accept_drafts(p, q, drafts, temperature, generator)
        rows = p.gather(1, n[:, None, None].expand(-1, 1, p.shape[-1]))[:, 0]
        return n, torch.multinomial(rows, 1, generator=generator)[:, 0]

    counts, expected = two_token_samples(wrong)
    assert ((counts - expected) ** 2 / expected).sum().item() > 3 * chi_square_critical(24)


# -----------------------------------------------------------------------------------------------
# The pipeline, end to end on a tiny model

TINY = ["--preset=cpu", "--scan=ref", "--n_layer=2", "--d_model=32", "--n_head=2", "--n_kv_head=1", "--block_size=16",
        "--batch_size=4", "--teacher_steps=12", "--eval_every=4", "--eval_windows=4", "--ckpt_every=3", "--log_every=100",
        "--attn_fractions=0.5", "--distill_steps=6", "--ft_steps=3", "--draft_steps=3", "--generations=8", "--warmup=2"]


def test_interrupted_run_resumes_to_the_same_losses(tmp_path):
    """A run killed in the middle of a stage (--stop_after) resumes from its last checkpoint (model,
    optimizer, step, data position, RNG state) and ends with the losses of an uninterrupted run."""
    distill.main(TINY + [f"--out_dir={tmp_path / 'once'}", "--finetune=false"])
    for attempt in range(8):  # each run stops after 5 steps of the stage it is in; the next resumes
        try:
            distill.main(TINY + [f"--out_dir={tmp_path / 'killed'}", "--finetune=false", "--stop_after=5"])
            break
        except SystemExit as stop:
            assert stop.code == 0
    assert attempt >= 3  # the teacher (12 steps) and the student (6) were both interrupted
    for name in ("teacher", "attn50"):
        once, killed = (torch.load(tmp_path / run / f"{name}.pt", weights_only=True) for run in ("once", "killed"))
        assert len(once["log"]) == len(killed["log"]) > 0
        torch.testing.assert_close(torch.tensor(killed["log"]), torch.tensor(once["log"]), rtol=1e-5, atol=1e-6)
        for k in once["model"]:
            torch.testing.assert_close(killed["model"][k], once["model"][k], rtol=1e-5, atol=1e-6)


def test_resume_checkpoint_holds_what_trains_and_refuses_another_stages(tmp_path):
    """A stage's resume checkpoint holds the weights that train (stage 1: the Mamba layers'), not the
    frozen rest; one written for other trainable weights is refused in one line."""
    teacher = trained_looking(mil.Model(small_config())).requires_grad_(False)
    student = mil.hybrid_from_teacher(teacher, attn_layers=(1, 3))
    tokens = torch.randint(0, 4096, (2, 17))
    data = SimpleNamespace(device=torch.device("cpu"), batch=lambda b, gen, pool=None: (tokens[:, :-1], tokens[:, 1:]))
    cfg = dict(distill.DEFAULTS, out_dir=str(tmp_path), batch_size=2, warmup=1, stop_after=2)
    train = lambda which: distill.train("s", student, cfg, data, 4, 1e-3, distill.distill_loss(teacher, cfg),
                                        distill.trainable(student, which), save=False)
    with pytest.raises(SystemExit) as stop:
        train("mamba")
    assert stop.value.code == 0
    saved = torch.load(tmp_path / "s.resume.pt", weights_only=True)["model"]
    assert saved and sorted(saved) == sorted(n for n, p in student.named_parameters() if p.requires_grad)
    assert all(".mixer." in n and int(n.split(".")[1]) in (0, 2) for n in saved)
    with pytest.raises(SystemExit, match="s.resume.pt: holds other weights than this stage trains"):
        train("all")


def torchrun(argv, processes=2):
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                           os.path.join(mil.HERE, "distill.py"), *argv], capture_output=True, text=True, env=env, timeout=300)


def test_data_parallel_trains_what_one_process_trains_and_resumes(tmp_path):
    """torchrun with 2 processes (gloo on the CPU): every rank draws the global batch and trains on its
    half, so the loss logs and weights equal one process's with the same global batch, and a run
    stopped by --stop_after resumes under torchrun. The cpu preset's teacher has dropout 0: masks drawn
    per rank could not match one process's. On the CPU on every machine: two processes on one GPU
    cannot share it under NCCL."""
    cpu = TINY + ["--device=cpu"]
    distill.main(cpu + [f"--out_dir={tmp_path / 'one'}"])
    run = torchrun(cpu + [f"--out_dir={tmp_path / 'two'}"])
    assert run.returncode == 0 and "data-parallel over 2 processes (gloo)" in run.stdout, run.stderr[-2000:]
    for attempt in range(8):  # each run stops after 5 steps of its stage; the next resumes
        run = torchrun(cpu + [f"--out_dir={tmp_path / 'killed'}", "--stop_after=5"])
        assert run.returncode == 0, run.stderr[-2000:]
        if "total" in run.stdout:
            break
    assert attempt >= 3
    for name in ("teacher", "attn50", "attn50_ft", "draft"):
        one = torch.load(tmp_path / "one" / f"{name}.pt", weights_only=True)
        for other in ("two", "killed"):
            two = torch.load(tmp_path / other / f"{name}.pt", weights_only=True)
            torch.testing.assert_close(torch.tensor(two["log"]), torch.tensor(one["log"]), rtol=1e-4, atol=1e-4)
            for k in one["model"]:
                torch.testing.assert_close(two["model"][k], one["model"][k], rtol=1e-4, atol=1e-4)
    with pytest.raises(SystemExit, match="--batch_size=3: takes a multiple of the 2 processes"):
        distill.WORLD = 2
        try:
            distill.resolve(["--preset=cpu", "--batch_size=3"])
        finally:
            distill.WORLD = 1


def test_pipeline_ablations_and_benchmarks_smoke(tmp_path, capsys):
    """The whole of `python distill.py --ablate && python speculative.py`, the context benchmark and
    `python distill.py --bench=train`, at toy sizes: every stage runs and every table is printed."""
    out = f"--out_dir={tmp_path}"  # and --scan=ref everywhere: the interpreter would take minutes here
    distill.main(TINY + [out, "--ablate", "--ablate_steps=2", "--draft_teacher=teacher,attn50"])
    for name in ("teacher", "attn50", "attn50_ft", "draft", "draft_attn50", "results.md", "ablations.md"):
        assert any(p.name.startswith(name) for p in tmp_path.iterdir()), name
    assert not any(p.name.endswith(".resume.pt") for p in tmp_path.iterdir())
    spec = [out, "--preset=cpu", "--scan=ref", "--models=attn50"]
    speculative.main(spec + ["--prompts=2", "--k=2", "--prompt_tokens=8", "--max_new_tokens=6"])
    speculative.main(spec + ["--prompts=1", "--k=2", "--prompt_tokens=8", "--max_new_tokens=6", "--draft=draft_attn50"])
    speculative.main(spec + ["--prompt=HAMLET. To be", "--max_new_tokens=6"])
    with pytest.raises(SystemExit, match="the context"):
        speculative.main(spec + ["--prompt=" + "word " * 40])
    with pytest.raises(SystemExit, match="python distill.py"):
        speculative.main([f"--out_dir={tmp_path / 'none'}", "--preset=cpu", "--scan=ref"])
    speculative.main(spec + ["--bench=context"])
    distill.main(TINY + [out, "--bench=train"])
    text = capsys.readouterr().out
    for heading in ("| model | attention layers | plays: perplexity", "attention init, frozen MLP", "Mamba mixers removed",
                    "| model | 1x | 2x", "G=0", "| model | decoding | K", "| model | attention layers | batch | context",
                    "| scan | ms / step | tokens/s |"):
        assert heading in text, heading


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_a_block_too_short_for_the_chat_requests_is_refused_before_any_work(tmp_path):
    write_gguf(tmp_path / "tiny.gguf", tiny_llama(tie=True), {}, chat_template=CHATML)
    with pytest.raises(SystemExit, match=r"--block_size=32: too short for the teacher's chat requests .*take at least"):
        distill.main([f"--teacher={tmp_path / 'tiny.gguf'}", f"--out_dir={tmp_path / 'run'}", "--preset=cpu",
                      "--block_size=32", "--draft_layers=0", "--attn_fractions=0.5"])
    assert not (tmp_path / "run").exists()


def test_a_pretrained_teacher_on_the_cpu_preset_trains_on_4_rows_of_128_tokens_unless_told(tmp_path):
    write_gguf(tmp_path / "tiny.gguf", tiny_llama(tie=True), {})
    teacher = [f"--teacher={tmp_path / 'tiny.gguf'}", "--preset=cpu"]
    assert [distill.resolve(teacher + more)[k] for more in ([], ["--batch_size=8", "--block_size=64"])
            for k in ("batch_size", "block_size")] == [4, 128, 8, 64]
    assert distill.resolve(["--preset=cpu"])["batch_size"] == 16  # the toy teacher keeps the preset's


def test_pretrained_teacher_pipeline_and_speculative_smoke(tmp_path, capsys):
    """`python distill.py --teacher=PATH` and `python speculative.py --teacher=PATH` on a tiny GGUF chat
    model: no stage 0, the teacher's chat replies among the generations, the chat table, --prompt
    through the chat template. (SmolLM2 itself takes the same path; on 2 CPU cores, over an hour.)"""
    torch.manual_seed(0)
    write_gguf(tmp_path / "tiny.gguf", tiny_llama(tie=True), {"mlp.": Q.Q8_0}, chat_template=CHATML)
    teacher, out = f"--teacher={tmp_path / 'tiny.gguf'}", f"--out_dir={tmp_path / 'run'}"
    argv = [teacher, out, "--preset=cpu", "--scan=ref", "--block_size=96", "--batch_size=2", "--eval_every=4",
            "--eval_windows=4", "--log_every=100", "--attn_fractions=0.5", "--distill_steps=3", "--ft_steps=2",
            "--draft_steps=2", "--generations=8", "--warmup=1", "--mixer=mamba1,mamba2", "--gate_norm_init=0.5"]
    distill.main(argv)
    norm_inits = {n: torch.load(tmp_path / "run" / f"{n}.pt", weights_only=True)["config"]["gate_norm_init"]
                  for n in ("attn50", "attn50_m2")}
    assert norm_inits == {"attn50": 1.0, "attn50_m2": 0.5}  # --gate_norm_init is Mamba-2's alone
    assert not any((tmp_path / "run" / f"{n}.pt").exists() for n in ("teacher",))  # no stage 0
    pool = torch.load(tmp_path / "run" / "generations.pt", weights_only=True)
    tok = mil.load_pretrained(str(tmp_path / "tiny.gguf"))[1]
    assert "<|im_start|>user\nSummarize" in tok.decode(pool.tolist())  # chat requests were answered
    spec = [teacher, out, "--preset=cpu", "--scan=ref", "--models=attn50"]
    speculative.main(spec + ["--prompts=2", "--k=2", "--prompt_tokens=8", "--max_new_tokens=6"])
    speculative.main(spec + ["--prompt=Who wrote Hamlet?", "--max_new_tokens=6"])
    speculative.main(spec + ["--prompts=1", "--k=2", "--prompt_tokens=8", "--max_new_tokens=4", "--mixer=mamba2"])
    distill.main(argv + ["--ablate", "--ablate_steps=2"])  # a rerun: the evaluation is read back, ablations run
    text = capsys.readouterr().out
    assert "| attn50_m2 |" in text and "| attn50_m2 | greedy | 2 |" in text  # both variants in one table
    assert "every stage finished before" in text and "| 50% attention |" in text and "| 0% attention |" not in text
    assert ("a pretrained teacher on a CPU: each step runs it in full" in text) == (not GPU)  # and how to shorten it
    for heading in ("teacher's T=1 text", "| model | What is the capital of France?", "| model | decoding | K", "speculative, K=2"):
        assert heading in text, heading
