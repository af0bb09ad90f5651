"""The shapes ``fastlstm bench`` times: one :class:`Config` per table row, grouped into presets.

Shape legend: ``B`` batch, ``T`` steps, ``I`` input features, ``H`` hidden size, ``L`` layers,
``D`` directions, ``P`` projection size. The grids come from ``../shared/ANCHORS.md`` (the
measured baselines and the targets); ``benchmarks/README.md`` lists which points each preset
keeps and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_DTYPE_SHORT = {"float32": "fp32", "float64": "fp64", "float16": "fp16", "bfloat16": "bf16"}


@dataclass(frozen=True)
class Config:
    """One row: a module, a shape, a dtype and the variant options.

    ``kind="lstm"`` times ``LSTM(x [T, B, I], (h0, c0))``; ``kind="cell"`` times one
    ``LSTMCell(x [B, I], (h0, c0))`` call (``steps`` is ignored). ``options`` are fastlstm's
    keyword-only variant options as sorted ``(name, value)`` pairs, so a Config is hashable.
    ``autocast``: float32 modules and inputs, each forward run under ``torch.autocast`` to
    ``dtype`` (forward+backward is then a mixed-precision training step's work).
    """

    batch: int
    steps: int
    input_size: int
    hidden: int
    layers: int = 1
    bidirectional: bool = False
    proj_size: int = 0
    dtype: str = "float32"
    packed: bool = False
    options: tuple[tuple[str, object], ...] = ()
    kind: str = "lstm"
    autocast: bool = False

    @property
    def storage_dtype(self) -> str:
        """The dtype of the modules' parameters and of the inputs."""
        return "float32" if self.autocast else self.dtype

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def options_dict(self) -> dict[str, object]:
        return dict(self.options)

    @property
    def label(self) -> str:
        if self.kind == "cell":
            parts = [f"cell B{self.batch} I{self.input_size} H{self.hidden}"]
        else:
            parts = [f"B{self.batch} T{self.steps} I{self.input_size} H{self.hidden}"]
            if self.layers > 1:
                parts.append(f"L{self.layers}")
            if self.bidirectional:
                parts.append("bi")
            if self.proj_size:
                parts.append(f"P{self.proj_size}")
            if self.packed:
                parts.append("packed")
        parts.append(_DTYPE_SHORT.get(self.dtype, self.dtype))
        if self.autocast:
            parts.append("autocast")
        for name, value in self.options:
            if value is True:
                parts.append(name)
            elif isinstance(value, tuple):
                parts.append(f"{name}={','.join(map(str, value))}")
            else:
                parts.append(f"{name}={value}")
        return " ".join(parts)


def options(**kwargs) -> tuple[tuple[str, object], ...]:
    """``Config.options`` from keyword arguments, in a canonical (sorted) order."""
    return tuple(sorted(kwargs.items()))


@dataclass(frozen=True)
class Preset:
    """A named list of rows and how long to time each.

    ``target_s`` is the time the timed samples of one implementation in one mode should take;
    repeats are ``target_s / (one call's time)``, clamped to ``[min_repeats, max_repeats]``, so
    big shapes get fewer repeats and a preset's run time stays bounded.
    """

    description: str
    configs: tuple[Config, ...]
    device: str = "auto"
    target_s: float = 0.5
    min_repeats: int = 3
    max_repeats: int = 50
    warmup: int = 1
    notes: tuple[str, ...] = field(default_factory=tuple)


def _option_rows(batch: int, steps: int, hidden: int, dtype: str) -> list[Config]:
    """Each variant option alone at one shape (``I = H``), plus the architecture/input-form variants."""
    variants = [
        options(layer_norm=True),
        options(peephole=True),
        options(zoneout=0.1),
        options(cell_clip=3.0),
        options(recurrent_dropout=0.25),
        options(weight_drop=0.5),
        options(activations=("hard_sigmoid", "tanh", "softsign")),
    ]
    rows = [Config(batch, steps, hidden, hidden, dtype=dtype, options=opts) for opts in variants]
    rows += [
        Config(batch, steps, hidden, hidden, dtype=dtype, packed=True),
        Config(batch, steps, hidden, hidden, dtype=dtype, proj_size=hidden // 4),
        Config(batch, steps, hidden, hidden, layers=2, bidirectional=True, dtype=dtype),
    ]
    return rows


# cpu-quick keeps 9 of the 24 (B, H, T) points of the CPU grid B in {1, 16, 64} x
# H in {128, 256, 512, 1024} x T in {64, 256}: every B, H and T value appears, T = 256 at B = 1
# and B = 16 (the two T = 256 shapes of ANCHORS.md's CPU table). The rest is left to cpu-full
# because, with only the reference engine, the worst case that must still fit 3 minutes, its
# backward alone takes 6 s per call at B=64 T=256 H=128 and longer at every bigger point.
_CPU_QUICK_POINTS = (
    (1, 128, 64),
    (1, 1024, 64),
    (1, 256, 256),
    (16, 256, 64),
    (16, 512, 64),
    (16, 1024, 64),
    (16, 256, 256),
    (64, 128, 64),
    (64, 256, 64),
)
_CPU_FULL_POINTS = tuple((b, h, t) for b in (1, 16, 64) for h in (128, 256, 512, 1024) for t in (64, 256))


# Half precision (the CPU engine computes it in float32): ANCHORS' bf16 / fp16 points.
_CPU_HALF_POINTS = ((8, 128, 64), (32, 256, 64))


def _cpu_preset(points, description: str, target_s: float) -> Preset:
    rows = [Config(b, t, h, h) for b, h, t in points]
    rows += [Config(b, t, h, h, dtype=dtype) for dtype in ("bfloat16", "float16") for b, h, t in _CPU_HALF_POINTS]
    rows += [Config(b, t, h, h, dtype="bfloat16", autocast=True) for b, h, t in _CPU_HALF_POINTS]
    rows += _option_rows(batch=16, steps=64, hidden=256, dtype="float32")
    rows.append(Config(1, 1, 128, 128, kind="cell"))
    return Preset(description, tuple(rows), device="cpu", target_s=target_s)


# The (B, H) pairs of ANCHORS.md's cuDNN table (T = 1024, I = H).
_H100_PAIRS = (
    (1, 256), (8, 256), (16, 256), (64, 256), (128, 256), (256, 256),
    (8, 768), (16, 768), (64, 768), (128, 768),
    (1, 1024), (8, 1024), (16, 1024), (64, 1024), (128, 1024), (256, 1024),
)


def _h100_preset() -> Preset:
    rows = [Config(b, 1024, h, h, dtype=dtype) for dtype in ("float16", "bfloat16", "float32") for b, h in _H100_PAIRS]
    rows += [
        # ANCHORS "other measured points": packed vs padded, projection, 2-layer bidirectional.
        Config(64, 512, 512, 512, dtype="float16"),
        Config(64, 512, 512, 512, dtype="float16", packed=True),
        Config(64, 512, 512, 512, dtype="float16", proj_size=128),
        Config(64, 256, 512, 512, layers=2, bidirectional=True, dtype="bfloat16"),
        Config(64, 256, 512, 512, layers=2, bidirectional=True, dtype="float32"),
        Config(16, 512, 1024, 1024, dtype="float32"),
        Config(256, 512, 1024, 1024, dtype="float32"),
        # The eager-loop anchor: a LayerNorm LSTM, T=512, B=64, H=1024, bf16.
        Config(64, 512, 1024, 1024, dtype="bfloat16", options=options(layer_norm=True)),
        # Single-step streaming calls, lstm(x_t, (h, c)) with B = 1.
        Config(1, 1, 256, 256, dtype="float16"),
        Config(1, 1, 1024, 1024, dtype="float16"),
    ]
    # Every variant at one shape, for the "<= 1.5x plain, >= 20x eager" targets.
    rows += _option_rows(batch=16, steps=1024, hidden=768, dtype="bfloat16")
    return Preset(
        "ANCHORS.md's GPU grid: cuDNN's (B, H) pairs at T=1024 in fp16/bf16/fp32, the packed, "
        "projection, 2-layer bidirectional, layer-norm and single-step points, and each variant",
        tuple(rows),
        device="cuda",
        target_s=0.3,
        max_repeats=100,
        warmup=3,
    )


def _h100_quick_preset() -> Preset:
    """The points of the GPU targets, small enough for one short session on a lent GPU."""
    pairs = ((1, 256), (16, 256), (16, 1024), (64, 1024), (128, 1024), (256, 1024))
    rows = [Config(b, 1024, h, h, dtype=dtype) for dtype in ("bfloat16", "float16") for b, h in pairs]
    rows += [
        Config(16, 512, 1024, 1024, dtype="float32"),
        Config(256, 512, 1024, 1024, dtype="float32"),
        Config(64, 256, 512, 512, layers=2, bidirectional=True, dtype="bfloat16"),
        Config(1, 1, 256, 256, dtype="float16"),
    ]
    rows += _option_rows(batch=16, steps=256, hidden=768, dtype="bfloat16")
    return Preset(
        "a subset of h100 for one short GPU session: bf16/fp16 at six of cuDNN's (B, H) pairs (T=1024), "
        "fp32, 2-layer bidirectional, a single step, and each variant at B=16, T=256, H=768",
        tuple(rows),
        device="cuda",
        target_s=0.2,
        max_repeats=50,
        warmup=2,
    )


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        "tiny shapes covering every code path (plain, options, packed, projection, 2-layer "
        "bidirectional, cell); a few seconds, for CI",
        (
            Config(3, 5, 4, 6),
            Config(3, 5, 4, 6, layers=2, bidirectional=True, proj_size=3, packed=True),
            Config(
                3, 5, 4, 6,
                options=options(layer_norm=True, peephole=True, zoneout=0.1, cell_clip=2.0,
                                activations=("hard_sigmoid", "tanh", "softsign")),
            ),
            Config(2, 1, 4, 6, kind="cell"),
        ),
        target_s=0.005,
        min_repeats=3,
        max_repeats=5,
    ),
    "cpu-quick": _cpu_preset(
        _CPU_QUICK_POINTS,
        "the CPU targets on a 2-core machine in <= 3 minutes: 9 of the 24 plain fp32 grid "
        "points, bf16 and fp16 (and float32 modules under bf16 autocast) at B=8 T=64 H=128 and "
        "B=32 T=64 H=256, each option at B=16 T=64 H=256, and an LSTMCell step at B=1 H=128",
        target_s=0.25,
    ),
    "cpu-full": _cpu_preset(
        _CPU_FULL_POINTS,
        "all 24 plain fp32 points of the CPU grid (B in {1,16,64}, H in {128,256,512,1024}, "
        "T in {64,256}), the bf16, fp16 and bf16-autocast points, each option, and the LSTMCell step; "
        "long with the reference engine",
        target_s=0.5,
    ),
    "h100": _h100_preset(),
    "h100-quick": _h100_quick_preset(),
}
