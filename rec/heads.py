"""Task heads, their targets and losses (the `Recommender` in `rec.recommender` ties them
to the network).

Tasks are data (`ModelConfig.loss_weights`, 0 = off); losses are small pure functions. For a
batch, a "position with a target" is (b, t) with `targets[b, t] > 0`; `h_t` is the hidden
state there, `e_i` the item vector of item i (`SeqRecModel.item_vectors`), `y = targets[b, t]`.

interest (next item)
    full:    -log softmax_i(h_t . e_i / tau + r [i in x_<=t])[y] over all items i in
             1..n_items (the padding column never competes), averaged over positions with a
             target. r is one learned scalar (`ModelConfig.repeat_bias`; 0 when off) added to
             the items of the input up to t: how likely a repeat is, learned from the data.
    sampled: K negatives n_1..n_K are drawn once per batch, with replacement, from the
             proposal q (popularity or uniform, `Recommender.set_proposal`) and shared by all
             positions. logits = [h_t . e_y / tau - log q(y), h_t . e_nk / tau - log q(n_k)]
             (logQ correction), negatives equal to y masked out ("accidental hits"); the
             loss is cross-entropy with the positive as the class; r is added as above.
relevance (P(the user engages strongly with a candidate c)), logit = MLP([h_t, e_c, h_t * e_c])
    graded:  c = y; label 1 iff the next event's behavior token is engaged
             (`rec.data.schema.engaged_mask()`: cart, fav, buy, rating_high), 0 otherwise (pv,
             review, rating_low). BCE averaged over positions with a target. The head then
             estimates P(engaged | the user interacts with c next).
    sampled: for one-behavior sources (Amazon reviews): c = y with label 1, plus
             `relevance_negatives` uniform random items per position with label 0 (a negative
             equal to y is dropped). BCE averaged over all these pairs. The head then
             estimates P(c is the next item rather than a random one).
diversity (P(the user explores a new category next)), logit = MLP(h_t)
    label 1 iff item y has at least one category and some category of y is absent from the
    categories of the last `diversity_window` input items at positions <= t (padding ignored);
    items without categories are never "new". See `diversity_targets`. BCE averaged over
    positions with a target.
contrastive (an auxiliary view of the same sequence; DuoRec's unsupervised objective)
    the batch is encoded twice under different dropout masks; z, z' are the two states at
    each sequence's last position. InfoNCE with the other sequences of the batch (both views)
    as negatives, cosine similarity / `contrastive_temperature`, symmetric. See
    `contrastive_loss`.
future (the items after the next one; PinnerFormer's dense targets, here within a window)
    the interest logits at (b, t) (same softmax, repeat logit included) also score
    y_k = targets[b, t + k - 1] for k = 2..`future_steps`: mean over the (position, k) pairs
    that exist of -log softmax(...)[y_k]. Full softmax only. See `future_targets`.
attributes (the next item's attributes; S3-Rec's associated-attribute task, made causal)
    logits h_t . a_j over the category table a (the table item vectors average), target the
    uniform distribution over y's attributes; cross-entropy averaged over positions whose
    target has any attribute. See `attribute_loss`.
total
    sum_k w_k L_k, or with uncertainty weighting (Kendall et al. 2018)
    sum_k w_k (exp(-s_k) L_k + s_k / 2) with learned s_k = log sigma_k^2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TASKS = ("interest", "relevance", "diversity", "contrastive", "future", "attributes")


def diversity_targets(
    items: torch.Tensor, targets: torch.Tensor, item_categories: torch.Tensor, window: int
) -> torch.Tensor:
    """`(B, T)` float: 1 where the next item opens a category unseen in the recent window.

    items, targets: (B, T) int64, 0 = padding / no target; item_categories: (n_items + 1, C)
    int64, 0 = no category. At (b, t) the window is items[b, max(0, t - window + 1) .. t].
    Positions without a target get 0 (they are masked out of the loss anyway).
    """
    n_batch, n_steps = items.shape
    padded = F.pad(items, (window - 1, 0))  # (B, T + W - 1), left zeros = no item
    recent = padded.unfold(1, window, 1)  # (B, T, W)
    seen = item_categories[recent].reshape(n_batch, n_steps, -1)  # (B, T, W * C)
    wanted = item_categories[targets]  # (B, T, C)
    # A real category of y is covered if it appears anywhere in the window; 0 never matches
    # because `wanted == 0` slots are treated as covered before looking.
    found = (wanted.unsqueeze(-1) == seen.unsqueeze(-2)).any(-1)  # (B, T, C)
    covered = found | (wanted == 0)  # (B, T, C)
    has_category = (wanted > 0).any(-1)  # (B, T)
    new = has_category & ~covered.all(-1) & (targets > 0)  # (B, T)
    return new.float()  # (B, T)


def interest_full_logits(
    h: torch.Tensor,
    item_table: torch.Tensor,
    temperature: float,
    history: torch.Tensor | None = None,
    repeat_logit: torch.Tensor | None = None,
) -> torch.Tensor:
    """Interest logits over all items (P, N), column j = item j + 1. h: (P, D), item_table:
    (N + 1, D); history: (P, T) item ids each position may repeat (0 = none), repeat_logit:
    () scalar added to those items."""
    # Scaling h, not the (P, N) logits, saves a full pass over the largest tensor; dropping
    # row 0 is the same as a -inf padding column without materialising it.
    logits = (h / temperature) @ item_table[1:].T  # (P, N)
    if repeat_logit is not None and history is not None:
        rows, cols = _unique_pairs(history)
        # In place on the largest tensor: matmul's backward does not need its output.
        logits.index_put_((rows, cols - 1), repeat_logit.expand(len(rows)), accumulate=True)
    return logits


def interest_full_loss(
    h: torch.Tensor,
    item_table: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    history: torch.Tensor | None = None,
    repeat_logit: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Softmax cross-entropy over all items. targets: (P,); label_smoothing: mass spread
    uniformly over all items (F.cross_entropy's); the rest as `interest_full_logits`."""
    logits = interest_full_logits(h, item_table, temperature, history, repeat_logit)
    return F.cross_entropy(logits, targets - 1, label_smoothing=label_smoothing)


def future_targets(targets: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, T) next-item targets (0 = none) -> (B, T, steps - 1): at (b, t) the items 2..steps
    events ahead, targets[b, t + k - 1] for k = 2..steps (0 past the end of the sequence).

    Targets are left-padded and contiguous, so shifting the row left by k - 1 is "k ahead".
    """
    return torch.stack([F.pad(targets[:, k:], (0, k)) for k in range(1, steps)], dim=-1)


def future_loss(logits: torch.Tensor, ahead: torch.Tensor) -> torch.Tensor:
    """Mean -log softmax(logits)[y_k] over the (position, k) pairs with a target.

    logits: (P, N) interest logits (column j = item j + 1); ahead: (P, K) item ids, 0 = none.
    """
    valid = ahead > 0  # (P, K)
    if not bool(valid.any()):
        return logits.sum() * 0.0  # keeps the graph (and DeepSpeed's gradient hooks) whole
    logp = logits.log_softmax(-1).gather(1, (ahead - 1).clamp(min=0))  # (P, K)
    return -(logp * valid).sum() / valid.sum()


def attribute_loss(
    h: torch.Tensor, attribute_table: torch.Tensor, wanted: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of softmax(h . a_j) against the uniform distribution over each target's
    attributes. h: (P, D); attribute_table: (C + 1, D), row 0 padding; wanted: (P, A)
    attribute ids of each position's target item, 0 = none. Positions whose target has no
    attribute are left out."""
    has = (wanted > 0).any(-1)  # (P,)
    if not bool(has.any()):
        return h.sum() * 0.0
    logp = (h[has] @ attribute_table[1:].T).log_softmax(-1)  # (P', C)
    want = wanted[has]  # (P', A)
    # Multi-hot over 1..C (duplicates count once), normalised to a distribution per row. Added,
    # not written: a padding slot's 0 must not overwrite attribute 1 in the same column.
    hits = torch.zeros_like(logp).scatter_add_(
        1, (want - 1).clamp(min=0), (want > 0).to(logp.dtype)
    )
    hot = (hits > 0).to(logp.dtype)  # (P', C)
    return -((hot / hot.sum(-1, keepdim=True)) * logp).sum(-1).mean()


def contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR; CL4SRec and DuoRec's form): z1, z2 (B, D) two views of B sequences.

    For view i of sequence b the positive is the other view of b; the 2B - 2 other states
    of the batch are negatives. Cosine similarity / temperature, averaged over 2B anchors.
    """
    z = F.normalize(torch.cat([z1, z2]), dim=-1)  # (2B, D)
    sim = z @ z.T / temperature  # (2B, 2B)
    n = len(z1)
    sim.fill_diagonal_(float("-inf"))  # a state is not its own negative
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)  # (2B,)
    return F.cross_entropy(sim, target)


def _unique_pairs(history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, T) item ids, 0 = none -> (row, item) pairs with item > 0, each pair once."""
    width = history.new_tensor(int(history.max()) + 1)
    rows = torch.arange(len(history), device=history.device).unsqueeze(1).expand_as(history)
    keys = torch.unique((rows * width + history)[history > 0])  # (M,)
    return keys // width, keys % width


def in_history(history: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """(P, T) item ids (0 = none), (P, K) candidates -> (P, K) bool: candidate in its row."""
    width = int(max(int(history.max()), int(cand.max()))) + 1
    rows = torch.arange(len(history), device=history.device).unsqueeze(1)
    keys = torch.sort((rows * width + history).masked_fill(history == 0, -1).flatten()).values
    query = rows * width + cand  # (P, K)
    pos = torch.searchsorted(keys, query.flatten()).clamp(max=len(keys) - 1)
    return (keys[pos] == query.flatten()).view_as(cand) & (cand > 0)


def in_history_shared(history: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`in_history(history, ids.expand(P, K))` for candidates shared by every row, without
    the (P, K) searches: (P, T) item ids (0 = none), (K,) ids (repeats allowed) -> (P, K).

    Looks each history item up among the K ids (P x T searches in a sorted K-vector) and
    gathers the answer per column; `in_history` on the expanded ids searches P x K keys in a
    (P x T)-key vector, ~40x the work at P = 6k positions and K = 2,048 negatives.
    """
    uniq, column = torch.unique(ids, return_inverse=True)  # (U,), (K,)
    pos = torch.searchsorted(uniq, history).clamp(max=len(uniq) - 1)  # (P, T)
    hit = (uniq[pos] == history) & (history > 0)  # (P, T)
    found = torch.zeros(len(history), len(uniq) + 1, dtype=torch.bool, device=history.device)
    found.scatter_(1, torch.where(hit, pos, len(uniq)), True)  # misses land in the last column
    return found[:, column] & (ids > 0)  # (P, K)


def causal_history(items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) input items, (B, T) positions with a target -> (P, T): the items at positions
    <= t for each of the P positions (0 elsewhere): what the item at t + 1 could repeat."""
    steps = items.shape[1]
    causal = torch.ones(steps, steps, dtype=torch.bool, device=items.device).tril()  # [t, s]
    return (items.unsqueeze(1) * causal).masked_select(mask.unsqueeze(-1)).view(-1, steps)


def interest_sampled_loss(
    h: torch.Tensor,
    target_vecs: torch.Tensor,
    targets: torch.Tensor,
    neg_ids: torch.Tensor,
    neg_vecs: torch.Tensor,
    log_q: torch.Tensor,
    temperature: float,
    history: torch.Tensor | None = None,
    repeat_logit: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled softmax with logQ correction and accidental hits masked.

    h, target_vecs: (P, D); targets: (P,); neg_ids: (K,) shared negatives; neg_vecs: (K, D);
    log_q: (N + 1,) log proposal probability per item; history, repeat_logit: as in
    `interest_full_loss`.
    """
    h = h / temperature  # (P, D)
    pos = (h * target_vecs).sum(-1) - log_q[targets]  # (P,)
    neg = h @ neg_vecs.T - log_q[neg_ids]  # (P, K)
    if repeat_logit is not None and history is not None:
        pos = pos + repeat_logit * in_history(history, targets.unsqueeze(1)).squeeze(1)
        neg = neg + repeat_logit * in_history_shared(history, neg_ids)  # (P, K)
    neg = neg.masked_fill(neg_ids.unsqueeze(0) == targets.unsqueeze(1), float("-inf"))  # (P, K)
    logits = torch.cat([pos.unsqueeze(1), neg], dim=1)  # (P, 1 + K)
    zeros = torch.zeros(len(targets), dtype=torch.long, device=h.device)  # (P,) positive = 0
    return F.cross_entropy(logits, zeros)


def relevance_sampled_loss(
    pos_logits: torch.Tensor, neg_logits: torch.Tensor, neg_valid: torch.Tensor
) -> torch.Tensor:
    """Mean BCE over positives (label 1) and valid negatives (label 0).

    pos_logits: (P,); neg_logits, neg_valid: (P, K) (neg_valid False for accidental hits).
    """
    pos_terms = F.binary_cross_entropy_with_logits(
        pos_logits, torch.ones_like(pos_logits), reduction="sum"
    )
    neg_terms = F.binary_cross_entropy_with_logits(
        neg_logits, torch.zeros_like(neg_logits), weight=neg_valid.float(), reduction="sum"
    )
    return (pos_terms + neg_terms) / (pos_logits.numel() + neg_valid.sum())


def _mlp(d_in: int, d_hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, 1))


class RelevanceHead(nn.Module):
    """(h (..., D), e (..., D)) -> engagement logit (...)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.mlp = _mlp(3 * d, d)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([h, e, h * e], dim=-1)).squeeze(-1)  # (...)


class DiversityHead(nn.Module):
    """h (..., D) -> "explores a new category next" logit (...)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.mlp = _mlp(d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(h).squeeze(-1)  # (...)


class MultiTaskLoss(nn.Module):
    """Weighted sum of task losses, optionally with learned log-variances (Kendall et al.)."""

    def __init__(self, weights: dict[str, float], uncertainty_weighting: bool) -> None:
        super().__init__()
        unknown = sorted(set(weights) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}; tasks are {list(TASKS)}")
        self.weights = {name: float(w) for name, w in weights.items() if w > 0}
        if not self.weights:
            raise ValueError(f"all loss weights are 0: {weights!r}")
        # s_k = log sigma_k^2 starts at 0, i.e. the static weights alone.
        self.log_vars = (
            nn.ParameterDict({name: nn.Parameter(torch.zeros(())) for name in self.weights})
            if uncertainty_weighting
            else None
        )

    def forward(self, losses: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-task scalar losses -> (total, {"loss": .., "loss_<task>": .., "log_var_<task>"})."""
        names = [name for name in losses if name in self.weights]
        terms, logged = [], {}
        for name in names:
            term = losses[name]
            if self.log_vars is not None:
                s = self.log_vars[name]
                term = torch.exp(-s) * term + 0.5 * s
                logged[f"log_var_{name}"] = s.detach()
            terms.append(self.weights[name] * term)
            logged[f"loss_{name}"] = losses[name].detach()
        total = torch.stack(terms).sum()
        logged["loss"] = total.detach()
        # One device sync for all metrics instead of one `.item()` per entry.
        values = torch.stack(list(logged.values())).float().tolist()
        return total, dict(zip(logged, values, strict=True))
