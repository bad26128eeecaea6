"""AwsKms against moto's KMS server over HTTP, plus a tiny fake KMS for failures moto cannot make.

Credentials reach the client only through the AWS_* environment (never parameters), as in
production, and no error message may contain them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import inspect
import ipaddress
import json
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pipeline.errors import (
    ConfigError,
    KeyUnavailableError,
    KmsAccessDeniedError,
    KmsError,
    KmsRequestError,
    KmsUnavailableError,
)
from pipeline.kms import AwsKms
from pipeline.types import EncryptionContext, Kms
from workers.dev import DevEnv

PAIRS = {"envpipe:stream": "orders", "tenant": "acme"}
CONTEXT = EncryptionContext.of(PAIRS)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def aws_chain(
    dev_env: DevEnv, aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> DevEnv:
    """dev.env's AWS_* credentials in os.environ, isolated from the developer's ~/.aws.

    AwsKms takes no credentials: like production, it must find them through the AWS chain.
    """
    for name in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_REGION",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name, value in aws_env.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == dev_env.secret_access_key
    return dev_env


@pytest.fixture
async def kms(aws_chain: DevEnv) -> AsyncIterator[AwsKms]:
    kms = await AwsKms.open(endpoint_url=aws_chain.kms_endpoint, region=aws_chain.region)
    yield kms
    await kms.close()


@dataclass
class FakeKms:
    """Answers every request with `status` and `body` after `delay` seconds; counts requests."""

    url: str
    status: int = 400
    body: bytes = b""
    delay: float = 0.0
    requests: int = 0

    def answer(self, status: int, error_type: str, message: str = "") -> None:
        self.status = status
        self.body = json.dumps({"__type": error_type, "message": message}).encode()


async def _serve_fake(ssl_context: ssl.SSLContext | None = None) -> tuple[FakeKms, web.AppRunner]:
    fake = FakeKms(url="")

    async def handle(request: web.Request) -> web.Response:
        fake.requests += 1
        await request.read()
        await asyncio.sleep(fake.delay)
        return web.Response(
            status=fake.status, body=fake.body, content_type="application/x-amz-json-1.1"
        )

    app = web.Application()
    app.router.add_post("/", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = runner.addresses[0][1]
    fake.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
    return fake, runner


@pytest.fixture
async def fake_kms() -> AsyncIterator[FakeKms]:
    fake, runner = await _serve_fake()
    yield fake
    await runner.cleanup()


async def _open_fake(fake: FakeKms, *, max_attempts: int = 1, read_timeout: float = 5.0) -> AwsKms:
    return await AwsKms.open(
        endpoint_url=fake.url,
        region="us-east-1",
        max_attempts=max_attempts,
        read_timeout=read_timeout,
    )


def _check_clean(err: KmsError, env: DevEnv, *secrets: bytes) -> None:
    """No credential and no key material in what a log line would show."""
    text = f"{err} {err!r}"
    assert env.secret_access_key not in text
    for secret in secrets:
        assert secret.hex() not in text
        assert repr(secret) not in text
    assert err.__cause__ is not None  # translated with `raise ... from exc`


# --- the happy path against moto --------------------------------------------------------------


async def test_implements_the_protocol(kms: AwsKms) -> None:
    assert isinstance(kms, Kms)


async def test_data_key_round_trip_reports_the_arn(kms: AwsKms, aws_chain: DevEnv) -> None:
    key = await kms.generate_data_key(aws_chain.kms_key_id, CONTEXT)

    assert key.key_id == aws_chain.kms_key_canonical  # the ARN, never the alias we asked with
    assert len(key.plaintext) == 32
    assert key.plaintext not in key.wrapped
    reordered = EncryptionContext.of(dict(reversed(PAIRS.items())))
    assert await kms.unwrap(key.key_id, key.wrapped, reordered) == key.plaintext


async def test_wrong_context_is_refused(kms: AwsKms, aws_chain: DevEnv) -> None:
    key = await kms.generate_data_key(aws_chain.kms_key_canonical, CONTEXT)

    with pytest.raises(KmsRequestError) as caught:
        await kms.unwrap(key.key_id, key.wrapped, EncryptionContext.of({**PAIRS, "tenant": "evil"}))

    assert caught.value.operation == "unwrap"
    assert caught.value.code == "InvalidCiphertextException"
    assert not caught.value.retriable
    _check_clean(caught.value, aws_chain, key.plaintext)


async def test_each_data_key_is_fresh_under_concurrency(aws_chain: DevEnv) -> None:
    kms = await AwsKms.open(
        endpoint_url=aws_chain.kms_endpoint, region=aws_chain.region, max_pool_connections=4
    )
    try:
        keys = await asyncio.gather(
            *(kms.generate_data_key(aws_chain.kms_key_id, CONTEXT) for _ in range(20))
        )
    finally:
        await kms.close()
    assert len({key.plaintext for key in keys}) == 20


async def test_signature_verifies_locally(kms: AwsKms, aws_chain: DevEnv) -> None:
    message = b"header bytes S"
    signature = await kms.sign(aws_chain.signing_key_id, message, _sha256(message))
    public_key = serialization.load_der_public_key(
        await kms.get_public_key(aws_chain.signing_key_canonical)
    )
    assert isinstance(public_key, ec.EllipticCurvePublicKey)

    public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        public_key.verify(signature, message + b"!", ec.ECDSA(hashes.SHA256()))


async def test_resolve_asks_for_aliases_every_time_and_never_for_arns(
    kms: AwsKms, aws_chain: DevEnv
) -> None:
    describe_calls: list[str] = []
    kms._client.meta.events.register(  # type: ignore[union-attr]
        "before-call.kms.DescribeKey", lambda **_: describe_calls.append("DescribeKey")
    )

    for _ in range(3):  # an alias may be re-pointed at any time: no cache
        assert await kms.resolve_wrapping_key(aws_chain.kms_key_id) == aws_chain.kms_key_canonical
    canonical = aws_chain.kms_key_canonical
    assert await kms.resolve_wrapping_key(canonical) == canonical
    signing = aws_chain.signing_key_canonical
    assert await kms.resolve_signing_key(aws_chain.signing_key_id) == signing
    assert await kms.resolve_signing_key(signing) == signing

    assert len(describe_calls) == 4  # one per alias lookup; none for an ARN


async def test_large_messages_are_signed_as_a_digest(kms: AwsKms, aws_chain: DevEnv) -> None:
    """Above KMS's 4096-byte RAW limit the digest goes instead, with MessageType=DIGEST.

    moto signs a DIGEST request's bytes as if they were a raw message, so only the request's
    shape is checked here; real KMS verifies as SHA-256(S).
    """
    sent: list[dict[str, Any]] = []
    kms._client.meta.events.register(  # type: ignore[union-attr]
        "provide-client-params.kms.Sign", lambda params, **_: sent.append(dict(params))
    )
    small, large = b"s" * 4096, b"l" * 4097
    await kms.sign(aws_chain.signing_key_canonical, small, _sha256(small))
    await kms.sign(aws_chain.signing_key_canonical, large, _sha256(large))
    assert [(p["MessageType"], len(p["Message"])) for p in sent] == [("RAW", 4096), ("DIGEST", 32)]


async def test_unknown_alias_is_a_request_error(kms: AwsKms, aws_chain: DevEnv) -> None:
    with pytest.raises(KmsRequestError) as caught:
        await kms.resolve_wrapping_key("alias/does-not-exist")
    assert type(caught.value) is KeyUnavailableError
    assert (caught.value.operation, caught.value.code) == ("resolve", "NotFoundException")
    _check_clean(caught.value, aws_chain)


async def test_invalid_parameters_never_echo_values(kms: AwsKms, aws_chain: DevEnv) -> None:
    leaky_context = EncryptionContext({"tenant": b"payload-that-must-not-leak"}, b"")  # type: ignore[dict-item]
    with pytest.raises(KmsRequestError) as caught:
        await kms.generate_data_key(aws_chain.kms_key_id, leaky_context)

    assert caught.value.code == "ParamValidationError"
    assert "EncryptionContext" in str(caught.value)
    assert "payload-that-must-not-leak" not in str(caught.value)


# --- lifecycle and configuration --------------------------------------------------------------


async def test_close_is_idempotent_and_final(aws_chain: DevEnv) -> None:
    kms = await AwsKms.open(endpoint_url=aws_chain.kms_endpoint, region=aws_chain.region)
    await kms.close()
    await kms.close()

    with pytest.raises(KmsRequestError, match="ClientClosed"):
        await kms.resolve_wrapping_key(aws_chain.kms_key_id)


async def test_settings_reach_the_client_config(aws_chain: DevEnv) -> None:
    async with await AwsKms.open(
        endpoint_url=aws_chain.kms_endpoint,
        region=aws_chain.region,
        max_pool_connections=7,
        connect_timeout=0.5,
        read_timeout=1.5,
        max_attempts=4,
    ) as kms:
        config: Any = kms._client.meta.config  # type: ignore[union-attr]
        assert config.max_pool_connections == 7
        assert (config.connect_timeout, config.read_timeout) == (0.5, 1.5)
        assert config.retries == {"total_max_attempts": 4, "mode": "standard"}
        assert kms._client.meta.region_name == aws_chain.region  # type: ignore[union-attr]


def test_credentials_are_not_parameters() -> None:
    """They come from the AWS chain only, so they cannot end up in envpipe's config or logs."""
    params = inspect.signature(AwsKms.open).parameters
    assert not [name for name in params if "key" in name or "secret" in name]


@pytest.mark.parametrize(
    ("overrides", "profile", "setting"),
    [
        ({"region": None}, None, "AWS_REGION"),
        ({"region": "us east 1"}, None, "AWS_REGION"),
        ({"endpoint_url": "not a url"}, None, "ENVPIPE_KMS_ENDPOINT"),
        ({}, "no-such-profile", "AWS_PROFILE"),
    ],
)
async def test_bad_settings_are_config_errors(
    aws_chain: DevEnv,
    monkeypatch: pytest.MonkeyPatch,
    overrides: dict[str, str | None],
    profile: str | None,
    setting: str,
) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    if profile:
        monkeypatch.setenv("AWS_PROFILE", profile)
    settings = {"endpoint_url": aws_chain.kms_endpoint, "region": aws_chain.region, **overrides}

    with pytest.raises(ConfigError) as caught:
        await AwsKms.open(endpoint_url=settings["endpoint_url"], region=settings["region"])
    assert caught.value.setting == setting


async def test_missing_credentials_name_the_settings(
    aws_chain: DevEnv, fake_kms: FakeKms, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")

    async with await _open_fake(fake_kms) as kms:
        with pytest.raises(KmsRequestError) as caught:
            await kms.sign(aws_chain.signing_key_id, b"m", _sha256(b"m"))

    assert caught.value.code == "NoCredentials"
    assert "AWS_ACCESS_KEY_ID" in str(caught.value)
    assert "AWS_PROFILE" in str(caught.value)
    assert fake_kms.requests == 0  # refused before anything unsigned left the process


# --- failures translated at the boundary ------------------------------------------------------


async def test_refused_connection_is_retriable_and_quick(aws_chain: DevEnv) -> None:
    dead = f"http://127.0.0.1:{_free_port()}"
    kms = await AwsKms.open(
        endpoint_url=dead, region="us-east-1", connect_timeout=0.5, max_attempts=1
    )
    start = time.monotonic()
    try:
        with pytest.raises(KmsUnavailableError) as caught:
            await kms.generate_data_key(aws_chain.kms_key_id, CONTEXT)
    finally:
        await kms.close()

    assert time.monotonic() - start < 2
    assert caught.value.retriable
    assert (caught.value.operation, caught.value.code) == ("generate_data_key", "ConnectionError")
    _check_clean(caught.value, aws_chain)


async def test_slow_kms_times_out(aws_chain: DevEnv, fake_kms: FakeKms) -> None:
    fake_kms.delay = 1.0
    async with await _open_fake(fake_kms, read_timeout=0.2) as kms:
        with pytest.raises(KmsUnavailableError) as caught:
            await kms.unwrap(aws_chain.kms_key_canonical, b"blob", CONTEXT)
    assert caught.value.code == "Timeout"
    _check_clean(caught.value, aws_chain)


@pytest.mark.parametrize(
    ("status", "error_type", "expected"),
    [
        (400, "ThrottlingException", KmsUnavailableError),
        (400, "com.amazonaws.kms#ThrottlingException", KmsUnavailableError),
        (400, "LimitExceededException", KmsUnavailableError),
        (500, "KMSInternalException", KmsUnavailableError),
        (500, "DependencyTimeoutException", KmsUnavailableError),
        (503, "SomethingNew", KmsUnavailableError),
        (429, "SomethingElse", KmsUnavailableError),
        (400, "AccessDeniedException", KmsAccessDeniedError),
        (400, "IncorrectKeyException", KmsRequestError),
        (400, "DisabledException", KeyUnavailableError),
        (400, "KMSInvalidStateException", KeyUnavailableError),
        (400, "NotFoundException", KeyUnavailableError),
        (400, "UnrecognizedClientException", KmsRequestError),
    ],
)
async def test_service_errors_are_classified(
    aws_chain: DevEnv, fake_kms: FakeKms, status: int, error_type: str, expected: type[KmsError]
) -> None:
    fake_kms.answer(status, error_type, "Rate exceeded")
    async with await _open_fake(fake_kms) as kms:
        with pytest.raises(KmsError) as caught:
            await kms.sign(aws_chain.signing_key_id, b"m", _sha256(b"m"))

    assert type(caught.value) is expected
    assert caught.value.retriable is (expected is KmsUnavailableError)
    assert caught.value.operation == "sign"
    assert caught.value.code == error_type.rsplit("#", 1)[-1]
    if expected is KmsAccessDeniedError:
        assert "kms:Sign" in str(caught.value)  # names the permission to grant
    assert "Rate exceeded" in str(caught.value)
    _check_clean(caught.value, aws_chain)


async def test_gateway_html_is_retriable(aws_chain: DevEnv, fake_kms: FakeKms) -> None:
    fake_kms.status, fake_kms.body = 502, b"<html>" + b"x" * 5000 + b"</html>"
    async with await _open_fake(fake_kms) as kms:
        with pytest.raises(KmsUnavailableError) as caught:
            await kms.get_public_key(aws_chain.signing_key_id)
    assert len(str(caught.value)) < 300  # the message is truncated


@pytest.mark.parametrize("max_attempts", [1, 2])
async def test_max_attempts_counts_the_first_try(
    aws_chain: DevEnv, fake_kms: FakeKms, max_attempts: int
) -> None:
    fake_kms.answer(500, "KMSInternalException")
    async with await _open_fake(fake_kms, max_attempts=max_attempts) as kms:
        with pytest.raises(KmsUnavailableError):
            await kms.resolve_wrapping_key(aws_chain.kms_key_id)
    assert fake_kms.requests == max_attempts


# --- TLS verification -------------------------------------------------------------------------


def _sha256(message: bytes) -> bytes:
    return hashlib.sha256(message).digest()


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_tls_is_verified_by_default(aws_chain: DevEnv, tmp_path: Path) -> None:
    cert_path, key_path = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    fake, runner = await _serve_fake(context)
    fake.answer(400, "ThrottlingException", "Rate exceeded")
    try:
        async with await _open_fake(fake) as kms:
            with pytest.raises(KmsUnavailableError) as caught:
                await kms.sign(aws_chain.signing_key_id, b"m", _sha256(b"m"))
            assert caught.value.code == "TLSError"
            assert fake.requests == 0

        async with await AwsKms.open(
            endpoint_url=fake.url, region="us-east-1", verify=str(cert_path), max_attempts=1
        ) as kms:
            with pytest.raises(KmsUnavailableError) as caught:
                await kms.sign(aws_chain.signing_key_id, b"m", _sha256(b"m"))
            assert caught.value.code == "ThrottlingException"  # trusted: the request got through
    finally:
        await runner.cleanup()
