r"""Fixed-point kernels for implicit models: Picard and Anderson, per-sample stopping, typed telemetry.

The forward problem, batch-first (one row per sample)::

    X = phi(X A^T + BU)            X: (batch, n), A: (n, n), BU: (batch, n) the precomputed input term

and the adjoint problem of the backward pass (same contraction, ``J = phi'(Z)`` element-wise)::

    V = J * (V A + G)              V, J, G: (batch, n)

Both are maps ``x -> fn(x W + c)`` with a row-wise offset ``c`` (and, for the adjoint, a row-wise scale),
so one engine solves both. Stopping rule, per sample ``i``::

    ||f(x_i) - x_i|| <= atol + tol * ||f(x_i)||        (2-norm by default, or the max-norm)

Samples that meet it are written to the result and leave the active set, so they stop costing work
("active-set shrinking"; to save indexing, the set is compacted once ``shrink_fraction`` of it has
converged, and samples waiting for that keep iterating, which only refines them). The others go on
until ``max_iter``. Picard's dense path (``compaction="never"``, the default on CUDA) skips the
compaction: the whole batch iterates until every sample meets the test, with one host synchronisation
per check. The returned state of each sample is its
last ``f(x_i)``. Samples still above the tolerance at the cap trigger a :class:`ConvergenceWarning` that
states the residual, the tolerance and what to try.

Under ``||A||_inf <= kappa < 1`` and a monotone 1-Lipschitz ``phi``, Picard converges linearly with rate
at most kappa (the map contracts in the infinity norm). Anderson acceleration (Walker & Ni 2011, type II;
``"anderson"`` mixes per sample, ``"anderson_batch"`` with coefficients shared by the batch) usually needs
far fewer iterations when kappa is close to 1, at a higher cost per iteration.

Kernels are pure: tensors and a :class:`FixedPointOptions` in, ``(result, FixedPointStats)`` out. Methods
are registered by name in :data:`FIXED_POINT_METHODS` (see :func:`register_fixed_point_method`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from idl_ray._validation import Options, bad_parameter, check_positive_float, check_positive_int
from idl_ray.errors import ConfigError, ConvergenceWarning, ShapeError
from idl_ray.implicit.activations import Activation, _leaky_relu, resolve_activation

__all__ = [
    "FIXED_POINT_METHODS",
    "FixedPointOptions",
    "FixedPointStats",
    "RowMap",
    "anderson",
    "anderson_batch",
    "picard",
    "register_fixed_point_method",
    "solve_adjoint",
    "solve_fixed_point",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class FixedPointOptions(Options):
    """Settings of a fixed-point solve.

    Parameters
    ----------
    tol : float, default 1e-5
        Relative tolerance: sample ``i`` stops once ``||f(x_i) - x_i||_2 <= atol + tol * ||f(x_i)||_2``.
    atol : float, default 0.0
        Absolute tolerance of the same test (``tol=0, atol=a`` stops on ``||f(x_i) - x_i|| <= a``).
    norm : {"l2", "inf"}, default "l2"
        The per-sample norm of the test (and of the reported residuals).
    max_iter : int, default 300
        Iteration cap (each iteration is one evaluation of the map).
    method : str, default "picard"
        A name in :data:`FIXED_POINT_METHODS`: ``"picard"``, ``"anderson"`` (per-sample mixing) or
        ``"anderson_batch"`` (mixing coefficients shared by the batch).
    anderson_memory : int, default 5
        Number of past iterates Anderson mixes.
    anderson_beta : float, default 1.0
        Anderson damping in (0, 1]; 1 is undamped.
    anderson_reg : float, default 1e-10
        Tikhonov regularisation of Anderson's least-squares problem, relative to its scale.
    shrink_fraction : float in [0, 1], default 0.25
        The active set is compacted (converged samples removed, their results written) once at least
        this fraction of the active samples has met the tolerance; 0 compacts at every convergence.
        Samples waiting for a compaction keep iterating, which only refines them; compacting less often
        saves the indexing cost, which dominates on small problems.
    max_check_skip : int >= 0, default 16
        Picard only: once the linear rate is measured, up to this many iterations may run between two
        convergence checks (three quarters of the predicted remaining count). 0 checks at every
        iteration.
    compaction : {"auto", "always", "never"}, default "auto"
        Picard only: whether converged samples may leave the active set. ``"never"`` iterates the whole
        batch to the end ("dense" path: one fused step per iteration into preallocated buffers, one
        residual check and one host synchronisation per check, no indexing); every sample still meets
        the tolerance and its telemetry is exact (all samples report the same iteration count).
        ``"auto"`` is ``"never"`` on CUDA tensors, where kernel launches and host synchronisations cost
        more than the saved arithmetic, and ``"always"`` elsewhere (the rule of ``shrink_fraction``).
    warn : bool, default True
        Emit a :class:`ConvergenceWarning` when samples hit the cap above tolerance.
    """

    tol: float = 1e-5
    atol: float = 0.0
    norm: str = "l2"
    max_iter: int = 300
    method: str = "picard"
    anderson_memory: int = 5
    anderson_beta: float = 1.0
    anderson_reg: float = 1e-10
    shrink_fraction: float = 0.25
    max_check_skip: int = 16
    compaction: str = "auto"
    warn: bool = True

    def _validate(self) -> None:
        owner = type(self).__name__
        check_positive_float(self.tol, "tol", owner, allow_zero=True)
        check_positive_float(self.atol, "atol", owner, allow_zero=True)
        if self.tol == 0 and self.atol == 0:
            raise bad_parameter("tol", owner, "> 0 when atol is 0", self.tol, "Set tol > 0 or atol > 0.")
        check_positive_int(self.max_iter, "max_iter", owner)
        if not isinstance(self.method, str) or self.method not in FIXED_POINT_METHODS:
            raise bad_parameter(
                "method",
                owner,
                f"one of {sorted(FIXED_POINT_METHODS)}",
                self.method,
                "Register new methods with register_fixed_point_method.",
            )
        check_positive_int(self.anderson_memory, "anderson_memory", owner)
        beta = self.anderson_beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 < beta <= 1.0:
            raise bad_parameter("anderson_beta", owner, "a float in (0, 1]", beta)
        check_positive_float(self.anderson_reg, "anderson_reg", owner, allow_zero=True)
        if (
            isinstance(self.max_check_skip, bool)
            or not isinstance(self.max_check_skip, int)
            or self.max_check_skip < 0
        ):
            raise bad_parameter("max_check_skip", owner, "an integer >= 0", self.max_check_skip)
        if self.norm not in _NORMS:
            raise bad_parameter("norm", owner, f"one of {sorted(_NORMS)}", self.norm)
        frac = self.shrink_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= frac <= 1.0:
            raise bad_parameter("shrink_fraction", owner, "a float in [0, 1]", frac)
        if self.compaction not in _COMPACTION:
            raise bad_parameter("compaction", owner, f"one of {sorted(_COMPACTION)}", self.compaction)
        if not isinstance(self.warn, bool):
            raise bad_parameter("warn", owner, "a bool", self.warn)


@dataclasses.dataclass(frozen=True)
class FixedPointStats:
    """Telemetry of one fixed-point solve.

    Integer fields are known without reading tensors back from the device; the residual summaries are
    computed on first access (so a solve adds no host synchronisation for its telemetry).

    Attributes
    ----------
    method : str
    iterations : int
        Iterations run (the largest over samples).
    num_converged, num_samples : int
    work : int
        Sample-iterations actually computed (``sample_iterations.sum()``); ``iterations * num_samples``
        would be the cost without active-set shrinking.
    tol, atol : float
    norm : str
        ``"l2"`` or ``"inf"``, the per-sample norm of the residuals.
    max_iter : int
    time_s : float
        Wall-clock time of the solve (on a GPU: until the last kernel launch).
    converged : Tensor of bool, shape (batch,)
    sample_iterations : Tensor of int64, shape (batch,)
        Iterations each sample ran before it left the active set.
    abs_residuals : Tensor, shape (batch,)
        Final ``||f(x_i) - x_i||`` per sample.
    residuals : Tensor, shape (batch,) (property)
        Final relative residuals ``||f(x_i) - x_i|| / ||f(x_i)||``.
    max_residual, mean_residual, max_abs_residual : float (properties)
        Largest and mean relative residual, largest absolute one (0.0 for an empty batch).
    """

    method: str
    iterations: int
    num_converged: int
    num_samples: int
    work: int
    tol: float
    atol: float
    norm: str
    max_iter: int
    time_s: float
    converged: torch.Tensor
    sample_iterations: torch.Tensor
    abs_residuals: torch.Tensor
    state: torch.Tensor = dataclasses.field(repr=False)

    @property
    def residuals(self) -> torch.Tensor:
        # detached: the state may be the very tensor an autograd Function returned (requires grad)
        X = self.state.detach()
        size = X.abs().amax(dim=1) if self.norm == "inf" else torch.linalg.vector_norm(X, dim=1)
        return self.abs_residuals / size.clamp_min(torch.finfo(X.dtype).tiny)

    @property
    def max_residual(self) -> float:
        return float(self.residuals.max()) if self.num_samples else 0.0

    @property
    def mean_residual(self) -> float:
        return float(self.residuals.mean()) if self.num_samples else 0.0

    @property
    def max_abs_residual(self) -> float:
        return float(self.abs_residuals.max()) if self.num_samples else 0.0

    @property
    def all_converged(self) -> bool:
        return self.num_converged == self.num_samples

    def summary(self) -> str:
        return (
            f"{self.method}: {self.iterations} iterations, {self.num_converged}/{self.num_samples} converged, "
            f"max relative residual {self.max_residual:.3g} (tol {self.tol:g}, atol {self.atol:g}), "
            f"{self.time_s * 1e3:.2f} ms"
        )


class RowMap:
    """The map ``x -> fn(x W + c)`` (optionally ``scale * (x W + c)``), restrictable to a subset of rows.

    Parameters
    ----------
    weight : Tensor (n, n)
        ``W`` (``A^T`` for the forward problem, ``A`` for the adjoint).
    offset : Tensor (batch, n)
        Row-wise ``c``.
    fn : callable or None
        Element-wise activation applied to ``x W + c``.
    scale : Tensor (batch, n) or None
        Row-wise multiplier applied instead of ``fn`` (the adjoint's ``J``).
    """

    __slots__ = ("fn", "fn_inplace", "offset", "scale", "weight")

    def __init__(
        self,
        weight: torch.Tensor,
        offset: torch.Tensor,
        fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        scale: torch.Tensor | None = None,
    ) -> None:
        self.weight = weight
        self.offset = offset
        self.fn = fn
        self.scale = scale
        self.fn_inplace = _inplace_of(fn)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.addmm(self.offset, x, self.weight)
        if self.scale is not None:
            return z.mul_(self.scale)  # z is a fresh tensor owned here
        if self.fn is not None:
            return self.fn(z)
        return z

    def apply_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``f(x)`` written into ``out`` (which must not alias ``x``): one ``addmm`` and, for the known
        activations or the row scale, one in-place kernel; no allocation."""
        torch.addmm(self.offset, x, self.weight, out=out)
        if self.scale is not None:
            return out.mul_(self.scale)
        if self.fn_inplace is not None:
            self.fn_inplace(out)
        elif self.fn is not None:
            out.copy_(self.fn(out))
        return out

    def restrict(self, keep: torch.Tensor) -> RowMap:
        """The same map on the rows whose indices are in the int64 tensor ``keep``."""
        scale = None if self.scale is None else self.scale.index_select(0, keep)
        return RowMap(self.weight, self.offset.index_select(0, keep), self.fn, scale)


_NORMS = {"l2": 2.0, "inf": math.inf}
_COMPACTION = ("auto", "always", "never")


class _Recorder:
    """Collects finished samples of a solve (in chunks, assembled once) and builds the stats."""

    def __init__(self, x0: torch.Tensor, options: FixedPointOptions, method: str) -> None:
        self.x0 = x0
        self.options = options
        self.method = method
        self.start = time.perf_counter()
        self.iterations = 0
        self.work = 0
        self.num_converged = 0
        self.chunks: list[
            tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None, int]
        ] = []
        self.rows: torch.Tensor | None = None  # original indices of the active rows; None = all, in order

    def residuals(
        self, fx: torch.Tensor, x: torch.Tensor, diff: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, float | torch.Tensor]:
        """Per-row residual ``dist_i = ||f(x_i) - x_i||`` and the threshold it must not exceed:
        ``atol + tol ||f(x_i)||`` per row, or the float ``atol`` when ``tol == 0`` (no kernel spent).

        ``diff`` is ``f(x) - x`` when the caller has it already (left untouched)."""
        o = self.options
        if o.norm == "inf":  # abs().amax() is several times faster than vector_norm(ord=inf) on CPU
            dist = (fx - x).abs_().amax(dim=1) if diff is None else diff.abs().amax(dim=1)
        else:
            dist = torch.linalg.vector_norm(fx - x if diff is None else diff, dim=1)
        if o.tol == 0:
            return dist, o.atol
        size = fx.abs().amax(dim=1) if o.norm == "inf" else torch.linalg.vector_norm(fx, dim=1)
        return dist, size.mul_(o.tol).add_(o.atol).clamp_min_(torch.finfo(fx.dtype).tiny)

    @staticmethod
    def _worst(dist: torch.Tensor, thr: float | torch.Tensor) -> float:
        """``max_i dist_i / thr_i`` (one reduction and one host synchronisation)."""
        if isinstance(thr, float):
            return float(dist.max()) / thr
        return float((dist / thr).max())

    def step(
        self,
        k: int,
        fx: torch.Tensor,
        dist: torch.Tensor,
        thr: float | torch.Tensor,
        worth_compacting: Callable[[float], bool] | None = None,
    ) -> torch.Tensor | None:
        """Record finished rows; return None when every row is finished, else the mask of rows to keep
        as int64 indices (:data:`_KEEP_ALL` when no compaction is due). Sets ``self.worst``, the largest
        ``dist_i / thr_i``. ``worth_compacting(worst)`` False skips the compaction test (it costs about
        one iteration). Without a compaction or the end, one reduction and one host synchronisation."""
        active = fx.shape[0]
        self.worst = worst = self._worst(dist, thr)
        if worst <= 1.0:
            self._finish(self.rows, fx, dist, None, k, active, active)
            return None
        if k == self.options.max_iter:
            done = dist <= thr
            self._finish(self.rows, fx, dist, done, k, active, int(done.sum()))
            return None
        if worth_compacting is not None and not worth_compacting(worst):
            return _KEEP_ALL
        done = dist <= thr
        n_done = int(done.sum())
        if n_done == active:  # only with NaN ratios (Inf / Inf): every row passes its own test
            self._finish(self.rows, fx, dist, None, k, active, active)
            return None
        if n_done == 0 or n_done < self.options.shrink_fraction * active:
            return _KEEP_ALL
        # one nonzero per mask, then index_select: cheaper than repeated boolean indexing
        rows = self.rows if self.rows is not None else torch.arange(active, device=fx.device)
        finished = done.nonzero().squeeze(1)
        keep = (~done).nonzero().squeeze(1)
        self._finish(
            rows.index_select(0, finished),
            fx.index_select(0, finished),
            dist.index_select(0, finished),
            None,
            k,
            finished.numel(),
            finished.numel(),
        )
        self.rows = rows.index_select(0, keep)
        return keep

    def check_dense(self, k: int, fx: torch.Tensor, x: torch.Tensor) -> bool:
        """Convergence check without compaction: True (results recorded) when every row meets the
        tolerance or ``k`` is the cap. Sets ``self.worst``. One host synchronisation; with the max-norm
        absolute test, three kernels (sub, abs, max) unless the solve ends here."""
        o = self.options
        if o.tol == 0 and o.norm == "inf":
            self.worst = worst = float((fx - x).abs_().max()) / o.atol
            if not worst <= 1.0 and k < o.max_iter:  # NaN: go on (to the cap), as the compacting path
                return False
            dist, thr = self.residuals(fx, x)
        else:
            dist, thr = self.residuals(fx, x)
            self.worst = worst = self._worst(dist, thr)
            if not worst <= 1.0 and k < o.max_iter:  # NaN: go on (to the cap), as the compacting path
                return False
        active = fx.shape[0]
        if worst <= 1.0:
            self._finish(None, fx, dist, None, k, active, active)
        else:
            done = dist <= thr
            self._finish(None, fx, dist, done, k, active, int(done.sum()))
        return True

    def _finish(self, rows, fx, dist, done, k, count: int, n_converged: int) -> None:
        self.chunks.append((rows, fx, dist, done, k))
        self.iterations = max(self.iterations, k)
        self.work += count * k
        self.num_converged += n_converged

    def result(self) -> tuple[torch.Tensor, FixedPointStats]:
        x0 = self.x0
        batch = x0.shape[0]
        if len(self.chunks) == 1 and self.chunks[0][0] is None:
            _, X, dist, converged, k = self.chunks[0]
            if converged is None:
                converged = torch.ones(batch, dtype=torch.bool, device=x0.device)
            iters = torch.full((batch,), k, dtype=torch.int64, device=x0.device)
        else:
            X = torch.empty_like(x0)
            dist = torch.empty(batch, dtype=x0.dtype, device=x0.device)
            converged = torch.zeros(batch, dtype=torch.bool, device=x0.device)
            iters = torch.zeros(batch, dtype=torch.int64, device=x0.device)
            for rows, fx, d, c, k in self.chunks:  # c None: every row of the chunk converged
                X[rows] = fx
                dist[rows] = d
                converged[rows] = True if c is None else c
                iters[rows] = k
        o = self.options
        stats = FixedPointStats(
            method=self.method,
            iterations=self.iterations,
            num_converged=self.num_converged,
            num_samples=batch,
            work=self.work,
            tol=o.tol,
            atol=o.atol,
            norm=o.norm,
            max_iter=o.max_iter,
            time_s=time.perf_counter() - self.start,
            converged=converged,
            sample_iterations=iters,
            abs_residuals=dist,
            state=X,
        )
        return X, stats


_KEEP_ALL = torch.ones(0, dtype=torch.int64)  # sentinel: nothing to compact


def _empty(x0: torch.Tensor, options: FixedPointOptions, method: str) -> tuple[torch.Tensor, FixedPointStats]:
    rec = _Recorder(x0, options, method)
    return rec.result()


_EAGER_REMAINING = 8.0  # dense path: below this many predicted iterations, check where they end


def _remaining_iterations(previous: tuple[int, float] | None, k: int, worst: float) -> float | None:
    """Predicted iterations until the worst ratio reaches 1, from the linear rate between two checks:
    with ratios ``q_j`` (iteration j) and ``q_k`` (iteration k), ``rho = (q_k / q_j)^(1 / (k - j))`` and
    ``r = log(q_k) / -log(rho)``. None when there is no rate (first check, no decrease, NaN)."""
    if previous is None or not math.isfinite(worst):
        return None
    j, q_j = previous
    if not 0.0 < worst < q_j:
        return None
    return math.log(worst) / -(math.log(worst / q_j) / (k - j))


def _checks_to_skip(remaining: float | None, cap: int, eager: bool = False) -> int:
    """Iterations to run before the next convergence check, from the predicted ``remaining`` count.

    We skip three quarters of it (at most ``cap``), so a wrong estimate costs little. ``eager`` (when a
    check has nothing left to gain from being early: the dense path, or the compacting path once
    compaction no longer pays): once ``remaining <= 8``, the next check is placed where the tolerance
    should be met (``ceil(remaining)`` iterations on), which saves the trail of checks one iteration
    apart at the end of a solve.
    """
    if remaining is None or cap == 0:
        return 0
    if eager and remaining <= _EAGER_REMAINING:
        return max(0, min(cap, math.ceil(remaining) - 1))
    return max(0, min(cap, int(0.75 * remaining)))


_MIN_REMAINING_TO_COMPACT = 3.0  # compaction costs about one iteration: not worth it near the end


_INPLACE: dict[Any, Callable[[torch.Tensor], torch.Tensor]] = {
    torch.relu: torch.relu_,
    torch.tanh: torch.tanh_,
    torch.sigmoid: torch.sigmoid_,
}


def _inplace_of(fn: Callable[[torch.Tensor], torch.Tensor] | None) -> Callable[[torch.Tensor], Any] | None:
    """The in-place form of a known activation (None: unknown, call ``fn`` out of place)."""
    if fn is None:
        return None
    try:
        inplace = _INPLACE.get(fn)
    except TypeError:  # an unhashable user callable
        return None
    if inplace is None and isinstance(fn, functools.partial) and fn.func is _leaky_relu and not fn.args:
        slope = fn.keywords["slope"]
        return lambda z: F.leaky_relu_(z, slope)
    return inplace


def _compaction_pays(remaining: float | None) -> bool:
    """Compaction costs about one iteration: try it while the rate is unknown (``remaining`` None) or 3
    or more iterations are predicted to remain (see :func:`_remaining_iterations`)."""
    return remaining is None or remaining >= _MIN_REMAINING_TO_COMPACT


def _worth_compacting(previous: tuple[int, float] | None, k: int, worst: float) -> bool:
    """:func:`_compaction_pays` for the ``worst`` ratio at iteration ``k`` after the check ``previous``."""
    return _compaction_pays(_remaining_iterations(previous, k, worst))


def _compacts(options: FixedPointOptions, x0: torch.Tensor) -> bool:
    mode = options.compaction
    return mode == "always" or (mode == "auto" and not x0.is_cuda)


def picard(
    fmap: RowMap, x0: torch.Tensor, options: FixedPointOptions
) -> tuple[torch.Tensor, FixedPointStats]:
    """Picard iteration ``x <- f(x)`` with per-sample stopping (and active-set shrinking, see
    ``options.compaction``).

    Convergence is checked at every iteration until two checks give a linear rate; then checks are
    spaced by :func:`_checks_to_skip` (at most ``options.max_check_skip`` iterations apart), which
    saves the residual computation and the host synchronisation on most iterations. Between checks an
    iteration is one ``addmm`` into one of two preallocated buffers and one in-place activation (or row
    scale): two kernels, no allocation, no host synchronisation.
    """
    if x0.shape[0] == 0:
        return _empty(x0, options, "picard")
    rec = _Recorder(x0, options, "picard")
    compact = _compacts(options, x0)
    max_iter, cap = options.max_iter, options.max_check_skip
    bufs = (fmap.offset.new_empty(x0.shape), fmap.offset.new_empty(x0.shape))
    x = prev = x0
    k = 0
    next_check = 1
    previous: tuple[int, float] | None = None
    while True:
        stop = min(next_check, max_iter)
        while k < stop:  # never writes into x0 nor into the previous iterate
            prev, x = x, fmap.apply_into(x, bufs[k & 1])
            k += 1
        if compact:
            dist, thr = rec.residuals(x, prev)
            keep = rec.step(k, x, dist, thr, functools.partial(_worth_compacting, previous, k))
            if keep is None:
                break
            if keep is not _KEEP_ALL:
                x = x.index_select(0, keep)  # a fresh tensor: the buffers are replaced below
                fmap = fmap.restrict(keep)
                bufs = (fmap.offset.new_empty(x.shape), fmap.offset.new_empty(x.shape))
        elif rec.check_dense(k, x, prev):
            break
        remaining = _remaining_iterations(previous, k, rec.worst)
        eager = not (compact and _compaction_pays(remaining))  # else nothing to gain from early checks
        next_check = k + 1 + _checks_to_skip(remaining, cap, eager)
        previous = (k, rec.worst)
    return rec.result()


def anderson(
    fmap: RowMap, x0: torch.Tensor, options: FixedPointOptions
) -> tuple[torch.Tensor, FixedPointStats]:
    """Anderson acceleration (type II), batched per sample, with active-set shrinking.

    Keeps the last ``m`` pairs ``(x_j, f(x_j))`` per sample, solves the small constrained least squares
    ``min ||sum_j alpha_j (f(x_j) - x_j)||  s.t. sum_j alpha_j = 1`` through its (m x m) Gram matrix, and
    steps to ``beta * sum alpha_j f(x_j) + (1 - beta) * sum alpha_j x_j``. A sample whose least-squares
    system is singular or non-finite takes a plain Picard step instead.
    """
    batch, n = x0.shape
    if batch == 0:
        return _empty(x0, options, "anderson")
    rec = _Recorder(x0, options, "anderson")
    m = options.anderson_memory
    beta = options.anderson_beta
    xs = x0.new_zeros(batch, m, n)  # past iterates
    fs = x0.new_zeros(batch, m, n)  # their images
    x = x0
    for k in range(1, options.max_iter + 1):
        fx = fmap(x)
        dist, thr = rec.residuals(fx, x)
        keep = rec.step(k, fx, dist, thr)
        if keep is None:
            break
        if keep is not _KEEP_ALL:
            x, fx, fmap = x.index_select(0, keep), fx.index_select(0, keep), fmap.restrict(keep)
            xs, fs = xs.index_select(0, keep), fs.index_select(0, keep)
        slot = (k - 1) % m
        xs[:, slot] = x
        fs[:, slot] = fx
        used = min(k, m)
        if used == 1:
            x = fx
            continue
        g = fs[:, :used] - xs[:, :used]  # residual history (active, used, n)
        gram = torch.bmm(g, g.transpose(1, 2))
        scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(torch.finfo(x.dtype).tiny)
        eye = torch.eye(used, dtype=x.dtype, device=x.device)
        gram = gram + (options.anderson_reg * scale)[:, None, None] * eye
        if gram.dtype not in _NUMPY_FLOATS:  # LAPACK has no LU for (b)float16
            gram = gram.float()
        ones = gram.new_ones(gram.shape[0], used, 1)
        sol, info = torch.linalg.solve_ex(gram, ones)
        alpha = sol[:, :, 0].to(x.dtype)
        alpha = alpha / alpha.sum(dim=1, keepdim=True)
        bad = (info != 0) | ~torch.isfinite(alpha).all(dim=1)
        mixed = torch.bmm(alpha[:, None, :], fs[:, :used])[:, 0]
        if beta != 1.0:
            mixed = beta * mixed + (1.0 - beta) * torch.bmm(alpha[:, None, :], xs[:, :used])[:, 0]
        x = torch.where(bad[:, None], fx, mixed)
    return rec.result()


def anderson_batch(
    fmap: RowMap, x0: torch.Tensor, options: FixedPointOptions
) -> tuple[torch.Tensor, FixedPointStats]:
    r"""Anderson acceleration with mixing coefficients shared by the active samples.

    The batch of independent problems is treated as one stacked problem ``x -> f(x)`` of size
    ``batch * n``. With the last ``m`` images ``f_j`` and residuals ``g_j = f_j - x_j`` (ring buffers
    ``(m, batch, n)``), each step solves the small constrained least-squares problem

        min_alpha ||sum_j alpha_j g_j||_2   s.t.  sum_j alpha_j = 1

    through its ``(m x m)`` Gram matrix ``H_ij = <g_i, g_j>`` (Tikhonov-regularised, solved on the host
    in float64) and steps to ``x = sum_j alpha_j (f_j - (1 - beta) g_j)``.

    Cost per iteration, beyond Picard's ``addmm`` and activation (written straight into the ring
    buffer): one subtraction, one matrix-vector product for the new Gram column, a host solve of size
    ``m`` and one matrix-vector product that mixes the history; no allocation. The Gram diagonal gives
    ``||g||_F`` for free, so the per-sample convergence test (and its host synchronisation) runs only
    once ``||g||_F`` says the batch may have converged: a necessary condition for every sample to meet
    the test, sharpened by the ratio of the worst per-sample residual to ``||g||_F`` seen at the last
    test, and at least every 8 iterations. Stopping stays per sample: converged rows leave the active
    set at a test (``shrink_fraction``) and the history is compacted with them. A singular solve or a residual blow-up restarts the
    history from a plain Picard step.
    """
    batch, n = x0.shape
    if batch == 0:
        return _empty(x0, options, "anderson_batch")
    rec = _Recorder(x0, options, "anderson_batch")
    m, beta, reg, max_iter = (
        options.anderson_memory,
        options.anderson_beta,
        options.anderson_reg,
        options.max_iter,
    )
    hist = _AndersonHistory(m, fmap.offset)
    solver = _AndersonCoefficients(m, reg, fmap.offset)
    bound = _gram_bound(options, batch, n)
    used = slot = 0
    best = math.inf
    per_norm: float | None = None  # worst test ratio per unit of ||g||_F at the last failed test
    last_test = 0
    x = x0
    for k in range(1, max_iter + 1):
        f = fmap.apply_into(x, hist.f[slot])
        g = torch.sub(f, x, out=hist.g[slot])
        used = min(used + 1, m)
        norm_g = solver.add_column(slot, used, torch.mv(hist.g_rows[used], hist.g_flat[slot]))
        # the cheap prediction first: bound(f) costs a norm of f and a host sync when tol > 0
        may_be_done = (per_norm is None or per_norm * norm_g <= 2.0) and norm_g <= bound(f)
        due = k - last_test >= _ANDERSON_TEST_EVERY  # lets early samples leave while others go on
        if may_be_done or due or k == 1 or k == max_iter or not math.isfinite(norm_g):
            last_test = k
            dist, thr = rec.residuals(f, x, diff=g)
            keep = rec.step(k, f, dist, thr)
            if keep is None:
                break
            if k > 1:  # the first residuals say little about the shape of later ones
                per_norm = rec.worst / norm_g if norm_g > 0 else None
            if keep is not _KEEP_ALL:
                fmap = fmap.restrict(keep)
                hist = hist.restrict(keep)
                solver.reset_gram(hist.g_rows[used])
                bound = _gram_bound(options, keep.numel(), n)
                per_norm, best = None, math.inf
                f = hist.f[slot]
                norm_g = solver.norm(slot)
        if norm_g > 1e3 * best or not math.isfinite(norm_g):  # the extrapolation diverges: restart
            x = hist.x.copy_(f)
            used = slot = 0
            best = math.inf
            continue
        best = min(best, norm_g)
        a = solver.solve(used) if used > 1 else None
        if a is None:  # a Picard step (first step, or a singular solve: the history restarts)
            x = hist.x.copy_(f)
            if used > 1:
                used = slot = 0
                continue
        else:  # the valid history is always slots [0, used): restarts reset slot to 0
            x = hist.mix(used, a, beta)
        slot = (slot + 1) % m
    return rec.result()


_NUMPY_FLOATS = (torch.float32, torch.float64)  # the dtypes numpy and LAPACK take as they are

_ANDERSON_TEST_EVERY = 8  # batch Anderson: per-sample test at least this often (about 1/20 of the work)


class _AndersonHistory:
    """Ring buffers of images ``f_j`` and residuals ``g_j`` (``(m, batch, n)`` each) for
    :func:`anderson_batch`, with the views one iteration needs made once (a view costs a few us)."""

    def __init__(
        self, m: int, like: torch.Tensor, fbuf: torch.Tensor | None = None, gbuf: torch.Tensor | None = None
    ) -> None:
        self.m = m
        self.fbuf = like.new_empty(m, *like.shape) if fbuf is None else fbuf
        self.gbuf = like.new_empty(m, *like.shape) if gbuf is None else gbuf
        self.x = like.new_empty(like.shape)  # the mixed iterate
        self.x_flat = self.x.view(-1)
        f_flat, g_flat = self.fbuf.view(m, -1), self.gbuf.view(m, -1)
        self.f, self.g = list(self.fbuf.unbind(0)), list(self.gbuf.unbind(0))
        self.g_flat = list(g_flat.unbind(0))
        self.g_rows = [g_flat[:u] for u in range(m + 1)]  # (used, batch * n)
        self.f_cols = [f_flat[:u].t() for u in range(m + 1)]  # (batch * n, used)
        self.g_cols = [g_flat[:u].t() for u in range(m + 1)]

    def restrict(self, keep: torch.Tensor) -> _AndersonHistory:
        """The history of the rows ``keep`` (int64 indices) only."""
        return _AndersonHistory(
            self.m,
            self.x.index_select(0, keep),
            self.fbuf.index_select(1, keep),
            self.gbuf.index_select(1, keep),
        )

    def mix(self, used: int, a: torch.Tensor, beta: float) -> torch.Tensor:
        """``x = sum_j a_j (f_j - (1 - beta) g_j)`` over the first ``used`` slots, into ``self.x``."""
        torch.mv(self.f_cols[used], a, out=self.x_flat)
        if beta != 1.0:
            self.x_flat.add_(torch.mv(self.g_cols[used], a), alpha=-(1.0 - beta))
        return self.x


class _AndersonCoefficients:
    """The Gram matrix ``H_ij = <g_i, g_j>`` (float64, on the host) and Anderson's mixing weights:
    ``min ||sum_j alpha_j g_j|| s.t. sum_j alpha_j = 1``, i.e. ``alpha = H^-1 1 / (1^T H^-1 1)``, with
    ``H`` regularised by ``reg`` times its mean diagonal. Small numpy/LAPACK calls cost a few us each on
    the CPU, so this keeps to a handful of them per iteration."""

    def __init__(self, m: int, reg: float, like: torch.Tensor) -> None:
        self.gram = np.zeros((m, m))
        self.diag = [0.0] * m
        self.reg = reg
        self.eye = np.eye(m)
        self.ones = [np.ones(u) for u in range(m + 1)]
        # host values in the solve's dtype where numpy has it (not bfloat16/float16: float64 there)
        self.host_dtype = like.dtype if like.dtype in _NUMPY_FLOATS else torch.float64
        self.alpha = torch.empty(m, dtype=self.host_dtype)  # filled on the host, then moved
        self.alpha_np = self.alpha.numpy()
        self.target = (
            None if like.device.type == "cpu" and self.host_dtype == like.dtype else (like.device, like.dtype)
        )

    def add_column(self, slot: int, used: int, column: torch.Tensor) -> float:
        """Store ``<g_j, g_slot>`` for the first ``used`` slots; return ``||g_slot||_2``."""
        col = column.to(device="cpu", dtype=self.host_dtype).numpy()  # no copy on the CPU in float32/64
        self.gram[slot, :used] = col
        self.gram[:used, slot] = col
        self.diag[slot] = value = float(col[slot])
        return math.sqrt(value) if value > 0 else (0.0 if value == 0 else math.nan)

    def norm(self, slot: int) -> float:
        return math.sqrt(max(self.diag[slot], 0.0))

    def reset_gram(self, g_rows: torch.Tensor) -> None:
        """Recompute the Gram matrix of the first ``len(g_rows)`` slots from their residual rows (after
        compaction; the other slots hold no history yet)."""
        used = g_rows.shape[0]
        self.gram[:used, :used] = (g_rows @ g_rows.t()).double().cpu().numpy()
        self.diag[:used] = self.gram.diagonal()[:used].tolist()

    def solve(self, used: int) -> torch.Tensor | None:
        """The mixing weights over the first ``used`` slots (a tensor on the device), or None when the
        regularised system is singular or the weights are not finite."""
        lam = self.reg * max(sum(self.diag[:used]) / used, 1e-300)
        H = self.gram[:used, :used] + lam * self.eye[:used, :used]
        _, _, alpha, info = _dgesv()(H.T, self.ones[used])  # H is symmetric: H.T is Fortran-ordered
        total = float(alpha.sum())
        if info != 0 or total == 0 or not math.isfinite(total):
            return None
        np.divide(alpha, total, out=self.alpha_np[:used], casting="unsafe")
        a = self.alpha[:used]
        return a if self.target is None else a.to(*self.target)


@functools.cache
def _dgesv() -> Callable[..., tuple[Any, Any, np.ndarray, int]]:
    """LAPACK ``dgesv`` (LU solve of ``H x = b``): 2-3 us for m = 5, against 15 us for numpy's solve."""
    from scipy.linalg.lapack import dgesv

    return dgesv


def _gram_bound(options: FixedPointOptions, batch: int, n: int) -> Callable[[torch.Tensor], float]:
    r"""``f -> b`` with ``||g||_F > b`` implying that some sample fails the stopping test.

    Per sample the test is ``||g_i|| <= t_i = atol + tol ||f_i||``. For the 2-norm, Minkowski gives
    ``||g||_F <= ||t||_2 <= sqrt(batch) atol + tol ||f||_F`` when every sample passes; for the max-norm,
    ``||g_i||_2 <= sqrt(n) ||g_i||_inf`` and ``||f_i||_inf <= ||f_i||_2`` add a factor ``sqrt(n)``.
    """
    o = options
    factor = math.sqrt(n) if o.norm == "inf" else 1.0
    base = factor * math.sqrt(batch) * o.atol
    if o.tol == 0:
        return lambda f: base
    rel = factor * o.tol
    return lambda f: base + rel * float(torch.linalg.vector_norm(f))


FixedPointMethod = Callable[[RowMap, torch.Tensor, FixedPointOptions], "tuple[torch.Tensor, FixedPointStats]"]

FIXED_POINT_METHODS: dict[str, FixedPointMethod] = {
    "picard": picard,
    "anderson": anderson,
    "anderson_batch": anderson_batch,
}


def register_fixed_point_method(name: str, method: FixedPointMethod, *, overwrite: bool = False) -> None:
    """Register ``method(fmap, x0, options) -> (x, stats)`` under ``name`` for every solve to use."""
    if not isinstance(name, str) or not name:
        raise bad_parameter("name", "register_fixed_point_method", "a non-empty string", name)
    if name in FIXED_POINT_METHODS and not overwrite:
        raise ConfigError(
            f"A fixed-point method named {name!r} exists already; pass overwrite=True to replace it."
        )
    if not callable(method):
        raise bad_parameter("method", "register_fixed_point_method", "a callable", method)
    FIXED_POINT_METHODS[name] = method


def _warn(stats: FixedPointStats, what: str, stacklevel: int) -> None:
    warnings.warn(
        f"{what} did not converge: {stats.num_samples - stats.num_converged} of {stats.num_samples} "
        f"sample(s) stopped at max_iter={stats.max_iter} with relative residual up to "
        f"{stats.max_residual:.3g} (absolute {stats.max_abs_residual:.3g}) above tol={stats.tol:g}, "
        f"atol={stats.atol:g} (method {stats.method!r}). Try a larger max_iter, "
        "fixed_point='anderson', a looser tol, or a smaller kappa.",
        ConvergenceWarning,
        stacklevel=stacklevel,
    )


def _check_square(A: torch.Tensor, owner: str) -> int:
    if A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise ShapeError(
            f"The 'A' argument of {owner} must be a square (n, n) matrix. Got shape {tuple(A.shape)}."
        )
    return A.shape[0]


def _check_rows(t: torch.Tensor, name: str, shape: tuple[int, ...], owner: str) -> None:
    if tuple(t.shape) != shape:
        raise ShapeError(
            f"The '{name}' argument of {owner} must have shape {shape} (batch, n). Got {tuple(t.shape)}."
        )


_MAGNITUDE_MARGIN = 16.0  # iterates may grow past the first one by up to 1 / (1 - kappa)


def _check_magnitude(X: torch.Tensor, options: FixedPointOptions, what: str, owner: str) -> None:
    """Refuse states whose size makes the stopping test overflow (one reduction per solve).

    The test compares ``||f(x) - x||`` with ``atol + tol ||f(x)||``; in float32 the 2-norm of a row
    with entries near 1e19 overflows (its squares pass 3.4e38), the threshold becomes Inf and any
    iterate would pass as converged. States past the limit (or infinite) are an error instead of a
    wrong "converged"; NaN rows are left to the per-sample test, which reports them as not converged.
    """
    if X.numel() == 0 or not X.is_floating_point():
        return
    big = torch.finfo(X.dtype).max
    n = max(X.shape[-1], 1)
    limit = (math.sqrt(big / n) if options.norm == "l2" else big) / _MAGNITUDE_MARGIN
    low, high = torch.aminmax(X.detach())  # one kernel, one host synchronisation, no copy of X
    low_value, high_value = torch.stack([low, high]).tolist()
    largest = max(-low_value, high_value)
    if largest <= limit:  # False for NaN
        return
    if math.isnan(largest):
        # a NaN row (NaN input) is reported as not converged by the solve itself; Inf is overflow
        largest = float(torch.nan_to_num(X.detach().abs(), nan=0.0, posinf=math.inf).max())
        if largest <= limit:
            return
    raise ConfigError(
        f"{owner}: {what} has entries up to {largest:.3g}, beyond what {X.dtype} can test for "
        f"convergence (below {limit:.3g} with norm={options.norm!r} and {n} states per sample: the "
        "residual norms would overflow and the stopping test would be meaningless). Scale the inputs "
        "(e.g. standardise the features), use float64"
        + (", or norm='inf'" if options.norm == "l2" else "")
        + "."
    )


def solve_fixed_point(
    A: torch.Tensor,
    BU: torch.Tensor,
    activation: Any = "relu",
    options: FixedPointOptions | dict[str, Any] | None = None,
    *,
    x0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, FixedPointStats]:
    r"""Solve ``X = phi(X A^T + BU)`` row by row (no autograd graph is built).

    Parameters
    ----------
    A : Tensor, shape (n, n)
        Should satisfy ``||A||_inf <= kappa < 1`` (not checked here; see :class:`ImplicitModel`).
    BU : Tensor, shape (batch, n)
        The input term ``U B^T`` (plus nothing else; a bias is a constant column of ``U``).
    activation : str, Activation or (phi, dphi)
        See :func:`~idl_ray.implicit.activations.resolve_activation`.
    options : FixedPointOptions or dict, optional
    x0 : Tensor, shape (batch, n), optional
        Warm start. When omitted the solve starts from ``phi(BU)``, the first iterate from zero, which
        costs no matmul and is not counted in ``stats.iterations`` (the adjoint likewise starts from
        ``J * G``): each counted iteration is one evaluation of the map.

    Returns
    -------
    X : Tensor, shape (batch, n)
    stats : FixedPointStats

    Examples
    --------
    >>> import torch
    >>> A = torch.full((3, 3), 0.2); BU = torch.randn(4, 3)
    >>> X, stats = solve_fixed_point(A, BU, "relu", {"tol": 1e-8})
    >>> bool(torch.allclose(X, torch.relu(X @ A.T + BU), atol=1e-6)), stats.all_converged
    (True, True)
    """
    owner = "solve_fixed_point"
    act = activation if isinstance(activation, Activation) else resolve_activation(activation, owner=owner)
    # f(0) = phi(BU) is the first iterate, without the product with A
    return run_forward(owner, A, BU, options, x0, lambda A_: (RowMap(A_.t(), BU.detach(), act.fn), act.fn))


def run_forward(
    owner: str,
    A: torch.Tensor,
    BU: torch.Tensor,
    options: FixedPointOptions | dict[str, Any] | None,
    x0: torch.Tensor | None,
    build: Callable[[torch.Tensor], tuple[RowMap, Callable[[torch.Tensor], torch.Tensor]]],
    label: str = "",
) -> tuple[torch.Tensor, FixedPointStats]:
    """The checks and the run every forward solve shares: ``build(A) -> (map, first)`` gives the row map
    to iterate and the function whose value at BU is the first iterate (a splitting of A, as under
    mu_inf, builds another map); ``label`` names the iteration in the warning."""
    opts = FixedPointOptions.coerce(options)
    n = _check_square(A, owner)
    if BU.dim() != 2 or BU.shape[1] != n:
        raise ShapeError(f"The 'BU' argument of {owner} must have shape (batch, {n}). Got {tuple(BU.shape)}.")
    if x0 is not None:
        _check_rows(x0, "x0", tuple(BU.shape), owner)
    with torch.no_grad():
        fmap, first = build(A.detach())
        if x0 is None:
            # on a copy, since a user's phi may work in place and BU must stay intact
            x0 = first(BU.detach().clone())
        X, stats = FIXED_POINT_METHODS[opts.method](fmap, x0.detach().to(BU.dtype), opts)
        # after the solve, once (the iterations stay free of it): with an overflowing test the "converged"
        # above may be false, and it is refused here
        _check_magnitude(X, opts, "the state X", owner)
    if opts.warn and not stats.all_converged:
        _warn(stats, f"The fixed-point solve X = phi(X A^T + BU){label}", stacklevel=4)
    return X, stats


def solve_adjoint(
    A: torch.Tensor,
    J: torch.Tensor,
    G: torch.Tensor,
    options: FixedPointOptions | dict[str, Any] | None = None,
    *,
    v0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, FixedPointStats]:
    r"""Solve the adjoint equation ``V = J * (V A + G)`` row by row.

    With ``Z = X A^T + BU`` at the fixed point, ``J = phi'(Z)`` and ``G = dL/dX``, ``V = dL/dZ`` and
    ``dL/dA = V^T X``, ``dL/dB = V^T U``, ``dL/d(BU) = V`` (batch-first form of DESIGN.md's
    ``V = J (A^T V) + J G``). It contracts under the same bound as the forward problem.

    Parameters
    ----------
    A : Tensor (n, n); J, G : Tensors (batch, n); options : FixedPointOptions or dict
    v0 : Tensor (batch, n), optional
        Start; ``J * G`` (the first Picard iterate from zero) when omitted.

    Returns
    -------
    V : Tensor (batch, n)
    stats : FixedPointStats
    """
    owner = "solve_adjoint"
    return run_adjoint(owner, A, J, G, options, v0, lambda A_, J_: (RowMap(A_, G.detach(), None, J_), J_))


def run_adjoint(
    owner: str,
    A: torch.Tensor,
    J: torch.Tensor,
    G: torch.Tensor,
    options: FixedPointOptions | dict[str, Any] | None,
    v0: torch.Tensor | None,
    build: Callable[[torch.Tensor, torch.Tensor], tuple[RowMap, torch.Tensor]],
    label: str = "",
) -> tuple[torch.Tensor, FixedPointStats]:
    """The checks and the run every adjoint solve shares: ``build(A, J) -> (map, S)`` gives the row map
    ``V -> S * (V M + G)`` and the scaling S whose ``S * G`` is the default start; ``label`` names the
    iteration in the warning."""
    opts = FixedPointOptions.coerce(options)
    n = _check_square(A, owner)
    if G.dim() != 2 or G.shape[1] != n:
        raise ShapeError(f"The 'G' argument of {owner} must have shape (batch, {n}). Got {tuple(G.shape)}.")
    _check_rows(J, "J", tuple(G.shape), owner)
    with torch.no_grad():
        fmap, S = build(A.detach(), J.detach())
        if v0 is None:
            v0 = S * G
        else:
            _check_rows(v0, "v0", tuple(G.shape), owner)
        V, stats = FIXED_POINT_METHODS[opts.method](fmap, v0, opts)
    if opts.warn and not stats.all_converged:
        _warn(stats, f"The adjoint (backward) solve V = J * (V A + G){label}", stacklevel=4)
    return V, stats
