"""Job: train an explicit teacher on an offline data set, then fit a SIM implicit model to it.

This is the default ``idl-ray sim`` job: digits, a 64-64-32-10 ReLU MLP teacher with biases, and the
Ray ADMM solver with two workers on the local Ray (or the cluster given by ``address`` / RAY_ADDRESS).
With a Ray solver (``ray-*``) the teacher's states stream through Ray Data actors as well
(:mod:`idl_ray.distributed.extraction`; ``workers`` actors); other solvers extract in the driver.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from idl_ray._validation import (
    Options,
    bad_parameter,
    check_choice,
    check_kappa,
    check_positive_float,
    check_positive_int,
)
from idl_ray.datasets import DATASETS

#: solver names accepted by the job; ``ray-*`` ones run on Ray actors
SOLVERS = ("admm", "cvx", "pgd", "lstsq", "ray-admm", "ray-cvx", "ray-pgd")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimJobConfig(Options):
    """Settings of the ``idl-ray sim`` job."""

    dataset: str = "digits"
    hidden: tuple[int, ...] = (64, 32)
    teacher_epochs: int = 30
    activation: str = "relu"
    kappa: float = 0.95
    lam: float = 1e-4
    solver: str = "ray-admm"
    workers: int = 2
    strategy: str = "gram"
    use_gpu: bool | None = None
    address: str | None = None
    seed: int = 0
    output_dir: str | None = None

    def _validate(self) -> None:
        owner = "SimJobConfig"
        check_choice(self.dataset, "dataset", owner, DATASETS)
        if not self.hidden or any(
            isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden
        ):
            raise bad_parameter("hidden", owner, "a non-empty tuple of positive layer widths", self.hidden)
        check_positive_int(self.teacher_epochs, "teacher_epochs", owner)
        check_choice(self.activation, "activation", owner, ("relu", "tanh", "leaky_relu"))
        check_kappa(self.kappa, owner)
        check_positive_float(self.lam, "lam", owner, allow_zero=True)
        check_choice(self.solver, "solver", owner, SOLVERS)
        check_positive_int(self.workers, "workers", owner)
        check_choice(self.strategy, "strategy", owner, ("gram", "consensus"))


def make_solver(config: SimJobConfig):
    """The solver object named by ``config.solver``."""
    from idl_ray import sim

    if config.solver == "admm":
        return sim.solvers.ADMMSolver()
    if config.solver == "cvx":
        return sim.solvers.CVXSolver()
    if config.solver == "pgd":
        return sim.solvers.ProjectedGDLowRankSolver()
    if config.solver == "lstsq":
        return sim.solvers.LeastSquareSolver()
    from idl_ray import distributed

    if config.solver == "ray-admm":
        return distributed.RayADMMSolver(
            num_workers=config.workers, strategy=config.strategy, use_gpu=config.use_gpu
        )
    if config.solver == "ray-cvx":
        return distributed.RayCVXSolver(num_workers=config.workers)
    return distributed.RayProjectedGDSolver(num_workers=config.workers, use_gpu=config.use_gpu)


def run_sim_job(config: SimJobConfig, *, log=print) -> dict[str, Any]:
    """Run the job and return its report (also written to ``output_dir/sim_report.json``)."""
    import torch

    from idl_ray.datasets import load_dataset
    from idl_ray.jobs.common import ensure_ray, write_report
    from idl_ray.sim import SIM
    from idl_ray.teachers import mlp_teacher, train_classifier

    torch.manual_seed(config.seed)
    split = load_dataset(config.dataset, seed=config.seed)
    log(f"data: {config.dataset}, {len(split.x_train)} train / {len(split.x_test)} test samples")
    teacher = mlp_teacher(split.num_features, config.hidden, split.num_classes, activation=config.activation)
    teacher_accuracy = train_classifier(teacher, split, epochs=config.teacher_epochs, seed=config.seed)
    log(
        f"teacher {split.num_features}-{'-'.join(map(str, config.hidden))}-{split.num_classes}: "
        f"test accuracy {teacher_accuracy:.4f}"
    )

    started_ray = config.solver.startswith("ray-") and ensure_ray(config.address)
    try:
        start = time.perf_counter()
        sim = SIM(activation=config.activation, kappa=config.kappa, lam=config.lam)
        data: Any = split.x_train
        if config.solver.startswith("ray-"):  # the teacher runs on Ray Data actors too (streaming)
            import ray

            data = ray.data.from_numpy(split.x_train.numpy())
            sim.set_params(stream={"num_actors": config.workers, "use_gpu": config.use_gpu})
        sim.fit(teacher, data, solver=make_solver(config))
        fit_time = time.perf_counter() - start
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    sim_accuracy = sim.score((split.x_test, split.y_test))
    summary = sim.summary()
    log(f"SIM ({config.solver}): test accuracy {sim_accuracy:.4f} in {fit_time:.2f} s")
    log(str(summary))
    report = {
        "job": "sim",
        "config": config.to_dict(),
        "teacher_accuracy": teacher_accuracy,
        "sim_accuracy": sim_accuracy,
        "fit_time_s": fit_time,
        "streaming": {k: v.to_dict() for k, v in getattr(sim, "stream_info_", {}).items()},
        "summary": summary.to_dict(),
    }
    if config.output_dir:
        import pathlib

        sim.save(pathlib.Path(config.output_dir) / "sim_model")
        path = write_report(report, config.output_dir, "sim_report")
        log(f"model and report written to {path.parent}")
    return report
