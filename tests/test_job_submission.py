"""``idl-ray sim`` as a Ray job on a real local head with token authentication, the way users submit it.

The head is private to this module (own ports, own temp dir, own token; see ``local_head.py``) and
is stopped by its own PID, never by ``ray stop`` (which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import time

import pytest
from local_head import RAY, start_head, stop_head

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--hidden", "16", "--teacher-epochs", "2", "--quiet"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head():
    head = start_head(num_cpus=4)
    try:
        yield head
    finally:
        leftovers = stop_head(head)
        assert head.process.returncode is not None
        assert not head.our_pids(), "processes of the test head survived"
        # Not an error, but worth seeing: the head should take its processes down itself.
        if leftovers:
            print(f"had to kill {len(leftovers)} leftover process(es) of the test head: {leftovers}")


def _wait(client, job_id: str, timeout_s: float = 300.0):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            return status
        time.sleep(1.0)
    raise TimeoutError(f"job {job_id} still {status} after {timeout_s} s:\n{client.get_job_logs(job_id)}")


def _check_run_dir(folder: pathlib.Path, solver: str) -> dict:
    report = json.loads((folder / "report.json").read_text())
    assert report["config"]["solver"] == solver
    assert report["a_inf_norm"] <= report["config"]["kappa"] + 1e-12
    assert report["sim_accuracy"] >= report["teacher_accuracy"] - 0.05
    for name in ("config.yaml", "report.md", "model/sim.json", "model/weights.safetensors", "teacher.pt"):
        assert (folder / name).is_file(), name
    if solver == "ray-admm":  # one set of actors serves both stages (started once, closed by the job)
        pids = [report["certificate"][stage]["pids"] for stage in ("stage1", "stage2")]
        assert pids[0] == pids[1] and len(pids[0]) == report["config"]["workers"], pids
    return report


def test_ray_job_submit_cli_with_token(head, tmp_path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = tmp_path / "cli-run"
    command = [
        RAY, "job", "submit", "--address", head.address, "--working-dir", str(REPO),
        "--submission-id", "idl-ray-cli-job", "--",
        "idl-ray", "sim", *SMALL, "--solver", "ray-admm", "--workers", "1", "--output-dir", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, env=head.env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    client = JobSubmissionClient(head.address, headers=head.auth_headers)
    assert client.get_job_status("idl-ray-cli-job") == JobStatus.SUCCEEDED
    logs = client.get_job_logs("idl-ray-cli-job")
    assert str(out) in logs  # --quiet prints only the run directory
    _check_run_dir(out, "ray-admm")


def test_no_image_route_runtime_env_json(head, tmp_path) -> None:
    """The route documented for clusters without the idl_ray image: code shipped as the runtime env's
    working_dir and run as a module (the ``pip`` part of that runtime env needs PyPI, so it is left out)."""
    import json as _json

    from ray.job_submission import JobStatus, JobSubmissionClient

    out = tmp_path / "module-run"
    runtime_env = _json.dumps({"working_dir": str(REPO)})
    command = [
        RAY, "job", "submit", "--address", head.address, "--runtime-env-json", runtime_env,
        "--submission-id", "idl-ray-module-job", "--",
        "python", "-m", "idl_ray", "sim", *SMALL, "--solver", "lstsq", "--kappa", "0.5", "--output-dir", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, env=head.env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    client = JobSubmissionClient(head.address, headers=head.auth_headers)
    assert client.get_job_status("idl-ray-module-job") == JobStatus.SUCCEEDED
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["solver"] == "lstsq" and report["sim_accuracy"] is not None


def test_job_submission_client_default_run_dir(head) -> None:
    """Through the Python SDK, without --output-dir: the job makes ``runs/sim-<timestamp>/`` in its
    working directory and prints the path last."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head.address, headers=head.auth_headers)
    job_id = client.submit_job(
        entrypoint="idl-ray sim " + " ".join(SMALL) + " --solver admm",
        runtime_env={"working_dir": str(REPO)},
    )
    status = _wait(client, job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    folder = pathlib.Path(logs.strip().splitlines()[-1])
    assert folder.name.startswith("sim-") and folder.parent.name == "runs"
    _check_run_dir(folder, "admm")


def test_submission_without_or_with_a_wrong_token_is_refused(head) -> None:
    from ray.job_submission import JobSubmissionClient

    status, body = head.request("/api/jobs/", data={"entrypoint": "echo should-not-run"})
    assert status == 401, body
    status, body = head.request("/api/jobs/", data={"entrypoint": "echo should-not-run"}, token="0" * 64)
    assert status == 403, body
    with pytest.raises(Exception, match=r"(?i)auth|401|403"):
        JobSubmissionClient(head.address, headers={"Authorization": "Bearer wrong"}).submit_job(
            entrypoint="echo should-not-run"
        )
    # nothing of the refused submissions reached the head
    client = JobSubmissionClient(head.address, headers=head.auth_headers)
    assert all("should-not-run" not in job.entrypoint for job in client.list_jobs())


def test_submit_job_example(head, tmp_path) -> None:
    """examples/submit_job.py against the same head (token from a file, as a user would pass it)."""
    import sys

    out = tmp_path / "example-run"
    command = [
        sys.executable, str(REPO / "examples" / "submit_job.py"), "--address", head.address,
        "--token-path", str(head.token_path), "--", *SMALL, "--solver", "admm", "--output-dir", str(out),
    ]  # fmt: skip
    env = {k: v for k, v in head.env.items() if not k.startswith("RAY_AUTH")}  # the token comes from the flag
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "SUCCEEDED" in done.stdout and str(out) in done.stdout
    _check_run_dir(out, "admm")
