"""Builds the Cython core and generates the gRPC modules from protos/.

SCHED_CORE_DEBUG=1 turns bounds and wraparound checks back on (CI runs the
core tests once that way).
"""
import os
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup
from setuptools.command.build_py import build_py

DEBUG = os.environ.get("SCHED_CORE_DEBUG") == "1"
ROOT = Path(__file__).parent.resolve()

directives = {
    "language_level": "3",
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "nonecheck": False,
}

extensions = [
    Extension(
        f"sched_core.{path.stem}",
        [str(path.relative_to(ROOT))],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"] if not DEBUG else ["-O0", "-g"],
    )
    for path in sorted((ROOT / "sched_core").glob("*.pyx"))
] + [
    # The Place request's plain workloads decoded from the wire (see the module docstring).
    # Absent from the scratch copy in which CI builds the core alone with bounds checks on.
    Extension("hci_scheduler.server.wire", ["hci_scheduler/server/wire.pyx"],
              extra_compile_args=["-O3"] if not DEBUG else ["-O0", "-g"])
    for path in [ROOT / "hci_scheduler" / "server" / "wire.pyx"] if path.exists()
]


def _protoc(root: Path, protos: list, include: str) -> None:
    from grpc_tools import protoc

    args = ["grpc_tools.protoc", f"-I{root}", f"-I{include}",
            f"--python_out={ROOT}", f"--grpc_python_out={ROOT}", f"--pyi_out={ROOT}"]
    args += [str(p) for p in protos]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + " ".join(map(str, protos)))


def generate_protos() -> None:
    """Compile protos/ into hci_scheduler/v1, and etcd's v3 API protos (protos/etcd/, their own
    include root) into hci_scheduler/etcd (generated, git-ignored, never edited)."""
    etcd_root = ROOT / "protos" / "etcd"
    protos = sorted(p for p in (ROOT / "protos").rglob("*.proto") if etcd_root not in p.parents)
    etcd_protos = sorted(etcd_root.rglob("*.proto")) if etcd_root.is_dir() else []
    if not protos and not etcd_protos:
        return
    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    if protos:
        _protoc(ROOT / "protos", protos, include)
        (ROOT / "hci_scheduler" / "v1" / "__init__.py").touch()
    if etcd_protos:
        _protoc(etcd_root, etcd_protos, include)
        for p in etcd_protos:  # hci_scheduler/etcd and each proto package in it are packages
            for pkg in (ROOT / p.parent.relative_to(etcd_root), ROOT / "hci_scheduler" / "etcd"):
                (pkg / "__init__.py").touch()


class BuildWithProtos(build_py):
    def run(self):
        generate_protos()
        super().run()


generate_protos()
setup(
    # bench/ stays at the top of the repository but is installed inside the project's namespace.
    # (Absent from the scratch copy in which CI builds the core alone.)
    packages=find_packages(include=["hci_scheduler", "hci_scheduler.*", "sched_core", "sched_core.*"])
    + (["hci_scheduler.bench"] if (ROOT / "bench").is_dir() else []),
    package_dir={"hci_scheduler.bench": "bench"},
    ext_modules=cythonize(extensions, compiler_directives=directives, annotate=False),
    cmdclass={"build_py": BuildWithProtos},
)
