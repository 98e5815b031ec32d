"""What the services report as they work, for whoever counts it (``chunksvc.metrics.Metrics``).

Services call these methods and never import a metrics library. This base class is the
default and ignores every event, so a service built without an observer works unchanged.
Each method is called after the change it reports has been committed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class UploadEvents:
    def session_created(self) -> None:
        """A new session was created (an idempotent replay is not reported)."""

    def part_stored(self, *, created: bool, size: int, healed: bool = False) -> None:
        """A part body of ``size`` bytes was received whole and recorded: a new part, or a
        duplicate (``created`` false) of one already accepted with the same bytes; ``healed``
        when that duplicate replaced recorded bytes that had gone missing from storage."""

    def session_completed(self, assembly_seconds: float) -> None:
        """A session was assembled and verified; ``assembly_seconds`` is the assembly's duration."""

    def session_failed(self, assembly_seconds: float) -> None:
        """An assembled object did not match the expected size or SHA-256; the session is FAILED."""

    def session_reopened(self, lost_parts: int) -> None:
        """A completion found ``lost_parts`` recorded parts without their stored bytes: they were
        dropped and the session reopened for the client to send them again."""

    def assembly_running(self, change: int) -> None:
        """An assembly started (+1) or ended (-1) in this process."""

    def session_aborted(self) -> None:
        """A session moved to ABORTED (aborting an already aborted session is not reported)."""

    def sessions_expired(self, count: int) -> None:
        """The reaper marked ``count`` overdue sessions EXPIRED."""

    def reaper_run(self, *, succeeded: bool, counts: Mapping[str, int], seconds: float) -> None:
        """A reaper run ended; ``counts`` says how much of each kind of work it did
        (e.g. ``{"orphans_removed": 3}``) and ``succeeded`` is false when something was left."""

    def reaper_skipped(self) -> None:
        """The server's periodic reaper let a turn pass: another process held the run's lease."""

    def webhook_delivered(self, latency: float | None) -> None:
        """An event was delivered (a 2xx); ``latency``: seconds since the state change that made
        it (None when another deliverer had recorded it delivered first)."""

    def webhook_failed(self, *, dead: bool) -> None:
        """An attempt to deliver an event failed; ``dead`` when it will not be tried again."""


class Observers(UploadEvents):
    """Several observers as one: each event goes to each, in order."""

    def __init__(self, observers: Sequence[UploadEvents]) -> None:
        self._observers = tuple(observers)

    def session_created(self) -> None:
        for observer in self._observers:
            observer.session_created()

    def part_stored(self, *, created: bool, size: int, healed: bool = False) -> None:
        for observer in self._observers:
            observer.part_stored(created=created, size=size, healed=healed)

    def session_completed(self, assembly_seconds: float) -> None:
        for observer in self._observers:
            observer.session_completed(assembly_seconds)

    def session_failed(self, assembly_seconds: float) -> None:
        for observer in self._observers:
            observer.session_failed(assembly_seconds)

    def session_reopened(self, lost_parts: int) -> None:
        for observer in self._observers:
            observer.session_reopened(lost_parts)

    def assembly_running(self, change: int) -> None:
        for observer in self._observers:
            observer.assembly_running(change)

    def session_aborted(self) -> None:
        for observer in self._observers:
            observer.session_aborted()

    def sessions_expired(self, count: int) -> None:
        for observer in self._observers:
            observer.sessions_expired(count)

    def reaper_run(self, *, succeeded: bool, counts: Mapping[str, int], seconds: float) -> None:
        for observer in self._observers:
            observer.reaper_run(succeeded=succeeded, counts=counts, seconds=seconds)

    def reaper_skipped(self) -> None:
        for observer in self._observers:
            observer.reaper_skipped()

    def webhook_delivered(self, latency: float | None) -> None:
        for observer in self._observers:
            observer.webhook_delivered(latency)

    def webhook_failed(self, *, dead: bool) -> None:
        for observer in self._observers:
            observer.webhook_failed(dead=dead)
