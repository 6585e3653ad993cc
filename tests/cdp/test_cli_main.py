"""The cdp command line: parsing, the exit-code table, and Error:/Try: reporting."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from cdp.cli import configcheck_cmd
from cdp.cli.main import EXIT_CODES, exit_code_for, main
from cdp.cli.status_cmd import render_status
from cdp.errors import (
    CdpError,
    ConfigError,
    DaemonUnavailable,
    OperationFailed,
    OutputExists,
    PointNotRetained,
    UsageError,
)

REPO = Path(__file__).resolve().parents[2]
MINIMAL = REPO / "deploy" / "config" / "cdp-minimal.toml"
DEPLOY_CONFIGS = sorted((REPO / "deploy" / "config").glob("*.toml"))
NO_ENV: dict[str, str] = {}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv), environ=NO_ENV)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path: unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="cdp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for verb in ("daemon", "status", "checkpoint", "restore", "journal", "configcheck"):
        assert verb in out


@pytest.mark.parametrize("verb", ["status", "restore", "checkpoint", "journal", "configcheck"])
def test_verb_help_exits_zero(capsys: pytest.CaptureFixture[str], verb: str) -> None:
    code, out, _ = run_cli(capsys, verb, "--help")
    assert code == 0
    assert "--config PATH" in out or verb == "journal"


def test_console_entry_point_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cdp", "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0
    assert "usage: cdp" in proc.stdout


def test_unknown_verb_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "frobnicate")
    assert code == 2
    assert err.startswith("Error: argument VERB: invalid choice: 'frobnicate'")
    assert "Try: cdp --help" in err


def test_no_verb_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys)
    assert code == 2
    assert "Error:" in err


def test_unknown_option_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "status", "--frob")
    assert code == 2
    assert "unrecognized arguments: --frob" in err
    assert "Try: cdp" in err


def test_bad_when_exits_2_with_hint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_file = tmp_path / "out.raw"
    code, _, err = run_cli(
        capsys, "restore", "vm1-disk0", "--at", "yesterday", "--output", str(out_file)
    )
    assert code == 2
    assert 'Error: cannot read WHEN "yesterday"' in err
    assert "Try: WHEN is one of:" in err
    assert not out_file.exists()


def test_naive_time_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(
        capsys,
        "restore",
        "vm1-disk0",
        "--at",
        "2026-11-22T03:15:00",
        "--output",
        str(tmp_path / "o"),
        "--config",
        str(MINIMAL),
    )
    assert code == 2
    assert "no zone" in err


def test_bad_config_exits_2_naming_file_and_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cfg = tmp_path / "cdp.toml"
    cfg.write_text('[[volume]]\nname = "v"\nsize = "eight"\n')
    for argv in (["configcheck"], ["daemon"], ["status"], ["journal", "rebuild-index", "v"]):
        code, _, err = run_cli(capsys, *argv, "--config", str(cfg))
        assert code == 2, argv
        assert err.startswith(f"Error: {cfg}: volume[0].size: "), argv


def test_missing_config_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "configcheck", "--config", str(tmp_path / "nope.toml"))
    assert code == 2
    assert "cannot read" in err


@pytest.mark.parametrize("path", DEPLOY_CONFIGS, ids=lambda p: p.name)
def test_configcheck_accepts_deploy_configs(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    code, out, err = run_cli(capsys, "configcheck", "--config", str(path))
    assert (code, err) == (0, "")
    assert out.startswith(f"OK: {path}")


def test_config_from_environment(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["configcheck"], environ={"CDP_CONFIG": str(MINIMAL)})
    out, _ = capsys.readouterr()
    assert code == 0
    assert str(MINIMAL) in out


def test_config_flag_beats_environment(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["configcheck", "--config", str(MINIMAL)], environ={"CDP_CONFIG": "/nonexistent"})
    capsys.readouterr()
    assert code == 0


def test_config_before_verb(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--config", str(MINIMAL), "configcheck")
    assert code == 0
    assert str(MINIMAL) in out


def test_default_config_path(capsys: pytest.CaptureFixture[str]) -> None:
    if Path("/etc/cdp/cdp.toml").exists():
        pytest.skip("a real /etc/cdp/cdp.toml exists here")
    code, _, err = run_cli(capsys, "configcheck")
    assert code == 2
    assert err.startswith("Error: /etc/cdp/cdp.toml: cannot read")


def test_unknown_volume_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "journal", "rebuild-index", "vm9", "--config", str(MINIMAL))
    assert code == 2
    assert "no volume 'vm9'" in err
    assert "vm1-disk0" in err


def test_checkpoint_needs_volume_or_group(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "checkpoint", "--config", str(MINIMAL))
    assert code == 2
    code, _, err = run_cli(capsys, "checkpoint", "vm1-disk0", "--group", "g")
    assert code == 2
    assert "not allowed with" in err


def test_checkpoint_unknown_group_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "checkpoint", "--group", "nope", "--config", str(MINIMAL))
    assert code == 2
    assert "no group 'nope'" in err


def test_checkpoint_bad_name_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(
        capsys, "checkpoint", "vm1-disk0", "--name", "two words", "--config", str(MINIMAL)
    )
    assert code == 2
    assert "invalid name" in err


def test_restore_refuses_existing_output(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    target = tmp_path / "disk.raw"
    target.write_bytes(b"precious")
    code, _, err = run_cli(
        capsys, "restore", "vm1-disk0", "--at", "latest", "--output", str(target),
        "--config", str(MINIMAL),
    )  # fmt: skip
    assert code == 1
    assert "already exists" in err
    assert "--force" in err
    assert target.read_bytes() == b"precious"


def test_restore_refuses_symlink_even_dangling(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    link = tmp_path / "link.raw"
    link.symlink_to(tmp_path / "elsewhere.raw")
    code, _, err = run_cli(
        capsys, "restore", "vm1-disk0", "--at", "-15m", "--output", str(link),
        "--config", str(MINIMAL),
    )  # fmt: skip
    assert code == 1
    assert "symlink" in err
    assert not (tmp_path / "elsewhere.raw").exists()


@pytest.fixture
def no_daemon(short_dir: Path) -> Path:
    """A config naming vm1-disk0 whose API socket nobody listens on."""
    cfg = short_dir / "cdp.toml"
    cfg.write_text(
        '[daemon]\nstate_dir = "state"\napi = "unix:api.sock"\n'
        '[[volume]]\nname = "vm1-disk0"\nsize = "1MiB"\nsource = "scan"\npath = "d.raw"\n'
    )
    return cfg


@pytest.mark.parametrize("when", ["-15m", "-2h", "-1d", "-1h30m", "latest", "seq:5"])
def test_relative_when_is_a_value_not_an_option(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, no_daemon: Path, when: str
) -> None:
    # argparse would read "-15m" as an unknown option; the WHEN must reach the parser.
    code, _, err = run_cli(
        capsys, "restore", "vm1-disk0", "--at", when, "--output", str(tmp_path / "o.raw"),
        "--config", str(no_daemon),
    )  # fmt: skip
    # Parsed, then stopped at the API, before any output file was made.
    assert code == 1
    assert "cannot reach the cdp daemon" in err
    assert not (tmp_path / "o.raw").exists()


@pytest.mark.parametrize(
    "argv",
    [["checkpoint", "vm1-disk0"], ["checkpoint", "--group", "vm1-disk0", "--name", "x"],
     ["journal", "rebuild-index", "vm1-disk0"], ["status"], ["status", "--json"]],
)  # fmt: skip
def test_client_verbs_without_daemon_exit_1(
    capsys: pytest.CaptureFixture[str], no_daemon: Path, argv: list[str]
) -> None:
    code, out, err = run_cli(capsys, *argv, "--config", str(no_daemon))
    assert (code, out) == (1, "")
    assert err.startswith("Error: cannot reach the cdp daemon at unix:")
    assert "Traceback" not in err


def test_restore_output_folder_must_exist(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run_cli(
        capsys, "restore", "vm1-disk0", "--at", "latest", "--output",
        str(tmp_path / "no" / "such" / "x.raw"), "--config", str(MINIMAL),
    )  # fmt: skip
    assert code == 2
    assert "no such directory" in err


def test_status_without_daemon_exits_1_with_hint(
    capsys: pytest.CaptureFixture[str], short_dir: Path
) -> None:
    cfg = short_dir / "cdp.toml"
    cfg.write_text('[daemon]\napi = "unix:api.sock"\n')
    code, _, err = run_cli(capsys, "status", "--config", str(cfg))
    assert code == 1
    assert f"cannot reach the cdp daemon at unix:{short_dir}/api.sock" in err
    assert "Try: start it" in err


@pytest.fixture
def fake_daemon(short_dir: Path) -> Iterator[Path]:
    """A stand-in API serving GET /v1/status on a unix socket, from a background thread.

    A thread because ``cdp status`` runs its own event loop with asyncio.run.
    """
    sock = short_dir / "api.sock"
    ready = threading.Event()
    loop = asyncio.new_event_loop()

    async def status(request: web.Request) -> web.Response:
        return web.json_response(
            {"volumes": [{"name": "vm1-disk0", "group": "vm1", "journal_bytes": 4096}],
             "alerts": ["history not meeting SLA"]}
        )  # fmt: skip

    app = web.Application()
    app.router.add_get("/v1/status", status)
    runner = web.AppRunner(app)

    async def start() -> None:
        await runner.setup()
        await web.UnixSite(runner, str(sock)).start()
        ready.set()

    def serve() -> None:
        loop.run_until_complete(start())
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    cfg = short_dir / "cdp.toml"
    cfg.write_text('[daemon]\napi = "unix:api.sock"\n')
    yield cfg
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_status_json_passes_document_through(
    capsys: pytest.CaptureFixture[str], fake_daemon: Path
) -> None:
    import json

    code, out, err = run_cli(capsys, "status", "--json", "--config", str(fake_daemon))
    assert (code, err) == (0, "")
    assert json.loads(out)["volumes"][0]["name"] == "vm1-disk0"


def test_status_human_table(capsys: pytest.CaptureFixture[str], fake_daemon: Path) -> None:
    code, out, _ = run_cli(capsys, "status", "--config", str(fake_daemon))
    assert code == 0
    assert "NAME" in out and "vm1-disk0" in out
    assert "history not meeting SLA" in out


def test_render_status_is_generic() -> None:
    text = render_status({"site": "primary", "alerts": [], "volumes": [{"name": "a", "lag": None}]})
    assert "site: primary" in text
    assert "alerts: none" in text
    assert "NAME  LAG" in text


def test_daemon_start_failure_exits_1_without_traceback(short_dir: Path) -> None:
    # A subprocess, since the daemon configures the root logger of the process it runs in.
    # The API path is taken by a regular file, which the daemon must not replace.
    (short_dir / "api.sock").write_text("not a socket")
    cfg = short_dir / "cdp.toml"
    cfg.write_text('[daemon]\nstate_dir = "state"\napi = "unix:api.sock"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "cdp", "daemon", "--config", str(cfg)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "CDP_CONFIG": ""},
        timeout=60,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"Error: the daemon stopped: {short_dir}/api.sock exists and is not a socket" in (
        proc.stderr
    )
    assert (short_dir / "api.sock").read_text() == "not a socket"


def test_daemon_unusable_state_dir_exits_1(short_dir: Path) -> None:
    (short_dir / "state").write_text("a file, not a folder")
    cfg = short_dir / "cdp.toml"
    cfg.write_text('[daemon]\nstate_dir = "state"\napi = "unix:api.sock"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "cdp", "daemon", "--config", str(cfg)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"Error: cannot use state_dir {short_dir}/state: ")
    assert not (short_dir / "api.sock").exists()


def test_debug_prints_traceback(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "configcheck", "--debug", "--config", str(tmp_path / "x"))
    assert code == 2
    assert "Traceback" in err
    code, _, err = run_cli(capsys, "configcheck", "--config", str(tmp_path / "x"))
    assert "Traceback" not in err


def test_bug_prints_traceback_and_exits_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(args: object) -> int:
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(configcheck_cmd, "run", broken)
    code, _, err = run_cli(capsys, "configcheck", "--config", str(MINIMAL))
    assert code == 1
    assert "Traceback" in err
    assert "Error: internal error: ZeroDivisionError: oops (this is a bug)" in err


def test_interrupt_exits_130(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(configcheck_cmd, "run", interrupted)
    code, _, err = run_cli(capsys, "configcheck", "--config", str(MINIMAL))
    assert code == 130
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "cls",
    [CdpError, UsageError, ConfigError, DaemonUnavailable, OperationFailed, PointNotRetained,
     OutputExists],
)  # fmt: skip
def test_exit_table_agrees_with_class_codes(cls: type[CdpError]) -> None:
    # The table is what the CLI uses; the ClassVar is what other code sees. They must agree.
    exc = cls.__new__(cls)
    assert exit_code_for(exc) == cls.exit_code
    assert cls.exit_code in (1, 2)


def test_exit_codes_per_contract() -> None:
    assert EXIT_CODES[UsageError] == 2
    assert EXIT_CODES[ConfigError] == 2
    assert EXIT_CODES[OperationFailed] == 1


def test_foreign_error_uses_its_exit_code() -> None:
    class JournalLike(Exception):
        exit_code = 12

    assert exit_code_for(JournalLike()) == 12
    assert exit_code_for(RuntimeError()) == 1
    assert exit_code_for(FileNotFoundError()) == 1


def test_point_not_retained_message_names_window() -> None:
    err = PointNotRetained.outside_window("-3d", 1_795_317_300 * 10**9, 1_795_403_700 * 10**9)
    assert str(err) == (
        "no retained point for -3d: the journal holds 2026-11-22T03:15:00Z to 2026-11-23T03:15:00Z"
    )
    assert "empty" in str(PointNotRetained.outside_window("latest", None, None))
