"""Progress reporting, timings, checkpoints on disk and the convergence plot (no actors needed)."""

from __future__ import annotations

import logging

import pytest
import torch

from idl_ray.distributed.checkpoint import Checkpointer, SolveCheckpoint, load_checkpoint
from idl_ray.distributed.progress import ProgressEvent, ProgressReporter, Timings, plot_convergence
from idl_ray.errors import DistributedError
from idl_ray.sim.solvers.admm_kernels import ADMMState


def event(iteration: int) -> ProgressEvent:
    return ProgressEvent("gram", iteration, 1e-3 / iteration, 2e-3 / iteration, 1e-6, 1e-6, 1.0, [])


def test_reporter_logs_every_k_iterations_and_calls_back(caplog):
    seen = []
    reporter = ProgressReporter("gram", 100, progress=False, log_every=20, callback=seen.append)
    with caplog.at_level(logging.DEBUG, logger="idl_ray.distributed"):
        for k in range(10, 101, 10):
            reporter.update(event(k))
    reporter.close()
    assert [e.iteration for e in seen] == list(range(10, 101, 10))
    lines = [r.getMessage() for r in caplog.records if "primal" in r.getMessage()]
    assert len(lines) == 5 and "iteration 20" in lines[0]


def test_reporter_with_a_progress_bar():
    reporter = ProgressReporter("consensus", 50, progress=True, log_every=10)
    reporter.update(event(10))
    assert reporter.bar is not None and reporter.bar.n == 10
    reporter.close()


def test_timings_split_round_trips():
    timings = Timings()
    timings.round_trip(1.0, [0.25, 0.75])
    assert timings.seconds["iterations"] == 0.75 and timings.seconds["communication"] == pytest.approx(0.25)
    with timings.phase("load"):
        pass
    assert timings.as_dict()["load"] >= 0


def test_checkpoints_round_trip_on_disk(tmp_path):
    keeper = Checkpointer(every=10, directory=str(tmp_path), name="run")
    assert keeper.due(10) and not keeper.due(5)
    state = ADMMState.zeros(2, 3, 1.5, dtype=torch.float64)
    keeper.save(SolveCheckpoint("gram", 10, 1.5, 3.0, [state], history=[{"iteration": 10}]))
    assert not keeper.due(15) and keeper.due(20)
    loaded = load_checkpoint(str(tmp_path / "run.pt"))
    assert loaded.iteration == 10 and loaded.pending_rho == 3.0
    assert torch.equal(loaded.worker_states[0].W, state.W)
    torch.save({"not": "a checkpoint"}, tmp_path / "other.pt")
    with pytest.raises(DistributedError, match="not an idl_ray solve checkpoint"):
        load_checkpoint(str(tmp_path / "other.pt"))
    with pytest.raises(DistributedError, match="No checkpoint"):
        Checkpointer(every=5).restore()


def test_convergence_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    history = [{"iteration": k, "primal": 1.0 / k, "dual": 2.0 / k} for k in range(10, 200, 10)]
    path = tmp_path / "convergence.png"
    plot_convergence(history, str(path), title="test")
    assert path.stat().st_size > 1000
