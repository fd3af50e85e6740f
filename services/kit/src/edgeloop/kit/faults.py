"""Which failures are the platform's and which are the message's (DESIGN §4a).

An unreachable PostgreSQL or NATS, a reset connection, a timeout: the platform's fault.
A consumer that meets one holds its messages, waits until its dependencies answer and
tries again, without spending the message's delivery budget. Everything else is the
message's own problem and counts toward dead-lettering.

The classification only decides who is *asked*: an error that looks like an outage makes
the consumer probe its dependencies, and only an outage the probe actually sees (a
dependency that does not answer) keeps the budget untouched. So a handler's own
``ConnectionRefusedError`` from some third-party host, with PostgreSQL and NATS
answering, still counts against the message.
"""

from __future__ import annotations

import asyncpg
import nats.errors
import nats.js.errors
from asyncpg.exceptions._base import DataError as ArgumentError

from edgeloop.kit.db import TRANSIENT_DB_ERRORS


class TransientError(Exception):
    """Raised by a handler for a dependency of its own that is down: like an outage of
    PostgreSQL or NATS, it is retried without spending the message's budget, as long as
    the platform's dependencies answer no better (see :func:`looks_like_outage`)."""


#: NATS client errors that mean "the server is not there right now".
NATS_OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.NoRespondersError,
    nats.errors.TimeoutError,
    nats.errors.FlushTimeoutError,
    nats.js.errors.ServiceUnavailableError,  # no JetStream leader (a cluster electing)
)

#: Errors that are certainly a lost connection, whatever a probe says afterwards.
CONNECTION_LOST: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.ConnectionFailureError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
)

#: SQLSTATE classes of an infrastructure condition: 08 connection exception, 53
#: insufficient resources, 57 operator intervention (shutdown), 58 system error.
_OUTAGE_SQLSTATE_CLASSES = ("08", "53", "57", "58")
#: 40001 serialization failure, 40P01 deadlock: try again, nothing is wrong.
_CONFLICT_SQLSTATES = ("40001", "40P01")
#: SQLSTATE class 22, data exception: a value the column's type cannot take (numeric out
#: of range, string too long, invalid text for the type), the same at every attempt.
_DATA_SQLSTATE_CLASS = "22"


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 8:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def looks_like_outage(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) may be a dependency that is down."""
    for e in _chain(exc):
        if isinstance(e, (TransientError, *CONNECTION_LOST, *NATS_OUTAGE_ERRORS)):
            return True
        if isinstance(e, TRANSIENT_DB_ERRORS) and not is_conflict(e):
            return True
        state = getattr(e, "sqlstate", None)
        if isinstance(state, str) and state[:2] in _OUTAGE_SQLSTATE_CLASSES:
            return True
    return False


def certainly_outage(exc: BaseException) -> bool:
    """True when ``exc`` is a lost connection: not the message's fault even if the
    dependency answers again by the time anyone looks."""
    return any(isinstance(e, CONNECTION_LOST) for e in _chain(exc))


def is_conflict(exc: BaseException) -> bool:
    """A serialization failure or a deadlock: retry the transaction, charge nothing."""
    return any(getattr(e, "sqlstate", None) in _CONFLICT_SQLSTATES for e in _chain(exc))


def refused_value(exc: BaseException) -> str | None:
    """Why PostgreSQL (or asyncpg, encoding a query argument) refuses a value of the
    message: a data exception is the message's own and the same at every attempt, so it
    is dead-lettered at once instead of retried to exhaustion. None for anything else."""
    for e in _chain(exc):
        if isinstance(e, ArgumentError):
            return f"a value asyncpg cannot send: {e}"
        state = getattr(e, "sqlstate", None)
        if isinstance(state, str) and state.startswith(_DATA_SQLSTATE_CLASS):
            return f"a value PostgreSQL refuses (SQLSTATE {state}): {e}"
    return None
