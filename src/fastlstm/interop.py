"""fastlstm and other libraries' models: :func:`convert_lstms` converts every LSTM of a torch model,
:func:`from_onnx` imports every ``LSTM`` node of an ONNX model, :func:`from_matlab` / :func:`to_matlab`
take MATLAB's ``lstmLayer`` / ``bilstmLayer`` learnables both ways, :func:`from_tf1` imports a TF1
``LSTMCell`` / ``LSTMBlockCell``'s variables, :func:`from_keras` / :func:`to_keras` a Keras ``LSTM`` or
``Bidirectional(LSTM)`` both ways, :func:`from_haste` / :func:`to_haste` haste's ``LSTM`` and
``LayerNormLSTM`` both ways. Every layout but torch's is known only to :mod:`fastlstm.convert`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .convert import (haste_from_lstm, keras_from_lstm, keras_layer_config, lstm_from_haste, lstm_from_keras,
                      lstm_from_matlab, lstm_from_onnx, lstm_from_tf1, matlab_from_lstm)
from .modules import LSTM, LSTMCell

_TO_FASTLSTM = {nn.LSTM: LSTM, nn.LSTMCell: LSTMCell}


def convert_lstms(model: nn.Module, *, to: str = "fastlstm", **options) -> nn.Module:
    """Replace every ``torch.nn.LSTM`` / ``torch.nn.LSTMCell`` of ``model`` (recursively, in place) by
    the fastlstm module with the same weights (the same Parameter objects), device, dtype,
    ``requires_grad`` and training mode, ``options`` (keywords of ``fastlstm.LSTM``) applied to each;
    with ``to="torch"``, the fastlstm modules by torch's (a ValueError naming the option and the
    module's path where one is not torch's behaviour). A module shared by several parents stays
    shared. Returns ``model`` (or, if ``model`` is itself an LSTM, its conversion), like
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.
    """
    if to not in ("fastlstm", "torch"):
        raise ValueError(f"to should be 'fastlstm' or 'torch', got {to!r}")
    if options and to == "torch":
        raise ValueError(f"options apply when converting to fastlstm, got {sorted(options)} with to='torch'")
    converted: dict[int, nn.Module] = {}
    replacements: list[tuple[nn.Module, str, nn.Module]] = []

    def convert(module: nn.Module, path: str) -> nn.Module:
        if id(module) not in converted:
            new = converted[id(module)] = _convert_one(module, path or "model", to, options)
            if new is module:
                for name, child in module.named_children():
                    replacement = convert(child, f"{path}.{name}" if path else name)
                    if replacement is not child:
                        replacements.append((module, name, replacement))
        return converted[id(module)]

    result = convert(model, "")
    for parent, name, replacement in replacements:  # (only once every module converted: all or nothing)
        setattr(parent, name, replacement)
    return result


def _convert_one(module: nn.Module, path: str, to: str, options: dict) -> nn.Module:
    """``module`` converted, or ``module`` itself where it is not an LSTM (its children then are)."""
    if isinstance(module, torch.jit.ScriptModule):
        if any(getattr(m, "original_name", "") in ("LSTM", "LSTMCell") for m in module.modules()):
            raise TypeError(f"{path}: a TorchScript module holding an LSTM cannot be converted (its Python classes are "
                            "gone); convert the eager model before scripting it")
        return module
    try:
        if to == "fastlstm":
            target = next((ours for theirs, ours in _TO_FASTLSTM.items() if isinstance(module, theirs)), None)
            return module if target is None else _sharing(module, target.from_torch(module, **options))
        return _sharing(module, module.to_torch()) if isinstance(module, (LSTM, LSTMCell)) else module
    except (TypeError, ValueError) as error:
        raise type(error)(f"{path}: {str(error).removeprefix('module: ')}") from error  # (the path names it)


def _sharing(source: nn.Module, converted: nn.Module) -> nn.Module:
    """``converted`` holding ``source``'s Parameter objects themselves (its copies of their values
    dropped), as ``convert_sync_batchnorm`` keeps them: a weight tied to another module stays tied,
    an optimizer built before the conversion keeps training it, and ``.grad`` stays. (setattr: torch's
    LSTM updates its flat weights there.)"""
    for name, param in source.named_parameters(recurse=False):
        if name in converted._parameters:
            setattr(converted, name, param)
    return converted


def from_onnx(model) -> dict[str, LSTM]:
    """Every ``LSTM`` node of an ONNX model (a path, bytes or ``onnx.ModelProto``) as a
    ``fastlstm.LSTM`` in eval mode, keyed by the node's name (``LSTM_<k>`` where it has none), computing
    what the node computes for its ``X`` (and ``sequence_lens`` as ``lengths=``, ``initial_h`` /
    ``initial_c`` as ``hx``). Needs the ``onnx`` package. Its weights must be initializers; an
    attribute fastlstm cannot express raises a ValueError that names it and the node."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as error:
        raise ImportError("fastlstm.interop.from_onnx needs the onnx package: pip install onnx") from error

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model)
    initializers = {t.name: t for t in model.graph.initializer}
    modules = {}
    for k, node in enumerate(n for n in model.graph.node if n.op_type == "LSTM"):
        name = node.name or f"LSTM_{k}"
        tensors = {}
        for role, tensor_name in zip(("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"), node.input):
            if role in ("W", "R", "B", "P") and tensor_name:
                if tensor_name not in initializers:
                    raise ValueError(f"{name}: its {role} ({tensor_name!r}) is not an initializer of the graph; "
                                     "fastlstm imports weights that are constants")
                tensors[role] = torch.from_numpy(numpy_helper.to_array(initializers[tensor_name]).copy())
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        attributes = {k: v.decode() if isinstance(v, bytes) else v for k, v in attributes.items()}
        if "activations" in attributes:
            attributes["activations"] = [a.decode() if isinstance(a, bytes) else a for a in attributes["activations"]]
        try:
            kwargs, state = lstm_from_onnx(attributes, tensors)
        except (KeyError, ValueError) as error:
            raise ValueError(f"{name}: {error}") from error
        modules[name] = _loaded(kwargs, state)
    return modules


def _loaded(kwargs: dict, state: dict) -> LSTM:
    """A ``fastlstm.LSTM(**kwargs)`` holding ``state`` (its dtype), in eval mode: every importer's last step."""
    module = LSTM(**kwargs, dtype=state["weight_ih_l0"].dtype)
    module.load_state_dict(state)
    return module.eval()


def from_matlab(input_weights, recurrent_weights, bias, *, gate_activation: str = "sigmoid",
                state_activation: str = "tanh") -> LSTM:
    """A MATLAB ``lstmLayer`` (``InputWeights [4H, I]``, ``RecurrentWeights [4H, H]``, ``Bias [4H]``,
    NumPy arrays or tensors) or ``bilstmLayer`` (``[8H, .]``: forward then backward) as a
    ``fastlstm.LSTM`` in eval mode; ``gate_activation`` and ``state_activation`` are the layer's
    ``GateActivationFunction`` and ``StateActivationFunction``. MATLAB's sequences are its columns:
    feed ``x.T`` of an ``[I, T]`` sequence as ``[T, I]``."""
    tensors = [torch.as_tensor(t) for t in (input_weights, recurrent_weights, bias)]
    return _loaded(*lstm_from_matlab(*tensors, gate_activation, state_activation))


def to_matlab(module: LSTM) -> dict:
    """A one-layer ``fastlstm.LSTM`` as MATLAB's learnables and activation names (tensors; ``Bias`` is
    ``b_ih + b_hh``): the arguments of :func:`from_matlab`, under MATLAB's property names."""
    return matlab_from_lstm(module)


def from_tf1(kernel, bias, *, forget_bias: float = 1.0, w_i_diag=None, w_f_diag=None, w_o_diag=None,
             projection=None, cell_clip: float | None = None, proj_clip: float | None = None,
             activation: str = "tanh") -> LSTM:
    """A TensorFlow 1 ``LSTMCell`` (or ``LSTMBlockCell``) run over a sequence, as a one-layer
    ``fastlstm.LSTM`` in eval mode: its variables (NumPy arrays or tensors) ``kernel [I + H_out, 4H]``,
    ``bias [4H]``, the peephole diagonals where ``use_peepholes``, ``projection`` (the
    ``projection/kernel [H, num_proj]``) where ``num_proj``; ``forget_bias`` is the cell's (TF1's
    default 1.0; 0 for a ``LSTMBlockCell`` built with ``forget_bias=0``), folded into the bias."""
    diagonals = [w_i_diag, w_f_diag, w_o_diag]
    if any(d is not None for d in diagonals) and any(d is None for d in diagonals):
        raise ValueError("w_i_diag, w_f_diag, w_o_diag: give all three peephole diagonals or none")
    as_tensor = torch.as_tensor
    kwargs, state = lstm_from_tf1(
        as_tensor(kernel), as_tensor(bias), forget_bias=forget_bias,
        peepholes=None if w_i_diag is None else tuple(as_tensor(d) for d in diagonals),
        projection=None if projection is None else as_tensor(projection), cell_clip=cell_clip, proj_clip=proj_clip,
        activation=activation)
    return _loaded(kwargs, state)


class GoBackwards(nn.Module):
    """A Keras layer built with ``go_backwards=True``: ``lstm`` run over its input's time axis
    reversed. The outputs come in the order they were computed (the last time step first), as Keras
    returns them. ``forward(input, hx=None)`` as ``fastlstm.LSTM``'s."""

    def __init__(self, lstm: LSTM):
        super().__init__()
        self.lstm = lstm

    def forward(self, input, hx=None):
        time_axis = 1 if self.lstm.batch_first and input.dim() == 3 else 0
        return self.lstm(input.flip(time_axis), hx)


def _keras_version_of(layer) -> int:
    """2 for a tf.keras 2 layer (the ``tf_keras`` or ``tensorflow`` package), else Keras's major version."""
    package = type(layer).__module__.split(".")[0]
    if package in ("tf_keras", "tensorflow"):
        return 2
    import keras

    return int(keras.__version__.split(".")[0])


def from_keras(layer, weights=None, *, keras_version: int | None = None):
    """A Keras ``LSTM`` or ``Bidirectional(LSTM)`` as a ``fastlstm.LSTM`` in eval mode, computing what
    the layer computes with ``return_sequences=True, return_state=True`` (batch first; a
    ``Bidirectional``'s states as ``h_n [2, B, H]``, forward then backward). A layer built with
    ``go_backwards=True`` comes as :class:`GoBackwards` around the module.

    Args:
        layer: the Keras layer object (its ``get_config()`` and ``get_weights()`` are read; no Keras
            call otherwise), or its config dict, with ``weights``.
        weights: with a config: ``[kernel [I, 4H], recurrent_kernel [H, 4H], bias [4H]]`` (NumPy
            arrays or tensors; no bias where ``use_bias=False``), the backward layer's after the
            forward's for a Bidirectional.
        keras_version: 3 (Keras 3, the default for a config) or 2 (tf.keras), which decides what
            ``"hard_sigmoid"`` means: relu6(x + 3) / 6 in Keras 3 (fastlstm's ``hardsigmoid``),
            clip(0.2 x + 0.5, 0, 1) in tf.keras 2 (``hard_sigmoid``). Read from a layer object's package.

    Keras's input ``dropout`` (a mask per sequence on the input) has no fastlstm equivalent: it is
    dropped with a warning (the module is exact in eval); ``recurrent_dropout`` maps to fastlstm's.
    """
    if hasattr(layer, "get_config") and hasattr(layer, "get_weights"):
        if weights is not None:
            raise ValueError("weights: give them only with a config dict; a Keras layer brings its own")
        keras_version = keras_version or _keras_version_of(layer)
        config, weights = layer.get_config(), layer.get_weights()
    elif isinstance(layer, dict) and weights is not None:
        config = layer
    else:
        raise TypeError(f"from_keras takes a Keras layer, or a config dict and weights; got {type(layer).__name__}"
                        f"{' without weights' if isinstance(layer, dict) else ''}")
    tensors = [torch.as_tensor(w) for w in weights]
    kwargs, state, go_backwards = lstm_from_keras(config, tensors, keras_version=keras_version or 3)
    inner = keras_layer_config(config["layer"] if "layer" in config else config)
    if inner.get("dropout", 0.0):
        warnings.warn(f"from_keras: the layer's dropout={inner['dropout']} (on its input, one mask per sequence) "
                      "has no fastlstm equivalent and is left out; the module is exact in eval", stacklevel=2)
    module = _loaded(kwargs, state)
    return GoBackwards(module) if go_backwards else module


def to_keras(module, *, layer: int = 0, keras_version: int = 3, build: bool = False):
    """One layer of a ``fastlstm.LSTM`` (or :class:`GoBackwards`) as a Keras layer's
    ``(class_name, config, weights)``: ``"LSTM"`` with the keywords of ``keras.layers.LSTM`` and
    ``[kernel, recurrent_kernel, bias]`` (NumPy arrays; ``bias`` is ``b_ih + b_hh``), or
    ``"Bidirectional"`` with ``{"layer": those keywords, "merge_mode": "concat"}`` and the forward
    layer's weights, then the backward's. The config sets ``return_sequences`` and ``return_state``.
    With ``build=True`` (Keras installed) the built Keras layer, its weights set. A ValueError names
    what a Keras LSTM cannot express (projection, peepholes and the other variants; a cell input and
    cell output activation that differ)."""
    go_backwards = isinstance(module, GoBackwards)
    lstm = module.lstm if go_backwards else module
    class_name, config, weights = keras_from_lstm(lstm, layer=layer, go_backwards=go_backwards,
                                                  keras_version=keras_version)
    weights = [(w.float() if w.dtype == torch.bfloat16 else w).cpu().numpy() for w in weights]
    if not build:
        return class_name, config, weights
    import keras

    built = keras.layers.LSTM(**config) if class_name == "LSTM" else keras.layers.Bidirectional(
        keras.layers.LSTM(**config["layer"]), merge_mode="concat")
    built.build((None, None, weights[0].shape[0]))
    built.set_weights(weights)
    return built


def from_haste(model, *, batch_first: bool | None = None, zoneout: float | None = None,
               dropout: float | None = None) -> LSTM:
    """A haste ``LSTM`` or ``LayerNormLSTM`` (the module, or its state_dict: ``kernel [I, 4H]``,
    ``recurrent_kernel [H, 4H]``, ``bias [4H]``, and for layer norm ``gamma [2, 4H]``, ``gamma_h``,
    ``beta_h [H]``) as a ``fastlstm.LSTM`` in eval mode. ``batch_first``, ``zoneout`` and ``dropout``
    are haste's constructor arguments (read from a module; defaults False, 0, 0): haste's zoneout
    acts on h only (fastlstm's ``zoneout=(z, 0)``) and its dropout is DropConnect on the recurrent
    kernel (fastlstm's ``weight_drop``)."""
    state = model.state_dict() if hasattr(model, "state_dict") else dict(model)

    def setting(value, name, default):
        return value if value is not None else getattr(model, name, default)

    kwargs, ours = lstm_from_haste({k: torch.as_tensor(v) for k, v in state.items()})
    return _loaded({**kwargs, "batch_first": setting(batch_first, "batch_first", False),
                    "zoneout": (float(setting(zoneout, "zoneout", 0.0)), 0.0),
                    "weight_drop": float(setting(dropout, "dropout", 0.0))}, ours)


def to_haste(module: LSTM) -> dict:
    """A one-layer, one-direction ``fastlstm.LSTM`` as a haste ``LSTM`` state_dict (``LayerNormLSTM``'s
    with ``layer_norm``), tensors; build the haste module with ``zoneout`` = the module's h zoneout,
    ``dropout`` = its ``weight_drop`` and its ``batch_first``."""
    return haste_from_lstm(module)
