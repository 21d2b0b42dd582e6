"""Configuration of the simulated-user environment (`rl/env.py`) and its user model
(`rl/users.py`): plain dataclasses with defaults, loadable from YAML by the generic loader.

Which defaults come from data and which are assumptions is listed in `rl/calibrate.py`;
`calibrate.apply_calibration` overwrites the calibrated ones from a prepared dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ActionMode = Literal["discrete", "continuous"]
OnExhausted = Literal["recycle", "end"]
UserModel = Literal["types", "session"]

# Discrete actions index this grid: lam in {0, 0.1, ..., 1}.
N_LAM_LEVELS = 11


@dataclass
class SatiationConfig:
    """How much each event satiates a category; satiation is a level in [0, 1] per category and
    an event of strength x closes that fraction of the gap to 1 (see `rl/users.py`). How much
    satiation costs and how fast it recovers is per user (`TypeConfig`)."""

    # Per shown item: seeing a slate of near-duplicates is tiring before anything is clicked.
    shown_increment: float = 0.1
    # Per click: consumption satiates far more than exposure.
    click_increment: float = 0.5
    # Per purchase, on top of the click.
    purchase_increment: float = 0.3


@dataclass
class ChoiceConfig:
    """Multinomial-logit choice over the shown slate, with a no-click option."""

    # Weight of the log examination probability log(1 / log2(pos + 2)); 0 = no position bias.
    position_bias: float = 1.0
    # At most this many clicks per slate (P(going on after a click) is per type: TypeConfig).
    max_clicks: int = 10
    # P(purchase | click) = sigmoid(purchase_bias + purchase_slope * standardised affinity).
    purchase_bias: float = -2.0
    purchase_slope: float = 1.0


@dataclass
class LeavingConfig:
    """After each slate: P(leave) = min(cap, base + increment * consecutive no-click slates)."""

    # Leave probability after a satisfying slate. The default is assumed (~3-4 clicks per
    # session on the synthetic world); `apply_calibration` fits it to a log's session lengths.
    base: float = 0.1
    # Added per consecutive unsatisfying (no-click) slate.
    increment: float = 0.15
    # Upper bound of the leave probability.
    cap: float = 0.9


@dataclass
class TypeConfig:
    """Per-user type: focused (weak satiation, strong preference: relevance-first is best) or
    explorer (strong satiation: needs diverse slates), parameters jittered per user."""

    # P(explorer) = history_weight * (the user's percentile of logged exploration: category
    # entropy and non-repeat rate of their history) + (1 - history_weight) * explorer_share.
    history_weight: float = 0.7
    explorer_share: float = 0.5  # the exploration-type mix where the history says nothing
    # Each user's parameters = their type's value * exp(param_noise * N(0, 1)).
    param_noise: float = 0.2
    # Utility lost per unit of satiation of an item's categories: explorers tire fast.
    sensitivity_focused: float = 0.0
    sensitivity_explorer: float = 4.0
    # Fraction of satiation kept from one slate to the next (1 - recovery rate).
    decay_focused: float = 0.9
    decay_explorer: float = 0.7
    # Weight of the standardised ground-truth affinity in the utility: focused users care
    # most about relevance.
    preference_focused: float = 3.0
    preference_explorer: float = 1.0
    # P(going on in the same slate after a click): focused users work through a slate of their
    # category (clicks add up, so showing the best first pays), explorers take one and move on.
    continue_focused: float = 0.9
    continue_explorer: float = 0.4
    # Utility of not clicking (items compete with it): explorers browse more readily.
    no_click_focused: float = 2.5
    no_click_explorer: float = 0.0


@dataclass
class SessionConfig:
    """The fitted session user (`rl/session_user.py`, fitted by `rl/session_fit.py`; each
    field's provenance, fitted or assumed, is written beside the world as world.json).

    Hidden intent I in {focused, browsing}: after a click, the next click stays in the last
    clicked category with P = stay_<I> (the item utility gets logit(stay_<I>) for sharing it);
    I switches at a category change with P = switch_<I>. Satiation per category (linear):
    s_c <- delta * s_c + w_click * clicked_c + w_exp * shown_c, costing sensitivity_u * s_c,
    sensitivity_u = sensitivity_base + sensitivity_slope * (the user's history entropy).
    Leaving after a slate: sigmoid(leave_intercept + leave_streak * no-click streak +
    leave_concentration * (share of the slate's modal category) + leave_utility * best slot's
    utility)."""

    focused_share: float = 0.5  # P(intent = focused) at the session start
    stay_focused: float = 0.7
    stay_browsing: float = 0.1
    switch_focused: float = 0.3  # P(focused -> browsing) at a category change
    switch_browsing: float = 0.3  # P(browsing -> focused) at a category change
    delta: float = 0.8
    w_click: float = 0.5
    w_exp: float = 0.02
    sensitivity_base: float = 0.5
    sensitivity_slope: float = 1.0
    preference: float = 2.0  # weight of the standardised ground-truth affinity
    no_click: float = 1.5  # utility of not clicking
    continue_prob: float = 0.5  # P(another click in the same slate after a click)
    leave_intercept: float = -2.0
    leave_streak: float = 0.5
    leave_concentration: float = 0.0
    leave_utility: float = -0.2
    # Utility per unit of the item's standardised log popularity (the fit users' event counts):
    # fitted so that simulated clicks are as popular as the fit users' logged events
    # (rl/moments.py); 0 = popularity only through the ground truth and the ranker's order.
    popularity_weight: float = 0.0
    # Added to both intents' stickiness logit(stay_I): a slate holds few items of the last
    # category, so logit(stay_I) alone under-shoots P(stay); fitted to the fit users' logged
    # repeat rate (rl/moments.py).
    stick_offset: float = 0.0
    # Utility of an item in a category clicked earlier this session but not the last click's
    # (< 0: the user seeks variety; > 0: comes back): fitted so that the simulated share of
    # events returning to such a category matches the fit users' (rl/moments.py). Without it
    # Beauty's simulated sessions revisit 0.17 of the time against 0.12 logged, Taobao's 0.05
    # against 0.16: what the realism classifier read from their category diversity.
    revisit_weight: float = 0.0
    # sd of a per-session normal offset on the leaving logit (session-level engagement:
    # some sittings are long, some one event; fitted to the spread of log session lengths)
    leave_spread: float = 0.0


@dataclass
class EnvConfig:
    """One `DiversityEnv`: slate sizes, session limits, reward, action space, user model."""

    k: int = 10  # slate size
    # Ranker candidates per user (the first N of SimulatorData's). Not `rerank.n_candidates`:
    # it defines the policy's observation (score margins over N) and is saved with the policy.
    n_candidates: int = 100
    max_steps: int = 20  # slates per session before truncation
    purchase_weight: float = 3.0  # reward = clicks + purchase_weight * purchases
    # "discrete": Discrete(11), lam = action / 10; "continuous": Box([0], [1]), lam = action.
    action_mode: ActionMode = "discrete"
    # When fewer than k unshown candidates remain: "recycle" returns shown-but-unclicked ones to
    # the pool (a feed refresh; clicked items never come back, and the episode truncates if
    # even that leaves < k); "end" truncates the episode.
    on_exhausted: OnExhausted = "recycle"
    entropy_window: int = 3  # slates whose shown categories make the entropy observation
    # How a slate is re-ranked (method, similarity, theta_max) is the run's `rerank:` section,
    # shared with serving, so the policy learns lam for the lists that will be served. On Beauty,
    # lam 0 -> 1 moves slate ILD 0.82 -> 0.88 (rerank.similarity=embedding, the default),
    # 0.82 -> 0.91 (category); returns stay flat over lam under both.
    seed: int | None = None  # seed of the first reset when the caller passes none
    satiation: SatiationConfig = field(default_factory=SatiationConfig)
    choice: ChoiceConfig = field(default_factory=ChoiceConfig)
    leaving: LeavingConfig = field(default_factory=LeavingConfig)
    types: TypeConfig = field(default_factory=TypeConfig)
    # "types": the focused/explorer user of rl/users.py (types, satiation, choice, leaving
    # above); "session": the log-fitted session user of rl/session_user.py (`session` below,
    # with `choice` for position examination and purchases).
    user_model: UserModel = "types"
    session: SessionConfig = field(default_factory=SessionConfig)

    def __post_init__(self) -> None:
        for name in ("k", "n_candidates", "max_steps", "entropy_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"env.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.n_candidates < self.k:
            raise ValueError(f"env.n_candidates ({self.n_candidates!r}) must be >= k ({self.k!r})")
        if self.action_mode not in ("discrete", "continuous"):
            raise ValueError(f"env.action_mode must be discrete|continuous: {self.action_mode!r}")
        if self.on_exhausted not in ("recycle", "end"):
            raise ValueError(f"env.on_exhausted must be recycle|end, got {self.on_exhausted!r}")
        if self.user_model not in ("types", "session"):
            raise ValueError(f"env.user_model must be types|session, got {self.user_model!r}")
        if self.purchase_weight < 0:
            raise ValueError(f"env.purchase_weight must be >= 0, got {self.purchase_weight!r}")
        _check_user_model(self)


def _check_user_model(cfg: EnvConfig) -> None:
    """Range checks of the nested sections, naming the field."""
    probs = {
        "types.continue_focused": cfg.types.continue_focused,
        "types.continue_explorer": cfg.types.continue_explorer,
        "leaving.base": cfg.leaving.base,
        "leaving.increment": cfg.leaving.increment,
        "leaving.cap": cfg.leaving.cap,
        "types.history_weight": cfg.types.history_weight,
        "types.explorer_share": cfg.types.explorer_share,
        "types.decay_focused": cfg.types.decay_focused,
        "types.decay_explorer": cfg.types.decay_explorer,
        "satiation.shown_increment": cfg.satiation.shown_increment,
        "satiation.click_increment": cfg.satiation.click_increment,
        "satiation.purchase_increment": cfg.satiation.purchase_increment,
        **{
            f"session.{n}": getattr(cfg.session, n)
            for n in (
                "focused_share",
                "stay_focused",
                "stay_browsing",
                "switch_focused",
                "switch_browsing",
                "delta",
                "continue_prob",
            )
        },
    }
    for name, value in probs.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"env.{name} must be in [0, 1], got {value!r}")
    if cfg.choice.max_clicks < 1:
        raise ValueError(f"env.choice.max_clicks must be >= 1, got {cfg.choice.max_clicks!r}")
    nonneg = {
        "choice.position_bias": cfg.choice.position_bias,
        "types.sensitivity_focused": cfg.types.sensitivity_focused,
        "types.sensitivity_explorer": cfg.types.sensitivity_explorer,
        "types.param_noise": cfg.types.param_noise,
        "types.preference_focused": cfg.types.preference_focused,
        "types.preference_explorer": cfg.types.preference_explorer,
        "session.w_click": cfg.session.w_click,
        "session.w_exp": cfg.session.w_exp,
        "session.leave_spread": cfg.session.leave_spread,
        "session.preference": cfg.session.preference,
    }
    for name, value in nonneg.items():
        if value < 0:
            raise ValueError(f"env.{name} must be >= 0, got {value!r}")
