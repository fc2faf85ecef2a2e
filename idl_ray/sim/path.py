"""The lambda path: SIM fits along a decreasing sequence of l1 weights, each warm-started from the last.

Both stages minimise ``1/(2m) ||T - W Phi||^2 + lam ||W||_1`` (stage 1 with ``||A||_inf <= kappa``). The
path records the teacher's states once (one pass over the data, :meth:`SIM._record`), then for
``lam_1 > lam_2 > ... > lam_K`` fits both stages with the same solver instance, each solve starting from
the previous point's weights (``solver.solve(problem, initial=W_prev)``). The statistics G (shared by
both stages) are the same object at every point, so :class:`~idl_ray.sim.solvers.ADMMSolver` factors
G once for the whole path (its eigendecomposition is cached per G object), and
:class:`~idl_ray.distributed.RayADMMSolver` ships and factors it once per worker.

Default grid: ``K = n_lams`` values spaced evenly in log scale from ``lam_max`` down to
``lam_ratio * lam_max``, where ``lam_max`` is the smallest lam at which W = 0 is optimal in both stages.
W = 0 is optimal for a stage iff 0 lies in the subdifferential there: the gradient of the smooth part at
0 is ``-Rt/m``, and the kappa ball has 0 in its interior (kappa > 0, so its normal cone at 0 is {0}), so
the condition is ``|Rt_ij| / m <= lam w_ij`` for every entry (``w_ij`` the l1 weights, 1 by default),

    lam_max(stage) = max_ij |Rt_ij| / (m w_ij),

over the columns that are free (with kappa = 0 the A-columns are fixed at 0 by the bound and do not
count). ``lam_max = max(lam_max(stage 1), lam_max(stage 2))`` zeroes every entry of (A, B, C, D), and any
smaller lam leaves at least one nonzero.

Lasso support sizes are not monotone in lam in general (a feature can leave the active set as lam
decreases); on the digits teachers and on well-conditioned problems they are, and the table reports them
per point so a non-monotone step shows.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from idl_ray._validation import bad_parameter, check_positive_float, check_positive_int
from idl_ray.errors import ConfigError, WellPosednessError
from idl_ray.sim.problem import SIMProblem
from idl_ray.sim.weighting import robust_l1_weights

if TYPE_CHECKING:
    from idl_ray.sim.estimator import SIM
    from idl_ray.sim.solvers.base import BaseSolver

__all__ = ["SIMPath", "lam_max", "sim_path"]

_OWNER = "SIM.fit_path"


def lam_max(problem: SIMProblem) -> float:
    """The smallest lam at which W = 0 solves ``problem``: ``max_ij |Rt_ij| / (m w_ij)`` over free columns.

    Parameters
    ----------
    problem : SIMProblem; its per-entry ``l1_weights`` (rows x d), when it has them, divide the entries
        (entries with weight 0 are unpenalised and never zeroed by lam; they are left out)

    Returns
    -------
    float >= 0

    Examples
    --------
    >>> import torch
    >>> Phi = torch.randn(50, 4, dtype=torch.float64); T = torch.randn(50, 2, dtype=torch.float64)
    >>> problem = SIMProblem.from_samples(Phi, T, n_constrained=0, lam=0.0)
    >>> abs(lam_max(problem) - float((T.T @ Phi).abs().max()) / 50) < 1e-12
    True
    """
    grad = (problem.Rt / problem.num_samples).abs().to(torch.float64)
    weights = getattr(problem, "l1_weights", None)
    if weights is not None:
        weights = torch.as_tensor(weights, dtype=torch.float64).expand_as(grad)
        grad = torch.where(weights > 0, grad / weights.clamp_min(1e-300), torch.zeros_like(grad))
    if problem.kappa == 0 and problem.n_constrained:
        grad = grad[:, problem.n_constrained :]
    return float(grad.max()) if grad.numel() else 0.0


def nonzeros(W: torch.Tensor) -> int:
    return int((W != 0).sum())


@dataclasses.dataclass
class SIMPath:
    """The result of :func:`sim_path`: one fitted SIM per lam and a table of what each point costs and gives.

    Attributes
    ----------
    lams : list of float, decreasing
    models : list of SIM, ``models[k]`` fitted at ``lams[k]`` (sharing one solver instance)
    rows : list of dict, one per point: ``lam``, ``nnz_A``, ``nnz_B``, ``nnz_C``, ``nnz_D``, ``nnz``
        (all four), ``frac_nonzero`` (nnz / entries of A, B, C, D), ``frac_nonzero_AB``, ``A_inf``
        (||A||_inf), ``lipschitz`` (:func:`idl_ray.robustness.lipschitz_bound`, None when not finite),
        ``relative_gap_1`` / ``relative_gap_2`` (the certified relative suboptimality per stage),
        ``converged``, ``iterations_1`` / ``iterations_2``, ``time_s`` (both solves), and with test data
        ``accuracy`` and ``attacked_accuracy@eps`` per ``attack_eps``
    teacher : dict, the teacher's ``accuracy`` (with test data), ``lipschitz`` (its implicit form in the
        fitted coordinates, when well-posed there), ``A_inf``, ``nnz`` and ``frac_nonzero`` of that form, and
        ``attacked_accuracy@eps``
    lam_max : float, the smallest lam that zeroes every entry of both stages
    extraction_time_s : float, the one pass over the data
    time_s : float, the whole path (extraction included)
    """

    lams: list[float]
    models: list[Any]
    rows: list[dict[str, Any]]
    teacher: dict[str, Any]
    lam_max: float
    extraction_time_s: float
    time_s: float

    def __len__(self) -> int:
        return len(self.models)

    @property
    def has_accuracy(self) -> bool:
        return self.teacher.get("accuracy") is not None

    def best(self, max_accuracy_drop: float = 0.01) -> Any:
        """The sparsest SIM (fewest nonzeros of A, B, C, D; ties: the more accurate) whose test accuracy
        is at least the teacher's minus ``max_accuracy_drop`` (a fraction: 0.01 is one point).

        Raises
        ------
        ConfigError when the path was fitted without ``test_data``, or when no point qualifies.
        """
        drop = check_positive_float(max_accuracy_drop, "max_accuracy_drop", "SIMPath.best", allow_zero=True)
        if not self.has_accuracy:
            raise ConfigError(
                "SIMPath.best needs test accuracies: fit the path with test_data=(inputs, labels)."
            )
        floor = self.teacher["accuracy"] - drop
        ok = [k for k, row in enumerate(self.rows) if row["accuracy"] >= floor - 1e-12]
        if not ok:
            top = max(row["accuracy"] for row in self.rows)
            raise ConfigError(
                f"SIMPath.best: no point is within max_accuracy_drop={drop} of the teacher's accuracy "
                f"{self.teacher['accuracy']:.4f} (the best point reaches {top:.4f}). Allow a larger drop "
                "or extend the path to smaller lams (lam_ratio)."
            )
        k = min(ok, key=lambda i: (self.rows[i]["nnz"], -self.rows[i]["accuracy"]))
        return self.models[k]

    def best_index(self, max_accuracy_drop: float = 0.01) -> int:
        """The position of :meth:`best` in the path."""
        chosen = self.best(max_accuracy_drop)
        return next(k for k, model in enumerate(self.models) if model is chosen)

    # ------------------------------------------------------------------ export
    def to_dicts(self) -> list[dict[str, Any]]:
        return [dict(row) for row in self.rows]

    def to_pandas(self) -> Any:
        """The table as a pandas DataFrame (pandas imported here; it is optional)."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def columns(self) -> list[str]:
        names: list[str] = []
        for row in self.rows:
            names += [key for key in row if key not in names]
        return names

    def to_csv(self, path: str | pathlib.Path) -> pathlib.Path:
        """Write the table as CSV (one row per lam); returns the path."""
        path = pathlib.Path(path)
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns())
            writer.writeheader()
            writer.writerows(self.rows)
        return path

    def to_json(self, path: str | pathlib.Path) -> pathlib.Path:
        """Write {"lam_max", "teacher", "rows", "time_s", ...} as JSON; returns the path."""
        path = pathlib.Path(path)
        payload = {
            "lam_max": self.lam_max,
            "teacher": self.teacher,
            "extraction_time_s": self.extraction_time_s,
            "time_s": self.time_s,
            "rows": self.rows,
        }
        path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
        return path

    def plot(self, path: str | pathlib.Path) -> pathlib.Path:
        """Draw test accuracy vs fraction of nonzeros and vs the Lipschitz bound, with the teacher's point,
        into one PNG (matplotlib's object API, imported here; see :mod:`idl_ray.jobs.report`)."""
        if not self.has_accuracy:
            raise ConfigError(
                "SIMPath.plot needs test accuracies: fit the path with test_data=(inputs, labels)."
            )
        from idl_ray.jobs.report import _figure

        path = pathlib.Path(path)
        figure = _figure(11, 4.2)
        left, right = figure.subplots(1, 2)
        acc = [row["accuracy"] for row in self.rows]
        left.plot([row["frac_nonzero"] for row in self.rows], acc, "o-", label="SIM path")
        left.set_xlabel("fraction of nonzeros in (A, B, C, D)")
        left.set_ylabel("test accuracy")
        left.axhline(self.teacher["accuracy"], color="k", linestyle="--", linewidth=0.8)
        if self.teacher.get("frac_nonzero") is not None:
            left.plot(
                [self.teacher["frac_nonzero"]], [self.teacher["accuracy"]], "k*", ms=12, label="teacher"
            )
        # a bound of 0 (an all-zero, constant model) has no place on the log axis
        lips = [(row["lipschitz"], row["accuracy"]) for row in self.rows if row["lipschitz"]]
        if lips:
            right.plot([x for x, _ in lips], [y for _, y in lips], "o-", label="SIM path")
        if self.teacher.get("lipschitz") is not None:
            right.plot([self.teacher["lipschitz"]], [self.teacher["accuracy"]], "k*", ms=12, label="teacher")
        else:
            right.axhline(self.teacher["accuracy"], color="k", linestyle="--", label="teacher")
        right.set_xscale("log")
        right.set_xlabel("l-inf Lipschitz bound")
        right.set_ylabel("test accuracy")
        for axis in (left, right):
            axis.grid(True, alpha=0.3)
            axis.legend(loc="lower right")
        figure.suptitle(f"SIM lambda path ({len(self.rows)} points, lam_max {self.lam_max:.3g})")
        figure.tight_layout()
        figure.savefig(path)
        return path


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def check_lams(lams: Any) -> list[float]:
    """A decreasing list of distinct lams > 0 (sorted here)."""
    if isinstance(lams, torch.Tensor):
        lams = lams.tolist()
    if isinstance(lams, (str, bytes)) or not isinstance(lams, Sequence) or len(lams) == 0:
        raise bad_parameter("lams", _OWNER, "None or a non-empty sequence of floats > 0", lams)
    values = [check_positive_float(lam, "lams", _OWNER) for lam in lams]
    return sorted(set(values), reverse=True)


def default_lams(top: float, n_lams: int, lam_ratio: float) -> list[float]:
    """``n_lams`` values evenly spaced in log scale from ``top`` down to ``lam_ratio * top``."""
    if n_lams == 1:
        return [top]
    step = math.log(lam_ratio) / (n_lams - 1)
    return [top * math.exp(step * k) for k in range(n_lams)]


def sim_path(
    sim: SIM,
    teacher: torch.nn.Module,
    data: Any,
    lams: Sequence[float] | None = None,
    *,
    n_lams: int = 20,
    lam_ratio: float = 1e-3,
    solver: str | BaseSolver | None = None,
    test_data: tuple[Any, Any] | None = None,
    attack_eps: float | Sequence[float] | None = None,
) -> SIMPath:
    """Fit ``sim``'s settings along a decreasing lam sequence, warm-starting each point from the previous.

    Parameters
    ----------
    sim : SIM, the settings (kappa, variant, rescale, device, ...); its own ``lam`` / ``lam_out`` are
        replaced by each path value (both stages use the same lam); it is not fitted itself
    teacher : nn.Module
    data : the inputs to record states on (tensor, (inputs, targets), DataLoader or iterable of batches;
        a ``ray.data.Dataset`` is not supported here)
    lams : sequence of floats > 0 or None; sorted decreasing. None: ``n_lams`` log-spaced values from
        ``lam_max`` down to ``lam_ratio * lam_max`` (see the module docstring)
    n_lams : int >= 1, default 20
    lam_ratio : float in (0, 1], default 1e-3
    solver : a solver instance or name, or None (ADMMSolver on ``sim.device``); one instance serves the
        whole path, so its cached factorisation (and a Ray solver's workers) are reused
    test_data : (inputs, labels) or None: adds test accuracies (and the teacher's) to the table
    attack_eps : float, sequence of floats, or None: with test data, also the accuracy under attack at
        each eps, by ``idl_ray.robustness.attack_accuracy(model, x, y, eps)`` when that function exists

    Returns
    -------
    SIMPath

    Examples
    --------
    >>> import torch
    >>> from idl_ray.sim import SIM
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> teacher = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> X = torch.randn(300, 4)
    >>> path = SIM(kappa=0.9, device="cpu").fit_path(teacher, X, n_lams=5)
    >>> [row["nnz"] for row in path.rows][0]
    0
    """
    from idl_ray.sim.estimator import ADMM_default
    from idl_ray.sim.solvers.base import get_solver

    start = time.perf_counter()
    cfg = sim._validated()
    if cfg["variant"] not in ("lasso", "elastic_net"):
        raise bad_parameter(
            "variant", _OWNER, "'lasso' or 'elastic_net' (the path varies the l1 weight)", cfg["variant"]
        )
    n_lams = check_positive_int(n_lams, "n_lams", _OWNER)
    lam_ratio = check_positive_float(lam_ratio, "lam_ratio", _OWNER)
    if lam_ratio > 1:
        raise bad_parameter("lam_ratio", _OWNER, "a float in (0, 1]", lam_ratio)
    if type(data).__module__.startswith("ray.data"):
        raise ConfigError(
            "SIM.fit_path records the states in this process; a ray.data.Dataset is not supported here. "
            "Pass tensors or a DataLoader, or run SIM.fit per lam."
        )
    if cfg["weighting"].target is not None:
        raise ConfigError(
            "SIM.fit_path sweeps lam, but SIM(target=...) replaces lam by a sparsity target. Fit the target "
            "with SIM.fit, or drop target for the path."
        )
    if sim.regenerate_states:
        raise ConfigError(
            "SIM.fit_path does not support regenerate_states=True (stage 2's statistics would change at "
            "every point). Use regenerate_states=False."
        )
    test_x, test_y = _check_test_data(test_data)
    eps_list = _check_eps(attack_eps)
    solver_obj = ADMM_default(cfg["device"], sim.progress) if solver is None else get_solver(solver)
    if cfg["variant"] not in solver_obj.variants:
        raise ConfigError(f"{type(solver_obj).__name__} does not solve the '{cfg['variant']}' variant.")
    keep_samples = solver_obj.needs_samples
    recorded = sim._record(teacher, data, cfg, keep_samples)
    n = recorded.structure.num_hidden
    stats1, stats2 = recorded.stats.row_block(slice(0, n)), recorded.stats.row_block(slice(n, None))
    robust = cfg["weighting"].robust_weight
    bias = recorded.structure.bias
    stages = [  # with robust_weight, lam_max divides by the weights the fits use
        SIMProblem(
            stats=stats1,
            n_constrained=n,
            lam=0.0,
            kappa=cfg["kappa"],
            l1_weights=robust_l1_weights(1, stats1.rows, stats1.dim, n, robust, bias=bias),
        ),
        SIMProblem(
            stats=stats2,
            n_constrained=0,
            lam=0.0,
            l1_weights=robust_l1_weights(2, stats2.rows, stats2.dim, n, robust, bias=bias),
        ),
    ]
    top = max(lam_max(problem) for problem in stages)
    if lams is None:
        if top <= 0:
            raise ConfigError("SIM.fit_path: the targets are all zero (lam_max = 0); there is no path.")
        lams_list = default_lams(top, n_lams, lam_ratio)
    else:
        lams_list = check_lams(lams)
    teacher_row = _teacher_row(teacher, recorded, test_x, test_y, eps_list)
    models, rows = [], []
    previous: dict[str, torch.Tensor] | None = None
    with solver_obj.session():  # a Ray solver keeps its actors (and factored Grams) for the whole path
        for lam in lams_list:
            point = copy.copy(sim).set_params(lam=lam, lam_out=lam)
            began = time.perf_counter()
            point._fit_stages(
                *recorded.stage_inputs(),
                solver_obj,
                {**cfg, "lam": lam, "lam_out": lam},
                recorded.regenerate,
                recorded.time_s,
                initial=previous,
            )
            elapsed = time.perf_counter() - began
            previous = {
                "stage1": torch.cat([point.A_, point.B_], dim=1),
                "stage2": torch.cat([point.C_, point.D_], dim=1),
            }
            row = _point_row(point, lam, elapsed)
            if test_x is not None:
                row["accuracy"] = point.score(test_x, test_y, metric="accuracy")
                for eps in eps_list:
                    row[f"attacked_accuracy@{eps:g}"] = _attacked(point, test_x, test_y, eps)
            models.append(point)
            rows.append(row)
    return SIMPath(
        lams=lams_list,
        models=models,
        rows=rows,
        teacher=teacher_row,
        lam_max=top,
        extraction_time_s=recorded.time_s,
        time_s=time.perf_counter() - start,
    )


def _check_test_data(test_data: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if test_data is None:
        return None, None
    if not isinstance(test_data, (tuple, list)) or len(test_data) != 2:
        raise bad_parameter("test_data", _OWNER, "None or a pair (inputs, labels)", type(test_data).__name__)
    x, y = (torch.as_tensor(v) for v in test_data)
    if x.shape[0] != y.shape[0] or y.dim() != 1:
        raise bad_parameter(
            "test_data",
            _OWNER,
            "(inputs, labels) with one integer label per input",
            (tuple(x.shape), tuple(y.shape)),
        )
    return x, y.long()


def _check_eps(attack_eps: Any) -> list[float]:
    if attack_eps is None:
        return []
    values = attack_eps if isinstance(attack_eps, (list, tuple)) else [attack_eps]
    return [check_positive_float(eps, "attack_eps", _OWNER) for eps in values]


def _attacked(model: Any, x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    """``idl_ray.robustness.attack_accuracy(model, x, y, eps)`` when the attacks module is installed."""
    from idl_ray.robustness import attack_accuracy

    return float(attack_accuracy(model, x, y, eps))


def _lipschitz(weights: dict[str, torch.Tensor], bias: bool) -> float | None:
    from idl_ray.robustness import lipschitz_bound

    try:
        return float(lipschitz_bound(weights, bias=bias, condition="inf_norm"))
    except WellPosednessError:
        return None


def _point_row(point: Any, lam: float, elapsed: float) -> dict[str, Any]:
    A, B, C, D = point.A_, point.B_, point.C_, point.D_
    counts = {name: nonzeros(W) for name, W in zip("ABCD", (A, B, C, D))}
    total = sum(W.numel() for W in (A, B, C, D))
    s1, s2 = point.stats_["stage1"], point.stats_["stage2"]
    return {
        "lam": lam,
        **{f"nnz_{name}": count for name, count in counts.items()},
        "nnz": sum(counts.values()),
        "frac_nonzero": sum(counts.values()) / total,
        "frac_nonzero_AB": (counts["A"] + counts["B"]) / (A.numel() + B.numel()),
        "A_inf": float(A.abs().sum(dim=1).max()) if A.numel() else 0.0,
        "lipschitz": _lipschitz({"A": A, "B": B, "C": C, "D": D}, point.bias_),
        "relative_gap_1": s1.relative_gap,
        "relative_gap_2": s2.relative_gap,
        "converged": bool(s1.converged) and bool(s2.converged),
        "iterations_1": s1.iterations,
        "iterations_2": s2.iterations,
        "time_s": elapsed,
    }


def _teacher_row(
    teacher: torch.nn.Module,
    recorded: Any,
    x: torch.Tensor | None,
    y: torch.Tensor | None,
    eps_list: list[float],
) -> dict[str, Any]:
    """The teacher's accuracy and its Lipschitz bound in the fitted coordinates: with state scales s, the
    teacher is the implicit model (S A* S^-1, S B*, C* S^-1, D*), S = diag(s), which the SIM fits."""
    structure = recorded.structure
    A, B, C, D = structure.A, structure.B, structure.C, structure.D
    if recorded.scales is not None:
        s = recorded.scales.to(torch.float64)
        A, B, C = s[:, None] * A / s[None, :], s[:, None] * B, C / s[None, :]
    row: dict[str, Any] = {
        "accuracy": None,
        "lipschitz": _lipschitz({"A": A, "B": B, "C": C, "D": D}, structure.bias),
        "A_inf": float(A.abs().sum(dim=1).max()) if A.numel() else 0.0,
        "nnz": sum(nonzeros(W) for W in (A, B, C, D)),
        "frac_nonzero": sum(nonzeros(W) for W in (A, B, C, D)) / sum(W.numel() for W in (A, B, C, D)),
    }
    if x is not None:
        parameter = next(teacher.parameters(), None)
        dtype = parameter.dtype if parameter is not None else torch.float32
        device = parameter.device if parameter is not None else torch.device("cpu")
        with torch.no_grad():
            out = teacher(x.to(device=device, dtype=dtype))
        row["accuracy"] = float((out.argmax(dim=1).cpu() == y).double().mean())
        for eps in eps_list:
            row[f"attacked_accuracy@{eps:g}"] = _attacked(teacher, x, y, eps)
    return row
