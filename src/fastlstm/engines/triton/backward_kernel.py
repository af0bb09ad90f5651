"""The backward kernel: BPTT, a persistent program owning the ``weight_hh`` columns of its ``HB``
hidden units for ``BB`` batch rows of one direction (see :mod:`fastlstm.engines.triton`)."""

import triton
import triton.language as tl

from .arguments import SHARED_CONSTANTS, Argument, kernel
from .helpers import (
    activate, activation_grad, combined_sums, lengths_of, live, product, publish_sums, rows_at, runs, step_finishes,
    step_range, sync, time_index,
)


@triton.jit
def gate_rows(k0, H, H_PAD: tl.constexpr, K_CHUNK: tl.constexpr):
    """Entries ``[k0, k0 + K_CHUNK)`` of the gate axis padded per gate to ``H_PAD``: their rows of a
    ``4H`` axis, and which are real."""
    o_r = k0 + tl.arange(0, K_CHUNK)
    r_unit = o_r % H_PAD
    return ((o_r // H_PAD) * H + r_unit).to(tl.int64), r_unit < H


@triton.jit
def weight_column_chunk(w, o_q, m_q, k0, H, P, H_PAD: tl.constexpr, K_CHUNK: tl.constexpr, AS_A: tl.constexpr):
    """Rows (gate axis) ``[k0, k0 + K_CHUNK)`` of the owned columns ``o_q`` of ``weight_hh [4H, P]``:
    the product's B operand ``[K, PB]``, or transposed, its A operand ``[PB, K]``."""
    rows, m_r = gate_rows(k0, H, H_PAD, K_CHUNK)
    if AS_A:
        chunk = tl.load(w + rows[None, :] * P + o_q[:, None], mask=m_q[:, None] & m_r[None, :], other=0.0)
    else:
        chunk = tl.load(w + rows[:, None] * P + o_q[None, :], mask=m_r[:, None] & m_q[None, :], other=0.0)
    return chunk


@triton.jit
def dh_from_dgates(dgates, w_dir, b_w, s, T, B, i_d, offsets, b_len, o_b64, m_b, o_q, m_q, H, P,
                    D: tl.constexpr, G: tl.constexpr, H_PAD: tl.constexpr, PB: tl.constexpr, BB: tl.constexpr,
                    K_CHUNK: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, W_AS_A: tl.constexpr,
                    DOT_IN_FP32: tl.constexpr, VARLEN: tl.constexpr):
    """``dgates_t W_hh`` for the owned rows and units of h, ``t`` the backward's ``s``-th step:
    ``[BB, 4H] x [4H, PB]`` (or its transpose, ``W_hh^T`` as the A operand), over K chunks of the
    gate axis; with one chunk the weight slice ``b_w`` is the one loaded before the time loop.
    Rows past a sequence's end are masked. Returns ``[BB, PB]``."""
    t = time_index(T - 1 - s, T, i_d)
    base = dgates + i_d.to(tl.int64) * G + rows_at(offsets, t, B, o_b64, VARLEN) * (D * G)
    m_b = live(m_b, t, b_len, VARLEN)
    if W_AS_A:
        acc = tl.zeros((PB, BB), dtype=ACC)
    else:
        acc = tl.zeros((BB, PB), dtype=ACC)
    for k0 in range(0, 4 * H_PAD, K_CHUNK):
        rows, m_r = gate_rows(k0, H, H_PAD, K_CHUNK)
        if K_CHUNK == 4 * H_PAD:
            w_chunk = b_w
        else:
            w_chunk = weight_column_chunk(w_dir, o_q, m_q, k0, H, P, H_PAD, K_CHUNK, W_AS_A)
        if W_AS_A:
            b_dg = tl.load(base[None, :] + rows[:, None], mask=m_r[:, None] & m_b[None, :], other=0.0,
                           cache_modifier=".cg")
            acc += product(w_chunk, b_dg, PRECISION, ACC, DOT_IN_FP32)
        else:
            b_dg = tl.load(base[:, None] + rows[None, :], mask=m_b[:, None] & m_r[None, :], other=0.0,
                           cache_modifier=".cg")
            acc += product(b_dg, w_chunk, PRECISION, ACC, DOT_IN_FP32)
    if W_AS_A:
        acc = tl.trans(acc)
    return acc


# Per-row tensors are the layout's rows [N, .] (fastlstm.packing); masks [D, T, B, .] in its sorted
# batch order; NB batch blocks.
BACKWARD = [
    Argument("dy", "storage", "[N, D*P]"),
    Argument("dh_state", "acc", "[D, B, P] dh_n in, dh_0 out"),
    Argument("dc_state", "acc", "[D, B, H] dc_n in, dc_0 out"),
    Argument("w_hh", "storage", "[D, 4H, P]"),
    Argument("peephole", "acc", "[D, 3H]"),
    Argument("lengths", "i64", "[B] (VARLEN)"),
    Argument("offsets", "i64", "[T] (VARLEN)"),
    Argument("rec_mask", "acc", "[D, B, P]"),
    Argument("zh_mask", "acc", "[D, T, B, P]"),
    Argument("zc_mask", "acc", "[D, T, B, H]"),
    Argument("gates", "storage", "[N, D*4H] saved activations"),
    Argument("c_fresh", "acc", "[N, D*H]"),
    Argument("c_carried", "acc", "[N, D*H] (zoneout on c only)"),
    Argument("c0", "acc", "[D, B, H]"),
    Argument("clip_in", "i8", "[N, D*4H]"),
    Argument("cell_clip_in", "i8", "[N, D*H]"),
    Argument("ln_hh", "acc", "[D, 4H] layer-norm weights (LAYER_NORM)"),
    Argument("ln_cell_w", "acc", "[D, H]"),
    Argument("ln_cell_b", "acc", "[D, H]"),
    Argument("hh_hat", "acc", "[N, D*4H] saved normalised h_{t-1} W_hh^T"),
    Argument("ln_rows", "acc", "[N, D*3] saved rstd of h_{t-1} W_hh^T, mean and rstd of c_t"),
    Argument("ln_stats", "acc", "[2, D, B, LN_SLOTS, 2] the programs' row sums, exchanged"),
    Argument("da_out", "acc", "[N, D*4H] out (LAYER_NORM): d loss / d a_t, the input gates' gradient"),
    Argument("dln", "acc", "[NB, D, 6H] out: the gradients of LN(h W_hh^T)'s weight (4H) and LN(c_t)'s (H, H)"),
    Argument("dgates", "storage", "[N, D*4H] out: d loss / d (h_{t-1} W_hh^T), which is d loss / d a_t without layer norm"),
    Argument("dpeep", "acc", "[NB, D, 3H] out: the peephole gradient summed over this batch block's rows"),
    Argument("w_hr", "storage", "[D, P, H] the projection (PROJ)"),
    Argument("proj_clip_in", "i8", "[N, D*P]"),
    Argument("dhp_out", "storage", "[N, D*P] out: d loss / d (m_t W_hr^T), exchanged between the programs (PROJ)"),
    Argument("counters", "i32", "[D, NB]"),
    Argument("error", "i32", "[1]"),
    Argument("T", "int"), Argument("B", "int"), Argument("step_begin", "int"), Argument("step_end", "int"),
    Argument("finish", "int"), Argument("phase", "int"),
    Argument("z_h", "float"), Argument("z_c", "float"),
    *SHARED_CONSTANTS,
]


@kernel(BACKWARD)
def backward_kernel(ARGUMENTS):
    """Backward steps ``[step_begin, step_end)``, counted from the last processed step
    (docs/equations.md section 10). Each step has two parts: first ``dh`` receives
    ``dgates W_hh`` of the step before (every program's slice of it, published before the
    barrier), then the owned slice of this step's ``dgates`` is computed and published.
    ``finish`` runs the last product, which gives ``dh_0``; one launch per step passes it to an
    extra, empty launch, so that a launch boundary separates the parts. Steps past the end of
    every sequence of the batch block are skipped.

    With ``PROJ``, ``dm_t = d(m_t W_hr^T) W_hr`` needs every program's units of h: a phase
    publishes them. With ``LAYER_NORM`` the backward of ``LN(c_t)`` and of ``LN(h_{t-1} W_hh^T)``
    each need two sums over a whole row: each is a phase that publishes the program's share.
    Every phase ends at the group's barrier (``phase`` as in the forward kernel). Arguments:
    :data:`BACKWARD`."""
    i_h, i_b, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    G: tl.constexpr = 4 * H
    o_j = i_h * HB + tl.arange(0, HB)  # hidden (cell) units owned
    o_q = i_h * PB + tl.arange(0, PB)  # units of h owned (the same without projection)
    o_b = i_b * BB + tl.arange(0, BB)
    m_j, m_q, m_b = o_j < H, o_q < P, o_b < B
    m_bj = m_b[:, None] & m_j[None, :]
    m_bq = m_b[:, None] & m_q[None, :]
    o_b64 = o_b.to(tl.int64)
    d64 = i_d.to(tl.int64)

    # weight_hh columns of the owned units of h (the gate axis padded per gate to H_PAD): the
    # product's B operand [4H, PB], or transposed, its A operand [PB, 4H]; loaded once when it is
    # one K chunk, else streamed from L2 each step
    w_dir = w_hh + d64 * G * P
    if K_CHUNK == 4 * H_PAD:
        b_w = weight_column_chunk(w_dir, o_q, m_q, 0, H, P, H_PAD, K_CHUNK, W_AS_A)
    else:
        b_w = 0.0  # unused

    if PEEPHOLE:
        p_peep = peephole + i_d * 3 * H + o_j
        b_pi = tl.load(p_peep, mask=m_j, other=0.0)[None, :]
        b_pf = tl.load(p_peep + H, mask=m_j, other=0.0)[None, :]
        b_po = tl.load(p_peep + 2 * H, mask=m_j, other=0.0)[None, :]
        d_pi = tl.zeros((HB,), dtype=ACC)
        d_pf = tl.zeros((HB,), dtype=ACC)
        d_po = tl.zeros((HB,), dtype=ACC)
    if HAS_REC_MASK:
        b_rec = tl.load(rec_mask + (d64 * B + o_b64[:, None]) * P + o_q[None, :], mask=m_bq, other=0.0).to(ACC)
    b_len = lengths_of(lengths, o_b, m_b, BB, VARLEN)

    # barriers (phases) per step: the projection's exchange, layer norm's two, then dgates'
    BARRIERS: tl.constexpr = 1 + (2 if LAYER_NORM else 0) + (1 if PROJ else 0)
    PH_LN_CELL: tl.constexpr = 1 if PROJ else 0
    PH_LN_GATES: tl.constexpr = PH_LN_CELL + 1
    if LAYER_NORM:
        p_gate_w = ln_hh + d64 * G + o_j
        b_gi = tl.load(p_gate_w, mask=m_j, other=0.0)[None, :]
        b_gf = tl.load(p_gate_w + H, mask=m_j, other=0.0)[None, :]
        b_gg = tl.load(p_gate_w + 2 * H, mask=m_j, other=0.0)[None, :]
        b_go = tl.load(p_gate_w + 3 * H, mask=m_j, other=0.0)[None, :]
        b_ln_cw = tl.load(ln_cell_w + d64 * H + o_j, mask=m_j, other=0.0)[None, :]
        b_ln_cb = tl.load(ln_cell_b + d64 * H + o_j, mask=m_j, other=0.0)[None, :]
        d_gi = tl.zeros((HB,), dtype=ACC)
        d_gf = tl.zeros((HB,), dtype=ACC)
        d_gg = tl.zeros((HB,), dtype=ACC)
        d_go = tl.zeros((HB,), dtype=ACC)
        d_cw = tl.zeros((HB,), dtype=ACC)
        d_cb = tl.zeros((HB,), dtype=ACC)
        p_ln_gates = ln_stats + ((0 * D + d64) * B + o_b64) * LN_SLOTS * 2  # [BB]
        p_ln_cell = ln_stats + ((1 * D + d64) * B + o_b64) * LN_SLOTS * 2

    p_state = (d64 * B + o_b64[:, None]) * H + o_j[None, :]
    p_hstate = (d64 * B + o_b64[:, None]) * P + o_q[None, :]  # [BB, PB] in a [D, B, P] tensor
    b_dh = tl.load(dh_state + p_hstate, mask=m_bq, other=0.0)
    b_dc = tl.load(dc_state + p_state, mask=m_bj, other=0.0)
    b_c0 = tl.load(c0 + p_state, mask=m_bj, other=0.0)
    p_counter = counters + i_d * tl.num_programs(1) + i_b
    n_group = tl.num_programs(0)

    lo, hi = step_range(lengths, o_b, m_b, T, i_d, 0, VARLEN)
    s_lo = tl.maximum(step_begin, lo)
    # num_stages=1: a step's loads of dgates must not be prefetched before the step that writes it
    for s in tl.range(s_lo, tl.minimum(step_end, hi), num_stages=1):
        # a launch that runs an earlier phase of the step only stores nothing of its results
        finishes = step_finishes(phase, BARRIERS)
        dh_carried, dc_carried = b_dh, b_dc
        if s > lo:
            dh_in = dh_from_dgates(dgates, w_dir, b_w, s - 1, T, B, i_d, offsets, b_len, o_b64, m_b, o_q, m_q, H,
                                    P, D, G, H_PAD, PB, BB, K_CHUNK, PRECISION, ACC, W_AS_A, DOT_IN_FP32, VARLEN)
            if HAS_REC_MASK:
                dh_in = dh_in * b_rec
            b_dh += dh_in

        s_fwd = T - 1 - s  # the forward pass's step index
        t = time_index(s_fwd, T, i_d)
        t64 = t.to(tl.int64)
        t_prev = tl.where(i_d == 1, t + 1, t - 1)  # the step processed before t
        r64 = rows_at(offsets, t, B, o_b64, VARLEN)
        # t_prev is -1 or T at a direction's first step, where nothing is read from it
        r_prev = rows_at(offsets, tl.minimum(tl.maximum(t_prev, 0), T - 1), B, o_b64, VARLEN)
        m_live = live(m_b, t, b_len, VARLEN)
        m_rj = m_live[:, None] & m_j[None, :]
        m_rq = m_live[:, None] & m_q[None, :]
        row = r64[:, None] * (D * G) + d64 * G + o_j[None, :]
        p_state_t = r64[:, None] * (D * H) + d64 * H + o_j[None, :]
        p_state_prev = r_prev[:, None] * (D * H) + d64 * H + o_j[None, :]
        p_out_t = r64[:, None] * (D * P) + d64 * P + o_q[None, :]

        dh_total = b_dh + tl.load(dy + p_out_t, mask=m_rq, other=0.0).to(ACC)
        if ZONEOUT_H == 1:
            keep_h = tl.load(zh_mask + ((d64 * T + t64) * B + o_b64[:, None]) * P + o_q[None, :], mask=m_bq,
                             other=0.0).to(ACC)
            dh_fresh, dh_kept = (1.0 - keep_h) * dh_total, keep_h * dh_total
        elif ZONEOUT_H == 2:
            dh_fresh, dh_kept = (1.0 - z_h) * dh_total, z_h * dh_total
        else:
            dh_fresh, dh_kept = dh_total, tl.zeros_like(dh_total)
        if ZONEOUT_C == 1:
            keep_c = tl.load(zc_mask + ((d64 * T + t64) * B + o_b64[:, None]) * H + o_j[None, :], mask=m_bj,
                             other=0.0).to(ACC)
            dc_fresh, dc_kept = (1.0 - keep_c) * b_dc, keep_c * b_dc
        elif ZONEOUT_C == 2:
            dc_fresh, dc_kept = (1.0 - z_c) * b_dc, z_c * b_dc
        else:
            dc_fresh = b_dc
        if PROJ:  # h_t = clip(m_t W_hr^T): dm_t = d(m_t W_hr^T) W_hr, over every program's units of h
            d_proj = dh_fresh
            if HAS_PROJ_CLIP:
                d_proj = tl.where(tl.load(proj_clip_in + p_out_t, mask=m_rq, other=0) != 0, d_proj, 0.0)
            if VARLEN:  # past a sequence's end h_t was frozen: no gradient to the projection
                d_proj = tl.where((t < b_len)[:, None], d_proj, 0.0)
            tl.store(dhp_out + p_out_t, d_proj.to(dhp_out.dtype.element_ty),
                     mask=tl.where(runs(phase, 0), m_rq, False))
            sync(p_counter, ((s - s_lo) * BARRIERS + 1) * n_group, error, USE_BARRIER)
            p_dproj = dhp_out + r64 * (D * P) + d64 * P  # [BB]
            dh_fresh = tl.zeros((BB, HB), dtype=ACC)  # now d loss / d m_t
            for k0 in range(0, P_PAD, PROJ_K):
                o_k = k0 + tl.arange(0, PROJ_K)
                m_k = o_k < P
                d_chunk = tl.load(p_dproj[:, None] + o_k[None, :], mask=m_live[:, None] & m_k[None, :], other=0.0,
                                  cache_modifier=".cg")  # [BB, PROJ_K]
                w_chunk = tl.load(w_hr + d64 * P * H + o_k[:, None].to(tl.int64) * H + o_j[None, :],
                                  mask=m_k[:, None] & m_j[None, :], other=0.0)  # [PROJ_K, HB]
                dh_fresh += product(d_chunk, w_chunk, PRECISION, ACC, DOT_IN_FP32)

        gate_i = tl.load(gates + row, mask=m_rj, other=0.0).to(ACC)
        gate_f = tl.load(gates + row + H, mask=m_rj, other=0.0).to(ACC)
        gate_g = tl.load(gates + row + 2 * H, mask=m_rj, other=0.0).to(ACC)
        gate_o = tl.load(gates + row + 3 * H, mask=m_rj, other=0.0).to(ACC)
        b_cf = tl.load(c_fresh + p_state_t, mask=m_rj, other=0.0)
        # c_{t-1}: the carried state after the step processed before t, or c_0
        # (the reverse direction's first real step follows steps past its end, which left c_0 in place)
        prev_real = m_bj & (tl.full((BB, HB), s_fwd, tl.int32) > 0)
        if VARLEN:
            prev_real = prev_real & (t_prev < b_len)[:, None]
        if ZONEOUT_C != 0:
            c_prev = tl.load(c_carried + p_state_prev, mask=prev_real, other=0.0)
        else:
            c_prev = tl.load(c_fresh + p_state_prev, mask=prev_real, other=0.0)
        c_prev = tl.where(prev_real, c_prev, b_c0)

        if LAYER_NORM:
            p_rows = ln_rows + r64 * (D * 3) + d64 * 3
            m_live = live(m_b, t, b_len, VARLEN)
            rstd_h = tl.load(p_rows, mask=m_live, other=0.0)[:, None]
            mean_c = tl.load(p_rows + 1, mask=m_live, other=0.0)[:, None]
            rstd_c = tl.load(p_rows + 2, mask=m_live, other=0.0)[:, None]
            c_hat = tl.where(m_rj, (b_cf - mean_c) * rstd_c, 0.0)
            cell_out = activate(c_hat * b_ln_cw + b_ln_cb, ACT_OUT)
        else:
            cell_out = activate(b_cf, ACT_OUT)
        da_o = dh_fresh * cell_out * activation_grad(gate_o, ACT_GATE)
        d_cell = dh_fresh * gate_o * activation_grad(cell_out, ACT_OUT)  # d loss / d (the cell's output)
        if LAYER_NORM:  # back through LN(c_t): two sums over the row's H units
            d_cell = tl.where(m_rj, d_cell, 0.0)
            if VARLEN:  # rows past a sequence's end add nothing
                d_cell = tl.where((t < b_len)[:, None], d_cell, 0.0)
            d_cw += tl.where(finishes, tl.sum(d_cell * c_hat, axis=0), 0.0)
            d_cb += tl.where(finishes, tl.sum(d_cell, axis=0), 0.0)
            d_hat = d_cell * b_ln_cw
            publish_sums(p_ln_cell, i_h, tl.sum(d_hat, axis=1), tl.sum(d_hat * c_hat, axis=1), m_b,
                          runs(phase, PH_LN_CELL))
            sync(p_counter, ((s - s_lo) * BARRIERS + PH_LN_CELL + 1) * n_group, error, USE_BARRIER)
            sum_d, sum_dc = combined_sums(p_ln_cell, m_b, n_group, NP_PAD)
            d_cell = rstd_c * (d_hat - (sum_d[:, None] + c_hat * sum_dc[:, None]) / H)
        dc_fresh += d_cell
        if HAS_CLIP:
            p_clip = clip_in + row
            da_o = tl.where(tl.load(p_clip + 3 * H, mask=m_rj, other=0) != 0, da_o, 0.0)
        if PEEPHOLE:
            dc_fresh += da_o * b_po
        if HAS_CELL_CLIP:
            dc_fresh = tl.where(tl.load(cell_clip_in + p_state_t, mask=m_rj, other=0) != 0, dc_fresh, 0.0)
        d_i = dc_fresh * gate_g
        d_f = dc_fresh * c_prev
        if COUPLED:
            d_i -= d_f  # f = 1 - i
            da_f = tl.zeros_like(d_f)
        else:
            da_f = d_f * activation_grad(gate_f, ACT_GATE)
        da_i = d_i * activation_grad(gate_i, ACT_GATE)
        da_g = dc_fresh * gate_i * activation_grad(gate_g, ACT_IN)
        if HAS_CLIP:
            da_i = tl.where(tl.load(p_clip, mask=m_rj, other=0) != 0, da_i, 0.0)
            da_g = tl.where(tl.load(p_clip + 2 * H, mask=m_rj, other=0) != 0, da_g, 0.0)
            if not COUPLED:
                da_f = tl.where(tl.load(p_clip + H, mask=m_rj, other=0) != 0, da_f, 0.0)
        dc_new = dc_fresh * gate_f
        if PEEPHOLE:
            dc_new += da_i * b_pi + da_f * b_pf
        if ZONEOUT_C != 0:
            dc_new += dc_kept

        if VARLEN:
            # past a sequence's end the state was frozen and the output a constant zero
            active = (t < b_len)[:, None]
            da_i = tl.where(active, da_i, 0.0)
            da_f = tl.where(active, da_f, 0.0)
            da_g = tl.where(active, da_g, 0.0)
            da_o = tl.where(active, da_o, 0.0)
            b_dh = tl.where(active, dh_kept, b_dh)
            b_dc = tl.where(active, dc_new, b_dc)
        else:
            b_dh = dh_kept
            b_dc = dc_new
        if PEEPHOLE:
            d_pi += tl.where(finishes, tl.sum(da_i * c_prev, axis=0), 0.0)
            d_pf += tl.where(finishes, tl.sum(da_f * c_prev, axis=0), 0.0)
            d_po += tl.where(finishes, tl.sum(da_o * b_cf, axis=0), 0.0)
        b_dh = tl.where(finishes, b_dh, dh_carried)
        b_dc = tl.where(finishes, b_dc, dc_carried)
        m_live_j = m_rj
        m_rj = tl.where(finishes, m_rj, False)
        if LAYER_NORM:
            # a_t = LN(x W_ih^T) + LN(h_{t-1} W_hh^T) + b: d a_t goes to the input side and the biases
            # as it is, and back through LN(h_{t-1} W_hh^T): two sums over the row's 4H gates
            tl.store(da_out + row, da_i, mask=m_rj)
            tl.store(da_out + row + H, da_f, mask=m_rj)
            tl.store(da_out + row + 2 * H, da_g, mask=m_rj)
            tl.store(da_out + row + 3 * H, da_o, mask=m_rj)
            hat_i = tl.load(hh_hat + row, mask=m_live_j, other=0.0)
            hat_f = tl.load(hh_hat + row + H, mask=m_live_j, other=0.0)
            hat_g = tl.load(hh_hat + row + 2 * H, mask=m_live_j, other=0.0)
            hat_o = tl.load(hh_hat + row + 3 * H, mask=m_live_j, other=0.0)
            d_gi += tl.where(finishes, tl.sum(da_i * hat_i, axis=0), 0.0)
            d_gf += tl.where(finishes, tl.sum(da_f * hat_f, axis=0), 0.0)
            d_gg += tl.where(finishes, tl.sum(da_g * hat_g, axis=0), 0.0)
            d_go += tl.where(finishes, tl.sum(da_o * hat_o, axis=0), 0.0)
            dhat_i, dhat_f, dhat_g, dhat_o = da_i * b_gi, da_f * b_gf, da_g * b_gg, da_o * b_go
            sum_d = tl.sum(dhat_i + dhat_f + dhat_g + dhat_o, axis=1)
            sum_dh = tl.sum(dhat_i * hat_i + dhat_f * hat_f + dhat_g * hat_g + dhat_o * hat_o, axis=1)
            publish_sums(p_ln_gates, i_h, sum_d, sum_dh, m_b, runs(phase, PH_LN_GATES))
            sync(p_counter, ((s - s_lo) * BARRIERS + PH_LN_GATES + 1) * n_group, error, USE_BARRIER)
            sum_d, sum_dh = combined_sums(p_ln_gates, m_b, n_group, NP_PAD)
            mean_d, mean_dh = (sum_d / G)[:, None], (sum_dh / G)[:, None]
            da_i = rstd_h * (dhat_i - mean_d - hat_i * mean_dh)
            da_f = rstd_h * (dhat_f - mean_d - hat_f * mean_dh)
            da_g = rstd_h * (dhat_g - mean_d - hat_g * mean_dh)
            da_o = rstd_h * (dhat_o - mean_d - hat_o * mean_dh)
        out_ty = dgates.dtype.element_ty
        tl.store(dgates + row, da_i.to(out_ty), mask=m_rj)
        tl.store(dgates + row + H, da_f.to(out_ty), mask=m_rj)
        tl.store(dgates + row + 2 * H, da_g.to(out_ty), mask=m_rj)
        tl.store(dgates + row + 3 * H, da_o.to(out_ty), mask=m_rj)
        sync(p_counter, (s - s_lo + 1) * BARRIERS * n_group, error, USE_BARRIER)

    if (finish != 0) & (hi > lo):
        dh_in = dh_from_dgates(dgates, w_dir, b_w, hi - 1, T, B, i_d, offsets, b_len, o_b64, m_b, o_q, m_q, H, P,
                                D, G, H_PAD, PB, BB, K_CHUNK, PRECISION, ACC, W_AS_A, DOT_IN_FP32, VARLEN)
        if HAS_REC_MASK:
            dh_in = dh_in * b_rec
        b_dh += dh_in
    tl.store(dh_state + p_hstate, b_dh, mask=m_bq)
    tl.store(dc_state + p_state, b_dc, mask=m_bj)
    if PEEPHOLE:
        p_dpeep = dpeep + (i_b * D + i_d) * 3 * H + o_j
        tl.store(p_dpeep, tl.load(p_dpeep, mask=m_j, other=0.0) + d_pi, mask=m_j)
        tl.store(p_dpeep + H, tl.load(p_dpeep + H, mask=m_j, other=0.0) + d_pf, mask=m_j)
        tl.store(p_dpeep + 2 * H, tl.load(p_dpeep + 2 * H, mask=m_j, other=0.0) + d_po, mask=m_j)
    if LAYER_NORM:  # this launch's share, added: one launch per step accumulates over the launches
        p_dln = dln + (i_b * D + i_d) * 6 * H + o_j
        tl.store(p_dln, tl.load(p_dln, mask=m_j, other=0.0) + d_gi, mask=m_j)
        tl.store(p_dln + H, tl.load(p_dln + H, mask=m_j, other=0.0) + d_gf, mask=m_j)
        tl.store(p_dln + 2 * H, tl.load(p_dln + 2 * H, mask=m_j, other=0.0) + d_gg, mask=m_j)
        tl.store(p_dln + 3 * H, tl.load(p_dln + 3 * H, mask=m_j, other=0.0) + d_go, mask=m_j)
        tl.store(p_dln + 4 * H, tl.load(p_dln + 4 * H, mask=m_j, other=0.0) + d_cw, mask=m_j)
        tl.store(p_dln + 5 * H, tl.load(p_dln + 5 * H, mask=m_j, other=0.0) + d_cb, mask=m_j)
