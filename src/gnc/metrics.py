"""Streaming neural-collapse (NC) metrics.

Definitions follow Papyan, Han & Donoho, "Prevalence of neural collapse during the terminal
phase of deep learning training" (PNAS 2020) for NC1-NC4 and Markou, Ajanthan & Gould,
"Guiding Neural Collapse" (NeurIPS 2024) for the normalisation of NC2/NC3, the equinorms and
the cosine margin. Notation: ``K`` classes, width ``d``, ``N`` samples ``(h_i, y_i)``,
classifier ``W`` (K x d) and bias ``b`` (K), ``M = I_K - 11ᵀ/K``.

    μ_c = mean of the h_i with y_i = c,     μ_G = (1/N) Σ_i h_i,
    H   = [μ_0 - μ_G, ..., μ_{K-1} - μ_G]   (d x K),
    Σ_W = (1/N) Σ_i (h_i - μ_{y_i})(h_i - μ_{y_i})ᵀ,     Σ_B = (1/K) H Hᵀ,
    ETF(G) = ‖G/‖G‖_F - M/√(K-1)‖_F       (distance of a K x K Gram-type matrix to the ETF).

The statistics are accumulated in two passes over the data (torchmetrics style: ``update``
adds sufficient statistics, ``compute`` derives the numbers), in float64, with memory
O(d² + dK) independent of N (O(K·d²) with the per-class second moments), apart from the
per-sample cosine margins of pass 2:

1. :meth:`NCStatistics.update` — per-class sums Σ_{y_i=c} h_i, counts n_c, the per-class raw
   second moments S_c = Σ_{y_i=c} h_i h_iᵀ for the numerical rank (K·d² floats: kept only
   under a memory budget, see :class:`NCStatistics`) and, when logits are given, top-1/top-5
   hits.
2. :meth:`NCStatistics.update_margins` — needs μ_G and μ_c of the *whole* split (all ranks):
   the within-class scatter ``N Σ_W = Σ_i (h_i - μ_{y_i})(h_i - μ_{y_i})ᵀ`` of the centred
   features (not ``Σ_i h_i h_iᵀ - Σ_c n_c μ_c μ_cᵀ``, which loses every digit of Σ_W to
   cancellation when the features share an offset large against their spread),
   per-sample cosine margins, the NCC mismatch count, and top-1/top-5 hits.

``μ_G`` is the mean over the samples, as in the released code of Markou et al.
(``compute_info``), not the mean of the class means of Papyan et al.'s code: the two agree on
a balanced split; on an imbalanced one (``imbalance`` < 1) ``H`` is then not centred, and
``nc2_h``, ``nc3``, ``h_equinorm`` and the cosine margins stay away from their collapsed
values even when every feature sits on its class's ETF vertex.

Under ``torch.distributed`` (initialised) the same code gives the global result: the pass-1
statistics are all-reduced (SUM) once, when pass 2 starts (:meth:`NCStatistics.sync`), the
pass-2 counts are all-reduced and the per-sample margins all-gathered in ``compute``. Every
rank must therefore make the same sequence of collective calls: ``sync()`` (implicitly the
first ``update_margins`` call, or ``compute``) and ``compute()`` exactly once per rank each.

Example::

    stats = NCStatistics(K=10, d=512)
    for x, y in loader:
        stats.update(model.features(x), y)
    for x, y in loader:
        stats.update_margins(model.features(x), y, head.weight, head.bias)
    metrics = stats.compute(head.weight, head.bias)
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from gnc.runtime import all_gather_cat, all_reduce_sum
from gnc.validation import NonFiniteError, all_finite, check_features, value_checks_enabled

__all__ = ["CLASS_MOMENTS_BYTES", "EIGVALSH_BYTES", "PENDING_BYTES", "NCStatistics",
           "etf_distances", "nc_metrics"]

logger = logging.getLogger(__name__)

_F64 = torch.float64
# Largest K·d²·8 bytes of per-class second moments NCStatistics keeps for the numerical rank
# (K = 100, d = 512 is 0.2 GiB; K = 1000, d = 512 is 2 GiB and gets NaN instead).
CLASS_MOMENTS_BYTES = 2**30
# Features NCStatistics holds back (in their own dtype) before adding them to the per-class
# second moments, sorted by class: one host read per flush instead of one per batch.
PENDING_BYTES = 2**28
# Largest input (bytes, over all threads) of the eigvalsh calls of the numerical rank at once
# (64 matrices at d = 512, 4 at d = 2048; at least one): each call copies its block of
# matrices for LAPACK to overwrite.
EIGVALSH_BYTES = 2**27
_warned_rank_budget: set[tuple[int, int]] = set()  # (K, d) already warned about, once each


# --------------------------------------------------------------------------- validation


# The messages of the value checks, also raised by compute() for the deferred checks
_DEFERRED = ("features", "logits", "classifier", "labels", "labels_pass2")
_NONFINITE = {"features": "Expected `features` to be finite, but got NaN or Inf values",
              "logits": "Expected `logits` to be finite, but got NaN or Inf values",
              "classifier": "Expected `W` and `b` to be finite, but got NaN or Inf values"}


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_labels(labels: Tensor, n: int, K: int, values: bool = True) -> None:
    if not isinstance(labels, Tensor) or _shape(labels) != (n,):
        got = _shape(labels) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"Expected `labels` to have shape (N={n},), but got {got}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"Expected `labels` to be an integer tensor, but got {labels.dtype}")
    if values and n and (int(labels.min()) < 0 or int(labels.max()) >= K):
        raise ValueError(
            f"Expected `labels` to be in [0, K={K}), but got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )


def _check_logits(logits: Tensor, n: int, K: int, values: bool = True) -> None:
    if not isinstance(logits, Tensor) or _shape(logits) != (n, K):
        got = _shape(logits) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"Expected `logits` to have shape (N={n}, K={K}), but got {got}")
    if values and not all_finite(logits):
        raise NonFiniteError(_NONFINITE["logits"])


def _check_classifier(W: Tensor, b: Tensor | None, K: int, d: int,
                      values: bool = True) -> Tensor:
    """Check ``(W, b)``; return ``b``, zeros for ``None`` (a head made with ``bias=False``)."""
    if not isinstance(W, Tensor) or _shape(W) != (K, d):
        got = _shape(W) if isinstance(W, Tensor) else type(W).__name__
        raise ValueError(f"Expected `W` to have shape (K={K}, d={d}), but got {got}")
    if b is None:
        b = W.new_zeros(K)
    if not isinstance(b, Tensor) or _shape(b) != (K,):
        got = _shape(b) if isinstance(b, Tensor) else type(b).__name__
        raise ValueError(f"Expected `b` to have shape (K={K},), but got {got}")
    if values and not (all_finite(W) and all_finite(b)):
        raise NonFiniteError(_NONFINITE["classifier"])
    return b


# --------------------------------------------------------------------------- formulas


def _topk_hits(logits: Tensor, labels: Tensor) -> Tensor:
    """Numbers of samples whose label is the top-1 / among the top-min(5, K) logits, as a
    (2,) int64 tensor on the logits' device (nothing read back)."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (N, k)
    hits = top == labels[:, None]
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])


def _etf_distance(G: Tensor) -> float:
    """``‖G/‖G‖_F - M/√(K-1)‖_F`` for a K x K matrix G (NaN if G = 0 or K < 2)."""
    K = G.shape[0]
    if K < 2:
        return math.nan
    M = torch.eye(K, dtype=G.dtype, device=G.device) - 1.0 / K
    return float(torch.linalg.matrix_norm(G / torch.linalg.matrix_norm(G) - M / math.sqrt(K - 1)))


def _coefficient_of_variation(x: Tensor) -> float:
    """std/mean with the unbiased std (``torch.std``), as in Papyan et al.'s code."""
    return float(x.std() / x.mean())


def _nc1(sigma_W: Tensor, H: Tensor) -> float:
    """``tr(Σ_W Σ_B†)/K`` without forming the d x d pseudo-inverse.

    With ``Σ_B = HHᵀ/K`` and the thin SVD ``H = U S Vᵀ``: ``Σ_B† = K U S⁻² Uᵀ``, hence
    ``tr(Σ_W Σ_B†)/K = Σ_i u_iᵀ Σ_W u_i / s_i²`` — O(d²K). Singular values ``s_i <=
    sqrt(max(d, K)·eps)·s_max`` are treated as zero: this is ``torch.linalg.pinv(Σ_B)``'s
    default cut (eigenvalues of Σ_B below ``max(d, K)·eps·λ_max``). H has rank <= K-1 since
    ``Σ_c n_c (μ_c - μ_G) = 0``. NaN when all class means coincide (Σ_B = 0).
    """
    U, S, _ = torch.linalg.svd(H, full_matrices=False)
    if float(S.max()) == 0.0:
        logger.warning("NC1 undefined: all class means coincide (between-class covariance 0)")
        return math.nan
    rtol = math.sqrt(max(H.shape) * torch.finfo(H.dtype).eps)
    keep = S > rtol * S.max()
    U, S = U[:, keep], S[keep]
    return float(((U * (sigma_W @ U)).sum(dim=0) / S**2).sum())


def _smallest_eigenvalue_bound(L: Tensor, steps: int = 6) -> Tensor:
    """An upper bound on λ_min of ``A = LLᵀ``: the Rayleigh quotient ``1/(vᵀA⁻¹v)`` after
    ``steps`` of inverse iteration from a fixed start (a 0-d tensor, nothing read back)."""
    g = torch.Generator(device=L.device).manual_seed(0)
    v = torch.randn(L.shape[0], 1, generator=g, dtype=L.dtype, device=L.device)
    for _ in range(steps):
        v = torch.cholesky_solve(v / torch.linalg.vector_norm(v), L)
    v = v / torch.linalg.vector_norm(v)
    return 1.0 / (v * torch.cholesky_solve(v, L)).sum()


def _vci(sigma_W: Tensor, H: Tensor, exact_pinv: bool = False) -> float:
    """Variability collapse index ``1 − tr(Σ_T† Σ_B)/min(d, K−1)``, ``Σ_T = Σ_W + Σ_B``.

    Xu & Liu, "Quantifying the variability collapse of neural networks" (ICML 2023), as the
    released code of Markou et al. computes it (``compute_Variability_Collapse_index``):
    ``Σ_B = HHᵀ/K`` over the K present classes, ``Σ_W`` the (1/N) within-class covariance,
    and the pseudo-inverse with ``scipy.linalg.pinv``'s default cut — singular values of Σ_T
    at or below ``d·eps·σ_max`` are treated as zero.

    Fast path: when the Cholesky factor ``Σ_T = LLᵀ`` exists, ``tr(Σ_T⁻¹Σ_B) = ‖L⁻¹H‖²_F/K``
    (O(d³/3); 0.41 s against 3.5 s for the eigendecomposition at d = 2048 on one CPU core,
    float64). It equals the pinv value when no eigenvalue of Σ_T falls below the cut, which
    a few steps of inverse iteration with L check (their Rayleigh quotient bounds λ_min from
    above, and reaches it fast exactly when λ_min is far below the rest; O(d²) each). Nearly
    dead features (variance ~1e-18 of the largest, which H also reaches) passed the
    factorisation and gave a trace 3 % off the pinv one. A failed factorisation (a singular
    Σ_T: dead features, N < d), a λ_min near the cut or a trace outside [0, min(d, K−1)]
    falls back to the pinv route (``exact_pinv`` forces it):
    ``tr(Σ_T† Σ_B) = Σ_i (v_iᵀ H)²/(λ_i K)`` over the kept eigenpairs of one d×d ``eigh``.

    In [0, 1] (``Σ_T ⪰ Σ_B``): 0 at exact variability collapse (Σ_W = 0, then the trace is
    rank(Σ_B) = min(d, K−1)), 1 when the class means carry none of the variance. NaN when
    Σ_T = 0.
    """
    d, K = H.shape
    rank = min(d, K - 1)
    sigma_T = sigma_W + H @ H.T / K
    sigma_T = 0.5 * (sigma_T + sigma_T.T)  # symmetrised: rounding only
    eps = torch.finfo(sigma_T.dtype).eps
    if not exact_pinv:
        L, info = torch.linalg.cholesky_ex(sigma_T)
        if int(info) == 0:
            whitened = torch.linalg.solve_triangular(L, H, upper=False)
            read = torch.stack([whitened.square().sum() / K, _smallest_eigenvalue_bound(L),
                                torch.linalg.matrix_norm(sigma_T)]).tolist()  # one host read
            trace, lam_min, top = read
            # 100× pinv's cut, on ‖Σ_T‖_F ≥ λ_max: stricter, never looser (a stricter cut
            # only sends more cases to the eigh route, which gives the pinv value itself)
            if lam_min > 100 * d * eps * top and 0.0 <= trace <= rank * (1 + 1e-9):
                return 1.0 - trace / rank
    lam, V = torch.linalg.eigh(sigma_T)
    top = float(lam.abs().max())
    if top == 0.0:
        return math.nan
    keep = lam.abs() > d * eps * top
    proj = V[:, keep].T @ H  # (r, K)
    trace = float((proj.square().sum(dim=1) / lam[keep]).sum()) / K
    return 1.0 - trace / rank


def _numerical_rank(moments: Tensor, classes: list[int], workers: int = 1) -> float:
    """Mean over the given classes of ``(‖H_c‖_*/‖H_c‖_F)²`` from ``S_c = H_cᵀ H_c``.

    ``H_c`` is the n_c × d matrix of the *raw* (uncentred) features of class c, as in the
    released code (``compute_numerical_rank``: the SVD of each class's features). Its
    singular values are the square roots of the eigenvalues of S_c, so ``‖H_c‖_* = Σ √λ_i``
    and ``‖H_c‖²_F = tr(S_c)``. An eigenvalue of S_c carries rounding error ~``d·eps·λ_max``
    (a singular value of H_c only ~``eps·σ_max``): eigenvalues below ``d·eps·λ_max`` are set
    to 0 so that this noise does not add ~``d·√(d·eps)`` to a rank-one class's value. Classes
    whose features are all zero are left out; NaN if no class is left. Between 1 (the class
    collapsed to one direction) and rank(H_c).

    Cost: one ``eigvalsh`` of a d×d matrix per class ((4/3)d³ flops; ~20 ms at d = 512 on
    one CPU core), in blocks of at most :data:`EIGVALSH_BYTES` of matrices at once (each
    call's copy of its input is LAPACK's workspace). On the CPU the blocks go to ``workers``
    threads, each running LAPACK single-threaded: the classes in parallel, and no
    multithreaded tridiagonalisation, which at d = 512 was measured 10-100× slower on a
    2-core machine busy with other jobs (OpenMP threads waiting for each other). Each
    matrix's eigenvalues are computed alone either way: the blocking does not change them.
    """
    d = moments.shape[-1]
    size = d * d * moments.element_size()
    cpu = moments.device.type == "cpu"
    workers = max(1, min(workers, len(classes), EIGVALSH_BYTES // size)) if cpu else 1
    per_block = max(1, EIGVALSH_BYTES // (workers * size))
    per_block = min(per_block, -(-len(classes) // workers))  # every worker gets a block
    blocks = [classes[i:i + per_block] for i in range(0, len(classes), per_block)]

    def block_values(block: list[int]) -> tuple[Tensor, Tensor]:
        first, last = block[0], block[-1]
        if block == list(range(first, last + 1)):
            S = moments[first:last + 1]  # a view: no copy besides eigvalsh's own
        else:
            S = moments.index_select(0, torch.tensor(block, device=moments.device))
        lam = torch.linalg.eigvalsh(S)  # (c, d) ascending
        cut = d * torch.finfo(lam.dtype).eps * lam[:, -1:].clamp_min(0)
        lam = torch.where(lam > cut, lam, torch.zeros_like(lam))
        return lam.sqrt().sum(dim=-1), S.diagonal(dim1=-2, dim2=-1).sum(dim=-1)

    if not blocks:
        return math.nan
    if cpu:
        threads = torch.get_num_threads()
        try:  # set_num_threads(1) in a worker: its own OpenMP/MKL threads, and the default
            # of threads started later, restored below
            with ThreadPoolExecutor(workers, thread_name_prefix="gnc-eigvalsh",
                                    initializer=torch.set_num_threads, initargs=(1,)) as pool:
                parts = list(pool.map(block_values, blocks))
        finally:
            torch.set_num_threads(threads)
    else:
        parts = [block_values(block) for block in blocks]
    nuclear = torch.cat([p[0] for p in parts])  # ‖H_c‖_*
    fro2 = torch.cat([p[1] for p in parts])  # ‖H_c‖²_F
    nonzero = fro2 > 0
    ranks = nuclear[nonzero] ** 2 / fro2[nonzero]
    return float(ranks.mean()) if ranks.numel() else math.nan


def _unit(Y: Tensor) -> Tensor | None:
    norm = torch.linalg.matrix_norm(Y)
    return Y / norm if bool(torch.isfinite(norm)) and float(norm) > 0 else None


@torch.no_grad()
def etf_distances(W: Tensor, H: Tensor, previous: dict[str, Tensor] | None = None
                  ) -> tuple[dict[str, float], dict[str, Tensor]]:
    r"""Distances to the nearest simplex ETFs of the classifier and of the class means.

    The released code's ETF-distance study (Markou et al., ``nc/ETF_distance.py``): with
    ``Y_W = Wᵀ/‖W‖_F`` and ``Y_H = H/‖H‖_F`` (both d×K, unit Frobenius norm, ``H`` the
    centred class means), the nearest simplex ETF of each,

        E_Y = U* M/√(K−1),   U* = argmin_{U ∈ St(d,K)} ‖Y − U M/√(K−1)‖_F

    (:func:`gnc.declarative.nearest_etf` without a previous solution: the δ = 0 problem, solved
    exactly; ``E_Y`` is unique whenever ``Y M`` has rank K−1, so no warm start is needed),
    and

    - ``etf_w_dist`` = ‖Y_W − E_W‖_F, ``etf_h_dist`` = ‖Y_H − E_H‖_F;
    - ``etf_wh_dist`` = ‖E_W − E_H‖_F (the two ETFs);
    - ``etf_w_moved`` = ‖E_W − E_W^prev‖_F, ``etf_h_moved`` = ‖E_H − E_H^prev‖_F, against
      the ETFs of the previous evaluation (``previous``, as returned by the previous call;
      NaN without one).

    The released code reports the squares of these Frobenius distances; these are the
    distances themselves (all in [0, 2]). ``W`` is not centred (as there): a classifier whose
    rows do not sum to zero stays away from every simplex ETF.

    Args:
        W: K×d classifier.
        H: d×K centred class means; NaN entries or fewer than K columns (a split missing a
            class) make the H-side distances NaN.
        previous: the second return value of the previous call, or None.

    Returns:
        ``(distances, state)``: the five floats above (NaN where undefined: d < K, a zero
        matrix, a missing class) and ``{"etf_w": E_W, "etf_h": E_H}`` (float64 d×K, the
        entries that are defined) to pass as ``previous`` next time.
    """
    from gnc.declarative import nearest_etf  # imports nothing from here; kept local anyway

    K, d = W.shape
    targets = {"etf_w": W.T, "etf_h": H if H.shape == (d, K) else None}
    state: dict[str, Tensor] = {}
    out = dict.fromkeys(("etf_w_dist", "etf_h_dist", "etf_wh_dist", "etf_w_moved",
                         "etf_h_moved"), math.nan)
    for name, Y in targets.items():
        Y = None if Y is None or d < K or not all_finite(Y) else _unit(Y.to(_F64))
        if Y is None:
            continue
        U = nearest_etf(Y, None, delta=0.0, backward="none")
        E = (U - U.mean(dim=1, keepdim=True)) / math.sqrt(K - 1)  # U M/√(K−1)
        state[name] = E
        out[f"{name}_dist"] = float(torch.linalg.matrix_norm(Y - E))
        prev = (previous or {}).get(name)
        if prev is not None and prev.shape == E.shape:
            out[f"{name}_moved"] = float(torch.linalg.matrix_norm(E - prev.to(E)))
    if "etf_w" in state and "etf_h" in state:
        out["etf_wh_dist"] = float(torch.linalg.matrix_norm(state["etf_w"] - state["etf_h"]))
    return out, state


def _cos_margins(h: Tensor, labels: Tensor, W: Tensor, mu_G: Tensor) -> Tensor:
    """``cos(h - μ_G, w̃_y) - max_{c≠y} cos(h - μ_G, w̃_c)`` with ``W̃ = W - mean of rows``.

    A zero vector has cosine 0 with everything.
    """
    tiny = torch.finfo(h.dtype).tiny
    z = h - mu_G  # (N, d)
    Wt = W - W.mean(dim=0)  # (K, d)
    cos = (z @ Wt.T) / z.norm(dim=1, keepdim=True).clamp_min(tiny)  # (N, K)
    cos = cos / Wt.norm(dim=1).clamp_min(tiny)
    own = cos.gather(1, labels[:, None]).squeeze(1)
    others = cos.scatter(1, labels[:, None], -math.inf).amax(dim=1)
    return own - others


def _ncc_predictions(h: Tensor, means: Tensor, present: Tensor) -> Tensor:
    """``argmin_c ‖h - μ_c‖`` over the classes present in pass 1."""
    dist2 = (means * means).sum(dim=1) - 2.0 * h @ means.T  # ‖h - μ_c‖² - ‖h‖², (N, K)
    return dist2.masked_fill(~present, math.inf).argmin(dim=1)


# --------------------------------------------------------------------------- statistics


@dataclass
class _Pass1:
    """Pass-1 sufficient statistics."""

    sums: Tensor  # (K, d) float64: Σ_{i: y_i = c} h_i
    counts: Tensor  # (K,) int64: n_c
    hits: Tensor  # (3,) int64: top-1 hits, top-5 hits, samples that came with logits
    class_moments: Tensor | None  # (K, d, d) float64: Σ_{y_i = c} h_i h_iᵀ, None over budget

    def reduced(self) -> _Pass1:
        tensors = (self.sums, self.counts, self.hits)
        moments = None if self.class_moments is None else all_reduce_sum(self.class_moments)
        return _Pass1(*(all_reduce_sum(t) for t in tensors), moments)


class NCStatistics:
    r"""Accumulated statistics for the neural-collapse metrics of one data split.

    ``compute(W, b)`` returns (floats unless said; ``H``, ``Σ_W``, ``Σ_B``, ``M`` as in the
    module docstring):

    - ``nc1`` = tr(Σ_W Σ_B†)/K  (pseudo-inverse through the SVD of H, see ``_nc1``)
    - ``vci`` = 1 − tr(Σ_T† Σ_B)/min(d, K−1), Σ_T = Σ_W + Σ_B: the variability collapse
      index (0 at collapse; see ``_vci``)
    - ``numerical_rank`` = mean over classes of (‖H_c‖_*/‖H_c‖_F)², H_c the raw n_c × d
      features of class c (1 at collapse; see ``_numerical_rank``). Needs the per-class
      second moments (K·d² float64, in pass 1); NaN, with one logged warning per (K, d),
      when they exceed ``class_moments_bytes``
    - ``nc2`` = ETF(W Wᵀ),  ``nc2_h`` = ETF(Hᵀ H),  ``nc3`` = ETF(W H)
    - ``nc4_bias`` = ‖W μ_G + b‖
    - ``ncc_mismatch``: % of samples where argmax(logits) ≠ argmin_c ‖h − μ_c‖
    - ``w_equinorm`` = std/mean of ‖w_c‖, ``h_equinorm`` = std/mean of ‖μ_c − μ_G‖,
      ``wh_equinorm`` = |w_equinorm − h_equinorm| (unbiased std)
    - ``avg_cos_margin``: mean over samples of cos(h − μ_G, w̃_y) − max_{c≠y} cos(h − μ_G, w̃_c),
      W̃ = W − mean of rows; ``cos_margins``: those margins sorted ascending (1-D float64
      tensor on the CPU)
    - ``top1``, ``top5``: accuracy in % (top-min(5, K)); from the logits given to
      :meth:`update` if every sample came with them, else from pass 2's logits.
    - ``missing_classes``: the classes without a sample (a list of ints, usually empty).

    A split may lack classes (a small test split): ``H`` then holds the K' present classes
    only, so ``nc1`` (tr(Σ_W Σ_B†)/K' with Σ_B = HHᵀ/K'), ``nc2_h``, ``h_equinorm`` and ``nc3``
    (the present rows of W against H) describe them, and the NCC prediction chooses among them;
    ``nc2``, ``w_equinorm`` and the cosine margins use all K rows of the classifier. With
    fewer than two present classes the between-class metrics are NaN.

    Args:
        K: number of classes (>= 2).
        d: feature dimension.
        device: where the statistics live (default CPU); inputs are moved there.
        class_moments_bytes: the most memory (bytes) the per-class second moments of
            ``numerical_rank`` may take, default :data:`CLASS_MOMENTS_BYTES` (1 GiB); above
            it they are not kept and ``numerical_rank`` is NaN. 0 turns them off.
        linalg_device: where :meth:`compute` does its float64 linear algebra (default None:
            ``device``). ``"cpu"`` with statistics on a GPU copies them to the host once
            (K·d² + d² + dK floats: one wait for the queued work) and runs LAPACK there,
            ``linalg_threads`` eigensolvers at a time, instead of cuSOLVER's, which torch
            runs one matrix after another for d > 32: the same metrics up to float64
            rounding. Which is faster depends on the machine: ``python
            benchmarks/nc_metrics_cost.py --device cuda --linalg-device same,cpu`` measures
            both.
        linalg_threads: how many eigensolvers of the numerical rank run at once on the CPU,
            each single-threaded (worker threads; default None: ``torch.get_num_threads()``).

    Shape:
        - features: (N, d), any floating dtype (accumulated in float64)
        - labels: (N,), integer, values in [0, K)
        - logits: (N, K)
        - W: (K, d), b: (K,)

    Memory is O(d² + dK) plus one float64 per sample for the cosine margins, and K·d²
    float64 for the per-class second moments when they fit the budget (then also up to
    :data:`PENDING_BYTES` of features held back until they are added class by class).
    Invalid inputs raise ``ValueError`` before any state changes.

    Host reads: :meth:`update` and :meth:`update_margins` read nothing back from the device
    inside :func:`gnc.validation.trusted_inputs` (on a GPU every read waits for the queued
    work), apart from one read of the class sizes per :data:`PENDING_BYTES` of features (the
    per-class second moments, see ``_flush``); the evaluation loop
    (:func:`gnc.evaluation.nc_two_pass`) runs them so. There the value checks (NaN/Inf in
    the features, logits or classifier, labels outside [0, K)) are *deferred*: counted on the
    device, with the labels clamped into [0, K) meanwhile, and raised by :meth:`compute` (same
    exception types and messages; the statistics are then spoilt: :meth:`reset`). Outside
    that context they are checked on each call, as above. :meth:`compute` reads its results
    back once per evaluation.
    """

    def __init__(self, K: int, d: int, device: torch.device | str | None = None, *,
                 class_moments_bytes: int = CLASS_MOMENTS_BYTES,
                 linalg_device: torch.device | str | None = None,
                 linalg_threads: int | None = None) -> None:
        if K < 2:
            raise ValueError(f"Expected `K` >= 2, but got {K}")
        if d < 1:
            raise ValueError(f"Expected `d` >= 1, but got {d}")
        if class_moments_bytes < 0:
            raise ValueError(f"Expected `class_moments_bytes` >= 0, but got {class_moments_bytes}")
        if linalg_threads is not None and linalg_threads < 1:
            raise ValueError(f"Expected `linalg_threads` >= 1, but got {linalg_threads}")
        self.K, self.d = K, d
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.linalg_device = self.device if linalg_device is None else torch.device(
            linalg_device)
        self.linalg_threads = linalg_threads
        need = K * d * d * 8
        self.keeps_class_moments = 0 < need <= class_moments_bytes
        if not self.keeps_class_moments and class_moments_bytes and (K, d) not in \
                _warned_rank_budget:
            _warned_rank_budget.add((K, d))
            logger.warning("numerical_rank is NaN: its per-class second moments (K=%d, d=%d) "
                           "need %.1f GiB, above the budget of %.1f GiB", K, d, need / 2**30,
                           class_moments_bytes / 2**30)
        self.reset()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(K={self.K}, d={self.d}, device={self.device})"

    def reset(self) -> None:
        """Forget everything (both passes)."""
        K, d, dev = self.K, self.d, self.device
        self._pass1 = _Pass1(
            sums=torch.zeros(K, d, dtype=_F64, device=dev),
            counts=torch.zeros(K, dtype=torch.long, device=dev),
            hits=torch.zeros(3, dtype=torch.long, device=dev),
            class_moments=torch.zeros(K, d, d, dtype=_F64, device=dev)
            if self.keeps_class_moments else None,
        )
        self._global: _Pass1 | None = None  # pass 1 of all ranks, set by sync()
        self._means_: tuple[Tensor, Tensor] | None = None  # μ_c, μ_G once known
        self._margins: list[Tensor] = []  # per-sample cosine margins, one tensor per batch
        # NCC mismatches, top-1 hits, top-5 hits, samples seen in pass 2
        self._pass2 = torch.zeros(4, dtype=torch.long, device=dev)
        self._within = torch.zeros(d, d, dtype=_F64, device=dev)  # Σ_i (h_i - μ_y)(h_i - μ_y)ᵀ
        # batches (features, labels) not yet in the per-class second moments (see _flush)
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._pending_bytes = 0
        # the deferred value checks (inside trusted_inputs): sums of the features / logits /
        # classifiers (non-finite iff one value is), labels outside [0, K); read in compute()
        self._invalid = torch.zeros(len(_DEFERRED), dtype=_F64, device=dev)

    # ----------------------------------------------------------------------- pass 1

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor, logits: Tensor | None = None) -> None:
        """Pass 1: add a batch's per-class sums, counts, per-class second moments (and top-k
        hits).

        Raises:
            ValueError: on invalid inputs (the state is then unchanged).
            RuntimeError: if pass 2 has started (call :meth:`reset` first).
        """
        checks = value_checks_enabled()
        check_features(features, self.d, rows="N", values=checks)
        n = features.shape[0]
        _check_labels(labels, n, self.K, values=checks)
        if logits is not None:
            _check_logits(logits, n, self.K, values=checks)
        if self._global is not None:
            raise RuntimeError("update() called after pass 2 started; call reset() first")
        h = features.to(self.device, _F64)
        y = labels.to(self.device, torch.long)
        if logits is not None:
            logits = logits.to(self.device)
        if not checks:
            y = self._defer_checks(h, y, logits)
        p = self._pass1
        p.sums.index_add_(0, y, h)
        p.counts.index_add_(0, y, torch.ones_like(y))  # not bincount: it reads max(y) back
        if p.class_moments is not None:
            # kept back, in their own dtype, and added class by class in _flush
            own = features.detach().to(self.device, copy=True)  # the caller may reuse it
            self._pending.append((own, y.clone() if y is labels else y))
            self._pending_bytes += own.numel() * own.element_size()
            if self._pending_bytes >= PENDING_BYTES:
                self._flush()
        if logits is not None:
            p.hits[:2] += _topk_hits(logits, y)
            p.hits[2] += n

    def _defer_checks(self, h: Tensor, y: Tensor, logits: Tensor | None = None,
                      W: Tensor | None = None, b: Tensor | None = None) -> Tensor:
        """The value checks without reading anything back: add up, on the device, the sums
        of the float64 features, the logits and the classifier (NaN/Inf in, NaN/Inf out:
        finite values do not overflow a float64 sum before their second moments overflow)
        and the number of labels outside [0, K), for :meth:`compute` to raise; return the
        labels clamped into [0, K) so that no kernel indexes out of bounds meanwhile."""
        clamped = y.clamp(0, self.K - 1)
        zero = h.new_zeros(())
        parts = {
            "features": h.sum(),
            "logits": zero if logits is None else logits.sum(dtype=_F64),
            "classifier": zero if W is None else W.sum() + b.sum(),
            "labels": (clamped != y).sum(dtype=_F64),
            "labels_pass2": zero,  # pass 2 usually sees the same samples: count them apart
        }
        if W is not None:  # pass 2
            parts["labels"], parts["labels_pass2"] = zero, parts["labels"]
        self._invalid += torch.stack([parts[k] for k in _DEFERRED])
        return clamped

    def _flush(self) -> None:
        """Add the pending batches to the per-class second moments: sorted by class, one
        d×d product per class present (one host read for the class sizes per flush).

        Cheaper than the alternatives without a host read: a masked product per class costs
        K× the flops (N·K·d² instead of N·d²), a scatter of per-sample outer products moves
        N·d² floats. The pending features take at most :data:`PENDING_BYTES` (about twice
        that while sorted).
        """
        if not self._pending:
            return
        h = torch.cat([t for t, _ in self._pending])
        y = torch.cat([t for _, t in self._pending])
        self._pending, self._pending_bytes = [], 0
        order = torch.argsort(y, stable=True)
        sizes = torch.zeros(self.K, dtype=torch.long, device=y.device)
        sizes = sizes.index_add_(0, y, torch.ones_like(y)).tolist()  # the host read
        moments = self._pass1.class_moments
        assert moments is not None
        for c, part in enumerate(h.index_select(0, order).split(sizes)):
            if part.shape[0]:
                part = part.to(_F64)
                moments[c].addmm_(part.T, part)

    def sync(self) -> None:
        """End pass 1: sum its statistics over all ranks and fix μ_c, μ_G for pass 2.

        Called implicitly by the first :meth:`update_margins` and by :meth:`compute`; call it
        explicitly on a rank that has no data for pass 2 (it is a collective call).
        Idempotent.
        """
        if self._global is None:
            self._flush()
            self._global = self._pass1.reduced()

    def _means(self) -> tuple[Tensor, Tensor]:
        """Global class means μ_c (K, d; 0 for empty classes) and global mean μ_G (d,)."""
        assert self._global is not None
        if self._means_ is None:  # once: pass 1 is over
            sums, counts = self._global.sums, self._global.counts
            n = int(counts.sum())
            if n == 0:
                raise ValueError("No samples in pass 1: call update(...) before pass 2 / compute")
            means = sums / counts.clamp_min(1)[:, None].to(_F64)
            self._means_ = means, sums.sum(dim=0) / n
        return self._means_

    # ----------------------------------------------------------------------- pass 2

    @torch.no_grad()
    def update_margins(
        self,
        features: Tensor,
        labels: Tensor,
        W: Tensor,
        b: Tensor | None,
        logits: Tensor | None = None,
    ) -> None:
        """Pass 2: within-class scatter, per-sample cosine margins, NCC mismatches and top-k
        hits of a batch.

        Uses the global μ_c, μ_G of pass 1 (the first call runs :meth:`sync`). ``logits``
        default to ``features @ W.T + b`` (``b=None``: no bias).

        Raises:
            ValueError: on invalid inputs (the state is then unchanged) or if pass 1 saw no
                samples.
        """
        checks = value_checks_enabled()
        check_features(features, self.d, rows="N", values=checks)
        n = features.shape[0]
        _check_labels(labels, n, self.K, values=checks)
        b = _check_classifier(W, b, self.K, self.d, values=checks)
        if logits is not None:
            _check_logits(logits, n, self.K, values=checks)
        self.sync()
        means, mu_G = self._means()
        h = features.to(self.device, _F64)
        y = labels.to(self.device, torch.long)
        W, b = W.to(self.device, _F64), b.to(self.device, _F64)
        if logits is not None:
            logits = logits.to(self.device)
        if not checks:
            y = self._defer_checks(h, y, logits, W, b)
        logits = h @ W.T + b if logits is None else logits
        centred = h - means.index_select(0, y)
        self._within.addmm_(centred.T, centred)
        ncc = _ncc_predictions(h, means, self._global.counts > 0)
        mismatch = (logits.argmax(dim=1) != ncc).sum()
        self._margins.append(_cos_margins(h, y, W, mu_G))
        self._pass2[:3] += torch.cat([mismatch[None], _topk_hits(logits, y)])
        self._pass2[3] += n

    # ----------------------------------------------------------------------- compute

    @torch.no_grad()
    def compute(self, W: Tensor, b: Tensor | None) -> dict[str, float | Tensor]:
        """All NC metrics of the data seen (over all ranks), for the classifier ``(W, b)``
        (``b=None``: no bias).

        Raises:
            ValueError: on an invalid ``(W, b)``; if pass 2 (:meth:`update_margins`) did not
                see exactly the samples of pass 1.
        """
        b = _check_classifier(W, b, self.K, self.d)
        self.sync()
        pass2 = all_reduce_sum(self._pass2)
        within = all_reduce_sum(self._within)
        invalid = all_reduce_sum(self._invalid)
        local = torch.cat(self._margins) if self._margins else torch.zeros(0, dtype=_F64)
        margins = all_gather_cat(local.to(self.device))
        self._raise_deferred(invalid)
        means, mu_G = self._means()
        self._check_complete(pass2)
        # the linear algebra on linalg_device: one copy of each statistic there (none when it
        # is the statistics' device)
        g, dev = self._global, self.linalg_device
        means, mu_G, within = (t.to(dev) for t in (means, mu_G, within))
        moments = None if g.class_moments is None else g.class_moments.to(dev)
        W, b = W.to(dev, _F64), b.to(dev, _F64)
        counts = g.counts.tolist()
        n = sum(counts)
        classes = [c for c, count in enumerate(counts) if count]  # the K' with samples
        missing = [c for c, count in enumerate(counts) if not count]
        present = torch.tensor(classes, device=dev)
        H = (means.index_select(0, present) - mu_G).T  # (d, K')
        sigma_W = within / n
        hits = g.hits if int(g.hits[2]) == n else pass2[1:]
        spread = H.shape[1] >= 2  # between-class statistics need two classes with samples
        w_equinorm = _coefficient_of_variation(W.norm(dim=1))
        h_equinorm = _coefficient_of_variation(H.norm(dim=0)) if spread else math.nan
        threads = self.linalg_threads or torch.get_num_threads()
        return {
            "nc1": _nc1(sigma_W, H) if spread else math.nan,
            "vci": _vci(sigma_W, H) if spread else math.nan,
            "numerical_rank": math.nan if moments is None else _numerical_rank(
                moments, classes, threads),
            "nc2": _etf_distance(W @ W.T),
            "nc2_h": _etf_distance(H.T @ H),
            "nc3": _etf_distance(W.index_select(0, present) @ H),
            "nc4_bias": float(torch.linalg.vector_norm(W @ mu_G + b)),
            "ncc_mismatch": 100.0 * int(pass2[0]) / n,
            "w_equinorm": w_equinorm,
            "h_equinorm": h_equinorm,
            "wh_equinorm": abs(w_equinorm - h_equinorm),
            "avg_cos_margin": float(margins.mean()),
            "cos_margins": margins.sort().values.cpu(),
            "top1": 100.0 * int(hits[0]) / n,
            "top5": 100.0 * int(hits[1]) / n,
            "missing_classes": missing,
        }

    @torch.no_grad()
    def class_means(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(μ_c (K, d; 0 for a class without samples), μ_G (d,), n_c (K,))`` over all ranks,
        float64 (ends pass 1: calls :meth:`sync`, a collective call)."""
        self.sync()
        means, mu_G = self._means()
        return means, mu_G, self._global.counts.clone()

    def _raise_deferred(self, invalid: Tensor) -> None:
        """Raise what the deferred value checks (inside ``trusted_inputs``) found, on every
        rank alike (``invalid`` is summed over the ranks)."""
        found = dict(zip(_DEFERRED, invalid.tolist(), strict=True))
        for name in ("features", "logits", "classifier"):
            if not math.isfinite(found[name]):
                raise NonFiniteError(_NONFINITE[name])
        bad = found["labels"] or found["labels_pass2"]
        if bad:
            raise ValueError(f"Expected `labels` to be in [0, K={self.K}), but got "
                             f"{int(bad)} outside it")

    def _check_complete(self, pass2: Tensor) -> None:
        assert self._global is not None
        counts = self._global.counts
        n1, n2 = int(counts.sum()), int(pass2[3])
        if n2 == 0:
            raise ValueError(
                "Missing pass 2: call update_margins(...) over the data before compute() "
                "(needed for avg_cos_margin, cos_margins, ncc_mismatch)"
            )
        if n2 != n1:
            raise ValueError(
                f"Expected pass 2 to see the {n1} samples of pass 1, but it saw {n2}"
            )


def nc_metrics(
    features: Tensor,
    labels: Tensor,
    W: Tensor,
    b: Tensor | None,
    logits: Tensor | None = None,
) -> dict[str, float | Tensor]:
    """NC metrics of ``features`` (N, d) with ``labels`` (N,) for the classifier ``(W, b)``
    (``b=None``, as ``head.bias`` of a head made with ``bias=False``: no bias).

    Runs both passes of :class:`NCStatistics` over the given tensors (``logits`` default to
    ``features @ W.T + b``) and returns its ``compute(W, b)``. Under ``torch.distributed``
    each rank passes its own shard and gets the global metrics.
    """
    if not isinstance(W, Tensor) or W.ndim != 2:
        got = _shape(W) if isinstance(W, Tensor) else type(W).__name__
        raise ValueError(f"Expected `W` to have shape (K, d), but got {got}")
    stats = NCStatistics(*W.shape, device=getattr(features, "device", None))
    stats.update(features, labels, logits)
    stats.update_margins(features, labels, W, b, logits)
    return stats.compute(W, b)
