"""The dual active-set method (``idl_ray.sim.solvers.active_set``) and ADMM's use of it on low-rank Grams.

References are independent: Clarabel on the sample form written here with cvxpy, and the solve with the
method switched off (ADMM, the interior point and the vertex step).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sim_helpers import clarabel_row_optima, gram_form

from idl_ray.sim.problem import SIMProblem
from idl_ray.sim.solvers import ADMMSolver
from idl_ray.sim.solvers.active_set import _plus_rows_of, dual_active_set, dual_active_set_applies
from idl_ray.sim.solvers.admm_kernels import GramFactor, prox
from idl_ray.sim.solvers.certificate import duality_gap
from idl_ray.sim.solvers.polish import polish_rows

N, P, M = 5, 40, 80


def samples(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [hidden, pixels] (M x (N + P)) whose pixels span 8 directions with duplicated columns, as
    upsampled images do: rank(G) <= 13 of d = 45 (a low-rank Gram), and targets (M x N)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(M, 8, generator=gen, dtype=torch.float64) @ torch.rand(
        8, P // 2, generator=gen, dtype=torch.float64
    )
    pixels = torch.cat([base, base[:, :10], base[:, 10:] * 0.5], dim=1)  # duplicated and scaled columns
    hidden = (pixels @ torch.randn(P, N, generator=gen, dtype=torch.float64) * 0.3).relu()
    features = torch.cat([hidden, pixels], dim=1)
    W_true = torch.randn(N, N + P, generator=gen, dtype=torch.float64) * 0.3
    W_true[:, :N] *= 0.1  # a small A-part: kappa = 0.99 does not bind, 0.02 does
    targets = features @ W_true.T + 0.05 * torch.randn(M, N, generator=gen, dtype=torch.float64)
    return features, targets


def clarabel(features, targets, thresholds: np.ndarray, kappa: float | None) -> np.ndarray:
    """Per-row optimum of 1/(2M) ||t - F w||^2 + sum_j t_j |w_j| (+ ||w_A||_1 <= kappa), by Clarabel."""
    return clarabel_row_optima(features, targets, thresholds, kappa, N)


def polished_objectives(H, R, c, result, lam: float) -> torch.Tensor:
    """Every row finished, polished on its support (unbounded): the rows' objectives."""
    W, ok = polish_rows(H, R, result.weights, lam=lam, kappa=None, n_constrained=0)
    assert bool(result.finished.all()) and bool(ok.all())
    return duality_gap(W, H, R, c, lam=lam, kappa=None, n_constrained=0).primal


@pytest.mark.parametrize("lam", [1e-5, 1e-3, 3e-2])
def test_reaches_clarabel_at_a_vertex(lam: float) -> None:
    """Without the bound: every row finishes, at most rank(H) nonzeros (a vertex), and polished on its
    support the answer has Clarabel's objective and a certificate."""
    features, targets = samples()
    H, R, c = gram_form(features, targets)
    factor = GramFactor(H)
    assert factor.low_rank
    result = dual_active_set(factor, R, lam=lam)
    assert bool(result.finished.all())
    assert result.steps > 0
    assert int((result.weights != 0).sum(1).max()) <= factor.rank
    W, ok = polish_rows(H, R, result.weights, lam=lam, kappa=None, n_constrained=0)
    assert bool(ok.all())
    gaps = duality_gap(W, H, R, c, lam=lam, kappa=None, n_constrained=0)
    assert bool(gaps.certified(1e-9).all())
    reference = clarabel(features, targets, np.full((N, N + P), lam), None)
    np.testing.assert_allclose(gaps.primal.numpy(), reference, rtol=1e-7, atol=1e-12)
    # the raw multipliers are already close: the polish only removes the updates' rounding
    torch.testing.assert_close(result.weights, W, atol=1e-6 * float(W.abs().max()), rtol=0)


@pytest.mark.parametrize("kappa", [0.02, 0.08])
def test_follows_the_bound_to_clarabel(kappa: float) -> None:
    """With a bound that the unbounded answers break: the homotopy in nu ends on the bound, and polished the
    answer has Clarabel's bounded objective."""
    features, targets = samples(seed=1)
    H, R, c = gram_form(features, targets)
    factor = GramFactor(H)
    free = dual_active_set(factor, R, lam=1e-4)
    assert bool((free.weights[:, :N].abs().sum(1) > kappa).any())  # the bound binds somewhere
    result = dual_active_set(factor, R, lam=1e-4, kappa=kappa, n_constrained=N)
    assert bool(result.finished.all())  # (seed 1: no row's optimum lies inside a face the bound cuts)
    assert result.steps > free.steps
    assert int((result.weights != 0).sum(1).max()) <= factor.rank
    l1 = result.weights[:, :N].abs().sum(1)
    assert float(l1.max()) <= kappa * (1 + 1e-8)
    W, ok = polish_rows(H, R, result.weights, lam=1e-4, kappa=kappa, n_constrained=N)
    assert bool(ok.all())
    W = prox(W, 0.0, kappa, N)  # exact bound after rounding
    gaps = duality_gap(W, H, R, c, lam=1e-4, kappa=kappa, n_constrained=N)
    assert bool(gaps.certified(1e-9).all())
    reference = clarabel(features, targets, np.full((N, N + P), 1e-4), kappa)
    np.testing.assert_allclose(gaps.primal.numpy(), reference, rtol=1e-7, atol=1e-12)


def test_a_warm_start_changes_the_steps_not_the_answer() -> None:
    """Started from the answer at a nearby lam (a lambda path's previous point), from the answer itself and
    from a poor guess (random supports and signs): the same polished objectives as the cold start, and from
    the answer itself no step at all."""
    features, targets = samples(seed=4)
    H, R, c = gram_form(features, targets)
    factor = GramFactor(H)

    nearby = dual_active_set(factor, R, lam=2e-3).weights
    cold = dual_active_set(factor, R, lam=1e-3)
    reference = polished_objectives(H, R, c, cold, 1e-3)
    itself = dual_active_set(factor, R, lam=1e-3, start=cold.weights)
    assert itself.steps == 0
    gen = torch.Generator().manual_seed(0)
    guess = torch.randn(N, N + P, generator=gen, dtype=torch.float64) * (
        torch.rand(N, N + P, generator=gen) < 0.2
    )
    for start in (nearby, cold.weights, guess):
        warm = dual_active_set(factor, R, lam=1e-3, start=start)
        torch.testing.assert_close(polished_objectives(H, R, c, warm, 1e-3), reference, atol=0, rtol=1e-10)
    assert dual_active_set(factor, R, lam=1e-3, start=nearby).steps < cold.steps


@pytest.mark.parametrize("recompute_every", [100, 2])
def test_per_entry_thresholds_hold_infinite_entries_at_zero(monkeypatch, recompute_every: int) -> None:
    """Per-entry thresholds, some infinite (column 0 of every row among them: the padding of the exact
    recomputation gathers it), with the default recomputation and one every 2 steps."""
    import idl_ray.sim.solvers.active_set as active_set

    monkeypatch.setattr(active_set, "_RECOMPUTE_EVERY", recompute_every)
    features, targets = samples(seed=3)
    H, R, c = gram_form(features, targets)
    gen = torch.Generator().manual_seed(1)
    thresholds = 1e-3 * (0.2 + 2.8 * torch.rand(N, N + P, generator=gen, dtype=torch.float64))
    thresholds[torch.rand(N, N + P, generator=gen) < 0.2] = torch.inf
    thresholds[:, 0] = torch.inf
    result = dual_active_set(GramFactor(H), R, lam=thresholds)
    assert bool(result.finished.all())
    assert bool((result.weights[torch.isinf(thresholds)] == 0).all())
    W, ok = polish_rows(H, R, result.weights, lam=thresholds, kappa=None, n_constrained=0)
    assert bool(ok.all())
    ours = duality_gap(W, H, R, c, lam=thresholds, kappa=None, n_constrained=0).primal.numpy()
    np.testing.assert_allclose(ours, clarabel(features, targets, thresholds.numpy(), None), rtol=1e-7)


def test_batches_and_the_step_guard(monkeypatch) -> None:
    """Rows split into batches (a small memory budget) give the same objectives (duplicated columns make
    the optimum non-unique: rounding may pick another vertex); a guard of one step leaves the rows that need
    more unfinished."""
    import idl_ray.sim.solvers.active_set as active_set

    features, targets = samples(seed=5)
    H, R, c = gram_form(features, targets)
    factor = GramFactor(H)

    def objectives(result):
        assert int((result.weights != 0).sum(1).max()) <= factor.rank
        return polished_objectives(H, R, c, result, 1e-3)

    whole = objectives(dual_active_set(factor, R, lam=1e-3))
    monkeypatch.setattr(active_set, "_BATCH_BYTES", 1)  # one row per batch
    batched = objectives(dual_active_set(factor, R, lam=1e-3))
    torch.testing.assert_close(batched, whole, atol=0, rtol=1e-12)
    guarded = dual_active_set(factor, R, lam=1e-3, max_steps=1)
    assert not bool(guarded.finished.any())


def test_a_row_whose_dual_objective_stops_rising_is_left_unfinished(monkeypatch) -> None:
    """Phase 1's cycling guard: a row whose ||u - b||^2 has not reached a new maximum for ``_STALLED_STEPS``
    steps is left unfinished. With the guard at its default every row of a solvable problem finishes; with it
    at -1 every row is left after its first step, and ADMMSolver hands them all to the interior point, which
    still reaches Clarabel's objective."""
    import idl_ray.sim.solvers.active_set as active_set

    features, targets = samples(seed=8)
    H, R, _ = gram_form(features, targets)
    factor = GramFactor(H)
    assert bool(dual_active_set(factor, R, lam=1e-3).finished.all())
    monkeypatch.setattr(active_set, "_STALLED_STEPS", -1)
    left = dual_active_set(factor, R, lam=1e-3)
    assert not bool(left.finished.any()) and left.steps == 1
    problem = SIMProblem.from_samples(features, targets, lam=1e-3, kappa=None, n_constrained=N)
    result = ADMMSolver(device="cpu").solve(problem)
    assert result.stats.converged and result.stats.extra["interior_point_rows"] == N
    reference = clarabel(features, targets, np.full((N, N + P), 1e-3), None).sum()
    assert abs(result.stats.objective - reference) <= 1e-6 * reference


def test_a_nearly_dependent_normal_counts_as_dependent() -> None:
    """A new normal whose part orthogonal to the active ones is 1e-5.5 of its norm (z^T n / n^T n = 1e-11) is
    dependent: admitted, it would make N N^T that ill-conditioned and N^+'s rank-one updates lose ~5 digits
    (z^T n of a later normal came out negative, -4e-4 of n^T n, on the 28x28 digits teachers). One with 1e-4
    (1e-8) is independent."""
    from idl_ray.sim.solvers.active_set import _dependent

    active = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    for orthogonal, dependent in ((10**-5.5, True), (1e-4, False)):
        normal = torch.tensor([1.0, orthogonal, 0.0], dtype=torch.float64)
        z = normal - active * (active @ normal)  # the part orthogonal to the active normal
        zn, squared = (z @ normal)[None], (normal @ normal)[None]
        assert bool(_dependent(zn, squared)) is dependent


def test_a_stale_pseudo_inverse_is_recomputed_before_a_dependence_test() -> None:
    """Phase 2 decides whether a joining normal depends on the active ones from z^T n, z its part orthogonal to
    them. With N^+ off by 1e-6 (the rank-one updates' rounding, seen on the 28x28 teachers) z loses its
    orthogonality, z^T n != z^T z, and N^+ is recomputed first: the answer is the exact one, and N^+ too."""
    import idl_ray.sim.solvers.active_set as active_set

    features, targets = samples(seed=6)
    H, R, _ = gram_form(features, targets)
    Q, s = GramFactor(H).range_basis()
    B, b = Q * s.sqrt(), (R @ Q) / s.sqrt()
    state = active_set._Rows.start(B, b, torch.full((N, N + P), 1e-3, dtype=torch.float64))
    active_set._project(state, B, active_set._column_norms(B), 1000)
    assert bool(state.finished.all())
    exact_pinv = state.Pinv.clone()
    norms = torch.where(state.in_set.any(dim=0), 0.0, B.norm(dim=1))
    free = int(norms.argmax())  # the longest column in no row's active set
    normal = -B[free].expand(N, -1).clone()
    _, _, exact_zn, _ = state.complement(normal, B)
    gen = torch.Generator().manual_seed(0)
    occupied = (state.member >= 0)[:, :, None]
    noise = torch.randn(state.Pinv.shape, generator=gen, dtype=torch.float64) * occupied
    state.Pinv += 1e-6 * float(state.Pinv.abs().max()) * noise
    _, _, stale_zn, _ = state.complement(normal, B)
    assert float((stale_zn - exact_zn).abs().max()) > 1e-9 * float(normal[0] @ normal[0])
    everyone = torch.ones(N, dtype=torch.bool)
    squared = torch.linalg.vecdot(normal, normal)
    _, _, zn, _ = active_set._checked_complement(state, normal, B, everyone, squared)
    torch.testing.assert_close(zn, exact_zn, atol=1e-12 * float(normal[0] @ normal[0]), rtol=0)
    torch.testing.assert_close(state.Pinv, exact_pinv, atol=1e-9 * float(exact_pinv.abs().max()), rtol=0)


def test_recomputing_the_state_changes_nothing_but_rounding(monkeypatch) -> None:
    """The rank-one updates' state (N^+, y, u) against the exact one recomputed from the active set
    (``_on_active_set``): equal to rounding; and a solve that recomputes every 3 steps ends at the same
    objectives as one that never does."""
    import idl_ray.sim.solvers.active_set as active_set

    features, targets = samples(seed=6)
    H, R, c = gram_form(features, targets)
    factor = GramFactor(H)

    monkeypatch.setattr(active_set, "_RECOMPUTE_EVERY", 10**9)
    never = polished_objectives(H, R, c, dual_active_set(factor, R, lam=1e-3), 1e-3)
    monkeypatch.setattr(active_set, "_RECOMPUTE_EVERY", 3)
    often = polished_objectives(H, R, c, dual_active_set(factor, R, lam=1e-3), 1e-3)
    torch.testing.assert_close(often, never, atol=0, rtol=1e-10)

    # the updated state at the end of phase 1 (no constraint half-added) against its recomputation
    Q, s = factor.range_basis()
    B = Q * s.sqrt()
    b = (R @ Q) / s.sqrt()
    state = active_set._Rows.start(B, b, torch.full((N, N + P), 1e-3, dtype=torch.float64))
    active_set._project(state, B, active_set._column_norms(B), 1000)
    assert bool(state.finished.all()) and int((state.member >= 0).sum()) > N  # several constraints active
    before = (state.Pinv.clone(), state.y.clone(), state.u.clone())
    active_set._recompute(state, B, state.finished)
    for updated, exact in zip(before, (state.Pinv, state.y, state.u), strict=True):
        torch.testing.assert_close(exact, updated, atol=1e-8 * float(updated.abs().max()), rtol=0)


def test_needs_positive_thresholds() -> None:
    features, targets = samples()
    H, R, _ = gram_form(features, targets)
    assert not dual_active_set_applies(0.0)
    assert dual_active_set_applies(torch.tensor([[1e-3, torch.inf]]))
    with pytest.raises(ValueError, match="threshold > 0"):
        dual_active_set(GramFactor(H), R, lam=0.0)


@pytest.mark.parametrize("kappa", [None, 0.99, 0.02])
def test_admm_uses_it_on_low_rank_grams(kappa: float | None) -> None:
    """ADMMSolver at defaults on a low-rank Gram: every row is certified before any ADMM step, by the method
    or (rows it leaves: an optimum inside a face that the bound cuts) the interior point, with the bound
    active (0.02) or not; the objective is Clarabel's and the same as with the method switched off."""
    features, targets = samples(seed=7)
    lam = 1e-4
    problem = SIMProblem.from_samples(features, targets, lam=lam, kappa=kappa, n_constrained=N)
    ours = ADMMSolver(device="cpu").solve(problem)
    off = ADMMSolver(device="cpu", active_set=False).solve(problem)
    assert ours.stats.converged and off.stats.converged
    extra = ours.stats.extra
    assert extra["active_set_steps"] > 0 and off.stats.extra["active_set_steps"] == 0
    assert extra["active_set_rows"] > 0
    assert extra["active_set_rows"] + extra["interior_point_rows"] == N
    assert ours.stats.iterations == 0
    if kappa is not None:
        l1 = ours.weights[:, :N].abs().sum(1)
        assert float(l1.max()) <= kappa
        assert (kappa == 0.02) == bool((l1 >= kappa * (1 - 1e-6)).any())  # the bound binds at 0.02 only
    reference = clarabel(features, targets, np.full((N, N + P), lam), kappa).sum()
    assert abs(ours.stats.objective - reference) <= 1e-6 * reference
    assert ours.stats.objective <= off.stats.objective * (1 + 2e-7)
    # a vertex: no more nonzeros than the method switched off (its vertex step) leaves
    assert int((ours.weights != 0).sum()) <= int((off.weights != 0).sum())


def test_rows_the_method_certifies_as_they_are_skip_the_polish(monkeypatch) -> None:
    """The method's answers carry its rank-one updates' rounding, yet rows whose answer certifies as it is are
    taken without the polish (its exact solve on the support): fewer rows reach the polish than the method
    solved, and every row is still certified, at Clarabel's objective."""
    import idl_ray.sim.solvers.row_block as row_block

    features, targets = samples(seed=7)
    lam = 1e-4
    problem = SIMProblem.from_samples(features, targets, lam=lam, kappa=None, n_constrained=N)
    polished = []
    real = row_block.polish_if_better

    def counting(*args, eligible=None, **kwargs):
        polished.append(int(eligible.sum()))
        return real(*args, eligible=eligible, **kwargs)

    monkeypatch.setattr(row_block, "polish_if_better", counting)
    result = ADMMSolver(device="cpu").solve(problem)
    assert result.stats.converged and result.stats.iterations == 0
    assert result.stats.extra["active_set_rows"] == N
    assert sum(polished) < N
    reference = clarabel(features, targets, np.full((N, N + P), lam), None).sum()
    assert abs(result.stats.objective - reference) <= 1e-6 * reference


def test_a_joint_batch_gives_each_stage_its_own_answer() -> None:
    """Two stages on one Gram in one batch (joint.py): stage 1 equilibrated under a binding bound, stage 2
    unscaled, unbounded, at another lam, posed in stage 1's variables. Polished, each stage's answer has the
    objective of the method run on that stage alone (the bound must not reach stage 2's rows: their free
    answers break it)."""
    from idl_ray.sim.solvers.joint import joint_active_set, joint_applies
    from idl_ray.sim.solvers.scaling import ScaledStage

    features, targets = samples(seed=1)
    outputs = features @ torch.randn(
        N + P, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    H, R1, c1 = gram_form(features, targets)
    _, R2, c2 = gram_form(features, outputs)
    kappa, lam1, lam2 = 0.02, 1e-4, 3e-4
    stage1 = ScaledStage.of(H, R1, lam1, kappa, N, equilibrate=True)
    stage2 = ScaledStage.of(H, R2, lam2, None, 0, equilibrate=True)
    assert stage1.scaling is not None and stage2.scaling is None
    factor1 = GramFactor(stage1.H)
    assert joint_applies(factor1, [stage1, stage2], [N, 0])
    assert not joint_applies(factor1, [stage1, stage1], [N, N])  # a bound on a later stage: not joint
    joint1, joint2 = joint_active_set(factor1, [stage1, stage2], N)
    alone1 = dual_active_set(factor1, stage1.R, lam=stage1.lam, kappa=stage1.kappa, n_constrained=N)
    alone2 = dual_active_set(GramFactor(H), R2, lam=lam2)
    assert joint1.steps == joint2.steps >= max(alone1.steps, alone2.steps)
    assert bool((alone2.weights[:, :N].abs().sum(1) > kappa).any())
    for joint, alone, (H_, R_, c_, lam, bound) in (
        (joint1, alone1, (stage1.H, stage1.R, c1, stage1.lam, stage1.kappa)),
        (joint2, alone2, (H, R2, c2, lam2, None)),
    ):
        assert bool(joint.finished.all()) and bool(alone.finished.all())
        nc = N if bound is not None else 0
        objectives = []
        for result in (joint, alone):
            W, ok = polish_rows(H_, R_, result.weights, lam=lam, kappa=bound, n_constrained=nc)
            assert bool(ok.all())
            if bound is not None:
                W = prox(W, 0.0, bound, N)
            objectives.append(duality_gap(W, H_, R_, c_, lam=lam, kappa=bound, n_constrained=nc).primal)
        torch.testing.assert_close(objectives[0], objectives[1], rtol=1e-9, atol=1e-14)
        # before the polish too (which mends any support it is given, e.g. stage 2's rows cut to the bound):
        # the first N columns' l1 norms (the optimum is not unique among the duplicated pixel columns)
        l1 = [result.weights[:, :N].abs().sum(1) for result in (joint, alone)]
        torch.testing.assert_close(l1[0], l1[1], rtol=1e-6, atol=0)


def test_admm_solves_planned_stages_in_one_batch() -> None:
    """ADMMSolver.planned_stages on a fit's two stages (one G): the first solve runs the method for both, the
    second takes its rows' answers; both certified with the objectives of separate solves. A problem outside
    the plan is solved on its own."""
    from idl_ray.sim.problem import GramStats

    features, targets = samples(seed=7)
    outputs = features @ torch.randn(
        N + P, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    stats = GramStats.from_batch(features, torch.cat([targets, outputs], dim=1))
    stage1 = SIMProblem(stats=stats.row_block(slice(0, N)), n_constrained=N, lam=1e-4, kappa=0.02)
    stage2 = SIMProblem(stats=stats.row_block(slice(N, None)), n_constrained=0, lam=3e-4, kappa=None)
    solver = ADMMSolver(device="cpu")
    with solver.planned_stages([stage1, stage2]):
        first, second = solver.solve(stage1), solver.solve(stage2)
        other = solver.solve(stage2.replace(lam=1e-3))
    assert first.stats.extra["joint_active_set"] and second.stats.extra["joint_active_set"]
    assert not other.stats.extra["joint_active_set"] and other.stats.converged
    assert first.stats.extra["active_set_steps"] == second.stats.extra["active_set_steps"] > 0
    for planned, alone in (
        (first, ADMMSolver(device="cpu").solve(stage1)),
        (second, ADMMSolver(device="cpu").solve(stage2)),
    ):
        assert planned.stats.converged and alone.stats.converged
        assert not alone.stats.extra["joint_active_set"]
        assert planned.stats.objective == pytest.approx(alone.stats.objective, rel=1e-9)
    assert float(first.weights[:, :N].abs().sum(1).max()) <= 0.02


def test_a_sim_fit_runs_both_stages_in_one_batch() -> None:
    """SIM.fit on a teacher whose inputs are low-rank (pixels from 8 directions, as upsampled images): the
    dual active-set method runs once for both stages (stage 2 takes the joint answer) and each stage's
    objective is that of a fresh solver on the same stage problem."""
    from torch import nn

    from idl_ray.sim import SIM

    features, _ = samples(seed=3)
    inputs = features[:, N:].float()
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(P, 6), nn.ReLU(), nn.Linear(6, 2))
    sim = SIM(activation="relu", kappa=0.95, lam=1e-4, progress=False).fit(
        teacher, inputs, solver=ADMMSolver(device="cpu")
    )
    for stage in ("stage1", "stage2"):
        stats = sim.stats_[stage]
        assert stats.converged and stats.extra["joint_active_set"] and stats.extra["active_set_rows"] > 0
        alone = ADMMSolver(device="cpu").solve(sim.problems_[stage]).stats
        assert alone.converged and not alone.extra["joint_active_set"]
        assert stats.objective == pytest.approx(alone.objective, rel=1e-9)
    summary = sim.summary()
    assert summary.joint_active_set and "one active-set batch" in str(summary)


def test_a_joint_batch_solves_only_the_rows_asked_for() -> None:
    """``joint_active_set(rows=...)``: rows left out have zero weights and are not finished; the others have
    the answers of the full batch (polished objectives)."""
    from idl_ray.sim.solvers.joint import joint_active_set
    from idl_ray.sim.solvers.scaling import ScaledStage

    features, targets = samples(seed=1)
    outputs = features @ torch.randn(
        N + P, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    H, R1, _ = gram_form(features, targets)
    _, R2, c2 = gram_form(features, outputs)
    stage1 = ScaledStage.of(H, R1, 1e-4, 0.02, N, equilibrate=True)
    stage2 = ScaledStage.of(H, R2, 3e-4, None, 0, equilibrate=True)
    factor1 = GramFactor(stage1.H)
    full1, full2 = joint_active_set(factor1, [stage1, stage2], N)
    some = torch.tensor([0, 2])
    part1, part2 = joint_active_set(factor1, [stage1, stage2], N, [torch.zeros(0, dtype=torch.long), some])
    assert not bool(part1.finished.any()) and bool((part1.weights == 0).all())
    assert (
        bool(part2.finished[some].all())
        and not bool(part2.finished[1])
        and bool((part2.weights[1] == 0).all())
    )
    objectives = []
    for result in (full2, part2):
        W, ok = polish_rows(H, R2[some], result.weights[some], lam=3e-4, kappa=None, n_constrained=0)
        assert bool(ok.all())
        objectives.append(duality_gap(W, H, R2[some], c2[some], lam=3e-4, kappa=None, n_constrained=0).primal)
    torch.testing.assert_close(objectives[0], objectives[1], rtol=1e-9, atol=1e-14)
    assert part1.steps == part2.steps <= full1.steps


def test_a_planned_stage_that_needs_no_method_leaves_the_batch_to_the_next() -> None:
    """Stage 1 with zero targets is certified at its start (W = 0) and never runs the method: the joint batch
    then runs when stage 2 needs it (stage 1 solved: not in it), with stage 2's separate objective."""
    from idl_ray.sim.problem import GramStats

    features, _ = samples(seed=7)
    outputs = features @ torch.randn(
        N + P, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    stats = GramStats.from_batch(
        features, torch.cat([torch.zeros(features.shape[0], N, dtype=torch.float64), outputs], dim=1)
    )
    stage1 = SIMProblem(stats=stats.row_block(slice(0, N)), n_constrained=N, lam=1e-4, kappa=0.02)
    stage2 = SIMProblem(stats=stats.row_block(slice(N, None)), n_constrained=0, lam=3e-4, kappa=None)
    solver = ADMMSolver(device="cpu")
    with solver.planned_stages([stage1, stage2]):
        first, second = solver.solve(stage1), solver.solve(stage2)
    assert first.stats.converged and bool((first.weights == 0).all())
    assert not first.stats.extra["joint_active_set"] and first.stats.extra["active_set_steps"] == 0
    assert second.stats.extra["joint_active_set"] and second.stats.extra["active_set_rows"] > 0
    alone = ADMMSolver(device="cpu").solve(stage2)
    assert second.stats.converged and second.stats.objective == pytest.approx(alone.stats.objective, rel=1e-9)


@pytest.mark.parametrize("sparse", [True, False])
def test_the_product_with_the_slots_columns_matches_a_loop(sparse: bool) -> None:
    """z = n + sum_s c_s B[column_s] per row, as a CSR product (CPU) or a dense one on a scattered buffer (GPU's
    way, forced here): equal to a plain loop, with repeated columns summed (empty slots point at column 0 with
    coefficient 0, next to a real entry of column 0) and the buffer left zero; no slot gives n back."""
    generator = torch.Generator().manual_seed(3)
    d, r = 40, 7
    B = torch.randn(d, r, generator=generator, dtype=torch.float64)
    base = torch.randn(4, r, generator=generator, dtype=torch.float64)
    columns = torch.tensor([[0, 5, 0, 9], [3, 3, 12, 0], [39, 1, 2, 0], [0, 0, 0, 0]])
    coefficients = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    coefficients[0, 2] = coefficients[3] = 0.0  # empty slots: coefficient 0 on column 0
    buffer = torch.zeros(4, d, dtype=torch.float64)
    got = _plus_rows_of(base, columns, coefficients, B, lambda: buffer, sparse=sparse)
    expected = base.clone()
    for i in range(4):
        for s in range(4):
            expected[i] += coefficients[i, s] * B[columns[i, s]]
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
    assert not bool(buffer.any())
    none = _plus_rows_of(base, columns[:, :0], coefficients[:, :0], B, lambda: buffer, sparse=sparse)
    assert torch.equal(none, base) and none.data_ptr() != base.data_ptr()
