"""The SIM estimator: fit a well-posed implicit model to a teacher network's states (scikit-learn style).

``SIM(...).fit(teacher, data)`` records the teacher's states in one streaming pass (the Gram G = Phi Phi^T
and the right-hand sides of both stages are accumulated batch by batch; Phi is kept only when the solver
needs samples), then solves

* stage 1: ``[A B]`` from ``Z ~ A X + B U`` with ``||A||_inf <= kappa`` (rows: hidden units),
* stage 2: ``[C D]`` from ``Y ~ C X + D U`` (no bound), optionally on the implicit model's own
  equilibrium states (``regenerate_states=True``),

both with the same solver and the objective of :class:`~idl_ray.sim.problem.SIMProblem`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from idl_ray._validation import (
    bad_parameter,
    check_choice,
    check_finite,
    check_kappa,
    check_positive_float,
    check_positive_int,
    reject_unknown_kwargs,
)
from idl_ray.errors import ConfigError, NotFittedError, ShapeError
from idl_ray.implicit.mu_projection import mu_inf, project_onto_mu_ball
from idl_ray.implicit.projection import inf_norm, project_rows_onto_l1_ball
from idl_ray.sim.extraction import (
    StateRecorder,
    TeacherStructure,
    _num_batches,
    iter_batches,
    progress_bar,
)
from idl_ray.sim.problem import CONSTRAINTS, VARIANTS, GramStats, SampleData, SIMProblem
from idl_ray.sim.rescale import HOMOGENEOUS_ACTIVATIONS, layer_scales
from idl_ray.sim.solvers.base import BaseSolver, SolverStats, get_solver, resolve_device
from idl_ray.sim.stages import fixed_point_weights, regenerated_features, stage_batch
from idl_ray.sim.summary import SIMSummary
from idl_ray.sim.weighting import StageWeighting, solve_stage

__all__ = ["SIM", "SIMSummary"]

_OWNER = "SIM"
_PARAMS = (
    "activation",
    "kappa",
    "lam",
    "lam_out",
    "l2",
    "variant",
    "rescale",
    "regenerate_states",
    "batch_size",
    "dtype",
    "device",
    "fixed_point",
    "progress",
    "input_column",
    "stream",
    "robust_weight",
    "reweight_rounds",
    "reweight_eps",
    "target",
    "well_posedness",
)
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class SIM:
    """State-driven implicit modelling: distil a trained network into a well-posed implicit model.

    The fitted model is ``X = phi(A X + B U)``, ``Y = C X + D U`` with ``||A||_inf <= kappa``.

    Parameters
    ----------
    activation : str, nn.Module or "auto", default "relu"
        The implicit model's activation; must match the teacher's ("auto": take the teacher's).
    kappa : float in [0, 1), default 0.99
        Well-posedness bound on ``||A||_inf``.
    lam : float >= 0, default 1e-4
        l1 weight of stage 1 (the loss is averaged over samples, so lam does not depend on m).
    lam_out : float >= 0 or None, default None
        l1 weight of stage 2 (None: same as lam).
    l2 : float >= 0, default 0.0
        l2 weight (elastic net; requires ``variant="elastic_net"``).
    variant : {"lasso", "elastic_net", "exact", "least_squares"}, default "lasso"
        "exact" imposes the teacher's states as equality constraints (up to ``CVXSolver.exact_tol``),
        "least_squares" is unregularised and unconstrained (no well-posedness guarantee).
    rescale : {"auto", "none"}, default "auto"
        "auto": for ReLU / leaky ReLU teachers, rescale each hidden layer's states by a positive factor
        so that the teacher's own A satisfies the kappa bound (see :mod:`idl_ray.sim.rescale`); for other
        activations nothing is rescaled.
    regenerate_states : bool, default False
        Refit (C, D) on the fitted implicit model's own equilibrium states instead of the teacher's.
    batch_size : int, default 256
        Batch size for tensor/array data (a DataLoader keeps its own), for extraction and prediction.
    dtype : torch.float32 (default) or torch.float64
        Precision of the recorded states and of prediction (the solves and the Gram are float64).
    device : None/"auto" (CUDA when available) or a device
        Where the default solver runs and where prediction runs.
    fixed_point : dict or FixedPointOptions, optional
        Options of the fixed-point solve at prediction (tol, max_iter, method, ...).
    progress : bool, default False
        Show progress bars.
    input_column : str or None, default None
        With a ``ray.data.Dataset``: the column holding the inputs (None: the only tensor column).
    stream : StreamConfig, dict or None
        With a ``ray.data.Dataset``: the Ray Data settings (actor pool, batch size, memory limit); see
        :class:`idl_ray.distributed.extraction.StreamConfig`.
    robust_weight : float >= 0, default 0.0
        Multiply the l1 weights of [A B] (stage 1) and [C D] (stage 2) by ``1 + robust_weight`` (bias
        column excluded), which lowers the certified l-inf Lipschitz bound
        ``||D||_inf + ||C||_inf ||B||_inf / (1 - kappa)`` at some cost in fit; needs lam > 0 or a target
        (:mod:`idl_ray.sim.weighting`).
    reweight_rounds : int >= 0, default 0
        Reweighted-l1 rounds after the first solve of each stage (Candes, Wakin & Boyd 2008): weights
        ``c_i / (|W_ij| + eps_i)``, a closer stand-in for the count of nonzeros (:mod:`idl_ray.sim.reweighting`).
    reweight_eps : float > 0, default 0.1
        The reweighting's smoothing, relative to each row's largest entry.
    target : SparsityTarget, dict or None, default None
        An exact sparsity target for both stages (``SparsityTarget(nonzeros_per_row=k)`` or
        ``SparsityTarget(fraction_removed=x)``), met by bisection on the l1 threshold and a refit on the
        support; it replaces lam and lam_out (:mod:`idl_ray.sim.targets`). Not with reweight_rounds.
    well_posedness : {"inf_norm", "mu_inf"}, default "inf_norm"
        The bound kept on the fitted A. ``"mu_inf"``: the wider
        ``mu_inf(A) = max_i (a_ii + sum_{j != i} |a_ij|) <= kappa``, a row constraint of stage 1 with
        ``a_ii`` at column i of ``W = [A B]`` (solved by ADMMSolver or CVXSolver; other solvers refuse it);
        "auto" rescaling targets the same condition, and :meth:`predict` / :meth:`to_module` use the
        diagonal-implicit fixed point of :mod:`~idl_ray.implicit.mu_fixed_point`, which converges under
        it even where ``||A||_inf > 1``.

    Attributes
    ----------
    A_, B_, C_, D_ : Tensor (float64), the fitted weights (B_ and D_ include the bias column last when
        ``bias_``)
    bias_ : bool, whether U carries a constant 1 as its last feature
    structure_ : TeacherStructure, the teacher's shapes, activation and exact (A*, B*, C*, D*)
    scales_ : Tensor (n,) or None, the positive state scales used (None: no rescaling)
    stats_ : dict "stage1"/"stage2" -> SolverStats (``extra["weighting"]``: what robust_weight,
        reweight_rounds or target did)
    problems_ : dict "stage1"/"stage2" -> SIMProblem (the solved problems; kept for inspection)

    Examples
    --------
    >>> import torch
    >>> teacher = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> X = torch.randn(500, 4)
    >>> sim = SIM(kappa=0.9, lam=1e-5).fit(teacher, X)
    >>> float((sim.predict(X) - teacher(X).detach()).abs().max()) < 1e-2
    True
    """

    def __init__(
        self,
        activation: Any = "relu",
        kappa: float = 0.99,
        lam: float = 1e-4,
        lam_out: float | None = None,
        l2: float = 0.0,
        variant: str = "lasso",
        rescale: str = "auto",
        regenerate_states: bool = False,
        batch_size: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        fixed_point: Any = None,
        progress: bool = False,
        input_column: str | None = None,
        stream: Any = None,
        robust_weight: float = 0.0,
        reweight_rounds: int = 0,
        reweight_eps: float = 0.1,
        target: Any = None,
        well_posedness: str = "inf_norm",
        **unknown: Any,
    ) -> None:
        # a misspelt keyword (SIM(kapa=0.9)) gets the valid names, as ImplicitModel does
        reject_unknown_kwargs(unknown, _OWNER, _PARAMS)
        self.activation = activation
        self.kappa = kappa
        self.lam = lam
        self.lam_out = lam_out
        self.l2 = l2
        self.variant = variant
        self.rescale = rescale
        self.regenerate_states = regenerate_states
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = device
        self.fixed_point = fixed_point
        self.progress = progress
        self.input_column = input_column
        self.stream = stream
        self.robust_weight = robust_weight
        self.reweight_rounds = reweight_rounds
        self.reweight_eps = reweight_eps
        self.target = target
        self.well_posedness = well_posedness

    # ------------------------------------------------------------------ parameters
    def get_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _PARAMS}

    def set_params(self, **params: Any) -> SIM:
        unknown = sorted(set(params) - set(_PARAMS))
        if unknown:
            raise ConfigError(f"Unknown parameter(s) {unknown} for SIM. Valid ones are {sorted(_PARAMS)}.")
        for k, v in params.items():
            setattr(self, k, v)
        return self

    def __repr__(self) -> str:
        defaults = SIM().get_params()
        changed = {k: v for k, v in self.get_params().items() if v is not defaults[k] and v != defaults[k]}
        return f"SIM({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    def _validated(self) -> dict[str, Any]:
        """Every parameter checked in one place (called by fit/predict); returns resolved values."""
        kappa = check_kappa(self.kappa, _OWNER)
        lam = check_positive_float(self.lam, "lam", _OWNER, allow_zero=True)
        lam_out = (
            lam
            if self.lam_out is None
            else check_positive_float(self.lam_out, "lam_out", _OWNER, allow_zero=True)
        )
        l2 = check_positive_float(self.l2, "l2", _OWNER, allow_zero=True)
        variant = check_choice(self.variant, "variant", _OWNER, VARIANTS)
        if variant == "elastic_net" and l2 == 0:
            raise bad_parameter("l2", _OWNER, "> 0 with variant='elastic_net'", self.l2)
        if variant != "elastic_net" and l2 > 0:
            raise bad_parameter("l2", _OWNER, "0 unless variant='elastic_net'", self.l2)
        rescale = check_choice(self.rescale, "rescale", _OWNER, ("auto", "none"))
        if not isinstance(self.regenerate_states, bool):
            raise bad_parameter("regenerate_states", _OWNER, "a bool", self.regenerate_states)
        batch_size = check_positive_int(self.batch_size, "batch_size", _OWNER)
        dtype = _DTYPES.get(self.dtype, self.dtype) if isinstance(self.dtype, str) else self.dtype
        if dtype not in (torch.float32, torch.float64):
            raise bad_parameter("dtype", _OWNER, "torch.float32 or torch.float64", self.dtype)
        device = resolve_device(self.device)
        from idl_ray.implicit.fixed_point import FixedPointOptions

        if self.fixed_point is None:
            fp = FixedPointOptions(tol=1e-6, max_iter=1000)
        elif isinstance(self.fixed_point, FixedPointOptions):
            fp = self.fixed_point
        elif isinstance(self.fixed_point, dict):
            fp = FixedPointOptions.from_dict(self.fixed_point)
        else:
            raise bad_parameter("fixed_point", _OWNER, "a dict or FixedPointOptions", self.fixed_point)
        if not isinstance(self.progress, bool):
            raise bad_parameter("progress", _OWNER, "a bool", self.progress)
        if self.input_column is not None and not isinstance(self.input_column, str):
            raise bad_parameter("input_column", _OWNER, "a column name (str) or None", self.input_column)
        activation = self._activation_spec(self.activation)
        weighting = StageWeighting(self.robust_weight, self.reweight_rounds, self.reweight_eps, self.target)
        weighting.check_for(variant, lam, lam_out)
        well_posedness = check_choice(self.well_posedness, "well_posedness", _OWNER, CONSTRAINTS)
        return {
            "weighting": weighting,
            "well_posedness": well_posedness,
            "kappa": kappa,
            "lam": lam,
            "lam_out": lam_out,
            "l2": l2,
            "variant": variant,
            "rescale": rescale,
            "batch_size": batch_size,
            "dtype": dtype,
            "device": device,
            "fixed_point": fp,
            "activation": activation,
        }

    @staticmethod
    def _activation_spec(activation: Any) -> tuple[str, float | None] | None:
        """(name, negative_slope) or None for "auto"."""
        if activation == "auto" or activation is None:
            return None
        from idl_ray.implicit.activations import activation_from_module, resolve_activation

        try:
            if isinstance(activation, str):
                act = resolve_activation(activation, owner=_OWNER)
            else:
                act = activation_from_module(activation)
        except Exception as exc:
            raise bad_parameter(
                "activation",
                _OWNER,
                "'auto', an activation name (relu, leaky_relu, tanh, sigmoid) or module",
                activation,
            ) from exc
        return (act.name, act.negative_slope)

    # ------------------------------------------------------------------ fitting
    def fit(self, teacher: nn.Module, data: Any, solver: str | BaseSolver | None = None) -> SIM:
        """Record the teacher's states on ``data`` and fit (A, B) then (C, D).

        Parameters
        ----------
        teacher : nn.Module, see :mod:`idl_ray.sim.extraction` for the supported layers
        data : DataLoader (its transforms apply), iterable of batches, tensor/array of inputs, or
            (inputs, targets); targets are not needed to fit. A ``ray.data.Dataset`` of inputs streams
            through Ray Data actors instead (:func:`idl_ray.distributed.extraction.fit_dataset`).
        solver : BaseSolver instance, a registered name ("admm", "cvx", "projected_gd", "least_squares")
            or None (ADMMSolver on ``device``)

        Returns
        -------
        self
        """
        cfg = self._validated()
        solver_obj = ADMM_default(cfg["device"], self.progress) if solver is None else get_solver(solver)
        if cfg["variant"] not in solver_obj.variants:  # before the states are recorded, not after
            raise ConfigError(
                f"{type(solver_obj).__name__} does not solve the '{cfg['variant']}' variant; it solves "
                f"{sorted(solver_obj.variants)}. Pick another solver (CVXSolver solves all) or variant."
            )
        if type(data).__module__.startswith("ray.data"):  # no Ray import unless the data is Ray's
            from idl_ray.distributed.extraction import fit_dataset

            return fit_dataset(self, teacher, data, solver_obj, cfg)
        keep_samples = solver_obj.needs_samples or cfg["variant"] == "exact"
        recorded = self._record(teacher, data, cfg, keep_samples)
        return self._fit_stages(
            *recorded.stage_inputs(), solver_obj, cfg, recorded.regenerate, recorded.time_s
        )

    def _record(self, teacher: nn.Module, data: Any, cfg: dict[str, Any], keep_samples: bool) -> Recorded:
        """One pass of the teacher over ``data``: the statistics (and samples) both stages are fitted on."""
        start = time.perf_counter()
        recorder = StateRecorder(teacher, dtype=cfg["dtype"])
        stats: GramStats | None = None
        feats: list[torch.Tensor] = []
        targs: list[torch.Tensor] = []
        inputs_cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        scales: torch.Tensor | None = None
        structure: TeacherStructure | None = None
        batches = iter_batches(data, cfg["batch_size"])
        total = _num_batches(data, cfg["batch_size"])
        seen = 0
        for index, (x, _) in enumerate(
            progress_bar(batches, total=total, desc="SIM states", enabled=self.progress)
        ):
            if x.shape[0] == 0:
                continue
            check_finite(
                x, "data", "SIM.fit", where=f"batch {index} (samples {seen} to {seen + x.shape[0] - 1})"
            )
            seen += x.shape[0]
            states = recorder.record(x)
            if structure is None:
                structure = states.structure
                scales = self._setup(structure, cfg)
            features, targets = stage_batch(states.U.T, states.Z.T, states.X.T, states.Y.T, scales)
            if not (bool(torch.isfinite(features).all()) and bool(torch.isfinite(targets).all())):
                raise ConfigError(
                    f"SIM.fit: the teacher's activations or outputs overflowed to Inf or NaN on batch "
                    f"{index} (samples {seen - x.shape[0]} to {seen - 1}) although its inputs are finite. "
                    "Scale the inputs (e.g. standardise the features) or use dtype=torch.float64."
                )
            stats = GramStats.accumulate(stats, features, targets)
            if keep_samples:
                feats.append(features.cpu())
                targs.append(targets.cpu())
            if self.regenerate_states:
                inputs_cache.append((states.U.T.cpu(), states.Y.T.cpu()))
        if stats is None or structure is None:
            raise ConfigError("SIM.fit got no samples: the data is empty. Pass at least one batch of inputs.")
        samples = SampleData(torch.cat(feats), torch.cat(targs)) if keep_samples else None
        regenerate = lambda A, B: self._regenerated(A, B, inputs_cache, structure, cfg, keep_samples)  # noqa: E731
        return Recorded(structure, scales, stats, samples, regenerate, time.perf_counter() - start)

    def fit_path(self, teacher: nn.Module, data: Any, lams: Any = None, **options: Any) -> Any:
        """Fit along a decreasing lam sequence, each point warm-started from the previous: returns a
        :class:`~idl_ray.sim.path.SIMPath` (one fitted SIM per lam, a table, ``best``, ``plot``). Options:
        ``n_lams``, ``lam_ratio``, ``solver``, ``test_data``, ``attack_eps``; see
        :func:`idl_ray.sim.path.sim_path`. This SIM's settings apply; it is not fitted itself."""
        from idl_ray.sim.path import sim_path

        return sim_path(self, teacher, data, lams, **options)

    def fit_states(self, path: str | Path, solver: str | BaseSolver | None = None) -> SIM:
        """Fit from states written by :func:`idl_ray.distributed.write_states` (a Parquet directory).

        The directory is read batch by batch (bounded memory); rescaling and ``regenerate_states`` apply
        as in :meth:`fit` (the stored states are the teacher's own, unscaled). See
        :func:`idl_ray.distributed.state_store.fit_states`.
        """
        from idl_ray.distributed.state_store import fit_states

        cfg = self._validated()
        solver_obj = ADMM_default(cfg["device"], self.progress) if solver is None else get_solver(solver)
        return fit_states(self, path, solver_obj, cfg)

    def _setup(self, structure: TeacherStructure, cfg: dict[str, Any]) -> torch.Tensor | None:
        """Check the teacher's activation against ours; return the state scales (None: no rescaling)."""
        self._check_activation(structure, cfg["activation"])
        return self._scales(structure, cfg)

    def _fit_stages(
        self,
        structure: TeacherStructure,
        scales: torch.Tensor | None,
        stats: GramStats,
        samples: SampleData | None,
        solver_obj: BaseSolver,
        cfg: dict[str, Any],
        regenerate: Any,
        extraction_time: float,
        initial: dict[str, torch.Tensor] | None = None,
        hold_solver: bool = True,
    ) -> SIM:
        """Solve stage 1 on ``stats``, then stage 2 (on ``regenerate(A, B) -> (stats, samples)`` with
        ``regenerate_states``), and set the fitted attributes. Every fitting path ends here. ``initial``
        ("stage1": [A B], "stage2": [C D]) warm-starts the solver (a lambda path's previous point).
        ``hold_solver``: keep a Ray solver's actors from stage 1 to stage 2 (``solver.session()``); False
        when the regeneration between them is itself a Ray pass that needs their CPUs."""
        initial = initial or {}
        n = structure.num_hidden
        variant = cfg["variant"]
        kappa = None if variant == "least_squares" else cfg["kappa"]
        lam = 0.0 if variant == "least_squares" else cfg["lam"]
        lam_out = 0.0 if variant == "least_squares" else cfg["lam_out"]
        stage1 = SIMProblem(
            stats=stats.row_block(slice(0, n)),
            n_constrained=n,
            lam=lam,
            l2=cfg["l2"],
            kappa=kappa,
            variant=variant,
            samples=None if samples is None else samples.row_block(slice(0, n)),
            constraint=cfg.get("well_posedness", "inf_norm"),
        )
        weighting, bias = cfg["weighting"], structure.bias

        def output_stage(stats2: GramStats, samples2: SampleData | None) -> SIMProblem:
            return SIMProblem(
                stats=stats2, n_constrained=0, lam=lam_out, l2=cfg["l2"], kappa=None, variant=variant,
                samples=samples2,
            )  # fmt: skip

        # without regenerated states stage 2 is known before stage 1 is solved (the same G): a solver may share
        # work between the two cold solves (ADMMSolver runs the dual active-set method once for both)
        known = None
        if not self.regenerate_states:
            known = output_stage(
                stats.row_block(slice(n, None)),
                None if samples is None else samples.row_block(slice(n, None)),
            )
        planned = not weighting.active and not initial and known is not None
        hold = solver_obj.session() if hold_solver else contextlib.nullcontext()
        plan = solver_obj.planned_stages([stage1, known]) if planned else contextlib.nullcontext()
        with hold, plan:  # a Ray solver keeps its actors for both stages
            result1, stage1 = solve_stage(
                stage1, solver_obj, weighting, stage=1, n=n, bias=bias, initial=initial.get("stage1")
            )
            W1 = result1.weights.detach().to("cpu", torch.float64)
            A, B = W1[:, :n].contiguous(), W1[:, n:].contiguous()
            if kappa is not None:  # no-op for constrained solvers; guards rounding
                A = self._project(A, kappa, stage1.constraint)
            stage2 = known if known is not None else output_stage(*regenerate(A, B))
            result2, stage2 = solve_stage(
                stage2, solver_obj, weighting, stage=2, n=n, bias=bias, initial=initial.get("stage2")
            )
        W2 = result2.weights.detach().to("cpu", torch.float64)
        self.A_, self.B_ = A, B
        self.C_, self.D_ = W2[:, :n].contiguous(), W2[:, n:].contiguous()
        self.bias_ = structure.bias
        self.structure_ = structure
        self.scales_ = scales
        self.activation_ = (structure.activation, structure.negative_slope)
        self.kappa_ = cfg["kappa"]
        self.stats_: dict[str, SolverStats] = {"stage1": result1.stats, "stage2": result2.stats}
        self.problems_ = {"stage1": stage1, "stage2": stage2}
        self.solver_ = solver_obj
        self.extraction_time_s_ = extraction_time
        self.n_samples_ = stats.num_samples
        self.inference_stats_ = None
        self._module_cache = None
        return self

    @staticmethod
    def _project(A: torch.Tensor, kappa: float, condition: str) -> torch.Tensor:
        """A projected onto the fitted bound: the l1 ball per row, or the mu_inf set."""
        if condition == "mu_inf":
            return project_onto_mu_ball(A, kappa)
        return project_rows_onto_l1_ball(A, kappa)

    def _check_activation(self, structure: TeacherStructure, wanted: tuple[str, float | None] | None) -> None:
        have = (structure.activation, structure.negative_slope)
        if wanted is not None and wanted != have:
            raise ConfigError(
                f"SIM was built with activation {wanted[0]!r}"
                + (f" (slope {wanted[1]})" if wanted[1] is not None else "")
                + f" but the teacher uses {have[0]!r}"
                + (f" (slope {have[1]})" if have[1] is not None else "")
                + "; the implicit model must use the teacher's activation. Pass activation='auto' or "
                f"activation={have[0]!r}."
            )

    @staticmethod
    def _scales(structure: TeacherStructure, cfg: dict[str, Any]) -> torch.Tensor | None:
        if cfg["rescale"] == "none" or structure.activation not in HOMOGENEOUS_ACTIVATIONS:
            return None
        if cfg["variant"] == "least_squares" or cfg["kappa"] == 0:
            return None
        scales = layer_scales(structure, cfg["kappa"], condition=cfg.get("well_posedness", "inf_norm"))
        return None if bool((scales == 1).all()) else scales

    def _regenerated(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        cache: list[tuple[torch.Tensor, torch.Tensor]],
        structure: TeacherStructure,
        cfg: dict[str, Any],
        keep_samples: bool,
    ) -> tuple[GramStats, SampleData | None]:
        """Stage-2 statistics on the fitted model's own equilibrium states: [X_hat; U] -> Y."""
        act = self._activation_object(structure)
        condition = cfg["well_posedness"]
        Ad, Bd = fixed_point_weights(A, B, cfg["kappa"], cfg["dtype"], cfg["device"], condition)
        out: GramStats | None = None
        feats: list[torch.Tensor] = []
        targs: list[torch.Tensor] = []
        for U, Y in cache:
            features = regenerated_features(Ad, Bd, U, act, cfg["fixed_point"], condition)
            out = GramStats.accumulate(out, features, Y)
            if keep_samples:
                feats.append(features.cpu())
                targs.append(Y.cpu())
        assert out is not None
        samples = SampleData(torch.cat(feats), torch.cat(targs)) if keep_samples else None
        return out, samples

    # ------------------------------------------------------------------ inference
    def _check_fitted(self) -> None:
        if not hasattr(self, "A_"):
            raise NotFittedError(
                "This SIM instance is not fitted yet. Call fit(teacher, data) (or train(...)) first."
            )

    def _activation_object(self, structure: TeacherStructure | None = None):
        from idl_ray.implicit.activations import resolve_activation

        name, slope = (
            (structure.activation, structure.negative_slope) if structure is not None else self.activation_
        )
        kwargs = {} if slope is None else {"negative_slope": slope}
        return resolve_activation(name, owner=_OWNER, **kwargs)

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The fitted ``{'A', 'B', 'C', 'D'}`` (torchidl layout); NotFittedError before fit."""
        self._check_fitted()
        return {"A": self.A_, "B": self.B_, "C": self.C_, "D": self.D_}

    @property
    def input_dim(self) -> int:
        """Input features per sample (without the bias feature)."""
        self._check_fitted()
        return self.B_.shape[1] - int(self.bias_)

    def _prepare(self, inputs: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        x = inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(np.asarray(inputs))
        if x.dim() < 2:
            raise ShapeError(
                f"SIM.predict expects batch-first inputs of shape (batch, {self.input_dim}) or (batch, "
                f"*{self.structure_.input_shape}). Got shape {tuple(x.shape)}."
            )
        U = x.reshape(x.shape[0], -1).to(device=device, dtype=dtype)
        if U.shape[1] != self.input_dim:
            raise ShapeError(
                f"SIM.predict expects {self.input_dim} input features per sample (the teacher's input "
                f"{self.structure_.input_shape} flattened). Got shape {tuple(x.shape)}."
            )
        if self.bias_:
            U = torch.cat([U, torch.ones(U.shape[0], 1, dtype=dtype, device=device)], dim=1)
        return U

    def _device_weights(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        A = self.A_.to(device=device, dtype=dtype)
        if dtype != torch.float64:  # rounding to float32 must not break the bound
            A = self._project(A, self.kappa_, self._validated()["well_posedness"])
        return A, self.B_.to(device, dtype), self.C_.to(device, dtype), self.D_.to(device, dtype)

    @torch.no_grad()
    def predict(
        self, inputs: Any, *, return_states: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Outputs Y = C X + D U of the fitted implicit model, X the fixed point of X = phi(A X + B U).

        Parameters
        ----------
        inputs : tensor/array (batch, *input_shape) or (batch, p); or a DataLoader / iterable of batches
        return_states : also return X (batch, n)

        Returns
        -------
        Y : Tensor (batch, q) on the SIM's device, in its dtype (and X with ``return_states``)
        """
        self._check_fitted()
        cfg = self._validated()
        from idl_ray.implicit.fixed_point import solve_fixed_point
        from idl_ray.implicit.mu_fixed_point import solve_fixed_point_mu

        solve = solve_fixed_point_mu if cfg["well_posedness"] == "mu_inf" else solve_fixed_point
        dtype, device = cfg["dtype"], cfg["device"]
        A, B, C, D = self._device_weights(dtype, device)
        act = self._activation_object()
        outputs, states, iters = [], [], []
        if isinstance(inputs, (torch.Tensor, np.ndarray)):
            batches = (
                inputs[i : i + cfg["batch_size"]] for i in range(0, inputs.shape[0], cfg["batch_size"])
            )
        else:
            batches = (x for x, _ in iter_batches(inputs, cfg["batch_size"]))
        seen = 0
        for index, x in enumerate(batches):
            U = self._prepare(x, dtype, device)
            # a NaN or Inf input has no fixed point: refuse it (as ImplicitModel.forward does) rather
            # than iterate to max_iter and return NaN with advice to raise max_iter
            check_finite(
                U, "inputs", "SIM.predict", where=f"batch {index} (samples {seen} to {seen + U.shape[0] - 1})"
            )
            seen += U.shape[0]
            X, fp_stats = solve(A, U @ B.T, act, cfg["fixed_point"])
            outputs.append(X @ C.T + U @ D.T)
            iters.append(fp_stats.sample_iterations.to(torch.float64).cpu())
            if return_states:
                states.append(X)
        if not outputs:
            raise ConfigError("SIM.predict got no inputs; pass at least one sample.")
        it = torch.cat(iters)
        self.inference_stats_ = {"max": float(it.max()), "mean": float(it.mean())}
        Y = torch.cat(outputs)
        return (Y, torch.cat(states)) if return_states else Y

    def score(self, data: Any, targets: Any = None, *, metric: str = "auto") -> float:
        """Accuracy (classification: integer labels) or R^2 (regression) of the predictions.

        Parameters
        ----------
        data : DataLoader / iterable of (inputs, targets) batches, or inputs with ``targets``
        targets : labels (m,) or regression targets (m, q) when ``data`` holds inputs only
        metric : "auto" (accuracy for integer labels, else "r2"), "accuracy", "r2" or "mse"
        """
        self._check_fitted()
        check_choice(metric, "metric", "SIM.score", ("auto", "accuracy", "r2", "mse"))
        preds, labels = [], []
        if targets is not None:
            pairs = iter_batches((_tensor(data), _tensor(targets)), self._validated()["batch_size"])
        else:
            pairs = iter_batches(data, self._validated()["batch_size"])
        for x, y in pairs:
            if y is None:
                raise ConfigError("SIM.score needs targets: pass (inputs, targets) batches or targets=...")
            preds.append(self.predict(x).cpu())
            labels.append(y.cpu())
        if not preds:
            raise ConfigError("SIM.score got no data.")
        P, Y = torch.cat(preds), torch.cat(labels)
        check_finite(Y, "targets", "SIM.score")  # a NaN target would make the score NaN, silently
        if Y.shape[0] != P.shape[0] or (Y.dim() > 1 and Y[0].numel() != P[0].numel()):
            raise ShapeError(
                f"SIM.score got targets of shape {tuple(Y.shape)} for {P.shape[0]} predictions of "
                f"{P.shape[1]} output(s); pass one label per sample, or ({P.shape[0]}, {P.shape[1]}) targets."
            )
        if metric == "auto":
            metric = "accuracy" if (not Y.is_floating_point() and Y.dim() == 1) else "r2"
        if metric == "accuracy":
            return float((P.argmax(dim=1) == Y.long()).double().mean())
        Yf = Y.to(P.dtype).reshape(P.shape)
        mse = float(((P - Yf) ** 2).mean())
        if metric == "mse":
            return mse
        var = float(((Yf - Yf.mean(dim=0)) ** 2).mean())
        return 1.0 - mse / var if var > 0 else (1.0 if mse == 0 else -math.inf)

    def to_module(self, **options: Any) -> nn.Module:
        """An :class:`~idl_ray.implicit.model.ImplicitModel` holding the fitted weights (in ``dtype``).

        The model's fixed-point method, tolerance and iteration cap follow ``fixed_point``; ``options``
        (ImplicitModel keywords) override them.
        """
        self._check_fitted()
        from idl_ray.implicit.model import ImplicitModel

        cfg = self._validated()
        A, B, C, D = self._device_weights(cfg["dtype"], torch.device("cpu"))
        fp = cfg["fixed_point"]
        settings = {
            "fixed_point": fp.method, "tol": fp.tol, "max_iter": fp.max_iter, "well_posedness": cfg["well_posedness"]
        } | options  # fmt: skip
        return ImplicitModel.from_weights(
            A, B, C, D, activation=self._activation_object(), kappa=self.kappa_, bias=self.bias_, **settings
        )

    # ------------------------------------------------------------------ reporting
    def lipschitz_bound(self, *, method: str = "norm") -> float:
        """Certified l-infinity Lipschitz bound of the fitted model's ``input -> output`` map.

        ``method="norm"``: ``||D||_inf + ||C||_inf ||B||_inf / (1 - ||A||_inf)`` (bias column left out); it
        depends on the scale of the states (see ``rescale``). ``"elementwise"``: the tighter, rescaling-invariant
        ``|| |C| M^{-1} |B| + |D| ||_inf``. See :func:`idl_ray.robustness.lipschitz_bound`.
        """
        self._check_fitted()
        from idl_ray.robustness.lipschitz import lipschitz_bound

        return lipschitz_bound(self, method=method)

    def summary(self) -> SIMSummary:
        """Sparsity per matrix, ||A||_inf, solve times and iterations, fixed-point iterations at inference."""
        self._check_fitted()
        mats = self.weights
        s1, s2 = self.stats_["stage1"], self.stats_["stage2"]
        return SIMSummary(
            hidden=self.A_.shape[0],
            inputs=self.B_.shape[1],
            outputs=self.C_.shape[0],
            bias=self.bias_,
            activation=self.activation_[0],
            kappa=self.kappa_,
            a_inf_norm=inf_norm(self.A_),
            sparsity={k: float((v == 0).double().mean()) if v.numel() else 0.0 for k, v in mats.items()},
            nonzeros={k: int((v != 0).sum()) for k, v in mats.items()},
            solver=s1.solver,
            solve_time_s={"stage1": s1.time_s, "stage2": s2.time_s},
            iterations={"stage1": s1.iterations, "stage2": s2.iterations},
            objective={"stage1": s1.objective, "stage2": s2.objective},
            extraction_time_s=self.extraction_time_s_,
            relative_gap={"stage1": s1.relative_gap, "stage2": s2.relative_gap},
            converged={"stage1": s1.converged, "stage2": s2.converged},
            joint_active_set=bool(s2.extra.get("joint_active_set")),
            scales=None
            if self.scales_ is None
            else {"min": float(self.scales_.min()), "max": float(self.scales_.max())},
            inference_iterations=self.inference_stats_,
            **self._lipschitz_fields(),
            well_posedness=self.well_posedness,
            mu_inf=mu_inf(self.A_) if self.well_posedness == "mu_inf" else None,
        )

    def _lipschitz_fields(self) -> dict[str, float | None]:
        from idl_ray.errors import WellPosednessError

        out: dict[str, float | None] = {}
        for method, key in (("norm", "lipschitz_bound"), ("elementwise", "lipschitz_bound_elementwise")):
            try:
                out[key] = self.lipschitz_bound(method=method)
            except WellPosednessError:
                out[key] = None
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write ``path/weights.safetensors`` (A, B, C, D, scales) and ``path/sim.json`` (settings)."""
        self._check_fitted()
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.weights.items()}
        if self.scales_ is not None:
            tensors["scales"] = self.scales_.contiguous()
        save_file(tensors, str(folder / "weights.safetensors"))
        params = self.get_params()
        params["dtype"] = str(self._validated()["dtype"]).replace("torch.", "")
        params["device"] = None if self.device is None else str(self.device)
        if not isinstance(params["activation"], str):
            params["activation"] = "auto"
        if params["stream"] is not None and not isinstance(params["stream"], dict):
            params["stream"] = params["stream"].to_dict()
        if params["target"] is not None and not isinstance(params["target"], dict):
            params["target"] = params["target"].to_dict()
        if params["fixed_point"] is not None and not isinstance(params["fixed_point"], dict):
            params["fixed_point"] = params["fixed_point"].to_dict()
        s = self.structure_
        meta = {
            "format": "idl_ray.SIM/1",
            "params": params,
            "fitted": {
                "bias": self.bias_,
                "activation": list(self.activation_),
                "kappa": self.kappa_,
                "input_shape": list(s.input_shape),
                "layer_sizes": s.layer_sizes,
                "n_samples": self.n_samples_,
                "stats": {k: {**v.to_dict(), "history": []} for k, v in self.stats_.items()},
            },
        }
        (folder / "sim.json").write_text(json.dumps(meta, indent=2, default=str))
        return folder

    @classmethod
    def load(cls, path: str | Path) -> SIM:
        """Load a SIM saved with :meth:`save` (ready to predict; the teacher is not needed)."""
        from safetensors.torch import load_file

        folder = Path(path)
        try:
            meta = json.loads((folder / "sim.json").read_text())
            tensors = load_file(str(folder / "weights.safetensors"))
        except FileNotFoundError as exc:
            raise ConfigError(
                f"SIM.load: {folder} does not hold a saved SIM (sim.json + weights.safetensors)."
            ) from exc
        if meta.get("format") != "idl_ray.SIM/1":
            raise ConfigError(f"SIM.load: unknown format {meta.get('format')!r} in {folder / 'sim.json'}.")
        params = dict(meta["params"])
        params["dtype"] = _DTYPES[params["dtype"]]
        sim = cls(**params)
        fitted = meta["fitted"]
        sim.A_, sim.B_, sim.C_, sim.D_ = (tensors[k].to(torch.float64) for k in ("A", "B", "C", "D"))
        sim.scales_ = tensors.get("scales")
        sim.bias_ = bool(fitted["bias"])
        sim.activation_ = (fitted["activation"][0], fitted["activation"][1])
        sim.kappa_ = float(fitted["kappa"])
        sim.n_samples_ = fitted["n_samples"]
        n = sim.A_.shape[0]
        sim.structure_ = TeacherStructure(
            input_shape=tuple(fitted["input_shape"]),
            num_inputs=sim.B_.shape[1],
            layer_sizes=list(fitted["layer_sizes"]),
            layer_shapes=[(k,) for k in fitted["layer_sizes"]],
            num_outputs=sim.C_.shape[0],
            activation=sim.activation_[0],
            negative_slope=sim.activation_[1],
            bias=sim.bias_,
            A=torch.zeros(n, n),
            B=torch.zeros(0),
            C=torch.zeros(0),
            D=torch.zeros(0),
        )
        sim.stats_ = {k: SolverStats(**v) for k, v in fitted["stats"].items()}
        sim.problems_ = {}
        sim.solver_ = None
        sim.extraction_time_s_ = 0.0
        sim.inference_stats_ = None
        return sim

    # ------------------------------------------------------------------ torchidl compatibility
    def train(
        self,
        solver: str | BaseSolver | None = None,
        model: nn.Module | None = None,
        dataloader: Any = None,
        states_data_path: str | None = None,
        save_states_path: str | None = None,
    ) -> SIM:
        """torchidl-style alias of :meth:`fit`: ``SIM(...).train(solver=..., model=..., dataloader=...)``.

        ``states_data_path`` / ``save_states_path`` (torchidl's saved numpy states) are not supported:
        states stream straight into the Gram; pass the teacher and a dataloader.
        """
        if states_data_path is not None or save_states_path is not None:
            raise ConfigError(
                "SIM.train: states_data_path/save_states_path are not supported (states stream into the Gram); "
                "pass model=<teacher> and dataloader=<DataLoader>. To keep states, use extract_states()."
            )
        if model is None or dataloader is None:
            raise ConfigError("SIM.train needs model=<teacher nn.Module> and dataloader=<DataLoader>.")
        return self.fit(model, dataloader, solver=solver)

    def evaluate(self, dataloader: Any) -> float:
        """torchidl-style test accuracy through the dataloader (its transforms apply)."""
        return self.score(dataloader, metric="accuracy")


@dataclasses.dataclass
class Recorded:
    """What one pass of the teacher over the data gives ``SIM._fit_stages`` (and a lambda path)."""

    structure: TeacherStructure
    scales: torch.Tensor | None
    stats: GramStats
    samples: SampleData | None
    regenerate: Any
    time_s: float

    def stage_inputs(self) -> tuple[Any, ...]:
        return self.structure, self.scales, self.stats, self.samples


def ADMM_default(device: torch.device, progress: bool = False) -> BaseSolver:
    from idl_ray.sim.solvers.admm import ADMMSolver

    return ADMMSolver(device=device, progress=progress)


def _tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
