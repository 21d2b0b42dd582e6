"""`Recommender`: one model, several roles, over the network of `rec.model`.

The wrapper holds the network (`SeqRecModel`, or K of them as a `rec.ensemble.TowerEnsemble`
with the same interface), the task heads and the losses of `rec.heads`:

    rec = build_recommender(cfg, load_item_tables("data/beauty"))
    total, metrics = rec(batch)       # training: the multi-task loss (what DeepSpeed calls)
    scores = rec.score_next(batch)    # evaluation: (B, n_items + 1) next-item logits
    h = rec.user_embedding(batch)     # serving, stage by stage on the same weights:
    logits = rec.next_item_scores(h, batch.items, rec.item_table())     # retrieval
    rel, div = rec.relevance_logits(h, vecs), rec.diversity_logits(h)  # ranking

Inference reads the last position of each (left-padded) sequence; with `h` that state and
`e_i` the item vector of item i (`SeqRecModel.item_vectors`):

    interest   s_i = h . e_i / tau + r [i in the input]   (r: the learned repeat logit, 0 if off)
    relevance  P(strong engagement with c) = sigmoid(MLP([h, e_c, h * e_c]))
    diversity  P(the next item opens a new category) = sigmoid(MLP(h))

`score_next`, `relevance` and `diversity` take a batch; the `*_logits` / `next_item_scores`
methods take `h` and precomputed item vectors so serving can cache the item table and split
retrieval from ranking without re-implementing any of this.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from rec.data.batch import Batch, trim_padding
from rec.data.schema import ENGAGED_TOKENS
from rec.data.splits import ItemTables
from rec.ensemble import build_network
from rec.heads import (
    DiversityHead,
    MultiTaskLoss,
    RelevanceHead,
    attribute_loss,
    causal_history,
    contrastive_loss,
    diversity_targets,
    future_loss,
    future_targets,
    in_history,
    interest_full_logits,
    interest_sampled_loss,
    relevance_sampled_loss,
)
from rec.model import (
    DataDims,
    ModelConfig,
    resolve_interest_loss,
    resolve_relevance_mode,
)


class Recommender(nn.Module):
    """One model, several roles: `loss` for training, the rest for eval and serving.

    Inference methods run under `torch.no_grad()`; call `.eval()` first to switch dropout off.
    """

    def __init__(self, cfg: ModelConfig, dims: DataDims, item_categories: torch.Tensor) -> None:
        super().__init__()
        self.cfg, self.dims = cfg, dims
        self.model = build_network(cfg, dims, item_categories)  # one network or K towers
        d = self.model.hidden_size
        self.relevance_head = RelevanceHead(d)
        self.diversity_head = DiversityHead(d)
        self.multitask = MultiTaskLoss(
            dataclasses.asdict(cfg.loss_weights), cfg.uncertainty_weighting
        )
        self.relevance_mode = resolve_relevance_mode(cfg, dims)
        self.interest_loss = resolve_interest_loss(cfg, dims)  # "auto" -> by catalogue size
        if (cfg.loss_weights.future > 0 or cfg.members > 1) and self.interest_loss != "full":
            raise ValueError(
                "model.loss_weights.future and model.members > 1 need the full softmax; this "
                f"catalogue resolves model.interest_loss={cfg.interest_loss!r} to "
                f"{self.interest_loss!r}"
            )
        # The repeat-consumption logit r = repeat_scale * repeat_raw (rec.heads docstring);
        # starts neutral. Shape (1,), not (): DeepSpeed cannot broadcast 0-dim parameters.
        self.repeat_raw = nn.Parameter(torch.zeros(1)) if cfg.repeat_bias else None
        engaged = torch.zeros(dims.n_behaviors, dtype=torch.bool)  # (n_behaviors,)
        engaged[[t for t in ENGAGED_TOKENS if t < dims.n_behaviors]] = True
        # Derived from code or data at train time, so kept out of checkpoints and exports.
        self.register_buffer("engaged", engaged, persistent=False)
        self.register_buffer("log_q", torch.zeros(dims.n_items + 1), persistent=False)
        self.set_proposal(torch.zeros(dims.n_items + 1))

    @property
    def repeat_logit(self) -> torch.Tensor | None:
        """The learned repeat logit r `(1,)`, or None when `model.repeat_bias` is off.

        Why a scaled parameter: Adam moves a parameter about lr per step whatever its gradient,
        so a bare scalar can travel only ~sum(lr) over a run (~2.5 for beauty.yaml's 2,200
        steps): on Beauty, which has no repeats at all, r stalled at -2.5 and history items kept
        outranking the target under `test.*`. r = repeat_scale * raw travels repeat_scale
        times as far, while every other weight keeps its step size.
        """
        return None if self.repeat_raw is None else self.repeat_raw * self.cfg.repeat_scale

    @torch.no_grad()
    def set_repeat_logit(self, value: float) -> None:
        """Set r itself (tests, what-if scoring); raises when the model has no repeat logit."""
        if self.repeat_raw is None:
            raise ValueError("this model has no repeat logit (model.repeat_bias is false)")
        self.repeat_raw.fill_(value / self.cfg.repeat_scale)

    def set_proposal(self, counts: torch.Tensor, power: float = 1.0) -> None:
        """Sampled-softmax proposal q(i) proportional to (counts[i] + 1) ** power, i >= 1.

        counts: (n_items + 1,) training-set frequency per item (zeros give uniform). The +1
        keeps every item sampleable so log q is finite for every target.
        """
        if counts.shape != (self.dims.n_items + 1,):
            raise ValueError(
                f"counts must have shape ({self.dims.n_items + 1},), got {counts.shape}"
            )
        weights = (counts.double().clamp(min=0) + 1.0) ** power  # (N + 1,)
        weights[0] = 0.0  # padding is never a negative
        q = weights / weights.sum()  # (N + 1,)
        self.log_q.copy_(q.log().float())

    # -- training ---------------------------------------------------------------------------

    def forward(self, batch: Batch | list[Batch]) -> tuple[torch.Tensor, dict[str, float]]:
        """The training role (what DeepSpeed's engine calls): `loss(batch)`."""
        return self.loss(batch)

    def loss(self, batch: Batch | list[Batch]) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss on a batch: (total scalar, {"loss", "loss_<task>", ...} floats).

        A list of `model.members` batches (`model.tower_orders`): each tower of the ensemble
        learns its interest softmax from its own batch (`_tower_batches_losses`)."""
        if not isinstance(batch, Batch):
            return self.multitask(self._tower_batches_losses(batch))
        batch = trim_padding(batch)
        mask = batch.targets > 0  # (B, T)
        if not bool(mask.any()):
            raise ValueError("batch has no targets (targets are all 0)")
        weights = self.cfg.loss_weights
        full = self.interest_loss == "full" and weights.interest > 0
        table = self.model.item_embeddings() if full else None  # (N + 1, D), once per step
        states = self.model(batch, table)  # (B, T, D)
        h = states[mask]  # (P, D)
        targets = batch.targets[mask]  # (P,)
        if table is not None:
            target_vecs = F.embedding(targets, table)  # (P, D)
        else:
            target_vecs = self.model.item_vectors(targets)  # (P, D)
        losses: dict[str, torch.Tensor] = {}
        if weights.interest > 0:
            history = causal_history(batch.items, mask) if self.repeat_logit is not None else None
            if table is not None:
                ahead = (
                    future_targets(batch.targets, self.cfg.future_steps)[mask]  # (P, K)
                    if weights.future > 0
                    else None
                )
                losses |= self._full_interest_losses(h, table, targets, history, ahead)
            else:
                losses["interest"] = self._interest_loss(h, target_vecs, targets, history)
        if weights.attributes > 0:  # shapes the backbone and the category table, like interest
            wanted = self.model.item_categories[targets]  # (P, C)
            losses["attributes"] = attribute_loss(h, self.model.category_emb.weight, wanted)
        if weights.contrastive > 0:  # a second view: the same batch under fresh dropout
            view = self.model(batch, table)[:, -1]  # (B, D), last position (left padding)
            losses["contrastive"] = contrastive_loss(
                states[:, -1], view, self.cfg.contrastive_temperature
            )
        if self.cfg.aux_detach:  # the auxiliary heads read the states; gradients stop here
            h, target_vecs = h.detach(), target_vecs.detach()
        return self.multitask(losses | self._head_losses(batch, mask, h, target_vecs))

    def _head_losses(
        self, batch: Batch, mask: torch.Tensor, h: torch.Tensor, target_vecs: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The relevance and diversity heads' losses at the batch's target positions `mask`
        (B, T): h (P, D) the states there, target_vecs (P, D) the targets' item vectors."""
        weights, targets, losses = self.cfg.loss_weights, batch.targets[mask], {}
        if weights.relevance > 0:
            behaviors = batch.target_behaviors[mask]  # (P,)
            losses["relevance"] = self._relevance_loss(h, target_vecs, targets, behaviors)
        if weights.diversity > 0:
            labels = diversity_targets(
                batch.items, batch.targets, self.model.item_categories, self.cfg.diversity_window
            )[mask]  # (P,)
            logits = self.diversity_head(h)  # (P,)
            losses["diversity"] = F.binary_cross_entropy_with_logits(logits, labels)
        return losses

    def _tower_batches_losses(self, batches: list[Batch]) -> dict[str, torch.Tensor]:
        """One batch per tower: tower k's interest softmax on batches[k], so the towers see
        the data in K independent orders, as separately seeded runs would (without it they
        share every batch and differ only in initialisation and dropout). The heads learn
        from batches[0], on the detached states of every tower (`model.aux_detach`, required).
        The towers' interest losses are averaged, as on one shared batch."""
        if len(batches) != self.cfg.members or self.cfg.members < 2:
            raise ValueError(
                f"{len(batches)} batches for model.members={self.cfg.members}: per-tower "
                "batches need an ensemble (members >= 2) and one batch per tower"
            )
        table = self.model.item_embeddings()  # (N + 1, K * D), once per step
        terms = []
        for tower, own, table_k in zip(
            self.model.towers, batches, self.model.towers_of(table), strict=True
        ):
            own = trim_padding(own)
            mask = own.targets > 0  # (B, T)
            if not bool(mask.any()):
                raise ValueError("batch has no targets (targets are all 0)")
            h = tower(own, table_k)[mask]  # (P, D)
            history = causal_history(own.items, mask) if self.repeat_logit is not None else None
            logits = interest_full_logits(
                h, table_k, self.cfg.temperature, history, self.repeat_logit
            )  # (P, N)
            targets = own.targets[mask] - 1
            terms.append(F.cross_entropy(logits, targets, label_smoothing=self.cfg.label_smoothing))
        losses = {"interest": torch.stack(terms).mean()}
        first = trim_padding(batches[0])
        mask = first.targets > 0
        with torch.no_grad():  # the heads' input: every tower's state, gradients stopped
            h = self.model(first, table.detach())[mask]  # (P, K * D)
            target_vecs = F.embedding(first.targets[mask], table.detach())  # (P, K * D)
        return losses | self._head_losses(first, mask, h, target_vecs)

    def _full_interest_losses(
        self,
        h: torch.Tensor,
        table: torch.Tensor,
        targets: torch.Tensor,
        history: torch.Tensor | None,
        ahead: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Full-softmax interest (and future) losses, each the mean over the towers of an
        ensemble (rec/ensemble.py: every tower learns on its own softmax), or of the one
        network. h: (P, D), table: (N + 1, D) as the network returns them."""
        if self.cfg.members > 1:
            pairs = zip(self.model.towers_of(h), self.model.towers_of(table), strict=True)
        else:
            pairs = [(h, table)]
        out: dict[str, list[torch.Tensor]] = {"interest": [], "future": []}
        for h_k, table_k in pairs:
            logits = interest_full_logits(
                h_k, table_k, self.cfg.temperature, history, self.repeat_logit
            )  # (P, N)
            out["interest"].append(
                F.cross_entropy(logits, targets - 1, label_smoothing=self.cfg.label_smoothing)
            )
            if ahead is not None:
                out["future"].append(future_loss(logits, ahead))
        return {name: torch.stack(terms).mean() for name, terms in out.items() if terms}

    def _interest_loss(
        self,
        h: torch.Tensor,
        target_vecs: torch.Tensor,
        targets: torch.Tensor,
        history: torch.Tensor | None,
    ) -> torch.Tensor:
        """The sampled-softmax interest loss (the full softmax is computed in `loss`)."""
        neg_ids = torch.multinomial(self.log_q.exp(), self.cfg.n_negatives, replacement=True)
        neg_vecs = self.model.item_vectors(neg_ids)  # (K, D)
        return interest_sampled_loss(
            h,
            target_vecs,
            targets,
            neg_ids,
            neg_vecs,
            self.log_q,
            self.cfg.temperature,
            history,
            self.repeat_logit,
        )

    def _relevance_loss(
        self,
        h: torch.Tensor,
        target_vecs: torch.Tensor,
        targets: torch.Tensor,
        behaviors: torch.Tensor,
    ) -> torch.Tensor:
        pos_logits = self.relevance_head(h, target_vecs)  # (P,)
        if self.relevance_mode == "graded":
            labels = self.engaged[behaviors].float()  # (P,)
            return F.binary_cross_entropy_with_logits(pos_logits, labels)
        shape = (len(targets), self.cfg.relevance_negatives)
        neg_ids = torch.randint(1, self.dims.n_items + 1, shape, device=h.device)  # (P, K)
        neg_vecs = self.model.item_vectors(neg_ids)  # (P, K, D)
        if self.cfg.aux_detach:
            neg_vecs = neg_vecs.detach()
        neg_logits = self.relevance_head(h.unsqueeze(1).expand_as(neg_vecs), neg_vecs)  # (P, K)
        return relevance_sampled_loss(pos_logits, neg_logits, neg_ids != targets.unsqueeze(1))

    # -- inference on a batch (evaluation) ---------------------------------------------------

    @torch.no_grad()
    def score_next(self, batch: Batch) -> torch.Tensor:
        """Next-item scores `(B, n_items + 1)` at the last position; column 0 is -inf."""
        table = self.item_table()  # (N + 1, D)
        return self.next_item_scores(self.user_embedding(batch, table), batch.items, table)

    @torch.no_grad()
    def relevance(self, batch: Batch, candidates: torch.Tensor) -> torch.Tensor:
        """P(strong engagement) `(B, N)` for candidate items `(B, N)` at the last position."""
        vecs = self.model.item_vectors(candidates)  # (B, N, D)
        return torch.sigmoid(self.relevance_logits(self.user_embedding(batch), vecs))

    @torch.no_grad()
    def diversity(self, batch: Batch) -> torch.Tensor:
        """P(the next item opens a new category) `(B,)` at the last position."""
        return torch.sigmoid(self.diversity_logits(self.user_embedding(batch)))  # (B,)

    # -- inference stage by stage (serving) --------------------------------------------------

    @torch.no_grad()
    def item_table(self) -> torch.Tensor:
        """Every item's vector `(n_items + 1, D)`; row 0 (padding) is zeros. Cache it to serve."""
        return self.model.item_embeddings()

    @torch.no_grad()
    def user_embedding(self, batch: Batch, table: torch.Tensor | None = None) -> torch.Tensor:
        """The last hidden state `h` `(B, D)`; table: `item_table()` if the caller has it."""
        return self.model(trim_padding(batch), table)[:, -1]  # (B, D)

    @torch.no_grad()
    def next_item_scores(
        self, h: torch.Tensor, items: torch.Tensor, table: torch.Tensor, lo: int = 0, hi=None
    ) -> torch.Tensor:
        """Interest logits `(B, hi - lo)` of items lo..hi-1 (default: all, `(B, n_items + 1)`):
        h . e_i / tau + r [i in items[b]]; column of item 0 -inf.

        h: (B, D) from `user_embedding`; items: (B, T) the input items (0 = padding), which get
        the learned repeat logit r; table: (n_items + 1, D) from `item_table()`. A range bounds
        the memory of one call on a large catalogue (rec/evaluation.py ranks chunk by chunk).
        """
        hi = len(table) if hi is None else hi
        scores = (h / self.cfg.temperature) @ table[lo:hi].T  # (B, hi - lo)
        if self.repeat_logit is not None:  # items of the input get the learned repeat logit
            inside = (items >= lo) & (items < hi)  # (B, T)
            cols = (items - lo).clamp(0, hi - lo - 1)
            seen = torch.zeros_like(scores).scatter_reduce_(
                1, cols, inside.to(scores.dtype), "amax"
            )
            scores = scores + self.repeat_logit * seen  # (B, hi - lo)
        if lo == 0:
            scores[:, 0] = float("-inf")
        return scores

    def next_item_scores_at(
        self, h: torch.Tensor, items: torch.Tensor, table: torch.Tensor, idx: torch.Tensor
    ) -> torch.Tensor:
        """`next_item_scores` of given items only: idx (B, M) item ids -> (B, M)."""
        scores = ((h / self.cfg.temperature).unsqueeze(1) * F.embedding(idx, table)).sum(-1)
        if self.repeat_logit is not None:
            scores = scores + self.repeat_logit * in_history(items, idx)
        return scores

    @torch.no_grad()
    def relevance_logits(self, h: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
        """Relevance-head logits `(B, N)` for user states h `(B, D)` and candidate item vectors
        vecs `(B, N, D)` (rows of `item_table()`); sigmoid gives P(strong engagement)."""
        return self.relevance_head(h.unsqueeze(1).expand_as(vecs), vecs)  # (B, N)

    @torch.no_grad()
    def diversity_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Diversity-head logits `(B,)` for user states h `(B, D)`; sigmoid gives P(new
        category next)."""
        return self.diversity_head(h)  # (B,)


def build_recommender(cfg: ModelConfig, tables: ItemTables) -> Recommender:
    """A fresh model sized for the prepared data, with the sampled-softmax proposal set."""
    dims = DataDims(
        n_items=tables.n_items,
        n_categories=tables.meta["n_categories"],
        has_engaged=tables.meta["has_engaged_behaviors"],
    )
    rec = Recommender(cfg, dims, torch.as_tensor(tables.categories))
    rec.set_proposal(torch.as_tensor(tables.train_counts))
    return rec
