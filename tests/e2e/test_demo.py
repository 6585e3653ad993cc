"""The README's main job: ``python -m cdp.demo`` runs the daemon and the CLI end to end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from cdp.demo import TOOLS

pytestmark = pytest.mark.integration


def test_demo_runs_and_restores_the_disk() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"the demo needs {', '.join(missing)} (scripts/bootstrap installs them)")
    proc = subprocess.run(
        [sys.executable, "-m", "cdp.demo"],
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard only
        check=False,
        env={**os.environ, "CDP_CONFIG": ""},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    # Every step ran, in order, through the CLI.
    steps = [
        "$ cdp replica serve --config dr.toml",
        "$ cdp daemon --config cdp.toml",
        "$ cdp status --config cdp.toml",
        "$ nbdinfo 'nbd+unix:///disk0?socket=disk0.sock'",
        "$ qemu-io -f raw -c 'write -P 0x5a 48M 1M'",
        "$ cdp checkpoint disk0 --name before-corruption --config cdp.toml",
        "checkpoint before-corruption: seq ",
        "(replica dr1: ",
        "$ cdp restore disk0 --at latest --output latest.raw",
        "restored disk0 at seq ",
        "Images are identical.",
        "the journal's latest point is the disk",
        "$ cdp restore disk0 --at checkpoint:before-corruption --output restored.raw",
        "identical to the disk as it was at the checkpoint",
        "Content mismatch",
        "$ cdp status --config dr.toml",
        "replica of:",
        "$ cdp restore disk0 --at checkpoint:before-corruption --output dr-restored.raw "
        "--config dr.toml",
        "the DR site gives back the disk as it was at the checkpoint",
        "receiver exited with code 0",
        "daemon exited with code 0",
        "Done in ",
    ]
    positions = [out.find(s) for s in steps]
    assert -1 not in positions, [s for s, p in zip(steps, positions, strict=True) if p < 0]
    assert positions == sorted(positions)
    assert "Traceback" not in out + proc.stderr


def test_demo_without_its_tools_fails_cleanly() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cdp.demo"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PATH": "/nonexistent"},
    )
    assert proc.returncode == 1
    assert "run scripts/bootstrap first" in proc.stderr
    assert "Traceback" not in proc.stderr
