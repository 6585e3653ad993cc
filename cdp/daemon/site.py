"""What the control API needs of a site: the primary daemon and the DR receiver alike.

The same verbs (status, restore, resolve, rebuild-index) work on both sites, each against its
own journals, so the API is written against this small interface rather than either class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from cdp.config import Config
from journal import Journal
from journal.clock import Clock


class SiteGroup(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def journal(self) -> Journal: ...

    def not_a_point(self, seq: int) -> str | None:
        """Why ``seq`` must not be offered as a recovery point (None: it is one)."""
        ...


class SiteVolume(Protocol):
    @property
    def group(self) -> SiteGroup: ...


class Site(Protocol):
    @property
    def config(self) -> Config: ...

    @property
    def groups(self) -> Mapping[str, SiteGroup]: ...

    @property
    def volumes(self) -> Mapping[str, SiteVolume]: ...

    @property
    def clock(self) -> Clock: ...

    @property
    def read_only(self) -> bool:
        """True at the DR site: only replication appends to its journals."""
        ...

    def status(self) -> dict[str, object]: ...
