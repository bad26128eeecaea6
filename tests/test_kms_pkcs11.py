"""Pkcs11Kms against a real SoftHSM2 token, plus the pure URI, key-id and error-mapping parts.

SoftHSM2 reads SOFTHSM2_CONF once per process (when python-pkcs11 first initialises the
module), and this suite runs in one pytest process: the session fixture `hsm` creates one
configuration with two tokens and exports it before anything loads the module. Interop
checks use only python-pkcs11 and `cryptography`, never Pkcs11Kms, on the other side.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pkcs11.exceptions as p11
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.serialization import load_der_public_key
from hypothesis import given
from hypothesis import strategies as st
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.mechanisms import GCMParams
from pkcs11.types import DecryptMixin, PublicKey
from pkcs11.util.ec import encode_ec_public_key

from pipeline.config import Settings
from pipeline.errors import (
    ConfigError,
    KeyUnavailableError,
    KmsRequestError,
    KmsUnavailableError,
)
from pipeline.kms.pkcs11 import Pkcs11Kms
from pipeline.kms.pkcs11_errors import translate
from pipeline.kms.pkcs11_keys import SIGNING, WRAPPING, key_ref, token_from_key_ids
from pipeline.kms.pkcs11_token import read_pin
from pipeline.kms.pkcs11_uri import (
    Pkcs11UriError,
    canonical_key_uri,
    format_uri,
    parse_uri,
)
from pipeline.types import EncryptionContext, Kms, Operation
from tests.providers import PIN_TOKEN, PIN_TOKEN_PIN, Hsm
from workers.dev import softhsm

TOKEN = softhsm.TOKEN_LABEL
KEK_URI = f"pkcs11:token={TOKEN};object={softhsm.KMS_KEY_LABEL};type=secret-key"
SIGNING_URI = f"pkcs11:token={TOKEN};object={softhsm.SIGNING_KEY_LABEL};type=private-key"
CONTEXT = EncryptionContext.of({"envpipe:stream": "orders", "tenant": "acme"})


async def _connect(hsm: Hsm, max_sessions: int = 4) -> Pkcs11Kms:
    return await Pkcs11Kms.connect(
        module=hsm.module, token=TOKEN, pin=hsm.pin, max_sessions=max_sessions
    )


@pytest.fixture
async def kms(hsm: Hsm) -> AsyncIterator[Pkcs11Kms]:
    kms = await _connect(hsm)
    yield kms
    await kms.close()


def _new_kek(hsm: Hsm, label: str) -> None:
    """A tenant KEK, made with python-pkcs11 on a session that uses an existing login."""
    with hsm.token().open(rw=True) as session:
        session.generate_key(
            KeyType.AES,
            256,
            label=label,
            store=True,
            capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
            template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
        )


def _destroy(hsm: Hsm, label: str) -> None:
    with hsm.token().open(rw=True) as session:
        objects = list(session.get_objects({Attribute.LABEL: label}))
        assert objects, "nothing to destroy: the test would prove nothing"
        for obj in objects:
            obj.destroy()


# -- RFC 7512 URIs (pure) ---------------------------------------------------------------


def test_uri_parse_reads_path_and_query() -> None:
    uri = parse_uri(
        "pkcs11:token=My%20Token;object=k%3B1;type=secret-key;id=%01%FF;x-vendor=v"
        "?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/pin"
    )
    assert uri.token == "My Token"
    assert uri.object == "k;1"
    assert uri.type == "secret-key"
    assert uri.id == b"\x01\xff"
    assert uri.get("x-vendor") == "v"
    assert uri.extra_path_attributes(("token", "object", "type", "id")) == ("x-vendor",)
    assert uri.query_value("module-path") == "/usr/lib/softhsm/libsofthsm2.so"
    assert uri.query_value("pin-source") == "file:/run/pin"


def test_uri_format_percent_encodes_what_rfc7512_reserves() -> None:
    text = format_uri(
        (("token", "a b"), ("object", "x;y?z/é%"), ("id", b"AB")), (("module-path", "/a b&c"),)
    )
    assert text == (
        "pkcs11:token=a%20b;object=x%3By%3Fz%2F%C3%A9%25;id=%41%42?module-path=/a%20b%26c"
    )
    assert parse_uri(text).object == "x;y?z/é%"


def test_canonical_key_uri_is_exactly_three_attributes() -> None:
    assert canonical_key_uri("envpipe-dev", "envpipe-dev", "secret-key") == KEK_URI
    assert (
        canonical_key_uri("t 1", "ké;y", "private-key")
        == "pkcs11:token=t%201;object=k%C3%A9%3By;type=private-key"
    )
    with pytest.raises(Pkcs11UriError):
        canonical_key_uri("t", "k", "public")
    with pytest.raises(Pkcs11UriError):
        canonical_key_uri("", "k", "secret-key")


@given(
    st.text(min_size=1, max_size=40),
    st.text(min_size=1, max_size=40),
    st.binary(max_size=8),
)
def test_uri_round_trip(token: str, label: str, key_id: bytes) -> None:
    text = format_uri((("token", token), ("object", label), ("id", key_id)))
    uri = parse_uri(text)
    assert (uri.token, uri.object, uri.id) == (token, label, key_id)
    assert format_uri(uri.path) == text  # producing is canonical: parse, format, same text


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("vault:transit:k", "must start with 'pkcs11:'"),
        ("pkcs11:object=a%4", "bad percent-encoding"),
        ("pkcs11:object=a%zz", "bad percent-encoding"),
        ("pkcs11:object=a;object=b", "appears twice"),
        ("pkcs11:object", "has no '='"),
        ("pkcs11:type=secret", "type='secret' is not one of"),
        ("pkcs11:ob ject=a", "name 'ob ject' is not valid"),
        ("pkcs11:object=%FF", "not UTF-8"),
    ],
)
def test_uri_errors_say_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(Pkcs11UriError, match=problem):
        parse_uri(text)


# -- key ids, PIN and error mapping (pure) ---------------------------------------------


def test_key_ref_fills_token_and_type_and_refuses_what_it_cannot_honour() -> None:
    ref = key_ref("pkcs11:object=envpipe-dev", WRAPPING, TOKEN, Operation.RESOLVE)
    assert ref.canonical == KEK_URI
    # RFC 7512's `private` and the contract's `private-key` name the same signing key
    for spelling in ("private", "private-key"):
        name = f"pkcs11:object=envpipe-dev-signing;type={spelling}"
        assert key_ref(name, SIGNING, TOKEN, Operation.SIGN).canonical == SIGNING_URI
    refusals = {
        "pkcs11:token=other;object=k": "token_mismatch",
        "pkcs11:object=k;type=private-key": "invalid_key_id",
        "pkcs11:type=secret-key": "invalid_key_id",
        "pkcs11:object=k;serial=1234": "invalid_key_id",
        "alias/envpipe-dev": "invalid_key_id",
    }
    for name, code in refusals.items():
        with pytest.raises(KmsRequestError) as caught:
            key_ref(name, WRAPPING, TOKEN, Operation.RESOLVE)
        assert caught.value.code == code, name
    with pytest.raises(KmsRequestError) as caught:
        key_ref("pkcs11:object=k?pin-value=s3cret-771", WRAPPING, TOKEN, Operation.RESOLVE)
    assert "s3cret-771" not in str(caught.value)


def test_token_comes_from_the_key_ids_when_not_configured() -> None:
    assert token_from_key_ids(KEK_URI, "pkcs11:object=s") == TOKEN
    with pytest.raises(ConfigError, match="ENVPIPE_PKCS11_TOKEN"):
        token_from_key_ids("pkcs11:object=a", "")
    with pytest.raises(ConfigError, match="different tokens"):
        token_from_key_ids("pkcs11:token=a;object=k", "pkcs11:token=b;object=s")


def test_read_pin_names_its_source(tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("1234\n", encoding="utf-8")
    assert read_pin("", str(pin_file)) == ("1234", "ENVPIPE_PKCS11_PIN_FILE")
    assert read_pin("99", "") == ("99", "ENVPIPE_PKCS11_PIN")
    with pytest.raises(ConfigError, match="not both"):
        read_pin("99", str(pin_file))
    with pytest.raises(ConfigError, match="ENVPIPE_PKCS11_PIN_FILE"):
        read_pin("", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no PIN"):
        read_pin("", "")


@pytest.mark.parametrize(
    ("exc", "expected", "code"),
    [
        (p11.DeviceRemoved(), KmsUnavailableError, "DeviceRemoved"),
        (p11.SessionClosed(), KmsUnavailableError, "SessionClosed"),
        (p11.DeviceError(), KmsUnavailableError, "DeviceError"),
        (p11.GeneralError(), KmsUnavailableError, "GeneralError"),
        (p11.NoSuchKey(), KeyUnavailableError, "NoSuchKey"),
        (p11.ObjectHandleInvalid(), KeyUnavailableError, "ObjectHandleInvalid"),
        (p11.MechanismInvalid(), KmsRequestError, "MechanismInvalid"),
        (p11.KeyTypeInconsistent(), KmsRequestError, "KeyTypeInconsistent"),
        (p11.PKCS11Error("Unmapped error code 0x68"), KmsRequestError, None),
        (p11.PKCS11Error("Unmapped error code 0x9999"), KmsUnavailableError, "CKR_0x9999"),
    ],
)
def test_translation(exc: p11.PKCS11Error, expected: type[Exception], code: str | None) -> None:
    error = translate(exc, Operation.UNWRAP, pin_setting="ENVPIPE_PKCS11_PIN")
    assert type(error) is expected
    assert isinstance(error, KmsRequestError | KmsUnavailableError)
    assert error.operation == "unwrap"
    assert error.code == (code or "CKR_KEY_FUNCTION_NOT_PERMITTED")
    assert error.retriable is (expected is KmsUnavailableError)


def test_pin_errors_are_config_errors_naming_the_setting() -> None:
    for exc in (p11.PinIncorrect(), p11.PinLocked()):
        error = translate(exc, Operation.RESOLVE, pin_setting="ENVPIPE_PKCS11_PIN_FILE")
        assert isinstance(error, ConfigError)
        assert error.setting == "ENVPIPE_PKCS11_PIN_FILE"


# -- against SoftHSM2 -------------------------------------------------------------------


async def test_dev_token_keys_have_the_documented_attributes(hsm: Hsm, kms: Pkcs11Kms) -> None:
    with hsm.token().open() as session:  # logged in through `kms`
        kek = session.get_key(ObjectClass.SECRET_KEY, KeyType.AES, softhsm.KMS_KEY_LABEL)
        assert kek[Attribute.VALUE_LEN] == 32
        assert kek[Attribute.TOKEN]
        assert kek[Attribute.SENSITIVE]
        assert not kek[Attribute.EXTRACTABLE]
        assert kek[Attribute.ENCRYPT]
        assert kek[Attribute.DECRYPT]
        private = session.get_key(ObjectClass.PRIVATE_KEY, KeyType.EC, softhsm.SIGNING_KEY_LABEL)
        assert private[Attribute.SIGN]
        assert private[Attribute.SENSITIVE]
        assert not private[Attribute.EXTRACTABLE]
        public = session.get_key(ObjectClass.PUBLIC_KEY, KeyType.EC, softhsm.SIGNING_KEY_LABEL)
        assert isinstance(public, PublicKey)
        assert public[Attribute.VERIFY]
        spki = load_der_public_key(encode_ec_public_key(public))
        assert isinstance(spki, ec.EllipticCurvePublicKey)
        assert spki.curve.name == "secp256r1"


async def test_pkcs11_kms_is_a_kms(kms: Pkcs11Kms, hsm: Hsm) -> None:
    assert isinstance(kms, Kms)
    assert kms.provider == "pkcs11"
    assert hsm.pin not in repr(kms)


async def test_resolve_returns_canonical_ids(kms: Pkcs11Kms) -> None:
    assert await kms.resolve_wrapping_key("pkcs11:object=envpipe-dev") == KEK_URI
    assert await kms.resolve_wrapping_key(KEK_URI) == KEK_URI
    assert await kms.resolve_signing_key("pkcs11:object=envpipe-dev-signing") == SIGNING_URI
    with pytest.raises(KeyUnavailableError) as caught:
        await kms.resolve_wrapping_key("pkcs11:object=no-such-label")
    assert caught.value.code == "NoSuchKey"
    with pytest.raises(KeyUnavailableError):  # a label of the wrong class is not a KEK
        await kms.resolve_wrapping_key("pkcs11:object=envpipe-dev-signing")


async def test_wrap_unwrap_round_trip_bound_to_context(kms: Pkcs11Kms) -> None:
    key = await kms.generate_data_key("pkcs11:object=envpipe-dev", CONTEXT)
    assert key.key_id == KEK_URI
    assert len(key.plaintext) == 32
    assert len(key.wrapped) == 12 + 32 + 16
    assert await kms.unwrap(key.key_id, key.wrapped, CONTEXT) == key.plaintext
    other = await kms.generate_data_key(KEK_URI, CONTEXT)
    assert other.plaintext != key.plaintext
    assert other.wrapped[:12] != key.wrapped[:12]

    wrong_context = EncryptionContext.of({"envpipe:stream": "orders", "tenant": "evil"})
    tampered = key.wrapped[:20] + bytes([key.wrapped[20] ^ 1]) + key.wrapped[21:]
    for wrapped, context in (
        (key.wrapped, wrong_context),
        (key.wrapped, EncryptionContext.of({})),
        (tampered, CONTEXT),
        (secrets.token_bytes(60), CONTEXT),
    ):
        with pytest.raises(KmsRequestError) as caught:
            await kms.unwrap(KEK_URI, wrapped, context)
        assert not isinstance(caught.value, KeyUnavailableError)
        assert caught.value.operation == "unwrap"
    with pytest.raises(KmsRequestError, match="malformed_wrapped_key"):
        await kms.unwrap(KEK_URI, key.wrapped[:-1], CONTEXT)
    # the token still works after refusals
    assert await kms.unwrap(KEK_URI, key.wrapped, CONTEXT) == key.plaintext


async def test_sign_verifies_locally_and_is_der(kms: Pkcs11Kms) -> None:
    message = b"signed header bytes S"
    digest = hashlib.sha256(message).digest()
    signature = await kms.sign(SIGNING_URI, message, digest)
    r, s = utils.decode_dss_signature(signature)
    assert utils.encode_dss_signature(r, s) == signature  # DER, not raw r||s
    public = load_der_public_key(await kms.get_public_key(SIGNING_URI))
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        public.verify(signature, message + b"!", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(KmsRequestError, match="bad_digest"):
        await kms.sign(SIGNING_URI, message, digest[:20])
    with pytest.raises(KmsRequestError, match="invalid_key_id"):
        await kms.sign(KEK_URI, message, digest)


async def test_interop_with_plain_python_pkcs11(hsm: Hsm) -> None:
    """Unwrap and verify with python-pkcs11 + cryptography alone, logged in by them."""
    with hsm.token().open(user_pin=hsm.pin) as raw:  # first login of the process
        kms = await _connect(hsm)  # CKR_USER_ALREADY_LOGGED_IN counts as success
        key = await kms.generate_data_key(KEK_URI, CONTEXT)
        digest = hashlib.sha256(b"S").digest()
        signature = await kms.sign(SIGNING_URI, b"S", digest)
        await kms.close()

        kek = raw.get_key(ObjectClass.SECRET_KEY, KeyType.AES, softhsm.KMS_KEY_LABEL)
        assert isinstance(kek, DecryptMixin)
        iv, sealed = key.wrapped[:12], key.wrapped[12:]
        params = GCMParams(iv, CONTEXT.encoded, 128)
        assert kek.decrypt(sealed, mechanism=Mechanism.AES_GCM, mechanism_param=params) == (
            key.plaintext
        )
        public = raw.get_key(ObjectClass.PUBLIC_KEY, KeyType.EC, softhsm.SIGNING_KEY_LABEL)
        assert isinstance(public, PublicKey)
        verifier = load_der_public_key(encode_ec_public_key(public))
        assert isinstance(verifier, ec.EllipticCurvePublicKey)
        verifier.verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


async def test_login_lost_is_repaired_not_mistaken_for_shredding(hsm: Hsm) -> None:
    raw = hsm.token().open(user_pin=hsm.pin)
    kms = await _connect(hsm)
    try:
        key = await kms.generate_data_key(KEK_URI, CONTEXT)
        raw.close()  # C_Logout: the whole process's sessions are public sessions now
        with hsm.token().open() as probe:
            assert not list(probe.get_objects({Attribute.LABEL: softhsm.KMS_KEY_LABEL}))
        assert await kms.unwrap(KEK_URI, key.wrapped, CONTEXT) == key.plaintext
    finally:
        await kms.close()


async def test_crypto_shredding_makes_the_key_unavailable(hsm: Hsm, kms: Pkcs11Kms) -> None:
    label = f"tenant-{secrets.token_hex(4)}"
    _new_kek(hsm, label)
    name = f"pkcs11:object={label}"
    canonical = await kms.resolve_wrapping_key(name)
    key = await kms.generate_data_key(name, CONTEXT)
    kept = await kms.generate_data_key(KEK_URI, CONTEXT)
    _destroy(hsm, label)
    with pytest.raises(KeyUnavailableError) as caught:
        await kms.unwrap(canonical, key.wrapped, CONTEXT)
    assert caught.value.code == "NoSuchKey"
    assert not caught.value.retriable
    with pytest.raises(KeyUnavailableError):
        await kms.generate_data_key(name, CONTEXT)
    with pytest.raises(KeyUnavailableError):
        await kms.resolve_wrapping_key(name)
    assert await kms.unwrap(KEK_URI, kept.wrapped, CONTEXT) == kept.plaintext  # others open


async def test_wrong_pin_is_a_config_error_without_the_pin(
    hsm: Hsm, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-pin-5309"
    with pytest.raises(ConfigError) as caught:
        await Pkcs11Kms.connect(module=hsm.module, token=PIN_TOKEN, pin=wrong)
    assert caught.value.setting == "ENVPIPE_PKCS11_PIN"
    assert wrong not in str(caught.value)

    pin_file = tmp_path / "pin"
    pin_file.write_text(wrong + "\n", encoding="utf-8")
    settings = Settings(
        kms_provider="pkcs11",
        pkcs11_module=hsm.module,
        pkcs11_pin_file=str(pin_file),
        kms_key_id=f"pkcs11:token={PIN_TOKEN};object=k",
    )
    with pytest.raises(ConfigError) as caught:
        await Pkcs11Kms.open(settings, {"SOFTHSM2_CONF": hsm.conf})
    assert caught.value.setting == "ENVPIPE_PKCS11_PIN_FILE"
    assert wrong not in str(caught.value)
    assert wrong not in caplog.text

    pin_file.write_text(PIN_TOKEN_PIN + "\n", encoding="utf-8")  # the right one does work
    kms = await Pkcs11Kms.open(settings, {"SOFTHSM2_CONF": hsm.conf})
    assert PIN_TOKEN_PIN not in repr(kms)
    await kms.close()
    assert PIN_TOKEN_PIN not in caplog.text


async def test_open_from_settings_and_configuration_errors(hsm: Hsm, tmp_path: Path) -> None:
    settings = Settings(
        kms_provider="pkcs11",
        pkcs11_module=hsm.module,
        pkcs11_pin_file=hsm.pin_file,
        kms_key_id="pkcs11:object=envpipe-dev",
        pkcs11_token=TOKEN,
    )
    kms = await Pkcs11Kms.open(settings, {"SOFTHSM2_CONF": hsm.conf})
    assert await kms.resolve_wrapping_key(settings.kms_key_id) == KEK_URI
    await kms.close()

    with pytest.raises(ConfigError, match=r"tokens found: .*'envpipe-dev'") as caught:
        await Pkcs11Kms.connect(module=hsm.module, token="no-such-token", pin=hsm.pin)
    assert caught.value.setting == "ENVPIPE_PKCS11_TOKEN"
    not_a_module = tmp_path / "libnot.so"
    not_a_module.write_text("not ELF", encoding="utf-8")
    for module in (str(tmp_path / "missing.so"), str(not_a_module), ""):
        with pytest.raises(ConfigError) as caught:
            await Pkcs11Kms.open(
                Settings(pkcs11_module=module, pkcs11_token=TOKEN, pkcs11_pin="x"), {}
            )
        assert caught.value.setting == "ENVPIPE_PKCS11_MODULE"
    with pytest.raises(ConfigError, match="SOFTHSM2_CONF"):
        await Pkcs11Kms.open(settings, {"SOFTHSM2_CONF": str(tmp_path / "other.conf")})


async def test_concurrent_unwraps_stay_off_the_event_loop(hsm: Hsm) -> None:
    kms = await _connect(hsm, max_sessions=4)
    try:
        keys = await asyncio.gather(*(kms.generate_data_key(KEK_URI, CONTEXT) for _ in range(200)))
        loop = asyncio.get_running_loop()
        ticks: list[float] = []
        running = True

        async def ticker() -> None:
            while running:
                ticks.append(loop.time())
                await asyncio.sleep(0.0005)

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0.002)
        started = loop.time()
        deks = await asyncio.gather(*(kms.unwrap(k.key_id, k.wrapped, CONTEXT) for k in keys))
        finished = loop.time()
        running = False
        await ticking
        assert deks == [key.plaintext for key in keys]
        assert len(set(deks)) == 200
        during = [t for t in ticks if started <= t <= finished]
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        # Blocking calls on the loop would run the 200 tasks in one stretch: one gap as long
        # as the whole batch. Off the loop, the ticker keeps ticking throughout.
        assert len(during) >= 3, (len(during), finished - started)
        assert max(gaps) < (finished - started) / 2, (max(gaps), finished - started)
        assert kms._sessions.session_count <= 4  # one session per pool thread, bounded
    finally:
        await kms.close()


async def test_close_is_idempotent_and_later_calls_are_refused(hsm: Hsm) -> None:
    kms = await _connect(hsm)
    key = await kms.generate_data_key(KEK_URI, CONTEXT)
    await kms.close()
    await kms.close()
    for call in (
        kms.unwrap(KEK_URI, key.wrapped, CONTEXT),
        kms.generate_data_key(KEK_URI, CONTEXT),
        kms.sign(SIGNING_URI, b"m", hashlib.sha256(b"m").digest()),
        kms.get_public_key(SIGNING_URI),
        kms.resolve_signing_key(SIGNING_URI),
    ):
        with pytest.raises(KmsRequestError) as caught:
            await call
        assert caught.value.code == "closed"
        assert "closed" in str(caught.value)
