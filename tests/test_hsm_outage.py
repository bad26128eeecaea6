"""A network HSM going away and coming back, as envpipe's PKCS#11 provider sees it.

The session's SoftHSM2 token is served by `p11-kit server` on a unix socket and reached
through p11-kit's client module (`softhsm.NetworkToken`), the way a network HSM's client
library reaches its appliance. Stopping the server is the outage: every call must fail
retriably (never as a missing key or a configuration error, which would dead-letter or stop
a worker), and once the server is back on the same socket the next call must work again,
the module re-initialised, the token found by label and logged in anew. Signing only: it
is what every p11-kit carries (0.24 cannot carry CKM_AES_GCM; the worker-level outage tests
in test_stream.py need 0.25, see P11KIT_PREFIX in tests/outages.py). A few seconds.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pkcs11.exceptions as p11
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.serialization import load_der_public_key
from pkcs11 import Session

from pipeline.errors import KmsUnavailableError
from pipeline.kms.pkcs11 import Pkcs11Kms
from pipeline.kms.pkcs11_errors import device_lost, translate
from pipeline.kms.pkcs11_native import function_list
from pipeline.kms.pkcs11_token import load_module
from pipeline.types import EncryptionContext, Operation
from tests.outages import P11KIT_PREFIX
from tests.providers import Hsm
from workers.dev import softhsm

SIGNING_URI = (
    f"pkcs11:token={softhsm.TOKEN_LABEL};object={softhsm.SIGNING_KEY_LABEL};type=private-key"
)
KEK_URI = f"pkcs11:token={softhsm.TOKEN_LABEL};object={softhsm.KMS_KEY_LABEL};type=secret-key"
DIGEST = hashlib.sha256(b"a header").digest()
CONTEXT = EncryptionContext.of({"envpipe:stream": "orders"})


@pytest.fixture
def network_token(
    hsm: Hsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[softhsm.NetworkToken]:
    """The dev token behind p11-kit server; this process's client module pointed at it."""
    token = softhsm.NetworkToken(
        Path(hsm.conf),
        softhsm.TOKEN_LABEL,
        tmp_path / "hsm.sock",
        tmp_path / "p11-kit.log",
        P11KIT_PREFIX,
    )
    for name, value in token.variables.items():
        monkeypatch.setenv(name, value)
    with token:
        yield token


def _verify(public_der: bytes, signature: bytes) -> None:
    public = load_der_public_key(public_der)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, DIGEST, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


# python-pkcs11's object-search finaliser cannot reach the device either (docs/pkcs11.md).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_an_hsm_outage_is_retriable_and_the_provider_recovers(
    hsm: Hsm, network_token: softhsm.NetworkToken
) -> None:
    kms = await Pkcs11Kms.connect(
        module=network_token.client_module,
        token=softhsm.TOKEN_LABEL,
        pin=hsm.pin,
        max_sessions=2,
        softhsm_conf=hsm.conf,
    )
    try:
        public = await kms.get_public_key(SIGNING_URI)
        _verify(public, await kms.sign(SIGNING_URI, b"a header", DIGEST))

        network_token.stop()
        codes = []
        for _attempt in range(3):  # the lost connection, then re-initialising while down
            with pytest.raises(KmsUnavailableError) as caught:
                await kms.sign(SIGNING_URI, b"a header", DIGEST)
            assert caught.value.retriable
            assert hsm.pin not in str(caught.value)
            codes.append(caught.value.code)
        print(f"HSM down: {codes}")
        assert codes[0] == "DeviceError"

        network_token.start()
        _verify(public, await kms.sign(SIGNING_URI, b"a header", DIGEST))
        assert await kms.get_public_key(SIGNING_URI) == public
    finally:
        await kms.close()


@pytest.mark.parametrize(
    ("exc", "lost"),
    [
        (p11.DeviceError(), True),
        (p11.DeviceRemoved(), True),
        (p11.TokenNotPresent(), True),
        (p11.PKCS11Error("Unmapped error code 0x190"), True),  # CKR_CRYPTOKI_NOT_INITIALIZED
        (p11.SessionHandleInvalid(), False),
        (p11.GeneralError(), False),
        (p11.NoSuchKey(), False),
    ],
)
def test_which_errors_mean_the_device_was_lost(exc: p11.PKCS11Error, lost: bool) -> None:
    assert device_lost(exc) is lost
    error = translate(exc, Operation.SIGN, pin_setting="ENVPIPE_PKCS11_PIN")
    assert not lost or (isinstance(error, KmsUnavailableError) and error.retriable)


def test_login_uses_python_pkcs11s_own_function_list(hsm: Hsm) -> None:
    """SoftHSM2 has one static list, so both ways must find the same one: the read is sound."""
    loaded = load_module(hsm.module, hsm.conf)
    get_list = ctypes.CDLL(hsm.module).C_GetFunctionList
    get_list.restype = ctypes.c_ulong
    table = ctypes.c_void_p()
    assert get_list(ctypes.byref(table)) == 0
    assert ctypes.addressof(function_list(loaded.lib, "/nonexistent").contents) == table.value


async def test_a_lost_device_reinitialises_the_module_and_logs_in_again(hsm: Hsm) -> None:
    kms = await Pkcs11Kms.connect(
        module=hsm.module, token=softhsm.TOKEN_LABEL, pin=hsm.pin, max_sessions=3
    )
    loaded = load_module(hsm.module, hsm.conf)
    try:
        key = await kms.generate_data_key(KEK_URI, CONTEXT)
        generation = loaded.generation

        def device_gone(_session: Session) -> None:
            raise p11.DeviceError

        with pytest.raises(KmsUnavailableError) as caught:
            await kms._calls.run(Operation.UNWRAP, device_gone, "unwrapping")
        assert caught.value.code == "DeviceError"
        assert loaded.lost
        # Every pool thread's old session is forsaken; each opens, finds and logs in anew.
        unwrapped = await asyncio.gather(
            *(kms.unwrap(KEK_URI, key.wrapped, CONTEXT) for _ in range(6))
        )
        assert unwrapped == [key.plaintext] * 6
        assert loaded.generation == generation + 1
        assert not loaded.lost
    finally:
        await kms.close()
