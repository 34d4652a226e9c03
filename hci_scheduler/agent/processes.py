"""Agents as subprocesses (`hci-scheduler agent ...`), for tests, the benchmark and the demo:
each can be SIGKILLed and started again on the same state dir, as a crashed agent would be."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


class AgentProcess:
    def __init__(
        self,
        scheduler: str,
        docker_host: str,
        host_id: str,
        state_dir: str,
        *,
        labels: dict[str, str] | None = None,
        extra: list[str] | None = None,
        log_path: str | None = None,
    ):
        self.scheduler = scheduler
        self.host_id = host_id
        self.state_dir = state_dir
        self.cmd = [
            sys.executable,
            "-m",
            "hci_scheduler.cli",
            "agent",
            "--scheduler",
            scheduler,
            "--docker-host",
            docker_host,
            "--host-id",
            host_id,
            "--state-dir",
            state_dir,
        ]
        for k, v in (labels or {}).items():
            self.cmd += ["--label", f"{k}={v}"]
        self.cmd += list(extra or [])
        self.log_path = log_path or os.path.join(state_dir + ".log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "AgentProcess":
        os.makedirs(self.state_dir, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the agent dies without a word (its containers keep running)."""
        if self.running:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(30)

    def terminate(self, timeout: float = 60.0) -> int | None:
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode if self.proc is not None else None

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""


class ServeProcess:
    """`hci-scheduler serve` in a subprocess on a loopback port (given, or free and read back
    from --port-file), for the benchmark and the demo."""

    def __init__(
        self,
        data_dir: str,
        *,
        port: int = 0,
        extra: list[str] | None = None,
        log_path: str | None = None,
    ):
        self.data_dir = data_dir
        self.port = port
        self.extra = list(extra or [])
        self.log_path = log_path or os.path.join(data_dir + ".log")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "ServeProcess":
        import time

        port_file = self.data_dir + ".port"
        if os.path.exists(port_file):
            os.unlink(port_file)
        cmd = [
            sys.executable,
            "-m",
            "hci_scheduler.cli",
            "serve",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--port-file",
            port_file,
            "--data-dir",
            self.data_dir,
        ] + self.extra
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + timeout
        while not os.path.exists(port_file) or not open(port_file).read().strip():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the server did not start (see {self.log_path})")
            time.sleep(0.05)
        self.port = int(open(port_file).read())
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def terminate(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
