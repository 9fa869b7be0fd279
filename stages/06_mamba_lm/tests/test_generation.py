"""Recurrent inference: step-by-step decoding equals the parallel forward; constant memory per token; sampling."""

import pytest
import torch

from ssmlab.core.generation import SamplingConfig, cache_nbytes, filter_logits, generate, sample_next
from ssmlab.core.mamba import MambaLMHeadModel, preset
from ssmlab.core.testing import assert_close_rel

torch.set_num_threads(1)


def _model(**overrides):
    torch.manual_seed(0)
    model = MambaLMHeadModel(preset("tiny", vocab_size=30, **overrides)).eval()
    with torch.no_grad():  # move away from the init so every path matters (D != 1, varied A)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("overrides", [dict(), dict(gated=False, d_conv=2), dict(d_state=1, expand=1), dict(bias=True)])
@pytest.mark.parametrize("L, prefill", [(1, 1), (2, 1), (13, 1), (13, 5), (17, 16)])
def test_step_by_step_equals_parallel(overrides, L, prefill):
    model = _model(**overrides)
    x = torch.randint(0, 30, (3, L))
    with torch.no_grad():
        full = model(x)
        caches = model.allocate_cache(3)
        pieces = [model(x[:, :prefill], caches)]
        for t in range(prefill, L):
            pieces.append(model.step(x[:, t], caches)[:, None])
    assert_close_rel(torch.cat(pieces, 1), full, torch.float32, "step vs parallel")
    assert all(c.seqlen_offset == L for c in caches)


def test_chunked_prefill_equals_parallel():
    model = _model()
    x = torch.randint(0, 30, (2, 21))
    with torch.no_grad():
        full = model(x)
        caches = model.allocate_cache(2)
        pieces = [model(x[:, a:b], caches) for a, b in [(0, 2), (2, 3), (3, 11), (11, 21)]]
    assert_close_rel(torch.cat(pieces, 1), full, torch.float32, "chunked prefill")


def test_step_backward_matches_parallel():
    model = _model()
    x = torch.randint(0, 30, (2, 6))
    model(x).sum().backward()
    g_full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    caches = model.allocate_cache(2)
    torch.stack([model.step(x[:, t], caches) for t in range(6)], 1).sum().backward()
    for n, p in model.named_parameters():
        assert_close_rel(p.grad, g_full[n], torch.float32, n, factor=10)


def test_greedy_generation_equals_repeated_full_forward():
    model = _model()
    prompt = torch.randint(0, 30, (2, 7))
    ids, logits = generate(model, prompt, 9, return_logits=True)
    assert ids.shape == (2, 16) and logits.shape == (2, 9, 30)
    assert torch.equal(ids[:, :7], prompt)
    with torch.no_grad():
        full = model(ids)[:, 6:-1, :30]  # the logits that chose tokens 7..15
    assert_close_rel(logits, full, torch.float32, "generation logits")
    assert torch.equal(ids[:, 7:], full.argmax(-1))


def test_memory_per_token_is_constant():
    model = _model()
    sizes = []
    for prompt_len in (4, 64):
        caches = model.allocate_cache(2)
        with torch.no_grad():
            model(torch.randint(0, 30, (2, prompt_len)), caches)
            before = cache_nbytes(caches)
            for _ in range(20):
                model.step(torch.randint(0, 30, (2,)), caches)
                assert cache_nbytes(caches) == before  # nothing grows per token
        sizes.append(before)
    cfg = model.config
    assert sizes[0] == sizes[1] == cfg.n_layer * 2 * cfg.d_inner * (cfg.d_conv + cfg.d_state) * 4  # fp32, B=2


def test_step_time_does_not_grow_with_context():
    """O(1) per token: the work of a step is independent of how much came before (count the flops)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _model()
    flops = []
    for prompt_len in (2, 200):
        caches = model.allocate_cache(1)
        with torch.no_grad():
            model(torch.randint(0, 30, (1, prompt_len)), caches)
            with FlopCounterMode(display=False) as counter:
                model.step(torch.randint(0, 30, (1,)), caches)
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1] > 0


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # nucleus 0.7: 0.5 alone is short of 0.7, 0.5 + 0.3 reaches it -> keep two
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]
    assert not torch.isinf(filter_logits(logits, top_p=1.0)).any()
    shuffled = logits[:, [2, 0, 3, 1]]  # order does not matter
    assert torch.isinf(filter_logits(shuffled, top_p=0.7)).tolist() == [[True, False, True, False]]


def test_sampling_respects_filters_and_seed():
    logits = torch.randn(4, 30)
    g = torch.Generator().manual_seed(1)
    s = SamplingConfig(temperature=0.7, top_k=3)
    top3 = logits.topk(3).indices
    for _ in range(20):
        tok = sample_next(logits, s, g)
        assert (tok[:, None] == top3).any(-1).all()
    a = sample_next(logits, SamplingConfig(top_p=0.9), torch.Generator().manual_seed(5))
    b = sample_next(logits, SamplingConfig(top_p=0.9), torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.equal(sample_next(logits, SamplingConfig(greedy=True)), logits.argmax(-1))


def test_generate_sampling_and_eos():
    model = _model()
    prompt = torch.randint(0, 30, (3, 4))
    ids = generate(model, prompt, 12, SamplingConfig(temperature=1.5, top_p=0.95), torch.Generator().manual_seed(0),
                   eos_token_id=5)
    assert ids.shape == (3, 16) and int(ids.max()) < 30  # padded vocabulary never sampled
    for row in ids[:, 4:]:
        hits = (row == 5).nonzero()
        if len(hits):
            assert (row[hits[0, 0]:] == 5).all()


@pytest.mark.parametrize("bad, match", [(dict(temperature=0.0), "temperature"), (dict(top_k=-1), "top_k"),
                                        (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")])
def test_bad_sampling_config(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**bad)


def test_generate_bad_inputs():
    model = _model()
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), -1)
