"""Live migration of a VM between two agents' qemu processes (`agent --migration-listen`).

qemu runs in a container without a network (`network_mode=none`), so neither qemu can reach
the other: the agents carry the stream. The source qemu migrates (QMP `migrate`) to a unix
socket its agent listens on in the VM's mounted QMP directory; the source agent sends the
bytes over TCP to the target agent's migration listener, which passes them to the target
qemu, started with `-incoming unix:` on a socket in its own QMP directory:

    source qemu --unix--> source agent --TCP--> target agent --unix--> target qemu

The target publishes its listener as the host label `migration-address`. A connection opens
with one line, the workload id in JSON; the target answers `ready` once that workload's
incoming qemu listens, else `wait` (the source asks again until its move timeout). Nothing
here decides whether a move is live: the agent does (both hosts must carry the label).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import vm
from .qmp import QmpClient, QmpError

log = logging.getLogger("hci_scheduler.agent")

ADDRESS_LABEL = "migration-address"
OUTGOING_SOCKET = "migrate-out.sock"  # in the source VM's QMP directory
INCOMING_SOCKET = "migrate-in.sock"  # in the target VM's QMP directory
CHUNK = 1 << 16


def incoming_uri() -> str:
    """What the target qemu's `-incoming` names, as seen inside its container."""
    return f"unix:{vm.QMP_DIR_INSIDE}/{INCOMING_SOCKET}"


def _splice(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until either side closes; then close both."""

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
                try:
                    s.shutdown(how)
                except OSError:
                    pass

    t = threading.Thread(target=pump, args=(b, a), daemon=True)
    t.start()
    pump(a, b)
    t.join()
    a.close()
    b.close()


class MigrationListener:
    """The target side: accepts migration streams and passes each to its incoming qemu.

    Parameters
    ----------
    address : str
        HOST:PORT to listen on (port 0: any free port; `address` then holds the bound one).
    incoming : callable
        workload id -> the QMP directory of its incoming qemu once that qemu listens, else
        None.
    """

    def __init__(self, address: str, incoming: Callable[[str], str | None]):
        host, _, port = address.rpartition(":")
        self._sock = socket.create_server((host or "127.0.0.1", int(port)))
        self.address = f"{host or '127.0.0.1'}:{self._sock.getsockname()[1]}"
        self._incoming = incoming
        self._thread = threading.Thread(target=self._serve, name="agent-migration", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10.0)
            line = conn.makefile("rb").readline(4096)
            wid = json.loads(line)["workload_id"]
            qmp_dir = self._incoming(wid)
            path = os.path.join(qmp_dir, INCOMING_SOCKET) if qmp_dir else ""
            if not path or not os.path.exists(path):
                conn.sendall(b"wait\n")
                conn.close()
                return
            qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            qemu.connect(path)
            conn.sendall(b"ready\n")
            conn.settimeout(None)
            log.info("live migration of %s: receiving", wid)
            _splice(conn, qemu)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("migration connection: %s", exc)
            conn.close()

    def close(self) -> None:
        self._sock.close()


@dataclass(frozen=True)
class Outcome:
    """How a live migration ended: done, or why not; qemu's own figures when done."""

    done: bool
    reason: str = ""
    total_ms: int = 0  # qemu's total-time: migrate to completed
    downtime_ms: int = 0  # qemu's downtime: the guest paused for the last pass and the switch


def _connect_ready(address: str, workload_id: str, deadline: float) -> socket.socket | None:
    """A TCP connection to the target agent once it says `ready` for the workload, or None
    at the deadline."""
    host, _, port = address.rpartition(":")
    while time.monotonic() < deadline:
        try:
            conn = socket.create_connection((host, int(port)), timeout=5.0)
            conn.sendall(json.dumps({"workload_id": workload_id}).encode() + b"\n")
            answer = b""
            while not answer.endswith(b"\n"):
                part = conn.recv(16)
                if not part:
                    break
                answer += part
            if answer == b"ready\n":
                conn.settimeout(None)
                return conn
            conn.close()
        except OSError as exc:
            log.debug("migration of %s: target %s: %s", workload_id, address, exc)
        time.sleep(0.2)
    return None


def migrate(qmp_dir: str, address: str, workload_id: str, deadline: float) -> Outcome:
    """Migrate the VM whose QMP directory is `qmp_dir` to the target agent at `address`,
    giving up at `deadline` (monotonic). Done once qemu reports the migration completed (the
    source guest is then stopped, the target's runs); otherwise the reason, and the source
    guest keeps running (qemu resumes it)."""
    conn = _connect_ready(address, workload_id, deadline)
    if conn is None:
        return Outcome(False, f"the target at {address} had no incoming qemu ready in time")
    path = os.path.join(qmp_dir, OUTGOING_SOCKET)
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        server.listen(1)
        server.settimeout(max(1.0, deadline - time.monotonic()))

        def accept_and_splice() -> None:
            try:
                qemu, _ = server.accept()
            except OSError:
                conn.close()
                return
            _splice(qemu, conn)

        pipe = threading.Thread(target=accept_and_splice, daemon=True)
        pipe.start()
        with QmpClient(os.path.join(qmp_dir, vm.QMP_SOCKET), timeout=10.0) as q:
            q.execute("migrate", uri=f"unix:{vm.QMP_DIR_INSIDE}/{OUTGOING_SOCKET}")
            while True:
                info = q.execute("query-migrate")
                status = info.get("status", "")
                if status == "completed":
                    return Outcome(True, "", int(info.get("total-time", 0)), int(info.get("downtime", 0)))
                if status in ("failed", "cancelled"):
                    return Outcome(False, f"qemu's migration {status}: {info.get('error-desc', '')}")
                if time.monotonic() > deadline:
                    q.execute("migrate_cancel")
                    return Outcome(False, "the migration did not finish before the move timeout")
                time.sleep(0.05)
    except (OSError, QmpError) as exc:
        return Outcome(False, str(exc))
    finally:
        server.close()
        try:
            os.unlink(path)
        except OSError:
            pass


def qemu_state(qmp_dir: str) -> str:
    """qemu's run state over QMP ("inmigrate" while it waits for a migration), "" when it
    cannot be reached."""
    try:
        with QmpClient(os.path.join(qmp_dir, vm.QMP_SOCKET), timeout=2.0) as q:
            return q.status()
    except (OSError, QmpError, ValueError):
        return ""
