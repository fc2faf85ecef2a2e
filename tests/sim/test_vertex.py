"""The sparsest-optimum step (``idl_ray.sim.solvers.vertex``): on a Gram whose lasso optimum is not unique,
certified rows move to a vertex of their optimal face, with the same objective (checked against Clarabel).

Duplicated features make the optimum non-unique in a way with a closed-form answer: any split of a weight
between two identical columns with the same sign is optimal, and a vertex puts it all on one of them.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import torch

from idl_ray.sim.problem import SIMProblem
from idl_ray.sim.solvers import ADMMSolver
from idl_ray.sim.solvers.admm_kernels import GramFactor
from idl_ray.sim.solvers.vertex import vertex_candidates

N, M = 4, 80


def duplicated_problem(
    lam: float, kappa: float | None, seed: int = 0
) -> tuple[SIMProblem, torch.Tensor, torch.Tensor]:
    """Features [hidden (N), pixels (6), the same 6 pixels again, 6 more copies]: rank 10 of d = 22."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.rand(M, 6, generator=gen, dtype=torch.float64)
    hidden = torch.rand(M, N, generator=gen, dtype=torch.float64)  # independent of the pixels
    features = torch.cat([hidden, pixels, pixels, pixels], dim=1)
    targets = torch.cat([hidden, pixels], dim=1) @ torch.randn(N + 6, N, generator=gen, dtype=torch.float64)
    targets = targets + 0.05 * torch.randn(M, N, generator=gen, dtype=torch.float64)
    problem = SIMProblem.from_samples(features, targets, lam=lam, kappa=kappa, n_constrained=N)
    return problem, features, targets


def clarabel_objective(features, targets, lam: float, kappa: float | None) -> float:
    F, T = features.numpy(), targets.numpy()
    total = 0.0
    for i in range(T.shape[1]):
        w = cp.Variable(F.shape[1])
        constraints = [cp.norm1(w[:N]) <= kappa] if kappa is not None else []
        program = cp.Problem(
            cp.Minimize(0.5 / M * cp.sum_squares(T[:, i] - F @ w) + lam * cp.norm1(w)), constraints
        )
        program.solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        total += program.value
    return total


def test_vertex_of_a_split_weight_is_on_one_copy() -> None:
    """A row spreading each pixel's weight evenly over its three identical columns (21 nonzeros > rank 10):
    the vertex keeps one copy per pixel, carrying the sum, and the hidden weights as they were."""
    problem, _, _ = duplicated_problem(1e-3, None)
    H, _ = problem.scaled()
    factor = GramFactor(H)
    F = factor.range_factor()
    assert factor.rank == N + 6
    W = torch.zeros(1, H.shape[0], dtype=torch.float64)
    W[0, :N] = torch.tensor([0.2, -0.3, 0.05, 0.0], dtype=torch.float64)
    pixel_weights = torch.tensor([0.3, -0.6, 0.9, 0.15, -0.3, 0.45], dtype=torch.float64)
    W[0, N:] = (pixel_weights / 3).repeat(3)
    candidates, found = vertex_candidates(F, W, lam=1e-3, kappa=None, n_constrained=N)
    assert bool(found[0])
    copies = candidates[0, N:].reshape(3, 6)
    assert bool(((copies != 0).sum(dim=0) == 1).all())
    torch.testing.assert_close(copies.sum(dim=0), pixel_weights, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(candidates[0, :N], W[0, :N], rtol=1e-10, atol=1e-12)
    # same fitted value and the same l1 norm: a point of the same optimal face
    torch.testing.assert_close(candidates @ H, W @ H, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(candidates.abs().sum(), W.abs().sum())


def test_admm_returns_a_sparser_optimum_with_the_same_objective() -> None:
    for lam, kappa in [(1e-3, 0.8), (1e-4, None)]:
        problem, features, targets = duplicated_problem(lam, kappa, seed=1)
        sparse = ADMMSolver(device="cpu", interior_point_after=0).solve(problem)
        dense = ADMMSolver(device="cpu", interior_point_after=0, vertex=False).solve(problem)
        assert sparse.stats.converged and dense.stats.converged
        assert sparse.stats.extra["vertex_rows"] > 0
        assert int((sparse.weights != 0).sum()) < int((dense.weights != 0).sum())
        rank = GramFactor(problem.scaled()[0]).rank
        moved = (sparse.weights != dense.weights).any(dim=1)
        assert bool(((sparse.weights[moved] != 0).sum(dim=1) <= rank + 2).all())
        reference = clarabel_objective(features, targets, lam, kappa)
        assert abs(sparse.stats.objective - reference) <= 1e-6 * reference
        if kappa is not None:
            assert float(sparse.weights[:, :N].abs().sum(1).max()) <= kappa


def test_vertex_off_and_full_rank_change_nothing() -> None:
    gen = torch.Generator().manual_seed(4)
    features = torch.rand(M, 10, generator=gen, dtype=torch.float64)
    targets = features @ torch.randn(10, N, generator=gen, dtype=torch.float64)
    problem = SIMProblem.from_samples(features, targets, lam=1e-3, kappa=0.5, n_constrained=N)
    result = ADMMSolver(device="cpu").solve(problem)
    assert result.stats.extra["vertex_rows"] == 0  # full rank: the optimum is unique
    assert np.isfinite(result.stats.objective)


def _first_basis_solution(M: np.ndarray, u0: np.ndarray) -> np.ndarray:
    """The basic solution on the first basis the step picks (columns of M u0 by pivoted QR), written here
    with NumPy's least squares: negative entries mean the first basis alone is not a vertex."""
    from scipy.linalg import qr

    R_, pivots = qr(M * u0, mode="r", pivoting=True)
    diagonal = np.abs(np.diag(R_))
    basis = pivots[: int((diagonal > 1e-10 * diagonal[0]).sum())]
    return np.linalg.lstsq(M[:, basis], M @ u0, rcond=None)[0]


def test_purification_reaches_a_vertex_of_the_polytope() -> None:
    """From an interior point u0 > 0 of {u >= 0 : M u = M u0}, the basis exchanges end at a vertex: u >= 0,
    the same M u, at most rank(M) nonzeros on independent columns; on these random polytopes the first
    basis alone is not one (its basic solution has negative entries), so the exchanges are what gets there.
    The six polytopes run as one batch (rows of different ranks: their bases are padded)."""
    from scipy.linalg import qr

    from idl_ray.sim.solvers.vertex import _batch, _first_basis, _purify, _Start

    needed_exchanges, starts, cases = 0, [], []
    n = 40
    for seed in range(6):
        rng = np.random.default_rng(seed)
        rank = 5 if seed % 2 else 8  # odd seeds: 8 rows of rank 5 (dependent constraints, as with F_E)
        M = rng.standard_normal((8, rank)) @ rng.standard_normal((rank, n))
        u0 = rng.random(n) + 0.05
        needed_exchanges += bool((_first_basis_solution(M, u0) < -1e-9).any())
        first = _first_basis(M, u0, M @ u0, qr)
        assert first is not None
        # the polytope's matrix as the rows' F with all signs +1 and no extra rows
        starts.append(_Start(seed, torch.arange(n), np.ones(n), np.zeros((0, n)), u0, *first))
        cases.append((M, u0, rank))
    for index, (M, u0, rank) in enumerate(cases):  # one polytope per call: F differs between them
        F = torch.from_numpy(np.hstack([M, np.zeros((8, 1))]))
        vertices, found = _purify(F, *_batch([starts[index]], n + 1, 8, torch.device("cpu")))
        assert bool(found.all())
        u = vertices[0, :n].numpy()
        assert bool((u >= 0).all())
        np.testing.assert_allclose(M @ u, M @ u0, rtol=0, atol=1e-9 * np.abs(M @ u0).max())
        support = np.flatnonzero(u)
        assert 0 < support.size <= rank
        assert np.linalg.matrix_rank(M[:, support]) == support.size  # independent columns: a vertex
    assert needed_exchanges >= 3


def test_a_column_that_leaves_with_no_replacement_shrinks_the_basis() -> None:
    """Faces whose point u0 has a few large entries and the rest tiny (1e-14 .. 1e-9, as the dense least-squares
    rows of upsampled images have): the scaled first basis is numerically smaller than rank(M), and a column
    can fall with only tiny-u columns to replace it; the basis then shrinks. Every face still ends at a vertex
    (u >= 0, the same M u, independent columns), and some end with fewer columns than their first basis,
    which only the shrink gives."""
    from scipy.linalg import qr

    from idl_ray.sim.solvers.vertex import _batch, _first_basis, _purify, _Start

    r, n, shrunk = 4, 16, 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        M = rng.standard_normal((r, n))
        large = rng.choice(n, size=int(rng.integers(2, 6)), replace=False)
        u0 = np.full(n, 10.0 ** rng.uniform(-14, -9))
        u0[large] = rng.random(large.size) + 0.1
        first = _first_basis(M, u0, M @ u0, qr)
        assert first is not None
        start = _Start(0, torch.arange(n), np.ones(n), np.zeros((0, n)), u0, *first)
        F = torch.from_numpy(np.hstack([M, np.zeros((r, 1))]))
        vertices, found = _purify(F, *_batch([start], n + 1, r, torch.device("cpu")))
        assert bool(found.all())
        u = vertices[0, :n].numpy()
        assert bool((u >= 0).all())
        np.testing.assert_allclose(M @ u, M @ u0, rtol=0, atol=1e-9 * np.abs(M @ u0).max())
        support = np.flatnonzero(u)
        assert np.linalg.matrix_rank(M[:, support]) == support.size
        shrunk += support.size < first[0].size
    assert shrunk >= 1


def test_rows_of_several_ranks_in_one_batch_reach_vertices() -> None:
    """Rows whose first bases differ in size and whose extra rows differ (a t row on some) run in one padded
    batch: each ends at a vertex of its own face with the same fitted value F w and penalty t^T |w|."""
    gen = torch.Generator().manual_seed(5)
    F = torch.randn(6, 30, generator=gen, dtype=torch.float64)
    F[:, 20:] = F[:, :10] * 0.5 + F[:, 10:20] * 0.5  # dependent columns: many optimal splits
    W = torch.rand(5, 30, generator=gen, dtype=torch.float64) * torch.sign(torch.randn(5, 30, generator=gen))
    lam = torch.zeros(5, 30, dtype=torch.float64)
    lam[::2] = 1e-3  # rows 0, 2, 4 carry a t row (lam > 0), rows 1, 3 do not (lam = 0)
    candidates, found = vertex_candidates(F, W, lam=lam, kappa=None, n_constrained=0)
    assert bool(found.all())
    torch.testing.assert_close(candidates @ F.T, W @ F.T, rtol=0, atol=1e-9 * float((W @ F.T).abs().max()))
    penalty = (lam * candidates.abs()).sum(1)
    torch.testing.assert_close(penalty, (lam * W.abs()).sum(1), rtol=1e-9, atol=1e-12)
    assert bool(((candidates != 0).sum(dim=1) <= 6 + 1).all())  # at most rank(F) + the t row


def test_rows_already_sparse_are_left_as_they_are() -> None:
    """Rows with at most 1.25 rank nonzeros are returned unchanged, and not found (no QR is run)."""
    gen = torch.Generator().manual_seed(0)
    F = torch.randn(6, 30, generator=gen, dtype=torch.float64)
    W = torch.zeros(3, 30, dtype=torch.float64)
    W[:, :7] = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    candidates, found = vertex_candidates(F, W, lam=1e-3, kappa=None, n_constrained=0)
    assert not bool(found.any())
    torch.testing.assert_close(candidates, W, rtol=0, atol=0)


def test_vertices_do_not_depend_on_the_thread_count() -> None:
    """LAPACK runs on one thread inside the step whatever torch's thread count: the same vertices, bit for
    bit, with 1 and 4 torch threads."""
    gen = torch.Generator().manual_seed(3)
    F = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    W = torch.rand(8, 40, generator=gen, dtype=torch.float64) * torch.sign(torch.randn(8, 40, generator=gen))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, found_one = vertex_candidates(F, W, lam=1e-3, kappa=None, n_constrained=0)
        torch.set_num_threads(4)
        many, found_many = vertex_candidates(F, W, lam=1e-3, kappa=None, n_constrained=0)
    finally:
        torch.set_num_threads(threads)
    assert bool(found_one.all()) and torch.equal(found_one, found_many)
    assert torch.equal(one, many)
    assert bool(((one != 0).sum(dim=1) <= 6 + 2).all())  # vertices: at most rank + 2 nonzeros
