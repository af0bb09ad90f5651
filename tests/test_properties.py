"""Property tests: random configurations against the oracles (torch.nn.LSTM, the hand-written oracle).

onnxruntime's property test lives in test_onnx_oracle.py.
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.test_variants import check_against_oracle, randomise
from tests.twins import assert_runs_close, make_inputs, run_lstm

import fastlstm
from fastlstm.options import GATE_ACTIVATIONS

F64 = torch.float64
FORMS = ("padded", "batch_first", "unbatched", "unbatched_batch_first", "packed_sorted", "packed_unsorted")


@st.composite
def architectures(draw):
    hidden = draw(st.integers(1, 6))
    return dict(
        input_size=draw(st.integers(1, 5)),
        hidden_size=hidden,
        num_layers=draw(st.integers(1, 3)),
        bidirectional=draw(st.booleans()),
        proj_size=draw(st.integers(0, hidden - 1)),
        bias=draw(st.booleans()),
    )


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    arch=architectures(),
    form=st.sampled_from(FORMS),
    steps=st.integers(1, 5),
    batch=st.integers(1, 4),
    with_hx=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_architectures_match_torch(arch, form, steps, batch, with_hx, seed, backend):
    torch.manual_seed(seed)
    batch_first = form in ("batch_first", "unbatched_batch_first")
    ours = fastlstm.LSTM(**arch, batch_first=batch_first, dtype=F64, backend=backend)
    theirs = torch.nn.LSTM(**arch, batch_first=batch_first, dtype=F64)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    d = 2 if arch["bidirectional"] else 1
    h_out = arch["proj_size"] or arch["hidden_size"]
    layers = arch["num_layers"]
    inputs = make_inputs(
        form, steps, batch, arch["input_size"], (layers * d, batch, h_out), (layers * d, batch, arch["hidden_size"]),
        dtype=F64, with_hx=with_hx, generator=torch.Generator().manual_seed(seed),
    )
    assert_runs_close(run_lstm(ours, inputs), run_lstm(theirs, inputs), rtol=1e-10, atol=1e-10)


@st.composite
def option_sets(draw, with_projection):
    cfg = {}
    if draw(st.booleans()):
        cfg["activations"] = tuple(draw(st.sampled_from(GATE_ACTIVATIONS)) for _ in range(3))
    for flag in ("peephole", "coupled_input_forget", "layer_norm"):
        if draw(st.booleans()):
            cfg[flag] = True
    for bound in ("clip", "cell_clip") + (("proj_clip",) if with_projection else ()):
        if draw(st.booleans()):
            cfg[bound] = draw(st.sampled_from([0.2, 0.7, 2.0]))
    if draw(st.booleans()):
        cfg["zoneout"] = (draw(st.sampled_from([0.0, 0.2, 0.6])), draw(st.sampled_from([0.0, 0.3, 1.0])))
    for p in ("recurrent_dropout", "weight_drop"):
        if draw(st.booleans()):
            cfg[p] = draw(st.sampled_from([0.2, 0.5]))
    return cfg


@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data(), training=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_random_option_sets_match_the_hand_written_oracle(data, training, seed, backend):
    torch.manual_seed(seed)
    num_layers = data.draw(st.integers(1, 2))
    proj = data.draw(st.sampled_from([0, 2]))
    cfg = data.draw(option_sets(with_projection=proj > 0))
    module = fastlstm.LSTM(
        3, 4, num_layers=num_layers, bidirectional=data.draw(st.booleans()), proj_size=proj,
        bias=data.draw(st.booleans()), dropout=0.3 if num_layers > 1 else 0.0, dtype=F64, **cfg, backend=backend
    )
    randomise(module)
    steps, batch = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 3))
    lengths = data.draw(st.lists(st.integers(1, steps), min_size=batch, max_size=batch))
    masks = None
    if training:
        masks = module.train().sample_masks(torch.zeros(steps, batch, 3, dtype=F64))
    check_against_oracle(module, cfg, steps=steps, batch=batch, lengths=lengths, training=training, masks=masks)
