"""Property tests of the scan algebra: the associative operator, and every
parallel scan equal to the sequential one for any input (hypothesis draws the
shapes, lengths, chunk sizes and values)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmlab.core import scan

PARALLEL = [scan.linear_scan_hillis_steele, scan.linear_scan_blelloch, scan.linear_scan_chunked]


@st.composite
def scan_inputs(draw):
    """(a, b, h0) in float64 over a random batch shape; a may be negative or > 1 (any affine map)."""
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    L = draw(st.integers(1, 70))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(batch + (L,), generator=g, dtype=torch.float64) * 2.2 - 1.1)
    b = torch.randn(batch + (L,), generator=g, dtype=torch.float64)
    h0 = torch.randn(batch, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    return a, b, h0


@settings(max_examples=60, deadline=None)
@given(scan_inputs())
def test_parallel_scans_equal_sequential(inputs):
    a, b, h0 = inputs
    want = scan.linear_scan_ref(a, b, h0)
    scale = 1.0 + want.abs().max().item()
    for fn in PARALLEL:
        got = fn(a, b, h0)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-10 * scale, fn.__name__


@settings(max_examples=40, deadline=None)
@given(scan_inputs(), st.integers(1, 80))
def test_chunked_scan_any_chunk_length(inputs, chunk_len):
    a, b, h0 = inputs
    want = scan.linear_scan_ref(a, b, h0)
    got = scan.linear_scan_chunked(a, b, h0, chunk_len=chunk_len)
    assert (got - want).abs().max().item() <= 1e-10 * (1.0 + want.abs().max().item())


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 5))
def test_compose_is_associative_with_identity(seed, n):
    g = torch.Generator().manual_seed(seed)
    x, y, w = [tuple(torch.randn(n, generator=g, dtype=torch.float64) for _ in range(2)) for _ in range(3)]
    left = scan.compose(scan.compose(x, y), w)
    right = scan.compose(x, scan.compose(y, w))
    for l_, r_ in zip(left, right):
        torch.testing.assert_close(l_, r_, rtol=1e-12, atol=1e-12)
    identity = (torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64))
    for l_, r_ in zip(scan.compose(identity, x), x):
        assert torch.equal(l_, r_)
    # Applying a map to a state is composing with the constant map (1, h).
    h = torch.randn(n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(scan.compose((torch.ones_like(h), h), x)[1], x[0] * h + x[1])
