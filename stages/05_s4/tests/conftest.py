"""Fixtures: a small generated archive in the official aclImdb layout (no network, no real data)."""

import io
import random
import tarfile

import pytest

POS_WORDS = ["great", "wonderful", "moving", "superb", "loved", "brilliant"]
NEG_WORDS = ["awful", "boring", "dull", "terrible", "hated", "worst"]
FILLER = ["the", "film", "plot", "actor", "scene", "a", "was", "and", "it", "movie", "story"]


def make_review(rng: random.Random, positive: bool) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(8, 30))]
    for _ in range(3):
        words.insert(rng.randrange(len(words)), rng.choice(POS_WORDS if positive else NEG_WORDS))
    return " ".join(words).capitalize() + ".<br /><br />Ünïcode ok."


def write_fake_imdb(path, per_folder: int = 6, seed: int = 0, drop: int = 0, unsup: bool = True):
    """Write aclImdb/{train,test}/{pos,neg}/ID_RATING.txt into a .tar.gz; `drop` files are left out of test/neg."""
    rng = random.Random(seed)
    with tarfile.open(path, "w:gz") as tar:
        def add(name, text):
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"aclImdb/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("README", "fake aclImdb for tests\n")
        for split in ("train", "test"):
            for label in ("pos", "neg"):
                n = per_folder - (drop if (split, label) == ("test", "neg") else 0)
                for i in range(n):
                    rating = rng.randint(7, 10) if label == "pos" else rng.randint(1, 4)
                    add(f"{split}/{label}/{i}_{rating}.txt", make_review(rng, label == "pos"))
        if unsup:
            add("train/unsup/0_0.txt", "unlabelled")
    return path


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """A private user cache, and no SSMLAB_IMDB from the environment."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SSMLAB_DATA", str(cache))
    monkeypatch.delenv("SSMLAB_IMDB", raising=False)
    return cache


@pytest.fixture
def fake_imdb(tmp_path, isolated_cache):
    return write_fake_imdb(tmp_path / "aclImdb_small.tar.gz")


@pytest.fixture
def make_fake_imdb():
    """The archive writer itself (test modules cannot import conftest under --import-mode=importlib)."""
    return write_fake_imdb


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP spinning on a shared 2-core machine (several times faster)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
