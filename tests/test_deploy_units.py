"""The systemd units in deploy/systemd keep their hardening and start the documented commands."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
UNIT_DIR = REPO_ROOT / "deploy" / "systemd"
UNITS = sorted(UNIT_DIR.glob("*.service"))
VENV_CDP = "/opt/cdp/.venv/bin/cdp"

Unit = dict[str, dict[str, list[str]]]

# [Service] key -> required value (compared after whitespace normalisation)
REQUIRED_SERVICE: dict[str, str] = {
    "Restart": "on-failure",
    "RuntimeDirectory": "cdp",
    "StateDirectory": "cdp",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "NoNewPrivileges": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RestrictRealtime": "yes",
    "SystemCallArchitectures": "native",
    "UMask": "0077",
    "KillSignal": "SIGTERM",
    "TimeoutStopSec": "60",
}

EXPECTED_EXEC = {
    "cdp.service": f"{VENV_CDP} daemon --config /etc/cdp/cdp.toml",
    "cdp-replica.service": f"{VENV_CDP} replica serve --config /etc/cdp/cdp-replica.toml",
}


def parse_unit(text: str) -> Unit:
    """Parse a systemd unit file: sections of repeatable ``Key=Value`` lines.

    configparser cannot be used as is: systemd allows repeated keys and ``\\`` line
    continuation. An empty assignment (``Key=``) resets the list, as in systemd.
    """
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith(("#", ";")):  # comments, also between continued lines
            continue
        line, pending = pending + stripped, ""
        if not line:
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        if section is None or "=" not in line:
            raise ValueError(f"not a unit file line: {raw!r}")
        key, value = (part.strip() for part in line.split("=", 1))
        if value:
            section.setdefault(key, []).append(value)
        else:
            section[key] = []
    if pending:
        raise ValueError("unit file ends in a line continuation")
    return unit


def last(unit: Unit, section: str, key: str) -> str | None:
    values = unit.get(section, {}).get(key)
    return " ".join(values[-1].split()) if values else None


def words(unit: Unit, section: str, key: str) -> set[str]:
    return {w for v in unit.get(section, {}).get(key, []) for w in v.split()}


def test_units_present() -> None:
    assert {p.name for p in UNITS} >= set(EXPECTED_EXEC)


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_unit_hardening(path: Path) -> None:
    unit = parse_unit(path.read_text(encoding="utf-8"))
    assert "Service" in unit, f"{path.name}: no [Service] section"
    problems = [
        f"{key}={last(unit, 'Service', key)!r}, want {want!r}"
        for key, want in REQUIRED_SERVICE.items()
        if last(unit, "Service", key) != want
    ]
    if last(unit, "Service", "Type") not in {"simple", "notify"}:
        problems.append(f"Type={last(unit, 'Service', 'Type')!r}, want simple or notify")
    if "/var/lib/cdp" not in words(unit, "Service", "ReadWritePaths"):
        problems.append("ReadWritePaths lacks /var/lib/cdp")
    families = words(unit, "Service", "RestrictAddressFamilies")
    if families != {"AF_UNIX", "AF_INET", "AF_INET6"}:
        problems.append(f"RestrictAddressFamilies={sorted(families)}")
    if not words(unit, "Install", "WantedBy"):
        problems.append("no [Install] WantedBy=")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", sorted(EXPECTED_EXEC))
def test_unit_exec_start(name: str) -> None:
    unit = parse_unit((UNIT_DIR / name).read_text(encoding="utf-8"))
    assert unit["Service"]["ExecStart"] == [EXPECTED_EXEC[name]]


def test_parser_reads_systemd_syntax() -> None:
    unit = parse_unit(
        "# comment\n; also\n[Service]\nExecStartPre=/bin/a\nExecStartPre=/bin/b\n"
        "ReadWritePaths=/var/lib/x \\\n  /srv/y\nEnvironment=A=1\n"
        "RestrictAddressFamilies=AF_UNIX\nRestrictAddressFamilies=\n[Install]\nWantedBy=x\n"
    )
    assert unit["Service"]["ExecStartPre"] == ["/bin/a", "/bin/b"]
    assert words(unit, "Service", "ReadWritePaths") == {"/var/lib/x", "/srv/y"}
    assert last(unit, "Service", "Environment") == "A=1"
    assert words(unit, "Service", "RestrictAddressFamilies") == set()
    with pytest.raises(ValueError):
        parse_unit("[Service]\nnot a key value line\n")


def test_hardening_check_catches_missing_key(tmp_path: Path) -> None:
    text = (UNIT_DIR / "cdp.service").read_text(encoding="utf-8")
    weakened = tmp_path / "cdp.service"
    weakened.write_text(text.replace("ProtectSystem=strict", "ProtectSystem=full"))
    with pytest.raises(AssertionError, match="ProtectSystem"):
        test_unit_hardening(weakened)


# --- systemd-analyze verify -----------------------------------------------------------------


def _systemd_analyze_verify(unit_dir: Path, *names: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(unit_dir / n) for n in names)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
        check=False,
    )


@pytest.fixture
def verify_dir(tmp_path: Path) -> Path:
    """A directory for units to verify, once systemd-analyze is shown to work here."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    probe = tmp_path / "cdp-probe.service"
    probe.write_text("[Service]\nType=simple\nExecStart=/bin/true\n")
    try:
        result = _systemd_analyze_verify(tmp_path, probe.name)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"systemd-analyze verify does not run here: {exc}")
    if result.returncode != 0 or result.stderr.strip():
        pytest.skip(f"systemd-analyze verify fails on a trivial unit here: {result.stderr}")
    probe.unlink()
    return tmp_path


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verify(path: Path, verify_dir: Path, tmp_path: Path) -> None:
    # verify insists that ExecStart= exists; stand in an executable for the installed cdp.
    fake_cdp = tmp_path / "cdp"
    fake_cdp.write_text("#!/bin/sh\nexit 0\n")
    fake_cdp.chmod(0o755)
    text = path.read_text(encoding="utf-8").replace(VENV_CDP, str(fake_cdp))
    (verify_dir / path.name).write_text(text)
    result = _systemd_analyze_verify(verify_dir, path.name)
    # Unknown keys or bad values are only warnings (exit 0): any line about our unit fails.
    ours = [line for line in result.stderr.splitlines() if path.name in line]
    assert result.returncode == 0 and not ours, result.stderr
