"""The sampler's two fast paths for requests with a temperature: nucleus (top-p) filtering that looks for the
nucleus among the most likely tokens before sorting the whole vocabulary, and drawing a token by inverting
the cumulative distribution at one uniform draw (in place of `torch.multinomial`). The kept set equals
transformers' TopPLogitsWarper's on peaked and flat 49k-token distributions (both paths), and draws follow
the distribution."""
import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from service.engine.sampling import TOP_P_CANDIDATES, RequestSampler, SamplingParams, _top_p


@pytest.mark.parametrize("spread", [0.5, 3.0, 6.0, 12.0])
@pytest.mark.parametrize("top_p", [0.01, 0.5, 0.9, 0.99])
def test_top_p_equals_transformers_on_peaked_and_flat_distributions(spread, top_p):
    """A nucleus of up to TOP_P_CANDIDATES tokens (peaked distributions) is found among the candidates and is
    exactly transformers' TopPLogitsWarper's; a larger one (flat distributions over 49k tokens) comes from the
    full sort, where the two differ only in tokens at the boundary: fp32 sums of thousands of terms, rounded in
    another order (transformers sums from the least likely end; torch's AVX2 and AVX-512 kernels split a sum
    differently), so each disputed token has, before it, a probability mass within 5e-5 of top_p (float64).
    Seen: at most 1 such token with AVX-512 kernels, 4 with AVX2's, all within 7e-6."""
    logits = torch.randn(49152, generator=torch.Generator().manual_seed(int(spread * 10))) * spread
    ours = _top_p(logits, top_p).isfinite()
    theirs = TopPLogitsWarper(top_p)(None, logits[None].clone())[0].isfinite()
    assert torch.equal(_top_p(logits, top_p)[ours], logits[ours])
    if int(theirs.sum()) <= TOP_P_CANDIDATES:
        assert torch.equal(ours, theirs)
    else:
        probs = torch.softmax(logits.double(), 0)
        order = torch.argsort(probs, descending=True)
        before = torch.empty_like(probs)
        before[order] = torch.cumsum(probs[order], 0) - probs[order]      # mass of the likelier tokens
        disputed = (ours ^ theirs).nonzero().flatten()
        assert len(disputed) <= 8 and bool(((before[disputed] - top_p).abs() <= 5e-5).all()), before[disputed]


def test_draw_follows_the_distribution():
    """Inverting the cumulative sum at one uniform draw samples each token with its probability (zeros never)."""
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    sampler = RequestSampler(SamplingParams(temperature=1.0, seed=3), probs.numel())
    counts = torch.zeros(probs.numel())
    for _ in range(20000):
        counts[sampler._draw(probs * 7.0)] += 1          # unnormalised weights are fine
    assert counts[probs == 0].sum() == 0
    assert torch.allclose(counts / counts.sum(), probs, atol=0.015)
