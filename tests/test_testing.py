"""fastlstm.testing's one definition of correct (flash-attention's rule, with a floor in ulps)."""

import pytest
import torch

from fastlstm import testing


def test_within_twice_the_trusted_error_passes_and_beyond_fails():
    truth = torch.linspace(-3, 3, 50, dtype=torch.float64)
    base = truth + 1e-3
    testing.assert_within_twice(truth + 1.9e-3, base, truth, dtype=torch.bfloat16)
    with pytest.raises(AssertionError, match="above twice the trusted result's"):
        testing.assert_within_twice(truth + 3e-3, truth + 1e-4, truth, dtype=torch.float32)


@pytest.mark.parametrize("dtype, ulps", [(torch.float32, 16), (torch.bfloat16, 2), (torch.float16, 2)])
def test_the_floor_is_a_few_ulps_at_the_truths_scale(dtype, ulps):
    eps = torch.finfo(dtype).eps
    assert testing.floor(dtype, torch.tensor([0.5, -0.25])) == pytest.approx(ulps * eps)  # below 1: absolute
    assert testing.floor(dtype, torch.tensor([10.0, -40.0])) == pytest.approx(ulps * eps * 40)
    exact = torch.tensor([10.0, -40.0])
    testing.assert_within_twice(exact + 0.9 * ulps * eps * 40, exact, exact, dtype=dtype)
    with pytest.raises(AssertionError):
        testing.assert_within_twice(exact + 1.1 * ulps * eps * 40, exact, exact, dtype=dtype)
