"""RecBole's SASRec on the project's own splits (Beauty; any log via export_splits.py),
scored by the project's metric code.

Runs in the RecBole venv (.venv-recbole, bench/recbole/setup.sh), after export_splits.py:

    OMP_NUM_THREADS=1 .venv-recbole/bin/python bench/recbole/run_sasrec.py \
        --data outputs/recbole/beauty [--epochs 300] [--max-minutes 50]

Training, validation and early stopping are RecBole's own (Trainer.fit, full-sort validation
NDCG@10, stopping_step 10); the model is RecBole's SASRec with its default (Beauty reference)
settings. The best-validation checkpoint then scores every test (and valid) user over the
whole catalogue, the scores are mapped back to the project's item indices and fed to
`rec.metrics.RankingEvaluator` -- the evaluator rec/evaluation.py uses -- with the project's
own histories, so `test.*` and `test_unseen.*` mean exactly what they mean for the project.
Before scoring, every user's target and history as RecBole built them are checked equal to
the project's split (eval.npz). Prints a table; writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from rec.metrics import RankingEvaluator  # noqa: E402  (pure torch: imports in this venv)


class OutOfTime(Exception):
    """Raised after an epoch once the training budget is spent; the best checkpoint stays."""


def recbole_config(data: Path, args: argparse.Namespace) -> dict:
    """RecBole's SASRec defaults (SASRec.yaml) spelled out, on the exported atomic files."""
    return {
        "data_path": str(data / "atomic"),
        "checkpoint_dir": str(data / "saved"),
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": 50,
        "n_layers": 2,
        "n_heads": 2,
        "hidden_size": 64,
        "inner_size": 256,
        "hidden_dropout_prob": 0.5,
        "attn_dropout_prob": 0.5,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "initializer_range": 0.02,
        "loss_type": "CE",
        "train_neg_sample_args": None,
        "learning_rate": args.lr,
        "train_batch_size": args.batch_size,
        "eval_batch_size": 1024,
        "epochs": args.epochs,
        "stopping_step": args.stopping_step,
        "eval_step": 1,
        "eval_args": {
            "split": {"LS": "valid_and_test"},
            "order": "TO",
            "group_by": "user",
            "mode": "full",
        },
        "metrics": ["Recall", "NDCG"],
        "topk": [10],
        "valid_metric": "NDCG@10",
        "seed": args.seed,
        "reproducibility": True,
        "use_gpu": False,
        "show_progress": False,
        "worker": 0,
    }


def project_index(dataset) -> torch.Tensor:
    """RecBole's internal item id -> the project's item index (both use 0 for padding)."""
    tokens = dataset.field2id_token["item_id"]
    return torch.tensor([0] + [int(t) for t in tokens[1:]], dtype=torch.int64)


@torch.no_grad()
def score_split(model, loader, dataset, ref: dict, split: str, n_items: int) -> dict:
    """Project metrics of `model` on one RecBole eval loader, after checking its rows."""
    to_proj = project_index(dataset)
    users = dataset.field2id_token["user_id"]
    want = {
        int(u): (int(t), h[h != 0].tolist())
        for u, t, h in zip(
            ref[f"{split}_users"], ref[f"{split}_targets"], ref[f"{split}_history"], strict=True
        )
    }
    ev = RankingEvaluator(torch.as_tensor(ref["categories"]), torch.as_tensor(ref["train_counts"]))
    model.eval()
    seen = 0
    for interaction, _, _, _ in loader:
        scores = model.full_sort_predict(interaction).float()  # (B, RecBole items incl. pad)
        mapped = torch.full((scores.shape[0], n_items + 1), float("-inf"))
        mapped[:, to_proj[1:]] = scores[:, 1:]
        targets = to_proj[interaction["item_id"]]
        history = to_proj[interaction["item_id_list"]]  # right-padded, as RecBole keeps it
        for row, uid in enumerate(interaction["user_id"].tolist()):
            target, hist = want.pop(int(users[uid]))
            got = history[row][history[row] != 0].tolist()
            if int(targets[row]) != target or got != hist:
                raise SystemExit(f"{split}: user {users[uid]} differs from the project's split")
        ev.update(mapped, targets, history)
        seen += scores.shape[0]
    if want:
        raise SystemExit(f"{split}: {len(want)} project users missing from RecBole's split")
    print(f"[recbole] {split}: {seen} users, targets and histories equal to the project's")
    return ev.compute(split)


def train(config, args):
    """RecBole's own pipeline: dataset, leave-one-out split, Trainer.fit with early stopping."""
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_logger, init_seed

    # recbole/model/sequential_recommender/sine.py turns autograd anomaly detection on for the
    # whole process when the package is imported: it only checks for NaNs, and makes every
    # backward pass several times slower. Off again; results are unchanged.
    torch.autograd.set_detect_anomaly(False)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = SASRec(config, train_data._dataset).to(config["device"])
    trainer = Trainer(config, model)
    history: list[tuple[int, float]] = []
    t0 = time.perf_counter()

    def after_epoch(epoch: int, valid_score: float) -> None:
        history.append((epoch + 1, float(valid_score)))
        if args.max_minutes and time.perf_counter() - t0 > 60 * args.max_minutes:
            raise OutOfTime

    stopped = "early stopping or max epochs"
    checkpoint = args.checkpoint
    if checkpoint is None:
        try:
            trainer.fit(train_data, valid_data, saved=True, callback_fn=after_epoch)
        except OutOfTime:
            stopped = f"time budget ({args.max_minutes} min)"
        checkpoint = trainer.saved_model_file
    train_s = time.perf_counter() - t0
    # torch >= 2.6 loads weights only by default; RecBole's checkpoint also holds its Config.
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if args.checkpoint is not None:  # score only: the history comes from the checkpoint
        stopped = f"scored {checkpoint}"
        history.append((int(state["epoch"]) + 1, float(state["best_valid_score"])))
    model.load_state_dict(state["state_dict"])
    recbole_test = trainer.evaluate(test_data, load_best_model=False)
    return model, dataset, valid_data, test_data, history, train_s, stopped, dict(recbole_test)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default=str(ROOT / "outputs/recbole/beauty"))
    ap.add_argument(
        "--epochs", type=int, default=300, help="RecBole's default; early stopping ends it"
    )
    ap.add_argument(
        "--max-minutes", type=float, default=0, help="stop training after this (0: none)"
    )
    ap.add_argument("--seed", type=int, default=2020, help="RecBole's default seed")
    # RecBole's SASRec.yaml: lr 1e-3, batch 2048. The S3-Rec / CoSeRec / FMLP-Rec / BSARec code
    # bases train SASRec on Beauty at lr 1e-3, batch 256: 8x the updates per epoch, so it
    # converges in far fewer (CPU) hours at the same compute per epoch.
    ap.add_argument("--lr", type=float, default=0.001, help="RecBole's default learning rate")
    ap.add_argument("--batch-size", type=int, default=2048, help="RecBole's default batch")
    ap.add_argument("--stopping-step", type=int, default=10, help="RecBole's early-stop patience")
    ap.add_argument("--checkpoint", default=None, help="skip training: score this .pth")
    ap.add_argument("--out", default=str(ROOT / "bench/results/recbole_sasrec_beauty.json"))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    from recbole.config import Config

    data = Path(args.data).resolve()
    out = Path(args.out).resolve()
    sys.argv = sys.argv[:1]  # RecBole's Config would read our flags as its own settings
    os.chdir(data)  # RecBole writes log/ and log_tensorboard/ into the working directory
    t0 = time.perf_counter()
    config = Config(model="SASRec", dataset="beauty", config_dict=recbole_config(data, args))
    model, dataset, valid_data, test_data, history, train_s, stopped, recbole_test = train(
        config, args
    )
    ref = dict(np.load(data / "eval.npz"))
    n_items = ref["categories"].shape[0] - 1
    metrics = score_split(model, test_data, dataset, ref, "test", n_items)
    metrics |= score_split(model, valid_data, dataset, ref, "valid", n_items)
    total_s = time.perf_counter() - t0
    best_epoch, best_valid = max(history, key=lambda h: h[1]) if history else (0, float("nan"))
    result = {
        "model": "RecBole 1.2.1 SASRec (64-d, 2 layers, 2 heads, CE, max_len 50, dropout 0.5)",
        "data": str(data),
        "torch": torch.__version__,
        "seed": args.seed,
        "learning_rate": args.lr,
        "train_batch_size": args.batch_size,
        "epochs_run": len(history),
        "max_epochs": args.epochs,
        "stopped_by": stopped,
        "best_epoch": best_epoch,
        "best_valid_ndcg@10_recbole": best_valid,
        "train_s": round(train_s, 1),
        "wall_s": round(total_s, 1),
        "valid_ndcg@10_per_epoch": [round(v, 6) for _, v in history],
        "recbole_own_test": {k: float(v) for k, v in recbole_test.items()},
        "metrics": metrics,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"[recbole] wrote {out}")
    return 0


def print_table(result: dict) -> None:
    m = result["metrics"]
    print(
        f"\nRecBole SASRec on the project's splits ({result.get('data', 'Beauty')}): "
        f"{result['epochs_run']} epochs "
        f"({result['stopped_by']}), best valid epoch {result['best_epoch']}, "
        f"train {result['train_s'] / 60:.1f} min, wall {result['wall_s'] / 60:.1f} min"
    )
    print(
        f"{'protocol':<14}{'NDCG@10':>10}{'Recall@10':>11}{'NDCG@20':>10}{'Recall@20':>11}{'MRR':>9}"
    )
    for p in ("test", "test_unseen", "valid", "valid_unseen"):
        print(
            f"{p:<14}"
            + "".join(
                f"{m[f'{p}.{k}']:>{w}.6f}"
                for k, w in (
                    ("ndcg@10", 10),
                    ("recall@10", 11),
                    ("ndcg@20", 10),
                    ("recall@20", 11),
                    ("mrr", 9),
                )
            )
        )
    print(f"RecBole's own test evaluation: {result['recbole_own_test']}")


if __name__ == "__main__":
    sys.exit(main())
