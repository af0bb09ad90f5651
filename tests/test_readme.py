"""The README's Python examples run as written (a user's first copy and paste): each block is
executed, with the two names the README leaves to the reader (``MyModel``, ``audio_features``)
defined first. The files they write go to a temporary directory."""

import re
from pathlib import Path

import pytest
import torch

import fastlstm

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


class MyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = fastlstm.LSTM(40, 16, batch_first=True)

    def forward(self, x, lengths=None):
        return self.lstm(x, lengths=lengths)[0]


READERS_NAMES = {"MyModel": MyModel, "audio_features": torch.randn(12, 1, 40)}


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_a_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme", **READERS_NAMES}
    exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), namespace)  # noqa: S102
