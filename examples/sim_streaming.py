"""SIM with state extraction streaming through Ray Data, solved on Ray actors: nothing is materialised.

python examples/sim_streaming.py [--samples 1200] [--workers 2] [--epochs 20]

The inputs are a ``ray.data.Dataset``: the teacher runs in a pool of Ray Data actors (``map_batches`` on an
``ActorPoolStrategy``), each batch is reduced at once into the Gram statistics of both SIM stages, and only
those sums reach the driver; the convex solve then runs on ``RayADMMSolver`` actors (gram strategy). The
same ``SIM.fit`` on an in-memory tensor gives the same model (checked at the end). Starts a local Ray on
loopback unless RAY_ADDRESS points to a cluster.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray
import torch

from idl_ray import SIM, ADMMSolver
from idl_ray.datasets import load_dataset
from idl_ray.distributed import RayADMMSolver
from idl_ray.teachers import mlp_teacher, train_classifier


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=1200, help="training inputs streamed")
    parser.add_argument("--workers", type=int, default=2, help="Ray Data actors and solver actors")
    parser.add_argument("--epochs", type=int, default=20, help="teacher training epochs")
    args = parser.parse_args()

    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    try:
        split = load_dataset("digits", seed=0)
        torch.manual_seed(0)
        teacher = mlp_teacher(split.num_features, [32, 16], split.num_classes)
        teacher_accuracy = train_classifier(teacher, split, epochs=args.epochs, seed=0)
        x = split.x_train[: args.samples]
        dataset = ray.data.from_numpy(x.numpy())  # inputs only: SIM needs no labels to fit

        stream = {"num_actors": args.workers, "use_gpu": False, "cpus_per_actor": 0.25}
        streamed = SIM(kappa=0.95, lam=1e-4, stream=stream)
        streamed.fit(teacher, dataset, solver=RayADMMSolver(num_workers=args.workers, cpus_per_worker=0.25))
        in_memory = SIM(kappa=0.95, lam=1e-4).fit(teacher, x, solver=ADMMSolver(device="cpu"))

        accuracy = streamed.score((split.x_test, split.y_test))
        agree = float(
            (streamed.predict(split.x_test).argmax(1) == in_memory.predict(split.x_test).argmax(1))
            .float()
            .mean()
        )
        print(f"teacher test accuracy: {teacher_accuracy:.4f}")
        print(
            f"streamed SIM test accuracy: {accuracy:.4f} (||A||_inf = {float(streamed.A_.abs().sum(1).max()):.4f})"
        )
        print(f"streamed vs in-memory predictions agree on {agree:.2%} of the test digits")
        for name, info in getattr(streamed, "stream_info_", {}).items():
            print(f"pass {name}: {info}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
