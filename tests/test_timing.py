"""ssmlab.core.timing.Timer: warm-up calls are not timed, one entry per timed repeat."""

import time

import pytest
import torch

from ssmlab.core.timing import Timer


def test_cpu_timer_counts_calls_and_measures_sleep():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.01)

    times = Timer(torch.device("cpu"))(fn, warmup=2, repeats=3)
    assert len(calls) == 5 and len(times) == 3
    assert all(0.009 <= t < 1.0 for t in times)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_timer_uses_events():
    x = torch.randn(1024, 1024, device="cuda")
    times = Timer(torch.device("cuda"))(lambda: x @ x, warmup=1, repeats=2)
    assert len(times) == 2 and all(t > 0 for t in times)
