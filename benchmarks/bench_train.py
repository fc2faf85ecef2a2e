"""Ray Train overhead: epoch time of train_implicit with 1 and 2 workers vs the single-process loop.

Data: scikit-learn digits upsampled to 28x28 (input 784, 1,347 training samples), ImplicitModel with
hidden 100 and 500, Adam lr 3e-3, batch 64 (per worker), the bound enforced after every step in both.
Printed side by side, per hidden size:

- the single-process loop (no Ray) with 1 and 2 intra-op threads: median epoch time over epochs 2..E;
- train_implicit with 1 and 2 workers (1 CPU each, so 1 thread each): the median wall time from one
  epoch's start to the next (training, the metric all-reduces, the checkpoint and ray.train.report),
  the median compute part alone (``epoch_time_s``), start-up (from the call to the first epoch's start:
  Ray Train controller, worker group, process group, data transfer, model build) and the time after the
  last epoch (teardown, result);
- Ray bookkeeping per epoch = epoch wall time - compute part (medians over epochs 2..E-1), also as a
  fraction of the single-process epoch (1 thread); and the epoch wall time over the single-process
  epoch. The single-process loop runs before and after the Ray runs; its medians take both.

    python benchmarks/bench_train.py [--hidden 100,500] [--epochs 8] [--workers 1,2] [--use-gpu]
                                     [--poll-interval 0.1]

Ray Train V2 takes one ``ray.train.report`` per worker per controller poll (its result queue holds one
report), so an epoch shorter than the poll interval (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default)
waits for the poll: compare runs with and without ``--poll-interval``.

Numbers move with the load of the machine: run it on a quiet machine and compare ratios.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import statistics
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

import ray
import ray.train
import torch
import torch.nn.functional as F

from idl_ray import ImplicitModel
from idl_ray.datasets import load_dataset
from idl_ray.distributed import train_implicit


def model_fn(input_dim: int, hidden: int) -> ImplicitModel:
    return ImplicitModel(input_dim, 10, hidden, kappa=0.95, bias=True)


def single_process(split, hidden: int, epochs: int, batch: int, threads: int, device: str) -> list[float]:
    """Epoch times of the plain loop: permute, step, enforce the bound (what a worker does, minus Ray)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = model_fn(split.num_features, hidden).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = split.x_train.to(device), split.y_train.to(device)
    times = []
    for epoch in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch)).to(device)
        for i in range(0, len(x), batch):
            index = order[i : i + batch]
            optimiser.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[index]), y[index]).backward()
            optimiser.step()
            model.project_()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def on_ray(split, hidden: int, epochs: int, batch: int, workers: int, use_gpu: bool, storage: str) -> dict:
    resources = {"CPU": 1} | ({"GPU": 1} if use_gpu else {})
    called = time.time()
    result = train_implicit(
        functools.partial(model_fn, split.num_features, hidden),
        (split.x_train, split.y_train),
        epochs=epochs,
        batch_size=batch,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(name=f"bench-h{hidden}-w{workers}", storage_path=storage),
    )
    ended = time.time()
    metrics = result.metrics
    starts = [m["started_at"] for m in metrics]
    walls = [b - a for a, b in itertools.pairwise(starts)][1:]  # epoch 1 is warm-up
    bookkeeping = [w - m["epoch_time_s"] for w, m in zip(walls, metrics[1:])]
    return {
        "wall": statistics.median(walls),
        "compute": statistics.median(m["epoch_time_s"] for m in metrics[1:]),
        "bookkeeping": statistics.median(bookkeeping),
        "startup": starts[0] - called,
        "after": ended - starts[-1] - metrics[-1]["epoch_time_s"],
        "total": ended - called,
        "steps": metrics[-1]["optimizer_steps"],
        "loss": metrics[-1]["train_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", default="100,500")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per run (the first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--storage-path", default=None, help="default: a temporary folder")
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=None,
        help="sets RAY_TRAIN_HEALTH_CHECK_INTERVAL_S for the local Ray started here (Ray's default: 2 s). The "
        "Train controller takes one report per poll, so an epoch shorter than this waits for it",
    )
    args = parser.parse_args()
    if args.epochs < 3:
        parser.error("--epochs must be >= 3 (epoch 1 is warm-up, the wall time needs two more starts)")
    hiddens = [int(h) for h in args.hidden.split(",")]
    worker_counts = [int(w) for w in args.workers.split(",")]
    device = "cuda" if args.use_gpu else "cpu"
    if args.poll_interval is not None:
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(args.poll_interval)
    interval = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0 (Ray's default)")

    split = load_dataset("digits28")
    print(
        f"digits28: {len(split.x_train)} training samples, input {split.num_features}; batch {args.batch_size} "
        f"per worker, {args.epochs} epochs per run; torch {torch.__version__}, ray {ray.__version__}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; controller poll interval {interval} s"
    )
    ray.init(
        num_cpus=max(worker_counts),
        num_gpus=max(worker_counts) if args.use_gpu else 0,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    storage = args.storage_path or tempfile.mkdtemp(prefix="bench_train_")
    rows = []
    for hidden in hiddens:
        # the baseline runs before and after the Ray runs (the machine's load drifts); medians of both
        single: dict[int, list[float]] = {1: [], 2: []}
        ray_runs = {}
        for phase in ("before", "after"):
            for threads in (1, 2):
                times = single_process(split, hidden, args.epochs, args.batch_size, threads, device)
                single[threads] += times[1:]
            if phase == "after":
                break
            for workers in worker_counts:
                r = on_ray(split, hidden, args.epochs, args.batch_size, workers, args.use_gpu, storage)
                ray_runs[workers] = r
                print(
                    f"  hidden {hidden}, {workers} worker(s): total {r['total']:.1f} s, after last epoch "
                    f"{r['after']:.1f} s, {r['steps']} steps, final loss {r['loss']:.3f}"
                )
        for threads in (1, 2):
            rows.append((hidden, f"single process, {threads} thread(s)", statistics.median(single[threads])))
        for workers, r in ray_runs.items():
            name = f"train_implicit, {workers} worker(s)"
            rows.append((hidden, name, r["wall"], r["compute"], r["bookkeeping"], r["startup"]))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print()
    print(
        "| hidden | run | epoch s (median) | compute part s | Ray bookkeeping s/epoch (vs single) "
        "| start-up s | epoch vs single 1 thread |"
    )
    print("|---|---|---|---|---|---|---|")
    for hidden, name, wall, *ray_cells in rows:
        single_epoch = next(
            row[2] for row in rows if row[0] == hidden and row[1].startswith("single process, 1")
        )
        cells = ["", "", ""]
        if ray_cells:
            compute, bookkeeping, startup = ray_cells
            cells = [
                f"{compute:.3f}",
                f"{bookkeeping:.3f} ({bookkeeping / single_epoch:.0%})",
                f"{startup:.1f}",
            ]
        print(f"| {hidden} | {name} | {wall:.3f} | {' | '.join(cells)} | {wall / single_epoch:.2f}x |")
    ray.shutdown()


if __name__ == "__main__":
    main()
