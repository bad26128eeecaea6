"""Which object a configured or canonical `pkcs11:` key id names. Pure, no IO.

A configured name (ENVPIPE_KMS_KEY_ID, ENVPIPE_SIGNING_KEY_ID) may leave out `token=` (the
provider's token, ENVPIPE_PKCS11_TOKEN, is meant) and `type=` (implied by the role), and may
add `id=` (CKA_ID, searched too). Every other path attribute (serial, slot-id, vendor ones)
is refused: the token is chosen by label only, and silently ignoring a qualifier would find
the wrong key. Query attributes are accepted and ignored (the module and the PIN come from
settings), except `pin-value`: a PIN inside a key id would reach envelopes and logs.
"""

from __future__ import annotations

from dataclasses import dataclass

from pkcs11 import KeyType, ObjectClass

from pipeline.errors import ConfigError, KmsRequestError
from pipeline.kms.pkcs11_uri import Pkcs11UriError, canonical_key_uri, parse_uri

__all__ = ["SIGNING", "WRAPPING", "KeyRef", "Role", "key_ref", "token_from_key_ids"]

_SUPPORTED_PATH = ("token", "object", "type", "id")


@dataclass(frozen=True, slots=True)
class Role:
    """What a key id must name: its object class, key type and the `type=` values allowed."""

    name: str  # "wrapping key", "signing key"
    object_class: ObjectClass
    key_type: KeyType
    uri_types: frozenset[str]
    canonical_type: str

    def describe(self, ref: KeyRef) -> str:
        return f"{self.name} labelled {ref.label!r}"


WRAPPING = Role(
    "wrapping key (AES secret key)",
    ObjectClass.SECRET_KEY,
    KeyType.AES,
    frozenset({"secret-key"}),
    "secret-key",
)
SIGNING = Role(
    "signing key (EC private key)",
    ObjectClass.PRIVATE_KEY,
    KeyType.EC,
    # RFC 7512 says `private`; the envpipe contract says `private-key`. Readers also pass a
    # signing key id to get_public_key, so `public` names the same pair.
    frozenset({"private", "private-key", "public"}),
    "private-key",
)


@dataclass(frozen=True, slots=True)
class KeyRef:
    """A key on a token, by label (and optionally CKA_ID), with its canonical id."""

    token: str
    label: str
    id: bytes | None
    canonical: str


def key_ref(name: str, role: Role, default_token: str, operation: str) -> KeyRef:
    """The key `name` names in `role`; a bad name is KmsRequestError (`invalid_key_id`).

    Messages name the problem, never echo the whole name (it could carry a query value).
    """

    def refuse(problem: str) -> KmsRequestError:
        return KmsRequestError(operation, "invalid_key_id", f"{role.name}: {problem}")

    try:
        uri = parse_uri(name)
    except Pkcs11UriError as exc:
        raise refuse(str(exc)) from exc
    extra = uri.extra_path_attributes(_SUPPORTED_PATH)
    if extra:
        raise refuse(
            f"path attribute(s) {', '.join(extra)} not supported; "
            "name the token by label (token= or ENVPIPE_PKCS11_TOKEN)"
        )
    if uri.query_value("pin-value") is not None:
        raise refuse("pin-value does not belong in a key id; use ENVPIPE_PKCS11_PIN_FILE")
    if uri.type is not None and uri.type not in role.uri_types:
        raise refuse(f"type={uri.type} does not name a {role.name}")
    label = uri.object
    if not label:
        raise refuse("the URI names no object (object=<label>)")
    token = uri.token if uri.token is not None else default_token
    if token != default_token:
        raise KmsRequestError(
            operation,
            "token_mismatch",
            f"{role.name} {label!r} is on token {token!r}, but the provider is open on "
            f"{default_token!r} (ENVPIPE_PKCS11_TOKEN)",
        )
    return KeyRef(token, label, uri.id, canonical_key_uri(token, label, role.canonical_type))


def token_from_key_ids(*key_ids: str) -> str:
    """The token the configured key ids name (`token=`), when ENVPIPE_PKCS11_TOKEN is unset."""
    tokens = set()
    for key_id in key_ids:
        try:
            token = parse_uri(key_id).token if key_id else None
        except Pkcs11UriError:
            continue  # reported, with context, when the key is first used
        if token:
            tokens.add(token)
    if len(tokens) == 1:
        return tokens.pop()
    if tokens:
        raise ConfigError(
            "ENVPIPE_PKCS11_TOKEN",
            f"the key ids name different tokens ({', '.join(sorted(tokens))}); "
            "one provider uses one token",
        )
    raise ConfigError(
        "ENVPIPE_PKCS11_TOKEN",
        "not set, and ENVPIPE_KMS_KEY_ID names no token (token=<label>); set the token's label",
    )
