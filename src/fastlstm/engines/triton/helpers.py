"""The Triton kernels' helpers: activations, the recurrent product and its operands, the grid
barrier, the rows of a step, and layer norm's statistics exchanged between programs.

Shape legend as in :mod:`fastlstm.engines.triton` (``HB`` hidden units and ``BB`` batch rows per
program).
"""

import triton
import triton.language as tl

# Spin iterations before a barrier gives up (about a second on an H100, against microseconds per step).
BARRIER_SPIN_LIMIT = tl.constexpr(1 << 22)

# The `phase` argument that runs every phase of a step (one launch for all steps).
ALL_PHASES = 7
ALL_PHASES_C = tl.constexpr(ALL_PHASES)


@triton.jit
def activate(x, CODE: tl.constexpr):
    if CODE == 0:
        y = 1.0 / (1.0 + tl.exp(-x))
    elif CODE == 1:
        y = tl.minimum(tl.maximum(0.2 * x + 0.5, 0.0), 1.0)
    elif CODE == 2:
        y = 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0
    elif CODE == 3:
        y = x / (1.0 + tl.abs(x))
    elif CODE == 4:
        y = tl.maximum(x, 0.0)
    else:  # relu6(x + 3) / 6
        y = tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) / 6.0
    return y


@triton.jit
def activation_grad(y, CODE: tl.constexpr):
    """The derivative of activation ``CODE``, written with its output ``y``."""
    if CODE == 0:
        g = y * (1.0 - y)
    elif CODE == 1:
        g = ((y > 0.0) & (y < 1.0)).to(y.dtype) * 0.2  # the constant in y's precision
    elif CODE == 2:
        g = 1.0 - y * y
    elif CODE == 3:
        s = 1.0 - tl.abs(y)
        g = s * s
    elif CODE == 4:
        g = (y > 0.0).to(y.dtype)
    else:
        g = ((y > 0.0) & (y < 1.0)).to(y.dtype) / 6.0
    return g


@triton.jit
def product(a, b, PRECISION: tl.constexpr, ACC: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """``a @ b`` accumulated in ``ACC``. ``DOT_IN_FP32`` widens bfloat16 operands first (exact), for
    Triton's interpreter, whose bfloat16 ``tl.dot`` returns garbage (Triton 3.9)."""
    if DOT_IN_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def row_chunk(base, o_b64, m_b, k0, H, K_CHUNK: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Columns ``[k0, k0 + K_CHUNK)`` of rows ``o_b`` of a ``[B, H]`` matrix that other programs
    write (read through L2): ``[BB, K]``, or ``[K, BB]`` when ``TRANSPOSED``."""
    o_k = k0 + tl.arange(0, K_CHUNK)
    m_k = o_k < H
    if TRANSPOSED:
        chunk = tl.load(base + o_b64[None, :] * H + o_k[:, None], mask=m_k[:, None] & m_b[None, :], other=0.0,
                        cache_modifier=".cg")
    else:
        chunk = tl.load(base + o_b64[:, None] * H + o_k[None, :], mask=m_b[:, None] & m_k[None, :], other=0.0,
                        cache_modifier=".cg")
    return chunk


@triton.jit
def weight_row_chunk(w, w_row, m_row, k0, H, K_CHUNK: tl.constexpr, AS_A: tl.constexpr):
    """Columns ``[k0, k0 + K_CHUNK)`` of rows ``w_row`` of ``weight_hh [4H, H]``: the product's A
    operand ``[R, K]``, or its B operand ``[K, R]``."""
    o_k = k0 + tl.arange(0, K_CHUNK)
    m_k = o_k < H
    if AS_A:
        chunk = tl.load(w + w_row[:, None] * H + o_k[None, :], mask=m_row[:, None] & m_k[None, :], other=0.0)
    else:
        chunk = tl.load(w + w_row[None, :] * H + o_k[:, None], mask=m_k[:, None] & m_row[None, :], other=0.0)
    return chunk


@triton.jit
def clipped(a, bound, HAS_CLIP: tl.constexpr):
    if HAS_CLIP:
        a = tl.minimum(tl.maximum(a, -bound), bound)
    return a


@triton.jit
def grid_barrier(p_counter, target, p_error):
    """Wait until ``target`` arrivals at ``p_counter`` (this program's included).

    The CTA barrier orders every thread's stores before thread 0's release (cumulativity, as in
    CUTLASS's grid barrier), and the acquire plus the CTA barrier after it order the loads that
    follow. A wait far past any step's length flags ``p_error`` and returns; once any barrier
    of the launch has given up, the others stop waiting at once, so a launch whose programs
    are not all resident ends in about one spin limit instead of one per step.
    """
    tl.debug_barrier()
    tl.atomic_add(p_counter, 1, sem="release", scope="gpu")
    arrived = tl.atomic_add(p_counter, 0, sem="acquire", scope="gpu")
    failed = tl.atomic_add(p_error, 0, sem="relaxed", scope="gpu")
    spins = 0
    while (arrived < target) & (spins < BARRIER_SPIN_LIMIT) & (failed == 0):
        arrived = tl.atomic_add(p_counter, 0, sem="acquire", scope="gpu")
        failed = tl.atomic_add(p_error, 0, sem="relaxed", scope="gpu")
        spins += 1
    if arrived < target:
        tl.atomic_max(p_error, 1)
    tl.debug_barrier()


@triton.jit
def step_range(lengths, o_b, m_b, T, i_d, reverse_first, VARLEN: tl.constexpr):
    """The steps ``[lo, hi)`` of a processing order that hold real work for this batch block:
    steps past every sequence's end of the block are skipped, not computed. Direction ``i_d``
    processes the real steps first unless it is ``reverse_first`` (the forward kernel's
    reverse direction, or the backward's forward one), which starts past the block's ends."""
    lo = T * 0
    hi = T + 0
    if VARLEN:
        longest = tl.max(tl.load(lengths + o_b, mask=m_b, other=0)).to(tl.int32)
        starts_late = i_d == reverse_first
        lo = tl.where(starts_late, T - longest, 0)
        hi = tl.where(starts_late, T, longest)
    return lo, hi


@triton.jit
def time_index(s, T, i_d):
    """Direction ``i_d``'s ``s``-th processed step: ``s`` forward, ``T - 1 - s`` in reverse."""
    return tl.where(i_d == 1, T - 1 - s, s)


@triton.jit
def rows_at(offsets, t, B, o_b64, VARLEN: tl.constexpr):
    """The rows of step ``t``'s batch rows ``o_b`` in a per-token tensor ``[N, F]``
    (fastlstm.packing's layout): ``t B + b`` when every sequence has ``T`` steps, else
    ``offsets[t] + b``. ``[BB]`` int64."""
    if VARLEN:
        first = tl.load(offsets + t).to(tl.int64)
    else:
        first = t.to(tl.int64) * B
    return first + o_b64


@triton.jit
def live(m_b, t, b_len, VARLEN: tl.constexpr):
    """Which batch rows have a row at step ``t``: none past a sequence's end."""
    if VARLEN:
        m_b = m_b & (t < b_len)
    return m_b


@triton.jit
def lengths_of(lengths, o_b, m_b, BB: tl.constexpr, VARLEN: tl.constexpr):
    if VARLEN:
        b_len = tl.load(lengths + o_b, mask=m_b, other=0)
    else:
        b_len = tl.zeros((BB,), dtype=tl.int64)  # unread: every row runs every step
    return b_len


@triton.jit
def sync(p_counter, arrivals, error, USE_BARRIER: tl.constexpr):
    """The end of a phase: the group's grid barrier, or for a one-program group (or a launch
    that runs one phase) a CTA barrier, since the program's own warps exchange through memory."""
    if USE_BARRIER:
        grid_barrier(p_counter, arrivals, error)
    else:
        tl.debug_barrier()


@triton.jit
def runs(phase, k):
    """Whether a launch given ``phase`` runs phase ``k`` of its steps (publishes its results)."""
    return (phase == k) | (phase == ALL_PHASES_C)


@triton.jit
def step_finishes(phase, BARRIERS: tl.constexpr):
    """Whether a launch given ``phase`` finishes its steps. Only layer norm and the projection split
    a step into phases; without them the answer is a constant, which costs no registers."""
    if BARRIERS > 1:
        done = runs(phase, BARRIERS - 1)
    else:
        done = True
    return done


@triton.jit
def partial_moments(v, m, count):
    """Each row's mean and sum of squared deviations (M2) over the entries ``m`` of ``v [BB, K]``,
    ``count`` of them: this program's share of a layer-norm statistic."""
    mean = tl.sum(tl.where(m, v, 0.0), axis=1) / count
    dev = tl.where(m, v - mean[:, None], 0.0)
    return mean, tl.sum(dev * dev, axis=1)


@triton.jit
def publish_moments(p_rows, i_h, mean, m2, m_b, on):
    """Store this program's ``(mean, M2)`` of each row in slot ``i_h`` of ``[B, LN_SLOTS, 2]`` if ``on``."""
    m = tl.where(on, m_b, False)  # (a scalar and a block in `&` fail in the interpreter)
    tl.store(p_rows + i_h * 2, mean, mask=m)
    tl.store(p_rows + i_h * 2 + 1, m2, mask=m)


@triton.jit
def publish_sums(p_rows, i_h, a, b, m_b, on):
    """Store this program's two row sums in slot ``i_h`` of ``[B, LN_SLOTS, 2]`` if ``on``."""
    publish_moments(p_rows, i_h, a, b, m_b, on)


@triton.jit
def combined_sums(p_rows, m_b, n_programs, NP_PAD: tl.constexpr):
    """Each row's two sums over every program's share (see :func:`publish_sums`)."""
    o_p = tl.arange(0, NP_PAD)
    m = m_b[:, None] & (o_p < n_programs)[None, :]
    first = tl.load(p_rows[:, None] + o_p[None, :] * 2, mask=m, other=0.0, cache_modifier=".cg")
    second = tl.load(p_rows[:, None] + o_p[None, :] * 2 + 1, mask=m, other=0.0, cache_modifier=".cg")
    return tl.sum(first, axis=1), tl.sum(second, axis=1)


@triton.jit
def combined_moments(p_rows, m_b, n_programs, H, HB: tl.constexpr, PER_UNIT: tl.constexpr,
                      NP_PAD: tl.constexpr, eps):
    """Each row's mean and ``1 / sqrt(var + eps)`` over all ``PER_UNIT * H`` entries, from every
    program's ``(mean, M2)`` (Chan et al.'s pairwise combination: no cancellation of E[x^2] - mean^2).
    ``p_rows [BB]`` points at the rows of a ``[B, LN_SLOTS, 2]`` table that other programs write;
    ``NP_PAD`` covers the group's programs."""
    o_p = tl.arange(0, NP_PAD)
    m_p = o_p < n_programs
    m = m_b[:, None] & m_p[None, :]
    means = tl.load(p_rows[:, None] + o_p[None, :] * 2, mask=m, other=0.0, cache_modifier=".cg")
    m2s = tl.load(p_rows[:, None] + o_p[None, :] * 2 + 1, mask=m, other=0.0, cache_modifier=".cg")
    counts = tl.where(m_p, PER_UNIT * tl.minimum(HB, H - o_p * HB), 0).to(means.dtype)[None, :]
    total = PER_UNIT * H
    mean = tl.sum(counts * means, axis=1) / total
    dev = means - mean[:, None]
    m2 = tl.sum(m2s + counts * dev * dev, axis=1)
    return mean, 1.0 / tl.sqrt(m2 / total + eps)
