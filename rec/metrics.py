"""Full-ranking evaluation of a sequential recommender: relevance and list diversity.

Items are indexed 1..n_items; index 0 is padding and is never ranked or recommended. For a
batch of B users the model gives scores (B, n_items + 1), one held-out target (B,) and a
history (B, T) of item indices (0 = padding). `RankingEvaluator` accumulates two protocols in
one pass:

    {prefix}.*         every item is ranked, history included (S3-Rec / RecBole full sort)
    {prefix}_unseen.*  the user's history items are removed from the ranking and the top-k
                       list, except the target itself, which is never removed

Definitions (all means over users unless said otherwise):

    rank           1 + #items scoring strictly higher + #OTHER items scoring equal to the
                   target (pessimistic ties: a constant-score model gets rank n_items, ~0)
    recall@k       1 if rank <= k (one target, so recall = hit rate)
    ndcg@k         1 / log2(rank + 1) if rank <= k, else 0
    mrr            1 / rank, over the full ranking (no cut-off)
    ild@K          mean pairwise category-Jaccard distance 1 - |A & B| / |A | B| in the top-K
                   list; two items with no categories at all are at distance 0 (no evidence
                   that they differ); lists with fewer than 2 items score 0
    cat_coverage@K number of distinct categories in the top-K list (a count, not a fraction)
    catalog_coverage  fraction of the n_items catalog in at least one user's top-K list
    novelty@K      mean over list positions of -log2 p_i, with the Laplace-smoothed
                   popularity p_i = (count_i + 1) / (sum(counts) + n_items); unseen items
                   thus get finite novelty

    ev = RankingEvaluator(item_categories, item_counts)
    for batch in loader:
        ev.update(model_scores, targets, history)
    metrics = ev.compute("valid")  # {"valid.ndcg@10": ..., "valid_unseen.ndcg@10": ...}

Memory: `update` processes users in row chunks of at most `chunk_elements` scores, so the
temporaries (a boolean comparison and, for the unseen list, one masked copy) stay bounded for
catalogs of millions of items. Ranks come from comparing against the target's score and lists
from `torch.topk`; nothing sorts the catalog.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

PROTOCOLS = ("", "_unseen")  # key suffixes: full ranking, history removed


def exclusion_set(history: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T) history, (B,) targets -> (B, T) distinct history items, 0 where not excluded.

    Duplicates, padding and the target itself become 0, so each excluded item appears once:
    counting it twice would push the target's rank below its true value.
    """
    items = history.sort(dim=1).values  # (B, T), duplicates now adjacent
    repeat = torch.zeros_like(items, dtype=torch.bool)
    repeat[:, 1:] = items[:, 1:] == items[:, :-1]
    return items.masked_fill(repeat | (items == targets[:, None]), 0)


def ranks_of_targets(
    scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, N+1) scores, (B,) targets -> (B,) int64 pessimistic 1-based ranks among items 1..N.

    `exclude` (B, T) from `exclusion_set` removes those items from the ranking entirely (they
    neither beat nor tie the target). Raises ValueError on NaN target scores, which would
    otherwise compare false to everything and rank first.
    """
    target_scores = scores.gather(1, targets[:, None])  # (B, 1)
    if torch.isnan(target_scores).any():
        raise ValueError("scores: NaN at a target item; cannot rank it")
    # The target is >= itself, so this count is 1 + #higher + #other equal: pessimistic ties.
    ranks = (scores[:, 1:] >= target_scores).sum(dim=1)  # (B,)
    if exclude is not None:
        ranks = ranks - _excluded_ahead(scores, target_scores, exclude)
    return ranks


def _excluded_ahead(
    scores: torch.Tensor, target_scores: torch.Tensor, exclude: torch.Tensor
) -> torch.Tensor:
    """(B,) number of excluded items (non-zero in `exclude`) scoring >= the target."""
    ahead = scores.gather(1, exclude) >= target_scores  # (B, T)
    return (ahead & (exclude != 0)).sum(dim=1)


def recall_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) ranks -> (B,) float64 hit indicator; with one target recall@k equals hit@k."""
    return (ranks <= k).double()


def ndcg_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) ranks -> (B,) float64 1/log2(rank + 1) inside the cut-off, else 0 (ideal DCG = 1)."""
    gain = 1.0 / torch.log2(ranks.double() + 1.0)
    return torch.where(ranks <= k, gain, torch.zeros_like(gain))


def reciprocal_rank(ranks: torch.Tensor) -> torch.Tensor:
    """(B,) ranks -> (B,) float64 1/rank; its mean is the full (uncut) MRR."""
    return 1.0 / ranks.double()


def top_k_items(scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N+1) scores -> (B, min(k, N)) int64 item indices, best first, never padding 0.

    With `exclude` (B, T) those items are masked on a copy (the caller's scores stay intact);
    if fewer than k items remain, the surplus slots hold 0 and diversity metrics skip them.
    Ties are broken by `torch.topk`, i.e. arbitrarily.
    """
    k = min(k, scores.shape[1] - 1)
    if exclude is None:
        return scores[:, 1:].topk(k, dim=1).indices + 1
    masked = scores.clone()  # bounded by the caller's row chunk
    masked.scatter_(1, exclude, float("-inf"))  # zeros hit column 0, which is skipped anyway
    top = masked[:, 1:].topk(k, dim=1).indices + 1  # (B, k)
    listed = (top[:, :, None] == exclude[:, None, :]) & (exclude[:, None, :] != 0)  # (B, k, T)
    return top.masked_fill(listed.any(dim=2), 0)


def _pair_mask(topk: torch.Tensor) -> torch.Tensor:
    """(B, K) list -> (B, K, K) bool: pairs i < j of non-empty slots."""
    valid = topk != 0
    k = topk.shape[1]
    upper = torch.ones(k, k, dtype=torch.bool, device=topk.device).triu(diagonal=1)
    return valid[:, :, None] & valid[:, None, :] & upper


def _mean_over_pairs(dist: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """(B, K, K) distances, (B, K, K) mask -> (B,) float64 mean; 0 with no pair."""
    total = (dist.double() * pairs).sum(dim=(1, 2))
    return total / pairs.sum(dim=(1, 2)).clamp_min(1)


def ild_jaccard(topk: torch.Tensor, item_categories: torch.Tensor) -> torch.Tensor:
    """(B, K) lists, (N+1, C) category table (0 = padding) -> (B,) float64 intra-list diversity.

    Mean over pairs of 1 - |A & B| / |A | B| of the two items' category sets; two items with
    no categories are at distance 0. Category rows must not repeat a category (see
    `dedupe_categories`), else intersections are over-counted.
    """
    cats = item_categories[topk]  # (B, K, C)
    sizes = (cats != 0).sum(dim=2)  # (B, K)
    # (B, K, 1, C, 1) vs (B, 1, K, 1, C): every category of item i against every one of item j.
    same = cats[:, :, None, :, None] == cats[:, None, :, None, :]
    same &= cats[:, :, None, :, None] != 0
    inter = same.sum(dim=(3, 4))  # (B, K, K)
    union = sizes[:, :, None] + sizes[:, None, :] - inter  # (B, K, K)
    dist = torch.where(union > 0, 1.0 - inter / union.clamp_min(1), torch.zeros_like(union))
    return _mean_over_pairs(dist, _pair_mask(topk))


def ild_embedding(topk: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
    """(B, K) lists, (N+1, D) item embeddings -> (B,) float64 mean pairwise 1 - cosine.

    A zero embedding has cosine 0 to everything (distance 1). Values lie in [0, 2].
    """
    emb = F.normalize(item_emb[topk].float(), dim=2)  # (B, K, D)
    dist = 1.0 - emb @ emb.transpose(1, 2)  # (B, K, K)
    return _mean_over_pairs(dist, _pair_mask(topk))


def category_coverage(topk: torch.Tensor, item_categories: torch.Tensor) -> torch.Tensor:
    """(B, K) lists, (N+1, C) category table -> (B,) float64 count of distinct categories."""
    flat = item_categories[topk].flatten(1).sort(dim=1).values  # (B, K*C)
    first = torch.ones_like(flat, dtype=torch.bool)
    first[:, 1:] = flat[:, 1:] != flat[:, :-1]
    return (first & (flat != 0)).sum(dim=1).double()


def self_information(item_counts: torch.Tensor) -> torch.Tensor:
    """(N+1,) training counts -> (N+1,) float64 -log2 p_i, p_i = (c_i + 1) / (sum c + N)."""
    counts = item_counts.double().clone()
    counts[0] = 0.0  # padding is no item: keep it out of the total
    n_items = counts.shape[0] - 1
    return -torch.log2((counts + 1.0) / (counts.sum() + n_items))


def novelty(topk: torch.Tensor, self_info: torch.Tensor) -> torch.Tensor:
    """(B, K) lists, (N+1,) `self_information` -> (B,) float64 mean over non-empty slots."""
    valid = topk != 0
    total = (self_info[topk] * valid).sum(dim=1)
    return total / valid.sum(dim=1).clamp_min(1)


def dedupe_categories(item_categories: torch.Tensor) -> torch.Tensor:
    """(N+1, C) table -> same shape with repeated categories in a row set to padding 0."""
    cats = item_categories.sort(dim=1).values
    repeat = torch.zeros_like(cats, dtype=torch.bool)
    repeat[:, 1:] = cats[:, 1:] == cats[:, :-1]
    return cats.masked_fill(repeat, 0)


def popularity_scores(item_counts: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N+1,) counts -> (batch_size, N+1) float32 most-popular scores, identical for every user.

    Scores are distinct (count descending, ties to the lower item index, padding last): a
    sorted MostPop list, so pessimistic ties do not punish the baseline for equal counts. The
    result is an expanded view (no B x N memory); treat it as read-only.
    """
    n = item_counts.shape[0]
    counts = item_counts.double().clone()
    counts[0] = float("-inf")
    order = torch.sort(counts, descending=True, stable=True).indices  # (N+1,)
    scores = torch.empty(n, dtype=torch.float32, device=item_counts.device)
    # Integers up to 2**24 are exact in float32, enough for catalogs of 16M items.
    scores[order] = torch.arange(n, 0, -1, dtype=torch.float32, device=item_counts.device)
    return scores[None, :].expand(batch_size, n)


class RankingEvaluator:
    """Accumulates relevance and diversity metrics over batches, for both protocols.

    item_categories: (N+1, C) int64 category ids, 0 = padding, row 0 all zeros
    item_counts:     (N+1,) training interaction counts (index 0 ignored)
    ks:              cut-offs for recall@k and ndcg@k
    diversity_k:     length of the list that diversity, coverage and novelty look at
    chunk_elements:  most scores processed at once; bounds temporary memory in `update`
    """

    def __init__(
        self,
        item_categories: torch.Tensor,
        item_counts: torch.Tensor,
        ks: Sequence[int] = (10, 20),
        diversity_k: int = 10,
        chunk_elements: int = 2**25,
    ) -> None:
        if item_categories.dim() != 2 or item_categories.dtype.is_floating_point:
            raise ValueError(
                f"item_categories: expected an integer (N+1, C) table, got "
                f"{item_categories.dtype} of shape {tuple(item_categories.shape)}"
            )
        if item_categories.shape[0] < 2 or bool((item_categories[0] != 0).any()):
            raise ValueError("item_categories: need >= 1 item and an all-zero padding row 0")
        if item_counts.shape != (item_categories.shape[0],):
            raise ValueError(
                f"item_counts: expected shape {(item_categories.shape[0],)}, "
                f"got {tuple(item_counts.shape)}"
            )
        if not ks or min(ks) < 1:
            raise ValueError(f"ks: expected positive cut-offs, got {ks!r}")
        if diversity_k < 1:
            raise ValueError(f"diversity_k: expected >= 1, got {diversity_k!r}")
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements: expected >= 1, got {chunk_elements!r}")
        self.n_items = item_categories.shape[0] - 1
        self.ks = tuple(int(k) for k in ks)
        self.diversity_k = int(diversity_k)
        self.chunk_elements = int(chunk_elements)
        self._categories = dedupe_categories(item_categories.long())
        self._self_info = self_information(item_counts)
        self.reset()

    def reset(self) -> None:
        """Forget every accumulated batch."""
        self.n_users = 0
        self._sums: dict[str, dict[str, torch.Tensor]] = {p: {} for p in PROTOCOLS}
        self._listed = {p: torch.zeros(self.n_items + 1, dtype=torch.bool) for p in PROTOCOLS}

    def update(
        self, scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor | None = None
    ) -> None:
        """Add a batch: scores (B, N+1) float, targets (B,) in 1..N, history (B, T) or None.

        Without history both protocols see the same ranking.
        """
        self._check(scores, targets, history)
        rows = max(1, self.chunk_elements // scores.shape[1])
        for lo in range(0, scores.shape[0], rows):
            hist = None if history is None else history[lo : lo + rows]
            self._update_chunk(scores[lo : lo + rows], targets[lo : lo + rows], hist)
        self.n_users += scores.shape[0]

    def update_ranked(
        self,
        ranks: torch.Tensor,
        top: torch.Tensor,
        ranks_unseen: torch.Tensor,
        top_unseen: torch.Tensor,
    ) -> None:
        """Add a batch ranked elsewhere (rec.evaluation ranks huge catalogues chunk by chunk):
        (B,) 1-based ranks and (B, K) top lists (0 = empty slot), for both protocols."""
        self._accumulate("", ranks, top)
        self._accumulate("_unseen", ranks_unseen, top_unseen)
        self.n_users += len(ranks)

    def _update_chunk(
        self, scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor | None
    ) -> None:
        targets = targets.long()
        ranks = ranks_of_targets(scores, targets)  # (b,)
        top = top_k_items(scores, self.diversity_k)  # (b, K)
        self._accumulate("", ranks, top)
        if history is not None:
            exclude = exclusion_set(history.long(), targets)  # (b, T)
            target_scores = scores.gather(1, targets[:, None])
            # Removing items only lifts the target, so subtract instead of ranking again.
            ranks = ranks - _excluded_ahead(scores, target_scores, exclude)
            top = top_k_items(scores, self.diversity_k, exclude)
        self._accumulate("_unseen", ranks, top)

    def _accumulate(self, protocol: str, ranks: torch.Tensor, top: torch.Tensor) -> None:
        device = ranks.device
        # Move the item tables once, not per chunk: they are catalog-sized.
        self._categories = cats = self._categories.to(device)
        self._self_info = info = self._self_info.to(device)
        dk = self.diversity_k
        per_user = {"mrr": reciprocal_rank(ranks)}
        for k in self.ks:
            per_user[f"recall@{k}"] = recall_at_k(ranks, k)
            per_user[f"ndcg@{k}"] = ndcg_at_k(ranks, k)
        per_user[f"ild@{dk}"] = ild_jaccard(top, cats)
        per_user[f"cat_coverage@{dk}"] = category_coverage(top, cats)
        per_user[f"novelty@{dk}"] = novelty(top, info)
        sums = self._sums[protocol]
        for name, values in per_user.items():
            # Sums stay on the scores' device: no host sync per batch.
            total = values.sum()
            sums[name] = sums[name].to(device) + total if name in sums else total
        self._listed[protocol] = self._listed[protocol].to(device)
        self._listed[protocol][top.flatten()] = True

    def _check(
        self, scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor | None
    ) -> None:
        if scores.dim() != 2 or scores.shape[1] != self.n_items + 1:
            raise ValueError(
                f"scores: expected shape (B, {self.n_items + 1}), got {tuple(scores.shape)}"
            )
        if not scores.dtype.is_floating_point:
            raise ValueError(f"scores: expected a floating dtype, got {scores.dtype}")
        if targets.shape != (scores.shape[0],):
            raise ValueError(
                f"targets: expected shape ({scores.shape[0]},), got {tuple(targets.shape)}"
            )
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise ValueError(f"targets: expected integer item indices, got {targets.dtype}")
        if targets.numel() and (int(targets.min()) < 1 or int(targets.max()) > self.n_items):
            raise ValueError(f"targets: expected item indices in 1..{self.n_items}")
        if history is not None and (history.dim() != 2 or history.shape[0] != scores.shape[0]):
            raise ValueError(
                f"history: expected shape ({scores.shape[0]}, T), got {tuple(history.shape)}"
            )

    def merge(self, other: RankingEvaluator) -> None:
        """Add another evaluator's batches (e.g. from another data-parallel worker)."""
        if (other.n_items, other.ks, other.diversity_k) != (
            self.n_items,
            self.ks,
            self.diversity_k,
        ):
            raise ValueError("merge: evaluators differ in n_items, ks or diversity_k")
        for p in PROTOCOLS:
            for name, total in other._sums[p].items():
                mine = self._sums[p].get(name)
                self._sums[p][name] = total.cpu() if mine is None else mine.cpu() + total.cpu()
            self._listed[p] = self._listed[p].cpu() | other._listed[p].cpu()
        self.n_users += other.n_users

    def compute(self, prefix: str) -> dict[str, float]:
        """Means over all users seen since `reset`, keyed `{prefix}{protocol}.{metric}`."""
        if self.n_users == 0:
            raise ValueError("compute: no users evaluated; call update first")
        out: dict[str, float] = {}
        for p in PROTOCOLS:
            for name, total in self._sums[p].items():
                out[f"{prefix}{p}.{name}"] = float(total) / self.n_users
            listed = int(self._listed[p][1:].sum())
            out[f"{prefix}{p}.catalog_coverage"] = listed / self.n_items
        return out
