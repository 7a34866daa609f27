"""FAVOR+ in Triton: ``torch.ops.performer.triton_favor_forward`` / ``triton_favor_backward``.

The same ops, outputs and math as the compiled C++ kernels (``performer::favor_forward`` /
``favor_backward``, see csrc/cpu/favor_kernel.h): the forward returns ``out`` and the statistics the
backward needs (the final key state [S, z] (B, Hk, m, Ev + 1), each query's normalizer and shift
(B, H, L), each key's shift (B, Hk, S)), and the backward recomputes features from them. Features
are computed in registers and never reach memory; nothing of size L x m, S x m or L x S is stored.

Per (batch, head), with Wc = sqrt(scale) W (m, E) and b the features of that batch element and key
head and their bias (features (m, E), (Hk, m, E) or (B, Hk, m, E); b zero without feature_bias),
u = q Wc^T + b, w = k Wc^T + b - scale |k|^2 / 2. Every
kernel takes the features a block of M_BLOCK at a time (``feature_block``), so any m fits a program;
what needs all of them (the query shift, a maximum over the features) is kept as a running maximum
over the blocks, with what was summed so far rescaled when it grows.
  bidirectional  1. ``_bidir_state_kernel``: rows of [S, z] = phi(K)^T [V, 1] per program: one
                    feature block over a segment of the keys, relative to its own running maximum;
                    the pieces are combined by rescaling to the largest (torch, a few small tensors).
                 2. ``_bidir_out_kernel``: one program per block of queries: phi(Q) [S, z].
  causal         ``_causal_fwd_kernel``: one program per query head walks the sequence in chunks of
                 BLOCK rows: the masked intra-chunk product with weights e^{m_s - m_t} (m_s the
                 running maximum of key logits up to s, a first pass over the feature blocks, so
                 nothing at t depends on later keys) plus phi_q times the state carried from
                 earlier chunks. The state (m x Ev, too large for one program's registers) lives in
                 a float32 workspace in global memory, read and rewritten a block at a time.
  backward       bidirectional: ``_bidir_dq_kernel`` (dq per block of queries),
                 ``_bidir_dstate_kernel`` (per feature block and segment of queries its part of
                 dS, dz, the gradient with respect to the state), then ``_bidir_dkv_kernel`` (dk, dv).
                 causal: ``_causal_dq_kernel`` (a forward sweep that rebuilds the state) and
                 ``_causal_dkv_kernel`` (a reverse sweep carrying the later queries' P, p), both with
                 their state in a workspace as in the forward.
                 Asked for, the gradients with respect to the features and the bias are summed
                 where dq and dk are (dWc += du^T q, dw^T k; db += their column sums), per program
                 and feature block, into float32 buffers with atomic adds.

Precision: float32 inputs use exact float32 products (``input_precision="ieee"``). 16-bit inputs
are read into float32 (features can exceed the float16 range) and multiplied in TF32 (exact for
the 16-bit q, k, v themselves; 10-bit mantissas for the features), accumulated in float32.
float64 is left to the other backends.

Both ops are opaque ``torch.library.custom_op``s with fake kernels, compiled or under the Triton
interpreter (TRITON_INTERPRET=1, for tests on the CPU); torch.compile calls them as they are.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from ..._triton import DEVICES, INTERPRET, REGISTERED, tl, triton, unavailable_reason
from . import opdef
from .reference import QUERY_SHIFT_SPAN, RELU_EPS, min_den

FORWARD = "performer::triton_favor_forward"
BACKWARD = "performer::triton_favor_backward"

# bfloat16 arithmetic is not emulated correctly by the interpreter, so it is offered only compiled.
SUPPORTED_DTYPES: tuple = ((torch.float32, torch.float16) if INTERPRET
                           else (torch.float32, torch.float16, torch.bfloat16))
# Largest head sizes E, Ev. The kernels take the features a block at a time (feature_block), so
# any number of features fits.
MAX_DIM = 256
# Programs per SM the bidirectional passes aim for when they split a sequence into segments.
_PROGRAMS_PER_SM = 2


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n)) if triton is not None else max(16, 1 << max(0, n - 1).bit_length())


def feature_block(E: int, Ev: int, causal: bool) -> int:
    """Features per block: a program holds an (E, block) slice of the features (twice for 16-bit
    inputs) and a (block, Ev) slice of the state at a time, the causal kernels beside q, k, v and
    the chunk's products. Compiled for sm_90 at m = 256, E = 64 or 128 (8 warps), those spill
    0.5-2 KiB per thread with 64 features, 0.2-2 KiB with 32; the bidirectional ones little with 64.
    Under the interpreter 16, so that small tests cross block boundaries."""
    if INTERPRET:
        return 16
    wide = max(_pad(E), _pad(Ev)) > 128
    return (16 if wide else 32) if causal else (32 if wide else 64)


def decline_reason(args) -> Optional[str]:
    """Why the Triton kernels do not take these (validated) arguments, or None."""
    E, Ev = args.q.shape[3], args.v.shape[3]
    if max(E, Ev) > MAX_DIM:
        return f"head sizes up to {MAX_DIM} (got E={E}, Ev={Ev})"
    return opdef.gpu_kernel_reason(args.kernel)


if REGISTERED:
    # Globals a kernel reads must be constexpr.
    NEG_INF = tl.constexpr(float("-inf"))
    _EPS = tl.constexpr(RELU_EPS)
    _SPAN = tl.constexpr(QUERY_SHIFT_SPAN)
    _MIN_DEN = tl.constexpr(min_den(torch.float32))

    @triton.jit
    def _max_combine(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _exp_rel(x, ref):
        """exp(x - ref) elementwise, 0 where ref is -inf (x <= ref everywhere it is used)."""
        ok = ref != NEG_INF
        return tl.exp(tl.where(ok, x - tl.where(ok, ref, 0.0), NEG_INF))

    @triton.jit
    def _log_pos(x):
        return tl.where(x > 0, tl.log(tl.where(x > 0, x, 1.0)), NEG_INF)

    @triton.jit
    def _load_rows(ptr, base, stride_n, stride_d, n0, N, D, BLOCK: tl.constexpr, D_PAD: tl.constexpr):
        """(BLOCK, D_PAD) float32 tile of rows n0.. of one (N, D) matrix; zeros outside."""
        rows = n0 + tl.arange(0, BLOCK)
        cols = tl.arange(0, D_PAD)
        mask = (rows[:, None] < N) & (cols[None, :] < D)
        x = tl.load(ptr + base + rows[:, None].to(tl.int64) * stride_n + cols[None, :] * stride_d, mask=mask, other=0.0)
        return x.to(tl.float32)

    @triton.jit
    def _load_vec(ptr, base, n0, N, BLOCK: tl.constexpr, other):
        rows = n0 + tl.arange(0, BLOCK)
        return tl.load(ptr + base + rows, mask=rows < N, other=other)

    @triton.jit
    def _store_rows(ptr, base, x, n0, N, D, BLOCK: tl.constexpr, D_PAD: tl.constexpr):
        """Rows n0.. of a contiguous (N, D) matrix."""
        rows = n0 + tl.arange(0, BLOCK)
        cols = tl.arange(0, D_PAD)
        mask = (rows[:, None] < N) & (cols[None, :] < D)
        tl.store(ptr + base + rows[:, None].to(tl.int64) * D + cols[None, :], x.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _feature_block(w_ptr, wl_ptr, fb_ptr, f, j0, E, m, E_PAD: tl.constexpr, M_BLOCK: tl.constexpr):
        """Columns j0.. of Wc^T and of its low part (see _project) as (E_PAD, M_BLOCK) float32 tiles,
        and the bias of those features (M_BLOCK,), of feature set f (the features of a batch element
        and key head, see _Launch); zeros outside (E, m). The kernels read them where they use them,
        every iteration (from L2): a copy held across a loop would take shared memory for its whole
        length."""
        e = tl.arange(0, E_PAD)
        j = tl.arange(0, M_BLOCK)
        offs = (f * m + j0) * E + e[:, None] + j[None, :] * E
        mask = (e[:, None] < E) & (j[None, :] < m - j0)
        bias = tl.load(fb_ptr + f * m + j0 + j, mask=j < m - j0, other=0.0)
        return tl.load(w_ptr + offs, mask=mask, other=0.0), tl.load(wl_ptr + offs, mask=mask, other=0.0), bias

    @triton.jit
    def _add_feature_grads(dw_ptr, db_ptr, f, j0, dlogits, x, E, m, E_PAD: tl.constexpr, M_BLOCK: tl.constexpr,
                           PREC: tl.constexpr):
        """The gradient with respect to feature block j0.. of set f from logits x Wc^T + b of these
        rows: dWc += dlogits^T x, db += the column sums (atomically: programs share a feature set)."""
        e = tl.arange(0, E_PAD)
        j = tl.arange(0, M_BLOCK)
        keep = j < m - j0
        tl.atomic_add(dw_ptr + (f * m + j0) * E + j[:, None] * E + e[None, :],
                      tl.dot(tl.trans(dlogits), x, input_precision=PREC), mask=keep[:, None] & (e[None, :] < E))
        tl.atomic_add(db_ptr + f * m + j0 + j, tl.sum(dlogits, 0), mask=keep)

    @triton.jit
    def _load_state(state_ptr, base, m, Ev, M_BLOCK: tl.constexpr, EV_PAD: tl.constexpr):
        """[S, z] from an (m, Ev + 1) float32 matrix (or a block of its rows: base at the block's first,
        m the rows from there on): S (M_BLOCK, EV_PAD) and z (M_BLOCK,)."""
        j = tl.arange(0, M_BLOCK)
        e = tl.arange(0, EV_PAD)
        S = tl.load(state_ptr + base + j[:, None] * (Ev + 1) + e[None, :], mask=(j[:, None] < m) & (e[None, :] < Ev),
                    other=0.0)
        z = tl.load(state_ptr + base + j * (Ev + 1) + Ev, mask=j < m, other=0.0)
        return S, z

    @triton.jit
    def _store_state(state_ptr, base, S, z, m, Ev, M_BLOCK: tl.constexpr, EV_PAD: tl.constexpr):
        j = tl.arange(0, M_BLOCK)
        e = tl.arange(0, EV_PAD)
        tl.store(state_ptr + base + j[:, None] * (Ev + 1) + e[None, :], S, mask=(j[:, None] < m) & (e[None, :] < Ev))
        tl.store(state_ptr + base + j * (Ev + 1) + Ev, z, mask=j < m)

    @triton.jit
    def _project(x, wt, wtl, bias, SPLIT: tl.constexpr, PROJ_PREC: tl.constexpr):
        """x Wc^T + bias. SPLIT (16-bit inputs): Wc^T = wt + wtl, its TF32 part and the rest; x holds
        16-bit values, exact in TF32, so the two TF32 products give x Wc^T to about 2^-21."""
        u = tl.dot(x, wt, input_precision=PROJ_PREC)
        if SPLIT:
            u += tl.dot(x, wtl, input_precision=PROJ_PREC)
        return u + bias[None, :]

    @triton.jit
    def _key_logits(k, wt, wtl, bias, half_c2, m, SOFTMAX: tl.constexpr, SPLIT: tl.constexpr,
                    PROJ_PREC: tl.constexpr, M_BLOCK: tl.constexpr):
        """w = k Wc^T + bias (- scale |k|^2 / 2 for softmax); padded feature columns are -inf (softmax)."""
        w = _project(k, wt, wtl, bias, SPLIT, PROJ_PREC)
        if SOFTMAX:
            w = w - half_c2 * tl.sum(k * k, 1)[:, None]
            w = tl.where(tl.arange(0, M_BLOCK)[None, :] < m, w, NEG_INF)
        return w

    @triton.jit
    def _key_row_max(w, visible, SOFTMAX: tl.constexpr):
        """Per key: max_j w_j (softmax) or 0 (relu); -inf for keys that are not visible."""
        if SOFTMAX:
            r = tl.max(w, 1)
        else:
            r = tl.zeros_like(tl.max(w, 1))
        return tl.where(visible, r, NEG_INF)

    @triton.jit
    def _key_features(w, ref, visible, m, SOFTMAX: tl.constexpr, M_BLOCK: tl.constexpr):
        """phi_k = exp(w - ref) per row (softmax) or relu(w) + eps; zero for hidden keys and padding."""
        keep = visible[:, None] & (tl.arange(0, M_BLOCK)[None, :] < m)
        if SOFTMAX:
            keep = keep & (ref != NEG_INF)[:, None]
            phi = tl.exp(tl.where(keep, w - tl.where(ref != NEG_INF, ref, 0.0)[:, None], NEG_INF))
        else:
            phi = tl.where(keep, tl.maximum(w, 0.0) + _EPS, 0.0)
        return phi

    @triton.jit
    def _query_features(u, shift, m, SOFTMAX: tl.constexpr, M_BLOCK: tl.constexpr):
        keep = tl.arange(0, M_BLOCK)[None, :] < m
        if SOFTMAX:
            return tl.where(keep, tl.exp(u - shift[:, None]), 0.0)
        return tl.where(keep, tl.maximum(u, 0.0) + _EPS, 0.0)

    @triton.jit
    def _shift_step(u, lam, m, best, top, M_BLOCK: tl.constexpr):
        """One feature block of the query shift max(max_j (u_j + lam_j), max_j u_j - span) per row (see
        favor_kernel.h: den >= 1 when the first term wins, and phi_q <= e^span always), as running
        maxima over the blocks: (best, top, shift) with this block."""
        u = tl.where(tl.arange(0, M_BLOCK)[None, :] < m, u, NEG_INF)
        best = tl.maximum(best, tl.max(u + lam, 1))
        top = tl.maximum(top, tl.max(u, 1))
        return best, top, tl.maximum(best, top - _SPAN)

    @triton.jit
    def _causal_weights(ms, BLOCK: tl.constexpr):
        """[t, s] = e^{m_s - m_t} for s <= t (0 above the diagonal and for keys with m_s = -inf). Rows with
        m_t = -inf are zero too: past the sequence's end the backward reads m_t as -inf, and
        e^{m_s - 0} there could overflow (inf times a zero gradient is NaN)."""
        rows = tl.arange(0, BLOCK)
        keep = (rows[:, None] >= rows[None, :]) & (ms != NEG_INF)[None, :] & (ms != NEG_INF)[:, None]
        safe = tl.where(ms != NEG_INF, ms, 0.0)
        return tl.where(keep, tl.exp(tl.where(keep, safe[None, :] - safe[:, None], 0.0)), 0.0)

    @triton.jit
    def _block_and_head(N, BLOCK: tl.constexpr):
        """(first row, head) of a program of a grid of cdiv(N, BLOCK) x heads programs on axis 0 (the
        other axes hold at most 65535), a head's row blocks side by side."""
        blocks = tl.cdiv(N, BLOCK)
        pid = tl.program_id(0)
        return (pid % blocks) * BLOCK, pid // blocks

    @triton.jit
    def _visible(mask_ptr, mask_base, s0, S, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
        rows = s0 + tl.arange(0, BLOCK)
        vis = rows < S
        if HAS_MASK:
            hidden = tl.load(mask_ptr + mask_base + rows, mask=vis, other=1)
            vis = vis & (hidden == 0)
        return vis

    # ---- forward ------------------------------------------------------------------------------

    @triton.jit
    def _bidir_state_kernel(
        k_ptr, v_ptr, w_ptr, wl_ptr, fb_ptr, mask_ptr, part_ptr, pmax_ptr,
        S, E, Ev, m, fsb, fsh, Hk, half_c2, blocks_per_split, n_split,
        skb, skh, sks, ske, svb, svh, svs, sve, smb,
        SOFTMAX: tl.constexpr, HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
        PROJ_PREC: tl.constexpr, BLOCK: tl.constexpr, E_PAD: tl.constexpr, EV_PAD: tl.constexpr,
        M_BLOCK: tl.constexpr,
    ):
        """Rows [j0, j0 + M_BLOCK) of the partial [S, z] of keys [split * blocks_per_split * BLOCK, ...) of
        kv head (b, hk), relative to the maximum of their logits over those keys (written to pmax)."""
        bh = tl.program_id(0)
        split = tl.program_id(1)
        j0 = tl.program_id(2) * M_BLOCK
        b = (bh // Hk).to(tl.int64)
        hk = (bh % Hk).to(tl.int64)
        f = b * fsb + hk * fsh
        acc = tl.zeros((M_BLOCK, EV_PAD), dtype=tl.float32)
        z = tl.zeros((M_BLOCK,), dtype=tl.float32)
        run = tl.max(tl.full((BLOCK,), NEG_INF, tl.float32), 0)
        first = split * blocks_per_split
        last = tl.minimum(first + blocks_per_split, tl.cdiv(S, BLOCK))
        for blk in range(first, last):
            s0 = blk * BLOCK
            wt, wtl, fb = _feature_block(w_ptr, wl_ptr, fb_ptr, f, j0, E, m, E_PAD, M_BLOCK)
            k = _load_rows(k_ptr, b * skb + hk * skh, sks, ske, s0, S, E, BLOCK, E_PAD)
            v = _load_rows(v_ptr, b * svb + hk * svh, svs, sve, s0, S, Ev, BLOCK, EV_PAD)
            visible = _visible(mask_ptr, b * smb, s0, S, HAS_MASK, BLOCK)
            w = _key_logits(k, wt, wtl, fb, half_c2, m - j0, SOFTMAX, SPLIT, PROJ_PREC, M_BLOCK)
            new = tl.maximum(run, tl.max(_key_row_max(w, visible, SOFTMAX), 0))
            alpha = _exp_rel(run, new)
            phi = _key_features(w, tl.zeros((BLOCK,), tl.float32) + new, visible, m - j0, SOFTMAX, M_BLOCK)
            acc = acc * alpha + tl.dot(tl.trans(phi), v, input_precision=PREC)
            z = z * alpha + tl.sum(phi, 0)
            run = new
        out = bh.to(tl.int64) * n_split + split
        _store_state(part_ptr, (out * m + j0) * (Ev + 1), acc, z, m - j0, Ev, M_BLOCK, EV_PAD)
        tl.store(pmax_ptr + out * tl.num_programs(2) + tl.program_id(2), run)

    @triton.jit
    def _bidir_out_kernel(
        q_ptr, w_ptr, wl_ptr, fb_ptr, state_ptr, out_ptr, den_ptr, qs_ptr,
        L, E, Ev, m, fsb, fsh, H, Hk, groups,
        sqb, sqh, sql, sqe,
        SOFTMAX: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr, PROJ_PREC: tl.constexpr,
        BLOCK: tl.constexpr, E_PAD: tl.constexpr, EV_PAD: tl.constexpr, M_BLOCK: tl.constexpr,
    ):
        """out, den and query shifts of queries [pid * BLOCK, ...) of head (b, h) from the final [S, z],
        feature block by feature block. The query shift is a running maximum over the blocks
        (_shift_step), and what is summed so far is rescaled when it grows."""
        t0, bh = _block_and_head(L, BLOCK)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        hk = h // groups
        f = b * fsb + hk * fsh
        base = (b * Hk + hk) * m * (Ev + 1)
        q = _load_rows(q_ptr, b * sqb + h * sqh, sql, sqe, t0, L, E, BLOCK, E_PAD)
        num = tl.zeros((BLOCK, EV_PAD), dtype=tl.float32)
        den = tl.zeros((BLOCK,), dtype=tl.float32)
        shift = tl.zeros((BLOCK,), dtype=tl.float32)
        best = tl.full((BLOCK,), NEG_INF, tl.float32)   # max_j (u_j + log z_j) so far
        top = tl.full((BLOCK,), NEG_INF, tl.float32)    # max_j u_j so far
        for j0 in range(0, m, M_BLOCK):
            wt, wtl, fb = _feature_block(w_ptr, wl_ptr, fb_ptr, f, j0, E, m, E_PAD, M_BLOCK)
            S, z = _load_state(state_ptr, base + j0 * (Ev + 1), m - j0, Ev, M_BLOCK, EV_PAD)
            u = _project(q, wt, wtl, fb, SPLIT, PROJ_PREC)
            if SOFTMAX:
                best, top, new = _shift_step(u, _log_pos(z)[None, :], m - j0, best, top, M_BLOCK)
                alpha = tl.where(j0 > 0, tl.exp(shift - new), 0.0)
                num = num * alpha[:, None]
                den = den * alpha
                shift = new
            phi = _query_features(u, shift, m - j0, SOFTMAX, M_BLOCK)
            num += tl.dot(phi, S, input_precision=PREC)
            den += tl.sum(phi * z[None, :], 1)
        ok = den >= _MIN_DEN
        row = bh.to(tl.int64) * L
        _store_rows(out_ptr, row * Ev, tl.where(ok[:, None], num / tl.where(ok, den, 1.0)[:, None], 0.0), t0, L, Ev,
                    BLOCK, EV_PAD)
        rows = t0 + tl.arange(0, BLOCK)
        tl.store(den_ptr + row + rows, tl.where(ok, den, 0.0), mask=rows < L)
        tl.store(qs_ptr + row + rows, shift, mask=rows < L)

    @triton.jit
    def _causal_key_maxima(k, visible, w_ptr, wl_ptr, fb_ptr, f, half_c2, E, m, m_prev, SOFTMAX: tl.constexpr,
                           SPLIT: tl.constexpr, PROJ_PREC: tl.constexpr, E_PAD: tl.constexpr, BLOCK: tl.constexpr,
                           M_BLOCK: tl.constexpr):
        """The running maximum m_s of the key logits over all features, for the chunk's keys (a
        first pass over the feature blocks; relu: 0), from m_prev, that before the chunk."""
        top = tl.full((BLOCK,), NEG_INF, tl.float32)
        if SOFTMAX:
            for j0 in range(0, m, M_BLOCK):
                wt, wtl, fb = _feature_block(w_ptr, wl_ptr, fb_ptr, f, j0, E, m, E_PAD, M_BLOCK)
                top = tl.maximum(top, tl.max(_key_logits(k, wt, wtl, fb, half_c2, m - j0, SOFTMAX, SPLIT, PROJ_PREC,
                                                         M_BLOCK), 1))
        else:
            top = tl.zeros((BLOCK,), tl.float32)
        return tl.maximum(tl.associative_scan(tl.where(visible, top, NEG_INF), 0, _max_combine), m_prev)

    @triton.jit
    def _carry_state(work_ptr, base, S, z, phik, v, keep, later, m, Ev, PREC: tl.constexpr, M_BLOCK: tl.constexpr,
                     EV_PAD: tl.constexpr):
        """Rewrites a block of the causal state [S, z] (read from base), carried past the chunk: the
        old state times keep plus the chunk's keys, phi_k(s) scaled by later[s], all relative to the
        running maximum at the chunk's end. The barrier: every thread has read the block."""
        scaled = phik * later[:, None]
        tl.debug_barrier()
        _store_state(work_ptr, base, S * keep + tl.dot(tl.trans(scaled), v, input_precision=PREC),
                     z * keep + tl.sum(scaled, 0), m, Ev, M_BLOCK, EV_PAD)

    @triton.jit
    def _causal_fwd_kernel(
        q_ptr, k_ptr, v_ptr, w_ptr, wl_ptr, fb_ptr, mask_ptr, out_ptr, den_ptr, qs_ptr, ks_ptr, work_ptr,
        L, E, Ev, m, fsb, fsh, H, Hk, groups, half_c2,
        sqb, sqh, sql, sqe, skb, skh, sks, ske, svb, svh, svs, sve, smb,
        SOFTMAX: tl.constexpr, HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
        PROJ_PREC: tl.constexpr, BLOCK: tl.constexpr, E_PAD: tl.constexpr, EV_PAD: tl.constexpr,
        M_BLOCK: tl.constexpr,
    ):
        """Causal FAVOR+ of query head (b, h), chunk by chunk. The state [S, z] of the keys before the
        chunk (relative to their running maximum) lives in this program's zeroed (m, Ev + 1) rows of
        work_ptr, read and rewritten a feature block at a time; it is the final state at the end.
        The first head of each kv group also writes the key shifts (running maxima)."""
        bh = tl.program_id(0)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        hk = h // groups
        f = b * fsb + hk * fsh
        key_rows = tl.where((h % groups) == 0, L, 0)   # rows of key shifts this program writes
        work = bh.to(tl.int64) * m * (Ev + 1)
        m_prev = tl.max(tl.full((BLOCK,), NEG_INF, tl.float32), 0)
        rows = tl.arange(0, BLOCK)
        row = bh.to(tl.int64) * L
        krow = (b * Hk + hk) * L
        for t0 in range(0, L, BLOCK):
            k = _load_rows(k_ptr, b * skb + hk * skh, sks, ske, t0, L, E, BLOCK, E_PAD)
            v = _load_rows(v_ptr, b * svb + hk * svh, svs, sve, t0, L, Ev, BLOCK, EV_PAD)
            q = _load_rows(q_ptr, b * sqb + h * sqh, sql, sqe, t0, L, E, BLOCK, E_PAD)
            visible = _visible(mask_ptr, b * smb, t0, L, HAS_MASK, BLOCK)
            ms = _causal_key_maxima(k, visible, w_ptr, wl_ptr, fb_ptr, f, half_c2, E, m, m_prev, SOFTMAX, SPLIT,
                                    PROJ_PREC, E_PAD, BLOCK, M_BLOCK)
            safe_ms = tl.where(ms != NEG_INF, ms, 0.0)
            off = tl.where(ms != NEG_INF, m_prev - safe_ms, NEG_INF)   # log e^{Mprev - m_t}
            m_end = tl.max(ms, 0)
            keep = _exp_rel(m_prev, m_end)                             # the state, to the chunk's end
            later = _exp_rel(ms, tl.zeros_like(ms) + m_end)            # key s, to the chunk's end
            a = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)             # phi_q phi_k^T
            num = tl.zeros((BLOCK, EV_PAD), dtype=tl.float32)          # phi_q S
            den = tl.zeros((BLOCK,), dtype=tl.float32)                 # phi_q z
            shift = tl.zeros((BLOCK,), dtype=tl.float32)
            best = tl.full((BLOCK,), NEG_INF, tl.float32)
            top = tl.full((BLOCK,), NEG_INF, tl.float32)
            for j0 in range(0, m, M_BLOCK):
                wt, wtl, fb = _feature_block(w_ptr, wl_ptr, fb_ptr, f, j0, E, m, E_PAD, M_BLOCK)
                S, z = _load_state(work_ptr, work + j0 * (Ev + 1), m - j0, Ev, M_BLOCK, EV_PAD)
                w = _key_logits(k, wt, wtl, fb, half_c2, m - j0, SOFTMAX, SPLIT, PROJ_PREC, M_BLOCK)
                phik = _key_features(w, ms, visible, m - j0, SOFTMAX, M_BLOCK)
                u = _project(q, wt, wtl, fb, SPLIT, PROJ_PREC)
                if SOFTMAX:
                    # lam_t = max(log z + Mprev - m_t, w_t - m_t): the earlier state and key t itself.
                    from_key = tl.where((visible & (ms != NEG_INF))[:, None], w - safe_ms[:, None], NEG_INF)
                    best, top, new = _shift_step(u, tl.maximum(_log_pos(z)[None, :] + off[:, None], from_key),
                                                 m - j0, best, top, M_BLOCK)
                    alpha = tl.where(j0 > 0, tl.exp(shift - new), 0.0)
                    a = a * alpha[:, None]
                    num = num * alpha[:, None]
                    den = den * alpha
                    shift = new
                phiq = _query_features(u, shift, m - j0, SOFTMAX, M_BLOCK)
                a += tl.dot(phiq, tl.trans(phik), input_precision=PREC)
                num += tl.dot(phiq, S, input_precision=PREC)
                den += tl.sum(phiq * z[None, :], 1)
                _carry_state(work_ptr, work + j0 * (Ev + 1), S, z, phik, v, keep, later, m - j0, Ev, PREC,
                             M_BLOCK, EV_PAD)
            a = a * _causal_weights(ms, BLOCK)
            inter = _exp_rel(m_prev, ms)                                # e^{Mprev - m_t}
            num = tl.dot(a, v, input_precision=PREC) + inter[:, None] * num
            den = tl.sum(a, 1) + inter * den
            ok = den >= _MIN_DEN
            _store_rows(out_ptr, row * Ev, tl.where(ok[:, None], num / tl.where(ok, den, 1.0)[:, None], 0.0), t0, L,
                        Ev, BLOCK, EV_PAD)
            tl.store(den_ptr + row + t0 + rows, tl.where(ok, den, 0.0), mask=t0 + rows < L)
            tl.store(qs_ptr + row + t0 + rows, shift, mask=t0 + rows < L)
            tl.store(ks_ptr + krow + t0 + rows, ms, mask=t0 + rows < key_rows)
            m_prev = m_end
            tl.debug_barrier()   # the next chunk reads the state rows other threads wrote

    # ---- backward -----------------------------------------------------------------------------

    @triton.jit
    def _grad_rows(g_ptr, out_ptr, den_ptr, g_base, sgl, sge, row, t0, L, Ev, BLOCK: tl.constexpr,
                   EV_PAD: tl.constexpr):
        """gq = g / den and beta = (g . out) / den for rows t0.. (zero where den == 0)."""
        g = _load_rows(g_ptr, g_base, sgl, sge, t0, L, Ev, BLOCK, EV_PAD)
        o = _load_rows(out_ptr, row * Ev, Ev, 1, t0, L, Ev, BLOCK, EV_PAD)
        den = _load_vec(den_ptr, row, t0, L, BLOCK, 0.0)
        inv = tl.where(den > 0, 1.0 / tl.where(den > 0, den, 1.0), 0.0)
        return g * inv[:, None], tl.sum(g * o, 1) * inv

    @triton.jit
    def _key_grads(dphi, phi, w, k, wt, half_c2, visible, SOFTMAX: tl.constexpr, PREC: tl.constexpr,
                   PROJ_PREC: tl.constexpr):
        """(dk, dw) from the gradient with respect to phi_k: dw = dphi * dphi/dw, the gradient with
        respect to the logits; dk = dw Wc (- scale k sum_j dw_j)."""
        if SOFTMAX:
            dw = dphi * phi
            return (tl.dot(dw, tl.trans(wt), input_precision=PROJ_PREC) - (2.0 * half_c2) * k * tl.sum(dw, 1)[:, None],
                    dw)
        dw = tl.where(visible[:, None] & (w > 0), dphi, 0.0)
        return tl.dot(dw, tl.trans(wt), input_precision=PROJ_PREC), dw

    @triton.jit
    def _query_grads(dphi, phi, u, wt, SOFTMAX: tl.constexpr, PROJ_PREC: tl.constexpr):
        if SOFTMAX:
            du = dphi * phi
        else:
            du = tl.where(u > 0, dphi, 0.0)
        return tl.dot(du, tl.trans(wt), input_precision=PROJ_PREC), du

    @triton.jit
    def _bidir_dq_kernel(
        q_ptr, g_ptr, out_ptr, den_ptr, qs_ptr, w_ptr, wl_ptr, fb_ptr, state_ptr, dq_ptr, dw_ptr, db_ptr,
        L, E, Ev, m, fsb, fsh, H, Hk, groups,
        sqb, sqh, sql, sqe, sgb, sgh, sgl, sge,
        SOFTMAX: tl.constexpr, FEAT_GRAD: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
        PROJ_PREC: tl.constexpr,
        BLOCK: tl.constexpr, E_PAD: tl.constexpr, EV_PAD: tl.constexpr, M_BLOCK: tl.constexpr,
    ):
        """dq of queries [pid * BLOCK, ...) of head (b, h), summed over the feature blocks."""
        t0, bh = _block_and_head(L, BLOCK)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        hk = h // groups
        f = b * fsb + hk * fsh
        row = bh.to(tl.int64) * L
        base = (b * Hk + hk) * m * (Ev + 1)
        q = _load_rows(q_ptr, b * sqb + h * sqh, sql, sqe, t0, L, E, BLOCK, E_PAD)
        shift = _load_vec(qs_ptr, row, t0, L, BLOCK, 0.0)
        gq, beta = _grad_rows(g_ptr, out_ptr, den_ptr, b * sgb + h * sgh, sgl, sge, row, t0, L, Ev, BLOCK, EV_PAD)
        dq = tl.zeros((BLOCK, E_PAD), dtype=tl.float32)
        for j0 in range(0, m, M_BLOCK):
            wt, wtl, fb = _feature_block(w_ptr, wl_ptr, fb_ptr, f, j0, E, m, E_PAD, M_BLOCK)
            S, z = _load_state(state_ptr, base + j0 * (Ev + 1), m - j0, Ev, M_BLOCK, EV_PAD)
            u = _project(q, wt, wtl, fb, SPLIT, PROJ_PREC)
            phi = _query_features(u, shift, m - j0, SOFTMAX, M_BLOCK)
            dphi = tl.dot(gq, tl.trans(S), input_precision=PREC) - beta[:, None] * z[None, :]
            dq_part, du = _query_grads(dphi, phi, u, wt, SOFTMAX, PROJ_PREC)
            dq += dq_part
            if FEAT_GRAD:
                _add_feature_grads(dw_ptr, db_ptr, f, j0, du, q, E, m, E_PAD, M_BLOCK, PROJ_PREC)
        _store_rows(dq_ptr, row * E, dq, t0, L, E, BLOCK, E_PAD)

    @triton.jit
    def _bidir_dstate_kernel(
        q_ptr, g_ptr, out_ptr, den_ptr, qs_ptr, w_ptr, wl_ptr, fb_ptr, dpart_ptr,
        L, E, Ev, m, fsb, fsh, H, groups, blocks_per_split, n_split,
        sqb, sqh, sql, sqe, sgb, sgh, sgl, sge,
        SOFTMAX: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr, PROJ_PREC: tl.constexpr,
        BLOCK: tl.constexpr, E_PAD: tl.constexpr, EV_PAD: tl.constexpr, M_BLOCK: tl.constexpr,
    ):
        """Rows [j0, j0 + M_BLOCK) of a segment of head (b, h)'s queries' part of [dS, dz], the gradient
        with respect to the state: phi_q^T [gq, -beta]."""
        bh = tl.program_id(0)
        split = tl.program_id(1)
        j0 = tl.program_id(2) * M_BLOCK
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        f = b * fsb + (h // groups) * fsh
        row = bh.to(tl.int64) * L
        dS = tl.zeros((M_BLOCK, EV_PAD), dtype=tl.float32)
        dz = tl.zeros((M_BLOCK,), dtype=tl.float32)
        first = split * blocks_per_split
        last = tl.minimum(first + blocks_per_split, tl.cdiv(L, BLOCK))
        for blk in range(first, last):
            t0 = blk * BLOCK
            wt, wtl, fb = _feature_block(w_ptr, wl_ptr, fb_ptr, f, j0, E, m, E_PAD, M_BLOCK)
            q = _load_rows(q_ptr, b * sqb + h * sqh, sql, sqe, t0, L, E, BLOCK, E_PAD)
            u = _project(q, wt, wtl, fb, SPLIT, PROJ_PREC)
            phi = _query_features(u, _load_vec(qs_ptr, row, t0, L, BLOCK, 0.0), m - j0, SOFTMAX, M_BLOCK)
            gq, beta = _grad_rows(g_ptr, out_ptr, den_ptr, b * sgb + h * sgh, sgl, sge, row, t0, L, Ev, BLOCK, EV_PAD)
            dS += tl.dot(tl.trans(phi), gq, input_precision=PREC)
            dz -= tl.sum(phi * beta[:, None], 0)
        _store_state(dpart_ptr, ((bh.to(tl.int64) * n_split + split) * m + j0) * (Ev + 1), dS, dz, m - j0, Ev,
                     M_BLOCK, EV_PAD)

    @triton.jit
    def _bidir_dkv_kernel(
        k_ptr, v_ptr, w_ptr, wl_ptr, fb_ptr, mask_ptr, dstate_ptr, ks_ptr, dk_ptr, dv_ptr, dw_ptr, db_ptr,
        S, E, Ev, m, fsb, fsh, Hk, half_c2,
        skb, skh, sks, ske, svb, svh, svs, sve, smb,
        SOFTMAX: tl.constexpr, FEAT_GRAD: tl.constexpr, HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
        PROJ_PREC: tl.constexpr, BLOCK: tl.constexpr, E_PAD: tl.constexpr, EV_PAD: tl.constexpr,
        M_BLOCK: tl.constexpr,
    ):
        """dk, dv of keys [pid * BLOCK, ...) of kv head (b, hk) from the complete [dS, dz], summed over
        the feature blocks."""
        s0, bh = _block_and_head(S, BLOCK)
        b = (bh // Hk).to(tl.int64)
        hk = (bh % Hk).to(tl.int64)
        f = b * fsb + hk * fsh
        krow = bh.to(tl.int64) * S
        k = _load_rows(k_ptr, b * skb + hk * skh, sks, ske, s0, S, E, BLOCK, E_PAD)
        v = _load_rows(v_ptr, b * svb + hk * svh, svs, sve, s0, S, Ev, BLOCK, EV_PAD)
        visible = _visible(mask_ptr, b * smb, s0, S, HAS_MASK, BLOCK)
        ref = _load_vec(ks_ptr, krow, s0, S, BLOCK, NEG_INF)
        dk = tl.zeros((BLOCK, E_PAD), dtype=tl.float32)
        dv = tl.zeros((BLOCK, EV_PAD), dtype=tl.float32)
        for j0 in range(0, m, M_BLOCK):
            wt, wtl, fb = _feature_block(w_ptr, wl_ptr, fb_ptr, f, j0, E, m, E_PAD, M_BLOCK)
            dS, dz = _load_state(dstate_ptr, (bh.to(tl.int64) * m + j0) * (Ev + 1), m - j0, Ev, M_BLOCK, EV_PAD)
            w = _key_logits(k, wt, wtl, fb, half_c2, m - j0, SOFTMAX, SPLIT, PROJ_PREC, M_BLOCK)
            phi = _key_features(w, ref, visible, m - j0, SOFTMAX, M_BLOCK)
            dphi = tl.dot(v, tl.trans(dS), input_precision=PREC) + dz[None, :]
            dv += tl.dot(phi, dS, input_precision=PREC)
            dk_part, dw = _key_grads(dphi, phi, w, k, wt, half_c2, visible, SOFTMAX, PREC, PROJ_PREC)
            dk += dk_part
            if FEAT_GRAD:
                _add_feature_grads(dw_ptr, db_ptr, f, j0, dw, k, E, m, E_PAD, M_BLOCK, PROJ_PREC)
        _store_rows(dv_ptr, krow * Ev, dv, s0, S, Ev, BLOCK, EV_PAD)
        _store_rows(dk_ptr, krow * E, dk, s0, S, E, BLOCK, E_PAD)

    @triton.jit
    def _causal_dq_kernel(
        q_ptr, k_ptr, v_ptr, g_ptr, out_ptr, den_ptr, qs_ptr, ks_ptr, w_ptr, wl_ptr, fb_ptr, mask_ptr, dq_ptr, work_ptr,
        dw_ptr, db_ptr, L, E, Ev, m, fsb, fsh, H, Hk, groups, half_c2,
        sqb, sqh, sql, sqe, skb, skh, sks, ske, svb, svh, svs, sve, sgb, sgh, sgl, sge, smb,
        SOFTMAX: tl.constexpr, FEAT_GRAD: tl.constexpr, HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
        PROJ_PREC: tl.constexpr, BLOCK: tl.constexpr, E_PAD: tl.constexpr, EV_PAD: tl.constexpr,
        M_BLOCK: tl.constexpr,
    ):
        """dq of query head (b, h): a forward sweep that rebuilds the state chunk by chunk, in this
        program's zeroed (m, Ev + 1) rows of work_ptr as in _causal_fwd_kernel."""
        bh = tl.program_id(0)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        hk = h // groups
        f = b * fsb + hk * fsh
        row = bh.to(tl.int64) * L
        krow = (b * Hk + hk) * L
        work = bh.to(tl.int64) * m * (Ev + 1)
        m_prev = tl.max(tl.full((BLOCK,), NEG_INF, tl.float32), 0)
        for t0 in range(0, L, BLOCK):
            k = _load_rows(k_ptr, b * skb + hk * skh, sks, ske, t0, L, E, BLOCK, E_PAD)
            v = _load_rows(v_ptr, b * svb + hk * svh, svs, sve, t0, L, Ev, BLOCK, EV_PAD)
            q = _load_rows(q_ptr, b * sqb + h * sqh, sql, sqe, t0, L, E, BLOCK, E_PAD)
            visible = _visible(mask_ptr, b * smb, t0, L, HAS_MASK, BLOCK)
            ms = _load_vec(ks_ptr, krow, t0, L, BLOCK, NEG_INF)
            shift = _load_vec(qs_ptr, row, t0, L, BLOCK, 0.0)
            gq, beta = _grad_rows(g_ptr, out_ptr, den_ptr, b * sgb + h * sgh, sgl, sge, row, t0, L, Ev, BLOCK, EV_PAD)
            inter = _exp_rel(m_prev, ms)
            da = (tl.dot(gq, tl.trans(v), input_precision=PREC) - beta[:, None]) * _causal_weights(ms, BLOCK)
            m_end = tl.maximum(tl.max(ms, 0), m_prev)
            keep = _exp_rel(m_prev, m_end)
            later = _exp_rel(ms, tl.zeros_like(ms) + m_end)
            dq = tl.zeros((BLOCK, E_PAD), dtype=tl.float32)
            for j0 in range(0, m, M_BLOCK):
                wt, wtl, fb = _feature_block(w_ptr, wl_ptr, fb_ptr, f, j0, E, m, E_PAD, M_BLOCK)
                S, z = _load_state(work_ptr, work + j0 * (Ev + 1), m - j0, Ev, M_BLOCK, EV_PAD)
                w = _key_logits(k, wt, wtl, fb, half_c2, m - j0, SOFTMAX, SPLIT, PROJ_PREC, M_BLOCK)
                phik = _key_features(w, ms, visible, m - j0, SOFTMAX, M_BLOCK)
                u = _project(q, wt, wtl, fb, SPLIT, PROJ_PREC)
                phiq = _query_features(u, shift, m - j0, SOFTMAX, M_BLOCK)
                dphi = tl.dot(da, phik, input_precision=PREC) + inter[:, None] * (
                    tl.dot(gq, tl.trans(S), input_precision=PREC) - beta[:, None] * z[None, :])
                dq_part, du = _query_grads(dphi, phiq, u, wt, SOFTMAX, PROJ_PREC)
                dq += dq_part
                if FEAT_GRAD:
                    _add_feature_grads(dw_ptr, db_ptr, f, j0, du, q, E, m, E_PAD, M_BLOCK, PROJ_PREC)
                _carry_state(work_ptr, work + j0 * (Ev + 1), S, z, phik, v, keep, later, m - j0, Ev, PREC,
                             M_BLOCK, EV_PAD)
            _store_rows(dq_ptr, row * E, dq, t0, L, E, BLOCK, E_PAD)
            m_prev = m_end
            tl.debug_barrier()   # the next chunk reads the state rows other threads wrote

    @triton.jit
    def _causal_dkv_kernel(
        q_ptr, k_ptr, v_ptr, g_ptr, out_ptr, den_ptr, qs_ptr, ks_ptr, w_ptr, wl_ptr, fb_ptr, mask_ptr, dk_ptr, dv_ptr,
        work_ptr, dw_ptr, db_ptr, L, E, Ev, m, fsb, fsh, H, Hk, groups, half_c2,
        sqb, sqh, sql, sqe, skb, skh, sks, ske, svb, svh, svs, sve, sgb, sgh, sgl, sge, smb,
        SOFTMAX: tl.constexpr, FEAT_GRAD: tl.constexpr, HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
        PROJ_PREC: tl.constexpr, BLOCK: tl.constexpr, E_PAD: tl.constexpr, EV_PAD: tl.constexpr,
        M_BLOCK: tl.constexpr,
    ):
        """dk, dv of kv head (b, hk): a reverse sweep over chunks carrying [P, p], the sum over later
        queries (of every head in the group) of e^{Mc - m_t} phi_q(t) [gq_t, -beta_t], relative to Mc,
        the running maximum at the end of the chunk in hand; in this program's zeroed (m, Ev + 1)
        rows of work_ptr. Per chunk, a first pass over the feature blocks gives the intra-chunk
        weights phi_q phi_k^T (for dv), a second the rest, block by block."""
        bh = tl.program_id(0)
        b = (bh // Hk).to(tl.int64)
        hk = (bh % Hk).to(tl.int64)
        f = b * fsb + hk * fsh
        krow = bh.to(tl.int64) * L
        work = bh.to(tl.int64) * m * (Ev + 1)
        n_chunks = tl.cdiv(L, BLOCK)
        for i in range(0, n_chunks):
            t0 = (n_chunks - 1 - i) * BLOCK
            k = _load_rows(k_ptr, b * skb + hk * skh, sks, ske, t0, L, E, BLOCK, E_PAD)
            v = _load_rows(v_ptr, b * svb + hk * svh, svs, sve, t0, L, Ev, BLOCK, EV_PAD)
            visible = _visible(mask_ptr, b * smb, t0, L, HAS_MASK, BLOCK)
            ms = _load_vec(ks_ptr, krow, t0, L, BLOCK, NEG_INF)
            # The running maximum before the chunk (-inf for the first) and at its end.
            m_prev = tl.where(t0 > 0, tl.load(ks_ptr + krow + tl.maximum(t0 - 1, 0)), NEG_INF)
            m_end = tl.max(ms, 0)
            causal = _causal_weights(ms, BLOCK)
            later = _exp_rel(ms, tl.zeros_like(ms) + m_end)   # key s, from the chunk's end
            to_prev = _exp_rel(m_prev, ms)       # e^{Mprev - m_t}: this chunk's queries, for earlier keys
            back = _exp_rel(m_prev, m_end)       # [P, p], from the chunk's end to its start
            dv = tl.zeros((BLOCK, EV_PAD), dtype=tl.float32)
            dk = tl.zeros((BLOCK, E_PAD), dtype=tl.float32)
            for j in range(0, groups):           # intra-chunk: dv += a^T gq per query head
                h = hk * groups + j
                row = (b * H + h) * L
                q = _load_rows(q_ptr, b * sqb + h * sqh, sql, sqe, t0, L, E, BLOCK, E_PAD)
                shift = _load_vec(qs_ptr, row, t0, L, BLOCK, 0.0)
                a = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
                for j0 in range(0, m, M_BLOCK):
                    wt, wtl, fb = _feature_block(w_ptr, wl_ptr, fb_ptr, f, j0, E, m, E_PAD, M_BLOCK)
                    phik = _key_features(_key_logits(k, wt, wtl, fb, half_c2, m - j0, SOFTMAX, SPLIT, PROJ_PREC,
                                                     M_BLOCK), ms, visible, m - j0, SOFTMAX, M_BLOCK)
                    phiq = _query_features(_project(q, wt, wtl, fb, SPLIT, PROJ_PREC), shift, m - j0, SOFTMAX, M_BLOCK)
                    a += tl.dot(phiq, tl.trans(phik), input_precision=PREC)
                gq, beta = _grad_rows(g_ptr, out_ptr, den_ptr, b * sgb + h * sgh, sgl, sge, row, t0, L, Ev, BLOCK,
                                      EV_PAD)
                dv += tl.dot(tl.trans(a * causal), gq, input_precision=PREC)
            for j0 in range(0, m, M_BLOCK):
                wt, wtl, fb = _feature_block(w_ptr, wl_ptr, fb_ptr, f, j0, E, m, E_PAD, M_BLOCK)
                P, p = _load_state(work_ptr, work + j0 * (Ev + 1), m - j0, Ev, M_BLOCK, EV_PAD)
                w = _key_logits(k, wt, wtl, fb, half_c2, m - j0, SOFTMAX, SPLIT, PROJ_PREC, M_BLOCK)
                phik = _key_features(w, ms, visible, m - j0, SOFTMAX, M_BLOCK)
                # Later chunks: e^{m_s - Mc} (P v_s + p) and e^{m_s - Mc} P^T phi_k(s).
                dphik = later[:, None] * (tl.dot(v, tl.trans(P), input_precision=PREC) + p[None, :])
                dv += later[:, None] * tl.dot(phik, P, input_precision=PREC)
                P = P * back
                p = p * back
                for j in range(0, groups):
                    h = hk * groups + j
                    row = (b * H + h) * L
                    q = _load_rows(q_ptr, b * sqb + h * sqh, sql, sqe, t0, L, E, BLOCK, E_PAD)
                    phiq = _query_features(_project(q, wt, wtl, fb, SPLIT, PROJ_PREC),
                                           _load_vec(qs_ptr, row, t0, L, BLOCK, 0.0), m - j0, SOFTMAX, M_BLOCK)
                    gq, beta = _grad_rows(g_ptr, out_ptr, den_ptr, b * sgb + h * sgh, sgl, sge, row, t0, L, Ev, BLOCK,
                                          EV_PAD)
                    da = (tl.dot(gq, tl.trans(v), input_precision=PREC) - beta[:, None]) * causal
                    dphik += tl.dot(tl.trans(da), phiq, input_precision=PREC)
                    scaled = phiq * to_prev[:, None]
                    P += tl.dot(tl.trans(scaled), gq, input_precision=PREC)
                    p -= tl.sum(scaled * beta[:, None], 0)
                dk_part, dw = _key_grads(dphik, phik, w, k, wt, half_c2, visible, SOFTMAX, PREC, PROJ_PREC)
                dk += dk_part
                if FEAT_GRAD:
                    _add_feature_grads(dw_ptr, db_ptr, f, j0, dw, k, E, m, E_PAD, M_BLOCK, PROJ_PREC)
                tl.debug_barrier()   # every thread has read this block of [P, p]
                _store_state(work_ptr, work + j0 * (Ev + 1), P, p, m - j0, Ev, M_BLOCK, EV_PAD)
            _store_rows(dv_ptr, krow * Ev, dv, t0, L, Ev, BLOCK, EV_PAD)
            _store_rows(dk_ptr, krow * E, dk, t0, L, E, BLOCK, E_PAD)
            tl.debug_barrier()   # the next chunk reads the rows other threads wrote


# ---- launches -------------------------------------------------------------------------------------

def _strides(t: torch.Tensor) -> tuple:
    return tuple(t.stride())


class _Launch:
    """Sizes, tiles and the common kernel arguments of one call."""

    def __init__(self, q, k, v, features, feature_bias, key_padding_mask, scale, causal, kernel):
        self.B, self.H, self.L, self.E = q.shape
        self.Hk, self.S, self.Ev = k.shape[1], k.shape[2], v.shape[3]
        self.m = features.shape[-2]
        self.groups = self.H // self.Hk
        self.softmax = kernel == "softmax"
        # Feature sets (Bf, Hf, m, E), Bf in {1, B}, Hf in {1, Hk}: batch b, key head hk reads set
        # f = b * fsb + hk * fsh, and its bias (Bf, Hf, m) (zeros without one).
        self.sets = (1,) * (4 - features.dim()) + tuple(features.shape[:-2])
        Bf, Hf = self.sets[-2], self.sets[-1]
        self.fsb, self.fsh = (Hf if Bf > 1 else 0), (1 if Hf > 1 else 0)
        w4 = features.detach().reshape(Bf, Hf, self.m, self.E)
        self.bias = (feature_bias.detach().float().reshape(Bf, Hf, self.m).contiguous() if feature_bias is not None
                     else torch.zeros(Bf, Hf, self.m, dtype=torch.float32, device=q.device))
        wc = (w4.float() * math.sqrt(scale)).contiguous()
        split = q.dtype != torch.float32
        if split:   # Wc = its TF32 part (low 13 mantissa bits cleared) + the rest (see _project)
            hi = (wc.view(torch.int32) & ~0x1FFF).view(torch.float32)
            self.wc, self.wc_lo = hi, wc - hi
        else:
            self.wc, self.wc_lo = wc, wc
        self.half_c2 = 0.5 * scale
        self.mask = (key_padding_mask.to(torch.int8).contiguous() if key_padding_mask is not None
                     else torch.zeros(1, dtype=torch.int8, device=q.device))
        self.mask_stride = self.mask.stride(0) if key_padding_mask is not None else 0
        pads = dict(E_PAD=_pad(self.E), EV_PAD=_pad(self.Ev))
        self.m_block = min(_pad(self.m), feature_block(self.E, self.Ev, causal))
        self.m_blocks = triton.cdiv(self.m, self.m_block)
        # Rows per chunk: 16, the smallest tile of a tensor-core product (registers go to the
        # BLOCK x M_BLOCK feature tiles and, causal, the BLOCK x BLOCK chunk products).
        block = 16
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        self.meta = dict(SOFTMAX=self.softmax, SPLIT=split, PREC=prec, PROJ_PREC=prec, BLOCK=block,
                         M_BLOCK=self.m_block, **pads)
        # Warps by the features x head tile a program holds; causal programs also hold q, k, v and the
        # chunk's products, and take 8. The kernels loop over feature blocks with two pipeline
        # stages: compiled for sm_90 at m = 256, E = 128 or 256, three stages take up to 215 KiB of
        # shared memory, two up to 132 KiB (scripts/triton_sm90.py).
        tile = self.m_block * max(pads["E_PAD"], pads["EV_PAD"])
        self.launch = {} if INTERPRET else dict(num_warps=8 if causal or tile > 64 * 64 else 4, num_stages=2)
        self.device = q.device

    def splits(self, n: int, programs: int) -> tuple[int, int]:
        """(blocks per segment, segments) to split n rows over about _PROGRAMS_PER_SM programs per SM."""
        blocks = triton.cdiv(n, self.meta["BLOCK"])
        if INTERPRET or self.device.type != "cuda":
            want = 2
        else:
            want = torch.cuda.get_device_properties(self.device).multi_processor_count * _PROGRAMS_PER_SM
        per = triton.cdiv(blocks, max(1, min(blocks, triton.cdiv(want, max(programs, 1)))))
        return per, triton.cdiv(blocks, per)

    def run(self, kernel, grid, *args, **meta):
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            kernel[grid](*args, **{**self.meta, **meta}, **self.launch)


def _forward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, features: torch.Tensor,
                  feature_bias: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor], scale: float,
                  causal: bool, kernel: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    opdef.check_forward(q, k, v, features, key_padding_mask, causal, kernel, "triton_favor_forward",
                        SUPPORTED_DTYPES, feature_bias)
    x = _Launch(q, k, v, features, feature_bias, key_padding_mask, scale, causal, kernel)
    B, H, L, Hk, S, Ev, m = x.B, x.H, x.L, x.Hk, x.S, x.Ev, x.m
    f32 = dict(dtype=torch.float32, device=q.device)
    out = torch.empty(B, H, L, Ev, dtype=q.dtype, device=q.device)
    den = torch.empty(B, H, L, **f32)
    qshift = torch.empty(B, H, L, **f32)
    kshift = torch.empty(B, Hk, S, **f32)
    state = torch.zeros(B, Hk, m, Ev + 1, **f32)
    w = (x.wc, x.wc_lo, x.bias)
    if causal:
        if L > 0:
            work = torch.zeros(B, Hk, x.groups, m, Ev + 1, **f32)   # each query head's [S, z]
            x.run(_causal_fwd_kernel, (B * H,), q, k, v, *w, x.mask, out, den, qshift, kshift, work,
                  L, x.E, Ev, m, x.fsb, x.fsh, H, Hk, x.groups, x.half_c2, *_strides(q), *_strides(k), *_strides(v),
                  x.mask_stride, HAS_MASK=key_padding_mask is not None)
            state = work[:, :, 0].contiguous()
        return out, state, den, qshift, kshift
    if S > 0:
        per, n_split = x.splits(S, B * Hk * x.m_blocks)
        part = torch.empty(B * Hk, n_split, m, Ev + 1, **f32)
        pmax = torch.empty(B * Hk, n_split, x.m_blocks, **f32)
        x.run(_bidir_state_kernel, (B * Hk, n_split, x.m_blocks), k, v, *w, x.mask, part, pmax,
              S, x.E, Ev, m, x.fsb, x.fsh, Hk, x.half_c2, per, n_split, *_strides(k), *_strides(v), x.mask_stride,
              HAS_MASK=key_padding_mask is not None)
        # Each (segment, feature block) relative to its own maximum: rescaled to the largest, summed.
        top = pmax.amax(dim=(1, 2), keepdim=True)
        finite = top != float("-inf")
        factor = torch.where(finite, torch.exp(pmax - torch.where(finite, top, 0.0)), 0.0)
        factor = factor.repeat_interleave(x.m_block, dim=2)[..., :m]
        state = (part * factor[..., None]).sum(dim=1).view(B, Hk, m, Ev + 1)
        kshift = top.view(B, Hk, 1).expand(B, Hk, S).contiguous()
    if L > 0:
        x.run(_bidir_out_kernel, (triton.cdiv(L, x.meta["BLOCK"]) * B * H,), q, *w, state, out, den, qshift,
              L, x.E, Ev, m, x.fsb, x.fsh, H, Hk, x.groups, *_strides(q))
    return out, state, den, qshift, kshift


def _backward_impl(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, features: torch.Tensor,
                   feature_bias: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor], out: torch.Tensor,
                   state: torch.Tensor, den: torch.Tensor, query_shift: torch.Tensor, key_shift: torch.Tensor,
                   scale: float, causal: bool, kernel: str, features_grad: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv, and with features_grad the gradients with respect to features and feature_bias
    (empty tensors otherwise, and for the bias when there is none): float32 sums of dlogits^T x and
    dlogits over every row, of the scaled features Wc = sqrt(scale) W, then times sqrt(scale)."""
    x = _Launch(q, k, v, features, feature_bias, key_padding_mask, scale, causal, kernel)
    B, H, L, E, Hk, S, Ev, m = x.B, x.H, x.L, x.E, x.Hk, x.S, x.Ev, x.m
    new = torch.zeros if L == 0 or S == 0 else torch.empty
    dq = new(B, H, L, E, dtype=q.dtype, device=q.device)
    dk = new(B, Hk, S, E, dtype=q.dtype, device=q.device)
    dv = new(B, Hk, S, Ev, dtype=q.dtype, device=q.device)
    f32 = dict(dtype=torch.float32, device=q.device)
    dwc = torch.zeros(*x.sets, m, E, **f32) if features_grad else torch.zeros(1, **f32)
    dbias = torch.zeros(*x.sets, m, **f32) if features_grad else torch.zeros(1, **f32)

    def result():
        if not features_grad:
            return dq, dk, dv, features.new_empty(0), features.new_empty(0)
        dw = (dwc * math.sqrt(scale)).view(features.shape).to(features.dtype)
        db = (dbias.view(feature_bias.shape).to(feature_bias.dtype) if feature_bias is not None
              else features.new_empty(0))
        return dq, dk, dv, dw, db

    if L == 0 or S == 0:
        return result()
    has_mask = key_padding_mask is not None
    w = (x.wc, x.wc_lo, x.bias)
    # The kernels read the saved statistics as contiguous rows (as the forward wrote them; the op
    # may also be called with views).
    out, state, den, query_shift, key_shift = (t.contiguous() for t in (out, state, den, query_shift, key_shift))
    if causal:
        common = (dwc, dbias, L, E, Ev, m, x.fsb, x.fsh, H, Hk, x.groups, x.half_c2, *_strides(q), *_strides(k),
                  *_strides(v), *_strides(grad_out), x.mask_stride)
        x.run(_causal_dq_kernel, (B * H,), q, k, v, grad_out, out, den, query_shift, key_shift, *w, x.mask,
              dq, torch.zeros(B * H, m, Ev + 1, **f32), *common, HAS_MASK=has_mask, FEAT_GRAD=features_grad)
        x.run(_causal_dkv_kernel, (B * Hk,), q, k, v, grad_out, out, den, query_shift, key_shift, *w, x.mask,
              dk, dv, torch.zeros(B * Hk, m, Ev + 1, **f32), *common, HAS_MASK=has_mask, FEAT_GRAD=features_grad)
        return result()
    x.run(_bidir_dq_kernel, (triton.cdiv(L, x.meta["BLOCK"]) * B * H,), q, grad_out, out, den, query_shift, *w,
          state, dq, dwc, dbias, L, E, Ev, m, x.fsb, x.fsh, H, Hk, x.groups, *_strides(q), *_strides(grad_out),
          FEAT_GRAD=features_grad)
    per, n_split = x.splits(L, B * H * x.m_blocks)
    dpart = torch.empty(B * H, n_split, m, Ev + 1, **f32)
    x.run(_bidir_dstate_kernel, (B * H, n_split, x.m_blocks), q, grad_out, out, den, query_shift, *w,
          dpart, L, E, Ev, m, x.fsb, x.fsh, H, x.groups, per, n_split, *_strides(q), *_strides(grad_out))
    dstate = dpart.view(B, Hk, x.groups * n_split, m, Ev + 1).sum(dim=2)
    x.run(_bidir_dkv_kernel, (triton.cdiv(S, x.meta["BLOCK"]) * B * Hk,), k, v, *w, x.mask, dstate,
          key_shift, dk, dv, dwc, dbias,
          S, E, Ev, m, x.fsb, x.fsh, Hk, x.half_c2, *_strides(k), *_strides(v), x.mask_stride, HAS_MASK=has_mask,
          FEAT_GRAD=features_grad)
    return result()


if REGISTERED:
    # Opaque custom ops, compiled or interpreted: torch.compile calls them as they are (a
    # triton_op with several outputs, some saved for the backward, trips the partitioner of
    # torch 2.11's AOTAutograd).
    forward_op = torch.library.custom_op(FORWARD, mutates_args=())(_forward_impl)
    backward_op = torch.library.custom_op(BACKWARD, mutates_args=())(_backward_impl)
    forward_op.register_fake(opdef.forward_fake)
    backward_op.register_fake(opdef.backward_fake)
    opdef.register_autograd(forward_op, torch.ops.performer.triton_favor_backward.default)


def favor_triton(args) -> torch.Tensor:
    out, *_ = torch.ops.performer.triton_favor_forward(
        args.q, args.k, args.v, args.features, args.feature_bias, args.key_padding_mask, args.scale, args.causal,
        args.kernel)
    return out
