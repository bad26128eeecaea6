"""AWS KMS through aiobotocore: one long-lived client, errors translated at the boundary.

Canonical ids are key ARNs. Signing sends the raw message S while it fits KMS's 4096-byte
limit for MessageType=RAW (every emulator supports that), and the SHA-256 digest with
MessageType=DIGEST above it, so a large encryption context still signs. A disabled key, a
key pending deletion and a missing key are `KeyUnavailableError`; access denied names the
KMS permission (kms:Decrypt, ...) the role lacks.

The client (and its connection pool) lives for the whole process, because opening one costs
credential resolution and a TLS handshake: far too much for the record path. Credentials come
only from the standard AWS chain, so they never travel through envpipe's own configuration.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Self, TypeVar

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore import exceptions as boto

from pipeline.errors import (
    ConfigError,
    KeyUnavailableError,
    KmsAccessDeniedError,
    KmsError,
    KmsRequestError,
    KmsUnavailableError,
)
from pipeline.types import ClosedOnExit, DataKey, EncryptionContext, Operation

if TYPE_CHECKING:
    from types_aiobotocore_kms.client import KMSClient

__all__ = ["AwsKms"]

_T = TypeVar("_T")

_MAX_MESSAGE = 200

# Error codes worth retrying: AWS's own throttling and server-side failures. Any 5xx and 429
# count as well, whatever their code; every other error is the caller's problem.
_RETRIABLE_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "LimitExceededException",
        "KMSInternalException",
        "KeyUnavailableException",
        "DependencyTimeoutException",
        "ServiceUnavailableException",
        "ServiceUnavailable",
        "InternalFailure",
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)

# The key is gone or switched off: records under it are `key_unavailable`, never an outage.
_KEY_UNAVAILABLE_CODES = frozenset(
    {"DisabledException", "KMSInvalidStateException", "NotFoundException"}
)
_ACCESS_DENIED_CODES = frozenset({"AccessDeniedException", "AccessDenied"})
# The IAM permission each operation needs, for the access-denied message.
_PERMISSIONS = {
    Operation.GENERATE_DATA_KEY: "kms:GenerateDataKey",
    Operation.UNWRAP: "kms:Decrypt",
    Operation.SIGN: "kms:Sign",
    Operation.PUBLIC_KEY: "kms:GetPublicKey",
    Operation.RESOLVE: "kms:DescribeKey",
}
_MAX_RAW_MESSAGE = 4096  # KMS's limit for Sign(MessageType=RAW)
_KEY_ARN = "arn:aws"

_NO_CREDENTIALS = (
    "no usable AWS credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
    "or AWS_PROFILE, or run with an instance/task role"
)


class AwsKms(ClosedOnExit):
    """`pipeline.types.Kms` on AWS KMS (or any endpoint speaking its API, such as moto).

    Create it with `await AwsKms.open(...)` once per process and `await close()` at shutdown.
    """

    provider = "aws"

    def __init__(self, client: KMSClient, stack: AsyncExitStack) -> None:
        """Wrap an entered client; `stack` exits it. Prefer `AwsKms.open`."""
        self._client: KMSClient | None = client
        self._stack = stack

    @classmethod
    async def open(
        cls,
        *,
        endpoint_url: str | None,
        region: str | None,
        max_pool_connections: int = 10,
        verify: bool | str = True,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
        max_attempts: int = 3,
        credentials: Mapping[str, str] | None = None,
    ) -> Self:
        """Create the process's KMS client.

        `endpoint_url` None means real AWS; `region` None falls back to AWS_REGION /
        AWS_DEFAULT_REGION. `verify` is True, False or a CA bundle path. `max_attempts` counts
        the first try: 1 disables botocore's own retries (standard mode, jittered backoff).
        `credentials`, if given, is an environment to take `AWS_ACCESS_KEY_ID`,
        `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN` and the region from instead of this
        process's (a tool configuring a client for another environment); otherwise the
        standard AWS chain applies.
        """
        config = AioConfig(
            max_pool_connections=max_pool_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            user_agent_appid="envpipe",
        )
        stack = AsyncExitStack()
        try:
            client = await stack.enter_async_context(
                get_session().create_client(
                    "kms",
                    region_name=region or _region(credentials),
                    endpoint_url=endpoint_url or None,
                    verify=verify,
                    config=config,
                    **_explicit_credentials(credentials),  # type: ignore[call-overload]
                )
            )
        except boto.NoRegionError as exc:
            raise ConfigError(
                "AWS_REGION", "no AWS region configured; set AWS_REGION or AWS_DEFAULT_REGION"
            ) from exc
        except boto.InvalidRegionError as exc:
            raise ConfigError("AWS_REGION", _truncate(str(exc))) from exc
        except boto.ProfileNotFound as exc:
            raise ConfigError("AWS_PROFILE", "the named AWS profile does not exist") from exc
        except ValueError as exc:  # botocore's "Invalid endpoint: ..."
            raise ConfigError("ENVPIPE_KMS_ENDPOINT", _truncate(str(exc))) from exc
        return cls(client, stack)

    async def close(self) -> None:
        """Close the client and its connection pool. Idempotent."""
        self._client = None
        await self._stack.aclose()

    async def generate_data_key(self, key_id: str, context: EncryptionContext) -> DataKey:
        """GenerateDataKey(AES_256); `key_id` of the result is the ARN, even for an alias."""
        response = await self._call(
            Operation.GENERATE_DATA_KEY,
            lambda kms: kms.generate_data_key(
                KeyId=key_id, KeySpec="AES_256", EncryptionContext=dict(context.pairs)
            ),
        )
        return DataKey(
            key_id=response["KeyId"],
            plaintext=response["Plaintext"],
            wrapped=response["CiphertextBlob"],
        )

    async def unwrap(self, key_id: str, wrapped: bytes, context: EncryptionContext) -> bytes:
        """Decrypt, pinning KeyId so a blob naming another key is refused by KMS itself."""
        response = await self._call(
            Operation.UNWRAP,
            lambda kms: kms.decrypt(
                CiphertextBlob=wrapped, KeyId=key_id, EncryptionContext=dict(context.pairs)
            ),
        )
        return response["Plaintext"]

    async def sign(self, key_id: str, message: bytes, digest: bytes) -> bytes:
        """Sign(ECDSA_SHA_256): RAW over the message up to 4096 bytes, else DIGEST."""
        raw = len(message) <= _MAX_RAW_MESSAGE
        response = await self._call(
            Operation.SIGN,
            lambda kms: kms.sign(
                KeyId=key_id,
                Message=message if raw else digest,
                MessageType="RAW" if raw else "DIGEST",
                SigningAlgorithm="ECDSA_SHA_256",
            ),
        )
        return response["Signature"]

    async def get_public_key(self, key_id: str) -> bytes:
        """GetPublicKey: DER SubjectPublicKeyInfo, for verifying signatures locally."""
        response = await self._call(
            Operation.PUBLIC_KEY, lambda kms: kms.get_public_key(KeyId=key_id)
        )
        return response["PublicKey"]

    async def resolve_wrapping_key(self, name: str) -> str:
        """DescribeKey → ARN (a key ARN is returned as it is, without a call)."""
        return await self._describe(name)

    async def resolve_signing_key(self, name: str) -> str:
        """DescribeKey → ARN, every time: an alias may have been re-pointed."""
        return await self._describe(name)

    async def _describe(self, name: str) -> str:
        if name.startswith(_KEY_ARN) and ":key/" in name:
            return name
        response = await self._call(Operation.RESOLVE, lambda kms: kms.describe_key(KeyId=name))
        return response["KeyMetadata"]["Arn"]

    async def _call(
        self, operation: Operation, request: Callable[[KMSClient], Awaitable[_T]]
    ) -> _T:
        """Run one request, turning every botocore/aiohttp/socket error into a `KmsError`."""
        client = self._client
        if client is None:
            raise KmsRequestError(operation, "ClientClosed", "AwsKms.close() was called")
        try:
            return await request(client)
        except (boto.ClientError, boto.BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise _translate(operation, exc) from exc


# Client-side failures, first match wins (timeouts and TLS errors are also connection errors).
_CLIENT_SIDE: tuple[tuple[tuple[type[Exception], ...], type[KmsError], str, str | None], ...] = (
    (
        (boto.NoCredentialsError, boto.PartialCredentialsError, boto.ProfileNotFound),
        KmsRequestError,
        "NoCredentials",
        _NO_CREDENTIALS,
    ),
    # A credential provider (IMDS, container endpoint, SSO) failed: often transient.
    (
        (boto.CredentialRetrievalError, boto.TokenRetrievalError),
        KmsUnavailableError,
        "CredentialRetrievalError",
        _NO_CREDENTIALS,
    ),
    ((boto.SSLError,), KmsUnavailableError, "TLSError", None),
    (
        (boto.ConnectTimeoutError, boto.ReadTimeoutError, asyncio.TimeoutError),
        KmsUnavailableError,
        "Timeout",
        None,
    ),
    (
        (boto.ConnectionError, boto.HTTPClientError, aiohttp.ClientError, OSError),
        KmsUnavailableError,
        "ConnectionError",
        None,
    ),
)


def _translate(operation: Operation, exc: Exception) -> KmsError:
    """Map a foreign error to the envpipe tree: retriable if waiting could fix it.

    Messages come from the KMS, from botocore's network errors (which name the endpoint) or
    are fixed texts. Parameter validation reports can quote values (payload, key material),
    so only their shape is kept.
    """
    if isinstance(exc, boto.ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code") or "Unknown"
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        message = _truncate(error.get("Message", ""))
        if code in _KEY_UNAVAILABLE_CODES:
            return KeyUnavailableError(operation, code, message)
        if code in _ACCESS_DENIED_CODES:
            return KmsAccessDeniedError(
                operation,
                code,
                f"the AWS credentials lack {_PERMISSIONS[operation]} on this key; grant it in "
                f"the key policy or IAM policy ({message})",
            )
        retriable = code in _RETRIABLE_CODES or status >= 500 or status == 429
        kind = KmsUnavailableError if retriable else KmsRequestError
        return kind(operation, code, message)
    if isinstance(exc, boto.ParamValidationError):
        report = str(exc.kwargs.get("report", ""))
        shape = "; ".join(line.split(", value:")[0] for line in report.splitlines())
        return KmsRequestError(operation, "ParamValidationError", _truncate(shape))
    for types, error_type, code, fixed in _CLIENT_SIDE:
        if isinstance(exc, types):
            return error_type(operation, code, fixed or _truncate(str(exc)))
    return KmsRequestError(operation, type(exc).__name__, _truncate(str(exc)))


def _region(environ: Mapping[str, str] | None) -> str | None:
    if environ is None:
        return None
    return environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or None


def _explicit_credentials(environ: Mapping[str, str] | None) -> dict[str, str]:
    """botocore's keyword arguments for credentials taken from `environ`, if it has them."""
    if environ is None or not environ.get("AWS_ACCESS_KEY_ID"):
        return {}
    names = {
        "aws_access_key_id": "AWS_ACCESS_KEY_ID",
        "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
        "aws_session_token": "AWS_SESSION_TOKEN",
    }
    return {argument: environ[name] for argument, name in names.items() if environ.get(name)}


def _truncate(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"
