"""Transit's messages, without IO: the bodies `VaultKms` sends and the checks on the answers.

Everything here is a pure function of its arguments, so the byte-level contract with transit
(base64 fields, `vault:vN:` prefixes, DER signatures, the key types envpipe accepts, the
public key of one version) reads in one place and is testable without a server. A malformed
answer is a KmsRequestError("bad_response"), never a silent wrong key or signature.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from pipeline.errors import KeyUnavailableError, KmsRequestError
from pipeline.kms.vault_ids import VaultKeyRef
from pipeline.types import EncryptionContext

__all__ = [
    "DEK_BYTES",
    "SIGNING_TYPE",
    "WRAPPING_TYPE",
    "decrypt_body",
    "encrypt_body",
    "key_data",
    "latest_version",
    "public_key_der",
    "sign_body",
    "signature_der",
    "signing_key_problem",
    "unwrapped_dek",
    "wrapped_ciphertext",
    "wrapping_key_problem",
]

WRAPPING_TYPE = "aes256-gcm96"
SIGNING_TYPE = "ecdsa-p256"
DEK_BYTES = 32
_CIPHERTEXT_PREFIX = "vault:v"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _field(operation: str, body: Mapping[str, Any], name: str) -> str:
    data = body.get("data")
    value = data.get(name) if isinstance(data, Mapping) else None
    if not isinstance(value, str):
        raise KmsRequestError(operation, "bad_response", f"Vault's answer has no data.{name}")
    return value


# -- wrapping ---------------------------------------------------------------------------------


def encrypt_body(dek: bytes, context: EncryptionContext) -> dict[str, object]:
    """POST encrypt/<name>: the DEK, with C as associated_data."""
    return {"plaintext": _b64(dek), "associated_data": _b64(context.encoded)}


def wrapped_ciphertext(operation: str, body: Mapping[str, Any]) -> bytes:
    """The `vault:vN:` ciphertext of an encrypt answer, as the DataKey's `wrapped` bytes."""
    ciphertext = _field(operation, body, "ciphertext")
    if not ciphertext.startswith(_CIPHERTEXT_PREFIX):
        raise KmsRequestError(operation, "bad_response", "encrypt returned no vault:vN: ciphertext")
    return ciphertext.encode("ascii")


def decrypt_body(operation: str, wrapped: bytes, context: EncryptionContext) -> dict[str, object]:
    """POST decrypt/<name>; a `wrapped` that is no `vault:vN:` ciphertext is refused here."""
    try:
        ciphertext = wrapped.decode("ascii")
    except UnicodeDecodeError:
        ciphertext = ""
    if not ciphertext.startswith(_CIPHERTEXT_PREFIX):
        raise KmsRequestError(operation, "malformed_ciphertext", "not a vault:vN: ciphertext")
    return {"ciphertext": ciphertext, "associated_data": _b64(context.encoded)}


def unwrapped_dek(operation: str, body: Mapping[str, Any]) -> bytes:
    """The DEK of a decrypt answer: base64 of exactly DEK_BYTES bytes."""
    try:
        dek = base64.b64decode(_field(operation, body, "plaintext"), validate=True)
    except binascii.Error:
        dek = b""
    if len(dek) != DEK_BYTES:
        raise KmsRequestError(
            operation, "bad_plaintext", f"the unwrapped key is not {DEK_BYTES} bytes"
        )
    return dek


# -- signing ----------------------------------------------------------------------------------


def sign_body(operation: str, digest: bytes, ref: VaultKeyRef) -> dict[str, object]:
    """POST sign/<name>/sha2-256 over a prehashed SHA-256, ASN.1, with the version of `ref`."""
    if len(digest) != 32:
        raise KmsRequestError(operation, "bad_digest", "the digest must be a 32-byte SHA-256")
    return {
        "input": _b64(digest),
        "prehashed": True,
        "marshaling_algorithm": "asn1",
        "key_version": ref.version,
    }


def signature_der(operation: str, body: Mapping[str, Any], ref: VaultKeyRef) -> bytes:
    """The DER signature of a sign answer, which must name the version that was asked for."""
    prefix, _, encoded = _field(operation, body, "signature").rpartition(":")
    if prefix != f"{_CIPHERTEXT_PREFIX}{ref.version}":
        raise KmsRequestError(
            operation,
            "version_mismatch",
            f"Vault did not sign with version {ref.version} of {ref.key_id}",
        )
    try:
        signature = base64.b64decode(encoded, validate=True)
        decode_dss_signature(signature)
    except (binascii.Error, ValueError) as exc:
        raise KmsRequestError(operation, "bad_response", "the signature is not DER") from exc
    return signature


# -- key metadata (GET keys/<name>) -----------------------------------------------------------


def key_data(operation: str, ref: VaultKeyRef, body: Mapping[str, Any]) -> Mapping[str, Any]:
    """The `data` of a keys/<name> answer: the key's type, versions and latest_version."""
    data = body.get("data")
    if not isinstance(data, Mapping):
        raise KmsRequestError(operation, "bad_response", f"no key data for {ref.key_id}")
    return data


def wrapping_key_problem(ref: VaultKeyRef, data: Mapping[str, Any]) -> str:
    """What makes the key unfit for wrapping DEKs, or "" if nothing does."""
    if data.get("type") != WRAPPING_TYPE:
        return (
            f"{ref.key_id} is a {data.get('type')} key; the wrapping key must be "
            f"{WRAPPING_TYPE} (an AEAD type, so associated_data binds the encryption context)"
        )
    if data.get("derived"):
        return f"{ref.key_id} uses key derivation (derived=true), which envpipe does not use"
    return ""


def signing_key_problem(ref: VaultKeyRef, data: Mapping[str, Any]) -> str:
    """What makes the key unfit for signing headers, or "" if nothing does."""
    if data.get("type") != SIGNING_TYPE:
        return (
            f"{ref.key_id} is a {data.get('type')} key; the signing key must be "
            f"{SIGNING_TYPE} (ECDSA P-256)"
        )
    return ""


def latest_version(operation: str, ref: VaultKeyRef, data: Mapping[str, Any]) -> int:
    """The key's latest_version, a positive int in any sane answer."""
    latest = data.get("latest_version")
    if not isinstance(latest, int) or latest < 1:
        raise KmsRequestError(operation, "bad_response", f"{ref.key_id} has no latest_version")
    return latest


def public_key_der(operation: str, ref: VaultKeyRef, data: Mapping[str, Any]) -> bytes:
    """The DER SubjectPublicKeyInfo of version `ref.version`; KeyUnavailable if it has none."""
    if data.get("type") != SIGNING_TYPE:
        raise KmsRequestError(
            operation,
            "wrong_key_type",
            f"{ref.key_id} is a {data.get('type')} key, not {SIGNING_TYPE}",
        )
    versions = data.get("keys") or {}
    entry = versions.get(str(ref.version))
    if not isinstance(entry, Mapping) or not entry.get("public_key"):
        raise KeyUnavailableError(
            operation,
            "unknown_version",
            f"{ref.key_id} has no version {ref.version} (latest: "
            f"{data.get('latest_version')}; versions below min_decryption_version are "
            "archived)",
        )
    try:
        public = serialization.load_pem_public_key(str(entry["public_key"]).encode())
    except ValueError as exc:
        raise KmsRequestError(operation, "bad_response", "the public key is not PEM") from exc
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        raise KmsRequestError(operation, "wrong_key_type", f"{ref.canonical} is not EC P-256")
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
