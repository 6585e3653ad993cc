"""Config loading: every shipped example loads, every invalid case fails at its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdp.config import (
    Config,
    DaemonConfig,
    NbdSource,
    QemuSource,
    RetentionConfig,
    ScanSource,
    load_config,
)
from cdp.errors import ConfigError
from cdp.units import Address

REPO = Path(__file__).resolve().parents[2]
DEPLOY_CONFIGS = sorted((REPO / "deploy" / "config").glob("*.toml"))
INVALID_CONFIGS = sorted((REPO / "tests" / "data" / "configs" / "invalid").glob("*.toml"))


def write(tmp_path: Path, text: str, name: str = "cdp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def expected_key(path: Path) -> str | None:
    """The key named on the case's first line: ``# expect: volume[0].size``; <file> = None."""
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name}: first line must be '# expect: KEY'"
    key = first.removeprefix("# expect: ").strip()
    return None if key == "<file>" else key


def test_deploy_configs_exist() -> None:
    names = {p.name for p in DEPLOY_CONFIGS}
    assert {"cdp.example.toml", "cdp-minimal.toml", "cdp-replica.example.toml"} <= names


@pytest.mark.parametrize("path", DEPLOY_CONFIGS, ids=lambda p: p.name)
def test_deploy_config_loads(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.path == path


def test_minimal_config_matches_design_brief() -> None:
    config = load_config(REPO / "deploy" / "config" / "cdp-minimal.toml")
    (vol,) = config.volumes
    assert vol.name == "vm1-disk0"
    assert vol.size_bytes == 8 * 2**30
    assert vol.group == "vm1-disk0"
    assert vol.source == NbdSource(
        image=Path("/var/lib/cdp/images/vm1-disk0.raw"),
        listen=Address.unix("/run/cdp/vm1-disk0.sock"),
    )
    assert config.daemon.api == Address.unix("/run/cdp/api.sock")
    assert config.replicas == ()
    assert config.receiver is None


def test_example_config_covers_every_source() -> None:
    config = load_config(REPO / "deploy" / "config" / "cdp.example.toml")
    kinds = {type(v.source) for v in config.volumes}
    assert kinds == {NbdSource, QemuSource, ScanSource}
    assert config.group("vm1") == config.volumes[:2]
    (replica,) = config.replicas
    assert replica.bandwidth_bps == 100_000_000 // 8
    assert config.retention.snapshots.lock_ns == 7 * 86_400 * 10**9


def test_replica_example_uses_receiver_api() -> None:
    config = load_config(REPO / "deploy" / "config" / "cdp-replica.example.toml")
    assert config.receiver is not None
    assert config.api_address() == config.receiver.api


@pytest.mark.parametrize("path", INVALID_CONFIGS, ids=lambda p: p.stem)
def test_invalid_config_names_key(path: Path) -> None:
    key = expected_key(path)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.key == key
    assert str(err).startswith(f"{path}: ")
    if key is not None:
        assert str(err).startswith(f"{path}: {key}: ")
    assert err.exit_code == 2


def test_enough_invalid_cases() -> None:
    assert len(INVALID_CONFIGS) >= 15


def test_issue_example_message_is_exact(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[[volume]]
name = "a"
size = "8GiB"
image = "a.raw"
listen = "unix:a.sock"

[[volume]]
name = "b"
size = "eight"
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f'{path}: volume[1].size: expected a size like "8GiB" (got "eight")'


def test_error_uses_path_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, '[daemon]\nlog_level = "loud"\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config("cdp.toml")
    assert str(info.value).startswith("cdp.toml: daemon.log_level: ")


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert config.daemon == DaemonConfig()
    assert config.volumes == ()
    assert config.retention == RetentionConfig()
    assert config.retention.journal_window_ns == 24 * 3600 * 10**9
    assert config.retention.journal_max_bytes == 50 * 2**30


def test_only_daemon_table_is_valid(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[daemon]\nstate_dir = "/srv/cdp"\n'))
    assert config.daemon.state_dir == Path("/srv/cdp")
    assert config.volumes == ()


def test_missing_file_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert info.value.key is None
    assert "cannot read" in str(info.value)


def test_non_utf8_file_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "cdp.toml"
    path.write_bytes(b'[daemon]\nstate_dir = "\xff"\n')
    with pytest.raises(ConfigError):
        load_config(path)


def test_toml_syntax_error_has_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[daemon]\n\nstate_dir = \n"))
    assert "line 3" in str(info.value)


def test_relative_paths_are_relative_to_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same file must mean the same thing from any working directory (systemd vs shell).
    sub = tmp_path / "etc"
    sub.mkdir()
    path = write(
        sub,
        """
[daemon]
state_dir = "state"
api = "unix:run/api.sock"

[[volume]]
name = "v"
size = "1MiB"
image = "images/v.raw"
listen = "unix:/abs/v.sock"
""",
    )
    monkeypatch.chdir(tmp_path)
    config = load_config(path)
    assert config.daemon.state_dir == sub / "state"
    assert config.daemon.api == Address.unix(str(sub / "run" / "api.sock"))
    src = config.volumes[0].source
    assert isinstance(src, NbdSource)
    assert src.image == sub / "images" / "v.raw"
    assert src.listen == Address.unix("/abs/v.sock")


def test_source_defaults(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
[[volume]]
name = "q"
size = "1GiB"
source = "qemu"
qmp = "127.0.0.1:4444"
node = "drive0"

[[volume]]
name = "s"
size = 1048576
source = "scan"
path = "/dev/null"
""",
        )
    )
    q, s = (v.source for v in config.volumes)
    assert isinstance(q, QemuSource)
    assert q.poll_interval_ns == 5 * 10**9
    assert q.scan_rate_bps == 64 * 2**20
    assert isinstance(s, ScanSource)
    assert s.poll_interval_ns == 60 * 10**9
    assert config.volumes[1].size_bytes == 2**20


def test_loopback_tcp_api_is_allowed(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[daemon]\napi = "[::1]:7480"\n'))
    assert config.daemon.api == Address.tcp("::1", 7480)


def test_log_level_is_case_insensitive(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[daemon]\nlog_level = "DEBUG"\n'))
    assert config.daemon.log_level == "debug"


def test_unknown_key_hint_suggests_close_match(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, '[daemon]\nstat_dir = "/x"\n'))
    assert info.value.hint == "did you mean daemon.state_dir?"


def test_url_credentials_are_not_echoed(tmp_path: Path) -> None:
    text = '[[replica]]\nname = "d"\nurl = "https://u:hunter2@dr:1"\ntoken_file = "t"\n'
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert "hunter2" not in str(info.value)
    assert info.value.__cause__ is None
