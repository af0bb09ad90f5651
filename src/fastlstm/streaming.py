"""Streaming: an LSTM's state carried from one chunk of a sequence to the next.

:class:`LSTMState` is what :meth:`fastlstm.LSTM.step` takes and returns; :class:`StreamingLSTM`
keeps one state per stream and runs the chunks of many streams, of unequal lengths, as one batch
(the rows of a stream whose chunk has ended keep their state: ``lengths=``). Running a sequence
chunk by chunk gives the outputs and final state of one forward over the whole sequence.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import NamedTuple

import numbers
import operator
import threading
import weakref

import torch
from torch import Tensor

from . import checks, engines
from .engines import contract
from .weights import accumulation_dtype


class LSTMState(NamedTuple):
    """An LSTM's state between chunks: ``h [L, B, H_out]``, ``c [L, B, H]`` (``hx`` of ``forward``).

    The batch dimension is dimension 1: :meth:`stack` joins states of several streams into one
    batch, :meth:`unstack` splits one into its streams, :meth:`select` takes some of its rows.
    """

    h: Tensor
    c: Tensor

    @staticmethod
    def stack(states: Sequence[LSTMState]) -> LSTMState:
        """One batch of the streams' states, in the given order (each may hold several rows)."""
        if not states:
            raise ValueError("states: stack needs at least one state")
        return LSTMState(torch.cat([s.h for s in states], 1), torch.cat([s.c for s in states], 1))

    def unstack(self) -> list[LSTMState]:
        """Each row of the batch as a state of batch 1."""
        return [LSTMState(h, c) for h, c in zip(self.h.split(1, 1), self.c.split(1, 1))]

    def select(self, index: int | Sequence[int] | Tensor) -> LSTMState:
        """The rows ``index``, as ``h[:, index]`` picks them: integers (one, a 0-d tensor or a NumPy
        integer keeps a batch dimension of 1; negative ones count from the end; one out of range raises
        an IndexError), or a bool mask over the batch (the rows where it is True)."""
        index = torch.as_tensor(index, device=self.h.device)
        if index.dtype != torch.bool:
            if index.is_floating_point() or index.is_complex():
                raise TypeError(f"index should hold integers or bools, got dtype {index.dtype}")
            index = index.to(torch.int64).reshape(-1) if index.dim() == 0 else index.to(torch.int64)
        return LSTMState(self.h[:, index], self.c[:, index])


class Streaming:
    """``LSTM``'s streaming methods (a mixin: the module owns the parameters and ``forward``)."""

    def _check_streaming(self) -> None:
        if self.bidirectional:
            raise ValueError("streaming (initial_state, step) needs a unidirectional LSTM: a reverse direction "
                             "needs the whole sequence")

    def initial_state(self, batch_size: int, *, device=None, dtype=None) -> LSTMState:
        """Zeros, ``h [L, batch_size, H_out]`` and ``c [L, batch_size, H]``, on the parameters' device
        and in their dtype unless given; ``c`` in float32 for bfloat16 or float16, which the layers
        compute in: a stream's cell state then loses nothing between chunks."""
        self._check_streaming()
        if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool):
            raise TypeError(f"batch_size should be an int, got {type(batch_size).__name__}")
        if batch_size < 0:
            raise ValueError(f"batch_size should be non-negative, got {batch_size}")
        batch_size = int(batch_size)
        like = self.weight_ih_l0
        device = like.device if device is None else device
        dtype = like.dtype if dtype is None else dtype
        h_out = self.proj_size or self.hidden_size
        return LSTMState(torch.zeros(self.num_layers, batch_size, h_out, device=device, dtype=dtype),
                         torch.zeros(self.num_layers, batch_size, self.hidden_size, device=device,
                                     dtype=accumulation_dtype(dtype)))

    def step(self, input: Tensor, state: LSTMState | None = None, *,
             lengths: Tensor | None = None) -> tuple[Tensor, LSTMState]:
        """The next chunk of a stream: ``input`` in the module's layout (``[T, B, I]``, or ``[B, T, I]``
        with ``batch_first``; ``T >= 1``), ``state`` from the previous chunk (zeros if None) ->
        ``(output, new state)``. ``lengths [B]``: each row's steps in this chunk (0 keeps its state).
        Chunk after chunk, the outputs are those of one forward over the whole sequence. (No state is
        :meth:`initial_state`: a bfloat16 or float16 stream carries ``c`` in float32.)

        Without autograd (``torch.no_grad()`` / ``inference_mode``, or nothing requiring grad) on the
        CPU, a chunk is one native call over every layer and step (lengths included), from a plan
        cached per batch size and checked against the weights' versions (:func:`_fast_step`); other
        calls run ``forward``. A weight changed in place through ``.data`` keeps its version: call
        :meth:`clear_step_plans` after such a change."""
        self._check_streaming()
        fast = _fast_step(self, input, state, lengths)
        if fast is not None:
            return fast
        if state is None and isinstance(input, Tensor) and accumulation_dtype(input.dtype) != input.dtype \
                and input.dim() in (2, 3):
            batch = 1 if input.dim() == 2 else input.shape[0 if self.batch_first else 1]
            state = self.initial_state(batch, device=input.device, dtype=input.dtype)
            state = state if input.dim() == 3 else LSTMState(state.h[:, 0], state.c[:, 0])
        output, (h, c) = self(input, state, lengths=lengths)
        return output, LSTMState(h, c)


    def clear_step_plans(self) -> None:
        """Forget the native step's cached plans and packed weights (they are rebuilt on the next
        ``step``): needed only after a weight changed in place through ``.data``, which no version
        counter sees. Replaced parameters, optimizer steps, ``load_state_dict`` and ``.to()`` are seen."""
        _CACHES.pop(self, None)


class StreamingLSTM:
    """One state per stream id for a unidirectional ``fastlstm.LSTM`` (in eval mode for serving).

    ``holder(chunks)`` takes ``{stream_id: chunk}``, each chunk ``[T_s, I]`` (a stream's next
    ``T_s >= 0`` steps; the streams' lengths may differ), runs them as one padded batch with
    ``lengths=``, and returns ``{stream_id: output [T_s, H_out]}``; each stream's state moves on by
    its own ``T_s`` steps. A stream is opened on its first chunk (or by :meth:`open`), and
    :meth:`reset` / :meth:`close` start it again / forget it.
    """

    def __init__(self, module):
        if getattr(module, "bidirectional", False):
            raise ValueError("module: streaming needs a unidirectional LSTM (a reverse direction needs the "
                             "whole sequence)")
        self.module = module
        self.states: dict[Hashable, LSTMState] = {}

    def open(self, stream: Hashable, state: LSTMState | None = None) -> None:
        """Start ``stream`` from ``state`` (zeros if None): one stream's, ``h [L, 1, H_out]``, ``c [L, 1, H]``."""
        if state is not None:
            h, c = state
            like = self.module.initial_state(1, device=h.device, dtype=h.dtype)
            if h.shape != like.h.shape or c.shape != like.c.shape:
                raise ValueError(f"state: stream {stream!r} takes one stream's state, h {list(like.h.shape)} and "
                                 f"c {list(like.c.shape)}, got {list(h.shape)} and {list(c.shape)}")
        self.states[stream] = self.module.initial_state(1) if state is None else LSTMState(*state)

    def reset(self, stream: Hashable) -> None:
        self.open(stream)

    def close(self, stream: Hashable) -> None:
        del self.states[stream]

    def __call__(self, chunks: Mapping[Hashable, Tensor]) -> dict[Hashable, Tensor]:
        streams = list(chunks)
        if not streams:
            return {}
        for stream in streams:
            chunk = chunks[stream]
            if not isinstance(chunk, Tensor) or chunk.dim() != 2:
                got = list(chunk.shape) if isinstance(chunk, Tensor) else type(chunk).__name__
                raise ValueError(f"chunks: the chunk of stream {stream!r} should be a tensor [steps, input_size], "
                                 f"got {got}")
            if stream not in self.states:
                self.open(stream)
        lengths = [chunks[s].shape[0] for s in streams]
        steps = max(lengths)
        if steps == 0:  # (nothing to run: every chunk is empty)
            return {s: chunks[s].new_zeros(0, self.module.proj_size or self.module.hidden_size) for s in streams}
        rows = [torch.nn.functional.pad(chunks[s], (0, 0, 0, steps - n)) for s, n in zip(streams, lengths)]
        x = torch.stack(rows, 0 if self.module.batch_first else 1)
        state = LSTMState.stack([self.states[s] for s in streams])
        y, state = self.module.step(x, state, lengths=torch.tensor(lengths))
        outputs = y.unbind(0 if self.module.batch_first else 1)
        for stream, new_state in zip(streams, state.unstack()):
            self.states[stream] = new_state
        return {stream: output[:n] for stream, output, n in zip(streams, outputs, lengths)}


# -- LSTM.step's fast path ---------------------------------------------------------------------

_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> _StepCache
_PLANS_PER_MODULE = 64  # (batch sizes come and go with a server's streams; a plan is a few small buffers)
_VERSION = operator.attrgetter("_version")


class _OptimizerSteps:
    """torch.optim steps taken in this process, counted from the first stream plan on by a global
    optimizer post-step hook (registered then, never removed): fused optimizers update weights in
    place without a new version, so a plan packed before a step is stale after it."""

    count = 0
    hook = None

    @classmethod
    def now(cls) -> int:
        if cls.hook is None:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            cls.hook = register_optimizer_step_post_hook(cls._counted)
        return cls.count

    @classmethod
    def _counted(cls, optimizer, args, kwargs) -> None:
        cls.count += 1


class _StepCache:
    """A module's weights as the stream plans read them (``packed``, None until packed) and their
    plans, ``{(thread, batch): StreamPlan}``. The packed weights are valid while ``_parameters``
    holds the same tensors at the same versions and addresses and no torch.optim optimizer has
    stepped since (fused optimizers update weights in place without a new version). (An in-place
    change through ``.data`` is invisible to all of these: call :meth:`Streaming.clear_step_plans`.)
    Each call checks these, so they are kept as flat lists that compare in one step."""

    __slots__ = ("packed", "plans", "params", "versions", "pointers", "optimizer_steps")

    def __init__(self):
        self.packed, self.plans = None, {}

    def pack(self, packed, params: tuple) -> None:
        self.packed, self.params, self.optimizer_steps = packed, params, _OptimizerSteps.now()
        self.versions, self.pointers = list(map(_VERSION, params)), list(map(Tensor.data_ptr, params))

    def current(self, params: tuple, dtype: torch.dtype) -> bool:
        try:
            return self.packed is not None and self.packed.dtype is dtype \
                and self.optimizer_steps == _OptimizerSteps.count \
                and len(params) == len(self.params) and all(map(operator.is_, params, self.params)) \
                and list(map(_VERSION, params)) == self.versions \
                and list(map(Tensor.data_ptr, params)) == self.pointers
        except RuntimeError:  # (an inference tensor has no version counter: such modules take forward)
            return False


def _fast_step(module, input, state, lengths=None) -> tuple[Tensor, LSTMState] | None:
    """``module.step(input, state)`` as one native call (:mod:`fastlstm.engines.cpu.stream`), or None
    where the call needs ``forward``: autograd, training-mode randomness, another device, dtype or
    backend, options the plan does not take, a transform, a trace, autocast, or input that
    ``forward``'s checks would refuse (they run there). What cannot change between calls (options,
    engine, weights' layout) is decided when the plan is built; each call checks the input, the state,
    the modes, and that the parameters are the plan's, unchanged. (This runs on every streamed step:
    its checks are ordered and written for a few microseconds in all.)"""
    if type(input) is not Tensor or input.dim() != 3 or not input.is_cpu:
        return None
    params = tuple(module._parameters.values())
    if torch.is_grad_enabled() and (input.requires_grad or True in [p.requires_grad for p in params]
                                    or (state is not None and _state_requires_grad(state))):
        return None
    if (module.training and (module.options.is_stochastic or (module.dropout > 0 and module.num_layers > 1))) \
            or module._forward_hooks or module._forward_pre_hooks or _global_hooks() \
            or contract.transformed() or torch._C._is_any_autocast_enabled() \
            or torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
        return None  # (hooks run in forward: a pre-hook may recompute a weight, as weight_norm's does)
    x = input.transpose(0, 1) if module.batch_first else input
    steps, batch, features = x.shape
    if steps == 0 or features != module.input_size:
        return None
    plan = _plan(module, x, params)
    if plan is None:
        return None
    if state is None:
        h0 = c0 = x.new_zeros(plan.state_shape)
    else:
        if type(state) is not LSTMState and (not isinstance(state, (tuple, list)) or len(state) != 2):
            return None
        h0, c0 = state
        if (type(h0) is not Tensor or type(c0) is not Tensor or h0.shape != plan.state_shape
                or c0.shape != plan.state_shape or h0.dtype is not x.dtype or c0.dtype is not x.dtype
                or not h0.is_cpu or not c0.is_cpu):
            return None
    if lengths is not None:  # (forward's check, its errors: a bad length raises naming lengths)
        lengths = checks.check_lengths(lengths, steps, batch, True).contiguous()
    y, h_n, c_n = plan.run(x.contiguous(), h0.contiguous(), c0.contiguous(), lengths)
    return (y.transpose(0, 1) if module.batch_first else y), LSTMState(h_n, c_n)


def _state_requires_grad(state) -> bool:
    return isinstance(state, (tuple, list)) and any(isinstance(t, Tensor) and t.requires_grad for t in state)


def _global_hooks() -> bool:
    hooks = torch.nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks)


def _plan(module, x: Tensor, params: tuple):
    """The stream plan for ``x``'s batch size on this thread, over the module's current packed
    weights (packed again when a parameter changed); None if the native path does not take it."""
    cache = _CACHES.get(module)
    if cache is None:
        cache = _CACHES[module] = _StepCache()
    if not cache.current(params, x.dtype):
        packed = _pack(module, x, params)
        if packed is None:
            return None
        cache.pack(packed, params)
    plans = cache.plans
    key = (threading.get_ident(), x.shape[1])
    plan = plans.get(key)
    if plan is None or plan.packed is not cache.packed:
        if len(plans) >= _PLANS_PER_MODULE:
            plans.pop(next(iter(plans)), None)  # (the oldest)
        plan = plans[key] = engines.load("cpu").stream.StreamPlan(cache.packed, module.options, x.shape[1])
    return plan


def _pack(module, x: Tensor, params: tuple):
    """``module``'s weights packed for ``x``'s dtype (:class:`_StepCache` keeps them); None if the
    native path does not take the module: a dtype, backend or options it does not run, a weight
    that is not a plain parameter (parametrized, or a tensor attribute: ``_parameters`` would not
    show its changes), an inference tensor (no version counter)."""
    names = [name for field_names in module._direction_names for name in field_names if name is not None]
    if x.dtype not in (torch.float32, torch.float64) or module.backend not in ("auto", "cpu") \
            or x.dtype != module.weight_ih_l0.dtype or not engines.supports("cpu", x.device, x.dtype) \
            or torch.nn.utils.parametrize.is_parametrized(module) \
            or not all(name in module._parameters for name in names) \
            or any(p.is_inference() or p.device.type != "cpu" for p in params):
        return None
    layers = module._weights(x.dtype)
    stream = engines.load("cpu").stream
    if not stream.takes(layers, module.options):
        return None
    return stream.PackedWeights(layers, x.dtype)
