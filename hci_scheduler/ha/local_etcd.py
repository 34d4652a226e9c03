"""Run etcd members on this machine, for tests, benchmarks and `hci-scheduler demo --ha`.

Timing: etcd refuses a lease shorter than 1.5 election timeouts (rounded up to whole seconds);
its defaults (heartbeat 100 ms, election 1000 ms) make the shortest lease 2 s. A 1 s lease
needs an election timeout of at most 666 ms: members here run with 50 ms heartbeats and a
500 ms election timeout, which suits one machine's loopback.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from typing import NamedTuple

from ..errors import SchedulerError

HEARTBEAT_MS = 50
ELECTION_MS = 500


def etcd_binary() -> str | None:
    """The etcd executable on PATH (Debian's etcd-server package installs it), or None."""
    return shutil.which("etcd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdTLS(NamedTuple):
    """PEM files for members that serve clients over TLS: the members' certificate and key
    (valid for 127.0.0.1), and the CA that signs client certificates; with `client_auth`,
    a client must present one (etcd's --client-cert-auth)."""

    cert_file: str
    key_file: str
    ca_file: str
    client_auth: bool = True


class EtcdMember:
    """One etcd process with its data directory and ports."""

    def __init__(self, name: str, data_dir: str, client_port: int, peer_port: int, tls: EtcdTLS | None = None):
        self.name = name
        self.data_dir = data_dir
        self.client_port = client_port
        self.peer_port = peer_port
        self.tls = tls
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, initial_cluster: str, state: str = "new") -> None:
        os.makedirs(self.data_dir, exist_ok=True)
        client = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"
        args = [etcd_binary() or "etcd", "--name", self.name, "--data-dir", os.path.join(self.data_dir, "data"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", initial_cluster, "--initial-cluster-state", state,
                "--initial-cluster-token", "hci-local",
                "--heartbeat-interval", str(HEARTBEAT_MS), "--election-timeout", str(ELECTION_MS),
                "--log-level", "warn"]
        if self.tls:
            args += ["--cert-file", self.tls.cert_file, "--key-file", self.tls.key_file,
                     "--trusted-ca-file", self.tls.ca_file]
            if self.tls.client_auth:
                args.append("--client-cert-auth")
        with open(os.path.join(self.data_dir, "etcd.log"), "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class LocalEtcd:
    """An etcd cluster of `members` processes on loopback, data under `root`.

    Use as a context manager, or call start() and stop(). `endpoints` lists HOST:PORT of
    every member; `url` is the `etcd://...` form `hci-scheduler serve --store` takes. With
    `tls`, clients talk to the members over TLS (peers stay on plain loopback), and
    `client_files` (ca, cert, key) are what readiness checks connect with.
    """

    def __init__(self, root: str, members: int = 1, tls: EtcdTLS | None = None,
                 client_files: tuple[str, str | None, str | None] | None = None):
        if etcd_binary() is None:
            raise SchedulerError("etcd is not installed (Debian: apt-get install etcd-server)")
        self.root = root
        self.tls = tls
        self.client_files = client_files
        self.members = [EtcdMember(f"m{i}", os.path.join(root, f"m{i}"), free_port(), free_port(), tls)
                        for i in range(members)]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(self.endpoints)

    def _initial(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def start(self, timeout_s: float = 30.0) -> LocalEtcd:
        for m in self.members:
            m.start(self._initial())
        self.wait_ready(timeout_s)
        return self

    def restart(self, member: EtcdMember, timeout_s: float = 30.0) -> None:
        """Start a stopped member again on its data directory."""
        member.start(self._initial(), state="existing")
        self.wait_ready(timeout_s, [member])

    def wait_ready(self, timeout_s: float = 30.0, members=None) -> None:
        """Until each member answers Status and the cluster has a raft leader."""
        from .etcd_client import EtcdClient

        members = members or self.members
        end = time.monotonic() + timeout_s
        for m in members:
            client = EtcdClient([m.endpoint], 1.0, *(self.client_files or ()))
            try:
                while True:
                    if m.proc is not None and m.proc.poll() is not None:
                        raise SchedulerError(f"etcd {m.name} exited with {m.proc.returncode}; see "
                                             f"{os.path.join(m.data_dir, 'etcd.log')}")
                    with contextlib.suppress(Exception):  # not up yet
                        if client.status(0).leader:
                            break
                    if time.monotonic() > end:
                        raise SchedulerError(f"etcd {m.name} not ready after {timeout_s} s")
                    time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        for m in self.members:
            m.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
