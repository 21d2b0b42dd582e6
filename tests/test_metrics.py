"""Full-ranking metrics: hand-computed examples, both protocols, diversity, property checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rec.metrics import (
    RankingEvaluator,
    category_coverage,
    exclusion_set,
    ild_embedding,
    ild_jaccard,
    ndcg_at_k,
    novelty,
    popularity_scores,
    ranks_of_targets,
    recall_at_k,
    reciprocal_rank,
    self_information,
    top_k_items,
)

N_ITEMS = 30


def descending_scores(batch: int, n_items: int = N_ITEMS) -> torch.Tensor:
    """(B, N+1) scores where item i scores -i (item 1 best); padding gets the highest score
    so that a test fails if padding is ever ranked."""
    scores = -torch.arange(n_items + 1, dtype=torch.float32).repeat(batch, 1)
    scores[:, 0] = 1e9
    return scores


def no_categories(n_items: int = N_ITEMS) -> torch.Tensor:
    return torch.zeros(n_items + 1, 1, dtype=torch.long)


def test_ranks_and_ranking_metrics_by_hand() -> None:
    targets = torch.tensor([1, 3, 11, 25])
    ranks = ranks_of_targets(descending_scores(4), targets)
    assert ranks.tolist() == [1, 3, 11, 25]
    assert recall_at_k(ranks, 10).tolist() == [1, 1, 0, 0]
    assert recall_at_k(ranks, 20).tolist() == [1, 1, 1, 0]
    assert ndcg_at_k(ranks, 10).tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert ndcg_at_k(ranks, 20).tolist() == pytest.approx([1.0, 0.5, 1 / math.log2(12), 0.0])
    assert reciprocal_rank(ranks).tolist() == pytest.approx([1, 1 / 3, 1 / 11, 1 / 25])

    ev = RankingEvaluator(no_categories(), torch.ones(N_ITEMS + 1))
    ev.update(descending_scores(4), targets)
    out = ev.compute("valid")
    assert out["valid.recall@10"] == pytest.approx(0.5)
    assert out["valid.recall@20"] == pytest.approx(0.75)
    assert out["valid.ndcg@10"] == pytest.approx(1.5 / 4)
    assert out["valid.ndcg@20"] == pytest.approx((1.5 + 1 / math.log2(12)) / 4)
    assert out["valid.mrr"] == pytest.approx((1 + 1 / 3 + 1 / 11 + 1 / 25) / 4)
    # Without history the unseen protocol ranks exactly like the full one.
    assert out["valid_unseen.mrr"] == out["valid.mrr"]


def test_ties_are_pessimistic() -> None:
    scores = torch.zeros(2, 6)
    scores[0, 1:] = torch.tensor([9.0, 5.0, 5.0, 5.0, 1.0])  # target 3 ties with items 2 and 4
    scores[1, 1:] = 7.0  # constant model
    ranks = ranks_of_targets(scores, torch.tensor([3, 2]))
    assert ranks.tolist() == [4, 5]  # 1 + one higher + two equal; constant: last of 5


def test_constant_model_scores_near_zero() -> None:
    ev = RankingEvaluator(no_categories(1000), torch.ones(1001))
    ev.update(torch.zeros(8, 1001), torch.arange(1, 9))
    out = ev.compute("t")
    assert out["t.recall@20"] == 0.0
    assert out["t.mrr"] == pytest.approx(1 / 1000)


def test_nan_target_score_is_rejected() -> None:
    scores = descending_scores(1)
    scores[0, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ranks_of_targets(scores, torch.tensor([4]))


def test_unseen_protocol_excludes_history_but_never_the_target() -> None:
    targets = torch.tensor([11, 2])
    # User 0: 1, 2, 3 seen (2 twice) and the target 11 itself; user 1: re-buys its best item.
    history = torch.tensor([[0, 1, 2, 3, 11, 2], [0, 0, 0, 1, 2, 2]])
    exclude = exclusion_set(history, targets)
    assert sorted(exclude[0].tolist()) == [0, 0, 0, 1, 2, 3]
    assert sorted(exclude[1].tolist()) == [0, 0, 0, 0, 0, 1]

    scores = descending_scores(2)
    assert ranks_of_targets(scores, targets).tolist() == [11, 2]
    assert ranks_of_targets(scores, targets, exclude).tolist() == [8, 1]
    assert top_k_items(scores, 3).tolist() == [[1, 2, 3], [1, 2, 3]]
    assert top_k_items(scores, 3, exclude).tolist() == [[4, 5, 6], [2, 3, 4]]
    assert scores[0, 1] == -1.0  # the caller's scores are not modified

    ev = RankingEvaluator(no_categories(), torch.ones(N_ITEMS + 1))
    ev.update(scores, targets, history)
    out = ev.compute("test")
    assert out["test.mrr"] == pytest.approx((1 / 11 + 1 / 2) / 2)
    assert out["test_unseen.mrr"] == pytest.approx((1 / 8 + 1) / 2)
    assert out["test.recall@10"] == pytest.approx(0.5)
    assert out["test_unseen.recall@10"] == pytest.approx(1.0)


def test_unseen_list_leaves_slots_empty_when_catalog_runs_out() -> None:
    scores = descending_scores(1, n_items=4)
    top = top_k_items(scores, 4, exclusion_set(torch.tensor([[1, 3]]), torch.tensor([2])))
    assert top.tolist() == [[2, 4, 0, 0]]


def multi_category_table() -> torch.Tensor:
    """Items 1..7: {1,2}, {2,3} (stored unsorted), {4}, {}, {}, {5} (stored twice), {5}."""
    return torch.tensor([[0, 0], [1, 2], [3, 2], [4, 0], [0, 0], [0, 0], [5, 5], [0, 5]])


def test_ild_jaccard_by_hand() -> None:
    cats = multi_category_table()
    # {1,2} vs {2,3}: 1 - 1/3; each vs {4}: 1. Mean of three pairs = (2/3 + 1 + 1) / 3.
    assert ild_jaccard(torch.tensor([[1, 2, 3]]), cats).item() == pytest.approx(8 / 9)
    # Two category-less items: 0 by convention; one with vs one without: 1.
    assert ild_jaccard(torch.tensor([[4, 5], [3, 4]]), cats).tolist() == [0.0, 1.0]
    # Empty slots (0) are skipped; a single item has no pair.
    assert ild_jaccard(torch.tensor([[1, 0, 2], [1, 0, 0]]), cats).tolist() == pytest.approx(
        [2 / 3, 0.0]
    )


def test_evaluator_dedupes_repeated_categories() -> None:
    ev = RankingEvaluator(multi_category_table(), torch.ones(8), diversity_k=2)
    scores = torch.zeros(1, 8)
    scores[0, 6:] = torch.tensor([2.0, 1.0])  # list: item 6 {5 (twice)}, item 7 {5}
    ev.update(scores, torch.tensor([6]))
    out = ev.compute("v")
    assert out["v.ild@2"] == 0.0  # identical sets even though item 6 lists 5 twice
    assert out["v.cat_coverage@2"] == 1.0


def test_ild_embedding() -> None:
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    assert ild_embedding(torch.tensor([[1, 2]]), emb).item() == pytest.approx(1.0)
    assert ild_embedding(torch.tensor([[1, 3]]), emb).item() == pytest.approx(0.0)
    assert ild_embedding(torch.tensor([[1, 2, 3]]), emb).item() == pytest.approx(2 / 3)


def test_category_coverage_counts_distinct_categories() -> None:
    cats = multi_category_table()
    top = torch.tensor([[1, 2, 3], [4, 5, 0], [6, 7, 1]])
    assert category_coverage(top, cats).tolist() == [4.0, 0.0, 3.0]


def test_catalog_coverage_is_the_union_over_users_and_batches() -> None:
    ev = RankingEvaluator(no_categories(10), torch.ones(11), diversity_k=2)
    scores = descending_scores(2, n_items=10)
    ev.update(scores, torch.tensor([1, 2]))  # both users list items 1, 2
    scores[1, 5] = 100.0  # second user now lists 5, 1
    ev.update(scores, torch.tensor([1, 2]))
    assert ev.compute("c")["c.catalog_coverage"] == pytest.approx(3 / 10)


def test_novelty_uses_laplace_smoothed_popularity() -> None:
    counts = torch.tensor([99, 3, 1, 0, 0])  # padding count ignored; p = (c+1) / (4 + 4)
    info = self_information(counts)
    assert info[1:].tolist() == pytest.approx([1.0, 2.0, 3.0, 3.0])
    assert novelty(torch.tensor([[1, 2], [3, 0]]), info).tolist() == pytest.approx([1.5, 3.0])

    ev = RankingEvaluator(no_categories(4), counts, diversity_k=2)
    ev.update(descending_scores(1, n_items=4), torch.tensor([1]))
    assert ev.compute("n")["n.novelty@2"] == pytest.approx(1.5)


def test_popularity_baseline_ranks_most_popular_first() -> None:
    counts = torch.tensor([1000, 5, 50, 7, 50])  # padding has the largest count on purpose
    scores = popularity_scores(counts, batch_size=3)
    assert scores.shape == (3, 5)
    assert top_k_items(scores, 4)[0].tolist() == [2, 4, 3, 1]  # ties to the lower index
    assert ranks_of_targets(scores, torch.tensor([2, 4, 1])).tolist() == [1, 2, 4]

    ev = RankingEvaluator(no_categories(4), counts, ks=(1, 2))
    ev.update(scores, torch.tensor([2, 4, 1]))
    out = ev.compute("pop")
    assert out["pop.recall@1"] == pytest.approx(1 / 3)
    assert out["pop.recall@2"] == pytest.approx(2 / 3)


def test_merge_equals_one_pass_and_chunking_changes_nothing() -> None:
    gen = torch.Generator().manual_seed(0)
    cats = torch.randint(0, 6, (N_ITEMS + 1, 3), generator=gen)
    cats[0] = 0
    counts = torch.randint(0, 20, (N_ITEMS + 1,), generator=gen)
    scores = torch.randint(0, 8, (6, N_ITEMS + 1), generator=gen).float()
    targets = torch.randint(1, N_ITEMS + 1, (6,), generator=gen)
    history = torch.randint(0, N_ITEMS + 1, (6, 5), generator=gen)

    whole = RankingEvaluator(cats, counts)
    whole.update(scores, targets, history)
    tiny_chunks = RankingEvaluator(cats, counts, chunk_elements=1)
    tiny_chunks.update(scores, targets, history)
    first, second = RankingEvaluator(cats, counts), RankingEvaluator(cats, counts)
    first.update(scores[:2], targets[:2], history[:2])
    second.update(scores[2:], targets[2:], history[2:])
    first.merge(second)
    expected = whole.compute("m")
    assert tiny_chunks.compute("m") == pytest.approx(expected)
    assert first.compute("m") == pytest.approx(expected)


def test_bad_inputs_fail_loudly() -> None:
    ev = RankingEvaluator(no_categories(), torch.ones(N_ITEMS + 1))
    with pytest.raises(ValueError, match="scores"):
        ev.update(torch.zeros(2, N_ITEMS), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="targets"):
        ev.update(torch.zeros(2, N_ITEMS + 1), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="no users"):
        ev.compute("x")
    with pytest.raises(ValueError, match="item_counts"):
        RankingEvaluator(no_categories(), torch.ones(N_ITEMS))


def brute_force_rank(scores: list[float], target: int, excluded: set[int]) -> int:
    """Pessimistic rank by definition, one item at a time."""
    others = [i for i in range(1, len(scores)) if i != target and i not in excluded]
    return 1 + sum(scores[i] >= scores[target] for i in others)


@st.composite
def eval_batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    n_items = draw(st.integers(2, 25))
    batch = draw(st.integers(1, 5))
    length = draw(st.integers(1, 6))
    # Small integer scores so that ties are frequent.
    scores = draw(
        st.lists(st.integers(0, 4), min_size=batch * (n_items + 1), max_size=batch * (n_items + 1))
    )
    targets = draw(st.lists(st.integers(1, n_items), min_size=batch, max_size=batch))
    history = draw(
        st.lists(st.integers(0, n_items), min_size=batch * length, max_size=batch * length)
    )
    return (
        torch.tensor(scores, dtype=torch.float32).view(batch, n_items + 1),
        torch.tensor(targets),
        torch.tensor(history).view(batch, length),
        n_items,
    )


@settings(max_examples=60, deadline=None)
@given(eval_batches(), st.integers(0, 2**31 - 1))
def test_metric_properties(
    case: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int], seed: int
) -> None:
    scores, targets, history, n_items = case
    exclude = exclusion_set(history, targets)
    full = ranks_of_targets(scores, targets)
    unseen = ranks_of_targets(scores, targets, exclude)
    for b in range(scores.shape[0]):
        row, t = scores[b].tolist(), int(targets[b])
        assert full[b] == brute_force_rank(row, t, set())
        assert unseen[b] == brute_force_rank(row, t, set(history[b].tolist()) - {t, 0})
    assert bool((unseen <= full).all()) and bool((unseen >= 1).all())

    gen = torch.Generator().manual_seed(seed)
    cats = torch.randint(0, 5, (n_items + 1, 2), generator=gen)
    cats[0] = 0
    ev = RankingEvaluator(cats, torch.randint(0, 9, (n_items + 1,), generator=gen))
    ev.update(scores, targets, history)
    out = ev.compute("p")
    for p in ("p", "p_unseen"):
        for name in ("recall@10", "recall@20", "ndcg@10", "ndcg@20", "mrr", "ild@10"):
            assert 0.0 <= out[f"{p}.{name}"] <= 1.0
        assert 0.0 < out[f"{p}.catalog_coverage"] <= 1.0
        assert out[f"{p}.recall@20"] >= out[f"{p}.recall@10"]
        for k in (10, 20):
            assert out[f"{p}.ndcg@{k}"] <= out[f"{p}.recall@{k}"] + 1e-12
        assert 0.0 <= out[f"{p}.cat_coverage@10"] <= 4.0
        assert out[f"{p}.novelty@10"] >= 0.0
    assert out["p_unseen.mrr"] >= out["p.mrr"]
