"""Tiny synthetic raw files shaped like the real datasets, with known answers.

The real MovieLens / Taobao files may be absent (tests that need them skip); these few-line
files keep the same reading paths covered everywhere: the MovieLens directory and tarball
(with a bad rating), the Taobao time window (rows at and around both edges), and an iterated
k-core that needs four passes.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

# ----------------------------------------------------------------------------- MovieLens

# (user, item, rating, timestamp); item 3's rating 6 is outside 1..5 -> bad_rating.
ML_RATINGS = [
    (1, 1, 5, 881250949),
    (1, 2, 3, 881250950),
    (1, 3, 4, 881250951),
    (2, 1, 4, 881250960),
    (2, 3, 6, 881250961),  # bad_rating
    (2, 4, 1, 881250962),
    (3, 2, 2, 881250970),
    (3, 4, 5, 881250971),
]
# item -> genre flag positions (0..18, MovieLens's 19 genres: 0 unknown, 1 Action, ...)
ML_GENRES = {1: [1, 5], 2: [5], 3: [8, 16], 4: [0]}
ML_VALID = 7  # rows that are not bad_rating


def _u_data() -> bytes:
    return "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ML_RATINGS).encode()


def _u_item() -> bytes:
    lines = []
    for item, genres in ML_GENRES.items():
        flags = "|".join("1" if g in genres else "0" for g in range(19))
        # a Latin-1 title, as in the real file (Caf\xe9), read without a decode error
        lines.append(f"{item}|Caf\xe9 {item} (1995)|01-Jan-1995||http://x/{item}|{flags}")
    return ("\n".join(lines) + "\n").encode("latin-1")


def write_movielens(root: Path, tarball: bool = False) -> Path:
    """An ml-100k directory (u.data, u.item) under root, or its .tar.gz; returns the path."""
    if not tarball:
        out = root / "ml-100k"
        out.mkdir(parents=True, exist_ok=True)
        (out / "u.data").write_bytes(_u_data())
        (out / "u.item").write_bytes(_u_item())
        return out
    path = root / "ml-100k.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("ml-100k/u.data", _u_data()), ("ml-100k/u.item", _u_item())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# ----------------------------------------------------------------------------- Taobao window

TAOBAO_LO, TAOBAO_HI = 1511539200, 1512316800  # jobs/configs/taobao.yaml: [lo, hi)
# (user, item, category, behavior, timestamp, kept by the window?)
TAOBAO_ROWS = [
    (1, 10, 100, "pv", TAOBAO_LO - 1, False),  # one second early
    (1, 11, 100, "pv", TAOBAO_LO, True),  # the lower edge is inside
    (1, 12, 101, "cart", TAOBAO_LO + 3600, True),
    (2, 10, 100, "buy", TAOBAO_HI - 1, True),  # the last second inside
    (2, 13, 101, "fav", TAOBAO_HI, False),  # the upper edge is outside
    (3, 14, 102, "pv", 0, False),  # 1970: a corrupt stamp
    (3, 15, 102, "pv", TAOBAO_HI + 86400, False),
]


def write_taobao(path: Path, rows=TAOBAO_ROWS) -> Path:
    """A headerless Taobao UserBehavior CSV of `rows` (user, item, category, behavior, ts, ...)."""
    path.write_text("".join(f"{u},{i},{c},{b},{t}\n" for u, i, c, b, t, *_ in rows))
    return path


# ----------------------------------------------------------------------------- k-core

# k = 2 (users also need min_user_events = 3), a cascade of four passes:
#   1. items T, U (1 event) go, so user 3 (Q left) goes and Q falls to 1;
#   2. Q goes, so user 1 (P, R left) goes and P, R fall to 1;
#   3. P, R go, so user 2 (F, W left) goes and W falls to 1;
#   4. W goes, so user 7 (G, H left) goes and G, H fall to 2.
# Stable: items F, G, H with 2 events each, users 5 and 6. Stopping after one, two or three
# passes keeps extra items or wrong counts.
P, Q, R, T, U, F, G, H, W = 1, 2, 3, 4, 5, 6, 7, 8, 9
KCORE_USERS = {
    1: [P, Q, R],
    2: [P, R, F, W],
    3: [Q, T, U],
    5: [F, G, H],
    6: [F, G, H],
    7: [W, G, H],
}
KCORE_COUNTS, KCORE_KEPT_USERS = {F: 2, G: 2, H: 2}, {5, 6}


def write_kcore_log(path: Path) -> Path:
    """The k-core log above as a Taobao CSV (one category per item, pv events, 1 s apart)."""
    rows = [
        (user, item, 100 + item, "pv", TAOBAO_LO + 10 * user + n)
        for user, items in KCORE_USERS.items()
        for n, item in enumerate(items)
    ]
    return write_taobao(path, rows)
