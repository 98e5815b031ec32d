"""Leases: a claim on shared work, recorded in the database with an owner and an expiry, and kept
alive by a thread while its holder works.

They replace the session-level advisory locks that completion and the reaper held before, so
that chunksvc is correct behind a PgBouncer in transaction pooling mode. An advisory lock belongs
to a server connection; through such a pooler, consecutive transactions of one client run on
whichever server connection is free, so a lock is taken on one connection, "given back" on
another (which does not hold it), and held meanwhile for every client that the first one serves
next. A lease is a row: it means the same whichever connection reads or writes it.

What changes is how a dead holder is noticed. A lock went with its holder's connection at once; a
lease runs out ``seconds`` after its last renewal, and then anyone may take it. Holders renew it
every ``interval`` (well within ``seconds``), so only a dead or stalled holder loses it; one that
ends without finishing gives it back at once.

A holder knows it still holds its lease while no renewal came back refused and the last renewal
the database accepted was *sent* less than ``seconds`` ago by this process's monotonic clock (the
database dated that renewal no earlier than it was sent, so the lease lasts at least that long).
That is ``LeaseKeeper.held``: work whose effects the database does not guard by the owner (storage
deletions, say) asks it first.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from types import TracebackType

from chunksvc import dao
from chunksvc.db import Database
from chunksvc.errors import ChunksvcError

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews a lease every ``interval`` seconds in a thread of its own, from ``with`` until the
    block ends (the thread is joined on the way out, so the holder's connection is its own again).

    ``renew()`` returns whether the lease is still held (and pushes it on); it may raise a
    ``ChunksvcError``. One of the ``fatal`` kinds ends the keeping at once (``failure``: completion
    renews on its own connection, and a connection found broken cannot record an outcome either);
    any other is logged and the renewal tried again at the next turn, the lease running out meanwhile
    if the trouble lasts. A refused renewal ends the keeping (``lost``).
    """

    def __init__(
        self,
        renew: Callable[[], bool],
        seconds: float,
        interval: float,
        *,
        taken_at: float,
        what: str,
        fatal: tuple[type[ChunksvcError], ...] = (),
    ) -> None:
        self._renew = renew
        self._seconds = seconds
        self._interval = interval
        self._renewed_at = taken_at  # monotonic time the take (or the last accepted renewal) was sent
        self._what = what
        self._fatal = fatal
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease {what}", daemon=True)
        self.lost = False
        self.failure: ChunksvcError | None = None

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stopping.set()
        self._thread.join()

    def held(self) -> bool:
        """Whether this holder can be sure it still holds the lease (see the module's docstring)."""
        return not self.lost and self.failure is None and time.monotonic() - self._renewed_at < self._seconds

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            sent = time.monotonic()
            try:
                renewed = self._renew()
            except self._fatal as exc:
                self.failure = exc
                log.warning("lease on %s: cannot renew it: %s", self._what, exc.detail)
                return
            except ChunksvcError as exc:
                log.warning("lease on %s: renewal failed, trying again: %s", self._what, exc.detail)
                continue
            except Exception:  # a bug: keep trying rather than lose the lease silently
                log.exception("lease on %s: renewal failed unexpectedly", self._what)
                continue
            if not renewed:
                self.lost = True
                log.warning("lease on %s: lost (it ran out and another holder took it, or the work ended)", self._what)
                return
            self._renewed_at = sent


@contextlib.contextmanager
def reaper_lease(db: Database, name: str, seconds: float) -> Iterator[LeaseKeeper | None]:
    """``with reaper_lease(db, "orphans", 30) as lease``: the lease on a reaper phase (or the
    periodic run), renewed every third of ``seconds`` while the block runs and given back after;
    None (and nothing held) when another reaper holds it. Renewals borrow a pooled connection
    each time, so the holder may use its own for the work."""
    owner = uuid.uuid4()
    taken_at = time.monotonic()
    with db.connection() as conn:
        taken = dao.take_reaper_lease(conn, name, owner, seconds)
    if not taken:
        yield None
        return

    def renew() -> bool:
        with db.connection() as conn:
            return dao.renew_reaper_lease(conn, name, owner, seconds)

    try:
        with LeaseKeeper(renew, seconds, seconds / 3, taken_at=taken_at, what=f"reaper {name}") as keeper:
            yield keeper
    finally:
        try:
            with db.connection() as conn:
                dao.release_reaper_lease(conn, name, owner)
        except ChunksvcError as exc:  # it runs out by itself
            log.warning("reaper lease %s not given back (it runs out in %.0f s): %s", name, seconds, exc.detail)
