"""The solver interface: ``BaseSolver.solve(problem) -> SolveResult(weights, stats)``, and a registry.

Every SIM solver takes a :class:`~idl_ray.sim.problem.SIMProblem` and returns the weights W (rows x d) with
typed telemetry (:class:`SolverStats`). The objective and the constraint violation in the stats are always
evaluated by the problem itself, so numbers from different solvers are comparable.

Writing your own solver: subclass :class:`BaseSolver`, set ``name`` (and ``needs_samples`` /
``samples_optional`` / ``variants`` if relevant) and implement ``_solve(problem) -> (W, info)`` where ``info`` is a dict with any
of ``iterations``, ``converged``, ``status``, ``history``, ``extra``, and ``dual_point`` (weights whose
residual gives a better dual bound for the certificate, e.g. ADMM's unconstrained iterate). Register it with
:func:`register_solver` to make it available by name.

Warm starts: ``solve(problem, initial=W0)`` passes starting weights (rows x d) to solvers that set
``uses_initial = True``; their ``_solve`` then takes ``initial`` as a keyword. ADMMSolver uses it; the
others (LeastSquareSolver, CVXSolver, ProjectedGDLowRankSolver and the Ray solvers except RayADMMSolver)
accept and ignore it, so a caller such as :func:`idl_ray.sim.path.sim_path` can pass it to any solver.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import importlib.util
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import torch

from idl_ray._validation import bad_parameter, check_device
from idl_ray.errors import ConfigError, ConfigTypeError, ConvergenceWarning
from idl_ray.sim.problem import VARIANTS, SIMProblem

#: an answer certified in float32 counts as converged only when its float64 relative duality gap is below this
#: (or the solver's gap tolerance, if larger): on well-conditioned Grams float32 answers check at 1e-5 .. 5e-5;
#: on rank-deficient ones the rounded Gram is another problem, and "certified" float32 answers checked at
#: 3e-3 .. 5e-2 (objectives up to 13% above the float64 optimum on the tests' problems)
LOW_PRECISION_GAP = 1e-3

__all__ = [
    "SOLVERS",
    "BaseSolver",
    "SolveResult",
    "SolverStats",
    "available_solvers",
    "get_solver",
    "register_solver",
    "resolve_device",
]


@dataclasses.dataclass
class SolverStats:
    """Telemetry of one solve (missing values are None).

    Attributes
    ----------
    solver : str, the solver's registered name
    iterations : int or None, iterations (ADMM, gradient) or programs solved (CVX: rows)
    converged : bool or None, whether the solver's own stopping test was met
    objective : float or None, ``problem.objective(W)`` of the returned weights
    constraint_violation : float or None, ``problem.constraint_violation(W)`` (0.0 means the bound holds)
    constraint_norm : float or None, max_i ||W[i, :n_constrained]||_1 (||A||_inf for stage 1)
    gap : float or None, the duality gap of the returned weights, a bound on ``objective - optimum``
        computed by the problem itself (:meth:`SIMProblem.duality_gap`), the same for every solver
    relative_gap : float or None, ``gap / objective``: the certified relative suboptimality
    time_s : float, wall-clock time of ``solve``
    status : str, "optimal", "max_iter", "optimal_inaccurate", ...
    history : list of dict, per-check records (residuals, objective, rho, ...)
    extra : dict, solver-specific numbers (factor time, rho, rank, ...)
    """

    solver: str
    iterations: int | None = None
    converged: bool | None = None
    objective: float | None = None
    constraint_violation: float | None = None
    constraint_norm: float | None = None
    gap: float | None = None
    relative_gap: float | None = None
    time_s: float = 0.0
    status: str = "optimal"
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (the history is kept; tensors never appear here)."""
        return dataclasses.asdict(self)

    def summary(self) -> str:
        parts = [f"{self.solver}: {self.status}", f"{self.time_s:.3g} s"]
        if self.iterations is not None:
            parts.append(f"{self.iterations} it")
        if self.objective is not None:
            parts.append(f"objective {self.objective:.6g}")
        if self.relative_gap is not None:
            parts.append(f"relative gap {self.relative_gap:.2g}")
        if self.constraint_norm is not None:
            parts.append(f"||A||_inf {self.constraint_norm:.6g}")
        return ", ".join(parts)


@dataclasses.dataclass
class SolveResult:
    """What ``solve`` returns: the weights W (rows x d, float64 unless the solver says otherwise) and stats."""

    weights: torch.Tensor
    stats: SolverStats

    def __iter__(self):  # allows ``W, stats = solver.solve(problem)``
        yield self.weights
        yield self.stats


def resolve_device(device: torch.device | str | None) -> torch.device:
    """None or "auto": CUDA when available, else CPU; otherwise ``torch.device(device)``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(device, "device", "solver")


def check_dtype(dtype: Any, owner: str) -> torch.dtype:
    if dtype not in (torch.float32, torch.float64):
        raise bad_parameter("dtype", owner, "torch.float32 or torch.float64", dtype)
    return dtype


def check_initial(initial: Any, problem: SIMProblem, owner: str) -> torch.Tensor | None:
    """None, or ``initial`` as a finite float64 CPU tensor of shape (problem.rows, problem.dim)."""
    if initial is None:
        return None
    shape = (problem.rows, problem.dim)
    if not isinstance(initial, torch.Tensor) or tuple(initial.shape) != shape:
        got = tuple(initial.shape) if isinstance(initial, torch.Tensor) else type(initial).__name__
        raise bad_parameter("initial", f"{owner}.solve", f"None or a tensor of shape {shape}", got)
    if not initial.is_floating_point() or not bool(torch.isfinite(initial).all()):
        raise bad_parameter(
            "initial", f"{owner}.solve", "a finite floating-point tensor", "non-finite values"
        )
    return initial.detach().to("cpu", torch.float64)


class BaseSolver(abc.ABC):
    """Base class of SIM solvers.

    Class attributes
    ----------------
    name : str, the registry name
    needs_samples : bool, True if the solver needs ``problem.samples`` (the raw features and targets)
    samples_optional : bool, True if ``needs_samples`` is only a preference (SIM keeps the samples for
        it) and the solver also works on the Gram statistics alone
    variants : frozenset of str, the problem variants it solves
    supports_l1_weights : bool, True if it honours ``problem.l1_weights`` (per-entry l1 weights); a solver
        that does not raises a ConfigError naming itself and ``l1_weights`` rather than ignoring them
    constraints : frozenset of str, the kappa bounds it enforces (``SIMProblem.constraint``): "inf_norm",
        and "mu_inf" for the solvers that support it
    uses_initial : bool, True if ``_solve`` takes ``initial`` (a warm start) as a keyword; otherwise
        ``solve(problem, initial=...)`` checks and ignores it
    """

    name: ClassVar[str] = "base"
    needs_samples: ClassVar[bool] = False
    samples_optional: ClassVar[bool] = False
    variants: ClassVar[frozenset[str]] = frozenset({"lasso", "elastic_net", "least_squares"})
    supports_l1_weights: ClassVar[bool] = False
    constraints: ClassVar[frozenset[str]] = frozenset({"inf_norm"})
    uses_initial: ClassVar[bool] = False

    def session(self) -> contextlib.AbstractContextManager[BaseSolver]:
        """A scope whose solves may share what the solver would otherwise set up for each solve: the Ray
        solvers keep their actors inside it (and stop them at its end). :meth:`SIM.fit
        <idl_ray.sim.estimator.SIM.fit>` holds one around its two stages, :meth:`SIM.fit_path
        <idl_ray.sim.estimator.SIM.fit_path>` around the whole path. A no-op for in-process solvers.

        Examples
        --------
        >>> solver = ADMMSolver()  # doctest: +SKIP
        >>> with solver.session():  # doctest: +SKIP
        ...     first, second = solver.solve(problem1), solver.solve(problem2)
        """
        return contextlib.nullcontext(self)

    def planned_stages(self, problems: Sequence[SIMProblem]) -> contextlib.AbstractContextManager[BaseSolver]:
        """A scope in which the solver knows the problems its next solves will be (a SIM fit's stages, cold,
        in this order), so it may share work between them: :class:`~idl_ray.sim.solvers.admm.ADMMSolver` runs
        the dual active-set method once for both stages' rows. The answers are those of separate solves. A
        no-op by default."""
        return contextlib.nullcontext(self)

    def solve(self, problem: SIMProblem, initial: torch.Tensor | None = None) -> SolveResult:
        """Solve ``problem``; the stats' objective and constraint numbers come from the problem.

        Parameters
        ----------
        problem : SIMProblem
        initial : Tensor of shape (rows, d) or None
            Weights to start from (a warm start, e.g. the previous point of a lambda path). Used only by
            solvers with ``uses_initial`` (ADMMSolver); checked, then ignored, by the others.
        """
        if not isinstance(problem, SIMProblem):
            raise ConfigTypeError(
                f"{type(self).__name__}.solve expects a SIMProblem. Got {type(problem).__name__}."
            )
        if problem.variant not in self.variants:
            raise ConfigError(
                f"{type(self).__name__} does not solve the '{problem.variant}' variant; it solves "
                f"{sorted(self.variants)}. Use a solver that does (CVXSolver solves all of {list(VARIANTS)})."
            )
        if problem.l1_weights is not None and not self.supports_l1_weights:
            raise ConfigError(
                f"{type(self).__name__} does not support per-entry l1 weights, but the problem has "
                "'l1_weights' set. Use ADMMSolver, CVXSolver or ProjectedGDLowRankSolver (full rank), or "
                "solve without l1_weights."
            )
        if problem.constrained and problem.constraint not in self.constraints:
            raise ConfigError(
                f"{type(self).__name__} does not support constraint={problem.constraint!r} "
                f"(SIM(well_posedness={problem.constraint!r})); it enforces {sorted(self.constraints)}. Use "
                "ADMMSolver or CVXSolver, which support 'mu_inf'."
            )
        if self.needs_samples and not self.samples_optional and problem.samples is None:
            raise ConfigError(
                f"{type(self).__name__} works on the raw samples, but this problem holds only the Gram "
                "statistics. Build it with SIMProblem.from_samples(..., keep_samples=True) (SIM does this "
                "automatically for solvers that need samples)."
            )
        initial = check_initial(initial, problem, type(self).__name__)
        start = time.perf_counter()
        if self.uses_initial:
            W, info = self._solve(problem, initial=initial)  # type: ignore[call-arg]
        else:
            W, info = self._solve(problem)
        elapsed = time.perf_counter() - start
        certificate = problem.duality_gap(W, info.get("dual_point"))
        converged, status = info.get("converged"), info.get("status", "optimal")
        if converged and not self._checks_in_float64(info.get("certified_in"), certificate):
            converged, status = False, "inaccurate"
        stats = SolverStats(
            solver=self.name,
            iterations=info.get("iterations"),
            converged=converged,
            objective=problem.objective(W),
            constraint_violation=problem.constraint_violation(W),
            constraint_norm=problem.constraint_norm(W) if problem.n_constrained else None,
            gap=None if certificate is None else certificate.gap,
            relative_gap=None if certificate is None else certificate.relative_gap,
            time_s=elapsed,
            status=status,
            history=info.get("history", []),
            extra=info.get("extra", {}),
        )
        return SolveResult(weights=W, stats=stats)

    def _checks_in_float64(self, certified_in: tuple[torch.dtype, float] | None, certificate: Any) -> bool:
        """Whether an answer the solver certified in a lower precision (``certified_in``: its dtype and gap
        tolerance, from the info dict) also certifies in float64: a relative gap of the float64 certificate
        within max(tolerance, ``LOW_PRECISION_GAP``). Rounding a rank-deficient Gram to float32 changes the
        problem, and a float32 certificate then vouches for the other problem's optimum; warns (a
        ConvergenceWarning) when the check fails. True when there is nothing to check."""
        if certified_in is None or certificate is None:
            return True
        dtype, tolerance = certified_in
        limit = max(float(tolerance), LOW_PRECISION_GAP)
        if dtype == torch.float64 or certificate.relative_gap <= limit:
            return True
        if getattr(self, "warn", True):
            warnings.warn(
                f"{type(self).__name__}(dtype={dtype}) certified its answer in that precision, but checked in "
                f"float64 its relative duality gap is {certificate.relative_gap:.3g} (above {limit:.3g}): the "
                "answer may be that far above the optimum (rounding a rank-deficient or ill-conditioned Gram to "
                "this dtype changes the problem). It keeps the kappa bound; use dtype=torch.float64 (the "
                "default) for a certified optimum.",
                ConvergenceWarning,
                stacklevel=3,
            )
        return False

    @abc.abstractmethod
    def _solve(self, problem: SIMProblem) -> tuple[torch.Tensor, dict[str, Any]]:
        """Return W (rows x d) and an info dict (iterations, converged, status, history, extra; optionally
        ``certified_in``: (dtype, relative gap tolerance) when ``converged`` means a duality-gap certificate in
        that dtype, which :meth:`solve` then checks in float64)."""

    def get_params(self) -> dict[str, Any]:
        """The constructor settings (sklearn-style), used for repr and for saving."""
        return dict(self._params)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in getattr(self, "_params", {}).items())
        return f"{type(self).__name__}({params})"


S = TypeVar("S", bound=type[BaseSolver])


#: name -> solver class
SOLVERS: dict[str, type[BaseSolver]] = {}
_OPTIONAL_BACKENDS: dict[str, str] = {"cvx": "cvxpy"}


def register_solver(name: str, *, overwrite: bool = False) -> Callable[[S], S]:
    """Class decorator registering a :class:`BaseSolver` subclass under ``name``."""

    def decorate(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, BaseSolver)):
            raise ConfigTypeError(f"register_solver expects a BaseSolver subclass. Got {cls!r}.")
        if name in SOLVERS and not overwrite and SOLVERS[name] is not cls:
            raise ConfigError(f"A solver named {name!r} is already registered; pass overwrite=True.")
        SOLVERS[name] = cls
        cls.name = name
        return cls

    return decorate


def available_solvers() -> dict[str, bool]:
    """Registered solver names and whether their backend is installed (no heavy import)."""
    return {
        name: _OPTIONAL_BACKENDS.get(name) is None
        or importlib.util.find_spec(_OPTIONAL_BACKENDS[name]) is not None
        for name in sorted(SOLVERS)
    }


#: modules whose import registers the Ray solvers (``ray_admm``, ``admm_multi_gpu``, ``ray_projected_gd``,
#: ``ray_cvx``); imported only when such a name is asked for, so Ray stays out of single-process use
_RAY_SOLVER_MODULES = (
    "idl_ray.distributed.solvers",
    "idl_ray.distributed.projected_gd",
    "idl_ray.distributed.cvx",
)


def _register_ray_solvers() -> None:
    for module in _RAY_SOLVER_MODULES:
        importlib.import_module(module)


def get_solver(solver: str | BaseSolver | None = None, **kwargs: Any) -> BaseSolver:
    """A solver instance from a name (unknown names list the known ones), an instance, or None (ADMM)."""
    if solver is None:
        solver = "admm"
    if isinstance(solver, BaseSolver):
        if kwargs:
            raise ConfigError("get_solver: keyword arguments apply only when the solver is given by name.")
        return solver
    if isinstance(solver, type) and issubclass(solver, BaseSolver):
        return solver(**kwargs)
    if isinstance(solver, str) and solver.lower() not in SOLVERS:
        _register_ray_solvers()
    if not isinstance(solver, str) or solver.lower() not in SOLVERS:
        raise bad_parameter("solver", "SIM", f"a BaseSolver instance or one of {sorted(SOLVERS)}", solver)
    return SOLVERS[solver.lower()](**kwargs)
