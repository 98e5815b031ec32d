"""The reaper: cleanup that no request does, run by the server itself (``PeriodicReaper``, every
``CHUNKSVC_REAP_INTERVAL`` seconds) or from cron (``python -m chunksvc reap``), or both.

Phases, in this order (each one's output feeds the next):

1. expire: overdue ``INIT``/``IN_PROGRESS`` sessions get ``EXPIRED`` stored.
2. re-drive: ``COMPLETING`` sessions older than the re-drive's grace (``completing_lease``) whose
   assembler is dead (its completion lease is free: given back, or run out) are completed
   through the same code as ``POST .../complete``;
   when parts' bytes are gone the session is reopened without them (``IN_PROGRESS``, the
   client re-sends them), never failed; storage that is full or down leaves it for next time.
3. purge: the stored bytes of ended sessions are removed once (``purged_at``): everything under
   ``parts/<id>/``, and ``objects/<id>`` unless the session is ``COMPLETED`` (the key layout is
   ``services.layout``'s).
4. orphans: stored keys under ``parts/`` and ``objects/`` older than the grace period whose
   session is missing or already purged (left by a writer that outlived its session), and
   keys under ``parts/`` of a live session that no part row (nor a dropped part) points to, at
   least a day old (bytes kept because their record's outcome was unknown, and it did not commit).
5. incomplete: unfinished writes older than the grace period (a worker killed mid-write).
6. prune events: completion events older than ``webhook_retention`` (``CHUNKSVC_WEBHOOK_RETENTION``)
   whose every delivery is delivered or dead, with their deliveries, in batches of
   ``prune_batch_size`` events, one transaction each (never an event with a pending delivery).
7. tokens: upload tokens no request can use any more (expired, or their session aborted, expired
   or failed; they answer 401 already) are deleted, in batches. A completed session's tokens stay
   until they expire: they still read it.

Where a storage call and a database change both happen, the bytes go only after the database
says no row needs them, and a failure between the two leaves work for the next run, not loss:
expire changes rows only; re-drive is ``complete`` (``CompletionService.resume``); purge
removes bytes first and records ``purged_at`` after, so a lost commit means removing them again;
the orphan sweep reads rows, then removes keys that no row names.

Several reapers may run at once: expire and purge claim rows with ``FOR UPDATE SKIP LOCKED``,
re-drive relies on the per-session completion lease, and the two storage sweeps and the event
prune are each held by one reaper at a time (a lease in ``reaper_leases``, tried and never waited
for: the others skip them; the prune's batches are claimed with ``SKIP LOCKED`` too, so a reaper
that stalled past its lease and one that took it over never remove the same events). Nobody
waits, and no piece of work is done (or counted) twice. Everything is idempotent: a second run
finds nothing to do.

The sweeps' and the periodic run's claims are leases (``services.leases``), not session-level
advisory locks as before, so that the reaper is correct behind a PgBouncer in transaction pooling
mode, where a lock held by "the session" is held by whichever server connection ran the statement.
What that changes: a crashed reaper's claim used to vanish with its connection; now it runs out
``lease`` seconds after its last renewal (``CHUNKSVC_LEASE``), and until then the other reapers skip
that sweep (or the periodic turn). A live sweeper renews its lease while it works and checks that
it still holds it before each batch it removes, so a reaper that stalled past its lease stops
rather than sweep alongside the one that took over.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TypeVar
from uuid import UUID

from chunksvc import dao
from chunksvc.db import Connection, Database
from chunksvc.errors import ChecksumMismatch, ChunksvcError, CompletionInProgress, PartsMissing, SessionNotActive
from chunksvc.rows import SweptSessionRow
from chunksvc.services import layout, staging, states
from chunksvc.services.completion import COMPLETION_LEASE, CompletionService
from chunksvc.services.events import UploadEvents
from chunksvc.services.leases import reaper_lease
from chunksvc.storage import ListedKey, Storage
from chunksvc.storage.spill import Spill

T = TypeVar("T")

log = logging.getLogger(__name__)

# A live session's key that no row names is swept only when at least this old, whatever the
# grace period: its record may still be on its way (a slow part, or on S3 a large part dated from
# the start of its upload), and sweeping it then would lose bytes the client was told are stored.
LIVE_KEY_MIN_AGE = 24 * 3600


@dataclasses.dataclass(frozen=True)
class ReaperSettings:
    batch_size: int = 100
    # Seconds an unreferenced key or an unfinished write must be old before it is swept. An
    # unfinished write is timed from its start on S3 (a multipart upload's initiation), and a
    # live one may be a 5 GiB part on a slow link or a streamed assembly: a day is beyond any
    # of them, while orphans come only from crashes, so keeping them a day costs little.
    orphan_grace: float = 24 * 3600
    # Seconds a COMPLETING session must be untouched before the reaper re-drives it. The
    # completion lease already tells a dead assembler from a live one; this grace leaves a client
    # whose completion failed the time to retry it itself.
    completing_lease: float = 600
    dry_run: bool = False
    # Seconds a crashed reaper's claim on a sweep outlives its last renewal (CHUNKSVC_LEASE).
    lease: float = COMPLETION_LEASE
    # Seconds a completion event is kept once none of its deliveries is pending, counted from the
    # event (CHUNKSVC_WEBHOOK_RETENTION); 0 keeps every event for ever.
    webhook_retention: float = 30 * 24 * 3600
    # Events removed per statement (and transaction), with their deliveries: one or two each.
    prune_batch_size: int = 1000

    def __post_init__(self) -> None:
        if (
            min(self.batch_size, self.prune_batch_size) < 1
            or min(self.orphan_grace, self.completing_lease, self.webhook_retention) < 0
            or self.lease <= 0
        ):
            raise ValueError(f"need batch sizes >= 1, non-negative graces and a positive lease, got {self}")


# A dry run lists what each kind of work would touch, up to this many items per kind.
LIST_LIMIT = 20


@dataclasses.dataclass
class ReapResult:
    dry_run: bool = False
    expired: int = 0
    # Ended sessions whose stored bytes were removed (purge), in two kinds: a COMPLETED session
    # loses only its parts (its object is the upload: kept); the others lose any object too.
    completed_parts_removed: int = 0
    ended_bytes_removed: int = 0  # ABORTED, EXPIRED or FAILED
    orphans_removed: int = 0
    incomplete_swept: int = 0
    completions_redriven: int = 0
    completions_reopened: int = 0  # parts' bytes were gone: reopened for the client to re-send
    completions_failed: int = 0
    webhook_events_pruned: int = 0  # completion events removed with their deliveries
    tokens_removed: int = 0  # upload tokens expired or of ended sessions
    errors: int = 0  # things that could not be cleaned (details in the log)
    # What the work touched (a dry run: would touch), by the kinds above: session ids and
    # storage keys, the first LIST_LIMIT of each kind.
    touched: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    KINDS = (
        "expired",
        "completions_redriven",
        "completions_reopened",
        "completions_failed",
        "completed_parts_removed",
        "ended_bytes_removed",
        "orphans_removed",
        "incomplete_swept",
        "webhook_events_pruned",
        "tokens_removed",
    )

    def work(self) -> dict[str, int]:
        """What was done, by kind (every count but ``errors``)."""
        return {kind: getattr(self, kind) for kind in self.KINDS}

    def note(self, kind: str, item: str) -> None:
        """Remember ``item`` (a session id and its keys, or a key) as touched by ``kind`` of work."""
        items = self.touched.setdefault(kind, [])
        if len(items) < LIST_LIMIT:
            items.append(item)

    def summary(self) -> str:
        """The one line for cron mail and logs, in words that say what happened to what."""
        purged = self.completed_parts_removed + self.ended_bytes_removed
        counts = "; ".join(
            (
                f"{_n(self.expired, 'overdue session')} expired",
                f"stored parts removed for {_n(purged, 'ended session')} ({self.completed_parts_removed} completed,"
                f" whose objects are kept; {self.ended_bytes_removed} aborted, expired or failed, with any object)",
                f"{_n(self.orphans_removed, 'orphaned key')} removed",
                f"{_n(self.incomplete_swept, 'unfinished write')} swept",
                # A dry run only knows which completions it would take over, not how each would end.
                f"{_n(self.completions_redriven, 'stalled completion')} re-driven"
                if self.dry_run
                else f"stalled completions re-driven: {self.completions_redriven} completed,"
                f" {self.completions_reopened} reopened for lost parts, {self.completions_failed} failed",
                f"{_n(self.webhook_events_pruned, 'completion event')} pruned",
                # Bookkeeping only (the tokens answer 401 already): named when there were any.
                *([f"{_n(self.tokens_removed, 'dead upload token')} removed"] if self.tokens_removed else []),
                _n(self.errors, "error"),
            )
        )
        return f"reap (dry run, nothing changed), would be: {counts}" if self.dry_run else f"reap: {counts}"

    def listing(self) -> list[str]:
        """What each kind of work touched (would touch, in a dry run): a heading, then its items."""
        headings = {
            "expired": "expire (overdue INIT/IN_PROGRESS sessions)",
            "completions_redriven": "re-drive (stalled COMPLETING sessions, assembler dead)"
            + ("" if self.dry_run else ", now COMPLETED"),
            "completions_reopened": "re-drive, reopened IN_PROGRESS for lost parts",
            "completions_failed": "re-drive, FAILED (size or SHA-256 mismatch)",
            "completed_parts_removed": "purge the stored parts of COMPLETED sessions (their object is kept)",
            "ended_bytes_removed": "purge the stored parts and object of ABORTED, EXPIRED or FAILED sessions",
            "orphans_removed": "remove orphaned keys (no session needs them)",
            "incomplete_swept": "sweep unfinished writes",
            "webhook_events_pruned": "prune completion events past their retention, no delivery pending"
            " (with their deliveries)",
            "tokens_removed": "remove upload tokens expired or of ended sessions (by session)",
        }
        lines = []
        for kind, heading in headings.items():
            count = getattr(self, kind)
            if not count:
                continue
            items = self.touched.get(kind, [])
            lines.append(f"{heading}: {count}")
            lines.extend(f"  {item}" for item in items)
            if count > len(items):
                lines.append(f"  ... and {count - len(items)} more")
        return lines


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


class Reaper:
    def __init__(
        self,
        db: Database,
        storage: Storage,
        completion: CompletionService,
        settings: ReaperSettings,
        events: UploadEvents | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        spill: Spill | None = None,
    ) -> None:
        self._db = db
        self._storage = storage
        self._spill = spill  # this host's local copies of pieces (``storage.spill``)
        self._completion = completion
        self._settings = settings
        self._events = events or UploadEvents()
        self._clock = clock
        self._stopping: Callable[[], bool] = lambda: False

    def run(self, stopping: Callable[[], bool] = lambda: False) -> ReapResult:
        """One pass; ``stopping`` (the server's shutdown) ends it between phases (and between the
        event prune's batches), unrecorded."""
        started = time.monotonic()
        result = ReapResult(dry_run=self._settings.dry_run)
        self._stopping = stopping
        phases = (
            self.expire,
            self.redrive_completions,
            self.purge,
            self.sweep_orphans,
            self.sweep_incomplete,
            self.sweep_local_copies,
            self.prune_webhook_events,
            self.remove_dead_tokens,
        )
        for phase in phases:
            if stopping():
                break
            try:
                phase(result)
            except ChunksvcError as exc:
                # One phase failing (storage down, say) must not keep the others from running.
                log.warning("reap: %s stopped: %s", phase.__name__, exc.detail)
                result.errors += 1
        if stopping():
            # A worker exiting closes its pool under a pass: what failed then is no storage or
            # database fault, and a failed run is what the runbook alerts on. Not counted.
            log.info("reap: pass cut short by shutdown; the next pass does the rest")
        elif not result.dry_run:
            self._events.reaper_run(
                succeeded=not result.errors, counts=result.work(), seconds=time.monotonic() - started
            )
        return result

    # --- phases -----------------------------------------------------------------------------

    def expire(self, result: ReapResult) -> None:
        if self._settings.dry_run:
            with self._db.connection() as conn:
                overdue, first = dao.overdue_sessions(conn, LIST_LIMIT)
            result.expired += overdue
            for session_id in first:
                result.note("expired", str(session_id))
            return
        while True:
            with self._db.transaction() as conn:
                expired = dao.expire_overdue_sessions(conn, self._settings.batch_size)
            result.expired += len(expired)
            for session_id in expired:
                result.note("expired", str(session_id))
            if expired:
                self._events.sessions_expired(len(expired))
            if len(expired) < self._settings.batch_size:
                return

    def redrive_completions(self, result: ReapResult) -> None:
        after = None
        while True:
            with self._db.connection() as conn:
                # Only those whose completion lease is free: no live assembler holds them.
                stale = dao.stale_completions(conn, self._settings.completing_lease, after, self._settings.batch_size)
            if self._settings.dry_run:
                for completion in stale:
                    result.completions_redriven += 1
                    result.note("completions_redriven", str(completion.id))
            else:
                for completion in stale:
                    self._redrive(completion.id, completion.client_id, result)
            if len(stale) < self._settings.batch_size:
                return
            after = (stale[-1].updated_at, stale[-1].id)

    def purge(self, result: ReapResult) -> None:
        after = None
        while True:
            # The claimed rows stay locked while their bytes are removed, so another reaper
            # skips them; only requests on these ended sessions (an abort) wait for the batch.
            with self._db.transaction() as conn:
                claimed = dao.claim_unpurged_sessions(conn, after, self._settings.batch_size)
                if self._settings.dry_run:
                    purged = claimed
                else:
                    purged = [ended for ended in claimed if self._purge_session(ended.id, ended.status, result)]
                    dao.mark_purged(conn, [ended.id for ended in purged])
            for ended in purged:
                kind = "completed_parts_removed" if ended.status == states.COMPLETED else "ended_bytes_removed"
                setattr(result, kind, getattr(result, kind) + 1)
                if len(result.touched.get(kind, ())) < LIST_LIMIT:
                    result.note(kind, self._describe_purge(ended.id, ended.status))
            if len(claimed) < self._settings.batch_size:
                return
            # Past the sessions that failed too, so they are retried on the next run, not now.
            after = (claimed[-1].updated_at, claimed[-1].id)

    def sweep_orphans(self, result: ReapResult) -> None:
        now = self._clock()
        cutoff = now - timedelta(seconds=self._settings.orphan_grace)
        live_cutoff = now - timedelta(seconds=max(self._settings.orphan_grace, LIVE_KEY_MIN_AGE))
        with reaper_lease(self._db, "orphans", self._settings.lease) as lease:
            if lease is None:
                return  # another reaper is sweeping; listing the same keys again would gain nothing
            with self._db.connection() as conn:
                for prefix in layout.PREFIXES:
                    old = (listed for listed in self._storage.list_keys(prefix) if listed.last_modified < cutoff)
                    for listed in batched(old, self._settings.batch_size):
                        if not lease.held():
                            # Stalled past the lease: another reaper may be sweeping now. What was
                            # removed so far stands; the rest is that reaper's (or the next run's).
                            log.warning("reap: orphan sweep stopped: its lease ran out or was lost")
                            return
                        self._sweep_batch(conn, prefix, listed, live_cutoff, result)

    def sweep_local_copies(self, result: ReapResult) -> None:
        """This host's local copies of pieces older than the orphan grace: a purge removes its
        session's on the host that runs it, and these are the others' (a copy the frontier still
        needed costs a read-back of the object at completion, not bytes: the piece is stored)."""
        if self._spill is not None and not self._settings.dry_run:
            removed = self._spill.sweep(self._settings.orphan_grace)
            if removed:
                log.info("reap: removed %d local copies of pieces past the orphan grace", removed)

    def sweep_incomplete(self, result: ReapResult) -> None:
        cutoff = self._clock() - timedelta(seconds=self._settings.orphan_grace)
        # One storage call: the lease is checked before it, and kept alive while it runs.
        with reaper_lease(self._db, "incomplete", self._settings.lease) as lease:
            if lease is not None:
                # Read before the listing: a staging begun after it is younger than the cutoff.
                with self._db.connection() as conn:
                    live = dao.live_stagings(conn)
                result.incomplete_swept += self._storage.sweep_incomplete(
                    layout.PREFIXES,
                    cutoff,
                    self._settings.dry_run,
                    found=lambda item: result.note("incomplete_swept", item),
                    keep=live,
                )

    def prune_webhook_events(self, result: ReapResult) -> None:
        """Completion events past their retention with no delivery pending go, with their
        deliveries: a batch per transaction, oldest first, each batch's events locked (SKIP
        LOCKED) and checked for a pending delivery again under the lock before they go."""
        retention = self._settings.webhook_retention
        if not retention:
            return  # CHUNKSVC_WEBHOOK_RETENTION=0: every event is kept
        if self._settings.dry_run:
            with self._db.connection() as conn:
                prunable, first = dao.prunable_webhook_events(conn, retention, LIST_LIMIT)
            result.webhook_events_pruned += prunable
            for event_id in first:
                result.note("webhook_events_pruned", str(event_id))
            return
        batch = self._settings.prune_batch_size
        with reaper_lease(self._db, "webhook_events", self._settings.lease) as lease:
            if lease is None:
                return  # another reaper is pruning: it walks the same events
            after = None
            while not self._stopping():
                if not lease.held():
                    # Stalled past the lease: another reaper may be pruning now. Its claims skip
                    # what this one holds, so nothing is removed twice; the rest is its work.
                    log.warning("reap: event prune stopped: its lease ran out or was lost")
                    return
                with self._db.transaction() as conn:
                    claimed = dao.claim_prunable_webhook_events(conn, retention, after, batch)
                    pruned = []
                    if claimed:
                        ids = [event.id for event in claimed]
                        dao.lock_webhook_deliveries_of_events(conn, ids)
                        pruned = dao.prune_webhook_events(conn, ids)
                result.webhook_events_pruned += len(pruned)
                for event_id in pruned:
                    result.note("webhook_events_pruned", str(event_id))
                if len(claimed) < batch:
                    return
                after = (claimed[-1].created_at, claimed[-1].id)

    def remove_dead_tokens(self, result: ReapResult) -> None:
        """Upload tokens that can no longer be used go, a batch per transaction."""
        if self._settings.dry_run:
            with self._db.connection() as conn:
                result.tokens_removed += dao.count_dead_upload_tokens(conn)
            return
        while not self._stopping():
            with self._db.transaction() as conn:
                removed = dao.delete_dead_upload_tokens(conn, self._settings.prune_batch_size)
            result.tokens_removed += len(removed)
            for session_id in removed:
                result.note("tokens_removed", str(session_id))
            if len(removed) < self._settings.prune_batch_size:
                return

    # --- internals --------------------------------------------------------------------------

    def _redrive(self, session_id: UUID, client_id: int, result: ReapResult) -> None:
        try:
            session = self._completion.resume(session_id, client_id)
        except (CompletionInProgress, SessionNotActive):
            return  # a live assembler, the client or another reaper has it (or finished it)
        except PartsMissing:
            result.completions_reopened += 1  # the client's next complete lists what to re-send
            result.note("completions_reopened", str(session_id))
            return
        except ChecksumMismatch:
            result.completions_failed += 1  # assembled, but not what the client announced: FAILED
            result.note("completions_failed", str(session_id))
            return
        except ChunksvcError as exc:
            log.warning("reap: could not re-drive the completion of session %s: %s", session_id, exc.detail)
            result.errors += 1
            return
        if session.effective_status == states.COMPLETED:
            result.completions_redriven += 1
            result.note("completions_redriven", str(session_id))
        elif session.effective_status == states.FAILED:
            result.completions_failed += 1
            result.note("completions_failed", str(session_id))

    def _purge_session(self, session_id: UUID, status: str, result: ReapResult) -> bool:
        try:
            if status != states.COMPLETED:  # a completed session's staging became its object
                staging.abandon(self._db, self._storage, session_id)
            self._storage.delete_prefix(layout.parts_prefix(session_id))
            if status != states.COMPLETED:
                self._storage.delete([layout.object_key(session_id)])
            if self._spill is not None:
                self._spill.remove_prefix(layout.parts_prefix(session_id))
        except ChunksvcError as exc:
            log.warning("reap: could not remove the stored bytes of session %s: %s", session_id, exc.detail)
            result.errors += 1
            return False
        return True

    def _describe_purge(self, session_id: UUID, status: str) -> str:
        """A purged session's id, status and the keys its purge removes; a dry run lists the
        storage to say how many keys are there (only for the few sessions a listing shows)."""
        prefix = layout.parts_prefix(session_id)
        object_key = layout.object_key(session_id)
        if status == states.COMPLETED:
            kept = f" ({object_key} kept)"
            removed = [prefix]
        else:
            kept = ""
            removed = [prefix, object_key]
        if self._settings.dry_run:
            try:
                parts = sum(1 for _ in self._storage.list_keys(prefix))
                has_object = status != states.COMPLETED and self._storage.exists(object_key)
            except ChunksvcError as exc:
                return f"{session_id} {status}: {', '.join(removed)}{kept} (cannot list them: {exc.detail})"
            removed = [f"{prefix} ({_n(parts, 'key')})", *([object_key] if has_object else [])]
        return f"{session_id} {status}: {', '.join(removed)}{kept}"

    def _sweep_batch(
        self, conn: Connection, prefix: str, listed: list[ListedKey], live_cutoff: datetime, result: ReapResult
    ) -> None:
        owners = {item.key: layout.session_of(item.key) for item in listed}
        long_stored = {item.key for item in listed if item.last_modified < live_cutoff}
        ids = list({session_id for session_id in owners.values() if session_id is not None})
        sessions = {session.id: session for session in dao.sessions_for_sweep(conn, ids)}
        # Part keys of live sessions that no part row points to. Asked after the sessions: a
        # key recorded meanwhile is named in the answer, and one older than the grace period is
        # no write in progress.
        live = [session_id for session_id in ids if session_id in sessions and not sessions[session_id].purged]
        unreferenced: set[str] = set()
        if prefix == layout.PARTS and live:
            candidates = [key for key, session_id in owners.items() if session_id in live and key in long_stored]
            if candidates:
                unreferenced = set(candidates) - dao.referenced_part_keys(conn, live, candidates)
        orphans = [
            key
            for key, session_id in owners.items()
            if session_id is not None
            and (key in unreferenced or self._is_orphan(prefix, sessions.get(session_id)))
            # A purge records purged_at only after removing its keys, so a key listed before a
            # concurrent purge may be gone by now: only one still there is an orphan.
            and (session_id not in sessions or self._storage.exists(key))
        ]
        if orphans and not self._settings.dry_run:
            try:
                self._storage.delete(orphans)
            except ChunksvcError as exc:
                log.warning("reap: could not remove %d orphaned keys: %s", len(orphans), exc.detail)
                result.errors += 1
                return
        result.orphans_removed += len(orphans)
        for key in orphans:
            result.note("orphans_removed", key)

    @staticmethod
    def _is_orphan(prefix: str, session: SweptSessionRow | None) -> bool:
        """A key no session will ever need, and that no other phase will remove.

        Until its session is purged a key is the session's business: its writer may be about to
        record it, its completion may need it, or the purge will remove it. After the purge
        nothing under ``parts/`` is needed, and an object only by a ``COMPLETED`` session.
        """
        if session is None:
            return True  # sessions are never deleted, so these bytes belong to nobody
        if not session.purged:
            return False
        return prefix == layout.PARTS or session.status != states.COMPLETED


class PeriodicReaper:
    """The reaper run by the server itself, every ``interval`` seconds (``CHUNKSVC_REAP_INTERVAL``).

    Each gunicorn worker on each host has one, started like the background assembler. At every
    turn each of them offers to run a pass; the first to take the run's lease (``reaper_leases``
    row ``periodic``, renewed for the whole pass) runs it, and every other process skips that turn
    (counted as ``chunksvc_reaper_skipped_total``) instead of waiting: one pass at a time across
    all hosts. Turns fall on whole multiples of ``interval`` of the wall clock, so the offers of
    all processes arrive together and one of them reaps per turn, wherever the hosts' workers
    started. A pass that outlasts the interval makes the turns it covers skip.

    ``python -m chunksvc reap`` from cron works alongside: it does not take the run's lease, and
    several reapers never do the same work twice (see ``Reaper``). A crashed runner's lease runs
    out ``lease`` seconds after its last renewal (it used to go with its connection, at once); the
    turns until then are skipped. A runner that stalls past its lease may see another pass start
    beside its own: harmless, as with cron's (each phase is safe alongside another reaper).
    """

    LOCK = "periodic"

    def __init__(
        self,
        db: Database,
        reaper: Reaper,
        interval: float,
        events: UploadEvents | None = None,
        clock: Callable[[], float] = time.time,
        lease: float = COMPLETION_LEASE,
    ) -> None:
        self._db = db
        self._reaper = reaper
        self._interval = interval
        self._lease = lease
        self._events = events or UploadEvents()
        self._clock = clock
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start taking turns (nothing when the interval is 0: reaping is left to cron)."""
        with self._lock:
            if self._interval > 0 and self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="reaper", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        """Take no further turn; a pass under way is abandoned with its process (daemon thread):
        everything it did so far is committed, and the next pass does the rest."""
        self._stopping.set()

    def run_once(self) -> ReapResult | None:
        """One turn: a pass if this process takes the run's lease; None if another process holds it."""
        with reaper_lease(self._db, self.LOCK, self._lease) as lease:
            if lease is None:
                self._events.reaper_skipped()
                return None
            result = self._reaper.run(stopping=self._stopping.is_set)
        log.info("%s", result.summary())
        return result

    def _loop(self) -> None:
        while not self._stopping.wait(self._interval - self._clock() % self._interval):
            try:
                self.run_once()
            except ChunksvcError as exc:  # the database is down: this turn is lost, not the next
                log.warning("reaper: turn not taken: %s", exc.detail)
            except Exception:
                log.exception("reaper: the pass failed unexpectedly")
