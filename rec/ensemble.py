"""`TowerEnsemble`: K independent `SeqRecModel` towers behind the one-network interface.

A deep ensemble (Lakshminarayanan et al. 2017) of K towers, each the whole network with its
own initialisation and dropout masks, each trained on its own interest loss
(`Recommender.loss`), with interest logits averaged at inference. For dot-product towers the
average is itself one dot product over concatenated vectors, so the ensemble presents exactly
the interface of one `SeqRecModel` of width K * D and nothing downstream (evaluation, the
serving export, ANN retrieval, the relevance and diversity heads, the RL world) changes:

    mean_k (h_k . e_k) = (h_1 | ... | h_K) / sqrt(K) . (e_1 | ... | e_K) / sqrt(K)

`towers_of` cuts such a concatenated state or table back into the K towers' own vectors
(undoing the 1 / sqrt(K)), which is what the per-tower training loss needs. Towers may each
take their own regularisation (`model.tower_residual_dropout`, `model.tower_weight_decay`:
towers trained to different recipes err differently), and the job clips the ensemble so that
each tower is clipped as a lone network would be (`tower_clip`). Why an ensemble:
on Beauty a wider single network overfits sooner (bench/README.md, "Relevance search"),
while independent towers spend the same extra compute on averaging out seed variance.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from rec.data.batch import Batch
from rec.model import DataDims, ModelConfig, SeqRecModel, count_parameters


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
            SeqRecModel(_tower_cfg(cfg, k), dims, self.item_categories, persistent=False)
            for k in range(cfg.members)
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


def _tower_cfg(cfg: ModelConfig, k: int) -> ModelConfig:
    """Tower k's config: its own residual dropout (`model.tower_residual_dropout`)."""
    return replace(
        cfg, residual_dropout=cfg.tower_value("tower_residual_dropout", k, cfg.residual_dropout)
    )


def weight_decay_groups(model: nn.Module, params: list[nn.Parameter]) -> list:
    """`params` (those the optimizer owns) as AdamW groups: each tower's with its
    `model.tower_weight_decay`, the rest (heads, the repeat logit) in a group without its own
    decay, so the optimizer's `train.weight_decay` applies. No per-tower decay: `params` as is."""
    net = getattr(model, "model", model)  # a Recommender holds its network as .model
    if not net.cfg.tower_weight_decay:
        return params
    towers = list(net.towers) if isinstance(net, TowerEnsemble) else [net]
    owned = {id(p) for p in params}
    groups = [  # towers share no parameter (only the unsaved item_categories buffer)
        {
            "params": [p for p in tower.parameters() if id(p) in owned],
            "weight_decay": net.cfg.tower_value("tower_weight_decay", k, 0.0),
        }
        for k, tower in enumerate(towers)
    ]
    in_towers = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in params if id(p) not in in_towers]
    return [g for g in groups if g["params"]] + ([{"params": rest}] if rest else [])


def tower_clip(clip: float, members: int) -> float:
    """The global gradient-norm clip that clips each of K towers about as a lone network is
    clipped at `clip`. The loss is the towers' mean, so a tower's gradient is 1/K of its own and
    the global norm over K like towers sqrt(K)/K of one tower's: clipped at `clip` it would leave
    the towers unclipped where lone networks are clipped (Beauty: a trained network's norm is
    ~1.6 against a clip of 1). Above the clip, a tower's step is then a lone network's / K, which
    Adam does not see."""
    return clip / math.sqrt(members) if clip > 0 else clip


def build_network(cfg: ModelConfig, dims: DataDims, item_categories: torch.Tensor) -> nn.Module:
    """One `SeqRecModel`, or a `TowerEnsemble` of `cfg.members` of them."""
    if cfg.members > 1:
        return TowerEnsemble(cfg, dims, item_categories)
    return SeqRecModel(_tower_cfg(cfg, 0), dims, item_categories)


def _millions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def model_summary(model: nn.Module, total: nn.Module | None = None) -> str:
    """One line for the trainer's log: shape, data sizes, parameter counts (an ensemble's:
    its first tower's shape, counts summed over the towers)."""
    towers = list(getattr(model, "towers", [model]))
    total = total if total is not None else model
    model = towers[0]
    arch, dims = model.cfg.architecture(), model.dims
    n_total = count_parameters(total)
    n_backbone = sum(count_parameters(t.backbone) for t in towers)
    cats = model.category_emb
    n_items = len(towers) * (
        model.item_emb.weight.numel() + (cats.weight.numel() if cats is not None else 0)
    )
    return (
        f"SeqRecModel size={model.cfg.size} members={len(towers)} hidden={arch.hidden_size} "
        f"layers={arch.n_layers} "
        f"heads={arch.n_heads} ffn={arch.ffn_size} max_len={model.cfg.max_len} "
        f"items={dims.n_items} categories={dims.n_categories} params={_millions(n_total)} "
        f"(backbone {_millions(n_backbone)}, item+category tables {_millions(n_items)})"
    )
