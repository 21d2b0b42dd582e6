"""`TowerEnsemble`: K independent `SeqRecModel` towers behind the one-network interface.

A deep ensemble (Lakshminarayanan et al. 2017) of K towers, each the whole network with its
own initialisation and dropout masks, each trained on its own interest loss
(`Recommender.loss`), with interest logits averaged at inference. For dot-product towers the
average is itself one dot product over concatenated vectors, so the ensemble presents exactly
the interface of one `SeqRecModel` of width K * D and nothing downstream (evaluation, the
serving export, ANN retrieval, the relevance and diversity heads, the RL world) changes:

    mean_k (h_k . e_k) = (h_1 | ... | h_K) / sqrt(K) . (e_1 | ... | e_K) / sqrt(K)

`towers_of` cuts such a concatenated state or table back into the K towers' own vectors
(undoing the 1 / sqrt(K)), which is what the per-tower training loss needs. Why an ensemble:
on Beauty a wider single network overfits sooner (bench/README.md, "Relevance search"),
while independent towers spend the same extra compute on averaging out seed variance.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rec.data.batch import Batch
from rec.model import DataDims, ModelConfig, SeqRecModel


class TowerEnsemble(nn.Module):
    """K = `cfg.members` towers; states and item vectors are the towers' concatenated / sqrt(K)."""

    def __init__(self, cfg: ModelConfig, dims: DataDims, item_categories: torch.Tensor) -> None:
        super().__init__()
        if cfg.members < 2:
            raise ValueError(f"TowerEnsemble needs model.members >= 2, got {cfg.members!r}")
        self.cfg, self.dims = cfg, dims
        self.register_buffer("item_categories", item_categories.to(torch.long))
        # Built one after another from the same RNG stream: every tower starts elsewhere.
        self.towers = nn.ModuleList(
            SeqRecModel(cfg, dims, self.item_categories, persistent=False)
            for _ in range(cfg.members)
        )
        self.scale = 1.0 / math.sqrt(cfg.members)

    @property
    def hidden_size(self) -> int:
        return sum(t.hidden_size for t in self.towers)

    def item_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        """Item indices `(...)` -> `(..., K * D)`: the towers' item vectors, concatenated."""
        return torch.cat([t.item_vectors(idx) for t in self.towers], dim=-1) * self.scale

    def item_embeddings(self) -> torch.Tensor:
        """The full output table `(n_items + 1, K * D)`; row 0 is padding (zeros)."""
        return torch.cat([t.item_embeddings() for t in self.towers], dim=-1) * self.scale

    def forward(self, batch: Batch, item_table: torch.Tensor | None = None) -> torch.Tensor:
        """`Batch` -> `(B, T, K * D)`; item_table: `item_embeddings()` when the caller has it."""
        tables = self.towers_of(item_table) if item_table is not None else [None] * len(self.towers)
        states = [t(batch, table) for t, table in zip(self.towers, tables, strict=True)]
        return torch.cat(states, dim=-1) * self.scale  # (B, T, K * D)

    def towers_of(self, x: torch.Tensor) -> list[torch.Tensor]:
        """A concatenated state or table `(..., K * D)` -> the K towers' own `(..., D)`."""
        return [part / self.scale for part in x.chunk(len(self.towers), dim=-1)]


def build_network(cfg: ModelConfig, dims: DataDims, item_categories: torch.Tensor) -> nn.Module:
    """One `SeqRecModel`, or a `TowerEnsemble` of `cfg.members` of them."""
    if cfg.members > 1:
        return TowerEnsemble(cfg, dims, item_categories)
    return SeqRecModel(cfg, dims, item_categories)
