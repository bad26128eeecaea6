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
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pipeline.config import Settings
from pipeline.kms.counting import CountingKms
from pipeline.kms.memory import InMemoryKms
from pipeline.types import Kms

if TYPE_CHECKING:
    from pipeline.kms.aws import AwsKms
    from pipeline.kms.pkcs11 import Pkcs11Kms
    from pipeline.kms.vault import VaultKms

__all__ = ["AwsKms", "CountingKms", "InMemoryKms", "Pkcs11Kms", "VaultKms", "open_kms"]

_PROVIDERS = {
    "aws": ("pipeline.kms.aws", "AwsKms"),
    "vault": ("pipeline.kms.vault", "VaultKms"),
    "pkcs11": ("pipeline.kms.pkcs11", "Pkcs11Kms"),
}


async def open_kms(settings: Settings, environ: Mapping[str, str] | None = None) -> Kms:
    """The process's one client of the service `ENVPIPE_KMS_PROVIDER` names.

    Credentials and endpoints that are not settings (AWS_*, VAULT_*, SOFTHSM2_CONF) come from
    `environ`, this process's environment by default; a tool opening a client for another
    environment (the demo's in-process stage, a test) passes it instead of changing its own.
    """
    if settings.kms_provider == "aws":
        return await _open_aws(settings, environ)
    module, name = _PROVIDERS[settings.kms_provider]
    provider = getattr(importlib.import_module(module), name)
    opened: Kms = await provider.open(settings, environ)
    return opened


async def _open_aws(settings: Settings, environ: Mapping[str, str] | None) -> Kms:
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
        credentials=environ,
    )


def __getattr__(name: str) -> object:
    for module, class_name in [("pipeline.kms.aws", "AwsKms"), *_PROVIDERS.values()]:
        if name == class_name:
            return getattr(importlib.import_module(module), class_name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
