"""MMR and greedy DPP re-ranking (rec/rerank.py): exactness against brute force, contracts,
degenerate inputs and the relevance/diversity trade-off."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import rec.rerank_greedy as rerank_greedy
from rec.rerank import (
    METHODS,
    RerankConfig,
    category_jaccard_similarity,
    cosine_similarity,
    dpp,
    mmr,
    relevance_order,
    rerank,
    similarity_inputs,
)

RERANKERS = {"mmr": mmr, "dpp": dpp}
FAST = settings(max_examples=40, deadline=None)


def normalised(scores: np.ndarray) -> np.ndarray:
    """(N,) -> min-max to [0, 1], as the module documents (constant -> 0)."""
    span = scores.max() - scores.min()
    return (scores - scores.min()) / span if span > 0 else np.zeros_like(scores)


def logdet(mat: np.ndarray) -> float:
    sign, value = np.linalg.slogdet(mat)
    return value if sign > 0 else -np.inf


def check_greedy_path(picks: np.ndarray, gain_fn, n: int) -> None:
    """Each pick must be an argmax of gain_fn(chosen, i) over the unchosen i (ties allowed)."""
    for t, pick in enumerate(picks):
        chosen = [int(x) for x in picks[:t]]
        gains = np.array([gain_fn(chosen, i) if i not in chosen else -np.inf for i in range(n)])
        best = gains.max()
        assert gains[pick] >= best - 1e-8 * (1 + abs(best)), (t, picks, gains)


def random_instance(seed: int, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=n), rng.normal(size=(n, dim))


# ----------------------------------------------------------------------------- exactness


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 8),
    data=st.data(),
    lam=st.sampled_from([0.2, 0.5, 0.8, 1.0]),
    theta_max=st.sampled_from([0.5, 1.0, 3.0]),
)
def test_dpp_equals_brute_force_greedy(seed, n, data, lam, theta_max):
    k = data.draw(st.integers(1, n))
    scores, vecs = random_instance(seed, n, dim=n + 2)  # D > N: full-rank, well-conditioned S
    sim = cosine_similarity(vecs[None])[0]
    assume(np.linalg.eigvalsh(sim).min() > 1e-3)
    q = np.exp(theta_max * (1 - lam) / lam * normalised(scores))
    kernel = q[:, None] * sim * q[None, :]  # L = diag(q) S diag(q), built explicitly

    def gain(chosen, i):
        return logdet(kernel[np.ix_(chosen + [i], chosen + [i])])

    for kw in ({"vectors": vecs[None]}, {"similarity": sim[None]}):
        picks = dpp(scores[None], k, lam, theta_max=theta_max, **kw)[0]
        check_greedy_path(picks, gain, n)


@FAST
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 8), lam=st.floats(0.0, 1.0))
def test_mmr_equals_brute_force_greedy(seed, n, lam):
    scores, vecs = random_instance(seed, n, dim=3)
    sim = cosine_similarity(vecs[None])[0]
    r = normalised(scores)

    def gain(chosen, i):
        if not chosen:
            return r[i]
        return (1 - lam) * r[i] - lam * sim[chosen, i].max()

    picks = mmr(scores[None], n, lam, vectors=vecs[None])[0]
    check_greedy_path(picks, gain, n)


@pytest.mark.parametrize("method", RERANKERS)
@FAST
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 12), k=st.integers(0, 14))
def test_lam_zero_is_relevance_order(method, seed, n, k):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(3, n)).astype(float)  # many ties: broken by index
    vecs = rng.integers(0, 2, size=(3, n, 2)).astype(float)  # duplicates and zero vectors
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(RERANKERS[method](scores, k, 0.0, vectors=vecs), expected)
    np.testing.assert_array_equal(relevance_order(scores, k), expected)


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize("method", RERANKERS)
@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    bsz=st.integers(1, 4),
    n=st.integers(0, 12),
    k=st.integers(0, 14),
    dim=st.integers(1, 5),
    use_sim=st.booleans(),
)
def test_contract_and_batched_equals_per_row(method, seed, bsz, n, k, dim, use_sim):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(bsz, n))
    vecs = rng.normal(size=(bsz, n, dim))  # dim < k exercises the DPP breakdown fill
    lam = rng.uniform(size=bsz)
    lam[0] = rng.choice([0.0, 1.0, lam[0]])
    kw = {"similarity": cosine_similarity(vecs)} if use_sim else {"vectors": vecs}
    fn = RERANKERS[method]
    out = fn(scores, k, lam, **kw)
    assert out.dtype == np.int64 and out.shape == (bsz, min(k, n))
    for b in range(bsz):
        assert len(set(out[b].tolist())) == out.shape[1]
        assert ((out[b] >= 0) & (out[b] < n)).all()
        row_kw = {key: value[b : b + 1] for key, value in kw.items()}
        np.testing.assert_array_equal(fn(scores[b : b + 1], k, lam[b], **row_kw), out[b : b + 1])


@pytest.mark.parametrize("method", RERANKERS)
@pytest.mark.parametrize("use_sim", [False, True])
def test_chunking_does_not_change_results(method, use_sim, monkeypatch):
    rng = np.random.default_rng(2)
    scores, vecs = rng.normal(size=(7, 30)), rng.normal(size=(7, 30, 4))
    kw = {"similarity": cosine_similarity(vecs)} if use_sim else {"vectors": vecs}
    lam = np.linspace(0, 1, 7)
    whole = RERANKERS[method](scores, 8, lam, **kw)
    monkeypatch.setattr(rerank_greedy, "CHUNK_BYTES", 1)  # one request per chunk
    np.testing.assert_array_equal(RERANKERS[method](scores, 8, lam, **kw), whole)


@pytest.mark.parametrize("method", RERANKERS)
def test_float32_vectors_match_float64(method):
    rng = np.random.default_rng(1)
    scores, vecs = rng.normal(size=(8, 50)), rng.normal(size=(8, 50, 16))
    fn = RERANKERS[method]
    np.testing.assert_array_equal(
        fn(scores, 10, 0.5, vectors=vecs.astype(np.float32)), fn(scores, 10, 0.5, vectors=vecs)
    )


# ----------------------------------------------------------------------------- degenerate


@pytest.mark.parametrize("method", RERANKERS)
@pytest.mark.parametrize("lam", [0.3, 1.0])
@pytest.mark.parametrize("fill", ["equal", "zero"])
def test_equal_or_zero_vectors_give_relevance_order(method, lam, fill):
    # All-equal: nothing is more diverse than anything else. All-zero: every item is similar
    # only to itself (S = I), so again only relevance separates them.
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2, 9))
    vecs = np.ones((2, 9, 4)) if fill == "equal" else np.zeros((2, 9, 4))
    out = RERANKERS[method](scores, 6, lam, vectors=vecs.astype(np.float32))
    np.testing.assert_array_equal(out, relevance_order(scores, 6))


@pytest.mark.parametrize("method", RERANKERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_duplicates_are_skipped_while_new_directions_remain(method, dtype):
    basis = np.eye(3)
    vecs = np.concatenate([basis, basis * 2.0, basis])[None].astype(dtype)  # 3 copies each
    scores = np.array([[9.0, 8.0, 1.0, 7.0, 6.0, 0.5, 5.0, 4.0, 0.2]])
    out = RERANKERS[method](scores, 3, 0.5, vectors=vecs)[0]
    assert sorted(out % 3) == [0, 1, 2]  # one item per direction
    full = RERANKERS[method](scores, 9, 0.5, vectors=vecs)[0]
    assert sorted(full) == list(range(9))


def test_dpp_breakdown_fills_by_relevance():
    rng = np.random.default_rng(3)
    scores, vecs = rng.normal(size=(1, 7)), rng.normal(size=(1, 7, 2))  # rank 2
    out = dpp(scores, 7, 0.7, vectors=vecs)[0]
    order = relevance_order(scores, 7)[0]
    rest = [i for i in order if i not in out[:2]]
    np.testing.assert_array_equal(out[2:], rest)


def test_zero_vector_counts_as_novel():
    vecs = np.array([[[1.0, 0.0], [1.0, 0.01], [0.0, 0.0], [0.9, 0.1]]])
    scores = np.array([[4.0, 3.0, 1.0, 2.0]])
    assert dpp(scores, 2, 1.0, vectors=vecs)[0, 1] == 2
    assert mmr(scores, 2, 1.0, vectors=vecs)[0, 1] == 2


@pytest.mark.parametrize("method", RERANKERS)
def test_fewer_candidates_than_k_and_k_zero(method):
    rng = np.random.default_rng(0)
    scores, vecs = rng.normal(size=(3, 4)), rng.normal(size=(3, 4, 5))
    out = RERANKERS[method](scores, 10, 0.5, vectors=vecs)
    assert out.shape == (3, 4) and (np.sort(out, axis=1) == np.arange(4)).all()
    empty = RERANKERS[method](scores, 0, 0.5, vectors=vecs)
    assert empty.shape == (3, 0) and empty.dtype == np.int64
    assert RERANKERS[method](scores[:, :0], 5, 0.5, vectors=vecs[:, :0]).shape == (3, 0)


@pytest.mark.parametrize("method", RERANKERS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_raise(method, bad):
    scores, vecs = np.zeros((2, 5)), np.ones((2, 5, 3))
    fn = RERANKERS[method]
    with pytest.raises(ValueError, match="scores contains NaN or inf"):
        fn(np.where(np.eye(2, 5) > 0, bad, scores), 3, 0.5, vectors=vecs)
    bad_vecs = vecs.copy()
    bad_vecs[1, 2, 0] = bad
    with pytest.raises(ValueError, match="vectors contains NaN or inf"):
        fn(scores, 3, 0.5, vectors=bad_vecs)
    sim = cosine_similarity(vecs)
    sim[0, 1, 1] = bad
    with pytest.raises(ValueError, match="similarity contains NaN or inf"):
        fn(scores, 3, 0.5, similarity=sim)


@pytest.mark.parametrize("method", RERANKERS)
@pytest.mark.parametrize("lam", [-0.1, 1.1, np.nan, np.array([0.5, 2.0]), np.array([0.5])])
def test_bad_lam_raises(method, lam):
    with pytest.raises(ValueError, match="lam"):
        RERANKERS[method](np.zeros((2, 5)), 3, lam, vectors=np.ones((2, 5, 3)))


@pytest.mark.parametrize("method", RERANKERS)
def test_bad_shapes_and_k_raise(method):
    fn, scores, vecs = RERANKERS[method], np.zeros((2, 5)), np.ones((2, 5, 3))
    with pytest.raises(ValueError, match="exactly one"):
        fn(scores, 3, 0.5)
    with pytest.raises(ValueError, match="exactly one"):
        fn(scores, 3, 0.5, vectors=vecs, similarity=np.ones((2, 5, 5)))
    with pytest.raises(ValueError, match="scores must have 2 dimensions"):
        fn(scores[0], 3, 0.5, vectors=vecs)
    with pytest.raises(ValueError, match=r"vectors must be \(B, N, D\)"):
        fn(scores, 3, 0.5, vectors=vecs[:, :4])
    with pytest.raises(ValueError, match=r"similarity must be \(B, N, N\)"):
        fn(scores, 3, 0.5, similarity=np.ones((2, 5, 4)))
    for k in (-1, 2.5, True):
        with pytest.raises(ValueError, match="k must be"):
            fn(scores, k, 0.5, vectors=vecs)


# ----------------------------------------------------------------------------- similarity


def test_cosine_similarity():
    vecs = np.array([[[1.0, 0.0], [3.0, 4.0], [0.0, 0.0]]])
    expected = np.array([[1.0, 0.6, 0.0], [0.6, 1.0, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(cosine_similarity(vecs)[0], expected, atol=1e-12)


def test_category_jaccard_similarity():
    cats = np.array([[[1, 2, 0], [2, 3, 3], [0, 0, 0], [2, 1, 1]]])  # repeats count once
    expected = np.array(
        [
            [1.0, 1 / 3, 0.0, 1.0],
            [1 / 3, 1.0, 0.0, 1 / 3],
            [0.0, 0.0, 1.0, 0.0],
            [1.0, 1 / 3, 0.0, 1.0],
        ]
    )
    sim = category_jaccard_similarity(cats)
    np.testing.assert_allclose(sim[0], expected)
    assert np.linalg.eigvalsh(sim[0]).min() > -1e-12  # PSD: usable as a DPP kernel
    with pytest.raises(ValueError, match="cat_ids"):
        category_jaccard_similarity(-cats)


def test_rerank_dispatch():
    rng = np.random.default_rng(0)
    scores, vecs = rng.normal(size=(2, 20)), rng.normal(size=(2, 20, 4))
    cats = rng.integers(0, 6, size=(2, 20, 2))
    np.testing.assert_array_equal(
        rerank(scores, 5, 0.4, RerankConfig(method="none")), relevance_order(scores, 5)
    )
    np.testing.assert_array_equal(
        rerank(scores, 5, 0.4, RerankConfig(method="mmr"), vectors=vecs),
        mmr(scores, 5, 0.4, vectors=vecs),
    )
    cfg = RerankConfig(method="dpp", similarity="category", theta_max=2.0)
    np.testing.assert_array_equal(
        rerank(scores, 5, 0.4, cfg, cat_ids=cats),
        dpp(scores, 5, 0.4, similarity=category_jaccard_similarity(cats), theta_max=2.0),
    )
    with pytest.raises(ValueError, match="needs cat_ids"):
        rerank(scores, 5, 0.4, cfg, vectors=vecs)
    assert set(RERANKERS) | {"none"} == set(METHODS)  # every named method is dispatched
    mixed = RerankConfig(method="mmr", identity_mix=0.2)
    kernel = similarity_inputs(mixed, vectors=vecs)  # built once, reused by many calls
    np.testing.assert_array_equal(
        rerank(scores, 5, 0.4, mixed, **kernel), rerank(scores, 5, 0.4, mixed, vectors=vecs)
    )
    with pytest.raises(ValueError, match="rerank.method"):
        RerankConfig(method="xmr")


# ----------------------------------------------------------------------------- trade-off


def intra_list_diversity(vecs: np.ndarray, picks: np.ndarray) -> float:
    """Mean over requests of 1 - mean pairwise cosine among the picked items."""
    sim = cosine_similarity(np.take_along_axis(vecs, picks[:, :, None], axis=1))  # (B, k, k)
    k = picks.shape[1]
    return float(np.mean(1 - (sim.sum((1, 2)) - k) / (k * (k - 1))))


@pytest.mark.parametrize("method", RERANKERS)
def test_raising_lam_raises_diversity(method):
    rng = np.random.default_rng(0)
    bsz, n, n_clusters, dim = 32, 80, 8, 16
    centers = rng.normal(size=(bsz, n_clusters, dim))
    cluster = rng.integers(0, n_clusters, size=(bsz, n))
    vecs = np.take_along_axis(centers, cluster[:, :, None], axis=1)
    vecs = vecs + 0.3 * rng.normal(size=vecs.shape)
    scores = -0.5 * cluster + rng.normal(size=(bsz, n))  # low clusters are more relevant
    ild = [
        intra_list_diversity(vecs, RERANKERS[method](scores, 10, lam, vectors=vecs))
        for lam in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
    ]
    # Diversity climbs steeply up to lam ~ 0.5, then plateaus: the greedy objectives (max sim,
    # log det) are not ILD itself, so past the plateau ILD may wobble by a few thousandths.
    assert ild[0] < ild[1] < ild[2] < ild[3], ild
    assert all(b >= a - 0.01 for a, b in zip(ild, ild[1:], strict=False)), ild
    assert ild[-1] > ild[0] + 0.2, ild
