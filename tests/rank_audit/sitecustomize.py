"""Test helper: records every file that a process of rank other than 0 opens
for writing, creates, renames or removes under ``$AVL_GENREPLAY_AUDIT_DIR``.

Python imports ``sitecustomize`` at start-up from the first folder of the
path that holds one: the distributed tests put this folder first on the
``PYTHONPATH`` of the processes they start, which report what they wrote in
:data:`WRITES` and on stderr (lines starting ``audit:``).
"""

import os
import sys

WATCHED = os.environ.get("AVL_GENREPLAY_AUDIT_DIR")
WRITES = []
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND
_CHANGES = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate")


def _watched(path) -> bool:
    if not isinstance(path, (str, bytes, os.PathLike)):
        return False  # a file descriptor
    return os.path.abspath(os.fsdecode(path)).startswith(WATCHED)


def _audit(event, args):
    rank = os.environ.get("RANK", "0")
    if rank == "0":  # the main process, or a process outside torchrun
        return
    if event == "open":
        path, mode, flags = args
        if mode is not None:
            writing = any(c in str(mode) for c in "wax+")
        else:
            writing = bool((flags or 0) & _WRITE_FLAGS)
        paths = [path] if writing else []
    elif event in _CHANGES:
        paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
    else:
        return
    for path in paths:
        if _watched(path):
            WRITES.append((event, os.fsdecode(path)))
            print(f"audit: rank {rank} {event} {os.fsdecode(path)}", file=sys.stderr)


if WATCHED:
    WATCHED = os.path.abspath(WATCHED)
    sys.addaudithook(_audit)
