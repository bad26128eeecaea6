"""One PKCS#11 token: load the module once per process, log in once, a session per thread.

Why each piece is the way it is:

- **One module instance per process.** python-pkcs11 loads and `C_Initialize`s a module
  once per path and caches it; SoftHSM2 reads `SOFTHSM2_CONF` at that moment only. So
  `load_module` remembers the `SOFTHSM2_CONF` it was loaded under and refuses a second one.
- **One lock per module, around every call.** python-pkcs11 calls `C_Initialize(NULL)`, which
  tells the module the application will *not* call it from several threads at once; SoftHSM2
  then switches its own mutexes off. Calls from the pool threads therefore take
  `LoadedModule.calls`. python-pkcs11 releases the GIL inside each C call, so the event loop
  keeps running while a thread waits on the token.
- **A session per pool thread**, opened lazily and kept until `close`, so no two threads ever
  share a session's operation state; a session the token declared dead is dropped and the
  thread opens a new one on its next call.
- **Login once per token.** PKCS#11 login state belongs to the application and the token, not
  to a session: one `C_Login` makes every session of the process a user session, a second one
  answers `CKR_USER_ALREADY_LOGGED_IN` (success here), and closing the last session logs out.
  python-pkcs11 can only log in while opening a session (and then leaks that session when the
  answer is ALREADY_LOGGED_IN) and cannot read a session's state, so `C_Login` and
  `C_GetSessionInfo` are called through the module's own function list (`pkcs11_native`). The
  state check is what tells "not logged in any more" (private objects vanish from searches)
  apart from "the key was destroyed".
- **Re-initialise after a lost device.** A network HSM's client (p11-kit's, vendors') keeps
  answering CKR_DEVICE_ERROR after the HSM is back, until `C_Finalize` + `C_Initialize`. A
  lost device marks the module `lost`; the next call re-initialises it, forsakes the old
  generation's sessions (not closed: their handles mean nothing now), finds the token again
  and logs in. A token found once and missing later is an outage (docs/pkcs11.md).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pkcs11
import pkcs11.exceptions as p11
from pkcs11 import Session, Token

from pipeline.errors import ConfigError
from pipeline.kms.pkcs11_native import NativeCalls

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Pkcs11Lib

__all__ = ["ClosedError", "LoadedModule", "TokenSessions", "load_module", "read_pin"]

_log = logging.getLogger(__name__)

MODULE_SETTING = "ENVPIPE_PKCS11_MODULE"
TOKEN_SETTING = "ENVPIPE_PKCS11_TOKEN"  # noqa: S105 - a setting name, not a secret
PIN_SETTING = "ENVPIPE_PKCS11_PIN"
PIN_FILE_SETTING = "ENVPIPE_PKCS11_PIN_FILE"


@dataclass(eq=False)
class LoadedModule:
    """A PKCS#11 module as loaded into this process, with the lock that serialises its calls.

    `generation` counts re-initialisations: a session opened in an older one is dead.
    """

    path: str
    lib: Pkcs11Lib
    functions: NativeCalls
    softhsm_conf: str | None
    calls: threading.Lock
    lost: bool = False
    generation: int = 0

    def reinitialize(self) -> None:
        """`C_Finalize` + `C_Initialize` (the caller holds `calls`); raises while still down."""
        try:
            self.lib.finalize()
        except p11.PKCS11Error:  # already finalised, or the device answers nothing
            _log.debug("C_Finalize of %s failed", self.path, exc_info=True)
        self.lib.initialize()
        self.lost = False
        self.generation += 1
        _log.debug("re-initialised PKCS#11 module %s after losing the device", self.path)


_modules: dict[str, LoadedModule] = {}
_modules_lock = threading.Lock()


def load_module(path: str, softhsm_conf: str | None = None) -> LoadedModule:
    """The process's instance of the module at `path`, loading it on first use.

    `softhsm_conf` (the SOFTHSM2_CONF the caller was configured with) is exported before the
    first load, because SoftHSM2 reads it only then; a different one later is a ConfigError.
    """
    with _modules_lock:
        loaded = _modules.get(path)
        if loaded is not None:
            if softhsm_conf and softhsm_conf != loaded.softhsm_conf:
                raise ConfigError(
                    "SOFTHSM2_CONF",
                    f"{path} is already initialised in this process with SOFTHSM2_CONF="
                    f"{loaded.softhsm_conf or '(unset)'}; a process can use only one",
                )
            return loaded
        if "/" in path and not Path(path).is_file():  # a bare name goes to the loader's search
            raise ConfigError(MODULE_SETTING, f"no PKCS#11 module at {path}")
        if softhsm_conf:
            os.environ["SOFTHSM2_CONF"] = softhsm_conf
        try:
            lib = pkcs11.lib(path)
            functions = NativeCalls(lib, path)
        except (p11.PKCS11Error, OSError, AttributeError) as exc:
            raise ConfigError(
                MODULE_SETTING, f"cannot load {path} as a PKCS#11 module: {exc}"
            ) from exc
        loaded = LoadedModule(
            path, lib, functions, os.environ.get("SOFTHSM2_CONF"), threading.Lock()
        )
        _modules[path] = loaded
        _log.info("loaded PKCS#11 module %s (%s)", path, lib.library_description)
        return loaded


def read_pin(pin: str, pin_file: str) -> tuple[str, str]:
    """The user PIN and the setting it came from (what a wrong-PIN error names).

    The file's trailing newline is stripped, as `echo PIN > file` writes one.
    """
    if pin and pin_file:
        raise ConfigError(
            PIN_SETTING, f"set {PIN_SETTING} or {PIN_FILE_SETTING}, not both (prefer the file)"
        )
    if pin:
        return pin, PIN_SETTING
    if not pin_file:
        raise ConfigError(
            PIN_FILE_SETTING, f"no PIN for the token: set {PIN_FILE_SETTING} (or {PIN_SETTING})"
        )
    try:
        text = Path(pin_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ConfigError(PIN_FILE_SETTING, f"cannot read {pin_file}: {reason}") from exc
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise ConfigError(PIN_FILE_SETTING, f"{pin_file} is empty")
    return text, PIN_FILE_SETTING


def _handle(session: Session) -> int:
    handle: int = session.handle  # type: ignore[attr-defined]  # Cython attribute, not in stubs
    return handle


class ClosedError(Exception):
    """Internal: a call reached the token after `close` (the caller reports it)."""


class TokenSessions:
    """The sessions one `Pkcs11Kms` holds on one token: one per pool thread, all logged in.

    Every method is called from a pool thread; `locked` takes the module's call lock.
    """

    def __init__(self, module: LoadedModule, label: str, pin: str, pin_setting: str) -> None:
        self.module = module
        self.label = label
        self.pin_setting = pin_setting
        self._pin = pin.encode("utf-8")
        self._token: Token | None = None
        self._found = False
        self._generation = module.generation
        self._local = threading.local()
        self._sessions: list[Session] = []
        self.closed = False

    def __repr__(self) -> str:
        return (
            f"TokenSessions({self.module.path!r}, {self.label!r}, sessions={len(self._sessions)})"
        )

    @contextmanager
    def locked(self) -> Iterator[Session]:
        """This thread's session, under the module's call lock."""
        with self.module.calls:
            if self.closed:
                raise ClosedError
            yield self._current()

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def _find_token(self) -> Token:
        try:
            token = self.module.lib.get_token(token_label=self.label)
        except p11.NoSuchToken as exc:
            if self._found:  # it was here: the device (or the way to it) is gone
                self.connection_lost()
                raise p11.TokenNotPresent from exc
            found = sorted(token.label for token in self.module.lib.get_tokens())
            listing = ", ".join(repr(label) for label in found) or "none"
            raise ConfigError(
                TOKEN_SETTING,
                f"no token labelled {self.label!r} in {self.module.path} (tokens found: {listing})",
            ) from exc
        except p11.MultipleTokensReturned as exc:
            raise ConfigError(
                TOKEN_SETTING, f"more than one token is labelled {self.label!r}; relabel one"
            ) from exc
        if self._found and self.module.generation:
            _log.info("PKCS#11 token %r found again after losing the device", self.label)
        self._found = True
        return token

    def connection_lost(self) -> None:
        """The module lost its device: re-initialise it before the next call."""
        self.module.lost = True

    def _renew(self) -> None:
        """Re-initialise a lost module; forsake the sessions of an older generation."""
        if self.module.lost:
            self.module.reinitialize()
        if self._generation != self.module.generation:
            self._generation = self.module.generation
            self._sessions = []
            self._token = None

    def _current(self) -> Session:
        self._renew()
        session: Session | None = getattr(self._local, "session", None)
        if getattr(self._local, "generation", None) != self._generation:
            session = None
        if session is None:
            if self._token is None:
                self._token = self._find_token()
            session = self._token.open(rw=False)
            self._sessions.append(session)
            self._local.session = session
            self._local.generation = self._generation
            try:
                self.ensure_login(session)
            except BaseException:
                self.drop_current()
                raise
        return session

    def ensure_login(self, session: Session) -> bool:
        """Log the token in unless it is; True if a login happened (the first, or a lost one)."""
        if self.module.functions.logged_in(_handle(session)):
            return False
        return self.module.functions.login(_handle(session), self._pin)

    def drop_current(self) -> None:
        """Discard this thread's session (the token declared it dead); the next call reopens."""
        session: Session | None = getattr(self._local, "session", None)
        if getattr(self._local, "generation", None) != self._generation:
            session = None  # opened before a re-initialisation: its handle means nothing now
        self._local.session = None
        if session is None:
            return
        if session in self._sessions:
            self._sessions.remove(session)
        try:
            session.close()
        except p11.PKCS11Error:
            _log.debug("closing a dead PKCS#11 session failed", exc_info=True)

    def healthy(self, session: Session) -> bool:
        """Whether the token still answers (C_GenerateRandom): tells outages from refusals."""
        try:
            session.generate_random(64)
        except p11.PKCS11Error:
            return False
        return True

    def close(self) -> None:
        """Close every session (the last one closed logs the process out). Idempotent."""
        with self.module.calls:
            self.closed = True
            sessions, self._sessions = self._sessions, []
            for session in sessions:
                try:
                    session.close()
                except p11.PKCS11Error:
                    _log.debug("closing a PKCS#11 session failed", exc_info=True)
