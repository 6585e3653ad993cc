"""The TOML config file: load, validate, and turn it into frozen dataclasses.

``load_config(path)`` is the only way in. Validation happens completely before anything is
started (issue 3: "exit code 2, nothing started"); the first problem found raises a
:class:`~cdp.errors.ConfigError` naming the file as given, the key and the value, e.g.
``cdp.toml: volume[1].size: expected a size like "8GiB" (got "eight")``.

Rules the design brief leaves open, decided here (also in ``docs/config.md``):

* Key paths use the TOML names and **0-based** array indexes: ``volume[0].size`` is the first
  ``[[volume]]``; ``replica[2].url`` the third ``[[replica]]``.
* Every table is optional and has defaults; an **empty file is a valid config** (a daemon with
  no volumes, default state_dir and api), as is one with only ``[daemon]``.
* Unknown tables and keys are errors, with a "did you mean" hint; so are keys that belong to
  another ``source`` (``qmp`` on an nbd volume), because they usually mean a wrong source.
* **Relative paths are relative to the folder holding the config file**, not to the working
  directory, so a config means the same thing under systemd and in a shell. This covers every
  path key and the PATH of ``unix:`` addresses. ``~`` and ``$VARS`` are not expanded.
* A unix socket path must fit the kernel's 107-byte limit; checked here rather than failing
  at bind time with an unhelpful message.
* ``[daemon] log_format``, ``log_level`` and ``event_loop`` apply to every cdp service started
  with this file, including ``cdp replica serve``.
* ``[receiver]`` defaults differ from ``[daemon]`` (``/var/lib/cdp/replica``,
  ``unix:/run/cdp/replica.sock``: inside the ``StateDirectory=cdp`` / ``RuntimeDirectory=cdp``
  that ``deploy/systemd`` grants, yet distinct) so both services can run on one host; they may
  not share a state_dir or api address.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Final, Literal, TypeAlias, TypeVar, cast
from urllib.parse import urlsplit

from cdp.errors import NO_VALUE, ConfigError
from cdp.units import (
    Address,
    parse_address,
    parse_duration,
    parse_rate,
    parse_size,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "NAME_RE",
    "Config",
    "DaemonConfig",
    "DetectorSettings",
    "HooksConfig",
    "NbdSource",
    "NbdTlsMode",
    "QemuSource",
    "ReceiverConfig",
    "ReplicaConfig",
    "RetentionConfig",
    "ScanSource",
    "SnapshotGrid",
    "Source",
    "VolumeConfig",
    "load_config",
    "parse_config",
]

DEFAULT_CONFIG_PATH: Final = "/etc/cdp/cdp.toml"

# Volume, group and replica names become file names and NBD export names and are typed on
# command lines, so: ASCII letters, digits, ".", "_", "-"; not starting with "." or "-".
NAME_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")

# sun_path is 108 bytes on Linux, including the terminating NUL.
_UNIX_PATH_MAX: Final = 107

_DEFAULT_API: Final = Address.unix("/run/cdp/api.sock")
_DEFAULT_RECEIVER_API: Final = Address.unix("/run/cdp/replica.sock")
_DEFAULT_RECEIVER_STATE: Final = Path("/var/lib/cdp/replica")
_DEFAULT_HOOK_TIMEOUT_NS: Final = 30 * 10**9

LogFormat: TypeAlias = Literal["text", "json"]
LogLevel: TypeAlias = Literal["debug", "info", "warning", "error", "critical"]
EventLoop: TypeAlias = Literal["uvloop", "asyncio"]
NbdTlsMode: TypeAlias = Literal["require", "allow"]
Compression: TypeAlias = Literal["zstd", "none"]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """``[daemon]``: where the primary-site service keeps state and serves its API."""

    state_dir: Path = Path("/var/lib/cdp")
    api: Address = _DEFAULT_API
    log_format: LogFormat = "text"
    log_level: LogLevel = "info"
    event_loop: EventLoop = "uvloop"


@dataclass(frozen=True, slots=True)
class NbdSource:
    """``source = "nbd"``: cdp serves the volume over NBD and journals writes as they pass.

    ``image`` is the backing raw file (may already hold data); ``listen`` is where the VM's
    NBD client connects. The NBD export name is the volume name. With ``tls_cert`` and
    ``tls_key`` (TCP listen only) the server offers ``NBD_OPT_STARTTLS``; ``tls`` is
    ``"require"`` (the spec's FORCEDTLS: nothing but STARTTLS/ABORT before TLS) or
    ``"allow"`` (plaintext clients are served too).
    """

    kind: ClassVar[str] = "nbd"
    image: Path
    listen: Address
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls: NbdTlsMode = "require"


@dataclass(frozen=True, slots=True)
class QemuSource:
    """``source = "qemu"``: poll a running QEMU's dirty bitmap on block node ``node`` via QMP.

    ``scan_rate`` limits the hash comparison used when the bitmap is lost.
    """

    kind: ClassVar[str] = "qemu"
    qmp: Address
    node: str
    poll_interval_ns: int
    scan_rate_bps: int


@dataclass(frozen=True, slots=True)
class ScanSource:
    """``source = "scan"``: re-read ``path`` every poll and journal the blocks whose hash changed.

    The fallback for anything without change tracking; ``scan_rate`` keeps it from starving
    the VM (invariant 10).
    """

    kind: ClassVar[str] = "scan"
    path: Path
    poll_interval_ns: int
    scan_rate_bps: int


Source: TypeAlias = NbdSource | QemuSource | ScanSource


@dataclass(frozen=True, slots=True)
class VolumeConfig:
    """One ``[[volume]]``: a protected block device and how its writes are captured."""

    name: str
    size_bytes: int
    group: str
    source: Source
    detect: bool = True  # the corruption detector watches it (``detect = false`` opts out)


@dataclass(frozen=True, slots=True)
class SnapshotGrid:
    """``[retention.snapshots]``: how many scheduled snapshots of each period to keep.

    All zero (the default) means no scheduled snapshots. ``lock_ns``, when set, makes each
    scheduled snapshot immutable for that long after it is taken.
    """

    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    lock_ns: int | None = None


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """``[retention]``: how far back any-point-in-time recovery reaches, and its size cap.

    When the journal reaches ``journal_max_bytes`` it keeps less history than
    ``journal_window_ns`` and says so in status (the "two SLAs" lesson).
    """

    journal_window_ns: int = 24 * 3600 * 10**9
    journal_max_bytes: int = 50 * 2**30
    snapshots: SnapshotGrid = field(default_factory=SnapshotGrid)


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    """One ``[[replica]]``: a DR-site receiver every group is shipped to.

    ``bandwidth_bps`` None means unlimited. ``coalesce_ns`` > 0 lets the sender wait that long
    to fill a batch and ship only the last version of a block rewritten within it (coarser DR
    history, fewer bytes); 0 (default) ships every write. ``high_water_bytes``: pending bytes
    above it raise an alert (data is never dropped).
    """

    name: str
    url: str
    token_file: Path
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    bandwidth_bps: int | None = None
    compression: Compression = "zstd"
    compression_level: int = 3
    coalesce_ns: int = 0
    high_water_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class ReceiverConfig:
    """``[receiver]``: the DR-site service (``cdp replica serve``)."""

    listen: Address
    tokens_file: Path | None
    state_dir: Path = _DEFAULT_RECEIVER_STATE
    api: Address = _DEFAULT_RECEIVER_API
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # mutual TLS: senders must show a cert signed by it
    tls_client_names: tuple[str, ...] = ()  # and, when set, one of these names (CN or SAN)


@dataclass(frozen=True, slots=True)
class DetectorSettings:
    """``[detector]``: the ransomware-like burst detector (on by default).

    A false alarm costs an extra locked snapshot (``lock_ns``), never an outage.
    """

    enabled: bool = True
    sensitivity: Literal["low", "normal", "high"] = "normal"
    lock_ns: int = 14 * 86400 * 10**9


@dataclass(frozen=True, slots=True)
class HooksConfig:
    """``[hooks]``: commands run around ``cdp checkpoint --consistent``.

    ``pre_freeze`` quiesces the guest (e.g. ``virsh domfsfreeze``), ``post_thaw`` undoes it
    and always runs, whatever happened before. Each is an argv (run without a shell) and gets
    ``timeout_ns`` of its own; on a timeout its whole process group is killed.
    """

    pre_freeze: tuple[str, ...]
    post_thaw: tuple[str, ...]
    timeout_ns: int = _DEFAULT_HOOK_TIMEOUT_NS


@dataclass(frozen=True, slots=True)
class Config:
    """A whole validated config file. ``path`` is the file as the user named it."""

    daemon: DaemonConfig
    volumes: tuple[VolumeConfig, ...]
    retention: RetentionConfig
    replicas: tuple[ReplicaConfig, ...]
    receiver: ReceiverConfig | None
    path: Path
    hooks: HooksConfig | None = None
    detector: DetectorSettings = field(default_factory=DetectorSettings)

    def volume(self, name: str) -> VolumeConfig | None:
        """The volume called *name*, or None."""
        return next((v for v in self.volumes if v.name == name), None)

    def group(self, name: str) -> tuple[VolumeConfig, ...]:
        """The volumes of consistency group *name*, in config order (empty if unknown)."""
        return tuple(v for v in self.volumes if v.group == name)

    def groups(self) -> tuple[str, ...]:
        """Group names in order of first appearance."""
        return tuple(dict.fromkeys(v.group for v in self.volumes))

    def api_address(self) -> Address:
        """The API the CLI talks to: ``[receiver] api`` on a DR-only config, else ``[daemon]``.

        "DR-only" means a ``[receiver]`` and no volumes, so the same verbs work on both sites
        with each site's own config file.
        """
        if self.receiver is not None and not self.volumes:
            return self.receiver.api
        return self.daemon.api


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config file at *path*.

    Raises:
        ConfigError: unreadable file, invalid TOML (with line and column), or any invalid
            value; ``err.key`` is the key path (None for file-level problems).
    """
    shown = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(shown, None, f"cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(shown, None, f"not UTF-8 text (byte {e.start})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(shown, None, f"invalid TOML: {e}") from e
    return parse_config(data, path=Path(shown))


def parse_config(data: Mapping[str, object], *, path: Path) -> Config:
    """Validate already-parsed TOML *data* as if it came from the file at *path*.

    *path* is used in messages and its folder anchors relative paths.

    Raises:
        ConfigError: the first invalid value found.
    """
    return _Parser(path).config(data)


class _Table:
    """One TOML table being read: tracks which keys were consumed so leftovers are errors."""

    def __init__(self, parser: _Parser, prefix: str, data: Mapping[str, object]) -> None:
        self.parser = parser
        self.prefix = prefix
        self.data = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(
        self, name: str, reason: str, value: object = NO_VALUE, hint: str | None = None
    ) -> ConfigError:
        return ConfigError(self.parser.shown, self.key(name), reason, value=value, hint=hint)

    def has(self, name: str) -> bool:
        return name in self.data

    def get(self, name: str, conv: Callable[[object], T]) -> T | None:
        """The converted value of *name*, or None when absent; conversion errors name the key."""
        self.used.add(name)
        if name not in self.data:
            return None
        value = self.data[name]
        try:
            return conv(value)
        except _Redacted as e:
            raise self.error(name, str(e), e.shown) from None
        except ValueError as e:
            raise self.error(name, str(e), value) from e

    def need(self, name: str, conv: Callable[[object], T], why: str = "required") -> T:
        result = self.get(name, conv)
        if result is None:
            raise self.error(name, f"missing ({why})")
        return result

    def get_or(self, name: str, conv: Callable[[object], T], default: T) -> T:
        result = self.get(name, conv)
        return default if result is None else result

    def table(self, name: str) -> _Table | None:
        self.used.add(name)
        if name not in self.data:
            return None
        value = self.data[name]
        if not isinstance(value, dict):
            raise self.error(name, f"expected a table [{self.key(name)}]", value)
        return _Table(self.parser, self.key(name), value)

    def array_of_tables(self, name: str) -> list[_Table]:
        self.used.add(name)
        value = self.data.get(name, [])
        if not isinstance(value, list):
            raise self.error(name, f"expected [[{name}]] tables, one per entry", value)
        tables = []
        for i, item in enumerate(value):
            prefix = f"{self.key(name)}[{i}]"
            if not isinstance(item, dict):
                raise ConfigError(self.parser.shown, prefix, "expected a table", value=item)
            tables.append(_Table(self.parser, prefix, item))
        return tables

    def reject(self, names: Iterable[str], reason: str) -> None:
        for name in names:
            if name in self.data:
                raise self.error(name, reason, self.data[name])

    def finish(self) -> None:
        """Raise for the first key nobody asked for (in file order)."""
        for name, value in self.data.items():
            if name not in self.used:
                close = difflib.get_close_matches(name, sorted(self.used), n=1)
                hint = f"did you mean {self.key(close[0])}?" if close else None
                is_table = isinstance(value, dict) or (
                    isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
                )
                raise self.error(name, "unknown table" if is_table else "unknown key", value, hint)


class _Parser:
    """Holds what every conversion needs: the file name to report and the folder to anchor."""

    def __init__(self, path: Path) -> None:
        self.shown = os.fspath(path)
        self.base = path.absolute().parent

    # -- value converters; each raises ValueError with an "expected ..." message ------------

    def path(self, value: object) -> Path:
        text = _string(value, "a path")
        if not text or "\0" in text:
            raise ValueError("expected a non-empty path")
        p = Path(text)
        return p if p.is_absolute() else self.base / p

    def address(self, value: object) -> Address:
        addr = parse_address(_string(value, 'an address like "unix:/run/cdp/api.sock"'))
        if addr.kind == "unix":
            assert addr.path is not None
            path = os.fspath(self.path(addr.path))
            if len(os.fsencode(path)) > _UNIX_PATH_MAX:
                raise ValueError(
                    f"unix socket path too long ({len(os.fsencode(path))} bytes after "
                    f"resolving, at most {_UNIX_PATH_MAX})"
                )
            addr = Address.unix(path)
        return addr

    def command(self, value: object) -> tuple[str, ...]:
        """A hook command: a string split like a shell would (but run without one), or argv.

        A relative program path with a "/" (``./freeze.sh``) is relative to the config's
        folder, like every path; a bare name is looked up in PATH when it runs.
        """
        expected = 'expected a command like "fsfreeze -f /mnt" or a list of strings'
        if isinstance(value, str):
            try:
                argv = shlex.split(value)
            except ValueError as e:
                raise ValueError(f"{expected}: {str(e).lower()}") from None
        elif isinstance(value, list) and all(isinstance(a, str) for a in value):
            argv = list(value)
        else:
            raise ValueError(expected)
        if not argv or not argv[0]:
            raise ValueError(f"{expected}: no program")
        if any("\0" in a for a in argv):
            raise ValueError(f"{expected}: no NUL characters")
        if "/" in argv[0] and not os.path.isabs(argv[0]):
            argv[0] = os.fspath(self.base / argv[0])
        return tuple(argv)

    # -- tables ---------------------------------------------------------------------------

    def config(self, data: Mapping[str, object]) -> Config:
        root = _Table(self, "", data)
        daemon_t = root.table("daemon")
        daemon = self.daemon(daemon_t) if daemon_t else DaemonConfig()
        volumes = tuple(self.volume(t) for t in root.array_of_tables("volume"))
        retention_t = root.table("retention")
        retention = self.retention(retention_t) if retention_t else RetentionConfig()
        replicas = tuple(self.replica(t) for t in root.array_of_tables("replica"))
        receiver_t = root.table("receiver")
        receiver = self.receiver(receiver_t) if receiver_t else None
        hooks_t = root.table("hooks")
        hooks = self.hooks(hooks_t) if hooks_t else None
        detector_t = root.table("detector")
        detector = self.detector(detector_t) if detector_t else DetectorSettings()
        root.finish()
        self.check_unique(volumes, replicas)
        if receiver is not None and receiver.state_dir == daemon.state_dir:
            raise ConfigError(
                self.shown,
                "receiver.state_dir",
                "must differ from daemon.state_dir",
                value=os.fspath(receiver.state_dir),
            )
        self.check_listeners(daemon, volumes, receiver)
        return Config(
            daemon=daemon,
            volumes=volumes,
            retention=retention,
            replicas=replicas,
            receiver=receiver,
            path=Path(self.shown),
            hooks=hooks,
            detector=detector,
        )

    def detector(self, t: _Table) -> DetectorSettings:
        d = DetectorSettings()
        result = DetectorSettings(
            enabled=t.get_or("enabled", _bool, d.enabled),
            sensitivity=cast(
                Literal["low", "normal", "high"],
                t.get_or("sensitivity", _choice("low", "normal", "high"), str(d.sensitivity)),
            ),
            lock_ns=t.get_or("lock", _interval, d.lock_ns),
        )
        t.finish()
        return result

    def daemon(self, t: _Table) -> DaemonConfig:
        d = DaemonConfig()
        api = t.get_or("api", self.address, d.api)
        if not api.is_loopback():
            raise t.error(
                "api",
                "the API has no authentication, so a TCP address must be loopback "
                "(127.0.0.1, ::1, localhost); use a unix socket",
                str(api),
            )
        result = DaemonConfig(
            state_dir=t.get_or("state_dir", self.path, d.state_dir),
            api=api,
            log_format=cast(LogFormat, t.get_or("log_format", _choice("text", "json"), "text")),
            log_level=cast(LogLevel, t.get_or("log_level", _log_level, "info")),
            event_loop=cast(
                EventLoop, t.get_or("event_loop", _choice("uvloop", "asyncio"), "uvloop")
            ),
        )
        t.finish()
        return result

    def volume(self, t: _Table) -> VolumeConfig:
        name = t.need("name", _name)
        size = t.need("size", _volume_size)
        group = t.get_or("group", _name, name)
        kind = t.get_or("source", _choice("nbd", "qemu", "scan"), "nbd")
        # Keys of another source usually mean the source is wrong; say that, not "missing".
        foreign = _SOURCE_KEYS - _SOURCE_KEYS_BY_KIND[kind]
        t.reject([k for k in t.data if k in foreign], f'not used by source "{kind}"')
        why = f'required for source "{kind}"'
        source: Source
        if kind == "nbd":
            source = self.nbd_source(t, why)
        elif kind == "qemu":
            source = QemuSource(
                qmp=t.need("qmp", self.address, why),
                node=t.need("node", _node_name, why),
                poll_interval_ns=t.get_or("poll_interval", _interval, 5 * 10**9),
                scan_rate_bps=t.get_or("scan_rate", _rate, 64 * 2**20),
            )
        else:
            source = ScanSource(
                path=t.need("path", self.path, why),
                poll_interval_ns=t.get_or("poll_interval", _interval, 60 * 10**9),
                scan_rate_bps=t.get_or("scan_rate", _rate, 64 * 2**20),
            )
        detect = t.get_or("detect", _bool, True)
        t.finish()
        return VolumeConfig(name=name, size_bytes=size, group=group, source=source, detect=detect)

    def nbd_source(self, t: _Table, why: str) -> NbdSource:
        image = t.need("image", self.path, why)
        listen = t.need("listen", self.address, why)
        tls_cert = t.get("tls_cert", self.path)
        tls_key = t.get("tls_key", self.path)
        _check_pair(t, tls_cert, tls_key)
        tls = t.get("tls", _choice("require", "allow"))
        if tls_cert is not None and listen.kind != "tcp":
            raise t.error(
                "tls_cert",
                "TLS is only offered on a TCP listen address (a unix socket is local)",
                t.data["tls_cert"],
            )
        if tls is not None and tls_cert is None:
            raise t.error("tls", "needs tls_cert and tls_key", t.data["tls"])
        return NbdSource(
            image=image,
            listen=listen,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls=cast(NbdTlsMode, tls or "require"),
        )

    def retention(self, t: _Table) -> RetentionConfig:
        d = RetentionConfig()
        grid_t = t.table("snapshots")
        grid = SnapshotGrid()
        if grid_t is not None:
            grid = SnapshotGrid(
                hourly=grid_t.get_or("hourly", _count, 0),
                daily=grid_t.get_or("daily", _count, 0),
                weekly=grid_t.get_or("weekly", _count, 0),
                monthly=grid_t.get_or("monthly", _count, 0),
                lock_ns=grid_t.get("lock", _interval),
            )
            grid_t.finish()
        result = RetentionConfig(
            journal_window_ns=t.get_or("journal", _interval, d.journal_window_ns),
            journal_max_bytes=t.get_or("journal_max", _positive_size, d.journal_max_bytes),
            snapshots=grid,
        )
        t.finish()
        return result

    def replica(self, t: _Table) -> ReplicaConfig:
        name = t.need("name", _name)
        url = t.need("url", _url)
        tls = {k: t.get(k, self.path) for k in ("tls_ca", "tls_cert", "tls_key")}
        if not url.startswith("https:"):
            for k, v in tls.items():
                if v is not None:
                    raise t.error(k, "TLS settings need an https:// url", t.data[k])
        _check_pair(t, tls["tls_cert"], tls["tls_key"])
        result = ReplicaConfig(
            name=name,
            url=url,
            token_file=t.need("token_file", self.path),
            tls_ca=tls["tls_ca"],
            tls_cert=tls["tls_cert"],
            tls_key=tls["tls_key"],
            bandwidth_bps=t.get("bandwidth", _rate),
            compression=cast(Compression, t.get_or("compression", _choice("zstd", "none"), "zstd")),
            compression_level=t.get_or("compression_level", _zstd_level, 3),
            coalesce_ns=t.get_or("coalesce", _duration, 0),
            high_water_bytes=t.get("high_water", _positive_size),
        )
        t.finish()
        return result

    def receiver(self, t: _Table) -> ReceiverConfig:
        tls_cert = t.get("tls_cert", self.path)
        tls_key = t.get("tls_key", self.path)
        _check_pair(t, tls_cert, tls_key)
        api = t.get_or("api", self.address, _DEFAULT_RECEIVER_API)
        if not api.is_loopback():
            raise t.error(
                "api", "a TCP API address must be loopback (127.0.0.1, ::1, localhost)", str(api)
            )
        client_ca = t.get("tls_client_ca", self.path)
        if client_ca is not None and tls_cert is None:
            raise t.error("tls_client_ca", "mutual TLS needs tls_cert and tls_key", str(client_ca))
        names = t.get("tls_client_names", _names)
        if names and client_ca is None:
            raise t.error("tls_client_names", "needs tls_client_ca", list(names))
        tokens = t.get("tokens_file", self.path)
        if tokens is None and client_ca is None:
            raise t.error(
                "tokens_file", "missing (required unless tls_client_ca sets up mutual TLS)"
            )
        result = ReceiverConfig(
            listen=t.need("listen", self.address),
            tokens_file=tokens,
            tls_client_ca=client_ca,
            tls_client_names=names or (),
            state_dir=t.get_or("state_dir", self.path, _DEFAULT_RECEIVER_STATE),
            api=api,
            tls_cert=tls_cert,
            tls_key=tls_key,
        )
        t.finish()
        return result

    def hooks(self, t: _Table) -> HooksConfig:
        why = 'a freeze needs its thaw; use "true" where there is nothing to undo'
        result = HooksConfig(
            pre_freeze=t.need("pre_freeze", self.command, why),
            post_thaw=t.need("post_thaw", self.command, why),
            timeout_ns=t.get_or("timeout", _interval, _DEFAULT_HOOK_TIMEOUT_NS),
        )
        t.finish()
        return result

    def check_listeners(
        self,
        daemon: DaemonConfig,
        volumes: tuple[VolumeConfig, ...],
        receiver: ReceiverConfig | None,
    ) -> None:
        """Every address cdp binds must be distinct; the second bind would fail at start."""
        binds = [("daemon.api", daemon.api)]
        binds += [
            (f"volume[{i}].listen", v.source.listen)
            for i, v in enumerate(volumes)
            if isinstance(v.source, NbdSource)
        ]
        if receiver is not None:
            binds += [("receiver.listen", receiver.listen), ("receiver.api", receiver.api)]
        seen: dict[Address, str] = {}
        for key, addr in binds:
            first = seen.setdefault(addr, key)
            if first != key:
                raise ConfigError(self.shown, key, f"already used by {first}", value=str(addr))

    def check_unique(
        self, volumes: tuple[VolumeConfig, ...], replicas: tuple[ReplicaConfig, ...]
    ) -> None:
        """Two volumes on one image or socket would corrupt each other; refuse up front."""
        seen: dict[tuple[str, object], int] = {}
        for i, v in enumerate(volumes):
            claims: list[tuple[str, object]] = [("name", v.name)]
            src = v.source
            if isinstance(src, NbdSource):
                claims += [("image", src.image)]
            elif isinstance(src, QemuSource):
                claims += [("node", (src.qmp, src.node))]
            else:
                claims += [("path", src.path)]
            for key, value in claims:
                first = seen.setdefault((key, value), i)
                if first != i:
                    shown = value[1] if isinstance(value, tuple) else value
                    raise ConfigError(
                        self.shown,
                        f"volume[{i}].{key}",
                        f"already used by volume[{first}]",
                        value=os.fspath(shown) if isinstance(shown, Path) else str(shown),
                    )
        names: dict[str, int] = {}
        for i, r in enumerate(replicas):
            first = names.setdefault(r.name, i)
            if first != i:
                raise ConfigError(
                    self.shown,
                    f"replica[{i}].name",
                    f"already used by replica[{first}]",
                    value=r.name,
                )


_SOURCE_KEYS_BY_KIND: Final = {
    "nbd": frozenset({"image", "listen", "tls_cert", "tls_key", "tls"}),
    "qemu": frozenset({"qmp", "node", "poll_interval", "scan_rate"}),
    "scan": frozenset({"path", "poll_interval", "scan_rate"}),
}
_SOURCE_KEYS: Final = frozenset().union(*_SOURCE_KEYS_BY_KIND.values())


class _Redacted(ValueError):
    """A conversion error whose value must be shown redacted (it holds a secret)."""

    def __init__(self, message: str, shown: str) -> None:
        super().__init__(message)
        self.shown = shown


def _string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected {what} (a string)")
    return value


def _choice(*options: str) -> Callable[[object], str]:
    def conv(value: object) -> str:
        if not isinstance(value, str) or value not in options:
            raise ValueError("expected one of " + ", ".join(f'"{o}"' for o in options))
        return value

    return conv


def _log_level(value: object) -> str:
    """Log levels are the one choice matched case-insensitively ("INFO" is common usage)."""
    levels = ("debug", "info", "warning", "error", "critical")
    return _choice(*levels)(value.lower() if isinstance(value, str) else value)


def _name(value: object) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ValueError(
            "expected a name of 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        )
    return value


def _node_name(value: object) -> str:
    text = _string(value, "a QEMU block node name")
    if not text or len(text) > 127 or any(c.isspace() for c in text):
        raise ValueError("expected a QEMU block node name without spaces")
    return text


def _volume_size(value: object) -> int:
    if not isinstance(value, str | int):
        raise ValueError('expected a size like "8GiB"')
    size = parse_size(value)
    if size == 0 or size % 512:
        raise ValueError('expected a size like "8GiB": a positive multiple of 512 bytes')
    return size


def _positive_size(value: object) -> int:
    if not isinstance(value, str | int):
        raise ValueError('expected a size like "50GiB"')
    size = parse_size(value)
    if size == 0:
        raise ValueError('expected a size like "50GiB": must be positive')
    return size


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _names(value: object) -> tuple[str, ...]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, str) and v and len(v) <= 255 for v in value)
    ):
        raise ValueError("expected a non-empty list of names")
    return tuple(value)


def _zstd_level(value: object) -> int:
    if type(value) is not int or not 1 <= value <= 19:
        raise ValueError("expected a zstd level, an integer from 1 to 19")
    return value


def _duration(value: object) -> int:
    return parse_duration(_string(value, 'a duration like "24h"'))


def _interval(value: object) -> int:
    ns = _duration(value)
    if ns == 0:
        raise ValueError('expected a duration like "24h": must be positive')
    return ns


def _rate(value: object) -> int:
    return parse_rate(_string(value, 'a rate like "100Mbit"'))


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("expected a whole number, 0 or more")
    return value


def _url(value: object) -> str:
    text = _string(value, 'a URL like "https://dr.example:7481"')
    expected = 'expected a URL like "https://dr.example:7481"'
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{expected}: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{expected}: only http and https are supported")
    if not parts.hostname:
        raise ValueError(f"{expected}: no host")
    if parts.username is not None or parts.password is not None:
        # Do not echo the credentials back into terminals and logs.
        shown = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()
        raise _Redacted(f"{expected}: no credentials in the URL; use token_file", shown)
    if parts.query or parts.fragment:
        raise ValueError(f"{expected}: no query or fragment")
    if port == 0:
        raise ValueError(f"{expected}: port 0")
    return text


def _check_pair(t: _Table, cert: Path | None, key: Path | None) -> None:
    if cert is not None and key is None:
        raise t.error("tls_key", "missing (required with tls_cert)")
    if key is not None and cert is None:
        raise t.error("tls_cert", "missing (required with tls_key)")
