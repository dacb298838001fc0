"""gRPC core logs to stderr on its own (C++ lines such as "I1207 ... fork_posix.cc ...
skipping fork() handlers"), past Python's logging, and reads how much from its environment
when it loads. The ``sessionmesh`` command imports this first, so that by default only
gRPC core's errors show; ``--grpc-logs`` (or setting ``GRPC_VERBOSITY``) shows the rest."""

from __future__ import annotations

import os
import sys

if "--grpc-logs" not in sys.argv[1:]:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
