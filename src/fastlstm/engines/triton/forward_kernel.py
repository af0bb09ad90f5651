"""The forward kernel: a persistent program owns ``HB`` hidden units (all four gates) of ``BB``
batch rows of one direction and runs the time loop (see :mod:`fastlstm.engines.triton`)."""

import triton.language as tl

from .arguments import SHARED_CONSTANTS, Argument, constexpr, kernel
from .helpers import (
    activate, clipped, combined_moments, lengths_of, live, partial_moments, product, publish_moments,
    row_chunk, rows_at, runs, step_finishes, step_range, sync, time_index, weight_row_chunk,
)

# Per-row tensors are the layout's rows [N, .] (fastlstm.packing; N = T B when every sequence has T
# steps); masks of every step are [D, T, B, .] in the layout's sorted batch order.
FORWARD = [
    Argument("xg", "gates", "[N, D*4H] x_t W_ih^T of every direction (layer-normalised under LAYER_NORM)"),
    Argument("bias", "acc", "[D, 4H] b_ih + b_hh"),
    Argument("w_hh", "storage", "[D, 4H, P] weight_hh (DropConnect applied)"),
    Argument("peephole", "acc", "[D, 3H] (p_i, p_f, p_o)"),
    Argument("lengths", "i64", "[B] the sorted sequences' lengths (VARLEN)"),
    Argument("offsets", "i64", "[T] each step's first row (VARLEN)"),
    Argument("rec_mask", "acc", "[D, B, P] recurrent-dropout mask on h_{t-1}"),
    Argument("zh_mask", "acc", "[D, T, B, P] zoneout keep masks (training)"),
    Argument("zc_mask", "acc", "[D, T, B, H]"),
    Argument("h_buf", "storage", "[2, D, B, P] ping-pong h state: step s reads slot s % 2, writes the other"),
    Argument("c_state", "acc", "[D, B, H] c_0 in, c_n out"),
    Argument("y", "storage", "[N, D*P]"),
    Argument("gates_out", "storage", "[N, D*4H] saved activations i, f, g, o"),
    Argument("c_fresh_out", "acc", "[N, D*H] saved c_t before zoneout"),
    Argument("c_carried_out", "acc", "[N, D*H] saved carried c_t (zoneout on c only)"),
    Argument("clip_out", "i8", "[N, D*4H] 1 where the gate pre-activation was inside the clip"),
    Argument("cell_clip_out", "i8", "[N, D*H] 1 where c_t was inside the cell clip"),
    Argument("ln_hh", "acc", "[D, 4H] layer norm of h_{t-1} W_hh^T: its weight"),
    Argument("ln_cell_w", "acc", "[D, H] layer norm of c_t: weight"),
    Argument("ln_cell_b", "acc", "[D, H] and bias"),
    Argument("ln_stats", "acc", "[2, D, B, LN_SLOTS, 2] each program's (mean, M2) of its rows: gates, then cell"),
    Argument("hh_hat_out", "acc", "[N, D*4H] saved (h_{t-1} W_hh^T - mean) * rstd"),
    Argument("ln_rows_out", "acc", "[N, D*3] saved per row: rstd of h_{t-1} W_hh^T, mean and rstd of c_t"),
    Argument("w_hr", "storage", "[D, P, H] the projection (PROJ)"),
    Argument("m_buf", "storage", "[D, B, H] m_t = o_t * act(c_t), exchanged between the programs (PROJ)"),
    Argument("m_out", "storage", "[N, D*H] saved m_t (PROJ)"),
    Argument("proj_clip_out", "i8", "[N, D*P] 1 where m_t W_hr^T was inside the projection clip"),
    Argument("counters", "i32", "[D, NB] barrier arrivals"),
    Argument("error", "i32", "[1] set when a barrier gave up"),
    Argument("T", "int"), Argument("B", "int"), Argument("step_begin", "int"), Argument("step_end", "int"),
    Argument("phase", "int"),
    Argument("clip", "float"), Argument("cell_clip", "float"), Argument("z_h", "float"), Argument("z_c", "float"),
    Argument("ln_eps", "float"), Argument("proj_clip", "float"),
    *SHARED_CONSTANTS,
    *constexpr("HAS_BIAS", "NEEDS_H_PREV", "SAVE"),
]


@kernel(FORWARD)
def forward_kernel(ARGUMENTS):
    """Steps ``[step_begin, step_end)`` of the recurrence (docs/equations.md, sections 1-7):
    ``a_t = x_t W_ih^T + b + h_{t-1} W_hh^T``, the gates, ``c_t``, ``h_t``, per program slice.
    ``h`` has ``P`` units (the projection's size, else ``P = H``); a program owns ``PB`` of them
    (``PB = HB`` without projection). Arguments: :data:`FORWARD`.

    A step is a sequence of phases, each ended by the group's barrier: with ``LAYER_NORM``
    (``xg`` then holds ``LN(x_t W_ih^T)``) one publishes each program's moments of its share of
    ``h_{t-1} W_hh^T``, the next the moments of its share of ``c_t``; with ``PROJ`` one publishes
    the program's ``m_t`` for every program's slice of ``h_t = m_t W_hr^T``; the last publishes
    ``h_t``. ``phase`` ``ALL_PHASES`` runs them all (persistent); one launch per step runs each
    phase as a launch that recomputes the step up to its phase and stores only that phase's
    results."""
    i_h, i_b, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    G: tl.constexpr = 4 * H
    o_j = i_h * HB + tl.arange(0, HB)  # hidden (cell) units owned
    o_q = i_h * PB + tl.arange(0, PB)  # units of h owned (the same without projection)
    o_b = i_b * BB + tl.arange(0, BB)  # batch rows owned
    m_j, m_q, m_b = o_j < H, o_q < P, o_b < B
    m_bj = m_b[:, None] & m_j[None, :]
    m_bq = m_b[:, None] & m_q[None, :]
    o_b64 = o_b.to(tl.int64)
    d64 = i_d.to(tl.int64)

    # weight_hh rows of the owned units, gate-interleaved (entry 4 u + gate), as the product's
    # A operand [4 HB, P] (it can stay in registers) or its B operand [P, 4 HB]. With one K chunk
    # the slice is loaded once, before the time loop; with several it is streamed from L2 each step.
    o_col = tl.arange(0, 4 * HB)
    col_unit, col_gate = i_h * HB + o_col // 4, o_col % 4
    w_row = (col_gate * H + col_unit).to(tl.int64)
    m_col = col_unit < H
    w_dir = w_hh + d64 * G * P
    rec_dir = rec_mask + d64 * B * P
    RESIDENT: tl.constexpr = K_CHUNK == P_PAD
    if RESIDENT:
        b_w = weight_row_chunk(w_dir, w_row, m_col, 0, P, K_CHUNK, W_AS_A)

    if HAS_BIAS:
        p_bias = bias + i_d * G + o_j
        b_bi = tl.load(p_bias, mask=m_j, other=0.0)[None, :]
        b_bf = tl.load(p_bias + H, mask=m_j, other=0.0)[None, :]
        b_bg = tl.load(p_bias + 2 * H, mask=m_j, other=0.0)[None, :]
        b_bo = tl.load(p_bias + 3 * H, mask=m_j, other=0.0)[None, :]
    if PEEPHOLE:
        p_peep = peephole + i_d * 3 * H + o_j
        b_pi = tl.load(p_peep, mask=m_j, other=0.0)[None, :]
        b_pf = tl.load(p_peep + H, mask=m_j, other=0.0)[None, :]
        b_po = tl.load(p_peep + 2 * H, mask=m_j, other=0.0)[None, :]
    if HAS_REC_MASK and RESIDENT:
        b_rec = row_chunk(rec_dir, o_b64, m_b, 0, P, K_CHUNK, W_AS_A)
    b_len = lengths_of(lengths, o_b, m_b, BB, VARLEN)

    p_state = (d64 * B + o_b64[:, None]) * H + o_j[None, :]  # [BB, HB] in a [D, B, H] tensor
    b_c = tl.load(c_state + p_state, mask=m_bj, other=0.0)
    p_counter = counters + i_d * tl.num_programs(1) + i_b
    n_group = tl.num_programs(0)
    # barriers (phases) per step: layer norm's two exchanges, the projection's, then h_t's
    BARRIERS: tl.constexpr = 1 + (2 if LAYER_NORM else 0) + (1 if PROJ else 0)
    PH_PROJ: tl.constexpr = 2 if LAYER_NORM else 0
    if LAYER_NORM:
        b_ln_hh = tl.load(ln_hh + d64 * G + col_gate * H + col_unit, mask=m_col, other=0.0)[None, :]  # [1, 4 HB]
        b_ln_cw = tl.load(ln_cell_w + d64 * H + o_j, mask=m_j, other=0.0)[None, :]
        b_ln_cb = tl.load(ln_cell_b + d64 * H + o_j, mask=m_j, other=0.0)[None, :]
        p_ln_gates = ln_stats + ((0 * D + d64) * B + o_b64) * LN_SLOTS * 2  # [BB]
        p_ln_cell = ln_stats + ((1 * D + d64) * B + o_b64) * LN_SLOTS * 2

    lo, hi = step_range(lengths, o_b, m_b, T, i_d, 1, VARLEN)
    s_lo = tl.maximum(step_begin, lo)
    # num_stages=1: a step's loads of h_{t-1} must not be prefetched before the step that writes it
    for s in tl.range(s_lo, tl.minimum(step_end, hi), num_stages=1):
        t = time_index(s, T, i_d)
        t64 = t.to(tl.int64)
        r64 = rows_at(offsets, t, B, o_b64, VARLEN)
        m_live = live(m_b, t, b_len, VARLEN)
        m_rj = m_live[:, None] & m_j[None, :]  # the [BB, HB] entries that have a row
        m_rq = m_live[:, None] & m_q[None, :]  # the same for the [BB, PB] units of h
        p_h_prev = h_buf + ((s % 2) * D + d64) * B * P
        # h_{t-1} [BB, P] (or its transpose [P, BB] against W as A) times the weight slice
        if RESIDENT:
            b_h = row_chunk(p_h_prev, o_b64, m_b, 0, P, K_CHUNK, W_AS_A)
            if HAS_REC_MASK:
                b_h = (b_h.to(ACC) * b_rec).to(b_h.dtype)
            if W_AS_A:
                acc = product(b_w, b_h, PRECISION, ACC, DOT_IN_FP32)
            else:
                acc = product(b_h, b_w, PRECISION, ACC, DOT_IN_FP32)
        else:
            if W_AS_A:
                acc = tl.zeros((4 * HB, BB), dtype=ACC)
            else:
                acc = tl.zeros((BB, 4 * HB), dtype=ACC)
            for k0 in range(0, P_PAD, K_CHUNK):
                b_h = row_chunk(p_h_prev, o_b64, m_b, k0, P, K_CHUNK, W_AS_A)
                if HAS_REC_MASK:
                    b_h = (b_h.to(ACC) * row_chunk(rec_dir, o_b64, m_b, k0, P, K_CHUNK, W_AS_A)).to(b_h.dtype)
                w_chunk = weight_row_chunk(w_dir, w_row, m_col, k0, P, K_CHUNK, W_AS_A)
                if W_AS_A:
                    acc += product(w_chunk, b_h, PRECISION, ACC, DOT_IN_FP32)
                else:
                    acc += product(b_h, w_chunk, PRECISION, ACC, DOT_IN_FP32)
        if W_AS_A:
            acc = tl.trans(acc)  # [BB, 4 HB]
        if LAYER_NORM:  # LN(h_{t-1} W_hh^T) over all 4H gates of a row: every program's share
            mean_p, m2_p = partial_moments(acc, m_col[None, :], 4 * tl.minimum(HB, H - i_h * HB))
            publish_moments(p_ln_gates, i_h, mean_p, m2_p, m_b, runs(phase, 0))
            sync(p_counter, ((s - s_lo) * BARRIERS + 1) * n_group, error, USE_BARRIER)
            mean_h, rstd_h = combined_moments(p_ln_gates, m_b, n_group, H, HB, 4, NP_PAD, ln_eps)
            hh_hat = (acc - mean_h[:, None]) * rstd_h[:, None]
            acc = hh_hat * b_ln_hh
        # column 4 u + 2 k1 + k0 holds gate 2 k1 + k0 of unit u
        even, odd = tl.split(tl.reshape(acc, (BB, HB, 2, 2)))
        a_i, a_g = tl.split(even)
        a_f, a_o = tl.split(odd)

        row = r64[:, None] * (D * G) + d64 * G + o_j[None, :]  # gate i in [N, D*4H]
        a_i += tl.load(xg + row, mask=m_rj, other=0.0).to(ACC)
        a_f += tl.load(xg + row + H, mask=m_rj, other=0.0).to(ACC)
        a_g += tl.load(xg + row + 2 * H, mask=m_rj, other=0.0).to(ACC)
        a_o += tl.load(xg + row + 3 * H, mask=m_rj, other=0.0).to(ACC)
        if HAS_BIAS:
            a_i += b_bi
            a_f += b_bf
            a_g += b_bg
            a_o += b_bo
        if PEEPHOLE:
            a_i += b_pi * b_c
            a_f += b_pf * b_c
        gate_i = activate(clipped(a_i, clip, HAS_CLIP), ACT_GATE)
        if COUPLED:
            gate_f = 1.0 - gate_i
        else:
            gate_f = activate(clipped(a_f, clip, HAS_CLIP), ACT_GATE)
        gate_g = activate(clipped(a_g, clip, HAS_CLIP), ACT_IN)
        c_fresh = gate_f * b_c + gate_i * gate_g
        if HAS_CELL_CLIP:
            inside_cell = (c_fresh >= -cell_clip) & (c_fresh <= cell_clip)
            c_fresh = clipped(c_fresh, cell_clip, True)
        if PEEPHOLE:
            a_o += b_po * c_fresh
        gate_o = activate(clipped(a_o, clip, HAS_CLIP), ACT_GATE)
        if LAYER_NORM:  # LN(c_t) over the H units of a row
            mean_p, m2_p = partial_moments(c_fresh, m_j[None, :], tl.minimum(HB, H - i_h * HB))
            publish_moments(p_ln_cell, i_h, mean_p, m2_p, m_b, runs(phase, 1))
            sync(p_counter, ((s - s_lo) * BARRIERS + 2) * n_group, error, USE_BARRIER)
            mean_c, rstd_c = combined_moments(p_ln_cell, m_b, n_group, H, HB, 1, NP_PAD, ln_eps)
            h_fresh = gate_o * activate((c_fresh - mean_c[:, None]) * rstd_c[:, None] * b_ln_cw + b_ln_cb,
                                         ACT_OUT)
        else:
            h_fresh = gate_o * activate(c_fresh, ACT_OUT)
        if PROJ:  # h_t = m_t W_hr^T: m_t spans every program; each takes its PB units of h
            m_t = h_fresh
            p_m = m_buf + d64 * B * H
            tl.store(p_m + o_b64[:, None] * H + o_j[None, :], m_t.to(m_buf.dtype.element_ty),
                     mask=tl.where(runs(phase, PH_PROJ), m_bj, False))
            sync(p_counter, ((s - s_lo) * BARRIERS + PH_PROJ + 1) * n_group, error, USE_BARRIER)
            h_fresh = tl.zeros((BB, PB), dtype=ACC)
            for k0 in range(0, H_PAD, PROJ_K):
                m_chunk = row_chunk(p_m, o_b64, m_b, k0, H, PROJ_K, False)  # [BB, PROJ_K]
                o_k = k0 + tl.arange(0, PROJ_K)
                w_chunk = tl.load(w_hr + d64 * P * H + o_q[None, :].to(tl.int64) * H + o_k[:, None],
                                  mask=(o_k < H)[:, None] & m_q[None, :], other=0.0)  # [PROJ_K, PB]
                h_fresh += product(m_chunk, w_chunk, PRECISION, ACC, DOT_IN_FP32)
            if HAS_PROJ_CLIP:
                inside_proj = (h_fresh >= -proj_clip) & (h_fresh <= proj_clip)
                h_fresh = clipped(h_fresh, proj_clip, True)

        p_state_t = r64[:, None] * (D * H) + d64 * H + o_j[None, :]  # [N, D*H]
        p_out_t = r64[:, None] * (D * P) + d64 * P + o_q[None, :]  # [N, D*P]
        if NEEDS_H_PREV:
            p_h_own = p_h_prev + o_b64[:, None] * P + o_q[None, :]
            h_prev_own = tl.load(p_h_own, mask=m_bq, other=0.0, cache_modifier=".cg").to(ACC)
        if ZONEOUT_H == 1:
            keep_h = tl.load(zh_mask + ((d64 * T + t64) * B + o_b64[:, None]) * P + o_q[None, :], mask=m_bq,
                             other=0.0).to(ACC)
            h_new = keep_h * h_prev_own + (1.0 - keep_h) * h_fresh
        elif ZONEOUT_H == 2:
            h_new = z_h * h_prev_own + (1.0 - z_h) * h_fresh
        else:
            h_new = h_fresh
        if ZONEOUT_C == 1:
            keep_c = tl.load(zc_mask + ((d64 * T + t64) * B + o_b64[:, None]) * H + o_j[None, :], mask=m_bj,
                             other=0.0).to(ACC)
            c_new = keep_c * b_c + (1.0 - keep_c) * c_fresh
        elif ZONEOUT_C == 2:
            c_new = z_c * b_c + (1.0 - z_c) * c_fresh
        else:
            c_new = c_fresh
        if VARLEN:
            active = (t < b_len)[:, None]
            h_out = tl.where(active, h_new, 0.0)
            h_new = tl.where(active, h_new, h_prev_own)
            c_new = tl.where(active, c_new, b_c)
        else:
            h_out = h_new
        # a launch that runs an earlier phase of the step only (layer norm, one launch per step)
        # stores nothing of the step's results
        finishes = step_finishes(phase, BARRIERS)
        b_c = tl.where(finishes, c_new, b_c)
        m_rj = tl.where(finishes, m_rj, False)
        m_rq = tl.where(finishes, m_rq, False)
        m_next = tl.where(finishes, m_bq, False)

        tl.store(y + p_out_t, h_out.to(y.dtype.element_ty), mask=m_rq)
        p_h_next = h_buf + (((s + 1) % 2) * D + d64) * B * P + o_b64[:, None] * P + o_q[None, :]
        tl.store(p_h_next, h_new.to(h_buf.dtype.element_ty), mask=m_next)
        if SAVE and PROJ:
            tl.store(m_out + p_state_t, m_t.to(m_out.dtype.element_ty), mask=m_rj)
            if HAS_PROJ_CLIP:
                tl.store(proj_clip_out + p_out_t, inside_proj.to(tl.int8), mask=m_rq)
        if SAVE and LAYER_NORM:
            # the normalised h_{t-1} W_hh^T of the owned gates, and (once per row) the statistics
            hat_even, hat_odd = tl.split(tl.reshape(hh_hat, (BB, HB, 2, 2)))
            hat_i, hat_g = tl.split(hat_even)
            hat_f, hat_o = tl.split(hat_odd)
            tl.store(hh_hat_out + row, hat_i, mask=m_rj)
            tl.store(hh_hat_out + row + H, hat_f, mask=m_rj)
            tl.store(hh_hat_out + row + 2 * H, hat_g, mask=m_rj)
            tl.store(hh_hat_out + row + 3 * H, hat_o, mask=m_rj)
            m_row = tl.where(i_h == 0, tl.where(finishes, live(m_b, t, b_len, VARLEN), False), False)
            p_rows = ln_rows_out + r64 * (D * 3) + d64 * 3
            tl.store(p_rows, rstd_h, mask=m_row)
            tl.store(p_rows + 1, mean_c, mask=m_row)
            tl.store(p_rows + 2, rstd_c, mask=m_row)
        if SAVE:
            p_g = gates_out + row
            tl.store(p_g, gate_i.to(gates_out.dtype.element_ty), mask=m_rj)
            tl.store(p_g + H, gate_f.to(gates_out.dtype.element_ty), mask=m_rj)
            tl.store(p_g + 2 * H, gate_g.to(gates_out.dtype.element_ty), mask=m_rj)
            tl.store(p_g + 3 * H, gate_o.to(gates_out.dtype.element_ty), mask=m_rj)
            tl.store(c_fresh_out + p_state_t, c_fresh, mask=m_rj)
            if ZONEOUT_C != 0:
                tl.store(c_carried_out + p_state_t, c_new, mask=m_rj)
            if HAS_CLIP:
                p_clip = clip_out + row
                tl.store(p_clip, ((a_i >= -clip) & (a_i <= clip)).to(tl.int8), mask=m_rj)
                tl.store(p_clip + H, ((a_f >= -clip) & (a_f <= clip)).to(tl.int8), mask=m_rj)
                tl.store(p_clip + 2 * H, ((a_g >= -clip) & (a_g <= clip)).to(tl.int8), mask=m_rj)
                tl.store(p_clip + 3 * H, ((a_o >= -clip) & (a_o <= clip)).to(tl.int8), mask=m_rj)
            if HAS_CELL_CLIP:
                tl.store(cell_clip_out + p_state_t, inside_cell.to(tl.int8), mask=m_rj)
        sync(p_counter, (s - s_lo + 1) * BARRIERS * n_group, error, USE_BARRIER)

    tl.store(c_state + p_state, b_c, mask=m_bj)
