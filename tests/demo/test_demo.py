"""``fastlstm demo``: the smoke mode end to end, in-process, and its building blocks."""

from __future__ import annotations

import argparse
import ast
import math
import re
import struct
import sys
import zlib

import pytest
import torch

from fastlstm import demo
from fastlstm.demo import corpus as demo_corpus
from fastlstm.demo import model as demo_model
from fastlstm.demo import training as demo_training

# One row of the per-epoch table: epoch, step, elapsed, train loss, held-out loss, held-out bpc.
ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+[\d.]+s\s+(\S+)\s+(\S+)\s+(\S+)\s*$", re.MULTILINE)
SAMPLE = re.compile(
    r"^--- sample: (\d+) characters after the prime (.*?), .*? ---\n(.*)\n--- end of sample ---$",
    re.MULTILINE | re.DOTALL,
)


def run_demo(capsys, *args: str) -> str:
    assert demo.main(["--smoke", *args]) == 0
    return capsys.readouterr().out


def held_out_bpc(out: str) -> list[float]:
    return [float(match.group(5)) for match in ROW.finditer(out)]


def vocab_size(out: str) -> int:
    return int(re.search(r"^vocabulary: (\d+) characters", out, re.MULTILINE).group(1))


def assert_learned(out: str) -> None:
    """bpc is finite, falls from its initial value, and beats a uniform guess over the vocabulary."""
    bpc = held_out_bpc(out)
    assert len(bpc) >= 2, out
    assert all(math.isfinite(value) for value in bpc), bpc
    assert bpc[-1] < bpc[0], bpc
    assert bpc[-1] < math.log2(vocab_size(out)), bpc


def sampled_text(out: str) -> tuple[int, str, str]:
    """(requested count, prime, printed text) of the sample section."""
    match = SAMPLE.search(out)
    assert match, out
    return int(match.group(1)), ast.literal_eval(match.group(2)), match.group(3)  # printed as a repr


def assert_png(path) -> None:
    """A real PNG: signature, then an IHDR chunk whose CRC checks, with a non-empty image."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    (crc,) = struct.unpack(">I", data[16 + length : 20 + length])
    assert crc == zlib.crc32(data[12 : 16 + length])
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100
    assert data.endswith(b"IEND\xaeB`\x82")


def test_smoke_on_the_standard_library(tmp_path, capsys):
    png = tmp_path / "loss.png"
    out = run_demo(capsys, "--plot", str(png), "--sample-chars", "150")
    assert "standard library" in out
    assert_learned(out)
    count, prime, text = sampled_text(out)
    assert count == 150 and prime == "def "
    assert len(text) == len(prime) + 150 and text.startswith(prime)
    assert "torch.nn.LSTM" in out and "char/s" in out
    assert_png(png)


def test_smoke_on_a_text_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    words = "the quick brown fox jumps over the lazy dog while a caf\u00e9 owner counts".split()
    rng = torch.Generator().manual_seed(1)
    text = "\n".join(
        " ".join(words[i] for i in torch.randint(len(words), (8,), generator=rng).tolist()) for _ in range(800)
    )
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    out = run_demo(capsys, "--text", str(path), "--plot", "", "--sample-chars", "57", "--no-bench")
    assert str(path) in out
    assert_learned(out)
    count, prime, printed = sampled_text(out)
    assert count == 57 and prime == "\n" and len(printed) == 1 + 57
    assert not list(tmp_path.glob("*.png"))  # --plot "" skips the plot
    assert "torch.nn.LSTM" not in out  # --no-bench


def test_variants_are_compared_with_plain_torch(capsys):
    out = run_demo(
        capsys,
        *("--layer-norm", "--zoneout", "0.1", "--recurrent-dropout", "0.1", "--weight-drop", "0.2", "--peephole"),
        *("--layers", "2", "--dropout", "0.1", "--steps", "6", "--evals", "2", "--plot", ""),
        *("--sample-chars", "5", "--bench-steps", "1", "--bench-warmup", "0"),
    )
    assert len(held_out_bpc(out)) == 3
    assert "compared with fastlstm's plain configuration" in out
    assert "[plain]" in out
    # Same seed, same init: the plain fastlstm and torch models start from identical weights.
    difference = float(re.search(r"difference ([\d.e+-]+)", out).group(1))
    assert difference < 1e-4


def test_sample_streams_the_requested_number_of_characters():
    vocab = demo_corpus.Vocab.from_text("abcabcabd\n", max_size=10)
    args = argparse.Namespace(
        seed=0, embed=8, hidden=12, layers=1, dropout=0.0, backend="auto", device=torch.device("cpu"),
        layer_norm=False, peephole=False, zoneout=0.0, recurrent_dropout=0.0, weight_drop=0.0,
    )
    model = demo_model.build_model(args, len(vocab))
    first = demo_training.sample(model, vocab, "ab", 33, 1.0, torch.Generator().manual_seed(3))
    again = demo_training.sample(model, vocab, "ab", 33, 1.0, torch.Generator().manual_seed(3))
    assert len(first) == 33 and first == again  # seeded
    assert demo_corpus.UNK_CHAR not in first  # the unknown token is never emitted
    assert set(first) <= set("abcd\n")
    greedy = demo_training.sample(model, vocab, "ab", 7, 0.0, torch.Generator())
    assert len(greedy) == 7
    assert model.training  # sampling restores the mode it found


def test_stdlib_corpus_is_deterministic_and_holds_out_whole_files():
    corpus = demo_corpus.load_stdlib(300_000)
    again = demo_corpus.load_stdlib(300_000)
    assert (corpus.train, corpus.valid, corpus.train_files) == (again.train, again.valid, again.train_files)
    assert len(corpus.train) + len(corpus.valid) <= 300_000
    assert len(corpus.train_files) >= 9 and corpus.valid_files
    assert not set(corpus.train_files) & set(corpus.valid_files)
    for name in corpus.train_files + corpus.valid_files:
        assert name.endswith(".py")
        assert not set(name.split("/")[:-1]) & demo_corpus.SKIPPED_DIRS, name
    # Spread over the library, not just its alphabetical beginning.
    assert len({name.split("/")[0][:1].lower() for name in corpus.train_files}) > 5


def test_vocab_round_trip_and_unknowns():
    vocab = demo_corpus.Vocab.from_text("aaa bb  \u00e9\n", max_size=4)  # room for 3 characters and UNK
    assert vocab.chars == [demo_corpus.UNK_CHAR, " ", "a", "b"]  # most frequent first, ties by code point
    ids = vocab.encode("ab z")
    assert ids.tolist() == [2, 3, 1, demo_corpus.UNK]
    assert vocab.decode(ids) == "ab " + demo_corpus.UNK_CHAR
    assert vocab.encode("").numel() == 0


def test_batchify_makes_contiguous_streams():
    data = demo_corpus.batchify(torch.arange(23), 4)  # [5, 4], the last 3 tokens dropped
    assert data.shape == (5, 4)
    assert data[:, 1].tolist() == [5, 6, 7, 8, 9]  # stream 1 is the second slice of the text


def test_missing_matplotlib_names_the_extra(monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import raise ImportError
    with pytest.raises(SystemExit) as error:
        demo.main(["--smoke", "--plot", "never.png"])
    assert error.value.code == 2
    assert "pip install fastlstm[plot]" in capsys.readouterr().err


def test_bad_flags_are_usage_errors(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--minutes", "0"])  # neither a time nor a step budget
    with pytest.raises(SystemExit):
        demo.main(["--zoneout", "1.5"])
    assert "fastlstm demo" in capsys.readouterr().err


def test_chunks_shift_targets_and_restart_at_the_end():
    data = torch.arange(11).view(11, 1)  # one stream of 11 characters
    stream = demo_training.chunks(data, 4)
    got = [next(stream) for _ in range(4)]
    assert [(x.flatten().tolist(), y.flatten().tolist(), restart) for x, y, restart in got] == [
        ([0, 1, 2, 3], [1, 2, 3, 4], True),
        ([4, 5, 6, 7], [5, 6, 7, 8], False),
        ([8, 9], [9, 10], False),
        ([0, 1, 2, 3], [1, 2, 3, 4], True),  # start over, and say so: the carried state is stale
    ]
