"""retrain.rollout.draw: the tokens are drawn from the distribution `generate` defines.

The draws differ from `torch.multinomial`'s token for token, so what is checked is the distribution:
many seeded draws from fixed logits against the expected probabilities (Pearson's chi-square, and
nothing ever drawn outside the support), the nucleus against its definition computed by a full sort,
and the returned log-probabilities against the warped distribution's own.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from retrain.rollout.decoding import sample
from retrain.rollout.draw import BLOCK, draw, inverse_cdf, nucleus

DRAWS = 100_000


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's goodness-of-fit p-value of `counts` against `probs`, over the support of `probs`."""
    support = probs > 0
    expected = probs[support].double() * counts.sum()
    statistic = ((counts[support].double() - expected) ** 2 / expected).sum()
    dof = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution `generate` samples from: `transformers`' own warpers, in its order."""
    scores = logits.clone()[None]
    for warper in (
        [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    ) + ([TopKLogitsWarper(top_k)] if top_k else []) + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []):
        scores = warper(None, scores)
    return scores.softmax(-1)[0]


def nucleus_mask(probs: torch.Tensor, top_p: float, candidates: int = 64) -> torch.Tensor:
    """`retrain`'s nucleus as a `[B, V]` mask."""
    return nucleus(probs, top_p, candidates=candidates) > 0


def sorted_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus by its definition: sort descending, keep each token whose predecessors hold < top_p."""
    values, order = probs.double().sort(-1, descending=True)
    keep = (values.cumsum(-1) - values) < top_p
    keep[:, 0] = True
    return torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, keep)


# 12 logits without ties, spread like a trained model's (a few likely tokens, a long tail)
LOGITS = torch.tensor([2.0, -1.0, 0.5, 3.1, -2.5, 1.2, 0.0, -0.7, 2.6, -4.0, 0.9, 1.7])


def test_inverse_cdf_draws_each_index_in_proportion_and_never_a_zero(device):
    weights = torch.tensor([0.0, 1.0, 0.0, 3.0, 0.5, 0.0, 2.5])  # unnormalized, zeros inside and at the ends
    generator = torch.Generator(device).manual_seed(0)
    tokens, total = inverse_cdf(weights.to(device).expand(DRAWS, -1), generator)
    counts = torch.bincount(tokens.cpu(), minlength=weights.numel())
    total = total.cpu()
    assert counts[weights == 0].sum() == 0
    assert torch.allclose(total, torch.full_like(total, 7.0, dtype=torch.float64))
    assert chi_square_p_value(counts, weights / weights.sum()) > 1e-4


@pytest.mark.parametrize("slack", [None, 1.0], ids=["default", "half-rejected"])
def test_inverse_cdf_over_blocks_is_exact_also_when_draws_are_redrawn(device, slack, monkeypatch):
    # Beyond one block the vocabulary is split: empty blocks, a block boundary inside the support,
    # a short last block. With slack 1.0 about half the uniforms land in a block's slack and are redrawn.
    from retrain.rollout import draw as draws

    if slack is not None:
        monkeypatch.setattr(draws, "SLACK", slack)
    vocab = 3 * BLOCK + 77
    weights = torch.zeros(vocab)
    support = torch.tensor([0, 5, BLOCK - 1, BLOCK, 2 * BLOCK + 3, 3 * BLOCK + 76])
    weights[support] = torch.tensor([1.0, 4.0, 2.0, 0.5, 3.0, 1.5])
    generator = torch.Generator(device).manual_seed(2)
    tokens, total = inverse_cdf(weights.to(device).expand(DRAWS // 2, -1), generator)
    counts = torch.bincount(tokens.cpu(), minlength=vocab)
    assert counts[weights == 0].sum() == 0
    assert torch.allclose(total.cpu(), torch.full((DRAWS // 2,), 12.0, dtype=torch.float64))
    assert chi_square_p_value(counts, weights / weights.sum()) > 1e-4


def test_the_chi_square_check_catches_a_biased_draw(device):
    # The check used below, on a draw that ignores the temperature: it must fail.
    generator = torch.Generator(device).manual_seed(0)
    tokens, _ = draw(LOGITS.to(device).expand(DRAWS, -1), generator=generator)
    counts = torch.bincount(tokens.cpu(), minlength=LOGITS.numel())
    assert chi_square_p_value(counts, reference_probs(LOGITS, 0.8, 0, 1.0)) < 1e-10


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8), (0.9, 6, 0.7), (1.0, 3, 1.0), (2.0, 0, 0.95)],
)
def test_draws_follow_the_distribution_generate_defines(temperature, top_k, top_p, device, wide_path):
    expected = reference_probs(LOGITS, temperature, top_k, top_p)  # [V]
    generator = torch.Generator(device).manual_seed(1)
    tokens, logprobs = draw(LOGITS.to(device).expand(DRAWS, -1), temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    tokens, logprobs = tokens.cpu(), logprobs.cpu()
    counts = torch.bincount(tokens, minlength=LOGITS.numel())
    assert counts[expected == 0].sum() == 0, "a token outside the top-k / nucleus was drawn"
    assert int((expected > 0).sum()) == int((counts > 0).sum())  # and every token inside it was
    assert chi_square_p_value(counts, expected) > 1e-4
    torch.testing.assert_close(logprobs, expected.log()[tokens], atol=1e-5, rtol=1e-5)


@pytest.fixture(params=["sort", "bracket", "bracket-batched"])
def wide_path(request, monkeypatch):
    """Top-p at a small vocabulary: one stable sort of each row, or (as at a real vocabulary) the
    candidates, then the bracket search for rows wider than them, a row at a time (a CPU's way) or
    every row at once (an accelerator's, here run on whichever device the test has)."""
    from retrain.rollout import draw as draws

    if request.param.startswith("bracket"):
        monkeypatch.setattr(draws, "_SORT_ALL_BELOW", 0)
        monkeypatch.setattr(draws, "_SORT_BELOW", 0)
    if request.param == "bracket-batched":
        monkeypatch.setattr(draws, "ROW_AT_A_TIME", ())
    return request.param


def test_nucleus_by_hand(device, wide_path):
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]], device=device)
    for candidates in (4, 1):  # within the candidates, and by the wide path
        for top_p, kept in [(0.3, 1), (0.75, 2), (0.9, 3), (0.999, 4)]:
            mask = nucleus_mask(probs, top_p, candidates=candidates).cpu()
            assert mask.sum(-1).tolist() == [kept, kept]
            assert mask[0, :kept].all() and mask[1, 4 - kept :].all()


@pytest.mark.parametrize("vocab, scale", [(10, 1.0), (1000, 5.0), (1000, 0.1), (32000, 3.0), (32000, 0.01), (151936, 4.0), (151936, 0.001)])
def test_nucleus_is_the_sorted_definition_without_a_sort(vocab, scale, device, wide_path):
    torch.manual_seed(0)
    probs = (torch.randn(6, vocab) * scale).softmax(-1)
    probs[0] = (torch.randn(vocab) * 4).softmax(-1)  # a peaked row beside flat ones takes both paths at once
    for top_p in (0.1, 0.5, 0.9, 0.95):
        expected = sorted_nucleus(probs, top_p)
        for candidates in (64, 1, (2, 16)):  # 1: every row through the wide path's brackets; (2, 16): a second top-k
            mask = nucleus_mask(probs.to(device), top_p, candidates=candidates).cpu()
            assert mask.sum(-1).tolist() == expected.sum(-1).tolist()
            # the same set, up to which of several tokens tied at the edge is kept
            differ = mask != expected
            assert not differ.any() or all(
                probs[r][differ[r]].unique().numel() == 1 and probs[r][differ[r]][0] == probs[r][mask[r]].min() for r in range(probs.size(0))
                if differ[r].any()
            )


@pytest.mark.parametrize("batched", [False, True], ids=["by-row", "batched"])
@pytest.mark.parametrize("vocab, sort_below", [(1000, None), (1000, 0), (40000, None)], ids=["1000-sort", "1000-bracket", "40000-bracket"])
def test_the_wide_nucleus_is_exact_with_ties_zeros_and_an_edge_past_every_sampled_value(vocab, sort_below, batched, device, monkeypatch):
    """Rows whose nucleus is far wider than the candidates: logits on a coarse grid (hundreds or
    thousands of tokens tied at the edge), a third of the vocabulary at probability 0 (masked, like
    end-of-sequence before `min_new_tokens`), and top_p so close to 1 that the edge lies below the
    smallest value of the strided sample the bracket is searched over (`sort_below` 0: the bracket at a
    small vocabulary too)."""
    from retrain.rollout import draw as draws

    if sort_below is not None:
        monkeypatch.setattr(draws, "_SORT_BELOW", sort_below)
    if batched:
        monkeypatch.setattr(draws, "ROW_AT_A_TIME", ())
    torch.manual_seed(2)
    logits = torch.randint(0, 6, (4, vocab)).float() * 0.5
    logits[1:, : vocab // 3] = float("-inf")
    probs = logits.softmax(-1)
    for top_p in (0.3, 0.9, 0.99999):
        expected = sorted_nucleus(probs, top_p)
        mask = nucleus_mask(probs.to(device), top_p).cpu()
        assert mask.sum(-1).tolist() == expected.sum(-1).tolist()
        assert not mask[probs == 0].any()
        for r in range(probs.size(0)):  # every token above the edge value, and the lowest-index ties at it
            edge = probs[r][mask[r]].min()
            assert mask[r][probs[r] > edge].all() and not mask[r][probs[r] < edge].any()
            tied = (probs[r] == edge).nonzero().squeeze(1)
            assert mask[r][tied].tolist() == sorted(mask[r][tied].tolist(), reverse=True)


@pytest.mark.parametrize("top_p, redraws", [(0.9, None), (0.9, 0), (0.3, None)], ids=["rejection", "copied-out", "small-nucleus"])
def test_draws_from_a_wide_nucleus_follow_its_distribution(top_p, redraws, wide_path, device, monkeypatch):
    """Rows whose nucleus is wider than every candidate size: drawn by rejection from the whole row
    (top_p 0.9), from the nucleus copied out (no rejection rounds allowed), or so when the nucleus holds
    under half the row (top_p 0.3); a peaked row in the batch takes the candidates at the same time."""
    from retrain.rollout import draw as draws

    monkeypatch.setattr(draws, "CANDIDATES", (3,))
    if redraws is not None:
        monkeypatch.setattr(draws, "REDRAWS", redraws)
    torch.manual_seed(4)
    logits = torch.randn(120) * 0.7  # nucleus at 0.9: most of the 120 tokens
    expected = reference_probs(logits, 1.0, 0, top_p)
    assert int((expected > 0).sum()) > 3
    batch = logits.expand(DRAWS // 2, -1).clone()
    peaked_logits = torch.full((120,), -30.0)
    peaked_logits[:12] = LOGITS * 2
    batch[::7] = peaked_logits  # every 7th row peaked: its nucleus among the 3 candidates
    generator = torch.Generator(device).manual_seed(5)
    tokens, logprobs = draw(batch.to(device), top_p=top_p, generator=generator)
    tokens, logprobs = tokens.cpu(), logprobs.cpu()
    flat = torch.ones(batch.size(0), dtype=torch.bool)
    flat[::7] = False
    counts = torch.bincount(tokens[flat], minlength=logits.numel())
    assert counts[expected == 0].sum() == 0, "a token outside the nucleus was drawn"
    assert chi_square_p_value(counts, expected) > 1e-4
    torch.testing.assert_close(logprobs[flat], expected.log()[tokens[flat]], atol=1e-5, rtol=1e-5)
    peaked = reference_probs(peaked_logits, 1.0, 0, top_p)
    assert (peaked[tokens[~flat]] > 0).all()
    torch.testing.assert_close(logprobs[~flat], peaked.log()[tokens[~flat]], atol=1e-5, rtol=1e-5)


def test_nucleus_matches_transformers_top_p_warper_on_peaked_rows(wide_path):
    torch.manual_seed(1)
    logits = torch.randn(64, 50) * 3
    for top_p in (0.5, 0.8, 0.95):
        kept_by_transformers = TopPLogitsWarper(top_p)(None, logits.clone()) > float("-inf")
        probs = logits.softmax(-1)
        assert torch.equal(nucleus_mask(probs, top_p), kept_by_transformers)


def test_top_p_above_the_row_mass_keeps_every_positive_token(wide_path):
    probs = torch.tensor([[0.6, 0.0, 0.4, 0.0]])
    for candidates in (4, 1):
        mask = nucleus_mask(probs, 1.0 - 1e-12, candidates=candidates)
        assert mask.tolist() == [[True, False, True, False]]


def test_top_k_keeps_ties_like_transformers():
    logits = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.5])  # top-2 with a tie at the 2nd: 3.0 and both 2.0s
    expected = reference_probs(logits, 1.0, 2, 1.0)
    assert int((expected > 0).sum()) == 3
    tokens, _ = draw(logits.expand(DRAWS, -1), top_k=2, generator=torch.Generator().manual_seed(3))
    counts = torch.bincount(tokens, minlength=logits.numel())
    assert counts[expected == 0].sum() == 0 and (counts[expected > 0] > 0).all()
    assert chi_square_p_value(counts, expected) > 1e-4


@pytest.mark.parametrize("min_new_tokens", [0, 1])
def test_the_decoder_draws_its_first_token_from_the_model_distribution(tiny_model_dir, min_new_tokens):
    """End to end through `sample`: the first token of many identical prompts against the model's
    own next-token distribution under the warpers; before `min_new_tokens`, end-of-sequence is out."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows, eos = 20_000, 2
    prompt = torch.tensor([[5, 17, 9, 33, 12]])
    with torch.no_grad():
        logits = model(prompt).logits[0, -1].float()
    # A random tiny model is near uniform: sharpen it (temperature 0.3) so top-k / top-p bite.
    temperature, top_k, top_p = 0.3, 40, 0.9
    if min_new_tokens:
        logits[eos] = float("-inf")
    expected = reference_probs(logits, temperature, top_k, top_p)
    assert 3 < int((expected > 0).sum()) < 40
    torch.manual_seed(0)
    out, logprobs = sample(
        model, prompt.expand(rows, -1), torch.ones(rows, prompt.size(1), dtype=torch.long), max_new_tokens=1,
        eos_token_ids=[eos], pad_token_id=0, temperature=temperature, top_k=top_k, top_p=top_p,
        min_new_tokens=min_new_tokens, with_logprobs=True,
    )
    counts = torch.bincount(out[:, 0], minlength=logits.numel())
    assert counts[expected == 0].sum() == 0
    assert chi_square_p_value(counts, expected) > 1e-4
    torch.testing.assert_close(logprobs[:, 0], expected.log()[out[:, 0]], atol=1e-4, rtol=1e-4)
