"""One SIM stage in solver form: the Gram of the features, the targets, and the regularisation.

A SIM stage fits the rows of W (rows x d) to targets T (rows x m) from features Phi = [X; U] (d x m)::

    minimise_W  f(W) = 1/(2m) ||T - W Phi||_F^2 + lam ||W||_1 + l2/2 ||W||_F^2
    subject to  ||W[i, :n_constrained]||_1 <= kappa      for every row i   (when kappa is not None)

Stage 1 has T = Z, W = [A B], n_constrained = n; stage 2 has T = Y, W = [C D], n_constrained = 0.
The loss is averaged over the m samples, so ``lam`` means the same thing whatever the number of samples
(as in scikit-learn's Lasso). Everything data-dependent is in

    G = Phi Phi^T (d x d),  Rt = T Phi^T (rows x d),  ||t_i||^2 (rows),  m,

which are sums over samples. :class:`GramStats` holds these sums, is filled batch by batch (never holding
Phi) and adds across shards; :class:`SIMProblem` is the stats plus the settings. Every solver takes a
``SIMProblem``, so solvers are interchangeable and comparable through :meth:`SIMProblem.objective`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from idl_ray._validation import bad_parameter, check_finite, check_kappa, check_positive_float
from idl_ray.errors import ConfigError, ShapeError

if TYPE_CHECKING:
    from idl_ray.sim.solvers.certificate import DualityGap

__all__ = ["CONSTRAINTS", "VARIANTS", "GramStats", "SIMProblem", "SampleData", "as_tensor"]

#: The bounds a stage-1 problem can put on the A-part of each row w of [A B]: ``"inf_norm"``,
#: ``||w[:n]||_1 <= kappa`` (so ||A||_inf <= kappa), or ``"mu_inf"``, ``w_d + sum_{j<n, j!=d} |w_j| <= kappa``
#: with d the row's diagonal column (so mu_inf(A) <= kappa).
CONSTRAINTS = ("inf_norm", "mu_inf")

#: The problem variants: l1 (lasso), l1 + l2 (elastic net), exact state matching (W Phi = T as equality
#: constraints, l1 objective), and unconstrained, unregularised least squares.
VARIANTS = ("lasso", "elastic_net", "exact", "least_squares")

_ACC_DTYPE = torch.float64


def as_tensor(value: Any, name: str, owner: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor from a tensor or array-like (numpy arrays are not copied when the dtype matches)."""
    if isinstance(value, torch.Tensor):
        tensor = value
    elif isinstance(value, np.ndarray):
        tensor = torch.from_numpy(value)
    else:
        try:
            tensor = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(
                f"The '{name}' argument of {owner} must be a tensor or array. Got {type(value).__name__}."
            ) from exc
    if dtype is not None:
        tensor = tensor.to(dtype)
    return tensor


@dataclasses.dataclass
class GramStats:
    """Additive sufficient statistics of one stage: G = Phi Phi^T, Rt = T Phi^T, ||t_i||^2, m.

    All sums are float64 (accumulated batch by batch, so float32 states lose nothing to the sum).
    Shards computed on different workers add with ``+`` or :meth:`merge`.

    Attributes
    ----------
    G : Tensor, shape (d, d)
    Rt : Tensor, shape (rows, d)
    target_sq : Tensor, shape (rows,), the per-row sum of squares of the targets
    num_samples : int
    """

    G: torch.Tensor
    Rt: torch.Tensor
    target_sq: torch.Tensor
    num_samples: int = 0

    @classmethod
    def zeros(cls, d: int, rows: int, *, device: torch.device | str | None = None) -> GramStats:
        """Empty statistics for ``d`` features and ``rows`` targets."""
        return cls(
            G=torch.zeros(d, d, dtype=_ACC_DTYPE, device=device),
            Rt=torch.zeros(rows, d, dtype=_ACC_DTYPE, device=device),
            target_sq=torch.zeros(rows, dtype=_ACC_DTYPE, device=device),
            num_samples=0,
        )

    @classmethod
    def from_batch(cls, features: Any, targets: Any) -> GramStats:
        """Statistics of one batch (batch-first: features (b, d), targets (b, rows))."""
        F, T = _check_batch(features, targets, "GramStats.from_batch")
        stats = cls.zeros(F.shape[1], T.shape[1], device=F.device)
        stats._add_checked(F, T)
        return stats

    @classmethod
    def accumulate(cls, stats: GramStats | None, features: Any, targets: Any) -> GramStats:
        """``stats`` with one more batch added in place, or the batch's own statistics when ``stats`` is
        None (the first batch of a stream)."""
        return cls.from_batch(features, targets) if stats is None else stats.add(features, targets)

    @property
    def dim(self) -> int:
        return self.G.shape[0]

    @property
    def rows(self) -> int:
        return self.Rt.shape[0]

    def add(self, features: Any, targets: Any) -> GramStats:
        """Accumulate one batch in place (batch-first: features (b, d), targets (b, rows)); returns self."""
        F, T = _check_batch(features, targets, "GramStats.add")
        if F.shape[1] != self.dim or T.shape[1] != self.rows:
            raise ShapeError(
                f"GramStats.add got a batch with {F.shape[1]} features and {T.shape[1]} targets; these "
                f"statistics hold {self.dim} features and {self.rows} targets."
            )
        self._add_checked(F, T)
        return self

    def _add_checked(self, F: torch.Tensor, T: torch.Tensor) -> None:
        F = F.to(device=self.G.device, dtype=_ACC_DTYPE)
        T = T.to(device=self.G.device, dtype=_ACC_DTYPE)
        self.G.addmm_(F.T, F)
        self.Rt.addmm_(T.T, F)
        self.target_sq.add_((T * T).sum(dim=0))
        self.num_samples += F.shape[0]

    def merge(self, other: GramStats) -> GramStats:
        """The sum of two shards' statistics (a new object)."""
        if not isinstance(other, GramStats):
            return NotImplemented
        if other.G.shape != self.G.shape or other.Rt.shape != self.Rt.shape:
            raise ShapeError(
                f"Cannot merge GramStats with G {tuple(self.G.shape)}, Rt {tuple(self.Rt.shape)} and "
                f"G {tuple(other.G.shape)}, Rt {tuple(other.Rt.shape)}."
            )
        device = self.G.device
        return GramStats(
            G=self.G + other.G.to(device),
            Rt=self.Rt + other.Rt.to(device),
            target_sq=self.target_sq + other.target_sq.to(device),
            num_samples=self.num_samples + other.num_samples,
        )

    __add__ = merge

    @classmethod
    def sum(cls, parts: Iterable[GramStats]) -> GramStats:
        """The sum of several shards' statistics."""
        parts = list(parts)
        if not parts:
            raise ConfigError("GramStats.sum needs at least one shard; got none.")
        total = parts[0]
        for part in parts[1:]:
            total = total.merge(part)
        return total

    def with_targets(self, Rt: torch.Tensor, target_sq: torch.Tensor) -> GramStats:
        """The same G with other targets (stage 1 and stage 2 share G = Phi Phi^T)."""
        return GramStats(G=self.G, Rt=Rt, target_sq=target_sq, num_samples=self.num_samples)

    def row_block(self, index: slice) -> GramStats:
        """The statistics of a block of target rows (same G); for sharding rows across workers."""
        return GramStats(
            G=self.G, Rt=self.Rt[index], target_sq=self.target_sq[index], num_samples=self.num_samples
        )

    def to(self, device: torch.device | str | None) -> GramStats:
        return GramStats(
            G=self.G.to(device),
            Rt=self.Rt.to(device),
            target_sq=self.target_sq.to(device),
            num_samples=self.num_samples,
        )


@dataclasses.dataclass
class SampleData:
    """The raw samples of a stage, batch-first, for sample-based solvers (CVX, exact matching, consensus).

    Attributes
    ----------
    features : Tensor, shape (m, d), Phi^T
    targets : Tensor, shape (m, rows), T^T
    """

    features: torch.Tensor
    targets: torch.Tensor

    def __post_init__(self) -> None:
        self.features, self.targets = _check_batch(self.features, self.targets, "SampleData")

    def row_block(self, index: slice) -> SampleData:
        return SampleData(features=self.features, targets=self.targets[:, index])


def _check_batch(features: Any, targets: Any, owner: str) -> tuple[torch.Tensor, torch.Tensor]:
    F = as_tensor(features, "features", owner)
    T = as_tensor(targets, "targets", owner)
    if F.dim() != 2 or T.dim() != 2:
        raise ShapeError(
            f"{owner} expects batch-first 2-D features (b, d) and targets (b, rows). "
            f"Got shapes {tuple(F.shape)} and {tuple(T.shape)}."
        )
    if F.shape[0] != T.shape[0]:
        raise ShapeError(
            f"{owner} got {F.shape[0]} feature rows but {T.shape[0]} target rows; they must be the same "
            "samples (batch-first)."
        )
    if not F.is_floating_point():
        F = F.to(torch.float32)
    if not T.is_floating_point():
        T = T.to(torch.float32)
    check_finite(F, "features", owner)
    check_finite(T, "targets", owner)
    return F, T


@dataclasses.dataclass
class SIMProblem:
    """One SIM stage in solver form (see the module docstring for the objective).

    Parameters
    ----------
    stats : GramStats
        G (d x d), Rt (rows x d), per-row target sum of squares, number of samples m (> 0).
    n_constrained : int
        Leading columns of W under the kappa bound: n for stage 1 ([A B]), 0 for stage 2 ([C D]).
    lam : float >= 0
        l1 weight.
    l2 : float >= 0
        l2 weight (elastic net); must be > 0 for ``variant="elastic_net"``, 0 for ``"lasso"``.
    kappa : float in [0, 1) or None
        The bound ``||W[i, :n_constrained]||_1 <= kappa``; None = unconstrained.
    variant : str
        One of :data:`VARIANTS`. ``"least_squares"`` ignores lam, l2 and kappa (they must be 0/None);
        ``"exact"`` imposes W Phi = T and minimises the regulariser (needs ``samples``).
    samples : SampleData or None
        Optional raw samples for solvers that work on samples rather than on G.
    l1_weights : Tensor broadcastable to (rows, d), or None
        Per-entry l1 weights w_ij in [0, inf] (float64): the penalty becomes ``lam sum_ij w_ij |W_ij|``.
        None means all ones (the plain lasso). ``w_ij = inf`` holds ``W_ij = 0`` exactly for every lam,
        lam = 0 included (the effective threshold is :attr:`thresholds`). Stored expanded to (rows, d).
        Every solver honours them or raises a ConfigError naming itself and ``l1_weights``.
    constraint : {"inf_norm", "mu_inf"}
        The kappa bound on each row's constrained part: ``||w[:n]||_1 <= kappa`` (default) or, for stage 1,
        ``w_d + sum_{j < n, j != d} |w_j| <= kappa`` with ``d = row_offset + i`` for row ``i`` (the
        diagonal of A), i.e. ``mu_inf(A) <= kappa`` (:mod:`~idl_ray.implicit.mu_projection`).
    row_offset : int >= 0
        With ``"mu_inf"``: the diagonal column of row 0 (a block of rows of a larger stage-1 problem
        starts at its first row's index; :meth:`row_block` sets it).

    Attributes
    ----------
    G, Rt, target_sq, num_samples : views of ``stats``
    dim : int, d = n + p (features)
    rows : int, number of target rows

    Examples
    --------
    >>> import torch
    >>> Phi = torch.randn(100, 5); T = torch.randn(100, 2)
    >>> problem = SIMProblem.from_samples(Phi, T, n_constrained=3, lam=0.01, kappa=0.9)
    >>> problem.dim, problem.rows, problem.num_samples
    (5, 2, 100)
    """

    stats: GramStats
    n_constrained: int = 0
    lam: float = 0.0
    l2: float = 0.0
    kappa: float | None = None
    variant: str = "lasso"
    samples: SampleData | None = None
    l1_weights: torch.Tensor | None = None
    constraint: str = "inf_norm"
    row_offset: int = 0

    def __post_init__(self) -> None:
        owner = "SIMProblem"
        if not isinstance(self.stats, GramStats):
            raise bad_parameter("stats", owner, "a GramStats", type(self.stats).__name__)
        G, Rt = self.stats.G, self.stats.Rt
        if G.dim() != 2 or G.shape[0] != G.shape[1] or Rt.dim() != 2 or Rt.shape[1] != G.shape[0]:
            raise ShapeError(
                f"SIMProblem needs G of shape (d, d) and Rt of shape (rows, d). Got G {tuple(G.shape)} "
                f"and Rt {tuple(Rt.shape)}."
            )
        if self.stats.num_samples <= 0:
            raise ConfigError(
                "SIMProblem got no samples (num_samples = 0): the data passed to SIM was empty. "
                "Pass at least one batch of inputs."
            )
        if G.shape[0] == 0 or Rt.shape[0] == 0:
            raise ShapeError(f"SIMProblem needs d >= 1 features and rows >= 1; got G {tuple(G.shape)}.")
        check_finite(G, "G", owner)
        check_finite(Rt, "Rt", owner)
        if self.variant not in VARIANTS:
            raise bad_parameter("variant", owner, f"one of {list(VARIANTS)}", self.variant)
        if (
            isinstance(self.n_constrained, bool)
            or not isinstance(self.n_constrained, int)
            or not 0 <= self.n_constrained <= self.dim
        ):
            raise bad_parameter("n_constrained", owner, f"an int in [0, {self.dim}]", self.n_constrained)
        self.lam = check_positive_float(self.lam, "lam", owner, allow_zero=True)
        self.l2 = check_positive_float(self.l2, "l2", owner, allow_zero=True)
        if self.kappa is not None:
            self.kappa = check_kappa(self.kappa, owner)
        if self.constraint not in CONSTRAINTS:
            raise bad_parameter("constraint", owner, f"one of {list(CONSTRAINTS)}", self.constraint)
        if isinstance(self.row_offset, bool) or not isinstance(self.row_offset, int) or self.row_offset < 0:
            raise bad_parameter("row_offset", owner, "an int >= 0", self.row_offset)
        if (
            self.constraint == "mu_inf"
            and self.constrained
            and self.row_offset + self.rows > self.n_constrained
        ):
            raise ConfigError(
                f"SIMProblem with constraint='mu_inf' needs every row's diagonal column (row_offset + row) "
                f"among the n_constrained = {self.n_constrained} constrained columns; got {self.rows} rows "
                f"from row_offset = {self.row_offset}. It applies to stage 1 ([A B], rows = n)."
            )
        if self.variant == "least_squares" and (self.lam or self.l2 or self.kappa is not None):
            raise ConfigError(
                "SIMProblem variant 'least_squares' is unregularised and unconstrained: lam and l2 must be "
                f"0 and kappa None. Got lam={self.lam}, l2={self.l2}, kappa={self.kappa}. Use 'lasso' or "
                "'elastic_net' for a regularised fit."
            )
        if self.variant == "lasso" and self.l2:
            raise ConfigError(
                f"SIMProblem variant 'lasso' has no l2 term; got l2={self.l2}. Use 'elastic_net'."
            )
        if self.variant == "elastic_net" and not self.l2:
            raise ConfigError("SIMProblem variant 'elastic_net' needs l2 > 0; got l2=0. Use 'lasso' instead.")
        if self.l1_weights is not None:
            self.l1_weights = self._check_l1_weights(self.l1_weights, owner)
        if self.samples is not None:
            if self.samples.features.shape[1] != self.dim or self.samples.targets.shape[1] != self.rows:
                raise ShapeError(
                    f"SIMProblem samples have {self.samples.features.shape[1]} features and "
                    f"{self.samples.targets.shape[1]} targets; the statistics have {self.dim} and {self.rows}."
                )

    def _check_l1_weights(self, weights: Any, owner: str) -> torch.Tensor:
        """The weights as a float64 (rows, d) tensor on G's device; clear errors for bad shapes and values."""
        w = as_tensor(weights, "l1_weights", owner, dtype=_ACC_DTYPE).to(self.G.device)
        try:
            w = torch.broadcast_to(w, (self.rows, self.dim))
        except RuntimeError as exc:
            raise ShapeError(
                f"The 'l1_weights' parameter of {owner} must be broadcastable to (rows, d) = "
                f"({self.rows}, {self.dim}). Got shape {tuple(w.shape)}."
            ) from exc
        if bool(torch.isnan(w).any()):
            raise bad_parameter("l1_weights", owner, "a tensor without NaN", "a tensor with NaN entries")
        if bool((w < 0).any()):
            raise bad_parameter(
                "l1_weights", owner, "a tensor with entries >= 0 (inf allowed)", f"min {float(w.min()):g}"
            )
        if self.variant in ("least_squares", "exact"):
            raise ConfigError(
                f"The 'l1_weights' parameter of {owner} applies to the 'lasso' and 'elastic_net' variants; "
                f"variant {self.variant!r} has no weighted l1 term. Use variant='lasso'."
            )
        return w.contiguous()

    @property
    def thresholds(self) -> float | torch.Tensor:
        """The effective l1 thresholds: ``lam`` (a float) without weights, else the (rows, d) tensor
        ``t_ij = lam w_ij``, with inf wherever ``w_ij = inf`` (also at lam = 0). 0 for least squares."""
        lam = 0.0 if self.variant == "least_squares" else self.lam
        if self.l1_weights is None:
            return lam
        w = self.l1_weights
        return torch.where(torch.isinf(w), w, lam * w)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_samples(
        cls, features: Any, targets: Any, *, keep_samples: bool = False, **settings: Any
    ) -> SIMProblem:
        """Build from batch-first samples: features (m, d) = Phi^T, targets (m, rows) = T^T."""
        stats = GramStats.from_batch(features, targets)
        samples = (
            SampleData(
                features=as_tensor(features, "features", "SIMProblem"),
                targets=as_tensor(targets, "targets", "SIMProblem"),
            )
            if keep_samples
            else None
        )
        return cls(stats=stats, samples=samples, **settings)

    @classmethod
    def from_batches(cls, batches: Iterable[tuple[Any, Any]], **settings: Any) -> SIMProblem:
        """Build by streaming (features, targets) batches (batch-first) into the Gram; Phi is never held."""
        stats: GramStats | None = None
        for features, targets in batches:
            stats = GramStats.accumulate(stats, features, targets)
        if stats is None:
            raise ConfigError("SIMProblem.from_batches got no batches: the data was empty.")
        return cls(stats=stats, **settings)

    @classmethod
    def combine(cls, shards: Iterable[GramStats | SIMProblem], **settings: Any) -> SIMProblem:
        """Add the statistics of sample shards (e.g. one per Ray actor) into one problem."""
        parts = [s.stats if isinstance(s, SIMProblem) else s for s in shards]
        return cls(stats=GramStats.sum(parts), **settings)

    def replace(self, **changes: Any) -> SIMProblem:
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def row_block(self, index: slice) -> SIMProblem:
        """The sub-problem of a block of target rows (rows are independent given G)."""
        samples = None if self.samples is None else self.samples.row_block(index)
        weights = None if self.l1_weights is None else self.l1_weights[index]
        offset = self.row_offset + (index.indices(self.rows)[0] if self.constraint == "mu_inf" else 0)
        return dataclasses.replace(
            self, stats=self.stats.row_block(index), samples=samples, l1_weights=weights, row_offset=offset
        )

    # ----------------------------------------------------------------- views
    @property
    def G(self) -> torch.Tensor:
        return self.stats.G

    @property
    def Rt(self) -> torch.Tensor:
        return self.stats.Rt

    @property
    def target_sq(self) -> torch.Tensor:
        return self.stats.target_sq

    @property
    def num_samples(self) -> int:
        return self.stats.num_samples

    @property
    def dim(self) -> int:
        return self.stats.dim

    @property
    def rows(self) -> int:
        return self.stats.rows

    @property
    def constrained(self) -> bool:
        """Whether the kappa bound applies (kappa set and some columns constrained)."""
        return self.kappa is not None and self.n_constrained > 0

    @property
    def mu_constrained(self) -> bool:
        """Whether the bound is the ``mu_inf`` row constraint (and applies)."""
        return self.constrained and self.constraint == "mu_inf"

    def diagonal_columns(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The diagonal column of each row (``row_offset + i``), int64, shape (rows,)."""
        return torch.arange(self.rows, device=device) + self.row_offset

    def constraint_settings(self, device: torch.device | str | None = None) -> dict[str, Any]:
        """Keywords the kernels take for the ``mu_inf`` constraint (``condition``, ``diagonal``); empty
        for ``inf_norm``, so the l1-ball code paths see exactly what they saw before."""
        if not self.mu_constrained:
            return {}
        return {"condition": "mu_inf", "diagonal": self.diagonal_columns(device)}

    def project_onto_bound(self, W: torch.Tensor) -> torch.Tensor:
        """W (rows x d) with each row's constrained part projected onto the bound (the l1 ball of radius
        kappa, or the mu_inf set): a no-op for feasible rows, used to make a solver's answer exact after
        rounding. Unconstrained problems return W unchanged."""
        if not self.constrained:
            return W
        nc = self.n_constrained
        if self.mu_constrained:
            from idl_ray.implicit.mu_projection import prox_mu_rows

            return prox_mu_rows(W, float(self.kappa), nc, diagonal=self.diagonal_columns(W.device))
        from idl_ray.implicit.projection import project_rows_onto_l1_ball

        W = W.clone()
        W[:, :nc] = project_rows_onto_l1_ball(W[:, :nc], float(self.kappa))
        return W

    def _row_bound_values(self, Wt: torch.Tensor) -> torch.Tensor:
        """Per-row value of the bounded quantity (l1 norm or mu row value) of the constrained part."""
        block = Wt[:, : self.n_constrained]
        if self.constraint != "mu_inf":
            return block.abs().sum(dim=1)
        from idl_ray.implicit.mu_projection import mu_inf_rows

        return mu_inf_rows(block, self.n_constrained, diagonal=self.diagonal_columns(Wt.device))

    def scaled(
        self, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(G/m + l2 I, Rt/m): the quadratic part in the form ``1/2 tr(W H W^T) - tr(W Rt^T)``."""
        m = float(self.num_samples)
        H = self.G / m
        if self.l2:
            H = H + self.l2 * torch.eye(self.dim, dtype=H.dtype, device=H.device)
        return H.to(device=device, dtype=dtype), (self.Rt / m).to(device=device, dtype=dtype)

    # ----------------------------------------------------------------- evaluation
    def _weights(self, W: Any) -> torch.Tensor:
        Wt = as_tensor(W, "W", "SIMProblem", dtype=_ACC_DTYPE).to(self.G.device)
        if Wt.shape != (self.rows, self.dim):
            raise ShapeError(
                f"SIMProblem expects weights of shape (rows, d) = ({self.rows}, {self.dim}). "
                f"Got {tuple(Wt.shape)}."
            )
        return Wt

    def row_objectives(self, W: Any) -> torch.Tensor:
        """The objective of each row (float64, shape (rows,)); the regulariser follows ``variant``."""
        Wt = self._weights(W)
        m = float(self.num_samples)
        quad = ((Wt @ self.G) * Wt).sum(dim=1) - 2.0 * (Wt * self.Rt).sum(dim=1) + self.target_sq
        # the residual sum of squares is >= 0; rounding of the expansion can make it slightly negative
        value = 0.5 * quad.clamp_min(0) / m
        if self.variant != "least_squares":
            from idl_ray.sim.solvers.weights import l1_term

            value = value + l1_term(Wt, self.thresholds) + 0.5 * self.l2 * (Wt * Wt).sum(dim=1)
        return value

    def objective(self, W: Any) -> float:
        """f(W) = 1/(2m) ||T - W Phi||^2 + lam ||W||_1 + l2/2 ||W||^2 (float64, summed over rows)."""
        return float(self.row_objectives(W).sum())

    def duality_gap(self, W: Any, dual_point: Any = None) -> DualityGap | None:
        """Per-row primal values and dual bounds of W (:mod:`~idl_ray.sim.solvers.certificate`); their
        difference bounds ``objective(W) - optimum``. ``dual_point`` (rows x d, optional): other weights whose
        residual gives a second dual point (see :func:`~idl_ray.sim.solvers.certificate.duality_gap`). None for the ``"exact"`` variant (equality
        constraints, no such certificate) and for an infeasible W."""
        if self.variant == "exact" or self.constraint_violation(W) > 0:
            return None
        from idl_ray.sim.solvers.certificate import duality_gap

        Wt = self._weights(W)
        H, R = self.scaled(device=Wt.device)
        settings = {
            "lam": self.thresholds,
            "kappa": self.kappa,
            "n_constrained": self.n_constrained,
            **self.constraint_settings(Wt.device),
        }
        target_sq = self.target_sq.to(Wt.device) / self.num_samples
        other = None if dual_point is None else self._weights(dual_point)
        return duality_gap(Wt, H, R, target_sq, dual_point=other, **settings)

    def residual(self, W: Any) -> float:
        """The mean squared fitting error 1/m ||T - W Phi||_F^2 (no regulariser)."""
        Wt = self._weights(W)
        quad = ((Wt @ self.G) * Wt).sum() - 2.0 * (Wt * self.Rt).sum() + self.target_sq.sum()
        return float(quad.clamp_min(0)) / self.num_samples

    def constraint_violation(self, W: Any) -> float:
        """max(0, max_i ||W[i, :n_constrained]||_1 - kappa) (the mu row values with ``"mu_inf"``); 0 when
        unconstrained or feasible."""
        if not self.constrained:
            return 0.0
        Wt = self._weights(W)
        worst = float(self._row_bound_values(Wt).max())
        return max(0.0, worst - float(self.kappa))

    def constraint_norm(self, W: Any) -> float:
        """max_i ||W[i, :n_constrained]||_1 (||A||_inf for stage 1), or mu_inf(A) with ``"mu_inf"``; 0 when
        nothing is constrained."""
        if self.n_constrained == 0:
            return 0.0
        Wt = self._weights(W)
        if self.constraint == "mu_inf" and self.row_offset + self.rows > self.n_constrained:
            return float(Wt[:, : self.n_constrained].abs().sum(dim=1).max())
        return float(self._row_bound_values(Wt).max())

    def __repr__(self) -> str:
        return (
            f"SIMProblem(dim={self.dim}, rows={self.rows}, num_samples={self.num_samples}, "
            f"n_constrained={self.n_constrained}, lam={self.lam}, l2={self.l2}, kappa={self.kappa}, "
            f"variant={self.variant!r}, samples={'yes' if self.samples is not None else 'no'}"
            f"{', l1_weights=yes' if self.l1_weights is not None else ''}"
            + (
                f", constraint={self.constraint!r}, row_offset={self.row_offset}"
                if self.constraint != "inf_norm"
                else ""
            )
            + ")"
        )
