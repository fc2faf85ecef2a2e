"""Submit ``idl-ray sim`` to a Ray cluster as a job, wait for it, and print where its results are.

    python examples/submit_job.py --address http://127.0.0.1:8265 [--token-path ~/.ray/auth_token] [-- extra sim flags]

Start a cluster first, e.g. locally ``ray start --head --node-ip-address=127.0.0.1``, and stop it when done
(``ray stop`` stops every Ray of your user on the machine). With token authentication on
(``RAY_AUTH_MODE=token``), the client sends the token from ``--token-path`` (or, without it, what Ray
finds in ``RAY_AUTH_TOKEN_PATH`` / ``RAY_AUTH_TOKEN`` / ``~/.ray/auth_token``). This checkout is uploaded
as the job's working directory, so the cluster runs this version of idl_ray.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--address", required=True, help="the cluster's dashboard address, http://<head>:8265"
    )
    parser.add_argument("--token-path", default=None, help="file holding the cluster's auth token")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the job")
    parser.add_argument("sim_flags", nargs="*", help="flags for `idl-ray sim` (after --)")
    args = parser.parse_args()

    from ray.job_submission import JobStatus, JobSubmissionClient

    headers = None
    if args.token_path:
        token = pathlib.Path(args.token_path).expanduser().read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
    client = JobSubmissionClient(args.address, headers=headers)
    entrypoint = " ".join(["idl-ray", "sim", *args.sim_flags])
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(REPO)})
    print(f"submitted {job_id}: {entrypoint}")
    deadline = time.monotonic() + args.timeout
    status = client.get_job_status(job_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            print(f"{job_id} did not finish in {args.timeout} s; stopped it", file=sys.stderr)
            return 1
        time.sleep(2.0)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id).strip().splitlines()
    print("\n".join(logs[-12:]))
    print(f"{job_id}: {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1


if __name__ == "__main__":
    raise SystemExit(main())
