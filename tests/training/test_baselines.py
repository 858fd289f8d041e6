"""Baselines (``training.baselines``) beat random on a tiny planted data set, and the paired
bootstrap (``training.ranking.paired_bootstrap_ci``) gives the known answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.baselines import DAY_MS, BPRConfig, ItemKNN, choose_window, holdout, popularity, train_bpr
from training.ranking import paired_bootstrap_ci, rank_metrics

N_USERS, N_ITEMS, GROUPS, K = 120, 200, 10, 10


def planted(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each user buys mostly inside its group's items (items ``i % GROUPS == group``), one
    purchase a day; the first 30 items are 'old hits' bought by everybody early on, and items
    of the 'trend' block (100..119) are what everybody buys in the last 20 days."""
    rng = np.random.default_rng(seed)
    users, items, ts = [], [], []
    for u in range(N_USERS):
        own = np.flatnonzero(np.arange(N_ITEMS) % GROUPS == u % GROUPS)
        for day in range(60):
            if day < 20 and rng.random() < 0.5:
                i = int(rng.integers(0, 30))
            elif day >= 40 and rng.random() < 0.5:
                i = int(rng.integers(100, 120))
            else:
                i = int(rng.choice(own))
            users.append(u)
            items.append(i)
            ts.append(day * DAY_MS + int(rng.integers(0, DAY_MS)))
    return np.asarray(users), np.asarray(items), np.asarray(ts)


@pytest.fixture(scope="module")
def data():
    return planted()


def random_recall(h) -> float:
    g = torch.Generator().manual_seed(0)
    return rank_metrics(lambda b: torch.rand(len(b), N_ITEMS, generator=g), h.users, h.targets, h.exclude, K)[f"recall@{K}"]


def test_recent_popularity_picks_a_short_window_and_beats_random(data):
    users, items, ts = data
    h = holdout(users, items, ts, 0.2)
    window, val = choose_window(users[h.train], items[h.train], ts[h.train], N_ITEMS, k=K)
    assert window is not None and window <= 14, val  # the trend, not the old hits
    tu, ti, tt = users[h.train], items[h.train], ts[h.train]
    pop = torch.as_tensor(popularity(tu, ti, tt, N_ITEMS, h.cut - window * DAY_MS))
    recent = rank_metrics(lambda b: pop.unsqueeze(0).expand(len(b), -1), h.users, h.targets, h.exclude, K)[f"recall@{K}"]
    alltime = torch.as_tensor(popularity(tu, ti, tt, N_ITEMS))
    old = rank_metrics(lambda b: alltime.unsqueeze(0).expand(len(b), -1), h.users, h.targets, h.exclude, K)[f"recall@{K}"]
    assert recent > old and recent > 2 * random_recall(h), (recent, old, random_recall(h))


def test_popularity_counts_distinct_users_in_the_window():
    users = np.array([0, 0, 1, 2])
    items = np.array([1, 1, 1, 2])
    ts = np.array([0, 5, 10, 20])
    assert popularity(users, items, ts, 3).tolist() == [0, 2, 1]
    assert popularity(users, items, ts, 3, since_ms=10).tolist() == [0, 1, 1]


def test_item_knn_beats_random(data):
    users, items, ts = data
    h = holdout(users, items, ts, 0.2)
    knn = ItemKNN(users[h.train], items[h.train], N_USERS, N_ITEMS)
    assert torch.allclose(knn.sim, knn.sim.t()) and float(knn.sim.diagonal().abs().max()) == 0.0
    got = rank_metrics(lambda b: knn.score([h.exclude[list(h.users).index(int(u))] for u in b]), h.users, h.targets, h.exclude, K)
    assert got[f"recall@{K}"] > 2 * random_recall(h), got


def test_bpr_beats_random_and_is_deterministic(data):
    users, items, ts = data
    h = holdout(users, items, ts, 0.2)
    cfg = BPRConfig(dim=16, lr=2e-2, max_epochs=15, k=K, batch_size=512, seed=1)
    tu, ti, tt = users[h.train], items[h.train], ts[h.train]
    mf = train_bpr(tu, ti, tt, N_USERS, N_ITEMS, cfg)
    got = rank_metrics(mf.score, h.users, h.targets, h.exclude, K)
    assert got[f"recall@{K}"] > 2 * random_recall(h), got
    assert 1 <= mf.epochs <= cfg.max_epochs and len(mf.val_curve) >= mf.epochs
    again = train_bpr(tu, ti, tt, N_USERS, N_ITEMS, cfg)
    assert torch.equal(mf.user, again.user) and torch.equal(mf.item, again.item)


def test_items_without_history_score_lowest():
    users, items, ts = np.array([0, 1, 1]), np.array([0, 0, 1]), np.array([0, 1, 2])
    mf = train_bpr(users, items, ts, 2, 4, BPRConfig(dim=4, max_epochs=2, val_fraction=0.5))
    s = mf.score(np.array([0, 1]))
    assert (s[:, 2:] < s[:, :2].min()).all()
    knn = ItemKNN(users, items, 2, 4)
    assert (knn.score([np.array([0])])[:, 2:] == 0).all()


def test_bootstrap_constant_difference_is_exact():
    rng = np.random.default_rng(0)
    b = rng.random(500)
    ci = paired_bootstrap_ci(b + 0.05, b, resamples=200, seed=1)
    assert ci["diff"] == pytest.approx(0.05) and ci["lo"] == pytest.approx(0.05) and ci["hi"] == pytest.approx(0.05)


def test_bootstrap_matches_the_normal_interval():
    rng = np.random.default_rng(0)
    n = 4000
    a = rng.normal(0.1, 1.0, n)
    b = np.zeros(n)
    ci = paired_bootstrap_ci(a, b, resamples=2000, seed=0)
    se = a.std(ddof=1) / np.sqrt(n)
    assert ci["lo"] == pytest.approx(a.mean() - 1.96 * se, abs=0.2 * se)
    assert ci["hi"] == pytest.approx(a.mean() + 1.96 * se, abs=0.2 * se)
    assert paired_bootstrap_ci(a, b, resamples=2000, seed=0) == ci  # seeded


def test_bootstrap_is_paired():
    """Two methods that differ by a little on every user, with large user-to-user variance:
    the paired interval is tight and excludes 0 (an unpaired one would not)."""
    rng = np.random.default_rng(0)
    base = rng.random(300)
    ci = paired_bootstrap_ci(base + 0.01 + rng.normal(0, 0.001, 300), base, resamples=500)
    assert 0.009 < ci["lo"] < ci["hi"] < 0.011
    with pytest.raises(ValueError):
        paired_bootstrap_ci(np.zeros(3), np.zeros(4))
