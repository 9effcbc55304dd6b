"""Tests for peer.training.data: the embedded corpus, splits, batch streams and per-peer sharding."""
import importlib.resources
import importlib.util
import itertools
import random

import pytest
import torch

from peer.training.data import DEFAULT_CORPUS, STRIPE_BYTES, ByteDataset, batches, eval_batches, load_corpus, shard_ranges


def random_text(length, seed=0):
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(length))


def test_embedded_corpus_is_english_prose_of_the_right_size():
    text = load_corpus()
    size = len(text.encode("utf-8"))
    assert 500_000 <= size <= 2_000_000
    assert DEFAULT_CORPUS.stat().st_size < 3_000_000
    assert text.count(" the ") > 5000 and ">>>" not in text
    assert (DEFAULT_CORPUS.parent / "README.md").read_text().count("PSF-2.0") >= 1
    # the corpus is package data of peer.training.data (pyproject package-data), found where the package is
    assert (importlib.resources.files("peer.training.data") / "corpus.txt").read_bytes() == DEFAULT_CORPUS.read_bytes()


def test_corpus_script_is_deterministic_and_bounded():
    spec = importlib.util.spec_from_file_location("make_corpus", DEFAULT_CORPUS.parent / "make_corpus.py")
    make_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_corpus)
    first = make_corpus.build_corpus(max_bytes=20_000)
    assert first == make_corpus.build_corpus(max_bytes=20_000)
    assert 10_000 < len(first.encode("utf-8")) <= 20_000
    assert make_corpus.is_prose("This sentence is plain English prose with enough words in it.")
    assert not make_corpus.is_prose("for i in range(10):\n    print(i)")
    assert not make_corpus.is_prose(">>> print('a doctest session that should be dropped')")


def test_load_corpus_from_file_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("second file")
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "ignored.md").write_text("not text")
    assert load_corpus(tmp_path) == "first file\n\nsecond file"
    assert load_corpus(tmp_path / "b.txt") == "second file"
    assert load_corpus(str(tmp_path / "a.txt")) == "first file"
    with pytest.raises(FileNotFoundError):
        load_corpus(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError):
        load_corpus(tmp_path / "empty")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match="UTF-8"):
        load_corpus(tmp_path / "latin1.txt")


def test_dataset_split_and_windows(tmp_path):
    text = random_text(10_000)
    train = ByteDataset(text, block_size=16)
    held_out = ByteDataset(text, block_size=16, split="eval", eval_fraction=0.1)
    assert len(held_out.data) == 1000 and len(train.data) == 9500  # default eval_fraction 0.05
    train_90 = ByteDataset(text, block_size=16, eval_fraction=0.1)
    assert bytes(train_90.data.tolist()) + bytes(held_out.data.tolist()) == text.encode()  # disjoint, complete
    x, y = train[100]
    assert x.dtype == torch.long and x.shape == (16,)
    assert bytes(x.tolist()) == text[100:116].encode() and bytes(y.tolist()) == text[101:117].encode()
    assert len(train) == 9500 - 16
    with pytest.raises(IndexError):
        train[len(train)]
    path = tmp_path / "t.txt"
    path.write_text(text)
    assert torch.equal(ByteDataset(path, 16).data, train.data)
    assert len(ByteDataset([path, path], 16).data) > len(train.data)
    assert torch.equal(ByteDataset(text.encode(), 16).data, train.data)
    with pytest.raises(ValueError):
        ByteDataset("too short", block_size=16)
    with pytest.raises(ValueError):
        ByteDataset(text, 16, split="test")
    with pytest.raises(ValueError):
        ByteDataset(text, 16, eval_fraction=0.0)


def test_batches_are_shifted_deterministic_and_seeded():
    dataset = ByteDataset(random_text(5_000), block_size=12)
    stream = batches(dataset, batch_size=4, seed=7)
    x, y = next(stream)
    assert x.shape == y.shape == (4, 12) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    again = next(batches(dataset, batch_size=4, seed=7))
    assert torch.equal(again[0], x)
    other = next(batches(dataset, batch_size=4, seed=8))
    assert not torch.equal(other[0], x)
    assert not torch.equal(next(stream)[0], x)  # the stream moves on
    with pytest.raises(ValueError):
        next(batches(dataset, batch_size=0, seed=0))


def test_shards_are_disjoint_and_cover_the_data():
    text = random_text(200_000, seed=1)
    dataset = ByteDataset(text, block_size=16)
    n = 3
    ranges = [shard_ranges(dataset, (i, n)).tolist() for i in range(n)]
    covered = sorted(r for rs in ranges for r in rs)
    assert covered[0][0] == 0 and covered[-1][1] == len(dataset.data)
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))          # disjoint, no gaps
    assert all(len(rs) >= 3 for rs in ranges)                               # striped over the whole corpus
    assert {r[0] // STRIPE_BYTES % n for r in ranges[1]} == {1}
    data = bytes(dataset.data.tolist())
    for i in range(n):
        spans = [data[a:b] for a, b in ranges[i]]
        others = [data[a:b] for j in range(n) if j != i for a, b in ranges[j]]
        stripes_hit = set()
        for x, y in itertools.islice(batches(dataset, batch_size=16, seed=0, shard=(i, n)), 20):
            for row_x, row_y in zip(x.tolist(), y.tolist()):
                window = bytes(row_x + row_y[-1:])
                inside = [k for k, span in enumerate(spans) if window in span]
                assert inside, "a window crosses a stripe boundary or lies outside the shard"
                assert all(window not in span for span in others)
                stripes_hit.update(inside)
        assert len(stripes_hit) == len(spans)                               # samples the whole corpus
    # same seed, different peers: different streams
    first = [next(batches(dataset, 8, seed=0, shard=(i, n)))[0] for i in range(n)]
    assert not torch.equal(first[0], first[1])
    for bad in [(3, 3), (-1, 3), (0, 0)]:
        with pytest.raises(ValueError):
            shard_ranges(dataset, bad)
    with pytest.raises(ValueError):
        shard_ranges(dataset, (20, 21))  # 200 KB in 16 KB stripes: shard 20 of 21 gets none


def test_eval_batches_cover_disjoint_windows():
    dataset = ByteDataset(random_text(2_000), block_size=10, split="eval", eval_fraction=0.5)
    seen = list(eval_batches(dataset, batch_size=7))
    windows = torch.cat([x for x, _ in seen])
    assert windows.shape[0] == len(range(0, len(dataset), 10))
    assert torch.equal(windows[1], dataset.data[10:20].long())
    assert len(list(eval_batches(dataset, batch_size=7, max_batches=2))) == 2
