"""The sequential recommender's network: a causal Llama backbone over item-event embeddings.

`SeqRecModel` turns a left-padded `Batch` into hidden states `(B, T, D)`; task heads and
losses live in `rec.heads`, the `Recommender` that holds network, heads and losses in
`rec.recommender`, the serving export in `rec.export`. The backbone is built from a
`transformers.LlamaConfig` (no hub download) and fed `inputs_embeds`:

    x_t = item_t + mean(categories of item_t) + behavior_t + position_t (+ time gap_t)

(the category, behavior and time-gap terms can each be switched off: `use_categories`,
`use_behaviors`, `use_time_gaps`, for the ablations.)

The output layer is tied to the input item table: interest logits are `h @ item_embeddings().T`.

    model = SeqRecModel(ModelConfig(size="tiny"), DataDims(n_items=12000, n_categories=300),
                        item_categories)  # (n_items + 1, C) int64, 0 = no category
    h = model(batch)  # (B, T, D)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaModel

from rec.data.batch import N_GAP_TOKENS, Batch
from rec.data.schema import N_BEHAVIOR_TOKENS
from rec.layers import attach_freq_mix, attach_residual_dropout

INIT_STD = 0.02  # GPT-2 / Llama default; keeps the tied output logits small at start


@dataclass(frozen=True)
class SizePreset:
    """Backbone shape for one `ModelConfig.size`."""

    hidden_size: int  # model width D
    n_layers: int  # decoder layers
    n_heads: int  # attention heads (head dim = hidden_size / n_heads)
    ffn_size: int  # Llama (SwiGLU) MLP inner width


SIZE_PRESETS: dict[str, SizePreset] = {
    # ~1M parameters with a 12k-item table: the item table dominates, CPU smoke runs.
    "tiny": SizePreset(hidden_size=64, n_layers=2, n_heads=2, ffn_size=256),
    # ~2.8M with 12k items: the CPU default for Amazon Beauty.
    "small": SizePreset(hidden_size=128, n_layers=4, n_heads=4, ffn_size=512),
    # ~41M with 12k items: one GPU.
    "base": SizePreset(hidden_size=512, n_layers=8, n_heads=8, ffn_size=2048),
    # ~1.17B with 12k items, TinyLlama-shaped (no grouped-query attention): DeepSpeed ZeRO.
    "large": SizePreset(hidden_size=2048, n_layers=22, n_heads=16, ffn_size=5632),
}


@dataclass
class LossWeights:
    """Static weight per task; 0 switches a task off (its head is still built and exported)."""

    interest: float = 1.0  # next-item softmax
    relevance: float = 0.5  # P(strong engagement) BCE
    diversity: float = 0.2  # P(next item opens a new category) BCE
    contrastive: float = 0.0  # two dropout views of a sequence agree (rec.heads.contrastive_loss)
    # The interest softmax also scores the items 2..`future_steps` events ahead (full softmax
    # only; rec.heads.future_loss): dense targets for short, loosely ordered sequences.
    future: float = 0.0
    # The next item's attributes (categories, brand) predicted from h_t over the category
    # table (rec.heads.attribute_loss; S3-Rec's associated-attribute task, causal).
    attributes: float = 0.0


@dataclass
class ModelConfig:
    """Everything that shapes the network and its losses (data sizes live in `DataDims`)."""

    size: Literal["tiny", "small", "base", "large"] = "tiny"  # backbone preset, see SIZE_PRESETS
    hidden_size: int | None = None  # None: the preset's width
    n_layers: int | None = None  # None: the preset's depth
    n_heads: int | None = None  # None: the preset's head count
    ffn_size: int | None = None  # None: the preset's MLP width
    max_len: int = 50  # longest input sequence; sizes the learned position table
    dropout: float = 0.1  # on input embeddings and attention probabilities
    use_time_gaps: bool = True  # add the log2 time-gap token embedding to each event
    # Item vectors include the mean of the item's category embeddings (inputs and the tied
    # output table). False: item id only (the ablation of the category input).
    use_categories: bool = True
    use_behaviors: bool = True  # add the behavior token embedding (pv/cart/fav/buy, ratings)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"  # HF attention
    # Softmax over all items, sampled, or "auto": sampled from `sampled_above_items` items up,
    # where a full (positions x items) logit matrix per step stops fitting (resolve_interest_loss).
    interest_loss: Literal["full", "sampled", "auto"] = "full"
    sampled_above_items: int = 100_000  # the "auto" threshold (catalogue size, padding excluded)
    n_negatives: int = 1024  # "sampled": negatives shared across the batch (logQ-corrected)
    temperature: float = 1.0  # interest logits are h . e / temperature
    label_smoothing: float = 0.0  # full softmax only: target mass spread over all items
    contrastive_temperature: float = 1.0  # loss_weights.contrastive > 0: cosine / this
    future_steps: int = 3  # loss_weights.future > 0: targets 2..this many events ahead
    relevance_mode: Literal["auto", "graded", "sampled"] = "auto"  # auto: graded iff engaged data
    relevance_negatives: int = 1  # relevance "sampled": random negatives per positive
    diversity_window: int = 10  # "new category" = not among the last this many input items
    # Learn one logit added to the interest score of items already in the sequence (repeat
    # consumption): the data sets its sign (Beauty, which has no repeats: far below 0, history
    # items all but excluded; repeating sequences: > 0).
    repeat_bias: bool = True
    # r = repeat_scale * a raw parameter: Adam moves r this many times faster (why: Recommender).
    repeat_scale: float = 10.0
    loss_weights: LossWeights = field(default_factory=LossWeights)  # per-task weights
    uncertainty_weighting: bool = False  # learn log sigma^2 per task (Kendall et al. 2018)
    # The relevance and diversity heads learn from detached hidden states and item vectors: their
    # losses train the heads only, never the backbone or the item table (the interest head
    # alone shapes them; on Beauty the auxiliary losses cost the interest head ~5 % NDCG).
    aux_detach: bool = False
    # Causal BSARec-style mix in every layer (rec/layers.py): attention output weighted 1 - a,
    # a low-pass (mean of the last `freq_window` events) + learned high-pass branch a. 0: off.
    freq_mix: float = 0.0
    freq_window: int = 5  # events in the causal low-pass window (freq_mix > 0)
    # Dropout on each layer's attention and MLP outputs before the residual add (rec/layers.py:
    # ResidualDropout; SASRec's placement). 0: off, Llama's own behaviour.
    residual_dropout: float = 0.0
    # Independent towers (a deep ensemble in one model, rec/ensemble.py): each tower is this
    # whole network with its own initialisation and dropout, trained on its own interest loss;
    # their interest logits are averaged. 1: one network (SeqRecModel itself).
    members: int = 1
    # members > 1: each tower learns from its own batch order (rec.data.batch.tower_batches), as
    # separate runs would, not all from one; the heads learn from tower 0's, on detached states.
    tower_orders: bool = False
    # Per-tower recipes: tower k takes values[k % len(values)] ([0.0, 0.3]: plain and
    # regularised towers alternate; members=1 takes values[0]); empty: residual_dropout and
    # train.weight_decay. Towers regularised differently err differently, and their mean gains
    # more than same-recipe towers' (bench/README.md "Relevance search", session 13).
    tower_residual_dropout: list[float] = field(default_factory=list)
    tower_weight_decay: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.size not in SIZE_PRESETS:
            raise ValueError(f"model.size={self.size!r} is not one of {list(SIZE_PRESETS)}")
        for name in ("hidden_size", "n_layers", "n_heads", "ffn_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"model.{name} must be >= 1 or null, got {value!r}")
        arch = self.architecture()
        if arch.hidden_size % arch.n_heads:
            raise ValueError(
                f"model.hidden_size={arch.hidden_size!r} is not divisible by "
                f"model.n_heads={arch.n_heads!r}"
            )
        names = ("max_len", "n_negatives", "relevance_negatives", "diversity_window")
        for name in (*names, "future_steps", "members", "sampled_above_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.freq_mix <= 1.0:
            raise ValueError(f"model.freq_mix must be in [0, 1], got {self.freq_mix!r}")
        if not 0.0 <= self.residual_dropout < 1.0:
            raise ValueError(
                f"model.residual_dropout must be in [0, 1), got {self.residual_dropout!r}"
            )
        if self.freq_window < 1:
            raise ValueError(f"model.freq_window must be >= 1, got {self.freq_window!r}")
        for name in ("temperature", "contrastive_temperature", "repeat_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be > 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(
                f"model.label_smoothing must be in [0, 1), got {self.label_smoothing!r}"
            )
        self._check_tasks()
        self._check_towers()

    def _check_tasks(self) -> None:
        """The loss weights, and the options that need particular tasks on or off."""
        weights = self.loss_weights
        for name in ("interest", "relevance", "diversity", "contrastive", "future", "attributes"):
            if getattr(weights, name) < 0:
                raise ValueError(f"model.loss_weights.{name} must be >= 0")
        if weights.future > 0 and (self.future_steps < 2 or weights.interest <= 0):
            raise ValueError(
                "model.loss_weights.future > 0 needs model.future_steps >= 2 and the interest "
                f"task on, got future_steps={self.future_steps!r}"
            )
        if weights.attributes > 0 and (not self.use_categories or self.members > 1):
            raise ValueError(
                "model.loss_weights.attributes > 0 needs model.use_categories=true and "
                f"model.members=1, got members={self.members!r}"
            )
        others = {k: getattr(weights, k) for k in ("future", "contrastive", "attributes")}
        if self.tower_orders and (self.members < 2 or not self.aux_detach or any(others.values())):
            raise ValueError(
                "model.tower_orders needs model.members >= 2, model.aux_detach=true and the "
                f"loss weights future, contrastive, attributes at 0; got members={self.members}"
                f", aux_detach={self.aux_detach}, {others}"
            )

    def _check_towers(self) -> None:
        """Per-tower lists: each value valid (values beyond model.members go unused)."""
        lists = {"tower_residual_dropout": (0.0, 1.0), "tower_weight_decay": (0.0, float("inf"))}
        for name, (lo, hi) in lists.items():
            values = getattr(self, name)
            if any(not lo <= v < hi for v in values):
                raise ValueError(f"model.{name} values must be in [{lo}, {hi}), got {values!r}")

    def tower_value(self, name: str, k: int, default: float) -> float:
        """Tower k's value of the per-tower list `name` (cycled), or `default` if it is empty."""
        values = getattr(self, name)
        return values[k % len(values)] if values else default

    def architecture(self) -> SizePreset:
        """The preset for `size` with the non-null overrides applied."""
        preset = SIZE_PRESETS[self.size]
        return SizePreset(
            hidden_size=self.hidden_size or preset.hidden_size,
            n_layers=self.n_layers or preset.n_layers,
            n_heads=self.n_heads or preset.n_heads,
            ffn_size=self.ffn_size or preset.ffn_size,
        )


@dataclass
class DataDims:
    """Data-dependent sizes the network is built with; exported next to the weights."""

    n_items: int  # item vocabulary size without padding (indices 1..n_items)
    n_categories: int  # category vocabulary size without padding (indices 1..n_categories)
    n_behaviors: int = N_BEHAVIOR_TOKENS  # behavior tokens including padding 0
    n_gaps: int = N_GAP_TOKENS  # time-gap tokens including padding 0
    has_engaged: bool = True  # training data has engaged behaviors (resolves relevance "auto")

    def __post_init__(self) -> None:
        for name in ("n_items", "n_categories", "n_behaviors", "n_gaps"):
            if getattr(self, name) < 1:
                raise ValueError(f"data dims: {name} must be >= 1, got {getattr(self, name)!r}")


def resolve_relevance_mode(cfg: ModelConfig, dims: DataDims) -> Literal["graded", "sampled"]:
    """Relevance mode "auto" -> "graded" if the data has engaged behaviors, else "sampled"."""
    if cfg.relevance_mode != "auto":
        return cfg.relevance_mode
    return "graded" if dims.has_engaged else "sampled"


def resolve_interest_loss(cfg: ModelConfig, dims: DataDims) -> Literal["full", "sampled"]:
    """Interest loss "auto" -> "sampled" (logQ-corrected) iff n_items >= sampled_above_items.

    Full softmax materialises (positions x n_items) logits every step: 3,200 positions x 100k
    items are 1.3 GB in fp32, before their gradient; sampled softmax costs (positions x K).
    """
    if cfg.interest_loss != "auto":
        return cfg.interest_loss
    return "sampled" if dims.n_items >= cfg.sampled_above_items else "full"


def llama_config(cfg: ModelConfig) -> LlamaConfig:
    """The backbone's HF config. vocab_size=1: we feed `inputs_embeds`, tokens are unused."""
    arch = cfg.architecture()
    return LlamaConfig(
        vocab_size=1,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.ffn_size,
        num_hidden_layers=arch.n_layers,
        num_attention_heads=arch.n_heads,
        num_key_value_heads=arch.n_heads,
        max_position_embeddings=cfg.max_len,
        attention_dropout=cfg.dropout,
        initializer_range=INIT_STD,
        rms_norm_eps=1e-6,
        use_cache=False,
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation=cfg.attn_implementation,
    )


class SeqRecModel(nn.Module):
    """Left-padded event sequences -> causal hidden states `(B, T, D)` after a final RMSNorm."""

    def __init__(
        self,
        cfg: ModelConfig,
        dims: DataDims,
        item_categories: torch.Tensor,
        persistent: bool = True,
    ) -> None:
        """persistent=False: `item_categories` stays out of the state dict (an ensemble's
        towers share their owner's table, rec/ensemble.py)."""
        super().__init__()
        expected = dims.n_items + 1
        shape = tuple(item_categories.shape)
        if item_categories.dim() != 2 or shape[0] != expected:
            raise ValueError(f"item_categories must have shape ({expected}, C), got {shape}")
        self.cfg, self.dims = cfg, dims
        d = cfg.architecture().hidden_size
        # (n_items + 1, C) int64: category indices per item, 0 = none; saved with the weights
        # because serving needs the same item table.
        self.register_buffer(
            "item_categories", item_categories.to(torch.long), persistent=persistent
        )
        self.item_emb = nn.Embedding(dims.n_items + 1, d, padding_idx=0)
        # mode="mean" with padding_idx averages only an item's real categories (none -> zeros).
        # Tables an ablation switches off are not built: ZeRO wants no unused parameters.
        self.category_emb = (
            nn.EmbeddingBag(dims.n_categories + 1, d, mode="mean", padding_idx=0)
            if cfg.use_categories
            else None
        )
        self.behavior_emb = (
            nn.Embedding(dims.n_behaviors, d, padding_idx=0) if cfg.use_behaviors else None
        )
        self.position_emb = nn.Embedding(cfg.max_len + 1, d, padding_idx=0)
        self.gap_emb = nn.Embedding(dims.n_gaps, d, padding_idx=0) if cfg.use_time_gaps else None
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.backbone = LlamaModel(llama_config(cfg))
        # Token embeddings are never used; dropping them keeps DDP/ZeRO free of unused params.
        self.backbone.embed_tokens = None
        self.freq_mix = (
            attach_freq_mix(self.backbone.layers, d, cfg.freq_mix, cfg.freq_window)
            if cfg.freq_mix > 0
            else None
        )
        self.residual_dropout = (
            attach_residual_dropout(self.backbone.layers, cfg.residual_dropout)
            if cfg.residual_dropout > 0
            else None
        )
        self._init_embeddings()

    def _init_embeddings(self) -> None:
        tables = (self.item_emb, self.category_emb, self.behavior_emb, self.position_emb)
        for emb in (*tables, self.gap_emb):
            if emb is None:
                continue
            nn.init.normal_(emb.weight, std=INIT_STD)
            with torch.no_grad():
                emb.weight[0].zero_()

    @property
    def hidden_size(self) -> int:
        return self.item_emb.embedding_dim

    def item_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        """Item indices `(...)` -> item vectors `(..., D)`: item row + mean category row.

        Index 0 (padding) maps to the zero vector. This is the only definition of an item's
        vector: inputs, tied output logits and the relevance head all use it.
        """
        vec = self.item_emb(idx.reshape(-1))  # (N, D)
        if self.category_emb is not None:
            vec = vec + self.category_emb(self.item_categories[idx.reshape(-1)])  # (N, D)
        return vec.reshape(*idx.shape, -1)  # (..., D)

    def item_embeddings(self) -> torch.Tensor:
        """The full output table `(n_items + 1, D)`; row 0 is padding (zeros)."""
        all_items = torch.arange(self.dims.n_items + 1, device=self.item_emb.weight.device)
        return self.item_vectors(all_items)  # (n_items + 1, D)

    def forward(self, batch: Batch, item_table: torch.Tensor | None = None) -> torch.Tensor:
        """`Batch` -> hidden states `(B, T, D)`; padding positions hold junk, mask them.

        Pass `item_table` (from `item_embeddings()`) when the caller needs the full table anyway
        (full softmax, scoring): inputs are then gathered from it instead of recomputed.
        """
        items = batch.items  # (B, T)
        if items.shape[1] > self.cfg.max_len:
            raise ValueError(f"sequence length {items.shape[1]} > model.max_len={self.cfg.max_len}")
        mask = items > 0  # (B, T)
        # Positions count real events from the first one, so extra left padding changes nothing.
        positions = mask.long().cumsum(dim=1) * mask  # (B, T), 0 on padding
        gathered = item_table is not None
        x = F.embedding(items, item_table) if gathered else self.item_vectors(items)  # (B, T, D)
        x = x + self.position_emb(positions)  # (B, T, D)
        if self.behavior_emb is not None:
            x = x + self.behavior_emb(batch.behaviors)  # (B, T, D)
        if self.gap_emb is not None:
            x = x + self.gap_emb(batch.gaps)  # (B, T, D)
        x = self.input_dropout(x)  # (B, T, D)
        out = self.backbone(
            inputs_embeds=x,
            attention_mask=mask.long(),
            position_ids=(positions - 1).clamp(min=0),  # RoPE wants 0-based
        )
        return out.last_hidden_state  # (B, T, D)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (works on meta-device models, nothing is allocated)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
