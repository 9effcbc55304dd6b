"""Unit tests for averaging.partition: FlatBuffer round trips, split_by_bandwidth, iter_chunks."""

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from averaging.partition import FlatBuffer, iter_chunks, pacing_rates, split_by_bandwidth


def _mixed_tensors():
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(3, 4, generator=generator).to(torch.float16),
        torch.randn(5, generator=generator),
        torch.randn(2, 3, 2, generator=generator, dtype=torch.float64),
        torch.randn(7, generator=generator).to(torch.bfloat16),
        torch.randn((), generator=generator),  # a scalar
        torch.empty(0, 3),  # an empty tensor
    ]


def test_flat_buffer_layout_and_round_trip():
    tensors = _mixed_tensors()
    originals = [t.clone() for t in tensors]
    flat = FlatBuffer(tensors)
    assert flat.numel == 12 + 5 + 12 + 7 + 1 + 0
    assert flat.offsets == (0, 12, 17, 29, 36, 37, 37)
    buffer = flat.load_from_tensors()
    assert buffer is flat.buffer and buffer.dtype == torch.float32 and buffer.is_contiguous()
    for i, original in enumerate(originals):
        assert torch.equal(flat.view(i), original.float())
    assert torch.equal(buffer[12:17], originals[1])  # layout: tensors end to end, row-major

    buffer.mul_(2.0)  # the "averaged" result
    flat.store_to_tensors()
    for tensor, original in zip(tensors, originals):
        assert tensor.dtype == original.dtype
        # doubling is exact, so the only loss is float64 -> float32 rounding
        assert torch.equal(tensor, (original.float() * 2).to(original.dtype))


def test_flat_buffer_is_reused_and_updates_in_place():
    param = torch.nn.Parameter(torch.ones(4, 4))
    grad_like = torch.zeros(10, dtype=torch.float64)[::2]  # a non-contiguous target
    flat = FlatBuffer([param, grad_like])
    ptr = flat.buffer.data_ptr()
    for round_ in range(3):
        flat.load_from_tensors()
        assert not flat.buffer.requires_grad
        flat.buffer.fill_(float(round_))
        flat.store_to_tensors()
        assert flat.buffer.data_ptr() == ptr
        assert param.eq(round_).all() and grad_like.eq(round_).all()
    assert param.requires_grad and param.grad_fn is None


def test_flat_buffer_float64_is_rounded_to_float32():
    tensor = torch.tensor([1.0 + 2**-40], dtype=torch.float64)
    flat = FlatBuffer([tensor])
    flat.load_from_tensors()
    flat.store_to_tensors()
    assert tensor.item() == 1.0


def test_flat_buffer_signature():
    a = FlatBuffer([torch.zeros(2, 3), torch.zeros(4, dtype=torch.float16)])
    b = FlatBuffer([torch.ones(2, 3), torch.ones(4, dtype=torch.float16)])
    c = FlatBuffer([torch.zeros(3, 2), torch.zeros(4, dtype=torch.float16)])
    d = FlatBuffer([torch.zeros(2, 3), torch.zeros(4, dtype=torch.bfloat16)])
    assert a.signature() == b.signature() and hash(a.signature()) == hash(b.signature())
    assert a.signature() != c.signature() and a.signature() != d.signature()
    assert a.signature() == (((2, 3), "float32"), ((4,), "float16"))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.complex64])
def test_flat_buffer_rejects_non_floating(dtype):
    with pytest.raises(ValueError, match="only floating tensors"):
        FlatBuffer([torch.zeros(3), torch.zeros(3, dtype=dtype)])


def test_flat_buffer_detects_resized_tensor():
    tensor = torch.zeros(4)
    flat = FlatBuffer([tensor])
    tensor.resize_(5)
    with pytest.raises(ValueError, match="changed shape"):
        flat.load_from_tensors()


def test_split_by_bandwidth_examples():
    assert split_by_bandwidth(10, [1, 1]) == [(0, 5), (5, 10)]
    assert split_by_bandwidth(10, [1, 0, 1]) == [(0, 5), (5, 5), (5, 10)]
    assert split_by_bandwidth(10, [1, 1, 1]) == [(0, 4), (4, 7), (7, 10)]  # ties go to the lowest index
    assert split_by_bandwidth(0, [1, 2]) == [(0, 0), (0, 0)]
    assert split_by_bandwidth(100, [3.0, 1.0]) == [(0, 75), (75, 100)]
    # min_part drops the members whose share would be too small and re-balances the rest
    assert split_by_bandwidth(100, [1, 1, 98], min_part=5) == [(0, 0), (0, 0), (0, 100)]
    assert split_by_bandwidth(100, [10, 10, 80], min_part=5) == [(0, 10), (10, 20), (20, 100)]
    assert split_by_bandwidth(3, [1, 2, 2], min_part=10) == [(0, 0), (0, 3), (3, 3)]


@pytest.mark.parametrize(
    "total, bandwidths, min_part, match",
    [
        (10, [0, 0], 0, "all bandwidths are 0"),
        (10, [], 0, "at least one member"),
        (10, [1, -1], 0, "finite number >= 0"),
        (10, [1, float("nan")], 0, "finite number >= 0"),
        (10, [1, float("inf")], 0, "finite number >= 0"),
        (-1, [1], 0, "total"),
        (10, [1], -1, "min_part"),
    ],
)
def test_split_by_bandwidth_rejects_bad_input(total, bandwidths, min_part, match):
    with pytest.raises(ValueError, match=match):
        split_by_bandwidth(total, bandwidths, min_part)


bandwidth_lists = st.lists(
    st.one_of(st.just(0.0), st.floats(1e-3, 1e6), st.integers(1, 1000)), min_size=1, max_size=12
).filter(any)


@settings(max_examples=60, deadline=None, database=None)
@given(total=st.integers(0, 10**9), bandwidths=bandwidth_lists)
def test_split_by_bandwidth_properties(total, bandwidths):
    parts = split_by_bandwidth(total, bandwidths)
    assert len(parts) == len(bandwidths)
    assert parts[0][0] == 0 and parts[-1][1] == total
    for (_, end), (start, _) in zip(parts, parts[1:]):
        assert end == start  # contiguous, in member order
    weight_sum = sum(Fraction(b) for b in bandwidths)
    for (start, end), bandwidth in zip(parts, bandwidths):
        assert start <= end
        if bandwidth == 0:
            assert start == end
        assert abs((end - start) - total * Fraction(bandwidth) / weight_sum) < 1  # proportional
    assert split_by_bandwidth(total, list(bandwidths)) == parts  # deterministic


@settings(max_examples=60, deadline=None, database=None)
@given(total=st.integers(0, 10**6), bandwidths=bandwidth_lists, min_part=st.integers(0, 10**5))
def test_split_by_bandwidth_min_part_properties(total, bandwidths, min_part):
    parts = split_by_bandwidth(total, bandwidths, min_part)
    sizes = [end - start for start, end in parts]
    assert sum(sizes) == total and parts[-1][1] == total
    non_empty = [size for size in sizes if size]
    if len(non_empty) > 1:
        # every remaining member's proportional share was >= min_part, so its size is within one of it
        assert all(size >= min_part - 1 for size in non_empty)
    for size, bandwidth in zip(sizes, bandwidths):
        assert bandwidth > 0 or size == 0


def test_iter_chunks():
    assert list(iter_chunks(0, 10, 4)) == [(0, 4), (4, 8), (8, 10)]
    assert list(iter_chunks(5, 13, 4)) == [(5, 9), (9, 13)]
    assert list(iter_chunks(7, 7, 4)) == []
    with pytest.raises(ValueError, match="chunk_elems"):
        iter_chunks(0, 10, 0)
    with pytest.raises(ValueError, match="start <= end"):
        iter_chunks(10, 0, 4)


@settings(max_examples=50, deadline=None, database=None)
@given(start=st.integers(0, 1000), length=st.integers(0, 1000), chunk=st.integers(1, 300))
def test_iter_chunks_cover_exactly(start, length, chunk):
    chunks = list(iter_chunks(start, start + length, chunk))
    position = start
    for chunk_start, chunk_end in chunks:
        assert chunk_start == position and 0 < chunk_end - chunk_start <= chunk
        position = chunk_end
    assert position == start + length


def test_pacing_rates_split_the_bandwidth_so_each_phase_ends_together():
    parts = [(0, 30), (30, 40), (40, 100), (100, 100)]       # the last member is a client: no part
    uploads, result = pacing_rates(parts, 0, 9.0)
    assert uploads == [0.0, 9.0 * 10 / 70, 9.0 * 60 / 70, 0.0]
    assert sum(uploads) == pytest.approx(9.0)
    assert all((b - a) / r == pytest.approx(70 / 9.0) for (a, b), r in zip(parts[1:3], uploads[1:3]))
    assert result == 3.0                                     # our part goes to the 3 others
    assert pacing_rates(parts, 1, None) == ([], None)


def test_upload_estimate_is_the_best_recent_round_and_ignores_tiny_sends():
    from averaging.bandwidth import MIN_BYTES, WINDOW, UploadEstimate
    est = UploadEstimate()
    assert est.bytes_per_s is None
    est.add(MIN_BYTES - 1, 0.001)                 # a round trip, not the uplink
    est.add(10 << 20, 0.0)
    assert est.bytes_per_s is None
    est.add(10 << 20, 1.0)
    est.add(10 << 20, 2.0)                         # a round that waited on a slow receiver
    assert est.bytes_per_s == 10 << 20
    for _ in range(WINDOW):                        # the link got slower: the old best ages out
        est.add(1 << 20, 1.0)
    assert est.bytes_per_s == 1 << 20


def test_an_averager_without_a_declared_bandwidth_announces_what_its_rounds_measured():
    from averaging import Averager
    from averaging.averager import NOMINAL_BANDWIDTH, StepResult
    from averaging.config import AveragerConfig
    from dht import DHT
    from p2p import NodeConfig

    dht = DHT(node_config=NodeConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
    try:
        measured = Averager([torch.zeros(8)], dht, "measured")
        declared = Averager([torch.zeros(8)], dht, "declared", AveragerConfig(bandwidth=5.0))
        assert measured.matchmaker.me.bandwidth == NOMINAL_BANDWIDTH * 1e6
        round_ = StepResult(ok=True, bytes_sent=30 << 20, timeline={"group": 0.5, "sent": 3.5})
        for averager in (measured, declared):
            averager._measure_upload(round_)
        assert measured.matchmaker.me.bandwidth == pytest.approx((30 << 20) / 3.0)
        assert declared.matchmaker.me.bandwidth == 5e6 and declared.upload.bytes_per_s == pytest.approx((30 << 20) / 3)
    finally:
        dht.shutdown()
