"""python-pkcs11's exceptions, translated into envpipe's error tree at the boundary.

    device, session, memory, login lost          KmsUnavailableError (retriable); a lost
                                                 device re-initialises the module first
    object gone (NoSuchKey, a stale handle)      KeyUnavailableError (crypto-shredding)
    PinIncorrect, PinLocked, PinExpired, ...     ConfigError naming the PIN setting
    key usage, mechanism, data, template         KmsRequestError
    anything unrecognised                        KmsUnavailableError: pausing is safer than
                                                 dead-lettering on a code nobody expected

`code` is python-pkcs11's class name (`DeviceRemoved`, `MechanismInvalid`), or the CKR_ name
for the few return values python-pkcs11 leaves unmapped. `CKR_GENERAL_ERROR` is ambiguous
(SoftHSM2 answers a failed GCM tag check with it), so the caller disambiguates it with a
health probe before translating; see `Pkcs11Kms`.
"""

from __future__ import annotations

import re

import pkcs11.exceptions as p11

from pipeline.errors import (
    ConfigError,
    EnvpipeError,
    KeyUnavailableError,
    KmsRequestError,
    KmsUnavailableError,
)

__all__ = ["AMBIGUOUS", "SESSION_LOST", "device_lost", "error_code", "translate"]

#: The token may be down, or may have refused this one request: probe before translating.
AMBIGUOUS: tuple[type[p11.PKCS11Error], ...] = (p11.GeneralError, p11.FunctionFailed)

#: The thread's session is unusable afterwards: drop it, so the next call opens a new one.
SESSION_LOST: tuple[type[p11.PKCS11Error], ...] = (
    p11.SessionClosed,
    p11.SessionHandleInvalid,
    p11.DeviceRemoved,
    p11.TokenNotPresent,
    p11.TokenNotRecognised,
    p11.UserNotLoggedIn,
    p11.DeviceError,
)

#: The module lost its device (a network HSM's client: the connection): re-initialise it.
_DEVICE_LOST: tuple[type[p11.PKCS11Error], ...] = (
    p11.DeviceError,
    p11.DeviceRemoved,
    p11.TokenNotPresent,
    p11.TokenNotRecognised,
)

_UNAVAILABLE: tuple[type[p11.PKCS11Error], ...] = (
    *SESSION_LOST,
    *AMBIGUOUS,
    p11.DeviceMemory,
    p11.HostMemory,
    p11.SessionCount,
    p11.FunctionCancelled,
    p11.OperationActive,
    p11.RandomNoRNG,
)

_KEY_GONE: tuple[type[p11.PKCS11Error], ...] = (
    p11.NoSuchKey,
    p11.ObjectHandleInvalid,
    p11.KeyHandleInvalid,
)

_BAD_PIN: tuple[type[p11.PKCS11Error], ...] = (
    p11.PinIncorrect,
    p11.PinLocked,
    p11.PinExpired,
    p11.PinInvalid,
    p11.PinLenRange,
    p11.UserPinNotInitialized,
)

_PIN_MESSAGES = {
    "PinIncorrect": "the token refused the PIN (CKR_PIN_INCORRECT)",
    "PinLocked": "the token's user PIN is locked (CKR_PIN_LOCKED): an SO must reset it",
    "PinExpired": "the token's user PIN has expired (CKR_PIN_EXPIRED)",
    "UserPinNotInitialized": "the token has no user PIN yet (CKR_USER_PIN_NOT_INITIALIZED)",
}

#: Return values python-pkcs11 raises as a bare "Unmapped error code 0x..".
_UNMAPPED = {
    0x1B: "CKR_ACTION_PROHIBITED",
    0x68: "CKR_KEY_FUNCTION_NOT_PERMITTED",
    0x0A: "CKR_CANT_LOCK",
    0x140: "CKR_CURVE_NOT_SUPPORTED",
    0x190: "CKR_CRYPTOKI_NOT_INITIALIZED",
}
#: Of those, the ones that are a refusal of this request, not an outage.
_UNMAPPED_REQUEST = frozenset({"CKR_ACTION_PROHIBITED", "CKR_KEY_FUNCTION_NOT_PERMITTED"})
_HEX_CODE = re.compile(r"0x([0-9a-fA-F]+)")


def error_code(exc: p11.PKCS11Error) -> str:
    """The name envpipe reports: the class name, or CKR_... for an unmapped return value."""
    if type(exc) is not p11.PKCS11Error:
        return type(exc).__name__
    match = _HEX_CODE.search(str(exc))
    if match is None:
        return "PKCS11Error"
    value = int(match.group(1), 16)
    return _UNMAPPED.get(value, f"CKR_0x{value:X}")


def device_lost(exc: p11.PKCS11Error) -> bool:
    """Whether `exc` says the module lost its device, or was left uninitialised by that."""
    return isinstance(exc, _DEVICE_LOST) or error_code(exc) == "CKR_CRYPTOKI_NOT_INITIALIZED"


def translate(
    exc: p11.PKCS11Error, operation: str, *, pin_setting: str, detail: str = ""
) -> EnvpipeError:
    """The envpipe error for `exc` during `operation`; raise it `from exc`.

    `detail` says what was being done (never key material or a PIN).
    """
    code = error_code(exc)
    message = detail or "the PKCS#11 module refused the request"
    if isinstance(exc, _BAD_PIN):
        return ConfigError(
            pin_setting, _PIN_MESSAGES.get(code, f"the token refused the PIN ({code})")
        )
    if isinstance(exc, _KEY_GONE):
        return KeyUnavailableError(operation, code, message)
    if isinstance(exc, _UNAVAILABLE):
        return KmsUnavailableError(operation, code, message)
    if type(exc) is p11.PKCS11Error and code not in _UNMAPPED_REQUEST:
        return KmsUnavailableError(operation, code, message)
    return KmsRequestError(operation, code, message)
