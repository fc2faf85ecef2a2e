"""Ray Tune over kappa, hidden size and learning rate, each trial a train_implicit run on Ray Train.

python examples/tune_implicit.py [--samples 4] [--epochs 3] [--workers 1]

The current Tune-with-Train pattern (Ray Train V2): a Tune function trainable starts the Ray Train run
and passes ``ray.tune.integration.ray_train.TuneReportCallback`` in the run's ``RunConfig(callbacks=...)``,
which forwards every epoch's metrics (``eval_accuracy``, ``fp_iterations``, ...) to Tune. Each trial
holds 0.1 CPU itself (it only waits); its Ray Train workers hold ``--cpus-per-worker`` each. Checked with
``--samples 2 --epochs 1`` on the 2-core test VM (about 2 minutes, mostly start-up).
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
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from idl_ray import ImplicitModel
from idl_ray.datasets import load_dataset
from idl_ray.distributed import train_implicit


def trial(config: dict, *, epochs: int, workers: int, cpus_per_worker: float, storage: str) -> None:
    """One Tune trial: a Ray Train run whose metrics reach Tune through TuneReportCallback."""
    split = load_dataset("digits")
    model_fn = functools.partial(
        ImplicitModel,
        split.num_features,
        split.num_classes,
        config["hidden"],
        kappa=config["kappa"],
        bias=True,
    )
    train_implicit(
        model_fn,
        (split.x_train, split.y_train),
        eval_data=(split.x_test, split.y_test),
        epochs=epochs,
        batch_size=32,
        lr=config["lr"],
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=f"trial-{tune.get_context().get_trial_id()}",
            storage_path=storage,
            callbacks=[TuneReportCallback()],
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    parser.add_argument("--storage-path", default=None)
    args = parser.parse_args()

    ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    storage = os.path.abspath(args.storage_path or tempfile.mkdtemp(prefix="idl_ray_tune_"))
    trainable = tune.with_resources(
        functools.partial(
            trial,
            epochs=args.epochs,
            workers=args.workers,
            cpus_per_worker=args.cpus_per_worker,
            storage=storage,
        ),
        {"CPU": 0.1},  # the trial only waits for its Ray Train run
    )
    tuner = tune.Tuner(
        trainable,
        param_space={
            "kappa": tune.choice([0.5, 0.9, 0.95]),
            "hidden": tune.choice([32, 64, 128]),
            "lr": tune.loguniform(1e-3, 1e-2),
        },
        tune_config=tune.TuneConfig(num_samples=args.samples, metric="eval_accuracy", mode="max"),
        run_config=tune.RunConfig(name="tune-implicit", storage_path=storage),
    )
    results = tuner.fit()
    for result in results:
        m = result.metrics
        print(
            f"kappa {result.config['kappa']}, hidden {result.config['hidden']}, lr {result.config['lr']:.2e}: "
            f"eval accuracy {m.get('eval_accuracy', float('nan')):.4f}, "
            f"fixed-point iterations {m.get('fp_iterations', float('nan')):.1f}"
        )
    best = results.get_best_result()
    print(f"best: {best.config} with eval accuracy {best.metrics['eval_accuracy']:.4f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
