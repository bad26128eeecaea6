"""The cryptography services behind `pipeline.types.Kms`, and the factory that picks one.

    aws      AWS KMS through aiobotocore (`AwsKms`)
    vault    Vault / OpenBao transit through aiohttp (`VaultKms`)
    pkcs11   an HSM through python-pkcs11 (`Pkcs11Kms`)
    memory   in process memory, for unit tests (`InMemoryKms`)

Providers are imported on first use, so code that needs one does not pay for the others
(aiobotocore alone takes a while to import).
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

from pipeline.config import Settings
from pipeline.kms.counting import CountingKms
from pipeline.kms.memory import InMemoryKms
from pipeline.types import Kms

if TYPE_CHECKING:
    from pipeline.kms.aws import AwsKms

__all__ = ["AwsKms", "CountingKms", "InMemoryKms", "open_kms"]

_PROVIDERS = {
    "aws": ("pipeline.kms.aws", "AwsKms"),
    "vault": ("pipeline.kms.vault", "VaultKms"),
    "pkcs11": ("pipeline.kms.pkcs11", "Pkcs11Kms"),
}


async def open_kms(settings: Settings) -> Kms:
    """The process's one client of the service `ENVPIPE_KMS_PROVIDER` names."""
    if settings.kms_provider == "aws":
        return await _open_aws(settings)
    module, name = _PROVIDERS[settings.kms_provider]
    provider = getattr(importlib.import_module(module), name)
    opened: Kms = await provider.open(settings)
    return opened


async def _open_aws(settings: Settings) -> Kms:
    from pipeline.kms.aws import AwsKms  # noqa: PLC0415 - aiobotocore is slow to import

    verify: bool | str = settings.kms_ca_bundle or settings.kms_verify_tls
    if not settings.kms_verify_tls:
        logging.getLogger("envpipe.security").warning(
            "TLS verification of the KMS endpoint is OFF (ENVPIPE_KMS_VERIFY_TLS=false); "
            "never run like this in production"
        )
    return await AwsKms.open(
        endpoint_url=settings.kms_endpoint or None,
        region=settings.kms_region or None,
        max_pool_connections=settings.kms_max_connections,
        verify=verify,
    )


def __getattr__(name: str) -> object:
    if name == "AwsKms":
        return importlib.import_module("pipeline.kms.aws").AwsKms
    raise AttributeError(f"module {name!r} has no attribute {name!r}")
