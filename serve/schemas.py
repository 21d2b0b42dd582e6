"""HTTP request and response schemas of the recommender (pydantic; they also make /docs).

Types are strict: `"k": "10"` or `"k": 10.5` is a 422 naming `k`, not a silent cast. Unknown
fields are refused too (a misspelt `"exclude_sen"` would otherwise be ignored), and so are
non-finite numbers and ids beyond int64 (serve/http.py refuses them earlier, in the JSON parse;
the schema says so too, for callers that build requests in Python).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

LamSource = Literal["request", "policy", "default", "cold_start"]
# Raw ids are int64 in the catalogue; a larger integer is refused here, not by numpy (a 500).
RawId = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


# Bounds of a request's `session` (the policy replays it: rl/features.py): slates, items each.
MAX_SESSION_SLATES = 200
MAX_SLATE_ITEMS = 1000


class ShownSlate(BaseModel):
    """One slate of the session so far, as the user saw and answered it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    items: list[RawId] = Field(
        min_length=1, max_length=MAX_SLATE_ITEMS, description="Raw item ids in slate order."
    )
    clicked: list[RawId] = Field(
        default_factory=list,
        max_length=MAX_SLATE_ITEMS,
        description="The clicked ones, in click order: each one of `items`, none twice.",
    )
    lam: float = Field(ge=0.0, le=1.0, allow_inf_nan=False, description="Its diversity weight.")

    @field_validator("items")
    @classmethod
    def _distinct_items(cls, items: list[int]) -> list[int]:
        if len(set(items)) != len(items):
            raise ValueError("an item appears twice in one slate")
        return items

    @field_validator("clicked")
    @classmethod
    def _clicked_in_slate(cls, clicked: list[int], info: ValidationInfo) -> list[int]:
        items = set(info.data.get("items") or [])
        if not set(clicked) <= items:
            raise ValueError("clicked ids must be items of the same slate")
        if len(set(clicked)) != len(clicked):
            raise ValueError("an item is clicked twice in one slate")
        return clicked


class RecommendRequest(BaseModel):
    """POST /recommend body. Give a `user_id`, a `history`, both, or neither (cold start)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: RawId | None = Field(
        None, description="Raw user id; a known user's logged history comes first."
    )
    history: list[RawId] | None = Field(
        None,
        description="Raw item ids, oldest first, appended after the logged history. Unknown "
        "ids are ignored and listed in `unknown_items`; beyond serve.max_history items only "
        "the most recent are kept (`history_truncated`).",
    )
    k: int = Field(
        10, ge=1, le=2**63 - 1, description="List length, 1..serve.max_k (default max 100)."
    )
    lam: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Diversity weight in [0, 1]; omitted: the RL policy's choice, or the default.",
    )
    exclude_seen: bool = Field(True, description="Never recommend items of the history.")
    shown: list[RawId] | None = Field(
        None,
        description="Raw item ids already shown in this session: dropped from the retrieved "
        "candidates before lam is chosen and the list re-ranked (the top-N is not refilled, "
        "as in the simulator: rl/online.py). Unknown ids are ignored.",
    )
    session: list[ShownSlate] | None = Field(
        None,
        max_length=MAX_SESSION_SLATES,
        description="This session's slates so far, oldest first: the RL policy's observation "
        "replays them (satiation, streak, last clicks and lam; rl/features.py). Unknown ids "
        "are ignored.",
    )


class RecommendedItem(BaseModel):
    id: int = Field(description="Raw item id.")
    score: float = Field(
        description="Ranking score: log P(next = item | candidates) + w log P(relevant); "
        "cold start: log(1 + popularity)."
    )
    categories: list[int] = Field(description="Raw category ids of the item.")


class RecommendResponse(BaseModel):
    items: list[RecommendedItem] = Field(description="k items (fewer only if the catalogue is).")
    lam: float = Field(description="The diversity weight the re-ranker used.")
    lam_source: LamSource = Field(description="Where lam came from.")
    cold_start: bool = Field(description="True: no known history, a popular-and-diverse list.")
    unknown_items: list[int] = Field(description="History ids not in the catalogue (ignored).")
    history_used: int = Field(description="History items the model saw (after truncation).")
    history_truncated: bool = Field(description="The history was cut to serve.max_history.")
    diversity: float | None = Field(
        None, description="The ranker's diversity head for this history (null at cold start)."
    )
    timings_ms: dict[str, float] = Field(
        description="Wall time per stage as seen by the ingress (retrieve, rank, policy, "
        "rerank, total) and model compute inside the replicas (*_compute)."
    )


class ItemResponse(BaseModel):
    id: int
    index: int = Field(description="The model's item index (1..n_items).")
    categories: list[int]
    popularity: int = Field(description="Interactions in the prepared log.")


class Health(BaseModel):
    status: Literal["ok"]
    n_items: int
    n_users: int = Field(description="Users with a logged history.")
    policy: bool = Field(description="An RL policy chooses lam when the request has none.")
    rerank: str
