"""The log-fitted session user (`EnvConfig.user_model = "session"`), numpy only.

Same interface as `rl.users.SimulatedUser` (start, respond, satiation, touched, unsatisfied,
leave_probability), so `rl.env.DiversityEnv` runs either. Parameters: `rl.config.SessionConfig`,
fitted by `rl.session_fit` (which says, per field, fitted from what or assumed). One slate:

1. exposure: s_c += w_exp * (the slate's mass of category c), before the choice;
2. clicks: sequential multinomial logit over the k items and a no-click option, utility
       v_j = preference * z_j - sensitivity_u * sat(j) + position_j + stick_I * same_j
         + popularity_weight * pop_j,
   sat(j) the mean satiation of j's categories, position_j the log examination probability
   of the slot (DCG's 1 / log2(pos + 2), weight `choice.position_bias`), same_j = 1 if j has
   the category of the last click, stick_I = logit(stay_I) + stick_offset of the current
   intent I, pop_j the item's standardised log popularity in the fit users' log, plus
   revisit_weight if j is in a category clicked earlier this session other than the last
   click's (< 0: variety seeking, > 0: coming back; fitted to the log's revisit rate). After a
   click: s_c += w_click * (the item's share of c); a click in a new category ends the run and
   the intent switches with P = switch_I; another click follows with P = continue_prob;
3. recovery: s <- delta * s;
4. leaving: P = sigmoid(leave_intercept + e + leave_streak * no-click streak +
   leave_concentration * (share of the slate's modal category) + leave_utility * the best
   slot's utility), e ~ N(0, leave_spread^2) drawn once per session (how engaged this sitting
   is: without it every session ends at one hazard and lengths are too alike, e.g. MovieLens,
   where one sitting rates one film and the next two hundred).
"""

from __future__ import annotations

import math

import numpy as np

from rl.config import ChoiceConfig, SessionConfig
from rl.users import Response, UserTypes

FOCUSED, BROWSING = 0, 1


def logit(p: float) -> float:
    p = min(max(p, 1e-4), 1.0 - 1e-4)
    return math.log(p / (1.0 - p))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x > -700 else 0.0


class SessionUser:
    """One user's session state (intent, satiation, run category, no-click streak)."""

    def __init__(
        self,
        n_categories: int,
        k: int,
        cfg: SessionConfig,
        choice: ChoiceConfig,
        history_entropy: np.ndarray,
        rng_seed: int = 0,
    ) -> None:
        """history_entropy: (U,) normalised category entropy of each user's logged history."""
        self.cfg, self.choice_cfg = cfg, choice
        self.n_categories = n_categories
        self.history_entropy = np.asarray(history_entropy, dtype=np.float64)
        self.position_logit = -choice.position_bias * np.log(np.log2(np.arange(k) + 2.0))
        self.stick = (
            np.array([logit(cfg.stay_focused), logit(cfg.stay_browsing)]) + cfg.stick_offset
        )
        self.switch = np.array([cfg.switch_focused, cfg.switch_browsing])
        self._rng = np.random.default_rng(rng_seed)  # the intent draw at start()
        self.start(None, 0)

    def start(self, types: UserTypes | None, u: int, rng: np.random.Generator | None = None):
        """Begin a session of user u: no satiation, no run, an intent drawn from the prior."""
        c = self.cfg
        h = float(self.history_entropy[u]) if len(self.history_entropy) else 0.0
        self.sensitivity = max(0.0, c.sensitivity_base + c.sensitivity_slope * h)
        self.satiation = np.zeros(self.n_categories + 1)
        self.touched = np.zeros(self.n_categories + 1, dtype=bool)
        self.unsatisfied = 0
        self.run_category = 0  # the last clicked item's most specific category (0: none yet)
        # most specific categories clicked earlier this session (the revisit term's memory)
        self.visited = np.zeros(self.n_categories + 1, dtype=bool)
        draw = (rng or self._rng).random()
        self.intent = FOCUSED if draw < c.focused_share else BROWSING
        # drawn only with a spread, after the intent, so spread 0 keeps every random stream
        spread = c.leave_spread * (rng or self._rng).standard_normal() if c.leave_spread else 0.0
        self.leave_base = c.leave_intercept + spread
        self.leave_prob = sigmoid(self.leave_base)

    def leave_probability(self, unsatisfied: int | None = None) -> float:
        """P(leave) after the last slate (given a streak: the streak term alone changed)."""
        if unsatisfied is None:
            return self.leave_prob
        return sigmoid(self.leave_base + self.cfg.leave_streak * unsatisfied)

    def respond(
        self,
        affinity: np.ndarray,
        cats: np.ndarray,
        weights: np.ndarray,
        rng: np.random.Generator,
        popularity: np.ndarray | None = None,
    ) -> Response:
        """(k,) standardised affinities, (k, C) categories and weights, (k,) standardised log
        popularity (None: 0) -> clicks, purchases, leave; state updated."""
        c = self.cfg
        self._expose(cats, weights)
        base = c.preference * affinity + self.position_logit  # (k,)
        if popularity is not None and c.popularity_weight:
            base = base + c.popularity_weight * popularity
        best = float(self._utilities(base, cats, weights).max())
        clicks, purchases, order = self._clicks(base, affinity, cats, weights, rng)
        self._recover(bool(clicks.any()))
        share = float(np.bincount(cats.max(1), minlength=1).max()) / len(cats)
        z = (
            self.leave_base
            + c.leave_streak * self.unsatisfied
            + c.leave_concentration * share
            + c.leave_utility * best
        )
        self.leave_prob = sigmoid(z)
        return Response(
            clicks, purchases, bool(rng.random() < self.leave_prob), self.leave_prob, order
        )

    def replay(self, cats: np.ndarray, weights: np.ndarray, order: np.ndarray) -> None:
        """A slate the user was shown and answered: (k, C) categories and weights, (c,) the
        clicked slots in click order. Updates satiation and the no-click streak exactly as
        `respond` did (the same operations in the same order: rl/features.py replays a served
        session with it); the run category and intent are not replayed (the observation never
        sees them)."""
        self._expose(cats, weights)
        for j in np.asarray(order, dtype=np.int64).tolist():
            self._consume(cats[j], weights[j])
        self._recover(len(order) > 0)

    def _expose(self, cats: np.ndarray, weights: np.ndarray) -> None:
        """Exposure to a (k, C) slate, before any choice."""
        mass = np.bincount(cats.ravel(), weights=weights.ravel(), minlength=self.n_categories + 1)
        self.satiation += self.cfg.w_exp * mass
        self.satiation[0] = 0.0
        self.touched[cats] = True

    def _consume(self, cats: np.ndarray, weights: np.ndarray) -> None:
        """One click on an item with (C,) categories and weights."""
        self.satiation[cats] += self.cfg.w_click * weights
        self.satiation[0] = 0.0

    def _recover(self, clicked: bool) -> None:
        """After the slate: satiation recovers, the no-click streak grows or resets."""
        self.satiation *= self.cfg.delta
        self.unsatisfied = 0 if clicked else self.unsatisfied + 1

    def _utilities(self, base: np.ndarray, cats: np.ndarray, weights: np.ndarray) -> np.ndarray:
        util = base - self.sensitivity * (self.satiation[cats] * weights).sum(1)
        if self.run_category:
            same = (cats == self.run_category).any(1)  # (k,)
            util = util + self.stick[self.intent] * same
            if self.cfg.revisit_weight:  # back to a category left earlier in the session
                util = util + self.cfg.revisit_weight * (self.visited[cats].any(1) & ~same)
        return util

    def _clicks(
        self,
        base: np.ndarray,
        affinity: np.ndarray,
        cats: np.ndarray,
        weights: np.ndarray,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sequential logit choices -> (k,) clicks, (k,) purchases, (c,) slots in click order."""
        c, ch, k = self.cfg, self.choice_cfg, len(base)
        clicks, purchases, order = np.zeros(k, bool), np.zeros(k, bool), []
        for n in range(ch.max_clicks):
            util = self._utilities(base, cats, weights)
            if n:
                util[clicks] = -np.inf
            top = max(float(util.max()), c.no_click)
            cum = np.cumsum(np.exp(util - top))
            draw = rng.random() * (cum[-1] + math.exp(c.no_click - top))
            if draw >= cum[-1]:
                break
            j = min(int(cum.searchsorted(draw, side="right")), k - 1)
            clicks[j] = True
            order.append(j)
            z = ch.purchase_bias + ch.purchase_slope * float(affinity[j])
            purchases[j] = rng.random() * (1.0 + math.exp(-z)) < 1.0
            self._consume(cats[j], weights[j])
            self._new_click(int(cats[j].max()), rng)
            if rng.random() >= c.continue_prob:
                break
        return clicks, purchases, np.asarray(order, dtype=np.int64)

    def _new_click(self, category: int, rng: np.random.Generator) -> None:
        """A click in `category`: a new run (and maybe a new intent) if it differs."""
        new_run = self.run_category and category != self.run_category
        if new_run and rng.random() < self.switch[self.intent]:
            self.intent = 1 - self.intent
        self.run_category = category
        self.visited[category] = True
