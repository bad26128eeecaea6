"""Every error envpipe raises, in one tree.

    EnvpipeError
    ├── ConfigError             a setting is missing or out of range; names the setting
    ├── ServiceError            an embedded dev service could not start or stop
    ├── DemoError               the demo could not finish, or its verification failed
    ├── TopicError              a topic cannot be read or created
    ├── RecordTooLarge          a record is larger than the producer's request size
    ├── KmsError                the cryptography service refused or failed a request
    │   ├── KmsUnavailableError     retriable: throttled, 5xx, network, timeout
    │   └── KmsRequestError         not retriable: a bad request
    │       ├── KeyUnavailableError     the key is deleted, disabled, pending deletion,
    │       │                           not found, or its version is below the minimum
    │       └── KmsAccessDeniedError    credentials refused; names the permission or path
    ├── DekExhaustedError       retriable: no usable DEK (KMS down past the grace period)
    ├── HeaderPendingError      retriable: a v2 record's header is not in the keys topic yet
    ├── SealError               one record cannot be sealed; `reason` says why
    └── DecryptionError         one opaque error for a record that cannot be opened;
                                its `reason` is a machine-readable code for logs,
                                metrics and the dead-letter header

Retriability is a property of the class (``retriable``), as in aiokafka: a worker pauses and
retries on a retriable error and dead-letters the record on a `DecryptionError` or a
`SealError`. Messages never contain key material, credentials or payload bytes.
"""

from __future__ import annotations

from enum import StrEnum


class EnvpipeError(Exception):
    """Base of every envpipe error."""

    retriable: bool = False


class ConfigError(EnvpipeError):
    """A setting is missing or invalid; the message names the setting and how to fix it."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting


class ServiceError(EnvpipeError):
    """An embedded development service (broker, KMS emulator) failed to start or stop."""


class DemoError(EnvpipeError):
    """The demo could not run to the end, or what it read back was not what it wrote."""


class TopicError(EnvpipeError):
    """A topic cannot be read or created (an unreachable broker is a ConfigError)."""


class RecordTooLarge(EnvpipeError):
    """The record alone is larger than the producer's max request size."""


class KmsError(EnvpipeError):
    """The service failed a request.

    `operation` is one of `pipeline.types.Operation` (the same names for every provider),
    `code` the provider's own error code or name (`ThrottlingException`, `http_503`, ...).
    """

    def __init__(self, operation: str, code: str, message: str = "") -> None:
        detail = f": {message}" if message else ""
        super().__init__(f"KMS {operation} failed with {code}{detail}")
        self.operation = operation
        self.code = code


class KmsUnavailableError(KmsError):
    """Throttling, server errors, timeouts, refused connections: worth retrying later."""

    retriable = True


class KmsRequestError(KmsError):
    """The service understood the request and refused it; retrying will not help."""


class KeyUnavailableError(KmsRequestError):
    """The key is gone or switched off (deleted, disabled, pending deletion, not found, or a
    version below `min_decryption_version`). Records under it are `key_unavailable`."""


class KmsAccessDeniedError(KmsRequestError):
    """The credentials are not allowed to do this; the message names the permission or the
    policy path to grant."""


class DekExhaustedError(EnvpipeError):
    """No data key may be used: the current one hit a hard limit and the KMS cannot mint another."""

    retriable = True


class HeaderPendingError(EnvpipeError):
    """A v2 record names a `dek_id` whose header has not reached the keys topic yet."""

    retriable = True


class Reason(StrEnum):
    """Why a record was dead-lettered. The values are the public reason codes."""

    # opening (decrypt, rewrap)
    MALFORMED = "malformed"
    UNKNOWN_VERSION = "unknown_version"
    KEY_NOT_ALLOWED = "key_not_allowed"
    BAD_SIGNATURE = "bad_signature"
    KEY_UNAVAILABLE = "key_unavailable"
    UNWRAP_FAILED = "unwrap_failed"
    BAD_TAG = "bad_tag"
    HEADER_MISSING = "header_missing"
    # sealing (encrypt, rewrap)
    KEY_UNRESOLVED = "key_unresolved"
    TOO_LARGE = "too_large"
    SEAL_FAILED = "seal_failed"


class SealError(EnvpipeError):
    """One record cannot be sealed (its key template cannot be filled, say)."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"record could not be sealed (reason={reason.value}){detail}")
        self.reason = reason


class DecryptionError(EnvpipeError):
    """A record could not be opened. Deliberately opaque: only `reason` says why."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(f"record could not be decrypted (reason={reason.value})")
        self.reason = reason
