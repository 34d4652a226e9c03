"""Copy etcd's v3 API protos into protos/etcd/, stripped to what grpcio-tools compiles alone.

Usage: python3 protos/etcd/strip.py <etcd git directory> [commit]

Removed: the grpc-gateway (google.api.http) and openapiv2 annotations, etcd's own
versionpb annotations (which release introduced a field: metadata for etcd's WAL) and
gogoproto options; each is an option only, so the wire format and the gRPC method
paths (/etcdserverpb.KV/Range) stay etcd's. The proto package names are kept; only
the import paths change, so that the generated modules land in hci_scheduler/etcd/.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent
FILES = {  # path in etcd's repository -> path under protos/etcd/
    "api/etcdserverpb/rpc.proto": "hci_scheduler/etcd/etcdserverpb/rpc.proto",
    "api/mvccpb/kv.proto": "hci_scheduler/etcd/mvccpb/kv.proto",
    "api/authpb/auth.proto": "hci_scheduler/etcd/authpb/auth.proto",
}
DROPPED_IMPORTS = ("google/api/", "protoc-gen-openapiv2/", "versionpb/", "gogoproto/")


def _drop_option_blocks(text: str, start: re.Pattern) -> str:
    """Remove every `option (...) = { ... };` whose head matches `start`, braces balanced."""
    out, i = [], 0
    while (m := start.search(text, i)) is not None:
        out.append(text[i:m.start()])
        j = text.index("{", m.end() - 1)
        depth = 0
        while True:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
            if depth == 0:
                break
        j = text.index(";", j) + 1
        i = j
    out.append(text[i:])
    return "".join(out)


def strip(text: str, source: str, commit: str) -> str:
    lines = [ln for ln in text.splitlines()
             if not (ln.startswith("import ") and any(d in ln for d in DROPPED_IMPORTS))]
    text = "\n".join(lines) + "\n"
    text = _drop_option_blocks(text, re.compile(r"option \((?:google\.api\.http|grpc\.gateway\.[\w.]+)\) = \{"))
    text = re.sub(r"[ \t]*option \((?:versionpb|gogoproto)\.\w+\) = [^;]*;\n", "", text)
    text = re.sub(r"\s*\[\((?:versionpb|gogoproto)\.\w+\)\s*=\s*[^\]]*\]", "", text)
    # A service method left with an empty option body reads `{\n  }`: keep it, it is valid proto.
    text = re.sub(r'import "etcd/api/(\w+)/', r'import "hci_scheduler/etcd/\1/', text)
    text = re.sub(r"\n// for grpc-gateway\n", "\n", text)
    head = (f"// Copied from etcd ({source} at commit {commit}), Apache-2.0 (see LICENSE and NOTICE\n"
            "// beside this tree). The google.api.http, openapiv2, versionpb and gogoproto annotations\n"
            "// were removed and the import paths rewritten by protos/etcd/strip.py; nothing else changed.\n")
    return head + text


def main(repo: str, commit: str = "HEAD") -> None:
    sha = subprocess.run(["git", "-C", repo, "rev-parse", commit], check=True, capture_output=True,
                         text=True).stdout.strip()
    for src, dst in FILES.items():
        text = subprocess.run(["git", "-C", repo, "show", f"{sha}:{src}"], check=True, capture_output=True,
                              text=True).stdout
        path = OUT / dst
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(strip(text, src, sha))
    (OUT / "LICENSE").write_text(subprocess.run(["git", "-C", repo, "show", f"{sha}:LICENSE"], check=True,
                                                capture_output=True, text=True).stdout)


if __name__ == "__main__":
    main(*sys.argv[1:])
