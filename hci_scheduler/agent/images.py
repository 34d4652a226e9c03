"""Offline images: a root filesystem tarball built in Python, then `docker import`.

There is no registry to pull from, so the two images the agent needs are made from what the
host has installed: `hci-scheduler/busybox:<version>` (the static busybox with its applet
links, for containers) and `hci-scheduler/qemu:<version>` (the host's qemu-system-x86_64 with
its shared libraries, accel modules and firmware, plus busybox, for VMs). The tarball is
deterministic (sorted members, zero mtimes and owners), so its sha256 names the content: an
image whose `io.hci-scheduler.content-hash` label matches is not imported again.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field

from ..errors import NotFound

BUSYBOX_REPO = "hci-scheduler/busybox"
QEMU_REPO = "hci-scheduler/qemu"
CONTENT_HASH_LABEL = "io.hci-scheduler.content-hash"
QEMU_BINARY = "qemu-system-x86_64"
# Where Debian and Fedora keep qemu's firmware and loadable modules (accel-tcg-*.so).
QEMU_DATA_DIRS = (
    "/usr/share/qemu",
    "/usr/share/seabios",
    "/usr/share/ipxe/qemu",
    "/usr/lib/ipxe/qemu",
)
QEMU_MODULE_DIRS = ("/usr/lib/x86_64-linux-gnu/qemu", "/usr/lib64/qemu", "/usr/lib/qemu")


@dataclass
class RootFs:
    """Files of an image: path inside the image -> source path on the host, plus symlinks."""

    files: dict[str, str] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)  # path inside -> link target
    dirs: set[str] = field(default_factory=set)

    def add_file(self, inside: str, source: str) -> None:
        inside = inside.lstrip("/")
        self.files[inside] = source
        self._parents(inside)

    def add_link(self, inside: str, target: str) -> None:
        inside = inside.lstrip("/")
        self.links[inside] = target
        self._parents(inside)

    def add_tree(self, source_dir: str, inside_dir: str | None = None) -> None:
        """Every regular file under source_dir; symlinks are followed (a link pointing outside
        the tree, as Debian's /usr/share/qemu/bios.bin -> ../seabios/bios.bin, would dangle)
        and dangling ones skipped."""
        inside_dir = source_dir if inside_dir is None else inside_dir
        for root, dirnames, names in os.walk(source_dir, followlinks=True):
            dirnames.sort()
            for name in sorted(names):
                src = os.path.join(root, name)
                if os.path.isfile(src):
                    self.add_file(os.path.join(inside_dir, os.path.relpath(src, source_dir)), src)

    def _parents(self, inside: str) -> None:
        parent = os.path.dirname(inside)
        while parent and parent not in self.dirs:
            self.dirs.add(parent)
            parent = os.path.dirname(parent)

    def write_tar(self, out) -> str:
        """Write the tarball to a binary file object; returns its sha256 hex digest."""
        digest = hashlib.sha256()

        class _Hashing(io.RawIOBase):
            def writable(self):
                return True

            def write(self, b):
                digest.update(b)
                return out.write(b)

        with tarfile.open(fileobj=_Hashing(), mode="w|", format=tarfile.GNU_FORMAT) as tar:
            for d in sorted(self.dirs | {"tmp", "run"}):
                info = tarfile.TarInfo(d)
                info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d in ("tmp",) else 0o755
                tar.addfile(info)
            for inside in sorted(self.links):
                info = tarfile.TarInfo(inside)
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, self.links[inside], 0o777
                tar.addfile(info)
            for inside in sorted(self.files):
                src = self.files[inside]
                st = os.stat(src)
                info = tarfile.TarInfo(inside)
                info.size, info.mode = st.st_size, st.st_mode & 0o7777
                with open(src, "rb") as f:
                    tar.addfile(info, f)
        return digest.hexdigest()


def _which(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise NotFound(
            f"{name} is not installed on this machine (needed to build the offline images)"
        )
    return os.path.realpath(path)


def _version(cmd: list[str], pattern: str) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    m = re.search(pattern, out)
    return m.group(1) if m else "latest"


def add_busybox(fs: RootFs) -> str:
    """The static busybox at /bin/busybox with a link per applet; returns its version."""
    busybox = _which("busybox")
    fs.add_file("bin/busybox", busybox)
    applets = subprocess.run(
        [busybox, "--list"], capture_output=True, text=True, timeout=30
    ).stdout.split()
    for applet in applets:
        if applet != "busybox":
            fs.add_link(f"bin/{applet}", "busybox")
    return _version([busybox], r"BusyBox v([0-9][0-9.]*)")


def shared_libraries(binary: str) -> list[str]:
    """The libraries `ldd` resolves for a binary, the dynamic loader included."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=30).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)", line)
        if m:
            libs.append(m.group(1))
    return libs


def busybox_rootfs() -> tuple[RootFs, str]:
    fs = RootFs()
    return fs, add_busybox(fs)


def qemu_rootfs() -> tuple[RootFs, str]:
    """qemu-system-x86_64, its libraries (at the paths ldd gives, so the loader finds them),
    its loadable modules (the TCG accelerator is one in Debian) and firmware, plus busybox."""
    fs = RootFs()
    add_busybox(fs)
    qemu = _which(QEMU_BINARY)
    fs.add_file(f"usr/bin/{QEMU_BINARY}", qemu)
    binaries = [qemu]
    for d in QEMU_MODULE_DIRS:
        if os.path.isdir(d):
            for name in sorted(os.listdir(d)):
                # Only the accelerators: the UI, audio and block modules pull in GTK, ALSA...
                if name.startswith("accel-") and name.endswith(".so"):
                    fs.add_file(os.path.join(d, name), os.path.join(d, name))
                    binaries.append(os.path.join(d, name))
    for binary in binaries:
        for lib in shared_libraries(binary):
            fs.add_file(lib, os.path.realpath(lib))
    for d in QEMU_DATA_DIRS:
        if os.path.isdir(d):
            fs.add_tree(d)
    return fs, _version([qemu, "--version"], r"version ([0-9][0-9.]*)")


@dataclass
class BuiltImage:
    name: str
    content_hash: str
    imported: bool  # False when an image with the same content was already there


def build_image(client, repository: str, fs: RootFs, version: str, extra_changes=()) -> BuiltImage:
    """Import `fs` as repository:version unless that tag already carries the same content hash."""
    import docker.errors

    name = f"{repository}:{version}"
    with tempfile.TemporaryFile() as tmp:
        content_hash = fs.write_tar(tmp)
        try:
            existing = client.images.get(name)
            if existing.labels.get(CONTENT_HASH_LABEL) == content_hash:
                return BuiltImage(name, content_hash, imported=False)
        except docker.errors.ImageNotFound:
            pass
        tmp.seek(0)
        changes = [f"LABEL {CONTENT_HASH_LABEL}={content_hash}", *extra_changes]
        client.api.import_image_from_data(tmp, repository=repository, tag=version, changes=changes)
    return BuiltImage(name, content_hash, imported=True)


def build_all(client) -> list[BuiltImage]:
    """Both offline images (busybox, then the qemu launcher), in that order."""
    fs, version = busybox_rootfs()
    out = [build_image(client, BUSYBOX_REPO, fs, version, ['CMD ["/bin/sh"]'])]
    fs, version = qemu_rootfs()
    out.append(
        build_image(client, QEMU_REPO, fs, version, [f'ENTRYPOINT ["/usr/bin/{QEMU_BINARY}"]'])
    )
    return out


def image_names() -> tuple[str, str]:
    """The names build_all gives, without building (the versions of the installed tools)."""
    busybox = _version([_which("busybox")], r"BusyBox v([0-9][0-9.]*)")
    qemu = _version([_which(QEMU_BINARY), "--version"], r"version ([0-9][0-9.]*)")
    return f"{BUSYBOX_REPO}:{busybox}", f"{QEMU_REPO}:{qemu}"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="images_command", required=True, metavar="ACTION")
    b = sub.add_parser(
        "build", help="build the busybox and qemu images offline; prints their names"
    )
    b.add_argument(
        "--docker-host",
        default=os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"),
        help="the engine's URL (env DOCKER_HOST)",
    )


def run(args) -> int:
    import docker

    client = docker.DockerClient(base_url=args.docker_host, timeout=600)
    try:
        for image in build_all(client):
            print(image.name)
    finally:
        client.close()
    return 0
