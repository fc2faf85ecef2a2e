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

Cost: G is eigendecomposed once (d^3); for each rho the inverse M = (G + rho I)^{-1} = Q diag(1/(s + rho)) Q^T
and Rt M are formed once (d^3 + rows d^2), after which an iteration is one (rows x d)(d x d) product,
a soft-threshold and a batched projection. Stopping: primal r = ||W - Z||_F and dual s = rho ||Z - Z_prev||_F
against eps_pri = sqrt(N) abs_tol + rel_tol max(||W||, ||Z||), eps_dual = sqrt(N) abs_tol + rel_tol ||rho U||
(N = rows * d). rho adapts by residual balancing. The returned weights are Z, which satisfies the bound
exactly (it is the output of the projection).

Every residual is carried as a sum of squares (:class:`ResidualSums`) so that row shards held by different
Ray actors add their sums and the driver applies the same stopping test.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import torch

from idl_ray._validation import Options, bad_parameter, check_positive_float, check_positive_int
from idl_ray.implicit.projection import project_rows_onto_l1_ball

__all__ = [
    "ADMMOptions",
    "ADMMState",
    "ADMMStats",
    "GramFactor",
    "ResidualSums",
    "admm_iterations",
    "admm_solve",
    "balance_rho",
    "balanced_rho",
    "check_convergence",
    "initial_rho",
    "prox",
    "soft_threshold",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ADMMOptions(Options):
    """Settings of ADMM on the Gram form.

    Attributes
    ----------
    rho : float or None
        Initial penalty; None picks trace(G) / d, which makes the step well scaled whatever the
        number of samples behind G.
    max_iter : int
        Iteration cap; stopping earlier is the rule, hitting it emits a ConvergenceWarning in callers.
    abs_tol, rel_tol : float
        Absolute and relative tolerances of the primal/dual stopping test (Boyd et al. 2011, s3.3.1).
    adaptive_rho : bool
        Residual balancing: rho *= tau when r > mu s, rho /= tau when s > mu r.
    check_every : int
        Residuals are computed (one host sync) every this many iterations, also the balancing period.
    mu, tau : float
        Residual-balancing ratio and factor (mu > 1, tau > 1).
    """

    rho: float | None = None
    max_iter: int = 20_000
    abs_tol: float = 1e-8
    rel_tol: float = 1e-6
    adaptive_rho: bool = True
    check_every: int = 10
    mu: float = 10.0
    tau: float = 2.0

    def _validate(self) -> None:
        owner = "ADMMOptions"
        if self.rho is not None:
            check_positive_float(self.rho, "rho", owner)
        check_positive_int(self.max_iter, "max_iter", owner)
        check_positive_float(self.abs_tol, "abs_tol", owner, allow_zero=True)
        check_positive_float(self.rel_tol, "rel_tol", owner, allow_zero=True)
        if self.abs_tol == 0 and self.rel_tol == 0:
            raise bad_parameter("abs_tol", owner, "> 0 when rel_tol is 0", self.abs_tol)
        check_positive_int(self.check_every, "check_every", owner)
        if not isinstance(self.adaptive_rho, bool):
            raise bad_parameter("adaptive_rho", owner, "a bool", self.adaptive_rho)
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
    ``inverse(rho)`` is cached for the last rho, so an ADMM run with a fixed rho pays d^3 once.
    """

    def __init__(self, G: torch.Tensor) -> None:
        if G.dim() != 2 or G.shape[0] != G.shape[1]:
            raise bad_parameter("G", "GramFactor", "a square 2-D tensor", tuple(G.shape))
        start = time.perf_counter()
        eigenvalues, self.Q = torch.linalg.eigh(0.5 * (G + G.T))
        self.eigenvalues = eigenvalues.clamp_min(0)
        self.factor_time_s = time.perf_counter() - start
        self._cached_rho: float | None = None
        self._cached_inverse: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        return self.Q.shape[0]

    def inverse(self, rho: float) -> torch.Tensor:
        """(G + rho I)^{-1}, shape (d, d)."""
        if self._cached_rho != rho or self._cached_inverse is None:
            self._cached_inverse = (self.Q / (self.eigenvalues + rho)) @ self.Q.T
            self._cached_rho = rho
        return self._cached_inverse

    def solve(self, rhs: torch.Tensor, rho: float) -> torch.Tensor:
        """rhs (G + rho I)^{-1} for rhs of shape (rows, d)."""
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


@dataclasses.dataclass
class ADMMStats:
    """Telemetry of one ADMM solve (missing values are None)."""

    iterations: int
    converged: bool
    primal_residual: float | None
    dual_residual: float | None
    eps_primal: float | None
    eps_dual: float | None
    rho: float
    time_s: float
    factor_time_s: float
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)


def soft_threshold(V: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """sign(V) * max(|V| - threshold, 0), elementwise."""
    return torch.sign(V) * (V.abs() - threshold).clamp_min(0)


def prox(V: torch.Tensor, threshold: float, kappa: float | None, n_constrained: int) -> torch.Tensor:
    """prox of ``threshold ||.||_1 + indicator(||row[:n_constrained]||_1 <= kappa)`` applied row-wise.

    Parameters
    ----------
    V : Tensor, shape (rows, d)
    threshold : float >= 0 (lam / rho in ADMM)
    kappa : float or None (None: no constraint)
    n_constrained : int, the leading columns under the l1-ball constraint (the A-part of [A B])

    Returns
    -------
    Tensor, shape (rows, d); the constrained part of every row has l1 norm <= kappa exactly.
    """
    Z = soft_threshold(V, threshold) if threshold > 0 else V.clone()
    if kappa is not None and n_constrained > 0:
        Z[:, :n_constrained] = project_rows_onto_l1_ball(Z[:, :n_constrained], kappa)
    return Z


def initial_rho(G: torch.Tensor, options: ADMMOptions) -> float:
    """The user's rho, or trace(G)/d (mean eigenvalue) so the step is scale-free."""
    if options.rho is not None:
        return float(options.rho)
    mean_eigenvalue = float(torch.diagonal(G).sum()) / max(G.shape[0], 1)
    return mean_eigenvalue if mean_eigenvalue > 0 else 1.0


def admm_iterations(
    factor: GramFactor,
    Rt: torch.Tensor,
    state: ADMMState,
    *,
    lam: float,
    kappa: float | None,
    n_constrained: int,
    num_iter: int,
) -> tuple[ADMMState, ResidualSums]:
    """Run ``num_iter`` ADMM iterations on a block of rows; residuals of the last iteration.

    Parameters
    ----------
    factor : GramFactor of G (d x d), on Rt's device
    Rt : Tensor, shape (rows, d), the block's targets-times-features
    state : ADMMState for the same rows (updated out of place)

    Returns
    -------
    (new state, ResidualSums of the final iteration)
    """
    rho = state.rho
    M = factor.inverse(rho)
    RtM = Rt @ M
    Z, U = state.Z, state.U
    W = state.W
    Z_prev = Z
    threshold = lam / rho
    for _ in range(num_iter):
        W = torch.addmm(RtM, Z - U, M, alpha=rho)
        Z_prev = Z
        V = W + U
        Z = prox(V, threshold, kappa, n_constrained)
        U = V - Z
    new_state = ADMMState(W=W, Z=Z, U=U, rho=rho, iteration=state.iteration + num_iter)
    sums = ResidualSums(
        primal_sq=float(torch.sum((W - Z) ** 2)),
        dual_sq=rho * rho * float(torch.sum((Z - Z_prev) ** 2)),
        w_sq=float(torch.sum(W * W)),
        z_sq=float(torch.sum(Z * Z)),
        y_sq=rho * rho * float(torch.sum(U * U)),
        entries=W.numel(),
    )
    return new_state, sums


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


def balance_rho(state: ADMMState, sums: ResidualSums, options: ADMMOptions) -> ADMMState:
    """The state with rho from :func:`balanced_rho`; U, the scaled dual y / rho, is rescaled by
    old_rho / new_rho so that y is unchanged."""
    rho = balanced_rho(state.rho, sums, options)
    if rho == state.rho:
        return state
    return dataclasses.replace(state, rho=rho, U=state.U * (state.rho / rho))


def admm_solve(
    G: torch.Tensor,
    Rt: torch.Tensor,
    *,
    lam: float,
    kappa: float | None,
    n_constrained: int,
    options: ADMMOptions | None = None,
    state: ADMMState | None = None,
    factor: GramFactor | None = None,
    callback: Callable[[ADMMState, ResidualSums], None] | None = None,
) -> tuple[torch.Tensor, ADMMStats]:
    """Solve the Gram-form problem for all rows of W at once.

    Parameters
    ----------
    G : Tensor, shape (d, d), symmetric PSD (add l2 * I for elastic net)
    Rt : Tensor, shape (rows, d), same dtype and device as G
    lam : float >= 0, the l1 weight
    kappa : float in [0, 1) or None (no constraint)
    n_constrained : int in [0, d], leading columns under the l1-ball bound
    options : ADMMOptions
    state : ADMMState to resume from (a checkpoint or warm start); zeros by default
    factor : a precomputed GramFactor of G (reused across stages or restarts)
    callback : called as ``callback(state, sums)`` after every residual check (progress, checkpoints)

    Returns
    -------
    W : Tensor, shape (rows, d), with ||W[i, :n_constrained]||_1 <= kappa exactly
    stats : ADMMStats

    Examples
    --------
    >>> import torch
    >>> Phi = torch.randn(6, 200, dtype=torch.float64); T = torch.randn(3, 200, dtype=torch.float64)
    >>> W, stats = admm_solve(Phi @ Phi.T, T @ Phi.T, lam=0.1, kappa=0.5, n_constrained=3)
    >>> bool(W[:, :3].abs().sum(1).max() <= 0.5), stats.converged
    (True, True)
    """
    options = options or ADMMOptions()
    if Rt.dim() != 2 or G.dim() != 2 or Rt.shape[1] != G.shape[0] or G.shape[0] != G.shape[1]:
        raise bad_parameter(
            "Rt", "admm_solve", f"a (rows, d) tensor with d = G.shape[0] = {G.shape[0]}", tuple(Rt.shape)
        )
    if not 0 <= n_constrained <= G.shape[0]:
        raise bad_parameter("n_constrained", "admm_solve", f"an int in [0, {G.shape[0]}]", n_constrained)
    if lam < 0:
        raise bad_parameter("lam", "admm_solve", "a float >= 0", lam)
    start = time.perf_counter()
    factor = factor or GramFactor(G)
    if state is None:
        state = ADMMState.zeros(
            Rt.shape[0], G.shape[0], initial_rho(G, options), dtype=G.dtype, device=G.device
        )
    history: list[dict[str, float]] = []
    converged = False
    sums: ResidualSums | None = None
    eps_pri = eps_dual = None
    while state.iteration < options.max_iter:
        steps = min(options.check_every, options.max_iter - state.iteration)
        state, sums = admm_iterations(
            factor, Rt, state, lam=lam, kappa=kappa, n_constrained=n_constrained, num_iter=steps
        )
        converged, eps_pri, eps_dual = check_convergence(sums, options)
        history.append(
            {"iteration": state.iteration, "primal": sums.primal, "dual": sums.dual, "rho": state.rho}
        )
        if callback is not None:
            callback(state, sums)
        if converged:
            break
        state = balance_rho(state, sums, options)
    stats = ADMMStats(
        iterations=state.iteration,
        converged=converged,
        primal_residual=None if sums is None else sums.primal,
        dual_residual=None if sums is None else sums.dual,
        eps_primal=eps_pri,
        eps_dual=eps_dual,
        rho=state.rho,
        time_s=time.perf_counter() - start,
        factor_time_s=factor.factor_time_s,
        history=history,
    )
    return state.Z, stats
