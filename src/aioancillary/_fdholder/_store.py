"""The fd holder's store, without I/O: named entries of fds, bounds, expiry, claims.

The store never opens or closes anything. It holds fd objects of any type (``OwnedFd`` in
the holder, plain ints in the property tests) and every operation that lets go of fds
*returns* them, so that the caller closes each exactly once::

    store = Store(max_entries=100, max_fds=1000)
    store.add("web", fds, timeout=None, now=loop.time())   # refused: StoreError, fds untouched
    entry = store.delete("web")                            # the caller closes entry.fds
    for entry in store.expire(loop.time()):                # likewise
        close_all(entry.fds)

Time is passed in (``now``, in seconds of any monotonic clock), so expiry is tested without
waiting. A *claim* marks an entry being retrieved with ``delete=True``: the holder removes it
only when the client confirms it has the fds (``Store.remove_claimed``), so a client that
dies in between loses nothing; meanwhile nobody else may delete or claim it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .._core._platform import SCM_MAX_FD
from .._lifecycle._systemd import check_fdname

__all__ = ["MAX_ENTRIES_CAP", "Entry", "Listing", "Store", "StoreError", "check_name"]

F = TypeVar("F")

#: The largest ``max_entries`` a holder accepts: a listing of that many entries of the longest
#: names (255 characters, escaped) still fits one message of the protocol.
MAX_ENTRIES_CAP = 10_000


class StoreError(Exception):
    """A request the store refuses; ``code`` is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_name(name: object) -> str:
    """Return ``name`` if it is a valid entry name; raise ``StoreError`` (``name``) if not.

    systemd's ``FDNAME=`` rule (printable ASCII without ``:``, at most 255 characters), and not
    empty: an entry is found by its name, so an empty one could not be told apart in a listing.
    """
    if not isinstance(name, str):
        raise StoreError("request", f"an entry name must be a string, got {name!r}")
    if not name:
        raise StoreError("name", "an entry name must not be empty")
    try:
        check_fdname(name)
    except ValueError as exc:
        raise StoreError("name", str(exc)) from None
    return name


def check_timeout(timeout: object) -> float | None:
    """Return a valid entry timeout (``None``, or positive finite seconds); raise otherwise."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise StoreError("request", f"timeout must be a number of seconds or null, got {timeout!r}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise StoreError(
            "request", f"timeout must be positive and finite (seconds), got {timeout!r}"
        )
    return float(timeout)


@dataclass(slots=True)
class Entry(Generic[F]):
    """One stored entry: its fds (in the order they were stored) and when it expires."""

    name: str
    fds: tuple[F, ...]
    #: When the entry expires, on the caller's clock; ``None``: never.
    deadline: float | None
    #: Who is retrieving it with ``delete=True`` and has not confirmed yet (or ``None``).
    claim: Hashable | None = None


@dataclass(frozen=True, slots=True)
class Listing:
    """What ``Store.listing`` says of one entry."""

    name: str
    fd_count: int
    expires_in: float | None


class Store(Generic[F]):
    """Named entries of fds, bounded in entries and in fds; see the module docstring.

    Args:
        max_entries: Most entries held at once.
        max_fds: Most fds held at once, all entries together.
        max_fds_per_entry: Most fds in one entry (one message carries at most 253).
    """

    def __init__(
        self, *, max_entries: int, max_fds: int, max_fds_per_entry: int = SCM_MAX_FD
    ) -> None:
        if not 1 <= max_entries <= MAX_ENTRIES_CAP:
            raise ValueError(f"max_entries must be 1..{MAX_ENTRIES_CAP}, got {max_entries}")
        if max_fds < 1 or max_fds_per_entry < 1:
            raise ValueError(
                f"max_fds and max_fds_per_entry must be at least 1, got {max_fds}, "
                f"{max_fds_per_entry}"
            )
        self.max_entries = max_entries
        self.max_fds = max_fds
        self.max_fds_per_entry = max_fds_per_entry
        self._entries: dict[str, Entry[F]] = {}
        self._fd_count = 0

    # -- reading ----------------------------------------------------------------------------

    @property
    def fd_count(self) -> int:
        """Fds held, all entries together."""
        return self._fd_count

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[F]]:
        """The entries, in the order they were stored."""
        return iter(list(self._entries.values()))

    def get(self, name: str) -> Entry[F]:
        """The entry ``name`` (left in the store).

        Raises:
            StoreError: ``not-found``.
        """
        entry = self._entries.get(name)
        if entry is None:
            raise StoreError("not-found", f"no entry named {name!r}")
        return entry

    def listing(self, now: float) -> list[Listing]:
        """Every entry's name, fd count and seconds left (``None``: no expiry), by name."""
        return [
            Listing(
                entry.name,
                len(entry.fds),
                None if entry.deadline is None else max(0.0, entry.deadline - now),
            )
            for entry in sorted(self._entries.values(), key=lambda e: e.name)
        ]

    def next_deadline(self) -> float | None:
        """The earliest deadline of any entry, or ``None``."""
        deadlines = [e.deadline for e in self._entries.values() if e.deadline is not None]
        return min(deadlines, default=None)

    # -- changing ---------------------------------------------------------------------------

    def check_add(self, name: str, fd_count: int) -> None:
        """Raise the ``StoreError`` that ``add`` would raise for such an entry.

        Raises:
            StoreError: ``name`` (invalid), ``fds`` (none, or more than one entry holds),
                ``exists``, or ``full`` (entries or fds).
        """
        check_name(name)
        if fd_count < 1:
            raise StoreError("fds", f"storing {name!r} needs at least one fd, got none")
        if fd_count > self.max_fds_per_entry:
            raise StoreError(
                "fds",
                f"{fd_count} fds for {name!r}: an entry holds at most "
                f"{self.max_fds_per_entry}; store them under several names",
            )
        if name in self._entries:
            raise StoreError(
                "exists",
                f"an entry named {name!r} is already stored; delete it first (or retrieve it "
                "with delete=True)",
            )
        if len(self._entries) >= self.max_entries:
            raise StoreError(
                "full",
                f"the store holds {len(self._entries)} entries, its bound (max_entries="
                f"{self.max_entries}); delete entries or raise the bound",
            )
        if self._fd_count + fd_count > self.max_fds:
            raise StoreError(
                "full",
                f"storing {fd_count} fd(s) would exceed the store's bound: it holds "
                f"{self._fd_count} of at most {self.max_fds} (max_fds); delete entries or "
                "raise the bound",
            )

    def add(self, name: str, fds: Sequence[F], timeout: object, now: float) -> Entry[F]:
        """Store ``fds`` under ``name``; expire them ``timeout`` seconds from ``now``.

        On refusal nothing is kept: the caller still owns ``fds`` (and closes them).

        Raises:
            StoreError: as ``check_add``, or ``request`` for a bad ``timeout``.
        """
        seconds = check_timeout(timeout)
        self.check_add(name, len(fds))
        entry = Entry(name, tuple(fds), None if seconds is None else now + seconds)
        self._entries[name] = entry
        self._fd_count += len(entry.fds)
        return entry

    def _pop(self, name: str) -> Entry[F]:
        entry = self._entries.pop(name)
        self._fd_count -= len(entry.fds)
        return entry

    def delete(self, name: str, owner: Hashable | None = None) -> Entry[F]:
        """Remove the entry ``name``; the caller closes its fds.

        Raises:
            StoreError: ``not-found``; ``busy`` if another client is retrieving it with
                ``delete=True`` (``owner`` may delete what it claimed itself).
        """
        entry = self.get(name)
        if entry.claim is not None and entry.claim != owner:
            raise StoreError(
                "busy",
                f"{name!r} is being retrieved with delete=True by another client; retry",
            )
        return self._pop(name)

    def claim(self, name: str, owner: Hashable) -> Entry[F]:
        """Mark ``name`` as being retrieved with ``delete=True`` by ``owner``; return it.

        Raises:
            StoreError: ``not-found``, or ``busy`` if another owner claimed it.
        """
        entry = self.get(name)
        if entry.claim is not None and entry.claim != owner:
            raise StoreError(
                "busy",
                f"{name!r} is being retrieved with delete=True by another client; retry",
            )
        entry.claim = owner
        return entry

    def remove_claimed(self, name: str, owner: Hashable) -> Entry[F] | None:
        """Remove ``name`` if ``owner`` still holds its claim (the client has the fds).

        Returns the removed entry (the caller closes its fds), or ``None`` when the entry is
        gone meanwhile (it expired) or is no longer ``owner``'s.
        """
        entry = self._entries.get(name)
        if entry is None or entry.claim != owner:
            return None
        return self._pop(name)

    def release(self, owner: Hashable) -> list[str]:
        """Drop every claim of ``owner`` (its connection ended); return the names."""
        names = []
        for entry in self._entries.values():
            if entry.claim == owner:
                entry.claim = None
                names.append(entry.name)
        return names

    def expire(self, now: float) -> list[Entry[F]]:
        """Remove every entry whose deadline is ``now`` or earlier; the caller closes them."""
        due = [
            name
            for name, entry in self._entries.items()
            if entry.deadline is not None and entry.deadline <= now
        ]
        return [self._pop(name) for name in due]

    def take_all(self) -> list[Entry[F]]:
        """Remove every entry (the holder is exiting); the caller closes them."""
        return [self._pop(name) for name in list(self._entries)]

    def __repr__(self) -> str:
        return (
            f"<Store entries={len(self._entries)}/{self.max_entries} "
            f"fds={self._fd_count}/{self.max_fds}>"
        )
