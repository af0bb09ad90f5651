"""The "eager loop" that ``fastlstm bench`` times: an LSTM variant as users write it today.

A plain Python loop over time steps, one step built from ``torch`` ops (``torch.nn.LSTMCell``
for the plain cell), autograd for the backward. It is written independently of fastlstm's
engines on purpose: the bench checks it against fastlstm's reference before timing it, so the
two cross-check each other. Only the deterministic (eval-mode) semantics of the stochastic
options are implemented, because those are what the bench times: zoneout keeps
``z * previous + (1 - z) * fresh``; recurrent dropout and DropConnect are the identity.

Shape legend: ``T`` steps, ``B`` batch, ``I`` input features, ``H`` hidden size,
``H_out`` size of ``h`` (``P`` with a projection), ``D`` directions, ``L`` layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {
    "sigmoid": torch.sigmoid,
    "hard_sigmoid": lambda x: (0.2 * x + 0.5).clamp(0.0, 1.0),  # ONNX's, not F.hardsigmoid's x/6
    "tanh": torch.tanh,
    "softsign": F.softsign,
    "relu": torch.relu,
    "hardsigmoid": F.hardsigmoid,  # relu6(x + 3) / 6
}


class EagerCell(nn.Module):
    """One LSTM step with the variants: ``(x [B, I], h [B, H_out], c [B, H]) -> (h', c')``."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        proj_size: int = 0,
        *,
        activations=("sigmoid", "tanh", "tanh"),
        layer_norm: bool = False,
        peephole: bool = False,
        zoneout=0.0,
        cell_clip: float | None = None,
        recurrent_dropout: float = 0.0,
        weight_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.gate_act, self.in_act, self.out_act = (ACTIVATIONS[name] for name in activations)
        self.zoneout = tuple(zoneout) if isinstance(zoneout, (tuple, list)) else (zoneout, zoneout)
        self.cell_clip = cell_clip
        self.stochastic = self.zoneout != (0.0, 0.0) or recurrent_dropout > 0 or weight_drop > 0
        plain = (
            tuple(activations) == ("sigmoid", "tanh", "tanh")
            and not (layer_norm or peephole or proj_size or cell_clip)
            and self.zoneout == (0.0, 0.0)
        )
        # The plain cell is what users reach for first; everything else is written out by hand.
        self.cell = nn.LSTMCell(input_size, hidden_size) if plain else None
        if plain:
            return
        h_out = proj_size or hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, h_out))
        self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size))
        self.weight_hr = nn.Parameter(torch.empty(proj_size, hidden_size)) if proj_size else None
        self.peephole = nn.Parameter(torch.empty(3 * hidden_size)) if peephole else None
        if layer_norm:
            self.ln_ih = nn.LayerNorm(4 * hidden_size, bias=False)
            self.ln_hh = nn.LayerNorm(4 * hidden_size, bias=False)
            self.ln_c = nn.LayerNorm(hidden_size)
        else:
            self.ln_ih = self.ln_hh = self.ln_c = None
        for p in (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, self.weight_hr, self.peephole):
            if p is not None:
                nn.init.uniform_(p, -hidden_size**-0.5, hidden_size**-0.5)

    def torch_named_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters under torch's / fastlstm's field names (``weight_ih``, ..., ``layer_norm_cell_bias``)."""
        if self.cell is not None:
            return dict(self.cell.named_parameters())
        named = {
            "weight_ih": self.weight_ih,
            "weight_hh": self.weight_hh,
            "bias_ih": self.bias_ih,
            "bias_hh": self.bias_hh,
            "weight_hr": self.weight_hr,
            "weight_peephole": self.peephole,
        }
        if self.ln_c is not None:
            named |= {
                "layer_norm_ih_weight": self.ln_ih.weight,
                "layer_norm_hh_weight": self.ln_hh.weight,
                "layer_norm_cell_weight": self.ln_c.weight,
                "layer_norm_cell_bias": self.ln_c.bias,
            }
        return {name: p for name, p in named.items() if p is not None}

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        if self.training and self.stochastic:
            raise NotImplementedError("the eager loop implements the stochastic options in eval mode only")
        h, c = state
        if self.cell is not None:
            return self.cell(x, (h, c))
        gi, gh = F.linear(x, self.weight_ih), F.linear(h, self.weight_hh)
        if self.ln_c is not None:
            gi, gh = self.ln_ih(gi), self.ln_hh(gh)
        i, f, g, o = (gi + gh + self.bias_ih + self.bias_hh).chunk(4, dim=1)
        if self.peephole is not None:
            p_i, p_f, p_o = self.peephole.chunk(3)
            i, f = i + p_i * c, f + p_f * c
        c_new = self.gate_act(f) * c + self.gate_act(i) * self.in_act(g)
        if self.cell_clip is not None:
            c_new = c_new.clamp(-self.cell_clip, self.cell_clip)
        if self.peephole is not None:
            o = o + p_o * c_new
        h_new = self.gate_act(o) * self.out_act(self.ln_c(c_new) if self.ln_c is not None else c_new)
        if self.weight_hr is not None:
            h_new = F.linear(h_new, self.weight_hr)
        z_h, z_c = self.zoneout
        if z_h:
            h_new = z_h * h + (1 - z_h) * h_new
        if z_c:
            c_new = z_c * c + (1 - z_c) * c_new
        return h_new, c_new


class EagerLSTM(nn.Module):
    """Layers x directions x a Python time loop over :class:`EagerCell`.

    ``forward(x [T, B, I], (h0 [L*D, B, H_out], c0 [L*D, B, H]), lengths [B] | None)`` returns
    ``(y [T, B, D*H_out], (h_n, c_n))``. With ``lengths``, steps past a sequence's end keep its
    state and output zeros (the usual masking; the reverse direction thus starts at each end).
    """

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1, bidirectional: bool = False,
        proj_size: int = 0, **options,
    ) -> None:
        super().__init__()
        self.directions = 2 if bidirectional else 1
        h_out = proj_size or hidden_size
        self.cells = nn.ModuleList(
            EagerCell(input_size if layer == 0 else self.directions * h_out, hidden_size, proj_size, **options)
            for layer in range(num_layers)
            for _ in range(self.directions)
        )

    def forward(self, x: Tensor, hx: tuple[Tensor, Tensor], lengths: Tensor | None = None):
        h0, c0 = hx
        h_n, c_n = [], []
        steps = x.shape[0]
        for layer_start in range(0, len(self.cells), self.directions):
            outputs = []
            for d in range(self.directions):
                k = layer_start + d
                cell, h, c = self.cells[k], h0[k], c0[k]
                ys = [None] * steps
                for t in reversed(range(steps)) if d == 1 else range(steps):
                    h_new, c_new = cell(x[t], (h, c))
                    if lengths is None:
                        h, c = h_new, c_new
                        ys[t] = h
                    else:
                        active = (lengths > t).unsqueeze(1)
                        h, c = torch.where(active, h_new, h), torch.where(active, c_new, c)
                        ys[t] = torch.where(active, h_new, 0.0)
                outputs.append(torch.stack(ys))
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outputs, dim=2)
        return x, (torch.stack(h_n), torch.stack(c_n))
