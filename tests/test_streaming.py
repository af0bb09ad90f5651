"""Streaming (streaming.py): a sequence run chunk by chunk through ``LSTM.step`` equals one forward
over it; many streams of unequal chunks run as one batch each equal their solo run; a row of
length 0 keeps its state bit for bit."""

import pytest
import torch

import fastlstm
from fastlstm import LSTMState, StreamingLSTM

F64 = torch.float64
ENGINES = ["cpu", "reference", "triton"]
CONFIGS = {
    "plain": dict(),
    "peephole-layer_norm": dict(peephole=True, layer_norm=True),
    "proj-zoneout": dict(proj_size=3, zoneout=(0.2, 0.3)),
    "batch_first": dict(batch_first=True, cell_clip=0.8),
}


def _model(backend, **cfg):
    torch.manual_seed(0)
    return fastlstm.LSTM(3, 5, num_layers=2, dtype=F64, backend=backend, **cfg).eval()


def _boundaries(steps, generator):
    """Random chunk boundaries: 0 < b_1 < ... < steps."""
    cuts = sorted(set(torch.randint(1, steps, (4,), generator=generator).tolist()))
    return [0, *cuts, steps]


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("backend", ENGINES)
def test_chunks_give_one_forwards_outputs(backend, cfg):
    model = _model(backend, **cfg)
    g = torch.Generator().manual_seed(1)
    time_dim = 1 if cfg.get("batch_first") else 0
    x = torch.randn((2, 11, 3) if time_dim else (11, 2, 3), dtype=F64, generator=g)
    whole, (h, c) = model(x)
    bounds = _boundaries(11, g)
    state = model.initial_state(2)
    outputs = []
    for begin, end in zip(bounds, bounds[1:]):
        y, state = model.step(x.narrow(time_dim, begin, end - begin), state)
        outputs.append(y)
    torch.testing.assert_close(torch.cat(outputs, time_dim), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.h, h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.c, c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ENGINES)
def test_interleaved_streams_each_equal_their_solo_run(backend):
    model = _model(backend, peephole=True, proj_size=3)
    holder = StreamingLSTM(model)
    g = torch.Generator().manual_seed(2)
    sequences = {name: torch.randn(n, 3, dtype=F64, generator=g) for name, n in (("a", 9), ("b", 4), ("c", 7))}
    position = dict.fromkeys(sequences, 0)
    outputs = {name: [] for name in sequences}
    while any(position[n] < len(s) for n, s in sequences.items()):
        chunks = {}
        for name, seq in sequences.items():  # chunks of 0 to 3 steps, some streams absent from a call
            n = int(torch.randint(0, 4, (1,), generator=g))
            if n == 3:
                continue
            chunks[name] = seq[position[name] : position[name] + n]
            position[name] += chunks[name].shape[0]
        for name, y in holder(chunks).items():
            assert y.shape == (chunks[name].shape[0], 3)
            outputs[name].append(y)
    for name, seq in sequences.items():
        solo, (h, c) = model(seq)
        torch.testing.assert_close(torch.cat(outputs[name]), solo, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(holder.states[name].h[:, 0], h, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(holder.states[name].c[:, 0], c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ENGINES)
def test_a_row_of_length_zero_keeps_its_state_bit_for_bit(backend):
    model = _model(backend, layer_norm=True)
    state = LSTMState(torch.randn(2, 3, 5, dtype=F64), torch.randn(2, 3, 5, dtype=F64))
    y, new = model.step(torch.randn(4, 3, 3, dtype=F64), state, lengths=torch.tensor([4, 0, 2]))
    assert torch.equal(new.h[:, 1], state.h[:, 1]) and torch.equal(new.c[:, 1], state.c[:, 1])
    assert not y[:, 1].any()


def test_open_reset_and_close():
    model = _model("cpu")
    holder = StreamingLSTM(model)
    x = torch.randn(3, 3, dtype=F64)
    first = holder({"s": x})["s"]
    torch.testing.assert_close(holder({"s": x})["s"], model(torch.cat([x, x]))[0][3:], rtol=1e-12, atol=1e-12)
    holder.reset("s")
    torch.testing.assert_close(holder({"s": x})["s"], first, rtol=0, atol=0)
    holder.close("s")
    assert "s" not in holder.states
    assert holder({}) == {}


def test_state_stack_unstack_and_select():
    state = LSTMState(torch.randn(2, 4, 3), torch.randn(2, 4, 5))
    rows = state.unstack()
    assert len(rows) == 4 and rows[1].h.shape == (2, 1, 3)
    again = LSTMState.stack(rows)
    assert torch.equal(again.h, state.h) and torch.equal(again.c, state.c)
    picked = state.select([3, 1])
    assert torch.equal(picked.c, state.c[:, [3, 1]])
    assert torch.equal(state.select(2).h, state.h[:, 2:3])


def test_streaming_a_bidirectional_lstm_raises():
    model = fastlstm.LSTM(3, 5, bidirectional=True)
    for call in (lambda: model.initial_state(1), lambda: model.step(torch.randn(2, 1, 3)),
                 lambda: StreamingLSTM(model)):
        with pytest.raises(ValueError, match="unidirectional"):
            call()
