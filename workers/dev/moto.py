"""The embedded AWS KMS: moto's server, reached through aiobotocore exactly like real KMS.

moto supports GenerateDataKey, Decrypt with an encryption context, Sign and GetPublicKey for
ECC_NIST_P256, DescribeKey and aliases. It does not refuse disabled keys or keys pending
deletion, and it treats Sign(MessageType=DIGEST) as a raw message: test neither against it.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any, Protocol, cast

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.errors import ServiceError
from workers.dev.ports import HOST
from workers.dev.service import INSTALL_HINT, KmsStarted, Launcher

LABEL = "moto KMS server"
REGION = "us-east-1"
KMS_KEY_ALIAS = "alias/envpipe-dev"
SIGNING_KEY_ALIAS = "alias/envpipe-dev-signing"

# moto accepts any credentials. An access key that is not 20 upper-case characters keeps
# moto's default account, so the keys stay visible to every client that uses these values.
ACCESS_KEY_ID = "envpipe-dev"
SECRET_ACCESS_KEY = "envpipe-dev-not-a-secret"  # noqa: S105 - dummy for the emulator

# (alias, KeySpec, KeyUsage) of the keys `start` creates.
_DEV_KEYS = (
    (KMS_KEY_ALIAS, "SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT"),
    (SIGNING_KEY_ALIAS, "ECC_NIST_P256", "SIGN_VERIFY"),
)
_PROBE_TIMEOUT_SECONDS = 1.0


class KmsClient(Protocol):
    """The few calls made on botocore's (untyped) sync KMS client."""

    def list_keys(self, **kwargs: Any) -> dict[str, Any]: ...
    def create_key(self, **kwargs: Any) -> dict[str, Any]: ...
    def create_alias(self, **kwargs: Any) -> dict[str, Any]: ...
    def update_alias(self, **kwargs: Any) -> dict[str, Any]: ...
    def describe_key(self, **kwargs: Any) -> dict[str, Any]: ...


def kms_command(port: int) -> list[str]:
    """moto's server under this interpreter, so nothing has to be on PATH.

    `-P` keeps the state directory (the child's cwd) off sys.path.
    """
    try:
        found = importlib.util.find_spec("moto.server") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ServiceError(f"the moto KMS emulator is not installed; {INSTALL_HINT}")
    return [sys.executable, "-P", "-m", "moto.server", "-H", HOST, "-p", str(port)]


def client(endpoint: str) -> KmsClient:
    """A sync botocore KMS client for the emulator: no retries, so polling stays responsive."""
    config = Config(
        connect_timeout=_PROBE_TIMEOUT_SECONDS, read_timeout=10, retries={"total_max_attempts": 1}
    )
    kms = botocore.session.get_session().create_client(
        "kms",
        region_name=REGION,
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        config=config,
    )
    return cast(KmsClient, kms)


def start(launcher: Launcher, port: int, timeout: float) -> KmsStarted:
    """Start moto on `port`, wait for it, create the dev keys under their aliases."""
    endpoint = f"http://{HOST}:{port}"
    child = launcher.spawn("kms", LABEL, kms_command(port), port=port)
    kms = client(endpoint)
    launcher.wait_ready(
        {child: lambda: kms.list_keys(Limit=1)},
        timeout,
        expected=(OSError, BotoCoreError, ClientError),
    )
    arns = create_keys(kms)
    variables = {
        "ENVPIPE_KMS_PROVIDER": "aws",
        "ENVPIPE_KMS_ENDPOINT": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": REGION,
    }
    return KmsStarted(
        provider="aws",
        variables=variables,
        kms_key_id=KMS_KEY_ALIAS,
        signing_key_id=SIGNING_KEY_ALIAS,
        kms_key_canonical=arns[KMS_KEY_ALIAS],
        signing_key_canonical=arns[SIGNING_KEY_ALIAS],
        summary=(("kms", f"{endpoint}  (moto, pid {child.pid})"),),
    )


def create_keys(kms: KmsClient) -> dict[str, str]:
    """Create the dev keys and their aliases; returns alias -> key ARN."""
    arns = {}
    for alias, key_spec, key_usage in _DEV_KEYS:
        try:
            metadata = kms.create_key(
                KeySpec=key_spec, KeyUsage=key_usage, Description=f"envpipe dev key {alias}"
            )["KeyMetadata"]
            kms.create_alias(AliasName=alias, TargetKeyId=metadata["KeyId"])
        except (BotoCoreError, ClientError) as exc:
            raise ServiceError(
                f"creating the dev key {alias} on the KMS emulator failed: {exc}"
            ) from exc
        arns[alias] = str(metadata["Arn"])
    return arns
