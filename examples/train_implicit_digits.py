"""Train an ImplicitModel on scikit-learn's digits and print its test accuracy (well under a minute on one CPU core).

python examples/train_implicit_digits.py [--epochs 10] [--hidden 64] [--fixed-point picard]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from idl_ray import ImplicitModel


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--kappa", type=float, default=0.95)
    parser.add_argument("--fixed-point", default="picard", choices=["picard", "anderson"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads (small problem: 1 is fastest)"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=0.25, random_state=args.seed, stratify=y)
    Xtr, Xte = torch.tensor(Xtr, dtype=torch.float32), torch.tensor(Xte, dtype=torch.float32)
    ytr, yte = torch.tensor(ytr), torch.tensor(yte)

    model = ImplicitModel(64, 10, args.hidden, kappa=args.kappa, tol=1e-4, fixed_point=args.fixed_point)
    print(model)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(Xtr))
        for start in range(0, len(Xtr), args.batch):
            idx = perm[start : start + args.batch]
            opt.zero_grad()
            F.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
            model.project_()  # keep ||A||_inf <= kappa after every step (default: scale the stored A)
        schedule.step()
        fwd, bwd = model.last_forward_stats, model.last_backward_stats
        print(
            f"epoch {epoch + 1:2d}: last forward {fwd.iterations} it ({fwd.num_converged}/{fwd.num_samples} "
            f"converged), last backward {bwd.iterations} it, ||A||_inf margin {model.well_posedness_margin():.2e}"
        )
    model.eval()
    with torch.no_grad():
        accuracy = float((model(Xte).argmax(1) == yte).float().mean())
    t = model.telemetry
    print(
        f"forward solves {t.forward_calls}, mean iterations {t.forward_iterations / t.forward_calls:.1f}; "
        f"backward solves {t.backward_calls}, mean iterations {t.backward_iterations / t.backward_calls:.1f}"
    )
    print(f"test accuracy: {accuracy:.4f}")


if __name__ == "__main__":
    main()
