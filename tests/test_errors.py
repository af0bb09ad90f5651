"""Bad arguments and inputs: torch's exception type, and a message that names the argument.

Where torch raises, fastlstm must raise the same type. Where torch is silent or fails by accident
(an AttributeError on a list input, a silently ignored third element of hx), fastlstm raises a
clear error of its own; those cases are listed separately.
"""

import functools
import warnings

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastlstm
from fastlstm.masks import DirectionMasks, LSTMMasks

LSTM_ARGS = [
    # (label, args, kwargs, expected type, word the message must contain)
    ("dropout negative", (3, 4, 2), dict(dropout=-0.1), ValueError, "dropout"),
    ("dropout above one", (3, 4, 2), dict(dropout=1.5), ValueError, "dropout"),
    ("dropout bool", (3, 4, 2), dict(dropout=True), ValueError, "dropout"),
    ("dropout string", (3, 4, 2), dict(dropout="0.1"), ValueError, "dropout"),
    ("bias not bool", (3, 4), dict(bias="yes"), TypeError, "bias"),
    ("batch_first not bool", (3, 4), dict(batch_first=1), TypeError, "batch_first"),
    ("input_size float", (3.0, 4), {}, TypeError, "input_size"),
    ("input_size zero", (0, 4), {}, ValueError, "input_size"),
    ("hidden_size float", (3, 4.0), {}, TypeError, "hidden_size"),
    ("hidden_size zero", (3, 0), {}, ValueError, "hidden_size"),
    ("hidden_size negative", (3, -2), {}, ValueError, "hidden_size"),
    ("num_layers zero", (3, 4, 0), {}, ValueError, "num_layers"),
    ("num_layers float", (3, 4, 2.0), {}, TypeError, "num_layers"),
    ("proj_size negative", (3, 4), dict(proj_size=-1), ValueError, "proj_size"),
    ("proj_size equal hidden", (3, 4), dict(proj_size=4), ValueError, "proj_size"),
    ("proj_size float", (3, 4), dict(proj_size=1.0), TypeError, "proj_size"),
    # torch converts dropout and compares num_layers / proj_size before checking their types
    ("dropout None", (3, 4, 2), dict(dropout=None), TypeError, "float"),
    ("dropout list", (3, 4, 2), dict(dropout=[0.5]), TypeError, "float"),
    ("num_layers zero float", (3, 4, 0.0), {}, ValueError, "num_layers"),
    ("num_layers None", (3, 4, None), {}, TypeError, "NoneType"),
    ("proj_size float above hidden", (3, 4), dict(proj_size=10.0), ValueError, "proj_size"),
    ("proj_size negative float", (3, 4), dict(proj_size=-1.0), ValueError, "proj_size"),
]


@pytest.mark.parametrize("kwargs", [dict(proj_size=0.0), dict(proj_size=False), dict(proj_size=torch.tensor(0)),
                                    dict(proj_size=torch.tensor(2)), dict(num_layers=torch.tensor(2))],
                         ids=["proj_size 0.0", "proj_size False", "proj_size tensor 0", "proj_size tensor 2",
                              "num_layers tensor"])
def test_constructor_takes_what_torch_takes(kwargs):
    """torch builds these (a zero-like projection size is no projection; 0-d integer tensors count):
    the same layer, run on the same input."""
    theirs = torch.nn.LSTM(3, 4, dtype=torch.float64, **kwargs)
    ours = fastlstm.LSTM(3, 4, dtype=torch.float64, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    assert (ours.num_layers, ours.proj_size) == (int(theirs.num_layers), int(theirs.proj_size))
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for a, b in zip(torch.utils._pytree.tree_leaves(ours(x)), torch.utils._pytree.tree_leaves(theirs(x))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("label,args,kwargs,expected,word", LSTM_ARGS, ids=[c[0] for c in LSTM_ARGS])
def test_constructor_errors_match_torch(label, args, kwargs, expected, word):
    with pytest.raises(expected) as theirs:
        torch.nn.LSTM(*args, **kwargs)
    with pytest.raises(expected) as ours:
        fastlstm.LSTM(*args, **kwargs)
    assert type(ours.value) is type(theirs.value)
    assert word in str(ours.value)


def test_dropout_with_one_layer_warns_like_torch():
    with pytest.warns(UserWarning, match="num_layers greater than 1"):
        torch.nn.LSTM(3, 4, dropout=0.5)
    with pytest.warns(UserWarning, match="num_layers greater than 1"):
        fastlstm.LSTM(3, 4, dropout=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastlstm.LSTM(3, 4, num_layers=2, dropout=0.5)


OPTION_ARGS = [
    ("activations string", dict(activations="tanh"), TypeError, "activations"),
    ("activations length", dict(activations=("sigmoid", "tanh")), ValueError, "activations"),
    ("activations unknown", dict(activations=("sigmoid", "gelu", "tanh")), ValueError, "gelu"),
    ("peephole int", dict(peephole=1), TypeError, "peephole"),
    ("clip zero", dict(clip=0), ValueError, "clip"),
    ("clip negative", dict(clip=-1.0), ValueError, "clip"),
    ("clip nan", dict(clip=float("nan")), ValueError, "clip"),
    ("clip string", dict(clip="3"), TypeError, "clip"),
    ("coupled int", dict(coupled_input_forget=1), TypeError, "coupled_input_forget"),
    ("layer_norm string", dict(layer_norm="yes"), TypeError, "layer_norm"),
    ("zoneout above one", dict(zoneout=1.5), ValueError, "zoneout"),
    ("zoneout negative pair", dict(zoneout=(0.1, -0.1)), ValueError, "zoneout"),
    ("zoneout triple", dict(zoneout=(0.1, 0.1, 0.1)), TypeError, "zoneout"),
    ("zoneout bool", dict(zoneout=True), TypeError, "zoneout"),
    ("recurrent_dropout negative", dict(recurrent_dropout=-0.1), ValueError, "recurrent_dropout"),
    ("recurrent_dropout string", dict(recurrent_dropout="0.1"), TypeError, "recurrent_dropout"),
    ("weight_drop above one", dict(weight_drop=2.0), ValueError, "weight_drop"),
    ("cell_clip zero", dict(cell_clip=0.0), ValueError, "cell_clip"),
    ("proj_clip without projection", dict(proj_clip=1.0), ValueError, "proj_size"),
    ("proj_clip negative", dict(proj_size=2, proj_clip=-1.0), ValueError, "proj_clip"),
    ("forget_bias without bias", dict(bias=False, forget_bias=1.0), ValueError, "forget_bias"),
    ("forget_bias string", dict(forget_bias="1"), TypeError, "forget_bias"),
    ("forget_bias with coupled gate", dict(forget_bias=1.0, coupled_input_forget=True), ValueError, "forget_bias"),
    ("backend unknown", dict(backend="cudnn"), ValueError, "backend"),
]


@pytest.mark.parametrize("label,kwargs,expected,word", OPTION_ARGS, ids=[c[0] for c in OPTION_ARGS])
def test_option_errors_name_the_option(label, kwargs, expected, word):
    with pytest.raises(expected, match=word):
        fastlstm.LSTM(3, 4, **kwargs)


def test_cell_rejects_proj_clip_and_bad_options():
    with pytest.raises(TypeError, match="proj_clip"):
        fastlstm.LSTMCell(3, 4, proj_clip=1.0)
    with pytest.raises(ValueError, match="zoneout"):
        fastlstm.LSTMCell(3, 4, zoneout=2.0)
    with pytest.raises(TypeError, match="hidden_size"):
        fastlstm.LSTMCell(3, 4.0)
    with pytest.raises(TypeError):
        torch.nn.LSTMCell(3, 4.0)


@pytest.mark.parametrize("args", [(-1, 4), (3, -2)], ids=["input_size", "hidden_size"])
def test_cell_negative_sizes_raise_torchs_type(args):
    with pytest.raises(RuntimeError):
        torch.nn.LSTMCell(*args)  # (its weights' allocation refuses a negative dimension)
    with pytest.raises(RuntimeError, match="input_size" if args[0] < 0 else "hidden_size"):
        fastlstm.LSTMCell(*args)


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _packed(steps, lengths, features):
    return pack_padded_sequence(torch.randn(steps, len(lengths), features), lengths, enforce_sorted=False)


def _packed_sorted(steps, lengths, features):
    return pack_padded_sequence(torch.randn(steps, len(lengths), features), lengths, enforce_sorted=True)


LSTM_CALLS = [
    # (label, call(module) args, expected type, word)
    ("input 4-D", lambda: (_x(2, 3, 4, 3),), ValueError, "input"),
    ("input 1-D", lambda: (_x(3),), ValueError, "input"),
    ("input size", lambda: (_x(5, 2, 4),), RuntimeError, "input_size"),
    ("input dtype", lambda: (_x(5, 2, 3, dtype=torch.float64),), ValueError, "dtype"),
    ("input integer", lambda: (torch.zeros(5, 2, 3, dtype=torch.long),), ValueError, "dtype"),
    ("no steps", lambda: (_x(0, 2, 3),), RuntimeError, "sequence length"),
    ("h0 shape", lambda: (_x(5, 2, 3), (_x(2, 3, 4), _x(2, 2, 4))), RuntimeError, "hidden[0]"),
    ("c0 shape", lambda: (_x(5, 2, 3), (_x(2, 2, 4), _x(2, 2, 5))), RuntimeError, "hidden[1]"),
    ("hx 2-D for batched input", lambda: (_x(5, 2, 3), (_x(2, 4), _x(2, 4))), RuntimeError, "3-D"),
    ("hx 3-D for unbatched input", lambda: (_x(5, 3), (_x(2, 1, 4), _x(2, 1, 4))), RuntimeError, "2-D"),
    ("hx a tensor", lambda: (_x(5, 2, 3), _x(2, 2, 4)), RuntimeError, "hx"),
    ("hx one element", lambda: (_x(5, 2, 3), (_x(2, 2, 4),)), IndexError, "hx"),
    ("packed input size", lambda: (_packed(5, [5, 3], 4),), RuntimeError, "input_size"),
    ("packed hx batch", lambda: (_packed_sorted(5, [5, 3], 3), (_x(2, 3, 4), _x(2, 3, 4))), RuntimeError, "hidden[0]"),
]


@pytest.mark.parametrize("label,make_args,expected,word", LSTM_CALLS, ids=[c[0] for c in LSTM_CALLS])
def test_forward_errors_match_torch(label, make_args, expected, word):
    args = make_args()
    theirs = torch.nn.LSTM(3, 4, num_layers=2)
    ours = fastlstm.LSTM(3, 4, num_layers=2)
    with pytest.raises(Exception) as torch_error:
        theirs(*args)
    with pytest.raises(expected) as our_error:
        ours(*args)
    assert word in str(our_error.value)
    assert isinstance(torch_error.value, expected), f"torch raised {type(torch_error.value).__name__}"
    assert type(our_error.value) is type(torch_error.value)


def test_state_dtype_mismatch_raises_runtime_error_like_torch():
    x = _x(5, 2, 3)
    hx = (torch.zeros(2, 2, 4, dtype=torch.float64), torch.zeros(2, 2, 4))
    with pytest.raises(RuntimeError):
        torch.nn.LSTM(3, 4, num_layers=2)(x, hx)
    with pytest.raises(RuntimeError, match=r"hx\[0\].*dtype"):
        fastlstm.LSTM(3, 4, num_layers=2)(x, hx)


def test_errors_where_torch_has_none_or_an_accidental_one():
    lstm = fastlstm.LSTM(3, 4)
    with pytest.raises(TypeError, match="input"):
        lstm([1.0, 2.0])  # torch: AttributeError 'list' object has no attribute 'dim'
    with pytest.raises(RuntimeError, match="hx"):
        lstm(_x(5, 3), (_x(1, 4), _x(1, 4), _x(1, 4)))  # torch ignores the third with unbatched input
    with pytest.raises(TypeError, match=r"hx\[1\]"):
        lstm(_x(5, 2, 3), (_x(1, 2, 4), None))
    with pytest.raises(RuntimeError, match=r"hidden\[0\]"):
        # torch indexes a too-large hx with sorted_indices and silently drops a row
        lstm(_packed(5, [3, 5], 3), (_x(1, 3, 4), _x(1, 3, 4)))
    with pytest.raises(ValueError, match="hidden_size"):
        fastlstm.LSTMCell(3, 0)  # torch builds a useless cell
    packed = _packed(5, [3, 5, 2], 3)
    for order, inverse in (([0, 5, 1], [0, 2, 1]), ([0, 0, 1], [0, 2, 1]), ([0, 2, 1], [0, 1, 2])):
        # torch reads only unsorted_indices without hx (and each where it permutes): out of range, repeated
        # or not inverse, its result depends on which it read
        bad = PackedSequence(packed.data, packed.batch_sizes, torch.tensor(order), torch.tensor(inverse))
        with pytest.raises(RuntimeError, match="sorted_indices should be a permutation"):
            lstm(bad)
    lstm(packed)  # (and the module runs on)


CELL_CALLS = [
    ("input 3-D", lambda: (_x(1, 2, 3),), ValueError, "input"),
    ("input 0-D", lambda: (torch.tensor(1.0),), ValueError, "input"),
    ("hx 3-D", lambda: (_x(2, 3), (_x(1, 2, 4), _x(2, 4))), ValueError, r"hx\[0\]"),
    ("input size", lambda: (_x(2, 5),), RuntimeError, "input_size"),
    ("batch mismatch", lambda: (_x(2, 3), (_x(3, 4), _x(3, 4))), RuntimeError, "batch size"),
    ("h hidden size", lambda: (_x(2, 3), (_x(2, 5), _x(2, 4))), RuntimeError, "hidden0"),
    ("c hidden size", lambda: (_x(2, 3), (_x(2, 4), _x(2, 5))), RuntimeError, "hidden1"),
    ("1-D input with 2-D hx", lambda: (_x(3), (_x(2, 4), _x(2, 4))), RuntimeError, "hidden"),
    ("2-D input with 1-D hx", lambda: (_x(1, 3), (_x(4), _x(4))), RuntimeError, "batch size"),
    ("input dtype", lambda: (_x(2, 3, dtype=torch.float64),), RuntimeError, "dtype"),
    ("hx dtype", lambda: (_x(2, 3), (_x(2, 4, dtype=torch.float64), _x(2, 4))), RuntimeError, "dtype"),
]


@pytest.mark.parametrize("label,make_args,expected,word", CELL_CALLS, ids=[c[0] for c in CELL_CALLS])
def test_cell_errors_match_torch(label, make_args, expected, word):
    args = make_args()
    with pytest.raises(Exception) as torch_error:
        torch.nn.LSTMCell(3, 4)(*args)
    with pytest.raises(expected, match=word) as our_error:
        fastlstm.LSTMCell(3, 4)(*args)
    assert isinstance(torch_error.value, expected), f"torch raised {type(torch_error.value).__name__}"
    assert type(our_error.value) is type(torch_error.value)


def test_bad_masks_are_refused():
    lstm = fastlstm.LSTM(3, 4, num_layers=2, dropout=0.5, zoneout=0.1).train()
    x = _x(5, 2, 3)
    good = lstm.sample_masks(x)
    wrong_shape = LSTMMasks(
        layers=[[DirectionMasks(zoneout_h=torch.ones(5, 3, 4), zoneout_c=torch.ones(5, 2, 4))], good.layers[1]],
        inter_layer=good.inter_layer,
    )
    with pytest.raises(ValueError, match=r"masks.layers\[0\]\[0\].zoneout_h.*\[5, 2, 4\]"):
        lstm(x, masks=wrong_shape)
    option_off = LSTMMasks(layers=[[DirectionMasks(recurrent=torch.ones(2, 4))], good.layers[1]])
    with pytest.raises(ValueError, match="recurrent"):
        lstm(x, masks=option_off)
    with pytest.raises(ValueError, match="training"):
        lstm.eval()(x, masks=good)
    with pytest.raises(ValueError, match="masks.layers"):
        lstm.train()(x, masks=LSTMMasks(layers=[good.layers[0]]))


def _replacements(p):
    """Wrong versions of parameter ``p``: (label, tensor)."""
    return [("transposed" if p.dim() == 2 else "short", p.detach().t().clone() if p.dim() == 2 else p.detach()[:-1].clone()),
            ("float64", p.detach().double()), ("meta", p.detach().to("meta"))]


MODULES = {
    "LSTM": (lambda: torch.nn.LSTM(3, 4, 2, bidirectional=True, proj_size=2),
             lambda: fastlstm.LSTM(3, 4, 2, bidirectional=True, proj_size=2), torch.randn(5, 2, 3)),
    "LSTM-peephole-layer_norm": (None, lambda: fastlstm.LSTM(3, 4, 2, peephole=True, layer_norm=True),
                                 torch.randn(5, 2, 3)),
    "LSTMCell": (lambda: torch.nn.LSTMCell(3, 4), lambda: fastlstm.LSTMCell(3, 4), torch.randn(2, 3)),
}


@pytest.mark.parametrize("through", ["Parameter", ".data"])
@pytest.mark.parametrize("kind", MODULES)
def test_a_replaced_parameter_of_the_wrong_shape_dtype_or_device_is_refused(kind, through):
    """A weight replaced (or assigned through ``.data``) with another shape, dtype or device: torch
    raises a RuntimeError (some of them); fastlstm raises one for every parameter, naming it and what
    it expected. (Before, the engines read such a weight as the module's dtype and shape: wrong
    numbers, or memory past its end.)"""
    make_torch, make_ours, x = MODULES[kind]
    for name, p in list(make_ours().named_parameters()):
        for label, wrong in _replacements(p):
            ours = make_ours()
            if through == "Parameter":
                setattr(ours, name, torch.nn.Parameter(wrong))
            elif label == "meta":
                continue  # (torch refuses .data of another device type itself)
            else:
                getattr(ours, name).data = wrong
            expected = {"transposed": "shape", "short": "shape", "float64": "dtype", "meta": "device"}[label]
            if name.startswith("weight_ih_l0") or name == "weight_ih":
                if label in ("float64", "meta"):
                    continue  # (the input is checked against the first weight_ih: torch's errors, tested above)
            with pytest.raises(RuntimeError, match=f"parameter {name} .*{expected}"):
                ours(x)
            if make_torch is not None and label == "transposed":
                theirs = make_torch()
                setattr(theirs, name, torch.nn.Parameter(wrong))
                with pytest.raises(RuntimeError):
                    theirs(x)


@pytest.mark.parametrize("names", [("bias_hh",), ("bias_ih", "bias_hh")], ids=["bias_hh", "both"])
def test_a_cell_bias_set_to_none_is_left_out_as_torch_leaves_it(names):
    """torch's LSTMCell passes a bias set to None to its kernel, which goes without it."""
    ours = fastlstm.LSTMCell(3, 4, dtype=torch.float64)
    theirs = torch.nn.LSTMCell(3, 4, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, dtype=torch.float64)
    runs = []
    for module in (ours, theirs):
        for name in names:
            setattr(module, name, None)
        h, c = module(x)
        (h.sum() + c.pow(2).sum()).backward()
        runs.append([h, c] + [p.grad for p in module.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_weight_set_to_none_and_a_bad_weight_on_the_step_path_are_refused():
    for module, name in ((fastlstm.LSTMCell(3, 4), "weight_hh"), (fastlstm.LSTM(3, 4), "bias_hh_l0")):
        setattr(module, name, None)
        with pytest.raises(TypeError, match=f"parameter {name} is NoneType, expected a tensor of shape"):
            module(torch.randn(2, 3))  # (torch: its kernel's TypeError)
    layer = fastlstm.LSTM(3, 4, 2).eval()
    with torch.no_grad():
        layer.step(torch.randn(1, 1, 3))  # (a native step plan now exists)
        layer.weight_hh_l1 = torch.nn.Parameter(layer.weight_hh_l1.double())
        with pytest.raises(RuntimeError, match="parameter weight_hh_l1 has dtype torch.float64"):
            layer.step(torch.randn(1, 1, 3))


def test_numpy_integers_are_taken_where_torch_takes_them():
    """torch.nn.LSTM takes NumPy integers for num_layers and proj_size (not for the sizes) and
    LSTMCell for its sizes; so does fastlstm, keeping Python ints (bools stay refused by the cell)."""
    import numpy as np
    for args, kwargs in (((4, 5, np.int64(2)), dict(proj_size=np.int32(2))), ((4, 5), dict(num_layers=np.int64(1)))):
        theirs, ours = torch.nn.LSTM(*args, **kwargs), fastlstm.LSTM(*args, **kwargs)
        assert type(ours.num_layers) is int and ours.num_layers == theirs.num_layers
        assert ours.state_dict().keys() == theirs.state_dict().keys()
    for module in (torch.nn.LSTM, fastlstm.LSTM):
        with pytest.raises(TypeError, match="input_size"):
            module(np.int64(4), 5)
    cell = fastlstm.LSTMCell(np.int64(4), np.int32(5))
    assert (cell.input_size, cell.hidden_size) == (4, 5) and type(cell.hidden_size) is int
    with pytest.raises(TypeError, match="input_size"):
        fastlstm.LSTMCell(True, 5)


def _raised(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001 (the type is what is compared)
        return type(error)
    return None


def test_state_pair_and_packed_dtype_errors_have_torchs_types():
    """LSTMCell's hx as one tensor (TypeError) or of one or three tensors (RuntimeError), with
    unbatched input as one tensor (ValueError) or of one (IndexError), and a PackedSequence of
    another dtype than the weights (RuntimeError; padded input: ValueError)."""
    x, h = torch.randn(2, 3), torch.randn(2, 4)
    packed = pack_padded_sequence(torch.randn(5, 2, 3, dtype=torch.float64), [5, 3])
    cases = [lambda m: m.LSTMCell(3, 4)(x, h), lambda m: m.LSTMCell(3, 4)(x, (h,)),
             lambda m: m.LSTMCell(3, 4)(x[0], h[0]), lambda m: m.LSTMCell(3, 4)(x[0], (h[0],)),
             lambda m: m.LSTMCell(3, 4)(x, (h, h, h)), lambda m: m.LSTM(3, 4)(packed),
             lambda m: m.LSTM(3, 4)(torch.randn(5, 2, 3, dtype=torch.float64))]
    for case in cases:
        expected = _raised(lambda: case(torch.nn))
        assert expected is not None and _raised(lambda: case(fastlstm)) is expected


@pytest.mark.parametrize("layers", [1, 2], ids=["one-row-states", "two-row-states"])
def test_lstm_state_pair_errors_have_torchs_types(layers):
    """An LSTM's hx of the wrong form raises torch's exception type, which depends on the input's form:
    padded input indexes hx[1] (IndexError for one element or a tensor of one row) and its kernel
    counts (RuntimeError); a sorted PackedSequence reaches the kernel as it is (TypeError for a tensor,
    RuntimeError for a count), an unsorted one is permuted first (IndexError); a PackedSequence's
    states of two dimensions fail in the kernel (IndexError)."""
    x, h = torch.randn(5, 2, 3), torch.randn(layers, 2, 4)
    pack = functools.partial(pack_padded_sequence, x)
    inputs = {"padded": x, "sorted": pack([5, 3]), "unsorted": pack([3, 5], enforce_sorted=False)}
    for form, data in inputs.items():
        for hx in (h, (h,), (h, h, h), (h[0], h[0])):
            if form == "unsorted" and isinstance(hx, tuple) and len(hx) == 3:
                # (torch takes the first two there; fastlstm refuses the third: the README's list)
                with pytest.raises(RuntimeError, match="two tensors, got 3"):
                    fastlstm.LSTM(3, 4, layers)(data, hx)
                continue
            expected = _raised(lambda: torch.nn.LSTM(3, 4, layers)(data, hx))
            assert expected is not None and _raised(lambda: fastlstm.LSTM(3, 4, layers)(data, hx)) is expected, \
                (form, type(hx).__name__, len(hx))
