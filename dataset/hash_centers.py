"""Hash centers from semantic centers: initialisation and per-center lp-box ADMM
(docs/method.md §5, items 3-6).

K centers of B bits. Center c is refined with the others (H, (K-1) x B) fixed by solving

    min_c  (1/(K-1)) 1^T H c + mu ||H c - s||^2
    s.t.   c in [-1, 1]^B,  ||c||^2 = B,  H c <= B - 2 d*

where box and sphere together are exactly {-1, +1}^B, and the inequality says every other center
is at least d* bits away. ADMM splits c into z1 (box), z2 (sphere) and a slack z3 >= 0. The
c-update solves ((2 mu + rho) H^T H + 2 rho I) c = r; with H^T H = V diag(lam) V^T computed
once per center, every penalty change is a diagonal rescaling, so an iteration costs a few
B x B and (K-1) x B products and no factorisation.
"""
import math

import numpy as np
import scipy.linalg


GOLDEN_STEP = (1 + math.sqrt(5)) / 2


def min_distance(nbits, nclusters):
    """Smallest d with sum_{j<d} C(B, j) >= 2^B / K (K Hamming balls of radius d fill the cube)."""
    covered = 0                          # exact integers: 2^B overflows a float beyond B = 1023
    for d in range(nbits + 1):
        if covered * nclusters >= 2 ** nbits:
            return d
        covered += math.comb(nbits, d)
    return nbits


def hamming_matrix(centers):
    """(K, B) ±1 -> (K, K) pairwise Hamming distances."""
    return (centers.shape[1] - centers @ centers.T) / 2


def _balanced(rng, count, nbits):
    """count random ±1 rows with B/2 entries of each sign."""
    rows = np.ones((count, nbits))
    rows[:, nbits // 2:] = -1
    return rng.permuted(rows, axis=1)


def initial_centers(nclusters, nbits, seed=0, method="hadamard", tries=50):
    """(K, B) ±1: rows of [H; -H] (Hadamard), then balanced random rows if K > 2B.

    A random row is redrawn (up to `tries` times) until it is more than B/4 bits from every row
    before it; failing that, the draw farthest from its nearest row is kept.
    """
    rng = np.random.default_rng(seed)
    if method == "hadamard":
        if nbits & (nbits - 1):
            raise ValueError(f"Hadamard initialisation needs nbits to be a power of two, got "
                             f"{nbits}; use preprocess.center_init='random' for other lengths")
        hadamard = scipy.linalg.hadamard(nbits).astype(np.float64)
        rows = np.concatenate([hadamard, -hadamard])[:nclusters]
    elif method == "random":
        rows = np.empty((0, nbits))
    else:
        raise ValueError(f"preprocess.center_init must be 'hadamard' or 'random', got '{method}'")
    rows = list(rows)
    while len(rows) < nclusters:
        candidates = _balanced(rng, tries, nbits)                                   # (tries, B)
        if rows:
            nearest = ((nbits - candidates @ np.asarray(rows).T) / 2).min(axis=1)
        else:
            nearest = np.full(tries, float(nbits))
        good = np.nonzero(nearest > nbits / 4)[0]
        rows.append(candidates[good[0]] if len(good) else candidates[np.argmax(nearest)])
    return np.asarray(rows)


def semantic_targets(cosines, nbits):
    """Cosines to the other clusters, centred by their mean and scaled linearly into [-B, B]."""
    centred = cosines - cosines.mean()
    scale = np.abs(centred).max()
    return centred * (nbits / scale) if scale > 0 else centred


def refine_center(center, others, targets, dmin, mu=1.0, rho=5e-5, rho_growth=1.07,
                  rho_max=1e9, max_iter=400, tol=1e-6):
    """ADMM for one center. center: (B,), others: (K-1, B), targets: (K-1,) -> (B,) ±1.

    Returns the sign of the best iterate: the nearest to feasible first (its distance to the
    nearest other center, capped at dmin), then the largest mean + min Hamming distance to the
    others. A result nearer to infeasible than the current center is not taken, so the smallest
    pairwise distance of a set, up to dmin, never shrinks.
    """
    nbits = len(center)
    H = others
    eigvals, eigvecs = np.linalg.eigh(H.T @ H)                          # reused every iteration
    bound = np.full(len(H), nbits - 2.0 * dmin)
    linear = H.sum(0) / len(H) - 2 * mu * (H.T @ targets)            # constant part of r
    c = center.astype(np.float64).copy()
    z1, z2 = c.copy(), c.copy()
    z3 = np.maximum(0.0, bound - H @ c)
    y1, y2, y3 = np.zeros(nbits), np.zeros(nbits), np.zeros(len(H))
    best, best_key, signs = None, None, None
    # The loop runs hundreds of times per center on vectors of B values, so its cost is numpy's
    # per-call overhead: each residual is formed once, the norm is sqrt(v . v) as
    # np.linalg.norm computes it, and an iterate whose signs did not change is not scored again
    # (its score is the one just compared). The arithmetic is the same, so are the centers.
    for _ in range(max_iter):
        rhs = -linear - y1 + rho * z1 - y2 + rho * z2 - H.T @ (y3 + rho * (z3 - bound))
        c = eigvecs @ ((eigvecs.T @ rhs) / ((2 * mu + rho) * eigvals + 2 * rho))
        z1 = np.minimum(np.maximum(c + y1 / rho, -1.0), 1.0)
        v = c + y2 / rho
        z2 = math.sqrt(nbits) * v / max(math.sqrt(v @ v), 1e-12)
        Hc = H @ c
        z3 = np.maximum(0.0, bound - Hc - y3 / rho)
        r1, r2 = c - z1, c - z2
        y1 += GOLDEN_STEP * rho * r1
        y2 += GOLDEN_STEP * rho * r2
        y3 += GOLDEN_STEP * rho * (Hc + z3 - bound)
        rho = min(rho * rho_growth, rho_max)

        positive = c >= 0
        if signs is None or positive.tobytes() != signs:
            signs = positive.tobytes()
            candidate = np.where(positive, 1.0, -1.0)
            dist = (nbits - H @ candidate) / 2
            key = (min(dist.min(), dmin), dist.sum() / len(dist) + dist.min())
            if best_key is None or key > best_key:
                best, best_key = candidate, key
        if max(np.abs(r1).max(), np.abs(r2).max()) < tol:
            break
    if best_key[0] < min(((nbits - H @ center) / 2).min(), dmin):
        return center.copy()
    return best


def sweep_objective(centers, semantic):
    """Mean pairwise Hamming distance over K^2 minus sum_{i<j} [cos(c_i, c_j) - cos(w_i, w_j)]."""
    nbits, k = centers.shape[1], centers.shape[0]
    upper = np.triu_indices(k, 1)
    cos_c = (centers @ centers.T / nbits)[upper]
    cos_w = (semantic @ semantic.T)[upper]
    return hamming_matrix(centers).mean() - (cos_c - cos_w).sum()


def center_quality(centers, semantic, dmin):
    """The quality report of docs/method.md §5.6 for (K, B) ±1 centers and (K, d) unit semantic centers."""
    k = len(centers)
    upper = np.triu_indices(k, 1)
    dist = hamming_matrix(centers)[upper]
    inner = (centers @ centers.T)[upper]
    cos_w = (semantic @ semantic.T)[upper]
    corr = float(np.corrcoef(inner, cos_w)[0, 1]) if inner.std() > 0 and cos_w.std() > 0 else 0.0
    return {"min_hamming": float(dist.min()), "mean_hamming": float(dist.mean()),
            "required_min_distance": int(dmin), "all_pairs_at_least_required": bool(dist.min() >= dmin),
            "semantic_correlation": corr, "sweep_objective": float(sweep_objective(centers, semantic))}


def optimize_centers(semantic, nbits, seed=0, init="hadamard", mu=1.0, rho=5e-5,
                     rho_growth=1.07, rho_max=1e9, max_iter=400, sweeps=10, log=None):
    """(K, d) unit semantic centers -> (K, B) ±1 hash centers and a report.

    Sweeps refine every center in turn; they stop at `sweeps` or when the sweep objective stops
    improving, and the best sweep's centers are returned (sweeps=0: the initialisation).
    """
    nclusters = len(semantic)
    dmin = min_distance(nbits, nclusters)
    centers = initial_centers(nclusters, nbits, seed, init)
    report = {"nbits": nbits, "nclusters": nclusters, "init": center_quality(centers, semantic, dmin)}
    cosines = semantic @ semantic.T
    best, best_objective, previous, history = centers.copy(), -np.inf, None, []
    for sweep in range(sweeps):
        for i in range(nclusters):
            rest = np.arange(nclusters) != i
            targets = semantic_targets(cosines[i, rest], nbits)
            centers[i] = refine_center(centers[i], centers[rest], targets, dmin, mu, rho,
                                       rho_growth, rho_max, max_iter)
        objective = sweep_objective(centers, semantic)
        history.append(float(objective))
        if log:
            log(f"sweep {sweep + 1}: objective {objective:.4f}")
        if objective > best_objective:
            best, best_objective = centers.copy(), objective
        if previous is not None and objective <= previous:
            break
        previous = objective
    report["result"] = center_quality(best, semantic, dmin)
    report["sweep_objectives"] = history
    return best, report
