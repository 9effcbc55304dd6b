"""Unit tests for averaging.compression: wire sizes, round-trip error bounds, validation, error feedback."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from averaging.compression import (
    Float16Compression,
    NoCompression,
    Uint4BlockwiseCompression,
    Uint8BlockwiseCompression,
    choose_compression,
    get_compression,
)

ALL = [NoCompression(), Float16Compression(), Uint8BlockwiseCompression(), Uint8BlockwiseCompression(block_size=64),
       Uint4BlockwiseCompression(), Uint4BlockwiseCompression(block_size=7)]
BLOCKWISE = [Uint8BlockwiseCompression, Uint4BlockwiseCompression]
FMAX = torch.finfo(torch.float32).max


def _random(numel, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=generator) * scale


@pytest.mark.parametrize("compression", ALL, ids=lambda c: repr(c))
@pytest.mark.parametrize("numel", [0, 1, 63, 64, 65, 4095, 4096, 4097, 100_003])
def test_size_is_exact_and_output_is_finite(compression, numel):
    chunk = _random(numel, seed=numel)
    data = compression.compress(chunk)
    assert isinstance(data, bytes)
    assert len(data) == compression.bytes_for(numel)
    restored = compression.decompress(data, numel)
    assert restored.dtype == torch.float32 and restored.shape == (numel,)
    assert torch.isfinite(restored).all()
    assert chunk.numel() == numel and torch.equal(chunk, _random(numel, seed=numel))  # input untouched


def test_sizes():
    assert NoCompression().bytes_for(10) == 40
    assert Float16Compression().bytes_for(10) == 20
    int8 = Uint8BlockwiseCompression(block_size=4096)
    assert int8.bytes_for(0) == 0
    assert int8.bytes_for(1) == 9
    assert int8.bytes_for(4096) == 4096 + 8
    assert int8.bytes_for(4097) == 4097 + 16


def test_none_is_exact_and_zero_copy():
    chunk = _random(1000)
    data = NoCompression().compress(chunk)
    restored = NoCompression().decompress(data, 1000)
    assert torch.equal(restored, chunk)
    writable = bytearray(data)
    view = NoCompression().decompress(writable, 1000)
    writable[0:4] = np.float32(42.0).tobytes()
    assert view[0].item() == 42.0  # shares memory with the buffer: no copy was made
    from_memoryview = NoCompression().decompress(memoryview(data)[4:], 999)
    assert torch.equal(from_memoryview, chunk[1:])


def test_fp16_relative_error_and_saturation():
    chunk = _random(100_000, scale=100.0)
    chunk[0], chunk[1], chunk[2], chunk[3] = 1e9, -1e9, 65519.0, -FMAX
    chunk[10:1010] *= 1e-7  # below the normal fp16 range: absolute error bound instead
    restored = Float16Compression().decompress(Float16Compression().compress(chunk), chunk.numel())
    assert torch.isfinite(restored).all()
    assert restored[:4].tolist() == [65504.0, -65504.0, 65504.0, -65504.0]
    normal = chunk[4:].abs() >= 6.2e-5
    relative = ((restored[4:] - chunk[4:]).abs() / chunk[4:].abs())[normal]
    assert relative.max().item() <= 1e-3
    assert (~normal).sum() > 100
    assert (restored[4:] - chunk[4:]).abs()[~normal].max().item() <= 2**-25


def test_fp16_rejects_inf():
    chunk = _random(10)
    chunk[3] = math.inf
    with pytest.raises(ValueError, match="inf"):
        Float16Compression().compress(chunk)


def _block_rows(flat, block_size):
    """2-D views of the full blocks and of the short tail block of a flat tensor."""
    full = flat.numel() // block_size
    rows = [flat[: full * block_size].view(full, block_size)]
    if flat.numel() % block_size:
        rows.append(flat[full * block_size :].view(1, -1))
    return rows


def _assert_int8_bound(chunk, restored, block_size, levels=255):
    """|x - x'| <= (block max - block min) / levels / 2, up to float32 rounding, for every block."""
    for block, approx in zip(_block_rows(chunk.double(), block_size), _block_rows(restored.double(), block_size)):
        if block.numel() == 0:
            continue
        spread = block.amax(dim=1, keepdim=True) - block.amin(dim=1, keepdim=True)
        rounding = 4 * 2**-24 * block.abs().amax(dim=1, keepdim=True) + 1e-43  # relative; absolute if subnormal
        assert ((block - approx).abs() <= spread / (2 * levels) * (1 + 1e-5) + rounding).all()


@pytest.mark.parametrize("cls", BLOCKWISE, ids=lambda c: c.__name__)
@pytest.mark.parametrize("block_size", [1, 7, 256, 4096])
def test_int8_error_bound(block_size, cls):
    chunk = _random(20_011, seed=block_size)
    chunk[: 20_011 // 2] *= 1000.0  # blocks with very different ranges
    chunk[5000:6000] += 1e4  # large offsets relative to the spread
    chunk[9000:9100] = 0.25  # constant region
    compression = cls(block_size=block_size, slab_elems=1000)
    restored = compression.decompress(compression.compress(chunk), chunk.numel())
    _assert_int8_bound(chunk, restored, block_size, compression.levels)


@settings(max_examples=60, deadline=None, database=None)
@given(
    values=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=300),
    block_size=st.sampled_from([1, 3, 16, 4096]),
    cls=st.sampled_from(BLOCKWISE),
)
def test_int8_error_bound_property(values, block_size, cls):
    chunk = torch.tensor(values, dtype=torch.float32)
    compression = cls(block_size=block_size, slab_elems=32)
    restored = compression.decompress(compression.compress(chunk), chunk.numel())
    assert torch.isfinite(restored).all()
    _assert_int8_bound(chunk, restored, block_size, compression.levels)


def test_int4_packs_two_codes_per_byte():
    int4 = Uint4BlockwiseCompression(block_size=1024)
    assert int4.bytes_for(0) == 0 and int4.bytes_for(1) == 9 and int4.bytes_for(1024) == 512 + 8
    assert int4.bytes_for(1025) == 513 + 16
    chunk = torch.tensor([0.0, 15.0, 1.0, 14.0, 7.0], dtype=torch.float32)    # one block: step 1, codes = values
    data = int4.compress(chunk)
    assert list(data[8:]) == [0 | 15 << 4, 1 | 14 << 4, 7]
    assert torch.equal(int4.decompress(data, 5), chunk)


def test_int8_constant_block_is_exact_and_extremes_stay_finite():
    compression = Uint8BlockwiseCompression(block_size=4)
    chunk = torch.tensor([3.5, 3.5, 3.5, 3.5, FMAX, -FMAX, FMAX, 0.0, 1e-45, 0.0, 1e-45, 0.0])
    restored = compression.decompress(compression.compress(chunk), chunk.numel())
    assert torch.isfinite(restored).all()
    assert restored[:4].tolist() == [3.5] * 4
    assert restored[4].item() == FMAX and restored[5].item() == -FMAX
    assert (restored[8:] - chunk[8:]).abs().max().item() <= 1e-44


@pytest.mark.parametrize(
    "values", [[1.4e-45], [0.0, 1.1754943508222875e-38], [0.0, 1.4825737752556565e-42], [-FMAX, FMAX, 0.0, 1.0]]
)
def test_int8_subnormal_and_huge_ranges(values):
    chunk = torch.tensor(values, dtype=torch.float32)
    compression = Uint8BlockwiseCompression(block_size=2)
    restored = compression.decompress(compression.compress(chunk), chunk.numel())
    assert torch.isfinite(restored).all()
    _assert_int8_bound(chunk, restored, block_size=2)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_int8_rejects_non_finite(bad):
    chunk = _random(5000)
    chunk[4500] = bad
    with pytest.raises(ValueError, match="NaN or"):
        Uint8BlockwiseCompression().compress(chunk)


@pytest.mark.parametrize("compression", ALL, ids=lambda c: repr(c))
def test_decompress_rejects_wrong_length(compression):
    data = compression.compress(_random(5000))
    for bad in (data[:-1], data + b"\0", b""):
        with pytest.raises(ValueError, match="must be .* bytes, got"):
            compression.decompress(bad, 5000)
    with pytest.raises(ValueError):
        compression.decompress(data, -1)


def test_int8_rejects_corrupt_header():
    compression = Uint8BlockwiseCompression(block_size=8)
    data = bytearray(compression.compress(_random(16)))
    data[0:4] = np.float32(np.nan).tobytes()
    with pytest.raises(ValueError, match="corrupt"):
        compression.decompress(data, 16)
    data = bytearray(compression.compress(_random(16)))
    data[8:12] = np.float32(-1.0).tobytes()  # negative step of block 0
    with pytest.raises(ValueError, match="corrupt"):
        compression.decompress(data, 16)


@pytest.mark.parametrize("compression", ALL, ids=lambda c: repr(c))
def test_decompress_into_out(compression):
    chunk = _random(9000)
    data = compression.compress(chunk)
    flat = torch.full((10_000,), 7.0)
    returned = compression.decompress(data, 9000, out=flat[500:9500])
    assert returned.data_ptr() == flat[500:].data_ptr()
    assert torch.equal(flat[500:9500], compression.decompress(data, 9000))
    assert flat[:500].eq(7.0).all() and flat[9500:].eq(7.0).all()
    with pytest.raises(ValueError, match="elements"):
        compression.decompress(data, 9000, out=flat[:10])


@pytest.mark.parametrize(
    "chunk",
    [torch.zeros(4, dtype=torch.float64), torch.zeros(2, 2), torch.zeros(8)[::2], [0.0, 1.0]],
    ids=["float64", "2d", "strided", "list"],
)
def test_compress_rejects_bad_chunks(chunk):
    for compression in ALL:
        with pytest.raises(ValueError, match="chunk"):
            compression.compress(chunk)


def test_factories():
    assert isinstance(get_compression("none"), NoCompression)
    assert isinstance(get_compression("fp16"), Float16Compression)
    assert get_compression("int8") == Uint8BlockwiseCompression(block_size=4096)
    assert get_compression("int8", block_size=128).block_size == 128
    assert [c.name for c in ALL[:3]] == ["none", "fp16", "int8"] and get_compression("int4").name == "int4"
    with pytest.raises(ValueError, match="unknown compression"):
        get_compression("zstd")
    with pytest.raises(ValueError, match="block_size"):
        Uint8BlockwiseCompression(block_size=0)
    assert choose_compression(100, "int8").name == "none"
    assert choose_compression(65536, "int8").name == "int8"
    assert choose_compression(1000, "fp16", min_numel_to_compress=10).name == "fp16"
