"""The upload session state machine.

    INIT --first part--> IN_PROGRESS --complete--> COMPLETING --> COMPLETED
                                                             \\--> FAILED (size or digest mismatch)
                                                             \\--> IN_PROGRESS (parts' bytes lost)
    INIT / IN_PROGRESS --ttl--> EXPIRED
    any but COMPLETED (and COMPLETING while assembling) --abort--> ABORTED

A COMPLETING session whose assembler died can be taken over (complete again) or aborted.
"""

from __future__ import annotations

INIT = "INIT"
IN_PROGRESS = "IN_PROGRESS"
COMPLETING = "COMPLETING"
COMPLETED = "COMPLETED"
ABORTED = "ABORTED"
EXPIRED = "EXPIRED"
FAILED = "FAILED"

ALL = (INIT, IN_PROGRESS, COMPLETING, COMPLETED, ABORTED, EXPIRED, FAILED)

#: States that accept parts (and a completion request).
OPEN = frozenset({INIT, IN_PROGRESS})
#: Sessions not ended yet: what the quotas count and the live-sessions gauge shows.
LIVE = (INIT, IN_PROGRESS, COMPLETING)

#: The moves a session can make, as documentation: no service reads it. Every move, abort's too,
#: is made by a statement of queries.sql (or a migration's function) under its own WHERE clause,
#: or a service's check, and tests/test_states.py attempts each of them in every state against
#: this table, so the two cannot drift apart.
TRANSITIONS: dict[str, frozenset[str]] = {
    INIT: frozenset({IN_PROGRESS, ABORTED, EXPIRED}),
    IN_PROGRESS: frozenset({IN_PROGRESS, COMPLETING, ABORTED, EXPIRED}),
    # Back to IN_PROGRESS when parts' stored bytes turn out to be lost: the client re-sends them.
    COMPLETING: frozenset({COMPLETING, COMPLETED, FAILED, ABORTED, IN_PROGRESS}),
    COMPLETED: frozenset(),
    ABORTED: frozenset({ABORTED}),
    EXPIRED: frozenset({ABORTED}),
    FAILED: frozenset({ABORTED}),
}


def accepts_parts(status: str) -> bool:
    return status in OPEN
