"""Unix socket paths: make room for a listener without ever deleting a non-socket file."""

from __future__ import annotations

import os
import stat


def prepare_socket_path(path: str, *, mode: int = 0o750) -> None:
    """Create the folder and remove a stale socket; refuse to replace anything else."""
    os.makedirs(os.path.dirname(path) or ".", mode=mode, exist_ok=True)
    remove_socket(path)


def remove_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
    os.remove(path)
