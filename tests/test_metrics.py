"""Streaming NC metrics against dense reference formulas computed from all features at once."""

from __future__ import annotations

import datetime
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from gnc import metrics as metrics_module
from gnc.metrics import NCStatistics, etf_distances, nc_metrics
from gnc.validation import trusted_inputs

K, D, N = 4, 6, 50
TOL = {"rel": 1e-8, "abs": 1e-10}
SCALAR_KEYS = (
    "nc1", "nc2", "nc2_h", "nc3", "nc4_bias", "ncc_mismatch", "w_equinorm", "h_equinorm",
    "wh_equinorm", "avg_cos_margin", "top1", "top5", "vci", "numerical_rank",
)


def make_data(seed: int = 0, n: int = N) -> dict[str, torch.Tensor]:
    """Unbalanced float64 data: noisy class centres, a random classifier, network logits."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.arange(K), torch.randint(0, K, (n - K,), generator=g)])
    labels = labels[torch.randperm(n, generator=g)]
    centres = 2.0 * torch.randn(K, D, generator=g, dtype=torch.float64)
    features = centres[labels] + torch.randn(n, D, generator=g, dtype=torch.float64) + 3.0
    W = torch.randn(K, D, generator=g, dtype=torch.float64)
    b = torch.randn(K, generator=g, dtype=torch.float64)
    logits = features @ W.T + b + 2.0 * torch.randn(n, K, generator=g, dtype=torch.float64)
    return {"features": features, "labels": labels, "W": W, "b": b, "logits": logits}


def etf_distance(G: torch.Tensor) -> float:
    k = G.shape[0]
    M = torch.eye(k, dtype=G.dtype) - torch.ones(k, k, dtype=G.dtype) / k
    return float(torch.linalg.norm(G / torch.linalg.norm(G) - M / math.sqrt(k - 1)))


def dense_metrics(h, y, W, b, logits=None, ncc_logits=None) -> dict:
    """The definitions, written out sample by sample (DESIGN §1 "NC metrics")."""
    n, k = h.shape[0], W.shape[0]
    ncc_logits = (h @ W.T + b if logits is None else logits) if ncc_logits is None else ncc_logits
    logits = h @ W.T + b if logits is None else logits
    mu_G = h.mean(dim=0)
    mu = torch.stack([h[y == c].mean(dim=0) for c in range(k)])
    sigma_W = sum(torch.outer(h[i] - mu[y[i]], h[i] - mu[y[i]]) for i in range(n)) / n
    sigma_B = sum(torch.outer(mu[c] - mu_G, mu[c] - mu_G) for c in range(k)) / k
    H = (mu - mu_G).T
    Wt = W - W.mean(dim=0)
    margins, mismatch, top1, top5 = [], 0, 0, 0
    for i in range(n):
        cos = [float(F.cosine_similarity(h[i] - mu_G, Wt[c], dim=0)) for c in range(k)]
        margins.append(cos[y[i]] - max(cos[c] for c in range(k) if c != y[i]))
        ncc = min(range(k), key=lambda c: float(torch.linalg.norm(h[i] - mu[c])))
        mismatch += int(int(ncc_logits[i].argmax()) != ncc)
        order = sorted(range(k), key=lambda c: -float(logits[i, c]))
        top1 += int(order[0] == y[i])
        top5 += int(int(y[i]) in order[: min(5, k)])
    # VCI as the released code (scipy.linalg.pinv's default cut: singular values <= d·eps·max)
    sigma_T = sigma_W + sigma_B
    vci = 1.0 - float(torch.trace(torch.linalg.pinv(sigma_T) @ sigma_B)) / min(h.shape[1], k - 1)
    # numerical rank: the SVD of each class's raw feature matrix (n_c x d)
    ranks = []
    for c in range(k):
        s = torch.linalg.svdvals(h[y == c])
        ranks.append(float(s.sum() ** 2 / torch.linalg.matrix_norm(h[y == c]) ** 2))
    w_eq = float(W.norm(dim=1).std() / W.norm(dim=1).mean())
    h_eq = float(H.norm(dim=0).std() / H.norm(dim=0).mean())
    return {
        "nc1": float(torch.trace(sigma_W @ torch.linalg.pinv(sigma_B))) / k,
        "nc2": etf_distance(W @ W.T),
        "nc2_h": etf_distance(H.T @ H),
        "nc3": etf_distance(W @ H),
        "nc4_bias": float(torch.linalg.norm(W @ mu_G + b)),
        "ncc_mismatch": 100.0 * mismatch / n,
        "w_equinorm": w_eq,
        "h_equinorm": h_eq,
        "wh_equinorm": abs(w_eq - h_eq),
        "avg_cos_margin": sum(margins) / n,
        "cos_margins": torch.tensor(sorted(margins), dtype=torch.float64),
        "top1": 100.0 * top1 / n,
        "top5": 100.0 * top5 / n,
        "vci": vci,
        "numerical_rank": sum(ranks) / k,
    }


def assert_metrics_close(got: dict, expected: dict) -> None:
    assert set(got) == set(SCALAR_KEYS) | {"cos_margins", "missing_classes"}
    assert got["missing_classes"] == []
    for key in SCALAR_KEYS:
        assert isinstance(got[key], float), key
        assert got[key] == pytest.approx(expected[key], **TOL), key
    margins = got["cos_margins"]
    assert margins.device.type == "cpu" and margins.ndim == 1
    torch.testing.assert_close(margins, expected["cos_margins"], rtol=1e-8, atol=1e-10)


def chunks(n: int, sizes: list[int]) -> list[slice]:
    bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    assert bounds[-1] == n
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def stream(data: dict, sizes: list[int], mode: str = "none") -> NCStatistics:
    """Both passes over ``data`` in batches; ``mode``: which pass gets the network's logits."""
    h, y, W, b, z = (data[k] for k in ("features", "labels", "W", "b", "logits"))
    stats = NCStatistics(K, D)
    for s in chunks(h.shape[0], sizes):
        stats.update(h[s], y[s], z[s] if mode in ("both", "pass1") else None)
    for s in chunks(h.shape[0], sizes):
        stats.update_margins(h[s], y[s], W, b, z[s] if mode == "both" else None)
    return stats


SPLITS = [[N], [1, N - 1], [17, 3, 30], [7] * 7 + [1], [25, 0, 25]]


@pytest.mark.parametrize("sizes", SPLITS, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("mode", ["none", "both", "pass1"])
def test_streaming_equals_dense(sizes, mode):
    data = make_data()
    h, y, W, b, z = (data[k] for k in ("features", "labels", "W", "b", "logits"))
    # "pass1": top-k from the network's logits of pass 1, NCC from pass 2's default logits
    logits = None if mode == "none" else z
    ncc_logits = h @ W.T + b if mode == "pass1" else None
    expected = dense_metrics(h, y, W, b, logits=logits, ncc_logits=ncc_logits)
    assert_metrics_close(stream(data, sizes, mode).compute(W, b), expected)


@pytest.mark.parametrize("sizes", SPLITS, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("pending", [metrics_module.PENDING_BYTES, 8 * D * 8],
                         ids=["one-flush", "flush-every-8-rows"])
def test_deferred_checks_give_the_same_metrics(monkeypatch, sizes, pending):
    # inside trusted_inputs (the evaluation loop) nothing is read back per batch: the value
    # checks are deferred and the per-class second moments added class by class per flush
    monkeypatch.setattr(metrics_module, "PENDING_BYTES", pending)
    data = make_data()
    h, y, W, b, z = (data[k] for k in ("features", "labels", "W", "b", "logits"))
    with trusted_inputs():
        stats = stream(data, sizes, "both")
    got = stats.compute(W, b)
    expected = dense_metrics(h, y, W, b, logits=z)
    for key in SCALAR_KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key
    torch.testing.assert_close(got["cos_margins"], expected["cos_margins"], rtol=1e-9,
                               atol=1e-12)
    # the per-class second moments against the per-class products, one class at a time
    moments = torch.stack([h[y == c].T @ h[y == c] for c in range(K)])
    torch.testing.assert_close(stats._global.class_moments, moments, rtol=1e-12, atol=1e-12)


def test_nc_metrics_function_and_float32_inputs():
    data = make_data(seed=1)
    h, y, W, b = (data[k] for k in ("features", "labels", "W", "b"))
    assert_metrics_close(nc_metrics(h, y, W, b), dense_metrics(h, y, W, b))
    got = nc_metrics(h.float(), y.int(), W.float(), b.float())
    expected = dense_metrics(h.float().double(), y, W.float().double(), b.float().double())
    for key in SCALAR_KEYS:
        assert got[key] == pytest.approx(expected[key], **TOL), key


def test_compute_is_repeatable_and_reset_forgets():
    data = make_data()
    stats = stream(data, [20, 30])
    first, second = stats.compute(data["W"], data["b"]), stats.compute(data["W"], data["b"])
    assert {k: first[k] for k in SCALAR_KEYS} == {k: second[k] for k in SCALAR_KEYS}
    stats.reset()
    with pytest.raises(ValueError, match="No samples in pass 1"):
        stats.compute(data["W"], data["b"])


def simplex_etf(k: int, d: int, seed: int = 0) -> torch.Tensor:
    """K x d rows with unit norm and pairwise cosine -1/(K-1)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    M = torch.eye(k, dtype=torch.float64) - 1.0 / k
    return math.sqrt(k / (k - 1)) * M @ U.T


@pytest.mark.parametrize("k", [2, 5])
def test_perfect_collapse(k):
    d, per_class = 7, 6
    W = simplex_etf(k, d)
    y = torch.arange(k).repeat(per_class)
    offset = torch.linspace(-1.0, 2.0, d, dtype=torch.float64)
    h = 3.0 * W[y] + offset  # features at the (scaled) ETF vertices of their class
    b = -W @ offset  # b = -W μ_G
    got = nc_metrics(h, y, W, b)
    for key in ("nc1", "nc2", "nc2_h", "nc3", "nc4_bias", "w_equinorm", "h_equinorm",
                "wh_equinorm", "ncc_mismatch", "vci"):
        assert got[key] == pytest.approx(0.0, abs=1e-10), key
    # every class's raw features are one vector repeated: rank one, whatever the offset
    assert got["numerical_rank"] == pytest.approx(1.0, abs=1e-10)
    torch.testing.assert_close(got["cos_margins"], torch.full((k * per_class,), k / (k - 1),
                                                              dtype=torch.float64))
    assert got["avg_cos_margin"] == pytest.approx(k / (k - 1), rel=1e-12)
    assert got["top1"] == 100.0 and got["top5"] == 100.0


def test_vci_and_numerical_rank_against_dense_definitions_of_larger_data():
    # d = 9 > K - 1 = 4 and classes of 3 samples (n_c < d: rank-deficient H_c, where the
    # Gram route must not count rounding noise as singular values)
    g = torch.Generator().manual_seed(5)
    k, d = 5, 9
    y = torch.arange(k).repeat_interleave(torch.tensor([3, 3, 12, 20, 3]))
    h = 4.0 * torch.randn(k, d, generator=g, dtype=torch.float64)[y]
    h = h + torch.randn(len(y), d, generator=g, dtype=torch.float64) + 1.5
    W, b = torch.randn(k, d, generator=g, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    got, want = nc_metrics(h, y, W, b), dense_metrics(h, y, W, b)
    for key in ("vci", "numerical_rank"):
        assert got[key] == pytest.approx(want[key], rel=1e-9), key
    assert 0.0 < got["vci"] < 1.0 and 1.0 < got["numerical_rank"] < 9.0


def test_vci_fast_path_equals_the_pseudo_inverse_route():
    from gnc.metrics import _vci

    g = torch.Generator().manual_seed(8)
    for d, k, n in ((9, 5, 60), (6, 8, 80), (12, 4, 8)):  # d > K-1, d < K-1, N < d (singular)
        y = torch.arange(k).repeat(n // k)
        h = torch.randn(k, d, generator=g, dtype=torch.float64)[y]
        h = h + 0.3 * torch.randn(len(y), d, generator=g, dtype=torch.float64)
        means = torch.stack([h[y == c].mean(0) for c in range(k)])
        H = (means - h.mean(0)).T
        centred = h - means[y]
        sigma_W = centred.T @ centred / len(y)
        fast, exact = _vci(sigma_W, H), _vci(sigma_W, H, exact_pinv=True)
        assert fast == pytest.approx(exact, rel=1e-9, abs=1e-12), (d, k, n)


@pytest.mark.parametrize("offset,noise", [(1e4, 1e-6), (1e5, 1e-4), (1e5, 1e-2)])
def test_within_class_covariance_survives_a_large_common_offset(offset, noise):
    """Σ_W from the centred features of pass 2: NC1 and VCI of features that share an offset
    large against their spread equal the two-pass definition (the one-pass Σ hhᵀ − Σ n_c μμᵀ
    gave NC1 = −1.4e-7 for 1.3e-12 at (1e4, 1e-6), 5 % off at (1e5, 1e-2))."""
    g = torch.Generator().manual_seed(11)
    n, k, d = 400, 4, 8
    y = torch.arange(n) % k
    h = torch.randn(k, d, generator=g, dtype=torch.float64)[y] + offset
    h = h + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    W, b = torch.randn(k, d, generator=g, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    got = nc_metrics(h, y, W, b)
    nc1, vci = reference_nc1_vci(h, y, list(range(k)))
    assert got["nc1"] == pytest.approx(nc1, rel=1e-6)
    assert 0 <= got["vci"] <= 1  # the one-pass Σ_W gave −6.4e-7 at (1e4, 1e-6)
    if noise >= 1e-2:  # else VCI ~ noise² and pinv's own rounding (eps·cond(Σ_T)) is larger
        assert got["vci"] == pytest.approx(vci, rel=1e-6)


def test_vci_of_nearly_dead_features_is_the_pseudo_inverse_value():
    """Features with directions of variance ~1e-18 (below the pinv cut d·eps·λ_max): the
    Cholesky fast path factorises such a Σ_T, but H's real component along those directions
    made its trace differ from the pinv definition by 3 %; it now falls back."""
    from gnc.metrics import _vci

    g = torch.Generator().manual_seed(0)
    n, k, d = 400, 4, 20
    y = torch.arange(n) % k
    h = torch.randn(k, d, generator=g, dtype=torch.float64)[y]
    h = h + torch.randn(n, d, generator=g, dtype=torch.float64)
    h[:, 10:] = 1e-9 * torch.randn(n, 10, generator=g, dtype=torch.float64)
    means = torch.stack([h[y == c].mean(0) for c in range(k)])
    H = (means - h.mean(0)).T
    centred = h - means[y]
    sigma_W = centred.T @ centred / n
    exact = _vci(sigma_W, H, exact_pinv=True)
    assert _vci(sigma_W, H) == pytest.approx(exact, rel=1e-9)
    assert nc_metrics(h, y, torch.randn(k, d, dtype=torch.float64), None)["vci"] == \
        pytest.approx(exact, rel=1e-9)


def test_vci_limits():
    # VCI = 1 − tr(Σ_T†Σ_B)/min(d, K−1): 0 at exact variability collapse (Σ_W = 0, asserted in
    # test_perfect_collapse) and → 1 when the class means carry none of the variance
    g = torch.Generator().manual_seed(6)
    y = torch.arange(3).repeat(40)
    h = torch.randn(120, D, generator=g, dtype=torch.float64)
    h = h + 1e-4 * torch.randn(3, D, generator=g, dtype=torch.float64)[y]
    W, b = torch.randn(3, D, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    assert nc_metrics(h, y, W, b)["vci"] == pytest.approx(1.0, abs=0.1)


def test_numerical_rank_memory_budget(caplog):
    data = make_data()
    h, y, W, b = (data[k] for k in ("features", "labels", "W", "b"))
    full = nc_metrics(h, y, W, b)
    need = K * D * D * 8
    assert NCStatistics(K, D, class_moments_bytes=need).keeps_class_moments
    metrics_module._warned_rank_budget.discard((K, D))
    with caplog.at_level("WARNING", logger="gnc.metrics"):
        small = [NCStatistics(K, D, class_moments_bytes=need - 1) for _ in range(2)]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "numerical_rank is NaN" in warnings[0]  # once per (K, d)
    stats = small[0]
    assert not stats.keeps_class_moments
    stats.update(h, y)
    stats.update_margins(h, y, W, b)
    got = stats.compute(W, b)
    assert math.isnan(got["numerical_rank"])
    for key in set(SCALAR_KEYS) - {"numerical_rank"}:  # nothing else changes
        assert got[key] == full[key], key
    with pytest.raises(ValueError, match="`class_moments_bytes` >= 0, but got -1"):
        NCStatistics(K, D, class_moments_bytes=-1)


def dense_nearest_etf(Y: torch.Tensor) -> torch.Tensor:
    """U M/√(K−1) for the polar factor U of Y M, from a plain SVD (rank K−1 part only: the
    direction 1/√K that M removes does not enter)."""
    k = Y.shape[1]
    A, S, Bh = torch.linalg.svd(Y - Y.mean(dim=1, keepdim=True), full_matrices=False)
    return A[:, : k - 1] @ Bh[: k - 1] / math.sqrt(k - 1)


def test_etf_distances_of_an_exact_etf_are_zero():
    k, d = 5, 9
    W = 3.0 * simplex_etf(k, d, seed=1)  # rows: any scale
    H = 0.7 * simplex_etf(k, d, seed=2).T  # another rotation
    got, state = etf_distances(W, H)
    assert got["etf_w_dist"] == pytest.approx(0.0, abs=1e-12)
    assert got["etf_h_dist"] == pytest.approx(0.0, abs=1e-12)
    expected_wh = float(torch.linalg.norm(W.T / W.norm() - H / H.norm()))
    assert got["etf_wh_dist"] == pytest.approx(expected_wh, rel=1e-10)
    assert math.isnan(got["etf_w_moved"]) and math.isnan(got["etf_h_moved"])
    again, _ = etf_distances(W, H, state)
    assert again["etf_w_moved"] == pytest.approx(0.0, abs=1e-12)
    assert again["etf_h_moved"] == pytest.approx(0.0, abs=1e-12)


def test_etf_distances_against_a_dense_reference():
    g = torch.Generator().manual_seed(7)
    k, d = 4, 7
    W1, W2 = (torch.randn(k, d, generator=g, dtype=torch.float64) for _ in range(2))
    H1, H2 = (torch.randn(d, k, generator=g, dtype=torch.float64) for _ in range(2))
    _, state = etf_distances(W1, H1)
    got, _ = etf_distances(W2, H2, state)
    E = {name: dense_nearest_etf(Y / Y.norm())
         for name, Y in (("w1", W1.T), ("w2", W2.T), ("h1", H1), ("h2", H2))}
    norm = torch.linalg.norm
    want = {"etf_w_dist": norm(W2.T / W2.norm() - E["w2"]), "etf_h_dist": norm(H2 / H2.norm()
                                                                               - E["h2"]),
            "etf_wh_dist": norm(E["w2"] - E["h2"]), "etf_w_moved": norm(E["w2"] - E["w1"]),
            "etf_h_moved": norm(E["h2"] - E["h1"])}
    for key, value in want.items():
        assert got[key] == pytest.approx(float(value), rel=1e-9), key
        assert 0.0 < got[key] < 2.0, key


def test_etf_distances_undefined_cases_are_nan():
    g = torch.Generator().manual_seed(8)
    W = torch.randn(4, 6, generator=g, dtype=torch.float64)
    H = torch.randn(6, 4, generator=g, dtype=torch.float64)
    missing, state = etf_distances(W, H[:, :3])  # a split without class 3
    assert math.isfinite(missing["etf_w_dist"]) and set(state) == {"etf_w"}
    assert all(math.isnan(missing[k]) for k in ("etf_h_dist", "etf_wh_dist", "etf_h_moved"))
    zero, _ = etf_distances(torch.zeros(4, 6, dtype=torch.float64), H)
    assert math.isnan(zero["etf_w_dist"]) and math.isfinite(zero["etf_h_dist"])
    narrow, state = etf_distances(torch.randn(4, 3, dtype=torch.float64),
                                  torch.randn(3, 4, dtype=torch.float64))  # d < K: no ETF
    assert state == {} and all(math.isnan(v) for v in narrow.values())


def test_nc1_nan_when_class_means_coincide():
    h = torch.randn(8, D, dtype=torch.float64)
    h = torch.cat([h, h])  # every class has the same mean
    y = torch.cat([torch.zeros(8), torch.ones(8)]).long()
    W, b = torch.randn(2, D, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    assert math.isnan(nc_metrics(h, y, W, b)["nc1"])


# --------------------------------------------------------------------------- bad inputs

BAD_UPDATES = [
    ({"features": torch.zeros(D)}, r"Expected `features` to have shape \(N, d=6\), but got \(6,\)"),
    ({"features": torch.zeros(3, 5)}, r"shape \(N, d=6\), but got \(3, 5\)"),
    ({"features": torch.zeros(3, D, dtype=torch.long)}, "`features` to be floating point"),
    ({"features": torch.full((3, D), math.nan)}, "`features` to be finite"),
    ({"features": torch.full((3, D), math.inf)}, "`features` to be finite"),
    ({"labels": torch.zeros(4).long()}, r"`labels` to have shape \(N=3,\), but got \(4,\)"),
    ({"labels": torch.zeros(3, 1).long()}, r"`labels` to have shape \(N=3,\)"),
    ({"labels": torch.zeros(3)}, "`labels` to be an integer tensor, but got torch.float32"),
    ({"labels": torch.tensor([0, 1, K])}, r"`labels` to be in \[0, K=4\), but got .*\[0, 4\]"),
    ({"labels": torch.tensor([0, -1, 1])}, r"`labels` to be in \[0, K=4\)"),
    ({"logits": torch.zeros(3, K + 1)}, r"`logits` to have shape \(N=3, K=4\)"),
    ({"logits": torch.full((3, K), math.nan)}, "`logits` to be finite"),
]
BAD_CLASSIFIERS = [
    ({"W": torch.zeros(K, D + 1)}, r"Expected `W` to have shape \(K=4, d=6\), but got \(4, 7\)"),
    ({"b": torch.zeros(K, 1)}, r"Expected `b` to have shape \(K=4,\)"),
    ({"W": torch.full((K, D), math.inf)}, "`W` and `b` to be finite"),
]


def good_batch() -> dict:
    """Three valid samples (with the classifier), to be spoiled one argument at a time."""
    data = make_data(seed=2)
    data = {k: data[k][:3] for k in ("features", "logits")} | {"W": data["W"], "b": data["b"]}
    return data | {"labels": torch.tensor([0, 1, 2])}


@pytest.mark.parametrize(("bad", "match"), BAD_UPDATES)
def test_update_rejects_bad_inputs_and_keeps_state(bad, match):
    data = make_data()
    h, y, W, b, z = (data[k] for k in ("features", "labels", "W", "b", "logits"))
    args = good_batch() | bad
    stats = NCStatistics(K, D)
    stats.update(h[:20], y[:20], z[:20])
    with pytest.raises(ValueError, match=match):
        stats.update(args["features"], args["labels"], args["logits"])
    stats.update(h[20:], y[20:], z[20:])
    for s in (slice(0, 20), slice(20, N)):
        stats.update_margins(h[s], y[s], W, b)
    expected = dense_metrics(h, y, W, b, logits=z, ncc_logits=h @ W.T + b)
    assert_metrics_close(stats.compute(W, b), expected)


@pytest.mark.parametrize(("bad", "match"), BAD_UPDATES + BAD_CLASSIFIERS)
def test_update_margins_rejects_bad_inputs_and_keeps_state(bad, match):
    data = make_data()
    h, y, W, b = (data[k] for k in ("features", "labels", "W", "b"))
    stats = NCStatistics(K, D)
    stats.update(h, y)
    stats.update_margins(h[:20], y[:20], W, b)
    args = good_batch() | bad
    with pytest.raises(ValueError, match=match):
        stats.update_margins(args["features"], args["labels"], args["W"], args["b"],
                             args["logits"])
    stats.update_margins(h[20:], y[20:], W, b)
    assert_metrics_close(stats.compute(W, b), dense_metrics(h, y, W, b))


@pytest.mark.parametrize(("bad", "match"), BAD_CLASSIFIERS)
def test_compute_rejects_bad_classifier(bad, match):
    data = make_data()
    stats = stream(data, [N])
    args = {"W": data["W"], "b": data["b"]} | bad
    with pytest.raises(ValueError, match=match):
        stats.compute(**args)


def test_compute_needs_a_complete_pass_two():
    data = make_data()
    h, y, W, b = (data[k] for k in ("features", "labels", "W", "b"))
    stats = NCStatistics(K, D)
    stats.update(h, y)
    with pytest.raises(ValueError, match=r"Missing pass 2: call update_margins.*cos_margins"):
        stats.compute(W, b)
    stats.update_margins(h[:10], y[:10], W, b)
    with pytest.raises(ValueError, match="pass 2 to see the 50 samples of pass 1, but it saw 10"):
        stats.compute(W, b)


def test_pass_order_and_empty_classes():
    data = make_data()
    h, y, W, b = (data[k] for k in ("features", "labels", "W", "b"))
    stats = NCStatistics(K, D)
    with pytest.raises(ValueError, match="No samples in pass 1"):
        stats.update_margins(h, y, W, b)
    stats.reset()
    keep = y != 3
    stats.update(h[keep], y[keep])
    stats.update_margins(h[keep], y[keep], W, b)
    with pytest.raises(RuntimeError, match=r"after pass 2 started; call reset\(\)"):
        stats.update(h, y)


def test_missing_class_metrics_over_present_classes():
    # A test split may lack a class: NC1/NC2(H)/NC3 cover the present classes, the result
    # names the missing ones, and the classifier's own metrics keep all K rows.
    data = make_data()
    h, y, W, b = (data[k] for k in ("features", "labels", "W", "b"))
    keep = y != 3
    got = nc_metrics(h[keep], y[keep], W, b)
    assert got["missing_classes"] == [3]
    present = dense_metrics(h[keep], y[keep], W[:3], b[:3])  # classes 0..2 = rows 0..2
    for key in ("nc1", "nc2_h", "nc3", "h_equinorm", "vci", "numerical_rank"):
        assert got[key] == pytest.approx(present[key], **TOL), key
    full = dense_metrics(h, y, W, b)
    for key in ("nc2", "w_equinorm"):
        assert got[key] == pytest.approx(full[key], **TOL), key
    top1 = 100.0 * float(((h[keep] @ W.T + b).argmax(1) == y[keep]).double().mean())
    assert got["top1"] == pytest.approx(top1, **TOL)
    one = nc_metrics(h[y == 1], y[y == 1], W, b)
    assert one["missing_classes"] == [0, 2, 3]
    assert all(math.isnan(one[k]) for k in ("nc1", "nc2_h", "nc3", "h_equinorm", "vci"))
    assert math.isfinite(one["nc2"]) and math.isfinite(one["avg_cos_margin"])


def test_constructor_and_nc_metrics_validate():
    with pytest.raises(ValueError, match="Expected `K` >= 2, but got 1"):
        NCStatistics(1, D)
    with pytest.raises(ValueError, match="Expected `d` >= 1, but got 0"):
        NCStatistics(K, 0)
    with pytest.raises(ValueError, match=r"Expected `W` to have shape \(K, d\), but got \(4,\)"):
        nc_metrics(torch.zeros(3, D), torch.zeros(3).long(), torch.zeros(K), torch.zeros(K))


# --------------------------------------------------------------------------- compute()'s cost


def reference_numerical_rank(moments: torch.Tensor) -> float:
    """The definition, class by class: one eigvalsh of each S_c (eigenvalues below
    d·eps·λ_max set to 0), (Σ√λ)²/tr(S_c), averaged over the classes with features."""
    values = []
    for S in moments:
        lam = torch.linalg.eigvalsh(S)
        lam = torch.where(lam > S.shape[0] * torch.finfo(lam.dtype).eps * lam[-1].clamp_min(0),
                          lam, torch.zeros_like(lam))
        if float(torch.trace(S)) > 0:
            values.append(float(lam.sqrt().sum()) ** 2 / float(torch.trace(S)))
    return sum(values) / len(values) if values else math.nan


def reference_nc1_vci(h: torch.Tensor, y: torch.Tensor, classes: list[int]) -> tuple[float, float]:
    """NC1 and VCI over the given classes with torch.linalg.pinv (the released code's way)."""
    n, d, k = h.shape[0], h.shape[1], len(classes)
    mu = torch.stack([h[y == c].mean(dim=0) for c in classes])
    H = (mu - h.mean(dim=0)).T
    centred = h - mu[torch.searchsorted(torch.tensor(classes), y)]
    sigma_W, sigma_B = centred.T @ centred / n, H @ H.T / k
    nc1 = float(torch.trace(sigma_W @ torch.linalg.pinv(sigma_B))) / k
    sigma_T = sigma_W + sigma_B
    vci = 1.0 - float(torch.trace(torch.linalg.pinv(sigma_T) @ sigma_B)) / min(d, k - 1)
    return nc1, vci


def rank_deficient_data(sizes: list[int], d: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 features of len(sizes) classes with n_c = sizes[c] (0: a missing class; many
    n_c < d: rank-deficient S_c), a random classifier."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    y = y[torch.randperm(len(y), generator=g)]
    h = 3.0 * torch.randn(len(sizes), d, generator=g)[y] + torch.randn(len(y), d, generator=g)
    return {"features": h, "labels": y, "W": torch.randn(len(sizes), d, generator=g),
            "b": torch.randn(len(sizes), generator=g)}


SIZES = [3, 40, 0, 17, 64, 1, 100]  # K = 7, d = 24: a missing class, rank-one class, n_c < d


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("block", ["default", "one-matrix"])
def test_numerical_rank_blocks_and_threads_equal_the_per_class_loop(monkeypatch, threads,
                                                                     block):
    d = 24
    if block == "one-matrix":
        monkeypatch.setattr(metrics_module, "EIGVALSH_BYTES", d * d * 8)
    data = rank_deficient_data(SIZES, d)
    h, y, W, b = (data[k] for k in ("features", "labels", "W", "b"))
    stats = NCStatistics(len(SIZES), d, linalg_threads=threads)
    with trusted_inputs():
        for s in torch.arange(len(y)).chunk(5):
            stats.update(h[s], y[s])
        for s in torch.arange(len(y)).chunk(5):
            stats.update_margins(h[s], y[s], W, b)
    threads_before = torch.get_num_threads()
    got = stats.compute(W, b)
    assert torch.get_num_threads() == threads_before  # the workers' setting is undone
    assert got["missing_classes"] == [2]
    want = reference_numerical_rank(stats._global.class_moments)
    assert got["numerical_rank"] == pytest.approx(want, rel=1e-12)
    # and the SVD of each class's raw features (the released code)
    h64 = h.double()
    svd = [float(torch.linalg.svdvals(h64[y == c]).sum() ** 2 / h64[y == c].square().sum())
           for c in range(len(SIZES)) if SIZES[c]]
    assert got["numerical_rank"] == pytest.approx(sum(svd) / len(svd), rel=1e-9)
    classes = [c for c, n in enumerate(SIZES) if n]
    nc1, vci = reference_nc1_vci(h64, y, classes)
    assert got["nc1"] == pytest.approx(nc1, rel=1e-9)
    assert got["vci"] == pytest.approx(vci, rel=1e-9)


def test_compute_settings_give_the_same_metrics(monkeypatch):
    d = 24
    data = rank_deficient_data(SIZES, d, seed=1)
    h, y, W, b = (data[k] for k in ("features", "labels", "W", "b"))
    results = []
    for kwargs in ({}, {"linalg_device": "cpu", "linalg_threads": 1},
                   {"linalg_device": torch.device("cpu"), "linalg_threads": 4}):
        stats = NCStatistics(len(SIZES), d, **kwargs)
        stats.update(h, y)
        stats.update_margins(h, y, W, b)
        results.append(stats.compute(W, b))
    for got in results[1:]:
        for key in SCALAR_KEYS:
            assert got[key] == pytest.approx(results[0][key], rel=1e-12, abs=1e-15), key
        assert got["missing_classes"] == [2]
    with pytest.raises(ValueError, match="Expected `linalg_threads` >= 1, but got 0"):
        NCStatistics(K, D, linalg_threads=0)


def test_one_present_class_of_two():
    # K = 2 (the smallest K) with one class seen: the numerical rank of that class, the
    # between-class metrics NaN
    data = rank_deficient_data([0, 30], 5, seed=2)
    h, y, W, b = (data[k] for k in ("features", "labels", "W", "b"))
    got = nc_metrics(h, y, W, b)
    assert got["missing_classes"] == [0]
    assert all(math.isnan(got[k]) for k in ("nc1", "vci", "nc2_h", "nc3", "h_equinorm"))
    s = torch.linalg.svdvals(h.double())
    assert got["numerical_rank"] == pytest.approx(float(s.sum() ** 2 / s.square().sum()),
                                                  rel=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_linalg_on_the_host_equals_linalg_on_the_gpu():
    # statistics on the GPU; compute()'s linear algebra there or on the CPU (full-rank
    # classes: the eigenvalues near the cut of rank-deficient ones are rounding noise,
    # which differs between cuSOLVER and LAPACK)
    d = 48
    data = rank_deficient_data([200, 300, 150, 250], d, seed=3)
    h, y, W, b = (data[k].cuda() for k in ("features", "labels", "W", "b"))
    results = []
    for linalg in (None, "cpu"):
        stats = NCStatistics(4, d, device="cuda", linalg_device=linalg)
        stats.update(h, y)
        stats.update_margins(h, y, W, b)
        results.append(stats.compute(W, b))
    for key in SCALAR_KEYS:
        assert results[1][key] == pytest.approx(results[0][key], rel=1e-10, abs=1e-13), key


# --------------------------------------------------------------------------- distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, data: dict, path: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        h, y, W, b = (data[k] for k in ("features", "labels", "W", "b"))
        shard = slice(0, 13) if rank == 0 else slice(13, N)  # uneven: 13 and 37 samples
        batches = [slice(0, 5), slice(5, 13)] if rank == 0 else [shard]
        stats = NCStatistics(K, D)
        for s in batches:
            stats.update(h[s], y[s])
        for s in batches:
            stats.update_margins(h[s], y[s], W, b)
        streamed = stats.compute(W, b)
        one_call = nc_metrics(h[shard], y[shard], W, b)
        if rank == 0:
            torch.save({"streamed": streamed, "one_call": one_call}, path)
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_single_process(tmp_path):
    data = make_data(seed=3)
    path = str(tmp_path / "result.pt")
    mp.spawn(_ddp_worker, args=(free_port(), data, path), nprocs=2, join=True)
    result = torch.load(path)
    expected = stream(data, [N]).compute(data["W"], data["b"])
    assert_metrics_close(result["streamed"], expected)
    assert_metrics_close(result["one_call"], expected)
