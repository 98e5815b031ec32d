"""Assembling uploads in the background: large ones after ``complete`` answered 202, and any
accepted completion whose assembler died or gave up.

Each worker process has one ``BackgroundAssembler``: a few threads that run accepted completions
(``CompletionService.resume``), handed over by the request that accepted them or found by
a poller that looks for accepted completions nobody runs (their worker died, or they failed on
full or unreachable storage and wait for another try). Any process on any host may take any of
them: the session's completion lease lets one run at a time. The poll offers only completions
whose lease is free, and a crashed assembler's lease runs out ``CHUNKSVC_LEASE`` seconds after its
last renewal (before leases, its advisory lock went with its database connection at once), so the
first poll after that picks the work up.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from uuid import UUID

from chunksvc import dao
from chunksvc.db import Database
from chunksvc.errors import ChecksumMismatch, ChunksvcError, CompletionInProgress, PartsMissing, SessionNotActive
from chunksvc.services.completion import CompletionService

log = logging.getLogger(__name__)

# After a failure (storage full or down, say) a session is tried again after this many seconds,
# doubling up to the maximum, so a broken storage is not hammered by every worker's poller.
RETRY_AFTER_FAILURE = 5.0
MAX_RETRY_AFTER_FAILURE = 300.0
POLL_BATCH = 100


class BackgroundAssembler:
    def __init__(
        self,
        completion: CompletionService,
        db: Database,
        threads: int = 1,
        poll_interval: float = 5.0,
    ) -> None:
        self._completion = completion
        self._db = db
        self._threads = threads
        self._poll_interval = poll_interval
        self._lock = threading.Lock()
        # Daemon threads, made on first use (after gunicorn's fork): a worker that exits abandons
        # an assembly under way (another process takes it over) instead of waiting for it.
        self._jobs: queue.SimpleQueue[tuple[UUID, int]] = queue.SimpleQueue()
        self._runners: list[threading.Thread] = []
        self._queued: set[UUID] = set()
        self._failures: dict[UUID, tuple[int, float]] = {}  # session -> (failures, not before)
        self._stopping = threading.Event()
        self._poller: threading.Thread | None = None

    def submit(self, session_id: UUID, client_id: int) -> None:
        """Assemble this accepted completion soon (at once if a thread is free), unless queued."""
        with self._lock:
            if self._stopping.is_set() or session_id in self._queued:
                return
            failures = self._failures.get(session_id)
            if failures and failures[1] > time.monotonic():
                return  # it failed a moment ago; the poller offers it again later
            if not self._runners:
                self._runners = [
                    threading.Thread(target=self._serve, name=f"assembler-{n}", daemon=True)
                    for n in range(self._threads)
                ]
                for runner in self._runners:
                    runner.start()
            self._queued.add(session_id)
            self._jobs.put((session_id, client_id))

    def start(self) -> None:
        """Start looking for accepted completions that nobody runs (every ``poll_interval`` s)."""
        with self._lock:
            if self._poller is None:
                self._poller = threading.Thread(target=self._poll, name="assembler-poll", daemon=True)
                self._poller.start()

    def stop(self) -> None:
        """Stop taking work, and give back the completion leases of this process's assemblies
        (background and in-request alike: the process is going), so that another process takes
        them over at its next poll rather than once the leases run out. An assembly still under
        way here stops at its next renewal, or dies with its process."""
        self._stopping.set()
        given = self._completion.give_back_leases()
        if given:
            log.info("assembler: gave back %d completion leases on the way out", given)

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is queued or running (for tests: ``stop`` does not wait)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._queued:
                    return True
            time.sleep(0.02)
        return False

    # --- internals --------------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stopping.is_set():
            session_id, client_id = self._jobs.get()
            if self._stopping.is_set():
                return
            self._run(session_id, client_id)

    def _poll(self) -> None:
        while not self._stopping.wait(self._poll_interval):
            try:
                with self._db.connection() as conn:
                    # Enough to see past sessions that wait out a backoff here (submit skips
                    # those); each one's completion lease settles who runs it.
                    pending = dao.pending_assemblies(conn, POLL_BATCH)
            except ChunksvcError as exc:
                log.warning("assembler: cannot look for pending completions: %s", exc.detail)
                continue
            for completion in pending:
                self.submit(completion.id, completion.client_id)

    def _run(self, session_id: UUID, client_id: int) -> None:
        try:
            self._completion.resume(session_id, client_id)
        except (CompletionInProgress, SessionNotActive):
            pass  # another assembler has it, or it ended meanwhile
        except (PartsMissing, ChecksumMismatch):
            pass  # an outcome, recorded on the session (reopened, or FAILED) for GET to show
        except ChunksvcError as exc:  # storage full or down, database gone: left COMPLETING
            self._failed(session_id)
            log.warning("assembler: session %s not assembled yet: %s", session_id, exc.detail)
        except Exception:
            self._failed(session_id)
            log.exception("assembler: session %s failed unexpectedly", session_id)
        else:
            with self._lock:
                self._failures.pop(session_id, None)
        finally:
            with self._lock:
                self._queued.discard(session_id)

    def _failed(self, session_id: UUID) -> None:
        with self._lock:
            count = self._failures.get(session_id, (0, 0.0))[0] + 1
            wait = min(MAX_RETRY_AFTER_FAILURE, RETRY_AFTER_FAILURE * 2 ** (count - 1))
            self._failures[session_id] = (count, time.monotonic() + wait)
