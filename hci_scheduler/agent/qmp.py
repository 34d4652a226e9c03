"""A small QMP client: qemu's JSON machine protocol over the unix socket the VM container
exposes in a mounted directory (the agent's only view of the guest's state)."""

from __future__ import annotations

import json
import socket


class QmpError(Exception):
    """qemu answered a command with an error, or the socket closed."""


class QmpClient:
    """One QMP session; the greeting is read and capabilities negotiated on connect.

    Parameters
    ----------
    path : str
        The socket qemu listens on (`-qmp unix:<path>,server=on,wait=off`).
    timeout : float
        Seconds each read or write may take.
    """

    def __init__(self, path: str, timeout: float = 5.0):
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
            self._file = self._sock.makefile("rwb")
            self.greeting = self._read()
            self.execute("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    def _read(self) -> dict:
        while True:
            line = self._file.readline()
            if not line:
                raise QmpError("qemu closed the QMP socket")
            msg = json.loads(line)
            if "event" not in msg:  # asynchronous events are not answers
                return msg

    def execute(self, command: str, **arguments):
        """Run one command; returns its "return" value, raises QmpError on "error"."""
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._file.write(json.dumps(msg).encode() + b"\n")
        self._file.flush()
        if command == "quit":
            # qemu may close the socket before or after it answers.
            try:
                return self._read().get("return")
            except (QmpError, OSError):
                return None
        reply = self._read()
        if "error" in reply:
            raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def status(self) -> str:
        """The run state: "running", "paused", "shutdown", ..."""
        return self.execute("query-status")["status"]

    def vcpus(self) -> int:
        return len(self.execute("query-cpus-fast"))

    def quit(self) -> None:
        self.execute("quit")

    def close(self) -> None:
        try:
            self._file.close()
        finally:
            self._sock.close()

    def __enter__(self) -> "QmpClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
