"""The real data sets the stages use, with their official addresses."""

from ssmlab.datasets.locate import DataSource

IMDB = DataSource(
    name="IMDb Large Movie Review Dataset v1.0",
    url="https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
    filename="aclImdb_v1.tar.gz",
    env_var="SSMLAB_IMDB",
    md5="7c2ac02c03563afcf9b574c7e56c153a",
)

TINY_SHAKESPEARE = DataSource(
    name="Tiny Shakespeare",
    url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    filename="tinyshakespeare.txt",
    env_var="SSMLAB_TINY_SHAKESPEARE",
    sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
)
