"""Steps shared by the guest end-to-end tests (a guest per mode, checksums it prints)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.guest.vm import GuestKernel, GuestResult, boot_guest


def need_tools(*tools: str) -> None:
    for t in tools:
        if shutil.which(t) is None and shutil.which(t, path="/usr/sbin:/sbin") is None:
            pytest.skip(f"{t} is not installed (deploy/packages.txt; scripts/bootstrap)")


def boot_mode(
    kernel: GuestKernel, drive: str, mode: str, log: Path, *, timeout_s: float = 300
) -> GuestResult:
    """Boot the guest with ``cdp.mode=MODE`` (its workload script branches on it)."""
    result = boot_guest(
        kernel, drive, timeout_s=timeout_s, kernel_args=[f"cdp.mode={mode}"], log_path=log
    ).check()
    assert result.value("mode") == mode, result.describe()
    return result


def printed_sums(result: GuestResult, files: Sequence[str]) -> dict[str, str]:
    """The ``CDP-GUEST: FILE=sha256`` markers, one per file, all present."""
    sums = {f: result.value(f) for f in files}
    missing = [f for f, s in sums.items() if not s]
    assert not missing, f"the guest printed no checksum for {missing}: {result.markers}"
    return {f: s for f, s in sums.items() if s}
