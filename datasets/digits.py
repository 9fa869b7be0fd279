"""Sequential digits: scikit-learn's 8×8 handwritten digits read pixel by pixel.

Each image (8×8, grey levels 0..16) becomes a sequence of L = 64 scalars,
read row by row (the small cousin of sequential MNIST), and the label
0..9 is predicted after the last pixel. The *permuted* variant shuffles the
pixel order by one fixed permutation (same for every image), which destroys
locality: neighbouring pixels land far apart in time.

The data ships inside scikit-learn (1797 images), so nothing is downloaded.
The split is deterministic: stratified by label with a fixed seed, 80 % train
and 20 % test. Grey levels are scaled to [0, 1] and, by default, standardized
with the training set's mean and standard deviation (a zero-mean input lets
a model with mean pooling see differences between images from the first step).

Shapes: B images, L = 64 pixels, d_input = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

SEQ_LEN = 64  # L: pixels per image
N_CLASSES = 10
SPLIT_SEED = 0  # fixes the train/test split
PERM_SEED = 1234  # fixes the pixel permutation of the permuted variant


@dataclass
class DigitsSplit:
    """Train and test tensors: x (B, L, 1) float32, y (B,) int64."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    permuted: bool

    def describe(self) -> dict:
        return {"train": len(self.y_train), "test": len(self.y_test), "L": SEQ_LEN, "permuted": self.permuted,
                "split_seed": SPLIT_SEED, "perm_seed": PERM_SEED if self.permuted else None}


def permutation() -> np.ndarray:
    """The fixed pixel order of the permuted task: (L,) indices."""
    return np.random.default_rng(PERM_SEED).permutation(SEQ_LEN)


def load_digits_sequences(permuted: bool = False, test_fraction: float = 0.2, standardize: bool = True) -> DigitsSplit:
    """The 8×8 digits as pixel sequences, split deterministically (stratified, seed SPLIT_SEED).

    standardize: subtract the training pixels' mean and divide by their standard deviation
    (else grey levels / 16 in [0, 1]).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)  # (1797, 64) row-major pixels
    if permuted:
        x = x[:, permutation()]
    y = data.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=SPLIT_SEED, stratify=y)
    if standardize:
        mu, sd = xtr.mean(), xtr.std()
        xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return DigitsSplit(t(xtr)[..., None], t(ytr), t(xte)[..., None], t(yte), permuted)
