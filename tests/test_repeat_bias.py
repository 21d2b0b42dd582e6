"""The learned repeat-consumption logit: its helpers against brute force, and what it learns."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from rec.export import WEIGHTS_FILE, load_export, save_export
from rec.heads import causal_history, in_history, interest_full_loss, interest_sampled_loss
from tests.test_model import make_batch, random_sequences, tiny_recommender


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000))
def test_in_history_matches_brute_force(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    hist = torch.randint(0, 12, (5, 7), generator=gen)
    cand = torch.randint(1, 14, (5, 9), generator=gen)
    want = torch.tensor(
        [[int(c) in set(h[h > 0].tolist()) for c in cr] for h, cr in zip(hist, cand, strict=True)]
    )
    assert torch.equal(in_history(hist, cand), want)


def test_causal_history_sees_only_the_past() -> None:
    items = torch.tensor([[0, 3, 5, 7], [2, 4, 6, 8]])
    mask = torch.tensor([[False, True, True, False], [True, False, False, True]])
    got = causal_history(items, mask)
    want = torch.tensor([[0, 3, 0, 0], [0, 3, 5, 0], [2, 0, 0, 0], [2, 4, 6, 8]])
    assert torch.equal(got, want)


def test_full_and_sampled_losses_add_the_logit_to_seen_items() -> None:
    gen = torch.Generator().manual_seed(0)
    n_items, d = 20, 8
    h, table = torch.randn(4, d, generator=gen), torch.randn(n_items + 1, d, generator=gen)
    targets = torch.tensor([3, 5, 5, 9])
    hist = torch.tensor([[3, 3, 0], [1, 2, 0], [5, 6, 7], [0, 0, 0]])  # row 0 repeats twice
    r = torch.tensor(-1.5)
    logits = h @ table[1:].T
    for row in range(4):
        for item in set(hist[row][hist[row] > 0].tolist()):
            logits[row, item - 1] += r  # once per item, however often it was seen
    want = F.cross_entropy(logits, targets - 1)
    got = interest_full_loss(h, table, targets, 1.0, hist, r)
    torch.testing.assert_close(got, want)
    # sampled: with every item a negative and a uniform proposal it is the full softmax
    neg = torch.arange(1, n_items + 1)
    log_q = torch.zeros(n_items + 1)
    sampled = interest_sampled_loss(
        h, table[targets], targets, neg, table[neg], log_q, 1.0, hist, r
    )
    torch.testing.assert_close(sampled, want)


def test_the_model_learns_that_repeats_are_rare_or_common() -> None:
    """Trained on sequences that never repeat an item, r goes negative; on sequences that
    keep repeating, positive; score_next applies it to the input's items."""
    for repeat, sign in ((False, -1), (True, 1)):
        torch.manual_seed(0)
        model = tiny_recommender(seed=0)
        seqs = random_sequences(16, seed=1)
        if repeat:  # every other event repeats the previous item
            seqs = [[x for item in s[: len(s) // 2] for x in (item, item)] for s in seqs]
        else:
            seqs = [list(dict.fromkeys(s)) for s in seqs]
        batch = make_batch(seqs, 12)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        for _ in range(30):
            loss, _ = model.loss(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert sign * float(model.repeat_logit.detach()) > 0.5, float(model.repeat_logit.detach())
    model.eval()
    with torch.no_grad():
        scores = model.score_next(batch)
        base = (
            model.user_embedding(batch) / model.cfg.temperature
        ) @ model.model.item_embeddings().T
    row = 0
    seen = set(batch.items[row][batch.items[row] > 0].tolist())
    for item in range(1, scores.shape[1]):
        extra = float(model.repeat_logit.detach()) if item in seen else 0.0
        assert abs(float(scores[row, item] - base[row, item]) - extra) < 1e-4


def test_repeat_scale_lets_adam_move_r_that_many_times_as_far() -> None:
    """r = repeat_scale * raw: Adam steps raw by ~lr whatever the gradient, so after the same
    steps on never-repeating sequences r has travelled ~repeat_scale times as far (the reason
    for the scale: a bare scalar stalls at ~sum(lr)). Every other weight is unaffected."""
    seqs = [list(dict.fromkeys(s)) for s in random_sequences(16, seed=1)]
    batch = make_batch(seqs, 12)
    travelled = {}
    for scale in (1.0, 10.0):
        model = tiny_recommender(seed=0, repeat_scale=scale)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(20):
            loss, _ = model.loss(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
        travelled[scale] = -float(model.repeat_logit.detach())
    assert 0.1 < travelled[1.0] <= 0.2 + 1e-6, travelled  # ~lr a step, 20 steps
    assert travelled[10.0] > 8 * travelled[1.0], travelled
    model.set_repeat_logit(-4.0)
    assert abs(float(model.repeat_logit.detach()) + 4.0) < 1e-6
    assert abs(float(model.repeat_raw.detach()) + 0.4) < 1e-7  # what the optimiser, export hold


def test_an_export_that_holds_r_itself_still_loads(tmp_path: Path) -> None:
    """Exports written before `repeat_scale` hold r as `repeat_logit`; loading maps it."""
    model = tiny_recommender(seed=1).eval()
    model.set_repeat_logit(-3.0)
    save_export(model, tmp_path / "export")
    weights = tmp_path / "export" / WEIGHTS_FILE
    tensors = load_file(str(weights))
    tensors["repeat_logit"] = tensors.pop("repeat_raw") * model.cfg.repeat_scale  # the old key
    save_file(tensors, str(weights))
    back = load_export(tmp_path / "export")
    assert abs(float(back.repeat_logit) + 3.0) < 1e-5
    batch = make_batch(random_sequences(4, seed=2), max_len=12)
    torch.testing.assert_close(back.score_next(batch), model.score_next(batch))


def test_sampled_loss_subtracts_log_q_by_hand() -> None:
    """Non-uniform proposal: each logit is h.e / tau - log q (the logQ correction, Yi et al.
    2019), a negative equal to the target is masked. A flipped sign or a dropped correction
    changes the loss (log_q varies by ~3 nats across items, far above float32 noise)."""
    gen = torch.Generator().manual_seed(1)
    n_items, d, tau = 12, 6, 0.5
    h, table = torch.randn(3, d, generator=gen), torch.randn(n_items + 1, d, generator=gen)
    targets, neg = torch.tensor([2, 7, 7]), torch.tensor([7, 1, 4, 11])
    log_q = torch.log_softmax(3.0 * torch.randn(n_items + 1, generator=gen), 0)

    def logit(row: int, item: int) -> float:
        return float(h[row] @ table[item]) / tau - float(log_q[item])

    want = []
    for row in range(3):
        cols = [logit(row, int(targets[row]))]
        cols += [logit(row, int(j)) if j != targets[row] else float("-inf") for j in neg]
        want.append(-F.log_softmax(torch.tensor(cols, dtype=torch.float64), 0)[0])
    got = interest_sampled_loss(h, table[targets], targets, neg, table[neg], log_q, tau)
    torch.testing.assert_close(got.double(), torch.stack(want).mean(), rtol=1e-5, atol=1e-6)
