"""envpipe: envelope encryption for Kafka records with keys the application never holds.

Start with `Encryptor` and `Decryptor` (in-process API), `load_settings` (configuration) and
`open_kms` (the cryptography service the settings name: AWS KMS, Vault transit or a PKCS#11
HSM). What the core needs from a service is the `Kms` protocol; v2's keys topic is a
`HeaderSink` for writers and a `HeaderSource` for readers (`pipeline.keys_topic`).

Which modules are pure and which do IO: `envelope`, `envelope_v2`, `avro`, `aead`, `keyids`,
`config`, `histogram`, `retry` and `errors` are plain functions and classes with no IO and no
event loop. `cache`, `trust`, `encryptor` and `decryptor` have no sockets or files either,
but they are async: they await the injected service and schedule background refreshes.
The IO edge is `kms/` (aiobotocore, aiohttp, python-pkcs11) and `keys_topic` (aiokafka).
"""

from pipeline.cache import DekPolicy
from pipeline.config import Settings, load_settings
from pipeline.decryptor import Decryptor
from pipeline.encryptor import Encryptor
from pipeline.errors import (
    ConfigError,
    DecryptionError,
    DekExhaustedError,
    EnvpipeError,
    HeaderPendingError,
    KeyUnavailableError,
    KmsAccessDeniedError,
    KmsError,
    KmsRequestError,
    KmsUnavailableError,
    Reason,
    SealError,
)
from pipeline.kms import open_kms
from pipeline.types import DataKey, EncryptionContext, HeaderSink, HeaderSource, Kms

__all__ = [
    "ConfigError",
    "DataKey",
    "DecryptionError",
    "Decryptor",
    "DekExhaustedError",
    "DekPolicy",
    "EncryptionContext",
    "Encryptor",
    "EnvpipeError",
    "HeaderPendingError",
    "HeaderSink",
    "HeaderSource",
    "KeyUnavailableError",
    "Kms",
    "KmsAccessDeniedError",
    "KmsError",
    "KmsRequestError",
    "KmsUnavailableError",
    "Reason",
    "SealError",
    "Settings",
    "load_settings",
    "open_kms",
]
