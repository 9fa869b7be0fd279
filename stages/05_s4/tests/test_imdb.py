"""The IMDb loader on small generated archives: counts, labels, ratings, errors, cache, tokenizers."""

import tarfile

import numpy as np
import torch
import pytest

from ssmlab.datasets.imdb import clean_review, find_imdb, load_imdb, read_imdb, train_val_split
from ssmlab.datasets.locate import DataError
from ssmlab.datasets.tokenize import PAD_ID, BpeTokenizer, ByteTokenizer, Packed


def test_counts_labels_ratings(fake_imdb):
    data = read_imdb(fake_imdb, per_folder=6)
    for split in (data.train, data.test):
        assert len(split) == 12 and split.labels.sum() == 6
        assert np.all(split.ratings[split.labels == 1] >= 7) and np.all(split.ratings[split.labels == 0] <= 4)
    with tarfile.open(fake_imdb) as tar:  # one file checked by name: ID_RATING.txt in its folder
        name = next(m.name for m in tar if m.name.startswith("aclImdb/train/pos/3_"))
        text = tar.extractfile(name).read().decode()
    i = int(np.flatnonzero((data.train.labels == 1) & (data.train.ids == 3))[0])
    assert data.train.texts[i] == text and data.train.ratings[i] == int(name.rsplit("_", 1)[1][:-4])


def test_reads_a_folder(fake_imdb, tmp_path):
    with tarfile.open(fake_imdb) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    a, b = read_imdb(tmp_path / "x", per_folder=6), read_imdb(tmp_path / "x" / "aclImdb", per_folder=6)
    c = read_imdb(fake_imdb, per_folder=6)
    assert a.train.texts == b.train.texts == c.train.texts and np.array_equal(a.test.ratings, c.test.ratings)


def test_partial_archive_is_an_error(tmp_path, isolated_cache, make_fake_imdb):
    path = make_fake_imdb(tmp_path / "partial.tar.gz", per_folder=6, drop=1)
    with pytest.raises(DataError, match="incomplete.*test/neg': 5"):
        load_imdb(path, per_folder=6)
    with pytest.raises(DataError, match="incomplete"):  # the real count is the default
        read_imdb(make_fake_imdb(tmp_path / "small.tar.gz"))


def test_corrupt_archive_is_an_error(fake_imdb, tmp_path):
    raw = fake_imdb.read_bytes()
    bad = tmp_path / "truncated.tar.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        read_imdb(bad, per_folder=6)


def test_checksum_failure_of_cached_download(isolated_cache):
    isolated_cache.mkdir(parents=True)
    (isolated_cache / "aclImdb_v1.tar.gz").write_bytes(b"not the official archive")
    with pytest.raises(DataError, match="md5"):
        find_imdb()


def test_missing_file_errors(tmp_path, isolated_cache, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        load_imdb(tmp_path / "nope.tar.gz")
    monkeypatch.setenv("SSMLAB_IMDB", str(tmp_path / "also_missing"))
    with pytest.raises(DataError, match="SSMLAB_IMDB"):
        load_imdb()


def test_env_var_and_parsed_cache(fake_imdb, isolated_cache, monkeypatch):
    monkeypatch.setenv("SSMLAB_IMDB", str(fake_imdb))
    first = load_imdb(per_folder=6)
    cached = list((isolated_cache / "imdb").glob("parsed-*.npz"))
    assert len(cached) == 1
    second = load_imdb(per_folder=6)
    assert second.train.texts == first.train.texts and np.array_equal(second.test.labels, first.test.labels)


def test_train_val_split_is_stratified_and_disjoint():
    labels = np.array([0] * 50 + [1] * 30)
    tr, va = train_val_split(labels, 0.2, seed=1)
    assert len(set(tr) & set(va)) == 0 and len(tr) + len(va) == 80
    assert labels[va].sum() == 6 and len(va) == 16
    assert np.array_equal(train_val_split(labels, 0.2, seed=1)[1], va)
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(labels, 1.5)


def test_tokenizers(fake_imdb):
    texts = [clean_review(t) for t in read_imdb(fake_imdb, per_folder=6).train.texts]
    assert all("<br />" not in t for t in texts)
    byte = ByteTokenizer()
    packed = byte.encode_all(texts, max_len=16)
    assert packed.lengths().max() == 16 and packed.ids.min() >= 1 and packed.ids.max() <= 256
    assert byte.decode(byte.encode("héllo")) == "héllo"
    bpe = BpeTokenizer.train(texts, vocab_size=300, min_frequency=1)
    assert bpe.vocab_size <= 300 and bpe.tok.token_to_id("[PAD]") == PAD_ID
    enc = bpe.encode_all(texts)
    assert enc.ids.min() > PAD_ID and bpe.decode(enc[0]) == texts[0]
    x, lens = enc.pad([0, 1, 2], multiple=8)
    assert x.shape[1] % 8 == 0 and np.all(x[0, lens[0]:] == PAD_ID) and np.array_equal(x[1, : lens[1]], enc[1])
    assert len(enc.select([2, 0])) == 2 and np.array_equal(enc.select([2, 0])[0], enc[2])
    assert isinstance(enc, Packed)


def test_length_bucket_batches_cover_an_epoch_and_resume():
    from ssmlab.datasets.tokenize import LengthBucketBatches

    rng = np.random.default_rng(0)
    packed = Packed.from_lists([np.arange(1, rng.integers(2, 40)) for _ in range(50)])
    labels = np.arange(50) % 2
    it = LengthBucketBatches(packed, labels, batch_size=8, seed=3, pool=2)
    assert it.steps_per_epoch() == 6  # 48 of 50 examples: the incomplete batch is dropped
    for _ in range(3):
        ids, lens, y = next(it)
        assert ids.shape[0] == 8 and ids.shape[1] % 8 == 0 and int(lens.max()) <= ids.shape[1]
        assert (ids != 0).sum(1).tolist() == lens.tolist()
    state = it.state_dict()
    rest = [next(it) for _ in range(5)]  # crosses into epoch 1
    it2 = LengthBucketBatches(packed, labels, batch_size=8, seed=3, pool=2)
    it2.load_state_dict(state)
    for a, b in zip(rest, (next(it2) for _ in range(5))):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="batch_size"):
        LengthBucketBatches(packed, labels, batch_size=51)
