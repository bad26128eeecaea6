"""envpipe: envelope encryption for Kafka records with keys the application never holds.

Start with `Encryptor` and `Decryptor` (in-process API), `load_settings` (configuration),
and `pipeline.kms` (AWS KMS through aiobotocore, or an in-memory KMS for unit tests).
"""

from pipeline.config import Settings, load_settings
from pipeline.crypto import Decryptor, Encryptor
from pipeline.errors import DecryptionError, EnvpipeError, Reason

__all__ = [
    "DecryptionError",
    "Decryptor",
    "Encryptor",
    "EnvpipeError",
    "Reason",
    "Settings",
    "load_settings",
]
