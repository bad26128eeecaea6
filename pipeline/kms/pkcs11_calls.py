"""Running PKCS#11 work off the event loop: the bounded thread pool under `Pkcs11Kms`.

`TokenCalls` owns the pool and the way back from it. A call is a function of one session; it
runs on a pool thread, on that thread's own logged-in session (`TokenSessions.locked`), and
whatever python-pkcs11 raises comes back already translated into envpipe's error tree. The
translation needs the session the error happened on (a lost session is dropped, an ambiguous
CKR_GENERAL_ERROR is told apart by a health probe), which is why it happens here, on the
thread, under the call lock, and not in the caller. Closing waits for the calls in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pkcs11.exceptions as p11
from pkcs11 import Session

from pipeline.errors import EnvpipeError, KmsRequestError
from pipeline.kms.pkcs11_errors import (
    AMBIGUOUS,
    SESSION_LOST,
    device_lost,
    error_code,
    translate,
)
from pipeline.kms.pkcs11_token import ClosedError, TokenSessions

__all__ = ["TokenCalls"]

_T = TypeVar("_T")


class TokenCalls:
    """Calls on the sessions of one token, each on a thread of `pool`, errors translated."""

    def __init__(self, sessions: TokenSessions, pool: ThreadPoolExecutor) -> None:
        self._sessions = sessions
        self._pool = pool
        self._closed = False

    async def run(self, operation: str, work: Callable[[Session], _T], detail: str) -> _T:
        """Run `work` on this thread's session in the pool; errors come back translated.

        `detail` says what the call was doing ("wrapping under 'kek'"), for the message.
        """
        if self._closed:
            raise _closed(operation)
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, self._in_thread, operation, work, detail
            )
        except RuntimeError as exc:  # the pool shut down between the check and the submit
            if self._closed:
                raise _closed(operation) from exc
            raise

    async def close(self) -> None:
        """Wait for calls in flight, close every session, stop the pool. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._shutdown)

    def _shutdown(self) -> None:
        self._pool.shutdown(wait=True)
        self._sessions.close()

    def _in_thread(self, operation: str, work: Callable[[Session], _T], detail: str) -> _T:
        try:
            with self._sessions.locked() as session:
                try:
                    return work(session)
                except p11.PKCS11Error as exc:
                    raise self._translate(exc, operation, session, detail) from exc
        except ClosedError as exc:
            raise _closed(operation) from exc
        except p11.PKCS11Error as exc:  # re-initialising, opening the session, logging in
            if device_lost(exc):
                self._sessions.connection_lost()
            raise translate(
                exc,
                operation,
                pin_setting=self._sessions.pin_setting,
                detail=f"opening a session on {self._sessions.label!r}",
            ) from exc

    def _translate(
        self, exc: p11.PKCS11Error, operation: str, session: Session, detail: str
    ) -> EnvpipeError:
        """Runs under the call lock, so the session and the probe are still this thread's."""
        if device_lost(exc):
            self._sessions.connection_lost()
        if isinstance(exc, SESSION_LOST):
            self._sessions.drop_current()
        elif isinstance(exc, AMBIGUOUS) and self._sessions.healthy(session):
            # SoftHSM2 answers a failed GCM tag check (wrong C, tampering) with
            # CKR_GENERAL_ERROR: a token that still answers refused this request.
            return KmsRequestError(
                operation, error_code(exc), f"{detail}: the token refused the request"
            )
        return translate(exc, operation, pin_setting=self._sessions.pin_setting, detail=detail)


def _closed(operation: str) -> KmsRequestError:
    return KmsRequestError(operation, "closed", "the PKCS#11 provider has been closed")
