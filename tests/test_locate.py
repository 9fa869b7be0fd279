"""The data-location rule, on generated files (no network)."""

import hashlib

import pytest

from ssmlab.datasets import locate
from ssmlab.datasets.locate import DataError, DataSource


@pytest.fixture
def payload(tmp_path):
    f = tmp_path / "official.bin"
    f.write_bytes(b"some data set\n" * 1000)
    return f


@pytest.fixture
def source(payload):
    return DataSource(
        name="toy",
        url=payload.as_uri(),  # a file:// address stands in for the official one
        filename="toy.bin",
        env_var="SSMLAB_TEST_TOY",
        sha256=hashlib.sha256(payload.read_bytes()).hexdigest(),
    )


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSMLAB_DATA", str(tmp_path / "cache"))
    monkeypatch.delenv("SSMLAB_TEST_TOY", raising=False)


def test_explicit_path_wins(source, tmp_path, monkeypatch):
    mine = tmp_path / "mine.bin"
    mine.write_bytes(b"x")
    monkeypatch.setenv("SSMLAB_TEST_TOY", str(tmp_path / "elsewhere"))
    assert locate.resolve(source, mine) == mine


def test_env_var_used_when_no_flag(source, tmp_path, monkeypatch):
    mine = tmp_path / "env.bin"
    mine.write_bytes(b"x")
    monkeypatch.setenv("SSMLAB_TEST_TOY", str(mine))
    assert locate.resolve(source) == mine


def test_missing_explicit_path_names_the_fix(source, tmp_path):
    with pytest.raises(DataError, match="does not exist.*SSMLAB_TEST_TOY"):
        locate.resolve(source, tmp_path / "nope.bin")


def test_download_verifies_and_caches(source, payload):
    got = locate.resolve(source)
    assert got == locate.cache_dir() / "toy.bin"
    assert got.read_bytes() == payload.read_bytes()
    assert locate.resolve(source, allow_download=False) == got  # second call reads the cache


def test_checksum_mismatch_is_an_error_and_leaves_nothing(source, payload):
    payload.write_bytes(b"tampered")
    with pytest.raises(DataError, match="sha256"):
        locate.resolve(source)
    assert not list(locate.cache_dir().glob("*"))  # no partial file left behind


def test_corrupt_cache_is_reported(source):
    locate.cache_dir().mkdir(parents=True)
    (locate.cache_dir() / "toy.bin").write_bytes(b"truncated")
    with pytest.raises(DataError, match="corrupt or partial"):
        locate.resolve(source)


def test_offline_error_says_where_to_put_the_file(source, tmp_path):
    offline = DataSource(**{**source.__dict__, "url": (tmp_path / "absent.bin").as_uri()})
    with pytest.raises(DataError, match="could not download.*place it at"):
        locate.resolve(offline)


def test_downloads_can_be_disabled(source):
    with pytest.raises(DataError, match="downloads are disabled"):
        locate.resolve(source, allow_download=False)
