"""Job: train an explicit teacher on an offline data set, then fit a SIM implicit model to it.

This is the default ``idl-ray sim`` job: digits, a 64-64-32-10 ReLU MLP teacher with biases, and the
Ray ADMM solver with two workers on the local Ray (or the cluster given by ``address`` / RAY_ADDRESS).
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
    workers: int | None = None
    cpus_per_worker: float | None = None
    strategy: str | None = None
    use_gpu: bool | None = None
    address: str | None = None
    seed: int = 0
    output_dir: str | None = None

    #: the allowed values of the choice options (listed by ``--help``)
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "dataset": DATASETS,
        "activation": ("relu", "tanh", "leaky_relu"),
        "solver": SOLVERS,
        "strategy": ("gram", "consensus"),
    }

    #: what an option means where its default alone does not say (shown by ``--help``)
    NOTES: ClassVar[dict[str, str]] = {
        "workers": "solver actors of the ray-* solvers (None: 2)",
        "cpus_per_worker": "CPUs each ray-* solver actor reserves (None: 1.0; fractions share cores)",
        "strategy": "ray-admm only (None: gram)",
        "use_gpu": "admm/pgd: CUDA or CPU; ray-admm/ray-pgd: GPU actors (None: when available)",
        "address": "Ray cluster of the ray-* solvers (None: RAY_ADDRESS or a local Ray)",
        "output_dir": "folder for sim_report.json and the model (created; checked before any work)",
    }

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
        check_positive_int(self.workers, "workers", owner, allow_none=True)
        if self.cpus_per_worker is not None:
            check_positive_float(self.cpus_per_worker, "cpus_per_worker", owner)
        if self.strategy is not None:
            check_choice(self.strategy, "strategy", owner, self.CHOICES["strategy"])
        # options a solver would silently ignore are refused, naming the solvers that take them
        on_ray = self.solver.startswith("ray-")
        takes = {
            "workers": on_ray,
            "cpus_per_worker": on_ray,
            "address": on_ray,
            "strategy": self.solver == "ray-admm",
            "use_gpu": self.solver in ("admm", "pgd", "ray-admm", "ray-pgd"),
        }
        if self.use_gpu and self.solver in ("admm", "pgd"):
            import torch

            if not torch.cuda.is_available():
                raise bad_parameter(
                    "use_gpu",
                    owner,
                    "False or unset on a machine without CUDA",
                    self.use_gpu,
                    f"solver={self.solver!r} runs in this process, where torch.cuda.is_available() is "
                    "False; drop --use-gpu (or use a ray-* solver on a cluster with GPUs).",
                )
        for name, accepted in takes.items():
            if getattr(self, name) is not None and not accepted:
                users = {
                    "strategy": "ray-admm",
                    "use_gpu": "admm, pgd, ray-admm and ray-pgd (cvx and lstsq run on the CPU)",
                }.get(name, "the ray-* solvers")
                raise bad_parameter(
                    name,
                    owner,
                    f"unset with solver={self.solver!r}",
                    getattr(self, name),
                    f"Only {users} use it; drop --{name.replace('_', '-')} or pick such a solver.",
                )


def make_solver(config: SimJobConfig):
    """The solver object named by ``config.solver``."""
    from idl_ray.sim import solvers

    # use_gpu on a local solver: True must mean CUDA (an error where there is none), False the CPU
    device = None if config.use_gpu is None else ("cuda" if config.use_gpu else "cpu")
    if config.solver == "admm":
        return solvers.ADMMSolver(device=device)
    if config.solver == "cvx":
        return solvers.CVXSolver()
    if config.solver == "pgd":
        return solvers.ProjectedGDLowRankSolver(device=device)
    if config.solver == "lstsq":
        return solvers.LeastSquareSolver()
    from idl_ray import distributed

    run: dict[str, Any] = {"num_workers": config.workers or 2}
    if config.cpus_per_worker is not None:
        run["cpus_per_worker"] = config.cpus_per_worker
    if config.solver == "ray-admm":
        return distributed.RayADMMSolver(strategy=config.strategy or "gram", use_gpu=config.use_gpu, **run)
    if config.solver == "ray-cvx":
        return distributed.RayCVXSolver(**run)
    return distributed.RayProjectedGDSolver(use_gpu=config.use_gpu, **run)


def run_sim_job(config: SimJobConfig, *, log=print) -> dict[str, Any]:
    """Run the job and return its report (also written to ``output_dir/sim_report.json``)."""
    from idl_ray.jobs.common import ensure_ray, prepare_output_dir

    # everything that can fail without computing is checked before the teacher is trained: the output
    # folder, the solver (devices), the Ray connection
    prepare_output_dir(config.output_dir, "SimJobConfig")
    solver = make_solver(config)
    started_ray = config.solver.startswith("ray-") and ensure_ray(config.address)
    try:
        if config.solver in ("ray-admm", "ray-pgd"):  # actors for the whole solve (ray-cvx queues tasks)
            _check_cluster(solver)
        return _run(config, solver, log)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _check_cluster(solver: Any) -> None:
    """The actors the solver will ask for fit the cluster (else the error comes before the teacher)."""
    from idl_ray.distributed import resources

    run = solver.run_config
    totals = resources.cluster_totals()
    resources.check_resources(run, resources.resolve_use_gpu(run, totals), totals)


def _run(config: SimJobConfig, solver: Any, log) -> dict[str, Any]:
    import torch

    from idl_ray.datasets import load_dataset
    from idl_ray.jobs.common import write_report
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

    start = time.perf_counter()
    sim = SIM(activation=config.activation, kappa=config.kappa, lam=config.lam)
    sim.fit(teacher, split.x_train, solver=solver)
    fit_time = time.perf_counter() - start
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
        "summary": summary.to_dict(),
    }
    if config.output_dir:
        import pathlib

        sim.save(pathlib.Path(config.output_dir) / "sim_model")
        path = write_report(report, config.output_dir, "sim_report")
        log(f"model and report written to {path.parent}")
    return report
