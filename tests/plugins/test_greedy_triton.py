"""The sampler's greedy pass in Triton (finite flags and first-index argmax) against torch's ops.

Exact agreement: flags and indices are integers. Rows with a NaN or an infinity must be flagged
and still name a valid token id (the next step is fed it before the host sees the flag).
"""

from __future__ import annotations

import pytest
import torch

from kiln.plugins.greedy import triton_reference as ref
from tests.gpu.support import skip_unsupported, triton_device

pytestmark = pytest.mark.gpu


def _kernels():
    pytest.importorskip("triton")
    from kiln.plugins.greedy import triton_kernels
    return triton_kernels


def _check(logits: torch.Tensor, slices: int | None = None) -> None:
    packed, ids = _kernels().finite_argmax(logits, slices=slices)
    want_packed, want_ids = ref.finite_argmax(logits)
    b, v = logits.shape
    assert packed.dtype == torch.float64 and packed.shape == (2 * b,)
    assert ids.dtype == torch.int64 and ids.shape == (b,)
    assert torch.equal(packed[:b], want_packed[:b]), "finite flags"
    finite = want_packed[:b].bool()
    assert torch.equal(ids[finite], want_ids[finite]), "argmax of finite rows"
    assert torch.equal(packed[b:], ids.double())
    assert bool(((ids >= 0) & (ids < max(v, 1))).all()), "a row's id is not a token id"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 128256), (3, 4097), (63, 32000), (64, 32000),
                                   (300, 5000), (5, 7), (2, 1)], ids=str)
def test_random_rows_match_torch(dtype, shape):
    device = triton_device()
    skip_unsupported(dtype, device)
    g = torch.Generator().manual_seed(sum(shape))
    _check((torch.randn(shape, generator=g) * 4).to(dtype).to(device))


@pytest.mark.parametrize("slices", [1, 2, 3, 9, 10, 256])
def test_any_slice_count_gives_the_same_picks(slices):
    """Slices split a row anywhere (a tie or the maximum on either side of a cut)."""
    device = triton_device()
    g = torch.Generator().manual_seed(slices)
    logits = torch.randn(4, 20000, generator=g)
    logits[0, [5, 5 + 2048, 5 + 4096, 5 + 8192, 5 + 16384]] = 9.0  # one lane, several steps
    logits[1, [2047, 2048, 19999]] = 9.0  # a tie across the first cut
    logits[2, [19999]] = 9.0  # in the last slice
    logits[3] = float("-inf")  # torch's argmax: 0
    _check(logits.to(device), slices=slices)


@pytest.mark.parametrize("slices", [None, 1, 2], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ties_take_the_first_index(dtype, slices):
    """Ties within a step, across steps of one lane (the whole-row kernel's 8,192-value steps:
    row 4; a slice's 2,048-value steps: row 5 with 2 slices of 6,144) and across slices (row 5
    with the default 5 slices of 2,048)."""
    device = triton_device()
    skip_unsupported(dtype, device)
    v = 10000
    logits = torch.zeros(7, v)
    for row, places in enumerate([(0, 9999), (4095, 4096), (17, 8192, 5000), (9999,),
                                  (5, 5 + 8192), (6, 6 + 2048, 6 + 4096)]):
        logits[row, list(places)] = 2.5
    # row 6: all equal
    _check(logits.to(dtype).to(device), slices=slices)
    packed, ids = _kernels().finite_argmax(logits.to(dtype).to(device), slices=slices)
    assert ids.tolist() == [0, 4095, 17, 9999, 5, 6, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_non_finite_rows_are_flagged_with_a_valid_id(dtype):
    device = triton_device()
    skip_unsupported(dtype, device)
    v = 5000
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(7, v, generator=g)
    logits[0, 4999] = float("nan")
    logits[1, 123] = float("inf")
    logits[2, 0] = float("-inf")
    logits[3] = float("-inf")
    logits[4] = float("nan")
    logits[5, 4096] = float("inf")
    logits[5, 10] = float("nan")
    x = logits.to(dtype).to(device)
    _check(x)
    packed, _ = _kernels().finite_argmax(x)
    assert packed[:7].tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_rows_of_a_wider_tensor():
    """A slice of padded rows (a tensor-parallel gather's [:, :vocab]) reads its own stride."""
    device = triton_device()
    g = torch.Generator().manual_seed(5)
    padded = (torch.randn(4, 1100, generator=g) * 3).to(device)
    padded[:, 1000:] = 100.0  # padding past the vocabulary: never picked
    _check(padded[:, :1000])
    assert bool((_kernels().finite_argmax(padded[:, :1000])[1] < 1000).all())


@pytest.mark.parametrize("slices", [None, 1, 3, 10], ids=str)
def test_sliced_rows_of_a_wider_tensor(slices):
    """The same through the sliced kernel (under 64 rows, several 2,048-value steps): the row
    stride is not a multiple of the slice length, and the padding holds the largest values."""
    device = triton_device()
    g = torch.Generator().manual_seed(6)
    padded = (torch.randn(4, 20100, generator=g) * 3).to(device)
    padded[:, 20000:] = 100.0
    padded[1, 20000:] = float("nan")  # nor is a non-finite value there seen
    padded[2, 19999] = 50.0  # the vocabulary's last id, next to the padding
    rows = padded[:, :20000]
    _check(rows, slices=slices)
    packed, ids = _kernels().finite_argmax(rows, slices=slices)
    assert packed[:4].tolist() == [1.0] * 4
    assert ids[2].item() == 19999


def test_refuses_bad_arguments():
    device = triton_device()
    with pytest.raises(ValueError, match="unit stride"):
        _kernels().finite_argmax(torch.zeros(8, 4, device=device).t())
    with pytest.raises(ValueError, match="slices must be"):
        _kernels().finite_argmax(torch.zeros(2, 4, device=device), slices=0)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        _kernels().finite_argmax(torch.zeros(2, 4, dtype=torch.float64, device=device))


def test_the_sampler_keeps_float64_rows_exact():
    """Rows the kernels would round to float32 go through the reference: two values one
    float64 ulp apart keep their order."""
    from kiln.runtime import sampling
    logits = torch.zeros(2, 3000, dtype=torch.float64)
    logits[0, 7] = 1.0
    logits[0, 2500] = 1.0 + 2.0 ** -40  # equal in float32
    logits[1, 5] = 1e300  # infinite in float32
    packed, ids = sampling.finite_argmax(logits.to(triton_device()))
    assert ids.tolist() == [2500, 5]
    assert packed[:2].tolist() == [1.0, 1.0]
