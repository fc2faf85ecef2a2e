"""A real, private Ray head for job-submission tests: its own ports, temp dir and auth token.

``ray stop`` stops *every* Ray process of the user on the machine (it matches process names), which
would take down other local clusters. So the head is started with ``ray start --head --block`` as a
child process: on SIGTERM that process kills exactly the processes it started (its node's
``kill_all_processes``) and, on Linux, they share its fate through ``PR_SET_PDEATHSIG``. Stopping
the head is sending SIGTERM to that one PID; anything left whose command line names this head's
temp dir is then ours and is killed by PID.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

RAY = str(pathlib.Path(sys.executable).with_name("ray"))


def _terminate_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies (Linux), so a killed test run does
    not leave the head behind (SIGTERM makes ``ray start --block`` stop its own processes)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class LocalHead:
    """A running head: where to reach it and how to authenticate."""

    process: subprocess.Popen
    temp_dir: pathlib.Path
    token: str
    token_path: pathlib.Path
    dashboard_port: int
    gcs_port: int
    env: dict[str, str]
    log_path: pathlib.Path

    @property
    def address(self) -> str:
        """The job-submission (dashboard) address."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def request(self, path: str, *, data: dict | None = None, token: str | None = None) -> tuple[int, str]:
        """(HTTP status, body) of a GET (or POST of ``data`` as JSON) to the dashboard."""
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        body = None if data is None else json.dumps(data).encode()
        request = urllib.request.Request(self.address + path, data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def our_pids(self) -> list[int]:
        """PIDs of live processes whose command line names this head's temp dir."""
        needle = str(self.temp_dir).encode()
        pids = []
        for entry in pathlib.Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
        return pids


def start_head(*, num_cpus: int = 4, timeout_s: float = 180.0) -> LocalHead:
    """Start ``ray start --head --block`` on 127.0.0.1 with token auth and wait for the job server.

    The temp dir is short (``/tmp/idlray-XXXX``): Ray's socket paths live under it and must stay
    below the 107-byte limit of a Unix socket path.
    """
    temp_dir = pathlib.Path(tempfile.mkdtemp(prefix="idlray-", dir="/tmp"))
    token = secrets.token_hex(32)
    token_path = temp_dir / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        # the job's entrypoint (`idl-ray ...`) must be found on the head's PATH
        PATH=f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    ports = {
        "port": free_port(),
        "dashboard-port": free_port(),
        "ray-client-server-port": free_port(),
        "node-manager-port": free_port(),
        "object-manager-port": free_port(),
        "dashboard-agent-listen-port": free_port(),
        "dashboard-agent-grpc-port": free_port(),
        "runtime-env-agent-port": free_port(),
        "metrics-export-port": free_port(),
    }
    command = [
        RAY,
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--temp-dir={temp_dir}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        "--disable-usage-stats",
        *(f"--{name}={value}" for name, value in ports.items()),
    ]
    log_path = temp_dir / "ray_start.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_terminate_with_parent,
        )
    head = LocalHead(
        process=process,
        temp_dir=temp_dir,
        token=token,
        token_path=token_path,
        dashboard_port=ports["dashboard-port"],
        gcs_port=ports["port"],
        env=env,
        log_path=log_path,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stop_head(head)
            raise RuntimeError(f"ray start exited with {process.returncode}:\n{log_path.read_text()}")
        with contextlib.suppress(OSError):
            status, _ = head.request("/api/jobs/", token=token)
            if status == 200:
                return head
        time.sleep(1.0)
    log = log_path.read_text()
    stop_head(head)
    raise RuntimeError(f"the head's job server did not answer within {timeout_s} s:\n{log}")


def stop_head(head: LocalHead, *, timeout_s: float = 60.0) -> list[int]:
    """Stop this head only: SIGTERM to its ``ray start --block`` process, then kill by PID whatever
    of ours is left. Returns the PIDs that had to be killed (empty when the head shut down cleanly)."""
    if head.process.poll() is None:
        head.process.send_signal(signal.SIGTERM)
        try:
            head.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            head.process.kill()
            head.process.wait(timeout=10)
    deadline = time.monotonic() + 15
    leftovers = head.our_pids()
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.5)
        leftovers = head.our_pids()
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(head.temp_dir, ignore_errors=True)
    return leftovers
