"""`plan_micro_batches`: which rows share a pass, on hand-checked lengths."""

from retrain.trainer.micro_batches import plan_micro_batches

PROMPTS = [3, 5, 2, 4]
COMPLETIONS = [10, 1, 6, 2]  # totals 13, 6, 8, 6


def _covers_every_row_once(plan, n):
    return sorted(i for rows in plan for i in rows) == list(range(n))


def test_without_a_token_budget_passes_are_consecutive_row_slices():
    assert plan_micro_batches(PROMPTS, COMPLETIONS) == [[0, 1, 2, 3]]
    assert plan_micro_batches(PROMPTS, COMPLETIONS, max_rows=3) == [[0, 1, 2], [3]]


def test_a_token_budget_fills_padded_passes_longest_first():
    # longest first: 0 (3+10), 2 (2+6), 1 (5+1), 3 (4+2); a padded pass costs rows x (longest prompt + longest completion)
    # [0] = 13; + 2 -> 2 x (3 + 10) = 26 > 20: new pass; [2] = 8; + 1 -> 2 x (5 + 6) = 22 > 20: new pass;
    # [1] = 6; + 3 -> 2 x (5 + 2) = 14
    plan = plan_micro_batches(PROMPTS, COMPLETIONS, max_tokens=20)
    assert plan == [[0], [2], [1, 3]]
    assert _covers_every_row_once(plan, 4)


def test_packed_passes_count_only_real_tokens():
    # totals in order 13, 8, 6, 6: [0] then 13 + 8 = 21 > 20; [2, 1] = 14, + 6 = 20
    assert plan_micro_batches(PROMPTS, COMPLETIONS, max_tokens=20, packed=True) == [[0], [2, 1, 3]]


def test_rows_longer_than_the_budget_get_a_pass_of_their_own_and_both_bounds_hold():
    assert plan_micro_batches(PROMPTS, COMPLETIONS, max_tokens=5) == [[0], [2], [1], [3]]
    assert plan_micro_batches(PROMPTS, COMPLETIONS, max_tokens=100, max_rows=3) == [[0, 2, 1], [3]]
    assert plan_micro_batches([], [], max_tokens=10) == []


def test_a_plan_stretched_to_more_passes_halves_the_widest_then_adds_empty_passes():
    from retrain.trainer.micro_batches import stretch_plan

    assert stretch_plan([[0, 1, 2, 3], [4]], 2) == [[0, 1, 2, 3], [4]]
    assert stretch_plan([[0, 1, 2, 3], [4]], 3) == [[0, 1], [2, 3], [4]]
    assert stretch_plan([[0, 1], [2]], 5) == [[0], [1], [2], [], []]
    stretched = stretch_plan([[5, 6, 7]], 3)
    assert sorted(i for rows in stretched for i in rows) == [5, 6, 7] and len(stretched) == 3
