"""Seal and open through moto's KMS over HTTP (aiobotocore), checked against the contract.

The contract's definitions (signed bytes S, AAD, the wrapped DEK's encryption context) are
recomputed here from the schema file, hashlib and `cryptography` alone, and every tampered
field must give its own reason code. A forged header must cost zero KMS calls.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import botocore.session
import fastavro
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipeline.config import load_settings
from pipeline.decryptor import Decryptor
from pipeline.encryptor import Encryptor
from pipeline.envelope import SCHEMA_PATH
from pipeline.errors import DecryptionError, Reason
from pipeline.kms.aws import AwsKms
from pipeline.kms.counting import CountingKms
from workers.dev import DevEnv

NAMED: dict[str, Any] = {}
with open(SCHEMA_PATH, encoding="utf-8") as _handle:
    ENVELOPE = fastavro.parse_schema(json.load(_handle), named_schemas=NAMED)
HEADER_SCHEMA = NAMED["envpipe.v1.Header"]


def avro_encode(schema: Any, record: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, schema, record)
    return out.getvalue()


def avro_decode(value: bytes) -> dict[str, Any]:
    decoded: dict[str, Any] = fastavro.schemaless_reader(io.BytesIO(value), ENVELOPE, None)
    return decoded


@pytest.fixture
async def kms(dev_env: DevEnv, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[CountingKms]:
    """An AwsKms on moto; credentials reach it only through the AWS_* environment."""
    for name, value in dev_env.as_environ().items():
        monkeypatch.setenv(name, value)
    aws = await AwsKms.open(endpoint_url=dev_env.kms_endpoint, region=dev_env.region)
    yield CountingKms(aws)
    await aws.close()


@pytest.fixture
async def pair(dev_env: DevEnv, kms: CountingKms) -> tuple[Encryptor, Decryptor]:
    settings = load_settings(environ=dev_env.as_environ())
    encryptor = await Encryptor.from_settings(kms, settings, stream="orders")
    decryptor = await Decryptor.from_settings(kms, settings)
    return encryptor, decryptor


def botocore_kms(dev_env: DevEnv) -> Any:
    """A plain synchronous botocore client: an outside tool, independent of envpipe."""
    return botocore.session.get_session().create_client(
        "kms",
        endpoint_url=dev_env.kms_endpoint,
        region_name=dev_env.region,
        aws_access_key_id=dev_env.access_key_id,
        aws_secret_access_key=dev_env.secret_access_key,
    )


@pytest.mark.parametrize(
    ("value", "key", "stream"),
    [
        (b"hello", None, "orders"),
        (b"", b"k", "orders"),
        (b"", None, "orders"),
        (bytes(range(256)) * 4096, b"big", "orders"),  # 1 MiB
        (b"\xff\x00 binary", b"\x00key", "заказы-注文-🚚"),
    ],
    ids=["null-key", "empty-value", "empty-both", "1MiB", "non-ascii-context"],
)
async def test_round_trip(
    pair: tuple[Encryptor, Decryptor], value: bytes, key: bytes | None, stream: str
) -> None:
    encryptor, decryptor = pair
    sealed = await encryptor.seal(value, key, stream=stream)
    assert value not in sealed or not value
    assert await decryptor.open(sealed, key) == value
    header = avro_decode(sealed)["header"]
    assert header["encryption_context"] == {"envpipe:stream": stream}


async def test_wire_format_matches_the_contract(
    dev_env: DevEnv, pair: tuple[Encryptor, Decryptor]
) -> None:
    encryptor, _ = pair
    value, key = b'{"order": 1}', b"customer-7"
    sealed = await encryptor.seal(value, key)
    envelope = avro_decode(sealed)
    header = envelope["header"]
    assert header["version"] == 1
    assert header["alg"] == "AES_256_GCM"
    assert header["kms_key_id"] == dev_env.kms_key_canonical  # the ARN, never the alias
    assert header["signing_key_id"] == dev_env.signing_key_canonical
    assert len(header["dek_id"]) == 16
    assert len(envelope["nonce"]) == 12

    # S: the header with an empty signature, context keys sorted, one map block
    signed = avro_encode(HEADER_SCHEMA, {**header, "signature": b""})
    client = botocore_kms(dev_env)
    verdict = client.verify(
        KeyId=dev_env.signing_key_canonical,
        Message=signed,
        MessageType="RAW",
        Signature=header["signature"],
        SigningAlgorithm="ECDSA_SHA_256",
    )
    assert verdict["SignatureValid"]

    # the DEK, unwrapped by an outside client with the header's encryption context
    dek = client.decrypt(
        CiphertextBlob=header["wrapped_dek"],
        KeyId=header["kms_key_id"],
        EncryptionContext=header["encryption_context"],
    )["Plaintext"]
    aad = b"envpipe.v1" + hashlib.sha256(signed).digest() + b"\x01" + key
    assert AESGCM(dek).decrypt(envelope["nonce"], envelope["ciphertext"], aad) == value
    assert len(envelope["ciphertext"]) == len(value) + 16


def retamper(sealed: bytes, **changes: Any) -> bytes:
    """Re-encode an envelope with some header fields (or nonce/ciphertext) changed."""
    envelope = avro_decode(sealed)
    for name, new in changes.items():
        if name in envelope:
            envelope[name] = new
        else:
            envelope["header"][name] = new
    return avro_encode(ENVELOPE, envelope)


def flip(data: bytes, index: int = -1) -> bytes:
    changed = bytearray(data)
    changed[index] ^= 0x01
    return bytes(changed)


async def test_tampering_gives_the_right_reason(
    dev_env: DevEnv, pair: tuple[Encryptor, Decryptor], kms: CountingKms
) -> None:
    encryptor, decryptor = pair
    sealed = await encryptor.seal(b"payload", b"key")
    assert await decryptor.open(sealed, b"key") == b"payload"
    header = avro_decode(sealed)["header"]
    other_arn = botocore_kms(dev_env).create_key()["KeyMetadata"]["Arn"]
    cases = {
        "version": (retamper(sealed, version=3), b"key", Reason.UNKNOWN_VERSION),
        # version 2 is v2's first byte, but a v2 record is not a v1 header and body
        "version 2": (retamper(sealed, version=2), b"key", Reason.MALFORMED),
        "kms_key_id": (retamper(sealed, kms_key_id=other_arn), b"key", Reason.KEY_NOT_ALLOWED),
        "signing_key_id": (
            retamper(sealed, signing_key_id=other_arn),
            b"key",
            Reason.KEY_NOT_ALLOWED,
        ),
        "wrapped_dek": (
            retamper(sealed, wrapped_dek=flip(header["wrapped_dek"])),
            b"key",
            Reason.BAD_SIGNATURE,
        ),
        "dek_id": (retamper(sealed, dek_id=flip(header["dek_id"])), b"key", Reason.BAD_SIGNATURE),
        "encryption_context": (
            retamper(sealed, encryption_context={"envpipe:stream": "payments"}),
            b"key",
            Reason.BAD_SIGNATURE,
        ),
        "signature": (
            retamper(sealed, signature=flip(header["signature"], 20)),
            b"key",
            Reason.BAD_SIGNATURE,
        ),
        "nonce": (
            retamper(sealed, nonce=flip(avro_decode(sealed)["nonce"])),
            b"key",
            Reason.BAD_TAG,
        ),
        "ciphertext": (flip(sealed), b"key", Reason.BAD_TAG),
        "record key": (sealed, b"other-key", Reason.BAD_TAG),
        "null record key": (sealed, None, Reason.BAD_TAG),
        "truncated": (sealed[:-1], b"key", Reason.MALFORMED),
        "plaintext": (b'{"order": 1}', b"key", Reason.MALFORMED),
    }
    before = kms.calls.copy()
    for name, (value, key, reason) in cases.items():
        with pytest.raises(DecryptionError) as caught:
            await decryptor.open(value, key)
        assert caught.value.reason is reason, name
    assert kms.calls == before, "tampered input must cost no KMS call"


async def test_unwrap_failure_under_a_valid_signature(
    dev_env: DevEnv, pair: tuple[Encryptor, Decryptor], kms: CountingKms
) -> None:
    encryptor, decryptor = pair
    sealed = await encryptor.seal(b"payload")
    header = avro_decode(sealed)["header"]
    # a header whose wrapped DEK is garbage, but properly signed by the allowlisted key
    forged = {**header, "wrapped_dek": b"\x01" * 150, "signature": b""}
    signed = avro_encode(HEADER_SCHEMA, forged)
    forged["signature"] = await kms.sign(
        dev_env.signing_key_canonical, signed, hashlib.sha256(signed).digest()
    )
    bad = retamper(sealed, **forged)
    decrypts = kms.calls["unwrap"]
    for _ in range(50):
        with pytest.raises(DecryptionError) as caught:
            await decryptor.open(bad)
        assert caught.value.reason is Reason.UNWRAP_FAILED
    assert kms.calls["unwrap"] - decrypts == 1, "the negative cache must absorb repeats"


async def test_foreign_signing_key_costs_zero_kms_calls(
    dev_env: DevEnv, pair: tuple[Encryptor, Decryptor], kms: CountingKms
) -> None:
    _, decryptor = pair
    client = botocore_kms(dev_env)
    foreign = client.create_key(KeyUsage="SIGN_VERIFY", KeySpec="ECC_NIST_P256")["KeyMetadata"]
    # the attacker's own encryptor: same wrapping key, signed with a key we do not allow
    attacker = Encryptor(
        kms, kms_key_id=dev_env.kms_key_id, signing_key_id=foreign["Arn"], stream="orders"
    )
    foreign_sealed = await attacker.seal(b"forged", b"k")
    # and a header that claims our signing key but carries the foreign key's signature
    header = avro_decode(foreign_sealed)["header"]
    claimed = {**header, "signing_key_id": dev_env.signing_key_canonical, "signature": b""}
    claimed["signature"] = client.sign(
        KeyId=foreign["Arn"],
        Message=avro_encode(HEADER_SCHEMA, claimed),
        MessageType="RAW",
        SigningAlgorithm="ECDSA_SHA_256",
    )["Signature"]
    impostor = retamper(foreign_sealed, **claimed)

    before = kms.calls.copy()
    for value, reason in (
        (foreign_sealed, Reason.KEY_NOT_ALLOWED),
        (impostor, Reason.BAD_SIGNATURE),
    ):
        for _ in range(100):
            with pytest.raises(DecryptionError) as caught:
                await decryptor.open(value, b"k")
            assert caught.value.reason is reason
    assert kms.calls == before


async def test_kms_calls_per_dek(pair: tuple[Encryptor, Decryptor], kms: CountingKms) -> None:
    encryptor, decryptor = pair
    before = kms.calls.copy()
    records = [(b"v%d" % i, b"k%d" % (i % 7)) for i in range(5000)]
    sealed = await encryptor.seal_many(records)
    opened = await decryptor.open_many([(v, k) for v, (_, k) in zip(sealed, records, strict=True)])
    assert opened == [v for v, _ in records]
    used = kms.calls - before
    # one DEK: generate-and-wrap, resolve the signing alias (again, for each new DEK), sign
    assert used == {"generate_data_key": 1, "resolve": 1, "sign": 1, "unwrap": 1}
