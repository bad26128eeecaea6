"""The two PKCS#11 calls python-pkcs11 does not offer, made through ctypes: `C_Login` on an
open session and `C_GetSessionInfo`.

python-pkcs11 can log in only while opening a session (and leaks that session when the answer
is CKR_USER_ALREADY_LOGGED_IN), and cannot read a session's state, which is what tells "logged
out" apart from "the key was destroyed" (`pkcs11_token`). Both calls must go to the very
module instance python-pkcs11 initialised, so they go through its function list
(`function_list`). The layout read there is checked against python-pkcs11 0.10, the version
`pyproject.toml` allows.
"""

from __future__ import annotations

import ctypes
import logging
from typing import TYPE_CHECKING, Any

import pkcs11.exceptions as p11

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Pkcs11Lib

__all__ = ["NativeCalls", "function_list"]

_log = logging.getLogger(__name__)

_CKR_OK = 0
_CKR_USER_ALREADY_LOGGED_IN = 0x100
_CKU_USER = 1
_CKS_USER_STATES = frozenset({1, 3})  # CKS_RO_USER_FUNCTIONS, CKS_RW_USER_FUNCTIONS

#: Return values of the two calls made through ctypes, as python-pkcs11's exception classes.
_RV_ERRORS: dict[int, type[p11.PKCS11Error]] = {
    0x05: p11.GeneralError,
    0x06: p11.FunctionFailed,
    0x30: p11.DeviceError,
    0x31: p11.DeviceMemory,
    0x32: p11.DeviceRemoved,
    0xA0: p11.PinIncorrect,
    0xA1: p11.PinInvalid,
    0xA2: p11.PinLenRange,
    0xA3: p11.PinExpired,
    0xA4: p11.PinLocked,
    0xB0: p11.SessionClosed,
    0xB3: p11.SessionHandleInvalid,
    0xE0: p11.TokenNotPresent,
    0x101: p11.UserNotLoggedIn,
    0x102: p11.UserPinNotInitialized,
    0x104: p11.AnotherUserAlreadyLoggedIn,
}

#: CK_FUNCTION_LIST up to C_Logout; the order is fixed by the PKCS#11 headers.
_FUNCTION_NAMES = (
    "C_Initialize", "C_Finalize", "C_GetInfo", "C_GetFunctionList", "C_GetSlotList",
    "C_GetSlotInfo", "C_GetTokenInfo", "C_GetMechanismList", "C_GetMechanismInfo",
    "C_InitToken", "C_InitPIN", "C_SetPIN", "C_OpenSession", "C_CloseSession",
    "C_CloseAllSessions", "C_GetSessionInfo", "C_GetOperationState", "C_SetOperationState",
    "C_Login", "C_Logout",
)  # fmt: skip


class _Version(ctypes.Structure):
    _fields_ = (("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte))


class _FunctionList(ctypes.Structure):
    _fields_ = (("version", _Version), *((name, ctypes.c_void_p) for name in _FUNCTION_NAMES))


class _SessionInfo(ctypes.Structure):
    _fields_ = (
        ("slot_id", ctypes.c_ulong),
        ("state", ctypes.c_ulong),
        ("flags", ctypes.c_ulong),
        ("device_error", ctypes.c_ulong),
    )


_LOGIN = ctypes.CFUNCTYPE(
    ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong
)
_SESSION_INFO = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.POINTER(_SessionInfo))


def _check(rv: int) -> None:
    if rv != _CKR_OK:
        raise _RV_ERRORS.get(rv, p11.PKCS11Error)(f"Unmapped error code {rv:#x}")


def function_list(lib: Pkcs11Lib, path: str) -> Any:
    """The CK_FUNCTION_LIST python-pkcs11 initialised, as a ctypes pointer.

    Not a second `C_GetFunctionList`: p11-kit's client (like other proxies) makes a new,
    uninitialised instance with its own connection per call, whose sessions are not ours.
    python-pkcs11 keeps the pointer in the first field of its Cython base `HasFuncList`,
    right after the object header; that layout is checked before reading it.
    """
    base = type(lib).__mro__[1]
    header, pointer = object.__basicsize__, ctypes.sizeof(ctypes.c_void_p)
    if base.__name__ == "HasFuncList" and base.__basicsize__ == header + 3 * pointer:
        address = ctypes.c_void_p.from_address(id(lib) + header).value
        if address:
            return ctypes.cast(address, ctypes.POINTER(_FunctionList))
    _log.warning("python-pkcs11's layout is unknown; asking %s for its function list", path)
    get_list = ctypes.CDLL(path).C_GetFunctionList
    get_list.restype = ctypes.c_ulong
    get_list.argtypes = (ctypes.POINTER(ctypes.POINTER(_FunctionList)),)
    table = ctypes.POINTER(_FunctionList)()
    _check(get_list(ctypes.byref(table)))
    return table


class NativeCalls:
    """`C_Login` and `C_GetSessionInfo` of the already-initialised module, via ctypes.

    They go through python-pkcs11's own function list (`function_list`), so they act on its
    sessions. ctypes releases the GIL during each call, as python-pkcs11 does.
    """

    def __init__(self, lib: Pkcs11Lib, path: str) -> None:
        table = function_list(lib, path)
        self._login = _LOGIN(table.contents.C_Login)
        self._session_info = _SESSION_INFO(table.contents.C_GetSessionInfo)

    def login(self, handle: int, pin: bytes) -> bool:
        """Log the token in as the user; False if it already was (not an error)."""
        rv = self._login(handle, _CKU_USER, pin, len(pin))
        if rv == _CKR_USER_ALREADY_LOGGED_IN:
            return False
        _check(rv)
        return True

    def logged_in(self, handle: int) -> bool:
        info = _SessionInfo()
        _check(self._session_info(handle, ctypes.byref(info)))
        return info.state in _CKS_USER_STATES
