"""Whether a header may be trusted: allowlists, then the signature, checked locally.

A forged or foreign header must cost no unwrap, and as little service traffic as possible:
the key ids are checked against the allowlists first (no call at all), and the signature is
verified with a cached public key. A signing key whose public key cannot be had (a forged
Vault version number, a deleted key) is remembered for `negative_seconds`, in a bounded
table, so a stream of such headers cannot become a stream of lookups.

The writer uses the same check on what the service just signed (`verify_own`): Vault signs
input of any length, and an emulator may sign the wrong bytes, so only a local verification
catches a signature that readers would refuse.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.serialization import load_der_public_key

from pipeline.envelope import Header
from pipeline.errors import ConfigError, KeyUnavailableError, KmsRequestError, Reason
from pipeline.keyids import KeyAllowlist
from pipeline.types import Kms, Operation

__all__ = ["HeaderVerifier"]

_ECDSA_PREHASHED = ec.ECDSA(utils.Prehashed(hashes.SHA256()))
_MAX_REMEMBERED = 10_000


class HeaderVerifier:
    """Allowlists plus a cache of signing keys' public keys (positive and negative)."""

    def __init__(
        self,
        kms: Kms,
        *,
        allowed_kms_keys: KeyAllowlist,
        allowed_signing_keys: KeyAllowlist,
        negative_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kms = kms
        self.allowed_kms_keys = allowed_kms_keys
        self.allowed_signing_keys = allowed_signing_keys
        self._negative_seconds = negative_seconds
        self._clock = clock
        self._public_keys: dict[str, ec.EllipticCurvePublicKey] = {}
        self._unavailable: OrderedDict[str, float] = OrderedDict()

    async def check(self, header: Header, digest: bytes) -> Reason | None:
        """None if the header is allowed and its signature over S (given as SHA-256(S))
        verifies; else the reason. Costs no call for a header that is not allowlisted."""
        if (
            header.kms_key_id not in self.allowed_kms_keys
            or header.signing_key_id not in self.allowed_signing_keys
        ):
            return Reason.KEY_NOT_ALLOWED
        try:
            public_key = await self.public_key(header.signing_key_id)
        except KeyUnavailableError:
            return Reason.KEY_UNAVAILABLE
        return None if _verifies(public_key, header.signature, digest) else Reason.BAD_SIGNATURE

    async def verify_own(self, signing_key_id: str, signature: bytes, digest: bytes) -> None:
        """Refuse a signature the service just made that readers would refuse."""
        if not _verifies(await self.public_key(signing_key_id), signature, digest):
            raise KmsRequestError(
                Operation.SIGN,
                "SignatureDoesNotVerify",
                f"the signature {signing_key_id} returned does not verify with its public key; "
                "is the service signing the SHA-256 digest as given?",
            )

    async def public_key(self, signing_key_id: str) -> ec.EllipticCurvePublicKey:
        """The cached public key of a signing key (one lookup, then none).

        A lookup that failed with `KeyUnavailableError` is remembered for `negative_seconds`.
        """
        cached = self._public_keys.get(signing_key_id)
        if cached is not None:
            return cached
        now = self._clock()
        until = self._unavailable.get(signing_key_id)
        if until is not None:
            if now < until:
                raise KeyUnavailableError(Operation.PUBLIC_KEY, "Remembered", signing_key_id)
            del self._unavailable[signing_key_id]
        try:
            loaded = load_der_public_key(await self.kms.get_public_key(signing_key_id))
        except KeyUnavailableError:
            self._remember_unavailable(signing_key_id, now)
            raise
        if not isinstance(loaded, ec.EllipticCurvePublicKey) or loaded.curve.name != "secp256r1":
            raise ConfigError(
                "ENVPIPE_ALLOWED_SIGNING_KEYS", f"{signing_key_id} is not an ECDSA P-256 key"
            )
        if len(self._public_keys) >= _MAX_REMEMBERED:
            self._public_keys.pop(next(iter(self._public_keys)))
        self._public_keys[signing_key_id] = loaded
        return loaded

    def _remember_unavailable(self, signing_key_id: str, now: float) -> None:
        if self._negative_seconds <= 0:
            return
        self._unavailable[signing_key_id] = now + self._negative_seconds
        self._unavailable.move_to_end(signing_key_id)
        while len(self._unavailable) > _MAX_REMEMBERED:
            self._unavailable.popitem(last=False)


def _verifies(public_key: ec.EllipticCurvePublicKey, signature: bytes, digest: bytes) -> bool:
    try:
        public_key.verify(signature, digest, _ECDSA_PREHASHED)
    except (InvalidSignature, ValueError):
        return False
    return True
