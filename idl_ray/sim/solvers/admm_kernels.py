"""Pure tensor kernels for ADMM on the Gram form of a SIM stage.

The problem, for all rows of W (rows x d) at once (rows are independent given G)::

    minimise_W   1/2 tr(W G W^T) - tr(W Rt^T) + lam ||W||_1
    subject to   ||W[i, :n_constrained]||_1 <= kappa      for every row i

with G = Phi Phi^T (d x d, symmetric PSD) and Rt = T Phi^T (rows x d) for targets T. This is the sum over
rows of 1/2 ||t_i - Phi^T w_i||^2 + lam ||w_i||_1 up to a constant. Elastic net: add l2 * I to G.

Scaled-form ADMM (Boyd et al. 2011, s3.1) on the split W = Z, f(W) = quadratic, g(Z) = l1 + constraint::

    W <- (Rt + rho (Z - U)) (G + rho I)^{-1}
    Z <- prox_{g / rho}(W + U) = P_kappa(soft(W + U, lam / rho))
    U <- U + W - Z

where soft is the soft-threshold and P_kappa the row-wise l1-ball projection of the constrained columns
(for an l1 penalty plus an l1-ball constraint on the same vector, the prox is the projection of the
soft-threshold, since soft(soft(v, a), b) = soft(v, a + b)).

Over-relaxation replaces W by alpha W + (1 - alpha) Z in the last two updates (:func:`relaxed_step`).

Cost: G is eigendecomposed once (d^3, :class:`GramFactor`); then any rho costs nothing more when G has low
rank (two thin products per step) or one d^3 inverse otherwise, after which a step is one
(rows x d)(d x d) product, a soft-threshold and a batched projection. The returned weights are always a
Z, the output of the projection, so the bound holds exactly.

The accelerated loop with its duality-gap certificate lives in :mod:`~idl_ray.sim.solvers.row_block`. The
primal/dual residuals of Boyd et al. (s3.3) are kept here as additive sums of squares
(:class:`ResidualSums`) for the consensus strategy, whose driver sees only such sums.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from idl_ray._validation import Options, bad_parameter, check_positive_float, check_positive_int
from idl_ray.implicit.mu_projection import prox_mu_rows
from idl_ray.implicit.projection import project_rows_onto_l1_ball

__all__ = [
    "ADMMOptions",
    "ADMMState",
    "GramFactor",
    "ResidualSums",
    "balanced_rho",
    "check_convergence",
    "initial_rho",
    "prox",
    "relaxed_step",
    "soft_threshold",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ADMMOptions(Options):
    """Settings of ADMM on the Gram form.

    Attributes
    ----------
    rho : float or None
        Initial penalty; None picks ``rho_scale * trace(G) / d`` (a fraction of the mean eigenvalue), which
        makes the step well scaled whatever the number of samples behind G.
    max_iter : int
        Cap on ADMM steps (map evaluations, accelerated or not); stopping earlier on the certificate is
        the rule, hitting the cap emits a ConvergenceWarning in callers.
    gap_tol : float
        Stopping test of the accelerated solver (:func:`~idl_ray.sim.solvers.row_block.admm_solve`): every
        row's duality gap below ``gap_tol`` times its share of the objective, so the total gap, a bound on
        ``P(W) - P*``, is below ``gap_tol * P(W)`` (:mod:`~idl_ray.sim.solvers.certificate`).
    abs_tol, rel_tol : float
        Absolute and relative tolerances of Boyd et al.'s primal/dual residual test (2011, s3.3.1), used by
        the consensus strategy, whose driver sees only residual sums.
    adaptive_rho : bool
        Adapt rho from the ratio of the normalised primal and dual residuals (OSQP, Stellato et al. 2020);
        the consensus strategy balances residuals with ``mu`` / ``tau`` (Boyd et al. s3.4.1).
    check_every : int
        Certificate (one host sync) every this many steps; also the rho adaptation period.
    relaxation : float in (0, 2)
        Over-relaxation alpha (Eckstein & Bertsekas 1992): the Z-step sees alpha W + (1 - alpha) Z.
    anderson : int >= 0
        Memory of the safeguarded type-II Anderson acceleration of the ADMM map (0: plain ADMM).
    polish : bool
        Polish rows on their support once the gap is small (:mod:`~idl_ray.sim.solvers.polish`).
    equilibrate : bool
        Solve a bounded stage (stage 1) on block-equilibrated columns (:mod:`~idl_ray.sim.solvers.scaling`:
        one scale for the bounded block, one for the free block) and map the answer back; ``rho`` then
        refers to the equilibrated problem.
    rho_scale : float
        Fraction of the mean eigenvalue of G used as the default initial rho.
    stall_checks : int >= 0
        Stop early, uncertified (``stalled``), when over this many checks the objective fell by less than
        gap_tol / 100 of itself and the gap did not halve (0: run to max_iter).
    interior_point : bool
        Hand the rows still uncertified after ``interior_point_after`` steps (or at a stall) to the batched
        interior point of :mod:`~idl_ray.sim.solvers.interior_point` (20-30 Newton steps to a certified optimum
        on any conditioning), once per solve, when its predicted cost is below that of the ADMM steps left.
        l1-ball bound (or none) with the thresholds of ``interior_point.interior_point_applies`` (every finite
        one > 0, or lam = 0 on the unbounded weights, which are eliminated); not under ``mu_inf``.
    vertex : bool
        Where rank(H) < d, move each certified row with more nonzeros than the rank to a vertex of its optimal
        face (:mod:`~idl_ray.sim.solvers.vertex`; at most rank + 2 nonzeros) when that still certifies: the
        optimum is not unique there, and the vertex is the sparse one.
    active_set : bool
        On a low-rank Gram (rank(H) <= d / 3: upsampled images, few samples) with every threshold > 0, solve the
        rows the first check did not certify by the dual active-set method of
        :mod:`~idl_ray.sim.solvers.active_set` (an exact projection in the rank-r dual, the kappa bound by a
        homotopy in its multiplier; hundreds of batched rank-one steps), polish them on the support it finds
        and keep those that certify, before any ADMM step. The rows it cannot finish (an optimum inside a
        face the bound cuts, its step guard) go to the interior point at once. Not under ``mu_inf``.
    interior_point_after : int >= 0
        ADMM steps before the hand-over, at least (rank-deficient Grams of upsampled images need it; on
        well-conditioned ones ADMM certifies every row within it). Where the interior point is costly (a
        full-rank d ~ 900 Gram) the hand-over waits until the steps taken cost 1/32 of it by flops (~400 steps).
    mu, tau : float
        Residual-balancing ratio and factor of the consensus strategy (mu > 1, tau > 1).
    """

    rho: float | None = None
    max_iter: int = 20_000
    gap_tol: float = 1e-7
    abs_tol: float = 1e-8
    rel_tol: float = 1e-6
    adaptive_rho: bool = True
    check_every: int = 25
    relaxation: float = 1.6
    anderson: int = 5
    polish: bool = True
    equilibrate: bool = True
    rho_scale: float = 0.05
    stall_checks: int = 40
    interior_point: bool = True
    active_set: bool = True
    interior_point_after: int = 100
    vertex: bool = True
    mu: float = 10.0
    tau: float = 2.0

    def _validate(self) -> None:
        owner = "ADMMOptions"
        if self.rho is not None:
            check_positive_float(self.rho, "rho", owner)
        check_positive_int(self.max_iter, "max_iter", owner)
        check_positive_float(self.gap_tol, "gap_tol", owner)
        check_positive_float(self.abs_tol, "abs_tol", owner, allow_zero=True)
        check_positive_float(self.rel_tol, "rel_tol", owner, allow_zero=True)
        if self.abs_tol == 0 and self.rel_tol == 0:
            raise bad_parameter("abs_tol", owner, "> 0 when rel_tol is 0", self.abs_tol)
        check_positive_int(self.check_every, "check_every", owner)
        for name in ("adaptive_rho", "polish", "equilibrate", "interior_point", "active_set", "vertex"):
            if not isinstance(getattr(self, name), bool):
                raise bad_parameter(name, owner, "a bool", getattr(self, name))
        check_positive_float(self.relaxation, "relaxation", owner)
        if not 0 < self.relaxation < 2:
            raise bad_parameter("relaxation", owner, "a float in (0, 2)", self.relaxation)
        check_positive_int(self.anderson, "anderson", owner, allow_zero=True)
        check_positive_float(self.rho_scale, "rho_scale", owner)
        check_positive_int(self.stall_checks, "stall_checks", owner, allow_zero=True)
        check_positive_int(self.interior_point_after, "interior_point_after", owner, allow_zero=True)
        for name in ("mu", "tau"):
            value = getattr(self, name)
            check_positive_float(value, name, owner)
            if value <= 1:
                raise bad_parameter(name, owner, "a float > 1", value)


class GramFactor:
    """Eigendecomposition G = Q diag(s) Q^T, computed once, serving (G + rho I)^{-1} for any rho.

    Parameters
    ----------
    G : Tensor, shape (d, d), symmetric positive semi-definite.

    Notes
    -----
    When G has low numerical rank r (eigenvalues above ``1e-12 * max``; upsampled images, few samples),
    ``solve`` uses ``(G + rho I)^{-1} = (I - Q_r diag(s_r / (s_r + rho)) Q_r^T) / rho``: two thin products
    (4 rows d r flops instead of 2 rows d^2) and no d^3 work when rho changes. Otherwise the dense inverse
    is formed once per rho and cached.

    A float64 G of dimension ``SKETCH_MIN_DIM`` or more is first sketched (:meth:`_sketched_range`): where its
    rank is at most d / 6 the thin factor comes from d^2 k flops (k ~ d / 6) instead of the d^3 of a full
    eigendecomposition (28x28 digits teacher, d = 881, r = 123: ~26 ms against ~130 ms on one CPU thread).
    ``Q`` and ``eigenvalues`` then hold the range only (d x r and r), as for :meth:`column_scaled`.
    """

    #: eigenvalues at or below this fraction of the largest are treated as 0 by the low-rank solve
    RANK_CUT = 1e-12
    #: a float64 G of at least this dimension is sketched for a low rank before a full eigendecomposition
    SKETCH_MIN_DIM = 256
    #: the sketch's columns beyond the largest rank it accepts (d / 6), and the Ritz values below the rank
    #: cut it must find to accept (its span then holds a piece of the null space: the range is inside it)
    SKETCH_OVERSAMPLING = 16
    #: Gaussian probes of the sketch's residual G - Q_r diag(s_r) Q_r^T
    SKETCH_PROBES = 8

    def __init__(self, G: torch.Tensor) -> None:
        if G.dim() != 2 or G.shape[0] != G.shape[1]:
            raise bad_parameter("G", "GramFactor", "a square 2-D tensor", tuple(G.shape))
        start = time.perf_counter()
        symmetric = 0.5 * (G + G.T)
        sketched = self._sketched_range(symmetric)
        if sketched is None:
            eigenvalues, Q = torch.linalg.eigh(symmetric)
        else:
            eigenvalues, Q = sketched
        self._adopt(Q, eigenvalues, start)

    @classmethod
    def _sketched_range(cls, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(s_r, Q_r) of a symmetric PSD G (d x d) of rank r <= d / 6, from a randomized range finder, or None
        (then a full eigendecomposition is needed: G not float64, small, of a larger rank, or a sketch that
        fails its checks).

        Halko, Martinsson & Tropp (SIAM Review 2011), Algorithm 4.1 with a Rayleigh-Ritz step:
        Y = G Omega for a Gaussian Omega (d x k, k = d / 6 + ``SKETCH_OVERSAMPLING``, a fixed seed), Q = orth(Y),
        Q^T G Q = V diag(s) V^T, and ``G ~= (Q V) diag(s) (Q V)^T``. Where rank(G) <= k - p the sketch spans
        range(G) up to rounding (failure probability ~ p^-p), and the Ritz pairs above the rank cut are G's
        own eigenpairs there. Accepted only when (1) at least ``SKETCH_OVERSAMPLING`` Ritz values fall at or
        below the rank cut (the span reached past the range) and (2) the residual G - Q_r diag(s_r) Q_r^T on
        ``SKETCH_PROBES`` fresh Gaussian vectors p is at most the rank cut times the largest eigenvalue
        (||E p|| ~ ||E||_F: a dropped eigenvalue above the cut fails it with probability ~1 - 1e-9): the full
        eigendecomposition would then keep the same directions, up to rounding."""
        d = G.shape[0]
        k = d // 6 + cls.SKETCH_OVERSAMPLING
        if G.dtype != torch.float64 or d < cls.SKETCH_MIN_DIM or k >= d // 3:
            return None
        generator = torch.Generator(device=G.device).manual_seed(0)
        omega = torch.randn(d, k + cls.SKETCH_PROBES, generator=generator, dtype=G.dtype, device=G.device)
        products = G @ omega  # the sketch's and the probes' in one pass over G
        Q = torch.linalg.qr(products[:, :k]).Q
        projected = Q.T @ (G @ Q)
        s, V = torch.linalg.eigh(0.5 * (projected + projected.T))
        s = s.clamp_min(0)
        largest = float(s.max())  # k >= 1 Ritz values
        kept = s > cls.RANK_CUT * largest
        if largest == 0.0 or k - int(kept.sum()) < cls.SKETCH_OVERSAMPLING:
            return None
        basis, values = Q @ V[:, kept], s[kept]
        probes = omega[:, k:]
        residual = products[:, k:] - basis @ (values[:, None] * (basis.T @ probes))
        if float(residual.norm(dim=0).max()) > cls.RANK_CUT * largest:
            return None
        return values, basis

    def _adopt(self, Q: torch.Tensor, eigenvalues: torch.Tensor, start: float) -> None:
        """Hold eigenvectors Q (d x k: all d, or a thin range basis) and their eigenvalues (k,): the kept ones
        (above ``RANK_CUT`` of the largest), the rank, and the thin basis when the rank is <= d / 3."""
        self.Q = Q
        self.eigenvalues = eigenvalues.clamp_min(0)
        largest = float(self.eigenvalues.max()) if self.eigenvalues.numel() else 0.0
        self._range = self.eigenvalues > self.RANK_CUT * largest  # the eigenvalues kept (bool mask)
        self.rank = int(self._range.sum())
        self._low_rank = 3 * self.rank <= self.dim
        if self._low_rank:
            self._Q_range = self.Q[:, self._range].contiguous()
            self._s_range = self.eigenvalues[self._range]
        self.factor_time_s = time.perf_counter() - start
        self._cached_rho: float | None = None
        self._cached_inverse: torch.Tensor | None = None

    def column_scaled(self, scales: torch.Tensor) -> GramFactor | None:
        """The factor of ``S^{-1} G S^{-1}`` (S = diag(scales), scales (d,) > 0) derived from this one, or None
        when G is not low rank (then only a new eigendecomposition will do).

        With ``G = Q_r diag(s_r) Q_r^T`` the scaled matrix is ``M M^T`` for ``M = S^{-1} Q_r diag(sqrt(s_r))``
        (d x r), so its range and eigenvalues are M's left singular vectors and squared singular values: a
        thin SVD of d r^2 flops instead of an eigendecomposition of d^3 (on the 28x28 digits teacher, d = 881
        and r = 123: ~3 ms instead of ~80 ms). Directions this factor dropped (eigenvalues below ``RANK_CUT``)
        stay dropped. A SIM fit factors G once this way for both its stages (stage 1 equilibrated, stage 2
        not; :class:`~idl_ray.sim.solvers.scaling.BlockScaling`)."""
        if not self._low_rank:
            return None
        start = time.perf_counter()
        M = (self._Q_range * self._s_range.sqrt()) / scales.to(self._Q_range)[:, None]
        U, sigma, _ = torch.linalg.svd(M, full_matrices=False)
        factor = GramFactor.__new__(GramFactor)
        # rank <= this one's <= d / 3: the thin basis serves every solve
        factor._adopt(U, sigma * sigma, start)
        return factor

    @property
    def dim(self) -> int:
        return self.Q.shape[0]

    @property
    def low_rank(self) -> bool:
        """rank <= dim / 3: ``solve`` uses the thin range basis (and so does a step's cost)."""
        return self._low_rank

    def range_basis(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q_r, s_r): the eigenvectors (d x r) and eigenvalues (r,) above ``RANK_CUT`` of the largest, so
        ``G ~= Q_r diag(s_r) Q_r^T`` (the thin factor the interior point works with)."""
        if self._low_rank:
            return self._Q_range, self._s_range
        return self.Q[:, self._range], self.eigenvalues[self._range]

    def range_factor(self) -> torch.Tensor:
        """F = diag(sqrt(s_r)) Q_r^T (r x d), the thin factor with ``F^T F = G`` on its range."""
        Q, s = self.range_basis()
        return (Q * s.sqrt()).T.contiguous()

    def inverse(self, rho: float) -> torch.Tensor:
        """(G + rho I)^{-1}, shape (d, d)."""
        if self._cached_rho != rho or self._cached_inverse is None:
            if self._low_rank:  # Q may hold the range only
                self._cached_inverse = self.solve(
                    torch.eye(self.dim, dtype=self.Q.dtype, device=self.Q.device), rho
                )
            else:
                self._cached_inverse = (self.Q / (self.eigenvalues + rho)) @ self.Q.T
            self._cached_rho = rho
        return self._cached_inverse

    def solve(self, rhs: torch.Tensor, rho: float) -> torch.Tensor:
        """rhs (G + rho I)^{-1} for rhs of shape (rows, d)."""
        if self._low_rank:
            projected = (rhs @ self._Q_range) * (self._s_range / (self._s_range + rho))
            return (rhs - projected @ self._Q_range.T) / rho
        return rhs @ self.inverse(rho)


@dataclasses.dataclass
class ADMMState:
    """The full ADMM iterate: enough to resume a solve exactly (a checkpoint).

    W, Z, U have shape (rows, d); U is the scaled dual (y = rho U).
    """

    W: torch.Tensor
    Z: torch.Tensor
    U: torch.Tensor
    rho: float
    iteration: int = 0

    @classmethod
    def zeros(
        cls, rows: int, d: int, rho: float, *, dtype: torch.dtype, device: torch.device | str | None = None
    ) -> ADMMState:
        def zero() -> torch.Tensor:
            return torch.zeros(rows, d, dtype=dtype, device=device)

        return cls(W=zero(), Z=zero(), U=zero(), rho=float(rho))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ADMMState:
        """A copy on another device / dtype (``.to("cpu")`` for checkpoints)."""
        return ADMMState(
            W=self.W.to(device=device, dtype=dtype),
            Z=self.Z.to(device=device, dtype=dtype),
            U=self.U.to(device=device, dtype=dtype),
            rho=self.rho,
            iteration=self.iteration,
        )

    def rows(self, index: slice) -> ADMMState:
        """The state of a block of rows (for sharding rows across workers)."""
        return ADMMState(
            W=self.W[index], Z=self.Z[index], U=self.U[index], rho=self.rho, iteration=self.iteration
        )

    @classmethod
    def stack(cls, parts: list[ADMMState]) -> ADMMState:
        """Concatenate row blocks back into one state (inverse of :meth:`rows`)."""
        first = parts[0]
        return cls(
            W=torch.cat([p.W for p in parts]),
            Z=torch.cat([p.Z for p in parts]),
            U=torch.cat([p.U for p in parts]),
            rho=first.rho,
            iteration=first.iteration,
        )


@dataclasses.dataclass(frozen=True)
class ResidualSums:
    """Squared Frobenius norms of one check, additive over row shards.

    primal_sq = ||W - Z||^2, dual_sq = rho^2 ||Z - Z_prev||^2, w_sq = ||W||^2, z_sq = ||Z||^2,
    y_sq = ||rho U||^2, entries = rows * d.
    """

    primal_sq: float
    dual_sq: float
    w_sq: float
    z_sq: float
    y_sq: float
    entries: int

    def __add__(self, other: ResidualSums) -> ResidualSums:
        return ResidualSums(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    @property
    def primal(self) -> float:
        return math.sqrt(self.primal_sq)

    @property
    def dual(self) -> float:
        return math.sqrt(self.dual_sq)


def soft_threshold(V: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """sign(V) * max(|V| - threshold, 0), elementwise."""
    return torch.sign(V) * (V.abs() - threshold).clamp_min(0)


def prox(
    V: torch.Tensor,
    threshold: float | torch.Tensor,
    kappa: float | None,
    n_constrained: int,
    *,
    condition: str = "inf_norm",
    diagonal: torch.Tensor | None = None,
) -> torch.Tensor:
    """prox of ``threshold ||.||_1 + indicator(||row[:n_constrained]||_1 <= kappa)`` applied row-wise.

    Parameters
    ----------
    V : Tensor, shape (rows, d)
    threshold : float >= 0 (lam / rho in ADMM), or a Tensor (rows, d) of per-entry thresholds in [0, inf]
        (l1 weights, :mod:`~idl_ray.sim.solvers.weights`): the prox of ``sum_j t_j |v_j|`` is the entrywise
        soft-threshold, an infinite threshold gives exactly 0, and the l1-ball projection of the result is
        still the prox with the bound (soft-thresholds compose, and a zero entry stays zero)
    kappa : float or None (None: no constraint)
    n_constrained : int, the leading columns under the l1-ball constraint (the A-part of [A B])
    condition : "inf_norm" (the l1 ball above) or "mu_inf": the constraint is
        ``row[d] + sum_{j < n_constrained, j != d} |row[j]| <= kappa`` with ``d = diagonal[i]`` for row i,
        and the prox is :func:`~idl_ray.implicit.mu_projection.prox_mu_rows` (not a projection of the
        soft-threshold: the diagonal is shifted before it is thresholded)
    diagonal : Tensor of int64 (rows,), the diagonal column of each row (``"mu_inf"`` only)

    Returns
    -------
    Tensor, shape (rows, d); the constrained part of every row has l1 norm <= kappa exactly (mu row value
    <= kappa up to a few ulps with ``"mu_inf"``).
    """
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.to(device=V.device, dtype=V.dtype)
    if condition == "mu_inf" and kappa is not None and n_constrained > 0:
        return prox_mu_rows(V, kappa, n_constrained, threshold=threshold, diagonal=diagonal)
    if isinstance(threshold, torch.Tensor):
        Z = soft_threshold(V, threshold)
    else:
        Z = soft_threshold(V, threshold) if threshold > 0 else V.clone()
    if kappa is not None and n_constrained > 0:
        Z[:, :n_constrained] = project_rows_onto_l1_ball(Z[:, :n_constrained], kappa)
    return Z


def initial_rho(G: torch.Tensor, options: ADMMOptions) -> float:
    """The user's rho, or ``rho_scale * trace(G) / d`` (a fraction of the mean eigenvalue): scale-free."""
    if options.rho is not None:
        return float(options.rho)
    mean_eigenvalue = float(torch.diagonal(G).sum()) / max(G.shape[0], 1)
    return options.rho_scale * mean_eigenvalue if mean_eigenvalue > 0 else 1.0


def relaxed_step(
    factor: GramFactor,
    Rt: torch.Tensor,
    Z: torch.Tensor,
    U: torch.Tensor,
    *,
    rho: float,
    lam: float | torch.Tensor,
    kappa: float | None,
    n_constrained: int,
    relaxation: float = 1.0,
    condition: str = "inf_norm",
    diagonal: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One over-relaxed ADMM step from (Z, U) on a block of rows (shapes (rows, d)); returns (W, Z, U).

    W = (Rt + rho (Z - U)) (G + rho I)^{-1};  W_hat = alpha W + (1 - alpha) Z;
    Z = prox(W_hat + U, lam / rho);  U = U + W_hat - Z.  alpha = 1 is plain ADMM.
    """
    W = factor.solve(Rt + rho * (Z - U), rho)
    W_hat = W if relaxation == 1.0 else relaxation * W + (1.0 - relaxation) * Z
    V = W_hat + U
    Z_next = prox(V, lam / rho, kappa, n_constrained, condition=condition, diagonal=diagonal)
    return W, Z_next, V - Z_next


def check_convergence(sums: ResidualSums, options: ADMMOptions) -> tuple[bool, float, float]:
    """Boyd et al.'s test: r <= eps_pri and s <= eps_dual. Returns (converged, eps_pri, eps_dual)."""
    root_n = math.sqrt(max(sums.entries, 1))
    eps_pri = root_n * options.abs_tol + options.rel_tol * math.sqrt(max(sums.w_sq, sums.z_sq))
    eps_dual = root_n * options.abs_tol + options.rel_tol * math.sqrt(sums.y_sq)
    return (sums.primal <= eps_pri and sums.dual <= eps_dual), eps_pri, eps_dual


def balanced_rho(rho: float, sums: ResidualSums, options: ADMMOptions) -> float:
    """Residual balancing (Boyd et al. 2011, s3.4.1): rho * tau when r > mu s, rho / tau when s > mu r.

    A pure function of the global residual sums, so a driver can decide rho once for all row shards.
    """
    if not options.adaptive_rho:
        return rho
    if sums.primal > options.mu * sums.dual:
        return rho * options.tau
    if sums.dual > options.mu * sums.primal:
        return rho / options.tau
    return rho
