"""The Docker Engine agent: makes the scheduler's placements run on one Docker host.

Modules, one idea each: images (offline images by `docker import`), runtime (containers through
the docker SDK), vm (a KVM guest as a qemu container), qmp (talking to qemu), hostinfo (the host
as the engine reports it), statefile (the applied sequence and desired workloads, atomically),
agent (registration, heartbeat, watch, reconcile), demo (`hci-scheduler demo --docker`).
"""
