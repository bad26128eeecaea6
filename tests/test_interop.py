"""A record sealed by envpipe opens with a reader written from docs/format.md alone.

The reader below uses fastavro and the schema files, `cryptography`, and each service's own
API (botocore for AWS KMS, Vault's HTTP API through urllib, python-pkcs11): nothing of
envpipe's. It rebuilds S and the context bytes C by hand, verifies the signature locally,
unwraps the DEK through the service, and opens the ciphertext with an AAD it built itself;
for both wire formats and every provider. Another implementation can do the same.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import urllib.request
from pathlib import Path
from typing import Any

import botocore.session
import fastavro
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import KeyType, Mechanism, ObjectClass
from pkcs11.mechanisms import GCMParams
from pkcs11.util.ec import encode_ec_public_key

from pipeline.config import load_settings
from pipeline.encryptor import Encryptor
from tests import kit
from tests.providers import Hsm
from workers.dev import DevEnv

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
VALUE, KEY = b'{"order": 7, "total_cents": 1299}', b"customer-7"


def _schemas() -> tuple[Any, Any, Any]:
    """(v1 envelope, the Header inside it, v2 record), parsed from the files."""
    named: dict[str, Any] = {}
    envelope = fastavro.parse_schema(
        json.loads((SCHEMAS / "envelope.avsc").read_text()), named_schemas=named
    )
    record = fastavro.parse_schema(json.loads((SCHEMAS / "envelope_v2.avsc").read_text()))
    return envelope, named["envpipe.v1.Header"], record


def _avro(schema: Any, datum: Any) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, schema, datum)
    return out.getvalue()


def _parse(schema: Any, data: bytes) -> Any:
    stream = io.BytesIO(data)
    datum = fastavro.schemaless_reader(stream, schema, None)
    assert stream.tell() == len(data)  # nothing after the record
    return datum


def _open_by_the_book(
    value: bytes, key: bytes | None, keys_topic: dict[bytes, bytes], service: Any
) -> bytes:
    """docs/format.md, step by step."""
    envelope_schema, header_schema, record_schema = _schemas()
    if value[0] == 0x04:  # v2: the header comes from the keys topic, under the record's dek_id
        record = _parse(record_schema, value)
        header = _parse(header_schema, keys_topic[record["dek_id"]])
        assert header["version"] == 2
        assert header["dek_id"] == record["dek_id"]
        nonce, ciphertext, label = record["nonce"], record["ciphertext"], b"envpipe.v2"
    else:
        envelope = _parse(envelope_schema, value)
        header, nonce, ciphertext = envelope["header"], envelope["nonce"], envelope["ciphertext"]
        assert header["version"] == 1
        label = b"envpipe.v1"
    context = dict(sorted(header["encryption_context"].items(), key=lambda kv: kv[0].encode()))
    signed = _avro(header_schema, {**header, "encryption_context": context, "signature": b""})
    digest = hashlib.sha256(signed).digest()
    public_key = serialization.load_der_public_key(service.public_key(header["signing_key_id"]))
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(header["signature"], digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    c = _avro({"type": "map", "values": "string"}, context)
    dek = service.unwrap(header["kms_key_id"], header["wrapped_dek"], context, c)
    k = b"\x00" if key is None else b"\x01" + key
    return AESGCM(dek).decrypt(nonce, ciphertext, label + digest + k)


class _KeysTopic(dict[bytes, bytes]):
    """What a v2 writer publishes, as the keys topic would hold it (key dek_id, value header)."""

    async def publish(self, dek_id: bytes, header: bytes) -> None:
        self[dek_id] = header


class _Aws:
    """AWS KMS through a plain botocore client."""

    def __init__(self, env: DevEnv) -> None:
        self._kms = botocore.session.get_session().create_client(
            "kms",
            endpoint_url=env.kms_endpoint,
            region_name=env.region,
            aws_access_key_id=env.access_key_id,
            aws_secret_access_key=env.secret_access_key,
        )

    def public_key(self, key_id: str) -> bytes:
        return bytes(self._kms.get_public_key(KeyId=key_id)["PublicKey"])

    def unwrap(self, key_id: str, wrapped: bytes, context: dict[str, str], _c: bytes) -> bytes:
        answer = self._kms.decrypt(CiphertextBlob=wrapped, KeyId=key_id, EncryptionContext=context)
        return bytes(answer["Plaintext"])


class _Vault:
    """Vault's HTTP API through urllib."""

    def __init__(self, env: DevEnv) -> None:
        self._address, self._token = env.variables["VAULT_ADDR"], env.variables["VAULT_TOKEN"]

    def _call(self, path: str, payload: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(  # noqa: S310 - the test's own loopback URL
            f"{self._address}/v1/{path}",
            data=json.dumps(payload).encode() if payload is not None else None,
            headers={"X-Vault-Token": self._token},
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return json.loads(response.read())["data"]

    def public_key(self, key_id: str) -> bytes:
        _, mount, name, version = key_id.split(":")
        pem = self._call(f"{mount}/keys/{name}")["keys"][version]["public_key"]
        loaded = serialization.load_pem_public_key(pem.encode())
        return loaded.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def unwrap(self, key_id: str, wrapped: bytes, _context: dict[str, str], c: bytes) -> bytes:
        _, mount, name = key_id.split(":")
        answer = self._call(
            f"{mount}/decrypt/{name}",
            {
                "ciphertext": wrapped.decode("ascii"),
                "associated_data": base64.b64encode(c).decode(),
            },
        )
        return base64.b64decode(answer["plaintext"])


class _Hsm:
    """The token through python-pkcs11, in a session of its own."""

    def __init__(self, hsm: Hsm) -> None:
        self._session = hsm.token().open()  # shares the login envpipe's client made

    @staticmethod
    def _label(uri: str) -> str:
        attributes = dict(part.split("=", 1) for part in uri.removeprefix("pkcs11:").split(";"))
        return attributes["object"]

    def public_key(self, key_id: str) -> bytes:
        public = self._session.get_key(ObjectClass.PUBLIC_KEY, KeyType.EC, self._label(key_id))
        return bytes(encode_ec_public_key(public))

    def unwrap(self, key_id: str, wrapped: bytes, _context: dict[str, str], c: bytes) -> bytes:
        kek = self._session.get_key(ObjectClass.SECRET_KEY, KeyType.AES, self._label(key_id))
        params = GCMParams(wrapped[:12], c, 128)
        return bytes(kek.decrypt(wrapped[12:], mechanism=Mechanism.AES_GCM, mechanism_param=params))

    def close(self) -> None:
        self._session.close()


@pytest.mark.parametrize("format_name", ["v1", "v2"])
async def test_a_reader_from_the_format_doc_opens_envpipe_records(
    provider_env: DevEnv, format_name: str, request: pytest.FixtureRequest
) -> None:
    env = provider_env
    keys_topic = _KeysTopic()
    async with kit.service(env) as kms:
        settings = load_settings({"format": format_name}, environ=env.as_environ())
        encryptor = await Encryptor.from_settings(
            kms, settings, stream="orders", header_sink=keys_topic
        )
        sealed = [await encryptor.seal(VALUE, KEY), await encryptor.seal(VALUE, None)]
        await encryptor.close()
        service: Any = (
            _Aws(env)
            if env.provider == "aws"
            else _Vault(env)
            if env.provider == "vault"
            else _Hsm(request.getfixturevalue("hsm"))
        )
        try:
            assert sealed[0][0] == (0x04 if format_name == "v2" else 0x02)
            assert _open_by_the_book(sealed[0], KEY, keys_topic, service) == VALUE
            assert _open_by_the_book(sealed[1], None, keys_topic, service) == VALUE
        finally:
            if isinstance(service, _Hsm):
                service.close()
    assert len(keys_topic) == (1 if format_name == "v2" else 0)
