"""Job: fit a SIM implicit model to a teacher network on data, and leave a run directory behind.

By default: scikit-learn's digits, a 64-64-32-10 ReLU MLP teacher trained here, and the Ray ADMM
solver with two workers on the local Ray (or the cluster given by ``address`` / RAY_ADDRESS); with a Ray
solver (``ray-*``) the teacher's states stream through Ray Data actors as well
(:mod:`idl_ray.distributed.extraction`; ``workers`` actors), other solvers extract in the driver. Users
bring their own data (``data``: .npz, .npy, Parquet, ``module:function``) and teacher (``teacher``:
TorchScript, ``module:function``, state_dict + ``hidden``); see :mod:`idl_ray.jobs.data_sources` and
:mod:`idl_ray.jobs.teacher_sources`. The run directory (:mod:`idl_ray.jobs.run_dir`) gets
``config.yaml``, ``report.json``, ``model/`` (:meth:`idl_ray.sim.SIM.load` reads it), ``teacher.pt``
(TorchScript, when the teacher was trained here), ``convergence.png``, ``sparsity.png`` and ``report.md``.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
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
from idl_ray.jobs.common import check_teacher_settings

#: solver names accepted by the job; ``ray-*`` ones run on Ray actors
SOLVERS = ("admm", "cvx", "pgd", "lstsq", "ray-admm", "ray-cvx", "ray-pgd")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimJobConfig(Options):
    """Settings of the ``idl-ray sim`` job.

    ``data`` / ``teacher`` None: the embedded ``dataset`` and a teacher MLP (``hidden``) trained here.
    ``output_dir`` None: a new ``runs/sim-<UTC timestamp>/``.
    """

    dataset: str = "digits"
    data: str | None = None
    input_column: str | None = None
    target_column: str | None = None
    test_fraction: float = 0.25
    teacher: str | None = None
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
    quiet: bool = False
    attack_eps: tuple[float, ...] = ()
    path: bool = False
    n_lams: int = 20
    lam_ratio: float = 1e-3
    max_accuracy_drop: float = 0.01

    FLAG_HELP: ClassVar[dict[str, str]] = {
        "dataset": "embedded data set used when --data is not given",
        "data": "your data: .npz (x, y, x_test, y_test), .npy, Parquet file/folder, or module:function",
        "input_column": "Parquet / Ray Dataset input column (or several scalar columns, comma-separated); 'x'",
        "target_column": "Parquet / Ray Dataset label column ('y' when present)",
        "test_fraction": "held-out fraction when the data has no x_test",
        "teacher": "your trained network: TorchScript file, module:function, or state_dict file (with --hidden)",
        "hidden": "hidden widths of the MLP teacher, comma-separated (trained here, or to rebuild a state_dict)",
        "teacher_epochs": "epochs to train the default teacher",
        "kappa": "well-posedness bound ||A||_inf <= kappa < 1",
        "lam": "l1 weight (sparsity)",
        "solver": "convex solver; ray-* run on Ray actors",
        "workers": "Ray solver actors (and Ray Data extraction actors)",
        "address": "Ray cluster address (inside a Ray job RAY_ADDRESS is used)",
        "output_dir": "run directory (default: runs/sim-<UTC timestamp>/)",
        "quiet": "no progress bars or step logs; print only the run directory",
        "attack_eps": "l-inf radii, comma-separated: teacher and SIM accuracy under FGSM and PGD on held-out data",
        "path": "fit a lambda path instead of one lam: path.csv, path.json, path.png (--lam is not used)",
        "n_lams": "with --path: points from lam_max (all weights zero) down to lam_ratio * lam_max",
        "lam_ratio": "with --path: the smallest lam as a fraction of lam_max",
        "max_accuracy_drop": "with --path: the saved model is the sparsest within this accuracy loss",
    }

    #: the allowed values of the choice options (listed by ``--help``)
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "dataset": DATASETS,
        "activation": ("relu", "tanh", "leaky_relu"),
        "solver": SOLVERS,
        "strategy": ("gram", "consensus", "data"),
    }

    #: what an option means where its default alone does not say (shown by ``--help``)
    NOTES: ClassVar[dict[str, str]] = {
        "workers": "ray-* solvers only (None: 2)",
        "cpus_per_worker": "CPUs each ray-* solver actor reserves (None: 1.0; fractions share cores)",
        "strategy": "ray-admm: gram or consensus; ray-pgd: gram or data (None: gram)",
        "use_gpu": "admm/pgd: CUDA or CPU; ray-admm/ray-pgd: GPU actors (None: when available)",
        "address": "ray-* solvers only (None: RAY_ADDRESS or a local Ray)",
        "output_dir": "checked before any work",
    }

    def _validate(self) -> None:
        owner = "SimJobConfig"
        check_teacher_settings(self, owner)
        check_kappa(self.kappa, owner)
        check_positive_float(self.lam, "lam", owner, allow_zero=True)
        check_choice(self.solver, "solver", owner, SOLVERS)
        check_positive_int(self.workers, "workers", owner, allow_none=True)
        if self.cpus_per_worker is not None:
            check_positive_float(self.cpus_per_worker, "cpus_per_worker", owner)
        if self.strategy is not None:
            check_strategy(self.solver, self.strategy, owner)
        self._check_solver_options(owner)
        self._check_path_options(owner)
        fraction = self.test_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise bad_parameter("test_fraction", owner, "a float in (0, 1)", fraction)
        for eps in self.attack_eps:
            if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
                raise bad_parameter("attack_eps", owner, "finite radii >= 0", self.attack_eps)
        for name in ("data", "input_column", "target_column", "teacher", "output_dir", "address"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise bad_parameter(name, owner, "a non-empty string or None", value)

    def _check_path_options(self, owner: str) -> None:
        if not isinstance(self.path, bool):
            raise bad_parameter("path", owner, "a bool", self.path)
        check_positive_int(self.n_lams, "n_lams", owner)
        check_positive_float(self.lam_ratio, "lam_ratio", owner)
        if self.lam_ratio > 1:
            raise bad_parameter("lam_ratio", owner, "a float in (0, 1]", self.lam_ratio)
        check_positive_float(self.max_accuracy_drop, "max_accuracy_drop", owner, allow_zero=True)
        if self.path and self.solver == "lstsq":
            raise bad_parameter(
                "solver", owner, "an l1 solver with --path", self.solver, "lstsq has no lam; use admm."
            )

    def _check_solver_options(self, owner: str) -> None:
        """Options the chosen solver would silently ignore are refused, naming the solvers that take them."""
        on_ray = self.solver.startswith("ray-")
        takes = {
            "workers": on_ray,
            "cpus_per_worker": on_ray,
            "address": on_ray,
            "strategy": self.solver in ("ray-admm", "ray-pgd"),
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
                    "strategy": "ray-admm and ray-pgd",
                    "use_gpu": "admm, pgd, ray-admm and ray-pgd (cvx and lstsq run on the CPU)",
                }.get(name, "the ray-* solvers")
                raise bad_parameter(
                    name,
                    owner,
                    f"unset with solver={self.solver!r}",
                    getattr(self, name),
                    f"Only {users} use it; drop --{name.replace('_', '-')} or pick such a solver.",
                )


#: the strategies of the Ray solvers that have them
STRATEGIES = {"ray-admm": ("gram", "consensus"), "ray-pgd": ("gram", "data")}


def check_strategy(solver: str, strategy: str, owner: str) -> None:
    """``strategy`` is one the solver has (other solvers' strategies are checked by the caller)."""
    check_choice(strategy, "strategy", owner, SimJobConfig.CHOICES["strategy"])
    takes = STRATEGIES.get(solver)
    if takes is not None and strategy not in takes:
        raise bad_parameter(
            "strategy",
            owner,
            f"one of {list(takes)} with solver={solver!r}",
            strategy,
            "ray-admm takes gram or consensus, ray-pgd gram or data.",
        )


def make_solver(config: SimJobConfig):
    """The solver object named by ``config.solver``."""
    from idl_ray.sim import solvers

    # use_gpu on a local solver: True must mean CUDA (an error where there is none), False the CPU
    device = None if config.use_gpu is None else ("cuda" if config.use_gpu else "cpu")
    if config.solver == "admm":  # a tqdm bar per stage with the certificate, unless --quiet
        return solvers.ADMMSolver(device=device, progress=not config.quiet)
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
    if config.solver == "ray-admm":  # a tqdm bar per stage with the certificate, unless --quiet
        # the actors (and their factored Grams) serve both stages and every point of a path: one start-up
        # per job (the job closes them), overlapping the teacher's training (_start_workers_early)
        return distributed.RayADMMSolver(
            strategy=config.strategy or "gram",
            use_gpu=config.use_gpu,
            progress=not config.quiet,
            keep_workers=True,
            **run,
        )
    if config.solver == "ray-cvx":
        return distributed.RayCVXSolver(**run)
    return distributed.RayProjectedGDSolver(
        strategy=config.strategy or "gram", use_gpu=config.use_gpu, keep_workers=True, **run
    )


def prepare_teacher(config: SimJobConfig, data, *, log=print) -> tuple[Any, dict[str, Any]]:
    """The teacher (the user's, checked against the data, or the default MLP trained on it) and its facts."""
    import torch

    from idl_ray.jobs.teacher_sources import check_teacher_fits, load_teacher
    from idl_ray.teachers import mlp_teacher, train_classifier

    if config.teacher is not None:
        teacher, kind = load_teacher(
            config.teacher, hidden=config.hidden, activation=config.activation, input_dim=data.num_features
        )
        outputs = check_teacher_fits(teacher, data.x_test, config.teacher)
        log(f"teacher: {config.teacher} ({kind}), {outputs} outputs")
        return teacher, {"source": config.teacher, "kind": kind, "outputs": outputs}
    split = data.to_split()
    torch.manual_seed(config.seed)
    teacher = mlp_teacher(split.num_features, config.hidden, split.num_classes, activation=config.activation)
    train_classifier(
        teacher, split, epochs=config.teacher_epochs, seed=config.seed, progress=not config.quiet
    )
    widths = f"{split.num_features}-{'-'.join(map(str, config.hidden))}-{split.num_classes}"
    log(f"teacher: MLP {widths} trained here for {config.teacher_epochs} epochs")
    return teacher.eval(), {
        "source": "trained",
        "kind": "mlp",
        "widths": widths,
        "outputs": split.num_classes,
    }


def run_sim_job(config: SimJobConfig, *, log=print) -> dict[str, Any]:
    """Run the job, write its run directory and return its report (the content of ``report.json``).

    Everything that can fail without computing is checked before the teacher is trained: the solver (its
    devices), the run directory, the Ray connection and the cluster's room for the solver's actors.
    """
    from idl_ray.jobs.common import ensure_ray
    from idl_ray.jobs.run_dir import make_run_dir

    solver = make_solver(config)
    folder = make_run_dir("sim", config.output_dir)
    started_ray = config.solver.startswith("ray-") and ensure_ray(config.address)
    try:
        stream_cpus = None
        # actors for the whole solve (ray-cvx queues tasks; ray-pgd's gram strategy iterates on the Gram that
        # Ray Data's extraction sums, in this process: no actor)
        if config.solver == "ray-admm" or (config.solver == "ray-pgd" and solver.strategy == "data"):
            _check_cluster(solver)
            if not config.path:
                stream_cpus = _start_workers_early(config, solver)
        return _run(config, solver, folder, log, stream_cpus=stream_cpus)
    finally:
        close = getattr(solver, "close", None)
        if close is not None:  # kept actors end with the job
            close()
        if started_ray:
            import ray

            ray.shutdown()


#: CPUs Ray Data's own tasks (reading the inputs) take: kept free when the job sizes its actors
_DATA_TASK_CPUS = 1.0
#: seconds to wait for that CPU (actors of earlier work release theirs asynchronously)
_FREE_CPU_WAIT_S = 30.0


def _free_cpus(wanted: float, wait_s: float) -> float:
    """The cluster's free CPUs once at least ``wanted`` are free, or after ``wait_s`` seconds."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        free = float(ray.available_resources().get("CPU", 0.0))
        if free >= wanted or time.monotonic() >= deadline:
            return free
        time.sleep(0.2)


def _start_workers_early(config: SimJobConfig, solver: Any) -> float | None:
    """Start the solver's actors while the teacher trains, when they can coexist with Ray Data's extraction
    workers (which run between the two); returns the CPUs per extraction worker to use (None: the default).

    Ray Data's own tasks (the read of the inputs, and any map tasks) take a whole CPU each, so one free CPU is
    kept for them. The solver actors and the extraction workers fit at their defaults (1 CPU each) where the
    cluster has enough free CPUs besides; otherwise, unless the user chose ``--cpus-per-worker``, they share
    the rest evenly (a quarter of a CPU each for 2 + 2 on 2 free CPUs): the solver actors are idle during
    extraction and every actor runs one torch thread, so only the reservation changes. With GPU actors, or a
    chosen CPU count that does not fit, the actors start at the first solve. Free, not total, CPUs, and the
    one kept: sized from the total on a cluster where other work held 0.2 CPU, the solver actors left Ray
    Data's read task no whole CPU and the job waited for it forever.
    """
    from idl_ray.distributed import resources
    from idl_ray.distributed.extraction import StreamConfig
    from idl_ray.errors import ClusterConfigError

    run = solver.run_config
    totals = resources.cluster_totals()
    if resources.resolve_use_gpu(run, totals):
        return None
    free = _free_cpus(_DATA_TASK_CPUS, _FREE_CPU_WAIT_S)
    if free < _DATA_TASK_CPUS:
        raise ClusterConfigError(
            f"The Ray cluster has {free:g} free CPU(s) (of {totals['CPU']:g}) after waiting "
            f"{_FREE_CPU_WAIT_S:g} s; streaming the teacher's states "
            f"through Ray Data needs at least {_DATA_TASK_CPUS:g} free for its read tasks. Stop the work that "
            "holds the CPUs, or run on a cluster with more."
        )
    budget = free - _DATA_TASK_CPUS
    actors, per_actor = config.workers or 2, StreamConfig().cpus_per_actor
    if run.num_workers * run.cpus_per_worker + actors * per_actor <= budget:
        solver.start_workers()
        return None
    if config.cpus_per_worker is not None or budget <= 0:
        return None
    share = budget / (run.num_workers + actors)
    solver.run_config = dataclasses.replace(run, cpus_per_worker=share)
    solver.start_workers()
    return share


def _check_cluster(solver: Any) -> None:
    """The actors the solver will ask for fit the cluster (else the error comes before the teacher)."""
    from idl_ray.distributed import resources

    run = solver.run_config
    totals = resources.cluster_totals()
    resources.check_resources(run, resources.resolve_use_gpu(run, totals), totals)


def _run(
    config: SimJobConfig, solver: Any, folder: Any, log, *, stream_cpus: float | None = None
) -> dict[str, Any]:
    import torch

    from idl_ray.implicit.projection import inf_norm
    from idl_ray.jobs.data_sources import load_data
    from idl_ray.jobs.metrics import compare_outputs
    from idl_ray.jobs.report import console_summary, write_plots, write_report_md
    from idl_ray.jobs.robustness_report import robustness_report
    from idl_ray.jobs.run_dir import write_config, write_json
    from idl_ray.sim import SIM

    say = (lambda _: None) if config.quiet else log
    total_start = time.perf_counter()
    times: dict[str, float] = {}
    write_config(folder, config.to_dict(), command="sim")
    say(f"run directory: {folder}")

    start = time.perf_counter()
    data = load_data(
        config.data,
        dataset=config.dataset,
        input_column=config.input_column,
        target_column=config.target_column,
        test_fraction=config.test_fraction,
        seed=config.seed,
    )
    times["data"] = time.perf_counter() - start
    say(
        f"data: {data.source}, {len(data.x_train)} fit / {len(data.x_test)} held-out samples, "
        f"{data.num_features} features" + ("" if data.has_labels else ", no labels")
    )

    start = time.perf_counter()
    teacher, teacher_info = prepare_teacher(config, data, log=say)
    times["teacher"] = time.perf_counter() - start

    if config.path:
        from idl_ray.jobs.path_job import run_path

        return run_path(config, solver, folder, data, teacher, teacher_info, times, log=log)
    start = time.perf_counter()
    sim = SIM(activation=config.activation, kappa=config.kappa, lam=config.lam, progress=not config.quiet)
    inputs: Any = data.x_train
    if config.solver.startswith("ray-"):  # the teacher runs on Ray Data actors too (streaming)
        import ray

        inputs = ray.data.from_numpy(data.x_train.numpy())
        stream = {"num_actors": config.workers or 2, "use_gpu": config.use_gpu}
        if stream_cpus is not None:  # sharing the CPUs with the solver's actors, started early
            stream["cpus_per_actor"] = stream_cpus
        sim.set_params(stream=stream)
    sim.fit(teacher, inputs, solver=solver)
    fit_time = time.perf_counter() - start
    stats = sim.stats_
    times["extraction"] = sim.extraction_time_s_
    times["stage1"] = stats["stage1"].time_s
    times["stage2"] = stats["stage2"].time_s

    start = time.perf_counter()
    with torch.no_grad():
        teacher_out = teacher(data.x_test)
    metrics = compare_outputs(sim.predict(data.x_test), teacher_out, data.y_test)
    times["evaluation"] = time.perf_counter() - start
    summary = sim.summary()
    say(str(summary))
    start = time.perf_counter()
    robustness = robustness_report(
        sim, teacher, data.x_test, data.y_test, config.attack_eps, seed=config.seed
    )
    times["robustness"] = time.perf_counter() - start

    sim.save(folder / "model")
    files = {"config": "config.yaml", "report": "report.json", "model": "model"}
    if teacher_info["source"] == "trained":
        with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; --teacher still reads it
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.script(teacher), str(folder / "teacher.pt"))
        torch.save(teacher.state_dict(), folder / "teacher_state_dict.pt")
        files["teacher"] = "teacher.pt"
        files["teacher_state_dict"] = "teacher_state_dict.pt"
    plots = write_plots(folder, stats, sim.weights, log=say)
    files.update({name: file for name, file in plots.items()})
    times["total"] = time.perf_counter() - total_start
    report = {
        "job": "sim",
        "run_dir": str(folder),
        "config": config.to_dict(),
        "data": data.describe(),
        "teacher": teacher_info,
        "headline": {
            "teacher accuracy": metrics["teacher_accuracy"],
            "SIM accuracy": metrics["accuracy"],
            "agreement with teacher": metrics["agreement"],
            "||A||_inf": inf_norm(sim.A_),
            "kappa": config.kappa,
            "Lipschitz bound (SIM)": robustness["lipschitz_bound"]["sim"],
            "solver": f"{config.solver}: {stats['stage1'].status} / {stats['stage2'].status}",
            "fit time (s)": fit_time,
        },
        "teacher_accuracy": metrics["teacher_accuracy"],
        "sim_accuracy": metrics["accuracy"],
        "agreement": metrics["agreement"],
        "relative_output_error": metrics["relative_output_error"],
        "a_inf_norm": inf_norm(sim.A_),
        "sparsity": summary.sparsity,
        "nonzeros": summary.nonzeros,
        "certificate": {stage: _certificate(s) for stage, s in stats.items()},
        "fit_time_s": fit_time,
        "times_s": times,
        "streaming": {k: v.to_dict() for k, v in getattr(sim, "stream_info_", {}).items()},
        "summary": summary.to_dict(),
        "robustness": robustness,
        "plots": plots,
        "files": {**files, "report_md": "report.md"},
    }
    write_json(folder, "report.json", report)
    write_report_md(folder, report, plots)
    log(console_summary(report, folder) if not config.quiet else str(folder))
    return report


def _certificate(stats) -> dict[str, Any]:
    """What the solver certifies for one stage: status, the stopping test, the bound."""

    def plain(v: Any) -> bool:  # scalars, and lists of them (a Ray solver's worker pids and devices)
        if isinstance(v, list):
            return all(plain(x) for x in v)
        return isinstance(v, (int, float, bool, str)) or v is None

    extra = {k: v for k, v in stats.extra.items() if plain(v)}
    return {
        "solver": stats.solver,
        "status": stats.status,
        "converged": stats.converged,
        "iterations": stats.iterations,
        "objective": stats.objective,
        "constraint_violation": stats.constraint_violation,
        "constraint_norm": stats.constraint_norm,
        **extra,
    }
