"""The agent's durable memory: the last event sequence it applied, the log incarnation it
belongs to, and the specs of the workloads that sequence puts on its host (with the NUMA node
of record of each NUMA-fit VM), written together
and atomically (temp file, fsync, rename, fsync of the directory), so a restarted agent resumes
the watch without a gap and without a listing."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field

STATE_FILE = "agent-state.json"
FORMAT = 1


@dataclass
class AgentState:
    sequence: int = 0
    incarnation: str = ""
    specs: dict[str, bytes] = field(default_factory=dict)  # workload id -> Workload bytes
    # workload id -> its NUMA node of record; None: a file of an agent that kept none (the
    # agent then lists its allocations rather than re-pin its VMs to no node)
    numa: dict[str, int] | None = field(default_factory=dict)


def load(state_dir: str) -> AgentState | None:
    """The saved state, or None when there is none (a first start: list, then watch)."""
    path = os.path.join(state_dir, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        return None
    if raw.get("format") != FORMAT:
        return None
    return AgentState(
        int(raw["sequence"]),
        raw.get("incarnation", ""),
        {k: base64.b64decode(v) for k, v in raw.get("specs", {}).items()},
        {k: int(v) for k, v in raw["numa"].items()} if "numa" in raw else None,
    )


def save(state_dir: str, state: AgentState) -> None:
    os.makedirs(state_dir, exist_ok=True)
    path = os.path.join(state_dir, STATE_FILE)
    tmp = path + ".tmp"
    body = {
        "format": FORMAT,
        "sequence": state.sequence,
        "incarnation": state.incarnation,
        "specs": {k: base64.b64encode(v).decode() for k, v in sorted(state.specs.items())},
        "numa": dict(sorted((state.numa or {}).items())),
    }
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(body, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
