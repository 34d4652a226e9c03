"""Local Docker Engines for tests, the benchmark and `demo --docker`: each a dockerd of its own
in a short directory (the issue's command line), standing for one host.

    dockerd --storage-driver=vfs --iptables=false --bridge=none --data-root D --exec-root E
            --pidfile P -H unix://D/docker.sock

vfs needs no kernel support, and without a bridge containers run with network_mode="none".
The base directory is short because a unix socket path holds at most 107 bytes, and the exec
root holds containerd's sockets.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor


def unavailable() -> str:
    """Why local engines cannot start here ("" when they can)."""
    if shutil.which("dockerd") is None:
        return "dockerd not installed (apt-get install docker.io)"
    if os.geteuid() != 0:
        return "dockerd needs root"
    return ""


class LocalEngine:
    """One dockerd; `url` is its socket for docker.DockerClient(base_url=...)."""

    def __init__(self, base: str, name: str):
        self.dir = os.path.join(base, name)
        self.data_root = os.path.join(self.dir, "d")
        self.exec_root = os.path.join(self.dir, "e")
        self.pidfile = os.path.join(self.dir, "p")
        self.socket = os.path.join(self.data_root, "docker.sock")
        self.url = f"unix://{self.socket}"
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(self.dir, "dockerd.log")

    def start(self, timeout: float = 60.0) -> "LocalEngine":
        import docker

        os.makedirs(self.data_root, exist_ok=True)
        os.makedirs(self.exec_root, exist_ok=True)
        cmd = [
            "dockerd",
            "--storage-driver=vfs",
            "--iptables=false",
            "--bridge=none",
            "--data-root",
            self.data_root,
            "--exec-root",
            self.exec_root,
            "--pidfile",
            self.pidfile,
            "-H",
            self.url,
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.proc.returncode}: {self.log_tail()}")
            if os.path.exists(self.socket):
                c = docker.DockerClient(base_url=self.url, timeout=5)
                try:
                    c.ping()
                    return self
                except Exception:
                    pass
                finally:
                    c.close()
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dockerd did not answer in {timeout} s: {self.log_tail()}")
            time.sleep(0.1)

    def client(self, timeout: float = 60.0):
        import docker

        return docker.DockerClient(base_url=self.url, timeout=timeout)

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the engine (it kills its containers) and its containerd."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            c = self.client(timeout=10)
            try:
                for cont in c.containers.list(all=True, ignore_removed=True):
                    cont.remove(force=True)
            finally:
                c.close()
        except Exception:  # an engine that no longer answers is stopped all the same
            pass
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class LocalEngines:
    """n engines side by side under one short temporary directory, removed on close."""

    def __init__(self, n: int, prefix: str = "hd"):
        self.base = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
        self.engines = [LocalEngine(self.base, f"e{i}") for i in range(n)]

    def start(self) -> "LocalEngines":
        try:
            with ThreadPoolExecutor(len(self.engines)) as pool:
                list(pool.map(lambda e: e.start(), self.engines))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        with ThreadPoolExecutor(max(1, len(self.engines))) as pool:
            list(pool.map(lambda e: e.stop(), self.engines))
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "LocalEngines":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __getitem__(self, i: int) -> LocalEngine:
        return self.engines[i]

    def __len__(self) -> int:
        return len(self.engines)
