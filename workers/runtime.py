"""What every process needs: the event loop policy, logging, and a KMS client from settings."""

from __future__ import annotations

import logging
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

from pipeline.config import Settings
from pipeline.kms.aws import AwsKms

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop (the stack's event loop)."""
    return uvloop.run(main)


def configure_logging(level: str = "INFO") -> None:
    """Plain logs on stderr. Nothing envpipe logs contains key material or payload bytes."""
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


async def open_kms(settings: Settings) -> AwsKms:
    """The process's one KMS client, with a pool sized for the configured concurrency."""
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
