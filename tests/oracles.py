"""Independent oracles for the options that neither torch nor ONNX defines.

Written apart from ``fastlstm/reference.py`` and in a different shape: one sequence at a time,
vectors rather than batches, explicit per-gate weight slices, the reverse direction by walking a
sequence's true length backwards (the reference instead masks a padded batch), and layer norm
written out from its definition. Autograd differentiates it, so gradients can be compared too.
"""

from __future__ import annotations

import torch

EPS = 1e-5


def activation(name: str, v: torch.Tensor) -> torch.Tensor:
    if name == "sigmoid":
        return 1.0 / (1.0 + torch.exp(-v))
    if name == "hard_sigmoid":
        return torch.minimum(torch.maximum(0.2 * v + 0.5, torch.zeros_like(v)), torch.ones_like(v))
    if name == "tanh":
        return torch.tanh(v)
    if name == "softsign":
        return v / (1.0 + v.abs())
    if name == "relu":
        return torch.maximum(v, torch.zeros_like(v))
    if name == "hardsigmoid":  # Keras 3's hard_sigmoid: relu6(x + 3) / 6
        return torch.minimum(torch.maximum(v + 3.0, torch.zeros_like(v)), torch.full_like(v, 6.0)) / 6.0
    raise KeyError(name)


def layer_norm(v: torch.Tensor, gain: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    mean = v.sum() / v.numel()
    variance = ((v - mean) ** 2).sum() / v.numel()
    out = (v - mean) / torch.sqrt(variance + EPS) * gain
    return out if shift is None else out + shift


def clip(v: torch.Tensor, bound) -> torch.Tensor:
    if bound is None:
        return v
    return torch.minimum(torch.maximum(v, torch.full_like(v, -bound)), torch.full_like(v, bound))


def step(x, h, c, p: dict, cfg: dict, *, rec_mask=None, keep_h=None, keep_c=None):
    """One step of one sequence. ``p`` maps field names (weight_ih, ...) to tensors; ``cfg`` holds
    the options. ``keep_h``/``keep_c`` are zoneout keep masks or eval probabilities."""
    hidden = p["weight_hh"].shape[0] // 4
    gate_f, cell_in_f, cell_out_f = cfg.get("activations", ("sigmoid", "tanh", "tanh"))
    h_in = h if rec_mask is None else h * rec_mask
    w_hh = p["weight_hh"] if p.get("weight_mask") is None else p["weight_hh"] * p["weight_mask"]
    from_x = p["weight_ih"] @ x
    from_h = w_hh @ h_in
    if cfg.get("layer_norm"):
        from_x = layer_norm(from_x, p["layer_norm_ih_weight"])
        from_h = layer_norm(from_h, p["layer_norm_hh_weight"])
    z = from_x + from_h
    if p.get("bias_ih") is not None:
        z = z + p["bias_ih"] + p["bias_hh"]
    z_i, z_f, z_g, z_o = (z[k * hidden : (k + 1) * hidden] for k in range(4))
    if cfg.get("peephole"):
        peep = p["weight_peephole"]
        z_i = z_i + peep[:hidden] * c
        z_f = z_f + peep[hidden : 2 * hidden] * c
    i = activation(gate_f, clip(z_i, cfg.get("clip")))
    if cfg.get("coupled_input_forget"):
        f = 1.0 - i
    else:
        f = activation(gate_f, clip(z_f, cfg.get("clip")))
    g = activation(cell_in_f, clip(z_g, cfg.get("clip")))
    c_new = clip(f * c + i * g, cfg.get("cell_clip"))
    if cfg.get("peephole"):
        z_o = z_o + p["weight_peephole"][2 * hidden :] * c_new
    o = activation(gate_f, clip(z_o, cfg.get("clip")))
    c_shown = layer_norm(c_new, p["layer_norm_cell_weight"], p["layer_norm_cell_bias"]) if cfg.get("layer_norm") else c_new
    h_new = o * activation(cell_out_f, c_shown)
    if p.get("weight_hr") is not None:
        h_new = clip(p["weight_hr"] @ h_new, cfg.get("proj_clip"))
    if keep_h is not None:
        h_new = keep_h * h + (1 - keep_h) * h_new
    if keep_c is not None:
        c_new = keep_c * c + (1 - keep_c) * c_new
    return h_new, c_new


def direction_params(module, layer: int, reverse: bool) -> dict:
    suffix = f"_l{layer}" + ("_reverse" if reverse else "")
    params = {}
    for name, value in module.named_parameters():
        if name.endswith(suffix) and not name.endswith(suffix + "_reverse"):
            params[name[: -len(suffix)]] = value
    return params


def lstm(module, x, lengths, h0, c0, cfg, *, masks=None, training=False):
    """fastlstm.LSTM's forward, sequence by sequence and layer by layer.

    x: ``[T, B, I]``; lengths: list of ints (or None for all ``T``); h0/c0: ``[L * D, B, .]``;
    masks: the fastlstm ``LSTMMasks`` of a training run, or None.
    Returns ``(y [T, B, D * H_out] zero-padded, h_n [L * D, B, H_out], c_n [L * D, B, H])``.
    """
    steps, batch = x.shape[:2]
    lengths = lengths if lengths is not None else [steps] * batch
    directions = 2 if module.bidirectional else 1
    h_n, c_n = [], []
    layer_input = x
    for layer in range(module.num_layers):
        y, h, c = _layer(module, layer, layer_input, lengths, h0, c0, cfg, masks, training)
        h_n.append(h)
        c_n.append(c)
        if training and masks is not None and layer < module.num_layers - 1 and masks.inter_layer[layer] is not None:
            y = y * masks.inter_layer[layer]
        layer_input = y
    return layer_input, torch.cat(h_n), torch.cat(c_n)


def _layer(module, layer, x, lengths, h0, c0, cfg, masks, training):
    steps, batch = x.shape[:2]
    directions = 2 if module.bidirectional else 1
    z_h, z_c = cfg.get("zoneout", (0.0, 0.0))
    if not isinstance(cfg.get("zoneout", 0.0), (tuple, list)):
        z_h = z_c = cfg.get("zoneout", 0.0)
    ys, hs, cs = [], [], []
    for d in range(directions):
        p = direction_params(module, layer, d == 1)
        m = masks.layers[layer][d] if (training and masks is not None) else None
        if m is not None and m.weight_hh is not None:
            p = dict(p, weight_mask=m.weight_hh)
        state = layer * directions + d
        y_cols, h_cols, c_cols = [], [], []
        for b in range(batch):
            length = lengths[b]
            order = range(length - 1, -1, -1) if d == 1 else range(length)
            h, c = h0[state, b], c0[state, b]
            outputs = {}
            for t in order:
                if training:
                    keep_h = None if m is None or m.zoneout_h is None else m.zoneout_h[t, b]
                    keep_c = None if m is None or m.zoneout_c is None else m.zoneout_c[t, b]
                else:
                    keep_h = z_h or None
                    keep_c = z_c or None
                rec = None if m is None or m.recurrent is None else m.recurrent[b]
                h, c = step(x[t, b], h, c, p, cfg, rec_mask=rec, keep_h=keep_h, keep_c=keep_c)
                outputs[t] = h
            zero = torch.zeros_like(h)
            y_cols.append(torch.stack([outputs.get(t, zero) for t in range(steps)]))
            h_cols.append(h)
            c_cols.append(c)
        ys.append(torch.stack(y_cols, dim=1))
        hs.append(torch.stack(h_cols))
        cs.append(torch.stack(c_cols))
    return torch.cat(ys, dim=2), torch.stack(hs), torch.stack(cs)
