"""fastlstm and other libraries' models: :func:`convert_lstms` converts every LSTM of a torch model,
:func:`from_onnx` imports every ``LSTM`` node of an ONNX model, :func:`from_matlab` / :func:`to_matlab`
take MATLAB's ``lstmLayer`` / ``bilstmLayer`` learnables both ways, :func:`from_tf1` imports a TF1
``LSTMCell`` / ``LSTMBlockCell``'s variables.

(Weight import and export for Keras and haste layouts belong here too: issue 15.)
"""

from __future__ import annotations

import torch
from torch import nn

from .convert import lstm_from_matlab, lstm_from_onnx, lstm_from_tf1, matlab_from_lstm
from .modules import LSTM, LSTMCell

_TO_FASTLSTM = {nn.LSTM: LSTM, nn.LSTMCell: LSTMCell}


def convert_lstms(model: nn.Module, *, to: str = "fastlstm", **options) -> nn.Module:
    """Replace every ``torch.nn.LSTM`` / ``torch.nn.LSTMCell`` of ``model`` (recursively, in place) by
    the fastlstm module with the same weights, device, dtype, ``requires_grad`` and training mode,
    ``options`` (keywords of ``fastlstm.LSTM``) applied to each; with ``to="torch"``, the fastlstm
    modules by torch's (a ValueError naming the option and the module's path where one is not
    torch's behaviour). A module shared by several parents stays shared. Returns ``model`` (or, if
    ``model`` is itself an LSTM, its conversion), like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.
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
            return module if target is None else target.from_torch(module, **options)
        return module.to_torch() if isinstance(module, (LSTM, LSTMCell)) else module
    except (TypeError, ValueError) as error:
        raise type(error)(f"{path}: {error}") from error


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
        module = LSTM(**kwargs, dtype=tensors["W"].dtype)
        module.load_state_dict(state)
        modules[name] = module.eval()
    return modules


def from_matlab(input_weights, recurrent_weights, bias, *, gate_activation: str = "sigmoid",
                state_activation: str = "tanh") -> LSTM:
    """A MATLAB ``lstmLayer`` (``InputWeights [4H, I]``, ``RecurrentWeights [4H, H]``, ``Bias [4H]``,
    NumPy arrays or tensors) or ``bilstmLayer`` (``[8H, .]``: forward then backward) as a
    ``fastlstm.LSTM`` in eval mode; ``gate_activation`` and ``state_activation`` are the layer's
    ``GateActivationFunction`` and ``StateActivationFunction``. MATLAB's sequences are its columns:
    feed ``x.T`` of an ``[I, T]`` sequence as ``[T, I]``."""
    tensors = [torch.as_tensor(t) for t in (input_weights, recurrent_weights, bias)]
    kwargs, state = lstm_from_matlab(*tensors, gate_activation, state_activation)
    module = LSTM(**kwargs, dtype=tensors[0].dtype)
    module.load_state_dict(state)
    return module.eval()


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
    module = LSTM(**kwargs, dtype=state["weight_ih_l0"].dtype)
    module.load_state_dict(state)
    return module.eval()
