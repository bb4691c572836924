"""The shared precision helper of the losses."""

import pytest
import torch

from zoo.losses import at_least_float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64])
def test_narrow_and_integer_dtypes_become_float32(dtype):
    x = torch.tensor([1, 2, 3]).to(dtype)
    out = at_least_float32(x)
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_and_float64_are_returned_unchanged(dtype):
    x = torch.randn(3, dtype=dtype)
    assert at_least_float32(x) is x
