"""A fresh prompt's prefill through cuDNN's attention (kiln.plugins.attention.cudnn) against the
paged reference; where cuDNN is refused, the reason."""

from __future__ import annotations

import pytest
import torch

from kiln.plugins.attention import cudnn
from kiln.plugins.attention import triton_reference as ref
from tests.gpu.support import assert_close
from tests.plugins.test_attention_triton import HEADS, _paged_case


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


def test_refused_off_cuda_and_in_float32():
    assert cudnn.refusal(torch.device("cpu"), 32, 8, 128, torch.bfloat16) == \
        "cpu is not a CUDA device"
    why = cudnn.refusal(torch.device("cuda", 0), 32, 8, 128, torch.float32)
    assert why is not None and "float32" in why


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize("n,page", [(600, 64), (513, 16), (2048, 64), (2049, 64)])
def test_fresh_prefill_matches_reference(dtype, heads, n, page):
    """Causal attention of one prompt from position 0, its blocks shuffled in the cache (a
    ragged last block), as the paged reference computes it."""
    device = _cuda()
    hq, hkv, d = heads
    if cudnn.refusal(device, hq, hkv, d, dtype) is not None:
        pytest.skip(f"cuDNN refuses {heads}: {cudnn.refusal(device, hq, hkv, d, dtype)}")
    k, v, table, ctx_lens = _paged_case(device, dtype, hkv, d, page, [n], seed=n + d)
    q = torch.randn(n, hq, d, device=device).to(dtype)
    got = cudnn.fresh_prefill_attention(q, k, v, table[0], scale=d ** -0.5)
    assert got.shape == q.shape and got.dtype == dtype and got.is_contiguous()
    want = torch.empty_like(q)
    zero = torch.zeros(1, dtype=torch.int32, device=device)
    ref.paged_prefill_attention(q, k, v, table, ctx_lens, zero, ctx_lens, want,
                                scale=d ** -0.5, max_q_len=n)
    assert_close(got, want, dtype)


@pytest.mark.gpu
def test_llama_heads_are_not_refused():
    """The 8B shape (32 / 8 heads of 128) in both 16-bit types: a refusal here would quietly
    leave every engine on the slower kernel, so it fails instead."""
    device = _cuda()
    if torch.cuda.get_device_capability(device) < (9, 0):
        pytest.skip("measured on Hopper")
    for dtype in cudnn.DTYPES:
        assert cudnn.refusal(device, 32, 8, 128, dtype) is None


@pytest.mark.parametrize("page", [16, 64, 512])
def test_buckets_bound_the_padding_and_the_plans(page):
    """Padded lengths: multiples of the page and of 256, at least the prompt, at most 1/8 longer
    past 2,048 tokens (pages of up to 256); and few of them (each is a cuDNN plan built at
    load)."""
    lengths = set()
    for n in range(1, 20000, 7):
        b = cudnn.bucket(n, page)
        assert b >= n and b % page == 0 and b % 256 == 0
        assert b - n < max(256, page, (1 << (n.bit_length() - 1)) // 8)
        if n > 2048 and page <= 256:
            assert b <= n * 1.125
        lengths.add(b)
    assert len([b for b in lengths if b <= 2048]) <= 2048 // max(256, page)
    for low in (2048, 4096, 8192):  # then eight an octave
        assert len([b for b in lengths if low < b <= 2 * low]) <= 8


@pytest.mark.gpu
@pytest.mark.parametrize("n,page", [(1, 16), (600, 64), (1024, 64)])
def test_gather_fresh_kv(n, page):
    """Keys and values of one sequence, through its shuffled blocks, into [1, Hkv, L, D]: the
    reference's rows, zeros after them; a length that is not whole pages is refused."""
    device = _cuda()
    pytest.importorskip("triton")
    from kiln.plugins.attention.triton_kernels import gather_fresh_kv
    k, v, table, _ = _paged_case(device, torch.bfloat16, 8, 80, page, [n], seed=n)
    length = cudnn.bucket(n, page)
    got_k, got_v = gather_fresh_kv(k, v, table[0], n, length)
    for got, cache in ((got_k, k), (got_v, v)):
        assert got.shape == (1, 8, length, 80)
        assert torch.equal(got[0, :, :n].transpose(0, 1), ref.gather_keys(cache, table[0], n))
        assert not got[0, :, n:].any()
    with pytest.raises(ValueError, match="multiple of the page size"):
        gather_fresh_kv(k, v, table[0], n, length + 1)


@pytest.mark.gpu
def test_warm_up_builds_each_bucket():
    device = _cuda()
    if cudnn.refusal(device, 8, 2, 64, torch.bfloat16) is not None:
        pytest.skip("cuDNN refuses these heads")
    lengths = cudnn.warm_up(device, 8, 2, 64, torch.bfloat16, 64, 0.125, 3000)
    assert lengths == sorted({cudnn.bucket(n, 64) for n in range(cudnn.MIN_TOKENS, 3001)})
    assert lengths[0] == cudnn.bucket(cudnn.MIN_TOKENS, 64) and lengths[-1] == 3072
