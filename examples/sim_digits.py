"""SIM on digits: train a small MLP teacher, distil it into a well-posed implicit model with ADMM.

Run: ``python examples/sim_digits.py`` (under a minute on a CPU). Prints teacher vs SIM test accuracy and
the fitted model's summary (sparsity, ||A||_inf, solve times, fixed-point iterations).
"""

from __future__ import annotations

import time

import torch
from sklearn.datasets import load_digits
from torch import nn

from idl_ray.sim import SIM
from idl_ray.sim.solvers import ADMMSolver


def main() -> None:
    torch.manual_seed(0)
    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(X))
    train, test = perm[:1400], perm[1400:]

    teacher = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimiser = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(25):
        for i in range(0, len(train), 128):
            idx = train[i : i + 128]
            optimiser.zero_grad()
            nn.functional.cross_entropy(teacher(X[idx]), y[idx]).backward()
            optimiser.step()
    teacher.eval()
    with torch.no_grad():
        teacher_acc = float((teacher(X[test]).argmax(1) == y[test]).float().mean())

    start = time.perf_counter()
    sim = SIM(kappa=0.95, lam=1e-4).fit(teacher, X[train], solver=ADMMSolver(abs_tol=1e-6, rel_tol=1e-4))
    fit_time = time.perf_counter() - start
    sim_acc = sim.score(X[test], y[test])

    print(f"teacher test accuracy: {teacher_acc:.4f}")
    print(f"SIM     test accuracy: {sim_acc:.4f}   (fit in {fit_time:.1f} s)")
    print(sim.summary())


if __name__ == "__main__":
    main()
