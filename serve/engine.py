"""The serving stages as plain inference objects over a serving export (torch + numpy, no Ray).

    model = load_export("outputs/beauty/export")
    tower = QueryTower(model, behavior=catalog.behavior)
    got = tower.retrieve([hist], [hist], n=100)     # one matmul against every item vector
    ranked = HeadScorer(model).score(got)           # multi-task heads over the candidates
    picks = rerank_candidates(ranked[0].scores, 10, 0.3, cfg, vectors=table[cands])

The stages call the `Recommender`'s own inference methods (`user_embedding`,
`next_item_scores`, `relevance_logits`, `diversity_logits`): serving scores what `test.*`
measured, with the item table computed once. The Ray deployments in serve/app.py wrap each
object; tests drive them directly.

Final ranking score of candidate c for a user with hidden state h (documented in README):

    score(c) = log softmax_{c' in candidates}(s_c')[c]  +  w * log sigmoid(rel(h, e_c))

with s_c = h . e_c / tau + r [c in the history] the model's next-item logit (r: the learned
repeat logit; it only matters with exclude_seen=false, since history items are otherwise never
candidates), i.e. log P(next = c | candidates) + w log P(relevant | c): with w = 1 the log of
the joint probability "the user picks c next and engages with it" (graded relevance:
P(cart/fav/buy | interacts with c); Amazon's sampled head: P(c is a real next item rather than
a random one)). w = serve.relevance_weight; w = 0 is the interest order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rec.data.batch import Batch, collate, left_pad
from rec.recommender import Recommender
from rec.rerank import RerankConfig, rerank


@dataclass
class Retrieved:
    """One request's retrieval result: candidates (N,) int64 item indices by descending
    interest, interest (N,) float32 the model's next-item logits s_c (module docstring), h (D,)
    float32 the user state."""

    candidates: np.ndarray
    interest: np.ndarray
    h: np.ndarray
    compute_ms: float = 0.0  # model time of the batch this request ran in


@dataclass
class Ranked:
    """One request's ranking: scores (N,) float32 final scores in candidate order,
    relevance (N,) float32 P(relevant), diversity float (the diversity head's P(new category))."""

    scores: np.ndarray
    relevance: np.ndarray
    diversity: float
    compute_ms: float = 0.0  # model time of the batch this request ran in


def history_batch(histories: list[np.ndarray], behavior: int, max_len: int) -> Batch:
    """Item-index histories (each (L_b,) int64, time order) -> a left-padded Batch (B, T).

    T = the longest history in the batch capped at max_len (older events are dropped). Events
    get the request behavior token and gap token 1 ("unknown gap"): requests carry no times.
    """
    width = max(1, min(max_len, max((len(h) for h in histories), default=1)))
    items = left_pad([np.asarray(h, dtype=np.int64) for h in histories], width)  # (B, T)
    real = (items > 0).astype(np.int64)  # (B, T)
    zeros = np.zeros_like(items)  # (B, T) requests have no targets
    return collate(
        {
            "items": items,
            "behaviors": real * behavior,
            "gaps": real,
            "targets": zeros,
            "target_behaviors": zeros,
        }
    )


class QueryTower:
    """Retrieval: the transformer encodes the history into h, then top-N of the model's
    next-item logits over all items (`Recommender.next_item_scores`)."""

    def __init__(self, model: Recommender, behavior: int, index=None) -> None:
        self.model = model.eval()
        self.behavior = behavior
        self.table = model.item_table().contiguous()  # (N_items + 1, D), once, not per request
        self.index = index  # a rec.ann index: approximate candidates, rescored exactly

    @torch.no_grad()
    def retrieve(
        self, histories: list[np.ndarray], exclude: list[np.ndarray | None], n: int
    ) -> list[Retrieved]:
        """Top-n items per history by the model's next-item logits (the learned repeat logit
        included); `exclude[b]` item indices never come back.

        Fewer than n candidates come back only when the catalogue minus the exclusions is smaller.
        """
        t0 = time.perf_counter()
        batch = history_batch(histories, self.behavior, self.model.cfg.max_len)
        h = self.model.user_embedding(batch, self.table)  # (B, D)
        if self.index is not None:
            top = self._approximate(h, batch.items, exclude, n)
        else:
            scores = self.model.next_item_scores(h, batch.items, self.table)  # (B, N_items + 1)
            for row, items in enumerate(exclude):
                if items is not None and len(items):
                    # torch.tensor copies: arrays that came through Ray are read-only.
                    scores[row, torch.tensor(items, dtype=torch.long)] = float("-inf")
            k = min(n, scores.shape[1] - 1)
            top = [(v, i) for v, i in zip(*torch.topk(scores, k, dim=1), strict=True)]  # (n,)
        out, ms = [], (time.perf_counter() - t0) * 1000.0
        for row, (values, indices) in enumerate(top):
            ok = torch.isfinite(values)  # (n,) excluded / padding columns are -inf
            out.append(
                Retrieved(
                    candidates=indices[ok].numpy(),
                    interest=values[ok].numpy(),
                    h=h[row].numpy(),
                    compute_ms=ms,
                )
            )
        return out

    def _approximate(
        self, h: torch.Tensor, items: torch.Tensor, exclude: list[np.ndarray | None], n: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per row (values (n',), item indices (n',)): the index's top n + |excluded| items
        plus the input items (the repeat logit may lift them), rescored exactly with
        `next_item_scores` on that candidate set, exclusions removed."""
        from rec.ann import search

        extra = max((len(e) for e in exclude if e is not None), default=0)
        ids, _ = search(self.index, h.numpy(), min(n + extra, self.table.shape[0] - 1))
        out = []
        for row, excluded in enumerate(exclude):
            cands = np.union1d(ids[row][ids[row] > 0], items[row][items[row] > 0].numpy())
            if excluded is not None and len(excluded):
                cands = np.setdiff1d(cands, excluded)
            cands = torch.as_tensor(cands, dtype=torch.long)  # (M,)
            h_row = h[row : row + 1]  # (1, D)
            # Candidate rows as a small table: row 0 stays padding, items map to 1..M.
            sub = torch.cat([self.table[:1], self.table[cands]])  # (M + 1, D)
            local = torch.searchsorted(cands, items[row : row + 1])  # (1, T) positions
            seen = (local < len(cands)) & (cands[local.clamp(max=len(cands) - 1)] == items[row])
            scores = self.model.next_item_scores(h_row, (local + 1) * seen, sub)[0, 1:]  # (M,)
            top = torch.topk(scores, min(n, len(cands)))
            out.append((top.values, cands[top.indices]))
        return out


class HeadScorer:
    """Ranking: the relevance and diversity heads of the multi-task model on retrieved items."""

    def __init__(self, model: Recommender, relevance_weight: float = 1.0) -> None:
        self.model = model.eval()
        self.relevance_weight = relevance_weight
        self.table = model.item_table().contiguous()  # (N_items + 1, D), once, not per request

    @torch.no_grad()
    def score(self, requests: list[Retrieved]) -> list[Ranked]:
        """Final scores (see the module docstring) for each request's candidates."""
        t0 = time.perf_counter()
        width = max((len(r.candidates) for r in requests), default=0)
        bsz = len(requests)
        cands = torch.zeros((bsz, width), dtype=torch.long)  # (B, N), 0 = padding
        interest = torch.full((bsz, width), float("-inf"))  # (B, N)
        for row, r in enumerate(requests):
            cands[row, : len(r.candidates)] = torch.tensor(r.candidates, dtype=torch.long)
            interest[row, : len(r.interest)] = torch.tensor(r.interest, dtype=torch.float32)
        h = torch.from_numpy(np.stack([r.h for r in requests]))  # (B, D)
        vecs = F.embedding(cands, self.table)  # (B, N, D) the candidates' item vectors
        rel_logit = self.model.relevance_logits(h, vecs)  # (B, N)
        div = torch.sigmoid(self.model.diversity_logits(h))  # (B,)
        log_p = torch.log_softmax(interest, dim=1)  # (B, N) over the candidates only
        scores = log_p + self.relevance_weight * F.logsigmoid(rel_logit)  # (B, N)
        rel = torch.sigmoid(rel_logit)  # (B, N)
        ms = (time.perf_counter() - t0) * 1000.0
        return [
            Ranked(
                scores=scores[row, : len(r.candidates)].numpy().copy(),
                relevance=rel[row, : len(r.candidates)].numpy().copy(),
                diversity=float(div[row]),
                compute_ms=ms,
            )
            for row, r in enumerate(requests)
        ]


def rerank_candidates(
    scores: np.ndarray,
    k: int,
    lam: float,
    cfg: RerankConfig,
    vectors: np.ndarray | None = None,
    cat_ids: np.ndarray | None = None,
) -> np.ndarray:
    """One request: (N,) scores -> (min(k, N),) int64 positions into the candidates, in order.

    vectors (N, D) for similarity "embedding", cat_ids (N, C) for "category".
    """
    picks = rerank(
        scores[None, :],
        k,
        lam,
        cfg,
        vectors=None if vectors is None else vectors[None],
        cat_ids=None if cat_ids is None else cat_ids[None],
    )
    return picks[0]


def popular_pool(counts: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The `size` most popular items: ((P,) int64 indices, (P,) float64 log(1 + count) scores).

    counts (n_items + 1,) with row 0 padding; ties go to the lower index.
    """
    order = np.argsort(-counts[1:], kind="stable")[:size] + 1  # (P,)
    return order.astype(np.int64), np.log1p(counts[order].astype(np.float64))
