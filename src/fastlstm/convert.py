"""Conversion of fastlstm parameters to and from the inputs of ONNX's ``LSTM`` operator.

This is the only module that knows a gate layout other than torch's. fastlstm (like torch) stacks
gates as ``i, f, g, o`` and peepholes as ``i, f, o``; ONNX stacks gates as ``i, o, f, c`` (``c`` is
torch's ``g``) and peepholes as ``i, o, f``.

Shape legend: ``D`` directions, ``H`` hidden size, ``I`` layer input size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .options import LSTMOptions
from .weights import DirectionWeights, parameter_name

ONNX_ACTIVATIONS = {
    "sigmoid": "Sigmoid",
    "hard_sigmoid": "HardSigmoid",  # alpha 0.2, beta 0.5: ONNX's defaults
    "tanh": "Tanh",
    "softsign": "Softsign",
    "relu": "Relu",
    "hardsigmoid": "HardSigmoid",  # alpha 1/6, beta 0.5
}
# (alpha, beta) of ONNX's HardSigmoid(x) = clip(alpha x + beta, 0, 1) for fastlstm's two hard sigmoids.
_HARD_SIGMOIDS = {"hard_sigmoid": (0.2, 0.5), "hardsigmoid": (1.0 / 6.0, 0.5)}

_GATES_TO_ONNX = (0, 3, 1, 2)  # torch chunks (i, f, g, o) -> ONNX order (i, o, f, c)
_PEEPHOLES_TO_ONNX = (0, 2, 1)  # fastlstm chunks (i, f, o) -> ONNX order (i, o, f)


def _reorder(t: Tensor, order: tuple[int, ...]) -> Tensor:
    """Permute the equal chunks of ``t``'s first dimension into ``order``."""
    # (one gather, no split: an exported graph's weights fold to constants, and ONNX folders skip Split)
    index = torch.tensor(order, device=t.device)
    return t.unflatten(0, (len(order), -1)).index_select(0, index).flatten(0, 1)


def _refuse(target: str, module, checks: dict[str, bool], allowed: tuple[str, ...]) -> None:
    """Raise a ValueError naming the first setting of ``module`` that ``target`` cannot express: a
    true entry of ``checks``, else an option that differs from its default and is not ``allowed``."""
    others = {name: True for name in module.options.non_defaults() if name not in allowed}
    for name, present in {**checks, **others}.items():
        if present:
            raise ValueError(f"{name}: {target} cannot express it")


def _summed_bias(module, layer: int, suffix: str) -> Tensor:
    """``b_ih + b_hh`` of one layer and direction (zeros without biases): the one bias that MATLAB,
    Keras and haste keep. Gates in torch's order, detached."""
    if not module.bias:
        return getattr(module, f"weight_hh_l{layer}{suffix}").detach().new_zeros(4 * module.hidden_size)
    return (getattr(module, f"bias_ih_l{layer}{suffix}") + getattr(module, f"bias_hh_l{layer}{suffix}")).detach()


def check_onnx_expressible(module) -> None:
    """Raise ``ValueError`` naming the first setting of ``module`` that ONNX's LSTM cannot express."""
    options: LSTMOptions = module.options
    refused = {
        "proj_size": module.proj_size > 0,
        "layer_norm": options.layer_norm,
        "zoneout": options.has_zoneout,
        "recurrent_dropout": options.recurrent_dropout > 0,
        "weight_drop": options.weight_drop > 0,
        "cell_clip": options.cell_clip is not None,
    }
    for name, present in refused.items():
        if present:
            raise ValueError(f"ONNX's LSTM operator cannot express {name}; export a module without it")


def onnx_lstm_inputs(module, layer: int = 0) -> dict[str, Tensor]:
    """The weight inputs of an ONNX ``LSTM`` node equivalent to one layer of ``module``.

    Args:
        module: a :class:`fastlstm.LSTM`.
        layer: which layer, ``0 <= layer < module.num_layers``.

    Returns:
        ``{"W": [D, 4H, I], "R": [D, 4H, H], "B": [D, 8H]}`` plus ``"P": [D, 3H]`` if the module
        has peepholes; detached tensors in the module's dtype, gates in ONNX's order ``i, o, f, c``
        (peepholes ``i, o, f``). ``B`` is ``[Wb, Rb]`` per direction, zeros when ``bias=False``.
        The node's ``activations``, ``clip``, ``input_forget`` and ``direction`` attributes come
        from the module's options (see :func:`onnx_activation_attributes`).

    Raises:
        ValueError: if the module uses an option ONNX cannot express, or ``layer`` is out of range.
    """
    check_onnx_expressible(module)
    if not 0 <= layer < module.num_layers:
        raise ValueError(f"layer should be in [0, {module.num_layers}), got {layer}")
    directions = (False, True) if module.bidirectional else (False,)
    return onnx_weights([_detached_weights(module, layer, rev) for rev in directions])


def _detached_weights(module, layer: int, reverse: bool) -> DirectionWeights:
    def field(name: str) -> Tensor | None:
        parameter = getattr(module, parameter_name(name, layer, reverse), None)
        return None if parameter is None else parameter.detach()

    return DirectionWeights(*(field(name) for name in DirectionWeights._fields))


def onnx_weights(weights: Sequence[DirectionWeights]) -> dict[str, Tensor]:
    """``W``, ``R``, ``B`` (and ``P`` with peepholes) of an ONNX ``LSTM`` node from one layer's
    directions (forward first), as torch ops on them (the export route traces them): shapes and
    orders as in :func:`onnx_lstm_inputs`."""
    def stack(field: str, order: tuple[int, ...]) -> Tensor:
        return torch.stack([_reorder(getattr(w, field), order) for w in weights])

    inputs = {"W": stack("weight_ih", _GATES_TO_ONNX), "R": stack("weight_hh", _GATES_TO_ONNX)}
    if weights[0].bias_ih is not None:
        inputs["B"] = torch.cat([stack("bias_ih", _GATES_TO_ONNX), stack("bias_hh", _GATES_TO_ONNX)], dim=1)
    else:
        w = inputs["W"]
        inputs["B"] = w.new_zeros(len(weights), 2 * w.shape[1])
    if weights[0].weight_peephole is not None:
        inputs["P"] = stack("weight_peephole", _PEEPHOLES_TO_ONNX)
    return inputs


def onnx_activation_attributes(options: LSTMOptions, num_directions: int) -> dict[str, list]:
    """ONNX's ``activations`` attribute (the (gate, cell input, cell output) names, once per
    direction) and, when a hard sigmoid is among them, ``activation_alpha`` / ``activation_beta``.

    ONNX consumes alphas and betas only for the activations that take them, in order (onnxruntime's
    rnn_helpers; pinned by tests/test_reference.py), so the lists hold one entry per ``HardSigmoid``.
    """
    names = list(options.activations) * num_directions
    attributes: dict[str, list] = {"activations": [ONNX_ACTIVATIONS[name] for name in names]}
    hard = [_HARD_SIGMOIDS[name] for name in names if name in _HARD_SIGMOIDS]
    if hard:
        attributes["activation_alpha"] = [alpha for alpha, _ in hard]
        attributes["activation_beta"] = [beta for _, beta in hard]
    return attributes


# -- from ONNX: an LSTM node's inputs and attributes as a fastlstm.LSTM's -----------------------------

_GATES_FROM_ONNX = (0, 2, 3, 1)  # ONNX chunks (i, o, f, c) -> torch order (i, f, g, o)
_PEEPHOLES_FROM_ONNX = (0, 2, 1)  # ONNX chunks (i, o, f) -> fastlstm order (i, f, o)
_ONNX_DEFAULT_ACTIVATIONS = ["Sigmoid", "Tanh", "Tanh"]


def lstm_from_onnx(attributes: dict, tensors: dict[str, Tensor]) -> tuple[dict, dict[str, Tensor]]:
    """An ONNX ``LSTM`` node as ``(keyword arguments of fastlstm.LSTM, its state_dict)``.

    Args:
        attributes: the node's attributes by name (``hidden_size``, ``direction``, ``activations``,
            ``activation_alpha``, ``activation_beta``, ``clip``, ``input_forget``, ``layout``).
        tensors: ``W [D, 4H, I]``, ``R [D, 4H, H]``, optional ``B [D, 8H]`` and ``P [D, 3H]``.

    Raises:
        ValueError: naming the attribute fastlstm cannot express, or the tensor whose shape does not
            match the others (with the expected shape).
    """
    direction = attributes.get("direction", "forward")
    if direction not in ("forward", "bidirectional"):
        raise ValueError(f"direction={direction!r}: fastlstm has no reverse-only layer; flip the input's time "
                         "axis and import the node as direction='forward'")
    num_directions = 2 if direction == "bidirectional" else 1
    w, r = tensors["W"], tensors["R"]
    if w.dim() != 3 or w.shape[0] != num_directions or w.shape[1] % 4:
        raise ValueError(f"W should be [{num_directions}, 4 * hidden_size, input_size], got {list(w.shape)}")
    hidden, inputs = w.shape[1] // 4, w.shape[2]
    if attributes.get("hidden_size", hidden) != hidden:
        raise ValueError(f"W should be [{num_directions}, {4 * attributes['hidden_size']}, input_size] "
                         f"(hidden_size={attributes['hidden_size']}), got {list(w.shape)}")
    expected = {"R": [num_directions, 4 * hidden, hidden], "B": [num_directions, 8 * hidden],
                "P": [num_directions, 3 * hidden]}
    for name, shape in expected.items():
        if name in tensors and list(tensors[name].shape) != shape:
            raise ValueError(f"{name} should be {shape} (from W {list(w.shape)}), got {list(tensors[name].shape)}")
    activations = list(attributes.get("activations", _ONNX_DEFAULT_ACTIVATIONS))
    if len(activations) == 3:  # (one set for every direction)
        activations *= num_directions
    per_direction = [activations[k : k + 3] for k in range(0, len(activations), 3)]
    if len(activations) != 3 * num_directions or any(a != per_direction[0] for a in per_direction):
        raise ValueError(f"activations={activations}: fastlstm needs the same three activations for every direction")
    ours = _activations_from_onnx(activations, attributes.get("activation_alpha", []),
                                  attributes.get("activation_beta", []))
    if any(a != ours[:3] for a in (ours[k : k + 3] for k in range(0, len(ours), 3))):
        raise ValueError(f"activations={activations} with activation_alpha/beta: fastlstm needs the same three "
                         "activations for every direction")
    kwargs = dict(input_size=inputs, hidden_size=hidden, bidirectional=num_directions == 2, bias=True,
                  batch_first=attributes.get("layout", 0) == 1, peephole="P" in tensors,
                  activations=tuple(ours[:3]), clip=attributes.get("clip"),
                  coupled_input_forget=bool(attributes.get("input_forget", 0)))
    bias = tensors.get("B", w.new_zeros(num_directions, 8 * hidden))
    state = {}
    for d in range(num_directions):
        peephole = tensors["P"][d] if "P" in tensors else None
        for field, value in from_onnx_direction(w[d], r[d], bias[d], peephole).items():
            state[parameter_name(field, 0, d == 1)] = value
    return kwargs, state


def from_onnx_direction(w: Tensor, r: Tensor, b: Tensor, p: Tensor | None) -> dict[str, Tensor]:
    """One direction of an ONNX ``LSTM`` node's ``W [4H, I]``, ``R [4H, H]``, ``B [8H]`` and ``P [3H]``
    (or None) as fastlstm's fields (``weight_ih``, ...; gates in torch's order)."""
    hidden = r.shape[1]
    fields = {"weight_ih": _reorder(w, _GATES_FROM_ONNX), "weight_hh": _reorder(r, _GATES_FROM_ONNX),
              "bias_ih": _reorder(b[: 4 * hidden], _GATES_FROM_ONNX), "bias_hh": _reorder(b[4 * hidden :], _GATES_FROM_ONNX)}
    if p is not None:
        fields["weight_peephole"] = _reorder(p, _PEEPHOLES_FROM_ONNX)
    return fields


def _activations_from_onnx(activations: list[str], alphas: list[float], betas: list[float]) -> list[str]:
    """fastlstm's names for ONNX activations; each HardSigmoid takes the next alpha and beta (ONNX's
    defaults 0.2 and 0.5 where the lists run out)."""
    names = {onnx: ours for ours, onnx in ONNX_ACTIVATIONS.items() if ours != "hardsigmoid"}
    unknown = [a for a in activations if a not in names]
    if unknown:
        raise ValueError(f"activations: fastlstm has no {unknown[0]}; it has {sorted(names)}")
    hard = activations.count("HardSigmoid")
    if len(alphas) > hard or len(betas) > hard:
        raise ValueError(f"activation_alpha={alphas}, activation_beta={betas}: only HardSigmoid takes them in "
                         f"fastlstm, and there are {hard} of it")
    ours, k = [], 0
    for a in activations:
        if a != "HardSigmoid":
            ours.append(names[a])
            continue
        alpha = alphas[k] if k < len(alphas) else 0.2
        beta = betas[k] if k < len(betas) else 0.5
        k += 1
        match = [n for n, (x, y) in _HARD_SIGMOIDS.items()
                 if math.isclose(alpha, x, rel_tol=1e-6) and math.isclose(beta, y, rel_tol=1e-6)]
        if not match:
            raise ValueError(f"activation_alpha={alphas}, activation_beta={betas}: fastlstm's HardSigmoids are "
                             "hard_sigmoid (alpha 0.2, beta 0.5) and hardsigmoid (alpha 1/6, beta 0.5)")
        ours.append(match[0])
    return ours


# -- MATLAB: lstmLayer / bilstmLayer (Deep Learning Toolbox) --------------------------------------------
# InputWeights [4H, I], RecurrentWeights [4H, H], Bias [4H] stack the gates in torch's order (input,
# forget, cell candidate, output); bilstmLayer stacks the forward direction's then the backward's
# ([8H, .]). One bias per direction. GateActivationFunction is the gates' activation,
# StateActivationFunction both the cell candidate's and the cell output's.

MATLAB_GATE_ACTIVATIONS = {"sigmoid": "sigmoid", "hard-sigmoid": "hard_sigmoid"}
MATLAB_STATE_ACTIVATIONS = {"tanh": "tanh", "softsign": "softsign", "relu": "relu"}


def lstm_from_matlab(input_weights: Tensor, recurrent_weights: Tensor, bias: Tensor, gate_activation: str,
                     state_activation: str) -> tuple[dict, dict[str, Tensor]]:
    """A MATLAB ``lstmLayer``'s (or ``bilstmLayer``'s) learnables as ``(keyword arguments of
    fastlstm.LSTM, its state_dict)``; a ValueError names the tensor whose shape does not match, or the
    activation fastlstm does not have."""
    if recurrent_weights.dim() != 2 or recurrent_weights.shape[0] % 4:
        raise ValueError(f"RecurrentWeights should be [4 * NumHiddenUnits (8 * for bilstmLayer), NumHiddenUnits], "
                         f"got {list(recurrent_weights.shape)}")
    hidden = recurrent_weights.shape[1]
    directions = recurrent_weights.shape[0] // (4 * hidden)
    if directions not in (1, 2) or recurrent_weights.shape[0] != 4 * hidden * directions:
        raise ValueError(f"RecurrentWeights should be [{4 * hidden} or {8 * hidden}, {hidden}], "
                         f"got {list(recurrent_weights.shape)}")
    rows = 4 * hidden * directions
    if input_weights.dim() != 2 or input_weights.shape[0] != rows:
        raise ValueError(f"InputWeights should be [{rows}, InputSize] (from RecurrentWeights "
                         f"{list(recurrent_weights.shape)}), got {list(input_weights.shape)}")
    if bias.reshape(-1).shape[0] != rows:
        raise ValueError(f"Bias should have {rows} elements (from RecurrentWeights), got shape {list(bias.shape)}")
    if gate_activation not in MATLAB_GATE_ACTIVATIONS:
        raise ValueError(f"GateActivationFunction={gate_activation!r}: fastlstm has {sorted(MATLAB_GATE_ACTIVATIONS)}")
    if state_activation not in MATLAB_STATE_ACTIVATIONS:
        raise ValueError(f"StateActivationFunction={state_activation!r}: fastlstm has "
                         f"{sorted(MATLAB_STATE_ACTIVATIONS)}")
    state_name = MATLAB_STATE_ACTIVATIONS[state_activation]
    kwargs = dict(input_size=input_weights.shape[1], hidden_size=hidden, bidirectional=directions == 2,
                  activations=(MATLAB_GATE_ACTIVATIONS[gate_activation], state_name, state_name))
    state = {}
    bias = bias.reshape(-1)
    for d in range(directions):
        suffix, part = ("_reverse" if d else ""), slice(d * 4 * hidden, (d + 1) * 4 * hidden)
        state[f"weight_ih_l0{suffix}"] = input_weights[part]
        state[f"weight_hh_l0{suffix}"] = recurrent_weights[part]
        state[f"bias_ih_l0{suffix}"] = bias[part]
        state[f"bias_hh_l0{suffix}"] = torch.zeros_like(bias[part])
    return kwargs, state


def matlab_from_lstm(module) -> dict:
    """A one-layer ``fastlstm.LSTM``'s learnables in MATLAB's layout: ``InputWeights``,
    ``RecurrentWeights``, ``Bias`` (``b_ih + b_hh``), ``GateActivationFunction``,
    ``StateActivationFunction``; a ValueError names what an ``lstmLayer`` cannot express."""
    gate, cell_in, cell_out = module.options.activations
    _refuse("a MATLAB lstmLayer", module, {
        f"num_layers={module.num_layers}": module.num_layers != 1,
        f"proj_size={module.proj_size}": module.proj_size > 0,
        f"activations={module.options.activations}": cell_in != cell_out or cell_in not in MATLAB_STATE_ACTIVATIONS
        or gate not in MATLAB_GATE_ACTIVATIONS.values(),
    }, allowed=("activations", "forget_bias"))
    directions = ("", "_reverse") if module.bidirectional else ("",)

    def stacked(field):
        return torch.cat([getattr(module, f"{field}_l0{s}").detach() for s in directions])

    bias = torch.cat([_summed_bias(module, 0, s) for s in directions])
    return {"InputWeights": stacked("weight_ih"), "RecurrentWeights": stacked("weight_hh"), "Bias": bias,
            "GateActivationFunction": {v: k for k, v in MATLAB_GATE_ACTIVATIONS.items()}[gate],
            "StateActivationFunction": cell_in}


# -- TensorFlow 1: tf.compat.v1.nn.rnn_cell.LSTMCell / tf.contrib.rnn.LSTMBlockCell ----------------------
# ``kernel [I + H_out, 4H]`` (the input's rows, then the recurrent state's) and ``bias [4H]`` stack the
# gates as i, j, f, o (j is torch's g); ``forget_bias`` is added to f's pre-activation at run time;
# peepholes are the diagonals ``w_i_diag``, ``w_f_diag``, ``w_o_diag`` [H]; ``num_proj`` adds
# ``projection/kernel [H, P]``; ``cell_clip`` and ``proj_clip`` are fastlstm's options of those names.

_GATES_FROM_TF1 = (0, 2, 1, 3)  # TF1 chunks (i, j, f, o) -> torch order (i, f, g, o)


def lstm_from_tf1(kernel: Tensor, bias: Tensor, *, forget_bias: float, peepholes: tuple | None,
                  projection: Tensor | None, cell_clip: float | None, proj_clip: float | None,
                  activation: str) -> tuple[dict, dict[str, Tensor]]:
    """A TF1 ``LSTMCell``'s variables as ``(keyword arguments of fastlstm.LSTM, its state_dict)``;
    ``peepholes`` is ``(w_i_diag, w_f_diag, w_o_diag)``. A ValueError names the variable whose shape
    does not match the others (with the expected shape)."""
    if bias.dim() != 1 or bias.shape[0] % 4:
        raise ValueError(f"bias should be [4 * num_units], got {list(bias.shape)}")
    hidden = bias.shape[0] // 4
    h_out = hidden if projection is None else projection.shape[1]
    if projection is not None and list(projection.shape) != [hidden, h_out]:
        raise ValueError(f"projection/kernel should be [{hidden}, num_proj], got {list(projection.shape)}")
    if kernel.dim() != 2 or kernel.shape[1] != 4 * hidden or kernel.shape[0] <= h_out:
        raise ValueError(f"kernel should be [input_depth + {h_out}, {4 * hidden}] (from bias {list(bias.shape)}), "
                         f"got {list(kernel.shape)}")
    for name, diagonal in zip(("w_i_diag", "w_f_diag", "w_o_diag"), peepholes or ()):
        if list(diagonal.shape) != [hidden]:
            raise ValueError(f"{name} should be [{hidden}], got {list(diagonal.shape)}")
    if activation not in ("tanh", "softsign", "relu"):
        raise ValueError(f"activation={activation!r}: fastlstm has 'tanh', 'softsign' and 'relu' for the cell")
    inputs = kernel.shape[0] - h_out
    kwargs = dict(input_size=inputs, hidden_size=hidden, proj_size=0 if projection is None else h_out,
                  peephole=peepholes is not None, cell_clip=cell_clip, proj_clip=proj_clip,
                  activations=("sigmoid", activation, activation))
    bias = _reorder(bias, _GATES_FROM_TF1).clone()
    bias[hidden : 2 * hidden] += forget_bias  # (added at run time in TF1: here once, into the forget slice)
    state = {"weight_ih_l0": _reorder(kernel[:inputs].t(), _GATES_FROM_TF1),
             "weight_hh_l0": _reorder(kernel[inputs:].t(), _GATES_FROM_TF1),
             "bias_ih_l0": bias, "bias_hh_l0": torch.zeros_like(bias)}
    if peepholes is not None:
        state["weight_peephole_l0"] = torch.cat(list(peepholes))  # fastlstm's order: i, f, o
    if projection is not None:
        state["weight_hr_l0"] = projection.t()
    return kwargs, state


# -- Keras (Keras 3 and tf.keras 2): keras.layers.LSTM and Bidirectional(LSTM) ---------------------------
# kernel [I, 4H], recurrent_kernel [H, 4H], bias [4H] (one, optional): torch's weights transposed, gates in
# torch's order (Keras names them i, f, c, o). ``recurrent_activation`` is the gates' activation,
# ``activation`` both the cell candidate's and the cell output's. Keras 3's "hard_sigmoid" is
# relu6(x + 3) / 6 (keras/src/ops/nn.py), tf.keras 2's clip(0.2 x + 0.5, 0, 1).

_KERAS_ACTIVATIONS = {"sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu", "softsign": "softsign"}
_KERAS_HARD_SIGMOID = {3: "hardsigmoid", 2: "hard_sigmoid"}


def _keras_activations(keras_version: int) -> dict[str, str]:
    """Keras's activation names -> fastlstm's, for ``keras_version`` 2 or 3."""
    if keras_version not in _KERAS_HARD_SIGMOID:
        raise ValueError(f"keras_version should be 2 (tf.keras) or 3, got {keras_version!r}")
    return {**_KERAS_ACTIVATIONS, "hard_sigmoid": _KERAS_HARD_SIGMOID[keras_version]}


def keras_layer_config(config: dict) -> dict:
    """An LSTM's config from a serialized layer (``{"class_name": "LSTM", "config": {...}}``) or itself."""
    return config["config"] if "config" in config and "class_name" in config else config


def lstm_from_keras(config: dict, weights: list[Tensor], *, keras_version: int) -> tuple[dict, dict[str, Tensor], bool]:
    """A Keras ``LSTM`` (or ``Bidirectional(LSTM)``) as ``(keyword arguments of fastlstm.LSTM, its
    state_dict, go_backwards)``, from the layer's ``get_config()`` and ``get_weights()``.

    A Bidirectional's config holds ``layer`` (and ``backward_layer``, ``merge_mode``); its weights are
    the forward layer's, then the backward layer's. A ValueError names the config entry fastlstm
    cannot express or the weight whose shape does not match (with the expected shape).
    """
    bidirectional = "layer" in config
    layers = [keras_layer_config(config["layer"] if bidirectional else config)]
    if bidirectional:
        if config.get("merge_mode", "concat") != "concat":
            raise ValueError(f"merge_mode={config['merge_mode']!r}: fastlstm concatenates the two directions "
                             "(merge_mode='concat')")
        layers.append(keras_layer_config(config["backward_layer"]) if config.get("backward_layer") else
                      {**layers[0], "go_backwards": True})
    keras_defaults = {"activation": "tanh", "recurrent_activation": "sigmoid", "use_bias": True}
    layers = [{**keras_defaults, **layer} for layer in layers]
    first = layers[0]
    for key in ("units", "activation", "recurrent_activation", "use_bias", "recurrent_dropout", "time_major"):
        if any(layer.get(key) != first.get(key) for layer in layers):
            raise ValueError(f"{key}: the backward layer's differs from the forward layer's; fastlstm's two "
                             "directions share their options")
    if bidirectional and (first.get("go_backwards") or not layers[1].get("go_backwards")):
        raise ValueError("go_backwards: a Bidirectional's forward layer should have go_backwards=False and its "
                         "backward layer go_backwards=True")
    names = _keras_activations(keras_version)
    for key in ("activation", "recurrent_activation"):
        if not isinstance(first.get(key), str) or first[key] not in names:
            raise ValueError(f"{key}={first.get(key)!r}: fastlstm imports {sorted(names)}")
    hidden, use_bias = int(first["units"]), bool(first.get("use_bias", True))
    per_layer = 3 if use_bias else 2
    if len(weights) != per_layer * len(layers):
        raise ValueError(f"weights: expected {per_layer * len(layers)} arrays (kernel, recurrent_kernel"
                         f"{', bias' if use_bias else ''} per direction), got {len(weights)}")
    inputs = weights[0].shape[0] if weights[0].dim() == 2 else 0
    state = {}
    for d in range(len(layers)):
        suffix = "_reverse" if d else ""
        kernel, recurrent, *bias = weights[d * per_layer : (d + 1) * per_layer]
        expected = {"kernel": (kernel, [inputs, 4 * hidden]), "recurrent_kernel": (recurrent, [hidden, 4 * hidden]),
                    **({"bias": (bias[0], [4 * hidden])} if use_bias else {})}
        for name, (tensor, shape) in expected.items():
            if list(tensor.shape) != shape or inputs == 0:
                wanted = ["input_dim" if inputs == 0 else inputs, 4 * hidden] if name == "kernel" else shape
                raise ValueError(f"{name} should be {wanted} (units={hidden}), got {list(tensor.shape)}")
        state[f"weight_ih_l0{suffix}"] = kernel.t()
        state[f"weight_hh_l0{suffix}"] = recurrent.t()
        if use_bias:
            state[f"bias_ih_l0{suffix}"] = bias[0]
            state[f"bias_hh_l0{suffix}"] = torch.zeros_like(bias[0])
    cell = names[first["activation"]]
    kwargs = dict(input_size=inputs, hidden_size=hidden, bias=use_bias, bidirectional=bidirectional,
                  batch_first=not first.get("time_major", False),
                  activations=(names[first["recurrent_activation"]], cell, cell),
                  recurrent_dropout=float(first.get("recurrent_dropout", 0.0)))
    return kwargs, state, bool(first.get("go_backwards", False)) and not bidirectional


def keras_from_lstm(module, *, layer: int, go_backwards: bool, keras_version: int) -> tuple[str, dict, list[Tensor]]:
    """One layer of a ``fastlstm.LSTM`` as ``(class_name, config, weights)`` of a Keras layer:
    ``("LSTM", keyword arguments of keras.layers.LSTM, [kernel, recurrent_kernel, bias])`` or, if
    bidirectional, ``("Bidirectional", {"layer": those keywords, "merge_mode": "concat"}, forward's
    weights then backward's)``. The config asks for ``return_sequences`` and ``return_state``, so the
    Keras layer returns what the module does. A ValueError names what Keras cannot express."""
    names = {ours: theirs for theirs, ours in _keras_activations(keras_version).items()}
    gate, cell_in, cell_out = module.options.activations
    _refuse("a Keras LSTM", module, {
        f"proj_size={module.proj_size}": module.proj_size > 0,
        f"activations={module.options.activations} (Keras {keras_version})":
            cell_in != cell_out or any(a not in names for a in (gate, cell_in)),
    }, allowed=("activations", "forget_bias", "recurrent_dropout"))
    if not 0 <= layer < module.num_layers:
        raise ValueError(f"layer should be in [0, {module.num_layers}), got {layer}")
    config = dict(units=module.hidden_size, activation=names[cell_in], recurrent_activation=names[gate],
                  use_bias=module.bias, return_sequences=True, return_state=True,
                  recurrent_dropout=module.options.recurrent_dropout)
    weights = []
    for suffix in ("", "_reverse") if module.bidirectional else ("",):
        weights += [getattr(module, f"{field}_l{layer}{suffix}").detach().t() for field in ("weight_ih", "weight_hh")]
        if module.bias:
            weights.append(_summed_bias(module, layer, suffix))
    if module.bidirectional:
        return "Bidirectional", {"layer": config, "merge_mode": "concat"}, weights
    return "LSTM", {**config, "go_backwards": go_backwards}, weights


# -- haste (LMNT): haste_pytorch.LSTM / LayerNormLSTM -----------------------------------------------------
# kernel [I, 4H], recurrent_kernel [H, 4H], bias [4H] with the gates stacked i, g, f, o
# (lib/lstm_forward_gpu.cu.cc); LayerNormLSTM adds gamma [2, 4H] (the gains of the input product's and
# the recurrent product's layer norms, same gate order), gamma_h and beta_h [H] (the cell's): the form
# of fastlstm's layer_norm, eps 1e-5 (lib/layer_norm_forward_gpu.cu.cc). haste's zoneout acts on h only,
# its dropout is DropConnect on recurrent_kernel: fastlstm's zoneout=(z, 0) and weight_drop.

_GATES_FROM_HASTE = (0, 2, 1, 3)  # haste chunks (i, g, f, o) <-> torch order (i, f, g, o), both ways


def lstm_from_haste(state: dict[str, Tensor]) -> tuple[dict, dict[str, Tensor]]:
    """A haste ``LSTM`` / ``LayerNormLSTM`` state_dict as ``(keyword arguments of fastlstm.LSTM, its
    state_dict)``; a ValueError names the tensor that is missing or whose shape does not match."""
    for name in ("kernel", "recurrent_kernel", "bias"):
        if name not in state:
            raise ValueError(f"{name}: missing from the haste state_dict (it has {sorted(state)})")
    recurrent = state["recurrent_kernel"]
    if recurrent.dim() != 2 or recurrent.shape[1] != 4 * recurrent.shape[0]:
        raise ValueError(f"recurrent_kernel should be [hidden_size, 4 * hidden_size], got {list(recurrent.shape)}")
    hidden = recurrent.shape[0]
    layer_norm = "gamma" in state
    expected = {"kernel": None, "bias": [4 * hidden]}
    if layer_norm:
        expected.update(gamma=[2, 4 * hidden], gamma_h=[hidden], beta_h=[hidden])
    kernel = state["kernel"]
    if kernel.dim() != 2 or kernel.shape[1] != 4 * hidden:
        raise ValueError(f"kernel should be [input_size, {4 * hidden}] (from recurrent_kernel), got {list(kernel.shape)}")
    for name, shape in expected.items():
        if shape is not None and (name not in state or list(state[name].shape) != shape):
            found = list(state[name].shape) if name in state else "nothing"
            raise ValueError(f"{name} should be {shape} (from recurrent_kernel {list(recurrent.shape)}), got {found}")
    ours = {"weight_ih_l0": _reorder(kernel.t(), _GATES_FROM_HASTE),
            "weight_hh_l0": _reorder(recurrent.t(), _GATES_FROM_HASTE),
            "bias_ih_l0": _reorder(state["bias"], _GATES_FROM_HASTE), "bias_hh_l0": torch.zeros_like(state["bias"])}
    if layer_norm:
        ours.update(layer_norm_ih_weight_l0=_reorder(state["gamma"][0], _GATES_FROM_HASTE),
                    layer_norm_hh_weight_l0=_reorder(state["gamma"][1], _GATES_FROM_HASTE),
                    layer_norm_cell_weight_l0=state["gamma_h"], layer_norm_cell_bias_l0=state["beta_h"])
    return dict(input_size=kernel.shape[0], hidden_size=hidden, layer_norm=layer_norm), ours


def haste_from_lstm(module) -> dict[str, Tensor]:
    """A one-layer, one-direction ``fastlstm.LSTM`` as a haste ``LSTM`` (or, with ``layer_norm``,
    ``LayerNormLSTM``) state_dict (``bias`` is ``b_ih + b_hh``); a ValueError names what haste cannot
    express."""
    options = module.options
    _refuse("haste's LSTM", module, {
        f"num_layers={module.num_layers}": module.num_layers != 1,
        "bidirectional=True": module.bidirectional,
        f"proj_size={module.proj_size}": module.proj_size > 0,
        f"zoneout={options.zoneout} (haste zones out h only)": options.zoneout[1] > 0,
    }, allowed=("layer_norm", "zoneout", "weight_drop", "forget_bias"))

    def haste_order(name: str) -> Tensor:
        return _reorder(getattr(module, f"{name}_l0").detach(), _GATES_FROM_HASTE)

    state = {"kernel": haste_order("weight_ih").t(), "recurrent_kernel": haste_order("weight_hh").t(),
             "bias": _reorder(_summed_bias(module, 0, ""), _GATES_FROM_HASTE)}
    if options.layer_norm:
        state.update(gamma=torch.stack([haste_order("layer_norm_ih_weight"), haste_order("layer_norm_hh_weight")]),
                     gamma_h=module.layer_norm_cell_weight_l0.detach(), beta_h=module.layer_norm_cell_bias_l0.detach())
    return state
