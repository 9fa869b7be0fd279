"""The sequential digits data: shapes, range, a deterministic split, a fixed permutation."""

import torch

from ssmlab.datasets.digits import SEQ_LEN, load_digits_sequences, permutation


def test_shapes_and_range():
    s = load_digits_sequences()
    assert s.x_train.shape == (1437, SEQ_LEN, 1) and s.x_test.shape == (360, SEQ_LEN, 1)
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    assert abs(s.x_train.mean()) < 1e-5 and abs(s.x_train.std() - 1) < 1e-3  # standardized on train
    raw = load_digits_sequences(standardize=False)
    assert raw.x_train.min() == 0 and raw.x_train.max() == 1
    assert set(s.y_test.tolist()) == set(range(10))


def test_split_is_deterministic():
    a, b = load_digits_sequences(), load_digits_sequences()
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)


def test_permuted_is_the_same_split_reordered():
    plain, perm = load_digits_sequences(), load_digits_sequences(permuted=True)
    p = torch.from_numpy(permutation())
    assert torch.equal(perm.x_train, plain.x_train[:, p]) and torch.equal(perm.y_train, plain.y_train)
    assert not torch.equal(p, torch.arange(SEQ_LEN))
