"""Job: fit a SIM model from extracted states (``idl-ray solve``).

Reads the Parquet shards ``idl-ray extract`` wrote one batch at a time into the Gram statistics
(:class:`~idl_ray.sim.problem.GramStats`; the samples are kept only for solvers that need them), then
solves stage 1 (``[A B]``, ``||A||_inf <= kappa``) and stage 2 (``[C D]``) exactly as
:meth:`idl_ray.sim.SIM.fit` does, with the same state rescaling (``rescale="auto"`` for ReLU-type
teachers, computed from the teacher's exact weights saved with the states). The run directory is that of
``idl-ray sim`` (model, report, plots), and ``idl-ray evaluate --model <run dir>`` finds the data and
teacher of the extract run it came from.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, ClassVar

from idl_ray._validation import (
    Options,
    bad_parameter,
    check_choice,
    check_kappa,
    check_positive_float,
    check_positive_int,
)
from idl_ray.jobs.sim_job import SOLVERS, check_strategy

__all__ = ["SolveJobConfig", "fit_from_states", "run_solve_job"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SolveJobConfig(Options):
    """Settings of the ``idl-ray solve`` job."""

    states: str | None = None
    kappa: float = 0.95
    lam: float = 1e-4
    rescale: str = "auto"
    solver: str = "ray-admm"
    workers: int = 2
    strategy: str = "gram"
    use_gpu: bool | None = None
    address: str | None = None
    batch_size: int = 4096
    output_dir: str | None = None
    quiet: bool = False

    FLAG_HELP: ClassVar[dict[str, str]] = {
        "states": "run directory of `idl-ray extract` (or its states/ folder) (required)",
        "kappa": "well-posedness bound ||A||_inf <= kappa < 1",
        "lam": "l1 weight (sparsity)",
        "rescale": "'auto': rescale ReLU-type layers so the teacher itself meets kappa; 'none'",
        "solver": "convex solver; ray-* run on Ray actors",
        "batch_size": "rows read from Parquet per batch",
        "output_dir": "run directory (default: runs/solve-<UTC timestamp>/)",
        "quiet": "no progress bars or step logs; print only the run directory",
    }

    def _validate(self) -> None:
        owner = "SolveJobConfig"
        if not isinstance(self.states, str) or not self.states:
            raise bad_parameter(
                "states", owner, "the run directory of `idl-ray extract`", self.states,
                "Pass --states runs/extract-<timestamp>.",
            )  # fmt: skip
        check_kappa(self.kappa, owner)
        check_positive_float(self.lam, "lam", owner, allow_zero=True)
        check_choice(self.rescale, "rescale", owner, ("auto", "none"))
        check_choice(self.solver, "solver", owner, SOLVERS)
        check_positive_int(self.workers, "workers", owner)
        check_strategy(self.solver, self.strategy, owner)
        check_positive_int(self.batch_size, "batch_size", owner)


def fit_from_states(config: SolveJobConfig, *, progress: bool = False):
    """A fitted :class:`~idl_ray.sim.SIM` from the states folder named by ``config.states``."""
    import torch

    from idl_ray.implicit.projection import project_rows_onto_l1_ball
    from idl_ray.jobs.sim_job import make_solver
    from idl_ray.jobs.states_io import iter_state_shards, read_structure, states_folder
    from idl_ray.sim import SIM
    from idl_ray.sim.extraction import progress_bar
    from idl_ray.sim.problem import GramStats, SampleData, SIMProblem

    folder = states_folder(config.states)
    structure = read_structure(folder)
    sim = SIM(activation="auto", kappa=config.kappa, lam=config.lam, rescale=config.rescale)
    scales = SIM._scales(structure, {"rescale": config.rescale, "variant": "lasso", "kappa": config.kappa})
    solver = make_solver(config)
    start = time.perf_counter()
    stats: GramStats | None = None
    feats: list[torch.Tensor] = []
    targs: list[torch.Tensor] = []
    for batch in progress_bar(
        iter_state_shards(folder, batch_size=config.batch_size),
        total=None,
        desc="read states",
        enabled=progress,
    ):
        Z, X, U, Y = batch["z"], batch["x"], batch["u"], batch["y"]
        if scales is not None:
            s = scales.to(dtype=Z.dtype)
            Z, X = Z * s, X * s
        features, targets = torch.cat([X, U], dim=1), torch.cat([Z, Y], dim=1)
        stats = GramStats.accumulate(stats, features, targets)
        if solver.needs_samples:
            feats.append(features)
            targs.append(targets)
    if stats is None:
        raise bad_parameter(
            "states", "SolveJobConfig", "a states folder with at least one row", config.states
        )
    read_time = time.perf_counter() - start
    n = structure.num_hidden
    samples = SampleData(torch.cat(feats), torch.cat(targs)) if solver.needs_samples else None
    stage1 = SIMProblem(
        stats=stats.row_block(slice(0, n)), n_constrained=n, lam=config.lam, l2=0.0, kappa=config.kappa,
        variant="lasso", samples=None if samples is None else samples.row_block(slice(0, n)),
    )  # fmt: skip
    result1 = solver.solve(stage1)
    W1 = result1.weights.detach().to("cpu", torch.float64)
    A = project_rows_onto_l1_ball(W1[:, :n].contiguous(), config.kappa)  # guards rounding, as SIM.fit
    stage2 = SIMProblem(
        stats=stats.row_block(slice(n, None)), n_constrained=0, lam=config.lam, l2=0.0, kappa=None,
        variant="lasso", samples=None if samples is None else samples.row_block(slice(n, None)),
    )  # fmt: skip
    result2 = solver.solve(stage2)
    W2 = result2.weights.detach().to("cpu", torch.float64)
    # the fitted attributes SIM.fit sets (see idl_ray.sim.estimator.SIM)
    sim.A_, sim.B_ = A, W1[:, n:].contiguous()
    sim.C_, sim.D_ = W2[:, :n].contiguous(), W2[:, n:].contiguous()
    sim.bias_ = structure.bias
    sim.structure_ = structure
    sim.scales_ = scales
    sim.activation_ = (structure.activation, structure.negative_slope)
    sim.kappa_ = config.kappa
    sim.stats_ = {"stage1": result1.stats, "stage2": result2.stats}
    sim.problems_ = {"stage1": stage1, "stage2": stage2}
    sim.solver_ = solver
    sim.extraction_time_s_ = read_time
    sim.n_samples_ = stats.num_samples
    sim.inference_stats_ = None
    sim._module_cache = None
    return sim, folder


def run_solve_job(config: SolveJobConfig, *, log=print) -> dict[str, Any]:
    """Fit from the states, write the run directory, return the report (``report.json``)."""
    import torch

    from idl_ray.implicit.projection import inf_norm
    from idl_ray.jobs.common import ensure_ray
    from idl_ray.jobs.report import console_summary, write_plots, write_report_md
    from idl_ray.jobs.run_dir import make_run_dir, write_config, write_json
    from idl_ray.jobs.sim_job import _certificate
    from idl_ray.jobs.states_io import iter_state_shards

    say = (lambda _: None) if config.quiet else log
    total_start = time.perf_counter()
    folder = make_run_dir("solve", config.output_dir)
    write_config(folder, config.to_dict(), command="solve")
    say(f"run directory: {folder}")
    started_ray = config.solver.startswith("ray-") and ensure_ray(config.address)
    try:
        start = time.perf_counter()
        sim, states_dir = fit_from_states(config, progress=not config.quiet)
        fit_time = time.perf_counter() - start
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    stats = sim.stats_
    # fidelity on (up to 2,000 of) the recorded samples: the model's outputs against the teacher's Y
    first = next(iter_state_shards(states_dir, batch_size=2000))
    inputs = first["u"][:, :-1] if sim.bias_ else first["u"]
    outputs = sim.predict(inputs.to(torch.float32)).cpu().to(torch.float64)
    teacher_y = first["y"].to(torch.float64)
    agreement = (
        float((outputs.argmax(dim=1) == teacher_y.argmax(dim=1)).double().mean())
        if outputs.shape[1] > 1
        else None
    )
    relative_error = float(
        torch.linalg.norm(outputs - teacher_y) / max(float(torch.linalg.norm(teacher_y)), 1e-300)
    )
    summary = sim.summary()
    say(str(summary))
    sim.save(folder / "model")
    plots = write_plots(folder, stats, sim.weights, log=say)
    report = {
        "job": "solve",
        "run_dir": str(folder),
        "config": config.to_dict(),
        "states": str(states_dir),
        "headline": {
            "samples": sim.n_samples_,
            "agreement with teacher (recorded samples)": agreement,
            "relative output error": relative_error,
            "||A||_inf": inf_norm(sim.A_),
            "kappa": config.kappa,
            "solver": f"{config.solver}: {stats['stage1'].status} / {stats['stage2'].status}",
            "fit time (s)": fit_time,
        },
        "agreement_recorded": agreement,
        "relative_output_error_recorded": relative_error,
        "a_inf_norm": inf_norm(sim.A_),
        "sparsity": summary.sparsity,
        "nonzeros": summary.nonzeros,
        "certificate": {stage: _certificate(s) for stage, s in stats.items()},
        "fit_time_s": fit_time,
        "times_s": {
            "read_states": sim.extraction_time_s_,
            "stage1": stats["stage1"].time_s,
            "stage2": stats["stage2"].time_s,
            "total": time.perf_counter() - total_start,
        },
        "summary": summary.to_dict(),
        "plots": plots,
        "files": {
            "config": "config.yaml",
            "report": "report.json",
            "model": "model",
            **plots,
            "report_md": "report.md",
        },
    }
    write_json(folder, "report.json", report)
    write_report_md(folder, report, plots)
    log(console_summary(report, folder) if not config.quiet else str(folder))
    return report
