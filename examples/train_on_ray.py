"""Train an ImplicitModel on digits with Ray Train workers, then resume the run for more epochs.

python examples/train_on_ray.py [--workers 2] [--epochs 3] [--more-epochs 2] [--hidden 64] [--use-gpu]

Starts a local Ray (loopback only) unless RAY_ADDRESS points to a cluster. The run folder (checkpoints,
one per epoch) is under --storage-path (default: a temporary folder). The second call uses the same
RunConfig(name, storage_path): it resumes from the latest checkpoint and does not redo finished epochs.
On a small shared machine, each call spends most of its time starting Ray Train (10-40 s).
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # short epochs: see docs/train.md

import ray
import ray.train

from idl_ray import ImplicitModel
from idl_ray.datasets import load_dataset
from idl_ray.distributed import train_implicit


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--more-epochs", type=int, default=2, help="epochs added by the resumed call")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--storage-path", default=None)
    args = parser.parse_args()

    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    split = load_dataset("digits")
    storage = os.path.abspath(args.storage_path or tempfile.mkdtemp(prefix="idl_ray_train_"))
    resources = {"CPU": args.cpus_per_worker} | ({"GPU": 1} if args.use_gpu else {})
    common = {
        "eval_data": (split.x_test, split.y_test),
        "batch_size": args.batch_size,
        "lr": 3e-3,
        "scaling_config": ray.train.ScalingConfig(
            num_workers=args.workers, use_gpu=args.use_gpu, resources_per_worker=resources
        ),
        "run_config": ray.train.RunConfig(
            name="digits",
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=1),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    }
    model_fn = functools.partial(
        ImplicitModel, split.num_features, split.num_classes, args.hidden, kappa=0.95, bias=True
    )

    for epochs in (args.epochs, args.epochs + args.more_epochs):
        result = train_implicit(model_fn, (split.x_train, split.y_train), epochs=epochs, **common)
        print(f"run folder {result.path}, {len(result.metrics)} epochs")
        for m in result.metrics:
            print(
                f"  epoch {m['epoch']}: loss {m['train_loss']:.4f}, eval accuracy {m['eval_accuracy']:.4f}, "
                f"fixed-point iterations {m['fp_iterations']:.1f}, kappa margin {m['kappa_margin']:.1e}, "
                f"optimiser steps {m['optimizer_steps']}, replica difference {m['replica_max_diff']:g}"
            )
    model = result.model  # on the CPU, the last epoch's weights
    print(f"||A||_inf = {float(model.A.detach().abs().sum(1).max()):.6f} <= kappa = {model.kappa}")
    ray.shutdown()


if __name__ == "__main__":
    main()
