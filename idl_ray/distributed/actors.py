"""The solver actor: holds one shard and runs the single-process kernels on it.

One class, :class:`SolverWorker`, serves every strategy:

- it loads its shard sources once, inside itself (object store, Parquet, Ray Dataset), into its additive
  statistics (G_k, Rt_k, ||t_k||^2, m_k) on the device Ray assigned;
- *rows* mode (gram strategy): it holds a block of rows of W, the factor of the global H = G/m + l2 I, and
  runs the accelerated, certified ADMM of :class:`~idl_ray.sim.solvers.row_block.RowBlockADMM` on them,
  reporting the block's additive duality-gap sums;
- *consensus* mode: it factors its own H_k = G_k/m + (l2/K) I and performs the local step of
  global-variable consensus ADMM;
- it evaluates its part of the objective and of the gradient (for the projected-gradient solver).

Every method returns its own compute time, so the driver can tell computation from communication.
Construction arguments are only descriptions (rank, threads), so an actor the driver recreates after a
loss rebuilds itself the same way; it then reloads its shard sources and its solver state is restored by
the driver from a checkpoint (see :class:`~idl_ray.distributed.pool.WorkerPool`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import ray
import torch

from idl_ray.distributed.device import actor_device, assigned_gpu_ids
from idl_ray.distributed.shards import ShardSource, load_sources
from idl_ray.errors import DistributedError
from idl_ray.sim.problem import GramStats
from idl_ray.sim.solvers.admm_kernels import ADMMOptions, ADMMState, GramFactor, initial_rho
from idl_ray.sim.solvers.row_block import BlockReport, RowBlockADMM
from idl_ray.sim.solvers.start import start_state

DTYPE = torch.float64
#: factored Grams a worker keeps between solves (a SIM fit has two: stage 1 equilibrated, stage 2)
_GRAMS_KEPT = 2


@dataclasses.dataclass
class ConsensusLocalState:
    """The local variables of one consensus worker: W_k (None before the first step), U_k, rho, and Z,
    the consensus W_k was computed from (the over-relaxed step mixes it in; None before the first step)."""

    W: torch.Tensor | None
    U: torch.Tensor
    rho: float
    Z: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> ConsensusLocalState:
        return ConsensusLocalState(
            W=None if self.W is None else self.W.to(device),
            U=self.U.to(device),
            rho=self.rho,
            Z=None if self.Z is None else self.Z.to(device),
        )

    def value(self, relaxation: float) -> torch.Tensor:
        """What the driver averages: alpha W_k + (1 - alpha) Z + U_k (W_k + U_k without relaxation)."""
        if self.Z is None or relaxation == 1.0:
            return self.W + self.U
        return relaxation * self.W + (1.0 - relaxation) * self.Z + self.U


class SolverWorker:
    """A solver actor (wrap with ``ray.remote``; see :func:`idl_ray.distributed.pool.WorkerPool`).

    Parameters
    ----------
    rank : int
        Position of the worker in its pool.
    threads : int
        Torch intra-op threads in this actor.
    """

    def __init__(self, rank: int, threads: int) -> None:
        torch.set_num_threads(threads)
        # the vertex step's pivoted QR comes from SciPy, whose import costs 0.2-0.3 s: paid here, while the
        # actors start (the sim job starts them during the teacher's training), not in the first solve
        import scipy.linalg  # noqa: F401

        self.rank = rank
        self.device = actor_device()
        self.sources: list[ShardSource] = []
        self.stats: GramStats | None = None
        self.load_s = self.gram_s = 0.0
        self.mode: str | None = None
        # rows mode
        self.factor: GramFactor | None = None
        self.block: RowBlockADMM | None = None
        self.block_args: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.settings: dict[str, Any] = {}
        #: key -> (H, factor) of the last Grams set up in rows mode, oldest first (kept by reset): two, a
        #: SIM fit's equilibrated stage-1 H and its stage-2 H
        self.gram_cache: dict[Any, tuple[torch.Tensor, GramFactor]] = {}
        # consensus mode
        self.local: ConsensusLocalState | None = None
        self.Hk: torch.Tensor | None = None
        self.Rtk: torch.Tensor | None = None

    def load(self, sources: Sequence[ShardSource]) -> dict[str, Any]:
        """Load sample shards (replacing any held), streaming them into this worker's statistics."""
        self.sources = list(sources)
        self.stats, self.load_s, self.gram_s = load_sources(self.sources, self.device)
        self.mode = "loaded"
        return self.info()

    def reset(self) -> None:
        """Drop the shard and the solver state (the pool is reused for another solve); the factored Hs of
        the last gram solves are kept, so the next solve on the same Gram (stage 2, a lambda path's next
        point) neither ships nor factors it again."""
        cache = self.gram_cache
        self.__init__(self.rank, torch.get_num_threads())
        self.gram_cache = cache

    def has_gram(self, key: Any) -> bool:
        """Whether this worker holds the factored H of the Gram named ``key`` (see :meth:`setup_rows`)."""
        return key is not None and key in self.gram_cache

    # ------------------------------------------------------------------ information
    def info(self) -> dict[str, Any]:
        """Who and where this worker is, and whether it is configured (False after a restart)."""
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "device": str(self.device),
            "gpu_ids": assigned_gpu_ids(),
            "mode": self.mode,
            "num_samples": 0 if self.stats is None else self.stats.num_samples,
            "load_s": self.load_s,
            "gram_s": self.gram_s,
            "threads": torch.get_num_threads(),
        }

    def gram_stats(self) -> GramStats:
        """This shard's statistics (on CPU, for the reduction)."""
        return self._require_stats().to("cpu")

    def shard_summary(self) -> dict[str, Any]:
        """m_k and the trace of G_k (for the consensus rho), without shipping G_k."""
        stats = self._require_stats()
        return {
            "num_samples": stats.num_samples,
            "trace": float(torch.diagonal(stats.G).sum()),
            "dim": stats.dim,
            "rows": stats.rows,
            "target_sq": stats.target_sq.to("cpu", DTYPE),
        }

    def _require_stats(self) -> GramStats:
        if self.stats is None:
            raise DistributedError(f"Solver worker {self.rank} holds no sample shard.")
        return self.stats

    # ------------------------------------------------------------------ rows mode (gram strategy)
    def setup_rows(
        self,
        H: list[Any],
        Rt: torch.Tensor,
        target_sq: torch.Tensor,
        state: ADMMState | None,
        *,
        lam: float | torch.Tensor,
        kappa: float | None,
        n_constrained: int,
        options: ADMMOptions,
        key: Any = None,
        polish_first: bool = False,
        warm_start: bool = False,
        initial: torch.Tensor | None = None,
    ) -> tuple[float, bool]:
        """Take a block of rows: factor H (d x d) once, hold Rt (rows_k x d), ||t||^2/m and the state.

        H is ``[ref]``, a list holding the object reference of H (Ray does not resolve references nested in a
        list): a worker that holds the Gram named ``key`` already (:meth:`has_gram`) uses its
        cached factor and never fetches H; otherwise H is fetched, factored and cached under ``key``. So the
        driver needs no round trip to ask which workers hold it. ``state`` None starts the block where
        :func:`~idl_ray.sim.solvers.start.start_state` says (``warm_start``, ``initial``: the block's rows of
        the weights to start from), computed here from the worker's own factor. Returns (seconds, whether H
        was fetched)."""
        start = time.perf_counter()
        fetched = not self.has_gram(key)
        if not fetched:
            H, self.factor = self.gram_cache[key]
        else:
            H = ray.get(H[0]).to(self.device, DTYPE)
            self.factor = GramFactor(H)
            if key is not None:
                self.gram_cache[key] = (H, self.factor)
                while len(self.gram_cache) > _GRAMS_KEPT:
                    self.gram_cache.pop(next(iter(self.gram_cache)))
        self.block_args = (H, Rt.to(self.device, DTYPE), target_sq.to(self.device, DTYPE))
        self.settings = {
            "lam": lam,
            "kappa": kappa,
            "n_constrained": n_constrained,
            "options": options,
            "polish_first": polish_first,
        }
        # what set_state(None) starts from: start_state's settings on this worker's device
        self.start_settings = {
            "rho": initial_rho(H, options),
            "warm_start": warm_start,
            "gap_tol": options.gap_tol,
            "lam": lam.to(self.device, DTYPE) if isinstance(lam, torch.Tensor) else lam,
            "kappa": kappa,
            "n_constrained": n_constrained,
            "initial": None if initial is None else initial.to(self.device, DTYPE),
        }
        self.set_state(state)
        self.mode = "rows"
        return time.perf_counter() - start, fetched

    def run_rows(self, max_steps: int) -> tuple[BlockReport, float, torch.Tensor | None]:
        """Run the accelerated ADMM on the rows held until they are certified or ``max_steps`` more steps
        were taken; the block's additive report (certificate sums), the compute time, and the rows' weights
        (Z, on CPU) when the block is finished (certified or stalled), so the driver needs no further round
        trip to gather them."""
        start = time.perf_counter()
        if self.mode != "rows" or self.block is None:
            raise DistributedError(f"Solver worker {self.rank} was not set up for row ADMM.")
        report = self.block.run(max_steps)
        finished = report.certified or report.stalled
        return report, time.perf_counter() - start, self.weights() if finished else None

    def _state(self) -> ADMMState:
        if self.block is None:
            raise DistributedError(f"Solver worker {self.rank} holds no ADMM state.")
        return self.block.state

    def get_state(self) -> ADMMState:
        return self._state().to("cpu")

    def set_state(self, state: ADMMState | None) -> None:
        """Restart the block from ``state`` (a checkpoint), or from the solve's start when None (see
        :meth:`setup_rows`): certificates are recomputed at its first check."""
        H, Rt, target_sq = self.block_args
        if state is None:
            state = start_state(self.factor, H, Rt, target_sq, **self.start_settings)
        else:
            state = state.to(self.device, DTYPE)
        self.block = RowBlockADMM(self.factor, H, Rt, target_sq, state=state, **self.settings)

    def weights(self) -> torch.Tensor:
        """The rows' current Z (the feasible iterate), on CPU (only Z moves: W and U stay on the device)."""
        return self._state().Z.to("cpu")

    # ------------------------------------------------------------------ consensus mode
    def setup_consensus(self, total_samples: int, l2_share: float, state: ConsensusLocalState) -> float:
        """Factor H_k = G_k / m + l2_share I (m: all shards' samples) and hold Rt_k / m."""
        start = time.perf_counter()
        stats = self._require_stats()
        m = float(total_samples)
        H = stats.G / m
        if l2_share:
            H = H + l2_share * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        self.Hk = H
        self.Rtk = stats.Rt / m
        self.factor = GramFactor(H)
        self.local = state.to(self.device)
        self.mode = "consensus"
        return time.perf_counter() - start

    def consensus_step(
        self, Zc: torch.Tensor, rho: float, relaxation: float = 1.0
    ) -> tuple[torch.Tensor, dict[str, float], float]:
        """Dual update with the new consensus, then the local step; returns the value the driver averages
        and the residual parts.

        With the consensus Z of iteration t, this worker's W_k of iteration t and the consensus Z_prev it
        was computed from (over-relaxation alpha: W_hat = alpha W_k + (1 - alpha) Z_prev)::

            U_k <- U_k + W_hat - Z                        (residual parts of iteration t: W_k - Z)
            U_k <- U_k * rho_old / rho                    (when the driver changed rho)
            W_k <- (Rt_k + rho (Z - U_k)) (H_k + rho I)^{-1}
            return alpha W_k + (1 - alpha) Z + U_k
        """
        start = time.perf_counter()
        if self.mode != "consensus" or self.local is None or self.factor is None or self.Rtk is None:
            raise DistributedError(f"Solver worker {self.rank} was not set up for consensus ADMM.")
        Z = Zc.to(self.device, DTYPE)
        local = self.local
        parts = {"primal_sq": 0.0, "w_sq": 0.0, "y_sq": 0.0, "rho": local.rho}
        if local.W is not None:
            D = local.W - Z
            W_hat = local.W if local.Z is None else relaxation * local.W + (1.0 - relaxation) * local.Z
            local.U = local.U + (W_hat - Z)
            parts["primal_sq"] = float(torch.sum(D * D))
            parts["w_sq"] = float(torch.sum(local.W * local.W))
            parts["y_sq"] = local.rho * local.rho * float(torch.sum(local.U * local.U))
        if rho != local.rho:
            local.U = local.U * (local.rho / rho)
            local.rho = float(rho)
        local.W = self.factor.solve(self.Rtk + rho * (Z - local.U), rho)
        local.Z = Z
        V = local.value(relaxation).to("cpu")
        return V, parts, time.perf_counter() - start

    def get_consensus_state(self) -> ConsensusLocalState:
        if self.local is None:
            raise DistributedError(f"Solver worker {self.rank} holds no consensus state.")
        return self.local.to("cpu")

    def set_consensus_state(self, state: ConsensusLocalState) -> None:
        self.local = state.to(self.device)

    # ------------------------------------------------------------------ objective and gradient parts
    def quadratic_part(self, W: torch.Tensor) -> float:
        """tr(W G_k W^T) - 2 tr(W Rt_k^T) + ||T_k||^2 (this shard's residual sum of squares)."""
        stats = self._require_stats()
        Wd = W.to(self.device, DTYPE)
        value = ((Wd @ stats.G) * Wd).sum() - 2.0 * (Wd * stats.Rt).sum() + stats.target_sq.sum()
        return float(value)

    def max_eigenvalue(self, total_samples: int) -> float:
        """lambda_max(G_k / m); their sum over shards bounds the Lipschitz constant of the gradient."""
        stats = self._require_stats()
        G = stats.G / float(total_samples)
        return float(torch.linalg.eigvalsh(0.5 * (G + G.T)).max())

    def gram_restricted(self, index: torch.Tensor, total_samples: int) -> torch.Tensor:
        """G_k[index][:, index] / m (on CPU): this shard's part of H restricted to a set of columns (the
        union of the rows' supports), for polishing on the driver."""
        stats = self._require_stats()
        idx = index.to(stats.G.device)
        return (stats.G[idx][:, idx] / float(total_samples)).to("cpu", DTYPE)

    def gradient_part(self, W: torch.Tensor, total_samples: int) -> tuple[torch.Tensor, float]:
        """(W G_k - Rt_k) / m: this shard's part of the gradient of the averaged quadratic loss."""
        start = time.perf_counter()
        stats = self._require_stats()
        Wd = W.to(self.device, DTYPE)
        grad = (Wd @ stats.G - stats.Rt) / float(total_samples)
        return grad.to("cpu"), time.perf_counter() - start


__all__ = ["ConsensusLocalState", "SolverWorker"]
