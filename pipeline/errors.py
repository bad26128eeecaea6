"""Every error envpipe raises, in one tree.

    EnvpipeError
    ├── ConfigError             a setting is missing or out of range; names the setting
    ├── ServiceError            an embedded dev service could not start or stop
    ├── KmsError                the KMS refused or failed a request
    │   ├── KmsUnavailableError     retriable: throttled, internal error, network, timeout
    │   └── KmsRequestError         not retriable: access denied, bad key, invalid ciphertext
    ├── DekExhaustedError       retriable: no usable DEK (KMS down past the grace period)
    └── DecryptionError         one opaque error for a record that cannot be opened;
                                its `reason` is a machine-readable code for logs,
                                metrics and the dead-letter header

Retriability is a property of the class (``retriable``), as in aiokafka: a worker pauses and
retries on a retriable error and dead-letters the record on a `DecryptionError`. Messages
never contain key material, credentials or payload bytes.
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


class KmsError(EnvpipeError):
    """The KMS failed a request. `operation` is the KMS API name, `code` the AWS error code."""

    def __init__(self, operation: str, code: str, message: str = "") -> None:
        detail = f": {message}" if message else ""
        super().__init__(f"KMS {operation} failed with {code}{detail}")
        self.operation = operation
        self.code = code


class KmsUnavailableError(KmsError):
    """Throttling, internal errors, timeouts, refused connections: worth retrying later."""

    retriable = True


class KmsRequestError(KmsError):
    """The KMS understood the request and refused it; retrying will not help."""


class DekExhaustedError(EnvpipeError):
    """No data key may be used: the current one hit a hard limit and the KMS cannot mint another."""

    retriable = True


class Reason(StrEnum):
    """Why a record could not be opened. The values are the public reason codes."""

    MALFORMED = "malformed"
    UNKNOWN_VERSION = "unknown_version"
    KEY_NOT_ALLOWED = "key_not_allowed"
    BAD_SIGNATURE = "bad_signature"
    UNWRAP_FAILED = "unwrap_failed"
    BAD_TAG = "bad_tag"


class DecryptionError(EnvpipeError):
    """A record could not be opened. Deliberately opaque: only `reason` says why."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(f"record could not be decrypted (reason={reason.value})")
        self.reason = reason
