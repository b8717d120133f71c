"""Regenerate coformer_pb2.py / coformer_pb2_grpc.py from coformer.proto (run after editing the .proto).

Usage: ``python plugins/transports/coformer_transports/proto/regenerate.py`` (needs grpcio-tools).
The generated import of ``coformer_pb2`` is made package-relative so the modules import from here.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc


def main() -> int:
    """Run protoc on coformer.proto and patch the generated grpc module's import."""
    here = Path(__file__).resolve().parent
    rc = protoc.main(["protoc", f"-I{here}", f"--python_out={here}", f"--grpc_python_out={here}",
                      str(here / "coformer.proto")])
    if rc != 0:
        return rc
    grpc_mod = here / "coformer_pb2_grpc.py"
    text = grpc_mod.read_text()
    text = re.sub(r"^import coformer_pb2 as", "from . import coformer_pb2 as", text, flags=re.M)
    grpc_mod.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
