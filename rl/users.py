"""The simulated user: per-user types drawn from logged behaviour, and a choice model over slates.

Kept apart from the env mechanics (`rl/env.py` decides what is shown; this module decides what
the user does with it).

Satiation is a level in [0, 1] per category (1 = fed up): an event of strength x closes that
fraction of the remaining gap, s <- 1 - (1 - s) * (1 - x) ** w, w the item's share of the
category (1 / its number of categories). Bounded, so `sensitivity` is the utility lost when fully
satiated, and a user who sees one category all session is not pushed to -inf. One slate:

1. exposure: every shown item satiates its categories with `shown_increment`, before the
   choice: a slate of near-duplicates is less appealing than its items alone.
2. clicks: a multinomial logit over the k items plus a no-click option (utility `no_click`),
   item utility

       v_j = preference * z_j - sensitivity * sat(j) + position_bias * log(1 / log2(pos_j + 2)),

   z_j the standardised ground-truth affinity, sat(j) the mean satiation of item j's categories,
   the last term the log examination probability of position pos_j = 0..k-1. After a click the
   item's categories satiate with `click_increment` (and `purchase_increment`), so the next
   choice in the same slate already sees it; the user goes on with `continue_prob`, up to
   `max_clicks` clicks. A click becomes a purchase with sigmoid(purchase_bias + slope * z_j).
3. recovery: satiation is multiplied by the user's `decay` (geometric recovery per slate).
4. leaving: with probability min(cap, base + increment * consecutive no-click slates).

User types: each user is focused (no satiation, strong preference, works through a slate:
relevance-first is best) or an explorer (strong satiation, flatter preference, one click and
on: needs diverse slates), with per-user lognormal jitter on sensitivity, decay and preference.
P(explorer) mixes the percentile of the user's logged exploration (category entropy and 1 -
mean category overlap of consecutive items) with a prior share, so explorers in the log tend
to be explorers in the simulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rl.config import ChoiceConfig, LeavingConfig, SatiationConfig, TypeConfig


@dataclass
class UserTypes:
    """Per-user type parameters, each (U,) float64."""

    explorer: np.ndarray  # 1.0 explorer, 0.0 focused
    sensitivity: np.ndarray  # utility lost at full satiation
    decay: np.ndarray  # satiation kept per slate
    preference: np.ndarray  # weight of the standardised affinity
    no_click: np.ndarray  # utility of the no-click option
    continue_prob: np.ndarray  # P(going on in the same slate after a click)

    def __post_init__(self) -> None:
        shape = np.shape(self.explorer)
        names = ("explorer", "sensitivity", "decay", "preference", "no_click", "continue_prob")
        for name in names:
            value = np.asarray(getattr(self, name), dtype=np.float64)
            if value.ndim != 1 or value.shape != shape:
                raise ValueError(f"UserTypes.{name} must have shape {shape}, got {value.shape}")
            setattr(self, name, value)


@dataclass
class Response:
    """What the user did with one slate of k items."""

    clicks: np.ndarray  # (k,) bool
    purchases: np.ndarray  # (k,) bool, a subset of clicks
    left: bool  # the user ends the session after this slate
    leave_prob: float  # the probability `left` was drawn with
    order: np.ndarray | None = None  # (c,) clicked slots in click order (None: slot order)


def category_weights(item_categories: np.ndarray) -> np.ndarray:
    """(n_items + 1, C) 0-padded category table -> (n_items + 1, C) float64 weights 1 / n_cats
    on each present category (an item's categories share one unit), 0 on padding."""
    present = item_categories > 0
    n = present.sum(1, keepdims=True)  # (n_items + 1, 1)
    return np.divide(present, n, out=np.zeros(present.shape), where=n > 0)


def history_exploration(
    history_items: np.ndarray, item_categories: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(U, L) item indices (0 = padding) -> (entropy, overlap), each (U,) float64 in [0, 1].

    entropy: Shannon entropy of the history's category distribution (each item's categories
    share its unit weight) over its maximum for that many category entries; 0 below 2 items.
    overlap: mean Jaccard overlap of the category sets of consecutive history items (a repeat
    rate that works for multi-category items); 0 below 2 items.
    """
    hist = np.asarray(history_items, dtype=np.int64)
    n_users = hist.shape[0]
    cats = item_categories[hist]  # (U, L, C)
    # Weights and key width from the gathered rows only (weights are row-wise): the whole
    # catalogue's would cost n_items x C floats per call, and serving calls this per request.
    weights = category_weights(cats.reshape(-1, cats.shape[-1])).reshape(cats.shape)
    width = int(cats.max(initial=0)) + 1  # keys user * width + category stay unique and sorted
    users = np.broadcast_to(np.arange(n_users)[:, None, None], cats.shape)
    keys, inverse = np.unique((users * width + cats)[cats > 0], return_inverse=True)
    mass = np.bincount(inverse, weights=weights[cats > 0])  # (n_keys,) per (user, category)
    total = np.bincount(keys // width, weights=mass, minlength=n_users)  # (U,) = items in history
    p = mass / total[keys // width]
    entropy = -np.bincount(keys // width, weights=p * np.log(p), minlength=n_users)
    entries = (cats > 0).sum((1, 2))  # (U,) max entropy = log(entries)
    norm = np.log(np.maximum(entries, 2))
    entropy = np.where(total >= 2, np.clip(entropy / norm, 0.0, 1.0), 0.0)
    return entropy, _consecutive_overlap(cats)


def _consecutive_overlap(cats: np.ndarray) -> np.ndarray:
    """(U, L, C) category ids -> (U,) mean Jaccard of consecutive non-padding items' sets."""
    a, b = cats[:, :-1], cats[:, 1:]  # (U, L - 1, C)
    inter = np.zeros(a.shape[:2])
    for c in range(cats.shape[2]):  # C is a handful: C^2 compares beat a one-hot over C_total
        inter += ((a[:, :, c : c + 1] == b) & (b > 0)).any(-1) & (a[:, :, c] > 0)
    union = (a > 0).sum(-1) + (b > 0).sum(-1) - inter  # (U, L - 1)
    valid = ((a > 0).any(-1) & (b > 0).any(-1)).astype(np.float64)
    jac = np.divide(inter, union, out=np.zeros(union.shape), where=union > 0)
    n = valid.sum(1)
    return np.divide((jac * valid).sum(1), n, out=np.zeros(len(n)), where=n > 0)


def draw_user_types(
    history_items: np.ndarray,
    item_categories: np.ndarray,
    cfg: TypeConfig,
    rng: np.random.Generator,
) -> UserTypes:
    """(U, L) histories -> `UserTypes`: P(explorer) = w * logged-exploration percentile +
    (1 - w) * explorer_share; parameters = the type's value * lognormal jitter."""
    entropy, overlap = history_exploration(history_items, item_categories)
    logged = 0.5 * entropy + 0.5 * (1.0 - overlap)  # (U,)
    # Percentile, not the raw value: datasets differ in category granularity, and the type
    # should say "more exploratory than most users of this log".
    ranks = np.argsort(np.argsort(logged, kind="stable"), kind="stable")
    pct = ranks / max(len(logged) - 1, 1)
    p_explorer = cfg.history_weight * pct + (1.0 - cfg.history_weight) * cfg.explorer_share
    explorer = rng.random(len(logged)) < p_explorer  # (U,) bool

    def pick(focused: float, explorer_value: float) -> np.ndarray:
        jitter = np.exp(cfg.param_noise * rng.standard_normal(len(logged)))
        return np.where(explorer, explorer_value, focused) * jitter

    return UserTypes(
        explorer=explorer.astype(np.float64),
        sensitivity=pick(cfg.sensitivity_focused, cfg.sensitivity_explorer),
        decay=np.clip(pick(cfg.decay_focused, cfg.decay_explorer), 0.0, 1.0),
        preference=pick(cfg.preference_focused, cfg.preference_explorer),
        no_click=np.where(explorer, cfg.no_click_explorer, cfg.no_click_focused),
        continue_prob=np.where(explorer, cfg.continue_explorer, cfg.continue_focused),
    )


class SimulatedUser:
    """One user's session state (category satiation, no-click streak) and choice model."""

    def __init__(
        self,
        n_categories: int,
        k: int,
        satiation: SatiationConfig,
        choice: ChoiceConfig,
        leaving: LeavingConfig,
    ) -> None:
        self.sat_cfg, self.choice_cfg, self.leave_cfg = satiation, choice, leaving
        self.n_categories = n_categories
        # Fraction of the remaining satiation gap left by one unit of each event.
        self._shown_keep = 1.0 - satiation.shown_increment
        self._click_keep = 1.0 - satiation.click_increment
        self._purchase_keep = 1.0 - satiation.purchase_increment
        # log examination probability per slot, 1 / log2(pos + 2) (DCG's discount)
        self.position_logit = -choice.position_bias * np.log(np.log2(np.arange(k) + 2.0))  # (k,)
        self.start(UserTypes(*(np.zeros(1) for _ in range(6))), 0)

    def start(self, types: UserTypes, u: int) -> None:
        """Begin a session for user u of `types`: no satiation, no streak."""
        self.sensitivity = float(types.sensitivity[u])
        self.decay = float(types.decay[u])
        self.preference = float(types.preference[u])
        self.no_click = float(types.no_click[u])
        self.continue_prob = float(types.continue_prob[u])
        self.satiation = np.zeros(self.n_categories + 1)  # (C + 1,), index 0 = padding
        self.touched = np.zeros(self.n_categories + 1, dtype=bool)  # shown or clicked so far
        self.unsatisfied = 0  # consecutive slates without a click

    def leave_probability(self, unsatisfied: int | None = None) -> float:
        """P(leave after a slate) given the no-click streak (default: the current one)."""
        n = self.unsatisfied if unsatisfied is None else unsatisfied
        cfg = self.leave_cfg
        return min(cfg.cap, cfg.base + cfg.increment * n)

    def choice_probabilities(
        self, affinity: np.ndarray, cats: np.ndarray, weights: np.ndarray
    ) -> np.ndarray:
        """(k,) z-affinities, (k, C) categories and weights -> (k + 1,) P(first choice):
        [no click, item at position 0, ..., k - 1], at the current satiation (no exposure)."""
        util = self._utilities(affinity, cats, weights)
        logits = np.concatenate([[self.no_click], util])
        p = np.exp(logits - logits.max())
        return p / p.sum()

    def respond(
        self,
        affinity: np.ndarray,
        cats: np.ndarray,
        weights: np.ndarray,
        rng: np.random.Generator,
    ) -> Response:
        """One slate: (k,) standardised ground-truth affinities in slate order, (k, C) category
        ids and (k, C) category weights -> clicks, purchases, leave (state updated)."""
        mass = np.bincount(cats.ravel(), weights=weights.ravel(), minlength=self.n_categories + 1)
        self.satiation = 1.0 - (1.0 - self.satiation) * np.power(self._shown_keep, mass)
        self.satiation[0] = 0.0
        self.touched[cats] = True
        clicks, purchases = self._clicks(affinity, cats, weights, rng)
        self.satiation *= self.decay
        self.unsatisfied = 0 if clicks.any() else self.unsatisfied + 1
        p_leave = self.leave_probability()
        return Response(clicks, purchases, bool(rng.random() < p_leave), p_leave)

    def _utilities(self, affinity: np.ndarray, cats: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """(k,) item utilities v_j at the current satiation."""
        sat = (self.satiation[cats] * weights).sum(1)  # (k,) mean satiation of j's categories
        return self.preference * affinity - self.sensitivity * sat + self.position_logit

    def _clicks(
        self,
        affinity: np.ndarray,
        cats: np.ndarray,
        weights: np.ndarray,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Sequential logit choices within one slate -> (k,) clicks, (k,) purchases."""
        cfg, k = self.choice_cfg, len(affinity)
        clicks, purchases = np.zeros(k, dtype=bool), np.zeros(k, dtype=bool)
        base = self.preference * affinity + self.position_logit  # (k,) satiation-free part
        for n in range(cfg.max_clicks):
            if self.sensitivity:
                util = base - self.sensitivity * (self.satiation[cats] * weights).sum(1)
            else:  # satiation costs this user nothing: skip the gather
                util = base.copy()
            if n:
                util[clicks] = -np.inf  # an item is clicked at most once per slate
            top = max(float(util.max()), self.no_click)
            cum = np.cumsum(np.exp(util - top))  # (k,) the no-click mass sits after the items
            draw = rng.random() * (cum[-1] + math.exp(self.no_click - top))
            if draw >= cum[-1]:
                break
            j = min(int(cum.searchsorted(draw, side="right")), k - 1)
            clicks[j] = True
            z = cfg.purchase_bias + cfg.purchase_slope * float(affinity[j])
            bought = rng.random() * (1.0 + math.exp(-z)) < 1.0  # P = sigmoid(z)
            purchases[j] = bought
            keep = self._click_keep * (self._purchase_keep if bought else 1.0)
            # An item's categories are distinct, so a fancy-index update hits each one once.
            row = cats[j]
            self.satiation[row] = 1.0 - (1.0 - self.satiation[row]) * keep ** weights[j]
            self.satiation[0] = 0.0
            if rng.random() >= self.continue_prob:
                break
        return clicks, purchases
