"""Typical decoding (`typical_p`, TGI's parameter): the sampler keeps the same tokens with the same
probabilities as transformers' TypicalLogitsWarper, which TGI applies, alone and after temperature, top-k and
top-p; a mass of 1 changes nothing, and a seeded request samples only among the kept tokens."""
import pytest
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
                                                    TypicalLogitsWarper)

from service.engine.sampling import RequestSampler, SamplingParams

V = 500


@pytest.mark.parametrize("mass,temperature,top_k,top_p", [
    (0.2, 1.0, 0, 1.0), (0.7, 1.0, 0, 1.0), (0.95, 0.7, 0, 1.0), (0.5, 1.3, 50, 0.9), (0.01, 1.0, 0, 1.0),
])
def test_typical_p_matches_transformers(mass, temperature, top_k, top_p):
    torch.manual_seed(1)
    logits = torch.randn(V) * 3
    sampler = RequestSampler(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, typical_p=mass), V)
    ours = sampler._probs(logits / temperature)
    scores = TemperatureLogitsWarper(temperature)(None, logits[None].clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    expected = torch.softmax(TypicalLogitsWarper(mass)(None, scores), dim=-1)[0]
    assert torch.equal(ours > 0, expected > 0) and 1 <= int((ours > 0).sum()) < V
    torch.testing.assert_close(ours, expected)


def test_typical_p_one_changes_nothing_and_sampling_stays_in_the_kept_set():
    logits = torch.randn(V) * 3
    plain = RequestSampler(SamplingParams(temperature=1.0), V)._probs(logits)
    assert torch.equal(RequestSampler(SamplingParams(temperature=1.0, typical_p=1.0), V)._probs(logits), plain)
    sampler = RequestSampler(SamplingParams(temperature=1.0, typical_p=0.3, seed=5), V)
    kept = sampler._probs(logits) > 0
    assert all(kept[sampler.sample(logits)[0]] for _ in range(50))
    with pytest.raises(ValueError, match="typical_p"):
        SamplingParams(typical_p=0).validate()
