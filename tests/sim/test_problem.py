"""SIMProblem and GramStats: streaming accumulation, shard combination, objective, validation."""

from __future__ import annotations

import math

import pytest
import torch

from idl_ray.errors import ConfigError, ShapeError
from idl_ray.sim.problem import GramStats, SIMProblem


def _data(m: int = 120, d: int = 7, rows: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(m, d, dtype=torch.float64), torch.randn(m, rows, dtype=torch.float64)


def test_batches_and_shards_give_the_full_gram() -> None:
    F, T = _data()
    full = GramStats.from_batch(F, T)
    streamed = SIMProblem.from_batches((F[i : i + 25], T[i : i + 25]) for i in range(0, 120, 25))
    shards = SIMProblem.combine([GramStats.from_batch(F[:50], T[:50]), GramStats.from_batch(F[50:], T[50:])])
    for problem in (streamed, shards):
        assert problem.num_samples == 120
        torch.testing.assert_close(problem.G, F.T @ F)
        torch.testing.assert_close(problem.Rt, T.T @ F)
        torch.testing.assert_close(problem.target_sq, (T * T).sum(0))
    torch.testing.assert_close(full.G, streamed.G)


def test_float32_batches_accumulate_in_float64() -> None:
    F, T = _data()
    stats = GramStats.from_batch(F.float(), T.float())
    assert stats.G.dtype == torch.float64


def test_objective_matches_the_sample_formula() -> None:
    F, T = _data()
    problem = SIMProblem.from_samples(
        F, T, n_constrained=4, lam=0.05, l2=0.1, kappa=0.7, variant="elastic_net"
    )
    W = torch.randn(3, 7, dtype=torch.float64)
    direct = 0.5 / 120 * ((T.T - W @ F.T) ** 2).sum() + 0.05 * W.abs().sum() + 0.05 * (W * W).sum()
    assert math.isclose(problem.objective(W), float(direct), rel_tol=1e-12)
    expected_violation = max(0.0, float(W[:, :4].abs().sum(1).max()) - 0.7)
    assert problem.constraint_violation(W) == pytest.approx(expected_violation)
    assert problem.residual(W) == pytest.approx(float(((T.T - W @ F.T) ** 2).sum()) / 120)


def test_row_block_is_the_sub_problem() -> None:
    F, T = _data()
    problem = SIMProblem.from_samples(F, T, n_constrained=2, lam=0.01, kappa=0.5, keep_samples=True)
    W = torch.randn(3, 7, dtype=torch.float64)
    block = problem.row_block(slice(1, 3))
    assert block.rows == 2 and block.samples is not None and block.samples.targets.shape == (120, 2)
    assert block.objective(W[1:]) == pytest.approx(float(problem.row_objectives(W)[1:].sum()))


def test_bad_inputs_give_clear_errors() -> None:
    F, T = _data()
    with pytest.raises(ConfigError, match="no batches"):
        SIMProblem.from_batches([])
    with pytest.raises(ShapeError, match="same"):
        GramStats.from_batch(F, T[:10])
    bad = F.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ConfigError, match="NaN"):
        SIMProblem.from_samples(bad, T)
    with pytest.raises(ConfigError, match="kappa"):
        SIMProblem.from_samples(F, T, n_constrained=2, kappa=1.5)
    with pytest.raises(ConfigError, match="n_constrained"):
        SIMProblem.from_samples(F, T, n_constrained=99)
    with pytest.raises(ConfigError, match="elastic_net"):
        SIMProblem.from_samples(F, T, l2=0.1)
    with pytest.raises(ConfigError, match="least_squares"):
        SIMProblem.from_samples(F, T, lam=0.1, variant="least_squares")
    with pytest.raises(ConfigError, match="variant"):
        SIMProblem.from_samples(F, T, variant="ridge")
    with pytest.raises(ConfigError, match="num_samples = 0"):
        SIMProblem(stats=GramStats.zeros(7, 3))
    stats = GramStats.from_batch(F, T)
    with pytest.raises(ShapeError, match="features"):
        stats.add(F[:, :5], T)
    with pytest.raises(ShapeError, match="merge"):
        stats.merge(GramStats.from_batch(F[:, :5], T))
    problem = SIMProblem(stats=stats)
    with pytest.raises(ShapeError, match=r"\(3, 7\)"):
        problem.objective(torch.zeros(3, 6))
