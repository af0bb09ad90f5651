"""The GPU engine: persistent Triton kernels for the LSTM recurrence, forward and backward.

Shape legend: ``T`` steps, ``B`` batch (the layout's sorted slots), ``N`` rows, ``H`` hidden size,
``P`` the size of ``h`` (the projection's, else ``H``), ``D`` directions, ``G = 4H`` gate rows in the
order ``i, f, g, o``; ``HB`` hidden units and ``BB`` batch rows owned by one program, ``NB`` batch blocks.

Design (docs/equations.md for the math; docs/architecture.md for where it sits):

* The input gates ``x_t W_ih^T`` of every step and both directions come from outside (one GEMM,
  layer-normalised under ``layer_norm``): the engine runs the recurrence over them.
* The forward kernel (:mod:`.forward_kernel`) is *persistent*: program ``(i_h, i_b, d)`` owns hidden
  units ``[i_h HB, (i_h + 1) HB)`` with all four of their gates, for batch rows ``[i_b BB, (i_b + 1) BB)``
  of direction ``d``. It loads its ``[P, 4 HB]`` slice of ``weight_hh`` (gate-interleaved columns,
  so a single ``tl.dot`` gives all four gates) once, keeps ``c`` in registers, and runs the whole
  time loop: each step it reads ``h_{t-1}`` of its rows, computes its gates, publishes its slice of
  ``h_t`` and meets the other programs of its ``(i_b, d)`` group at a grid barrier. Batch blocks and
  directions never wait for each other, so both directions run concurrently.
* The backward kernel (:mod:`.backward_kernel`) runs the same way in reverse. A program owns the
  columns of ``weight_hh`` of its hidden units (``[4H, HB]``): it computes its slice of
  ``dgates_t``, publishes it, meets its group at the barrier, and takes ``dh_{t-1} = dgates_t W_hh``
  for its units. Then cuBLAS computes ``dW_hh`` (and ``dW_hr``) over all rows (:mod:`.layer`).
* Rows are :mod:`fastlstm.packing`'s layout: with sequences of different lengths (``VARLEN``) the
  kernels address step ``t``'s rows as ``offsets[t] + b`` and skip a block's steps past all of its
  sequences' ends; nothing is padded.
* The projection (``proj_size``): each program publishes its units of ``m_t`` and, after the barrier,
  computes its units of ``h_t = m_t W_hr^T`` (the backward exchanges ``d(m_t W_hr^T)`` the same way).
* Layer norm: ``LN(h W_hh^T)`` and ``LN(c_t)`` combine every program's moments of its share of the
  row (forward) or its two gradient sums (backward), exchanged at two more barriers per step
  (docs/equations.md, section 10.5).

The barrier only works when every program of a group is resident at once. The launcher
(:mod:`.launch`) asks for at most one program per SM (:mod:`.grid`); when that cannot hold (too many
programs, a slice too large to keep on chip, or a kernel that does not fit an SM) the same kernels run
one launch per step, where the end of a launch is the barrier. A barrier that waits far longer than
any step can take gives up and sets an error flag, so a misconfigured launch raises instead of
hanging. The kernels' parameters are declared once (:mod:`.arguments`), for the launch and for the
ahead-of-time build check (:mod:`.build`).

Under ``TRITON_INTERPRET=1`` (CPU tests) programs run one after another, so a persistent launch
there must be one program per group (the "one-program mode"); the per-step mode covers several.
"""

from __future__ import annotations

from ...options import LSTMOptions
from ...packing import Layout
from ...weights import DirectionWeights
from ..contract import LayerCall
from .layer import allocate, backward, forward

name = "triton"

__all__ = ["name", "fuses_input", "reads", "allocate", "forward", "backward"]


def fuses_input(layout: Layout, weights: list[DirectionWeights], options: LSTMOptions) -> bool:
    return False


def reads(call: LayerCall) -> tuple[bool, bool]:
    """The backward rebuilds each step's ``h_{t-1}`` from the output, never reads the input gates."""
    return False, True
