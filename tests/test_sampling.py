"""Sampler math: filters, greedy, the inverse-CDF draw, the penalties, validation."""
import math

import pytest
import torch

from models.errors import InvalidParameter
from models.sampling import (MAX_SEED, MIN_REPETITION_PENALTY, RowRandom, SamplingBatch, SamplingParams,
                             apply_count_penalties, apply_repetition_penalty, draw_uniforms, filter_logits,
                             inverse_cdf_sample, sample)


def batch(**kw) -> SamplingBatch:
    return SamplingBatch.from_params([SamplingParams(**kw)])


def kept(logits, **kw):
    b = batch(**kw)
    return torch.isfinite(filter_logits(logits, b))[0].nonzero().flatten().tolist()


def test_top_k_keeps_the_k_best():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    assert sorted(kept(logits, top_k=2)) == [1, 3]
    assert len(kept(logits, top_k=0)) == 5  # 0 = off


def test_top_p_keeps_the_token_that_crosses_the_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert kept(logits, top_p=0.5) == [0]
    assert kept(logits, top_p=0.6) == [0, 1]
    assert kept(logits, top_p=0.81) == [0, 1, 2]
    assert kept(logits, top_p=1.0) == [0, 1, 2, 3]


def test_typical_p_keeps_the_tokens_whose_surprise_is_nearest_the_entropy():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])  # entropy 1.142 nats; surprises .69, 1.20, 1.90, 3.00
    logits = probs.log()
    assert kept(logits, typical_p=0.2) == [1]  # the most typical token is not the likeliest
    assert kept(logits, typical_p=1e-50) == [1]  # 0 as a float32 (it failed the whole batch's step)
    assert kept(logits, typical_p=0.5) == [0, 1]  # 0.3, then 0.5 crosses the mass
    assert kept(logits, typical_p=0.85) == [0, 1, 2]
    assert kept(logits, typical_p=1.0) == [0, 1, 2, 3]
    # after top-k, on what is left
    assert kept(logits, top_k=2, typical_p=0.4) == [0]  # of {0.5, 0.3}: renormalised, 0 is nearer


def test_typical_p_keeps_equally_likely_tokens_together():
    assert kept(torch.zeros(1, 4), typical_p=0.3) == [0, 1, 2, 3]
    assert kept(torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]]), typical_p=0.3) == [0, 1]


@pytest.mark.parametrize("ties", [False, True])
def test_typical_p_matches_transformers(ties):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    logits = torch.randn(64, 300) * 3
    if ties:  # few distinct values, as low-precision logits have
        logits = logits.round()
    for mass in (1e-50, 0.2, 0.5, 0.9, 0.95):  # 1e-50: 0 in float32, keeps the most typical token(s)
        ours = torch.isfinite(filter_logits(logits, SamplingBatch.from_params([SamplingParams(typical_p=mass)] * 64)))
        theirs = torch.isfinite(transformers.TypicalLogitsWarper(mass)(None, logits.clone()))
        assert torch.equal(ours, theirs), mass


def test_min_p_is_relative_to_the_best_token():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert kept(logits, min_p=0.5) == [0, 1]  # 0.15 < 0.5 * 0.5
    assert kept(logits, min_p=0.99) == [0]
    assert kept(logits, min_p=1) == [0] and kept(torch.tensor([[1.0, 1.0, 0.0]]), min_p=1) == [0, 1]  # ties stay


def test_filters_differ_per_row():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    b = SamplingBatch.from_params([SamplingParams(top_k=1), SamplingParams(top_k=0)])
    out = filter_logits(logits, b)
    assert torch.isfinite(out).sum(dim=1).tolist() == [1, 3]


def test_greedy_is_argmax_whatever_the_uniform():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    b = SamplingBatch.from_params([SamplingParams(temperature=0)] * 4)
    gens = [RowRandom(i) for i in range(4)]
    assert torch.equal(sample(logits, b, gens), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [1e-50, 1e-7, 9e-6])
def test_a_temperature_under_greedy_below_is_greedy_alone_and_beside_any_row(temperature):
    """1e-50 is 0 in a float32 tensor: alone it was sampled at the 1e-6 floor (tokens 0 and 1
    of [0, 1e-7, -5] about evenly), beside a greedy row it was greedy."""
    logits = torch.tensor([[0.0, 1e-7, -5.0]] * 2)
    for seed in range(20):
        alone = sample(logits[:1], SamplingBatch.from_params([SamplingParams(temperature=temperature)]),
                       [RowRandom(seed)])
        beside = sample(logits, SamplingBatch.from_params([SamplingParams(temperature=temperature),
                                                           SamplingParams(temperature=0)]),
                        [RowRandom(seed), RowRandom(seed + 1)])
        assert alone.tolist() == [1] and beside.tolist() == [1, 1]


def test_inverse_cdf_matches_the_distribution_chi_square():
    probs = torch.tensor([0.30, 0.20, 0.15, 0.10, 0.08, 0.07, 0.05, 0.03, 0.015, 0.005])
    n = 20_000
    g = torch.Generator().manual_seed(1234)
    u = torch.rand(n, generator=g)
    draws = inverse_cdf_sample(probs.expand(n, -1), u)
    counts = torch.bincount(draws, minlength=10).double()
    expected = probs.double() * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 27.88  # chi-square critical value, 9 degrees of freedom, p = 0.001


def test_inverse_cdf_never_picks_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]])
    for u in [0.0, 0.25, 0.4999, 0.5, 0.75, 0.999999]:
        assert inverse_cdf_sample(probs, torch.tensor([u])).item() in (1, 3)


def test_sampler_uses_one_uniform_per_row_from_its_own_generator():
    logits = torch.zeros(2, 1000)  # uniform distribution: the token is floor(u * 1000)
    b = SamplingBatch.from_params([SamplingParams()] * 2)
    toks = sample(logits, b, [RowRandom(5), RowRandom(9)])
    u5 = torch.rand(1, generator=torch.Generator().manual_seed(5)).item()
    u9 = torch.rand(1, generator=torch.Generator().manual_seed(9)).item()
    assert toks.tolist() == [math.floor(u5 * 1000), math.floor(u9 * 1000)]


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = torch.tensor([[2.0, -1.0, 3.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([[2.0]]))
    assert out.tolist() == [[1.0, -2.0, 3.0]]


def test_presence_and_frequency_penalties_follow_openais_formula():
    """logit - frequency * count - presence * (count > 0), per row with its own values."""
    logits = torch.tensor([[2.0, 2.0, 2.0], [1.0, 1.0, 1.0]])
    counts = torch.tensor([[0.0, 1.0, 3.0], [2.0, 0.0, 0.0]])
    out = apply_count_penalties(logits, counts, torch.tensor([[0.5], [-1.0]]), torch.tensor([[0.25], [0.0]]))
    assert out.tolist() == [[2.0, 1.25, 0.75], [2.0, 1.0, 1.0]]


def test_greedy_decoding_follows_the_count_penalties_too():
    params = SamplingBatch.from_params([SamplingParams(temperature=0, presence_penalty=2.0)])
    assert params.uses == {"greedy", "counts"}
    logits, counts = torch.tensor([[3.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    assert sample(logits, params, [RowRandom(0)]).item() == 0  # without the counts: no penalty
    assert sample(logits, params, [RowRandom(0)], counts=counts).item() == 1  # 3 - 2 < 2


def test_logit_bias_bans_and_forces_tokens_per_row_and_follows_rows_that_stay():
    params = SamplingBatch.from_params([SamplingParams(temperature=0, logit_bias=((0, -100.0),)),
                                        SamplingParams(),
                                        SamplingParams(temperature=0, logit_bias=((3, 100.0), (1, 0.5)))])
    logits = torch.tensor([[5.0, 1.0, 0.0, 0.0]] * 3)
    randoms = [RowRandom(i) for i in range(3)]
    tokens = sample(logits, params, randoms)
    assert tokens[0].item() == 1 and tokens[2].item() == 3  # 0 banned; 3 forced
    kept = params.select(torch.tensor([2]))  # rows 0 and 1 finished: row 2 is now row 0
    assert kept.logit_bias[0].tolist() == [0, 0] and kept.logit_bias[1].tolist() == [3, 1]
    assert sample(logits[:1], kept, randoms[2:]).item() == 3


def test_banned_tokens_are_never_drawn_greedy_or_sampled():
    """Also where a filter would keep only the banned token (bans come before filters), and
    the caller's logits are left as they were (they give the logprobs)."""
    params = SamplingBatch.from_params([SamplingParams(temperature=0), SamplingParams(), SamplingParams(temperature=0),
                                        SamplingParams(top_k=1)])
    logits = torch.tensor([[9.0, 1.0, 0.0]] * 4)  # token 0 holds nearly all the mass
    banned = (torch.tensor([0, 1, 3]), torch.tensor([0, 0, 0]))  # rows 0, 1 and 3 may not draw token 0; row 2 may
    for seed in range(20):
        tokens = sample(logits, params, [RowRandom(seed + i) for i in range(4)], banned=banned).tolist()
        assert tokens[0] == 1 and tokens[1] != 0 and tokens[2] == 0 and tokens[3] == 1
    assert torch.equal(logits, torch.tensor([[9.0, 1.0, 0.0]] * 4))


def test_the_smallest_repetition_penalty_favours_seen_tokens_without_overflowing():
    """A penalty below 1 multiplies seen positive logits; at the smallest allowed one, even large
    logits stay finite, so the draw is a real one (it used to be NaN: the last token, always)."""
    params = SamplingParams(temperature=1.0, repetition_penalty=MIN_REPETITION_PENALTY)
    params.validate()
    logits = torch.tensor([[40.0, 1e3, -5.0, 45.0]])
    seen = torch.tensor([[True, False, True, False]])
    draws = [sample(logits, SamplingBatch.from_params([params]), [RowRandom(s)], seen).item() for s in range(20)]
    assert set(draws) == {0}  # 40 / 0.01 = 4,000 beats 1,000 and 45


@pytest.mark.parametrize("field,value", [("top_p", 0.0), ("top_p", 1.5), ("temperature", -0.1),
                                         ("temperature", float("nan")), ("top_k", -1), ("top_k", 2**63),
                                         ("min_p", 1.01), ("typical_p", 0.0), ("typical_p", float("nan")),
                                         ("repetition_penalty", 0.0), ("repetition_penalty", 1e-45),
                                         ("presence_penalty", 2.5), ("frequency_penalty", -2.01),
                                         ("frequency_penalty", float("inf")),
                                         ("logit_bias", ((5, 101.0),)), ("logit_bias", ((-1, 1.0),)),
                                         ("logit_bias", ((5, 1.0), (5, 2.0))), ("logit_bias", {5: 1.0}),
                                         ("logit_bias", tuple((i, 1.0) for i in range(301)))])
def test_bad_parameters_name_the_field(field, value):
    with pytest.raises(InvalidParameter) as e:
        SamplingParams(**{field: value}).validate()
    assert e.value.param == field and isinstance(e.value, ValueError)


def test_seeds_are_32_bit():
    """Why MAX_SEED is 2**32 - 1: torch's CPU generator keeps the low 32 bits of a seed, so a
    larger seed would silently draw another seed's numbers."""
    first = RowRandom(5).next()
    assert RowRandom(5 + 2**32).next() == first and RowRandom(MAX_SEED).next() != first


def test_filters_still_run_after_the_rows_that_used_them_left():
    """`uses` is fixed per batch: once the top-k/top-p rows have left, the filters must be
    no-ops for the rest rather than fail (top-k of 0 tokens) or change their draws."""
    logits = torch.randn(1, 20, generator=torch.Generator().manual_seed(0))
    both = SamplingBatch.from_params([SamplingParams(top_k=5, top_p=0.5), SamplingParams()])
    rest = both.select(torch.tensor([1]))
    assert rest.uses == {"top_k", "top_p"}
    assert batch(temperature=0).uses == {"greedy"}
    plain = batch()
    assert torch.equal(filter_logits(logits, rest), filter_logits(logits, plain))
    draw = lambda b: sample(logits, b, [RowRandom(3)])
    assert torch.equal(draw(rest), draw(plain))


def test_a_row_stream_read_in_blocks_equals_one_generator_call_per_step():
    """What lets RowRandom draw ahead: the same seed gives the same uniforms, block or not."""
    one_by_one = torch.Generator().manual_seed(7)
    expected = [torch.rand(1, generator=one_by_one).item() for _ in range(150)]
    for block in (1, 5, 64):
        row = RowRandom(7, block)
        assert [row.next() for _ in range(150)] == expected
    assert draw_uniforms([RowRandom(7)]).dtype == torch.float32
