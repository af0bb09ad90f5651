"""The demo's text: the Python standard library's sources (whole files held out), or a text file;
its character vocabulary and batch streams."""

from __future__ import annotations

import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor


# Directories of the standard library that are not its ordinary source: test suites (they are
# mostly data and fixtures), installed third-party packages, caches, and the generated codec
# tables of ``encodings`` (hundreds of lines of escaped code points that would flood the
# vocabulary with rare characters).
SKIPPED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"}
)

UNK = 0  # token id of every character outside the vocabulary
UNK_CHAR = "\ufffd"  # how an unknown token is shown


@dataclass
class Corpus:
    """Training and held-out text, and where they came from (for the printout)."""

    train: str
    valid: str
    description: str
    train_files: list[str] = field(default_factory=list)
    valid_files: list[str] = field(default_factory=list)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[Path]:
    """The standard library's ``*.py`` files, sorted by relative path, tests and packages skipped."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [name for name in subdirs if name not in SKIPPED_DIRS]
        found.extend(Path(directory, name) for name in files if name.endswith(".py"))
    # os.walk's order depends on the file system; sorting makes the selection the same everywhere.
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def spread_order(paths: list[Path], max_chars: int) -> list[Path]:
    """All of ``paths`` (sorted), reordered so that any prefix samples the whole list evenly.

    With ``k`` about (total size / ``max_chars``), the order is files 0, k, 2k, ..., then
    1, k + 1, ...: reading it until the cap takes evenly spaced files from every corner of the
    library (the first files in sorted order alone would be ``_pydecimal`` and ``asyncio``), and
    still reaches the cap when the spaced files happen to be small. Deterministic.
    """
    total = sum(path.stat().st_size for path in paths)
    stride = max(1, round(total / max_chars))
    return [path for offset in range(stride) for path in paths[offset::stride]]


def split_tail(text: str, fraction: float = 0.1) -> tuple[str, str]:
    """Split off the last ``fraction`` of a text as held-out data (a contiguous block)."""
    cut = len(text) - max(1, int(len(text) * fraction))
    return text[:cut], text[cut:]


def read_text(path: Path) -> str:
    # Universal newlines (\r\n -> \n); undecodable bytes become U+FFFD rather than aborting.
    return path.read_text(encoding="utf-8", errors="replace")


def load_stdlib(max_chars: int, holdout_every: int = 10, root: Path | None = None) -> Corpus:
    """Up to ``max_chars`` characters of standard-library source; every ``holdout_every``-th file held out."""
    root = stdlib_root() if root is None else root
    paths = stdlib_files(root)
    if not paths:
        raise FileNotFoundError(f"no Python source files under {root}; pass --text FILE to train on a text file")
    train, valid, train_files, valid_files = [], [], [], []
    size = 0
    for index, path in enumerate(spread_order(paths, max_chars)):
        if size >= max_chars:
            break
        text = read_text(path)[: max_chars - size]
        size += len(text)
        name = path.relative_to(root).as_posix()
        held_out = index % holdout_every == holdout_every - 1
        (valid if held_out else train).append(text)
        (valid_files if held_out else train_files).append(name)
    if not valid and len(train) > 1:  # too few files for one in ten: hold out the last one
        valid.append(train.pop())
        valid_files.append(train_files.pop())
    train_text, valid_text = "".join(train), "".join(valid)
    how = f"{len(valid_files)} whole files (every {holdout_every}th)"
    if not valid_text:  # a single (truncated) file: hold out its tail instead
        train_text, valid_text = split_tail(train_text)
        how = "the last 10% of the text"
    python = ".".join(map(str, sys.version_info[:2]))
    description = (
        f"{len(train_text) + len(valid_text):,} characters from {len(train_files) + len(valid_files)} files "
        f"of the Python {python} standard library ({root}); held out: {how}"
    )
    return Corpus(train_text, valid_text, description, train_files, valid_files)


def load_text_file(path: Path, max_chars: int) -> Corpus:
    """The first ``max_chars`` characters of a text file; its last 10% held out."""
    text = read_text(path)[:max_chars]
    if len(text) < 2:
        raise ValueError(f"{path} holds {len(text)} character(s); a language model needs more text than that")
    train, valid = split_tail(text)
    return Corpus(train, valid, f"{len(text):,} characters of {path}; held out: the last 10% of the text")


# -- vocabulary -------------------------------------------------------------------------------------


def code_points(text: str) -> Tensor:
    """The Unicode code points of a text, ``[N]`` int64, without a Python loop."""
    return torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()


class Vocab:
    """Characters <-> token ids: the most frequent training characters, plus ``UNK`` (id 0).

    Built from the data, so it works for any language of ``--text`` (a fixed ASCII table would
    turn a non-English text into unknowns), and capped, so a stray emoji costs nothing.
    """

    def __init__(self, chars: list[str]) -> None:
        self.chars = [UNK_CHAR, *chars]
        codes = torch.tensor([ord(ch) for ch in chars], dtype=torch.long)
        self._codes, order = torch.sort(codes)  # sorted code points, for searchsorted
        self._ids = order + 1  # the token id of each sorted code point

    @classmethod
    def from_text(cls, text: str, max_size: int) -> Vocab:
        codes, counts = torch.unique(code_points(text), return_counts=True)
        # Most frequent first; ties broken by code point (unique sorts them), so it is deterministic.
        order = torch.sort(counts, descending=True, stable=True).indices[: max_size - 1]
        return cls([chr(code) for code in codes[order].tolist()])

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        """``[N]`` int64 token ids; characters outside the vocabulary become ``UNK``."""
        if not text:
            return torch.zeros(0, dtype=torch.long)
        cps = code_points(text)
        pos = torch.searchsorted(self._codes, cps).clamp(max=len(self._codes) - 1)
        return torch.where(self._codes[pos] == cps, self._ids[pos], UNK)

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in (ids.tolist() if isinstance(ids, Tensor) else ids))


def batchify(ids: Tensor, streams: int) -> Tensor:
    """``[N]`` -> ``[N // B, B]``: B contiguous streams side by side, time-major.

    Stream b is the b-th slice of the text, so chunk k of every stream continues chunk k - 1 and
    the state carried between chunks is the right one.
    """
    length = ids.numel() // streams
    return ids[: length * streams].view(streams, length).t().contiguous()
