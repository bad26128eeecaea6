"""VaultKms against a real OpenBao dev server, started once for the module by `openbao.start`.

Every test makes its own keys (unique names), so tests do not see each other's rotations or
deletions. Admin calls (rotate, config, policies, tokens) go through the sync `openbao.Api`,
never through VaultKms, so a bug in VaultKms cannot hide itself.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import socket
import ssl
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from pipeline.config import Settings
from pipeline.errors import (
    ConfigError,
    KeyUnavailableError,
    KmsAccessDeniedError,
    KmsError,
    KmsRequestError,
    KmsUnavailableError,
    ServiceError,
)
from pipeline.kms.vault import VaultKms
from pipeline.kms.vault_env import describe_vault_credentials
from pipeline.kms.vault_errors import DecodedResponse, classify_response
from pipeline.kms.vault_token import TokenSource
from pipeline.types import EncryptionContext, Kms
from workers.dev import openbao
from workers.dev.ports import free_port
from workers.dev.service import Launcher

CONTEXT = EncryptionContext.of({"envpipe:stream": "orders", "tenant": "acme"})
OTHER = EncryptionContext.of({"envpipe:stream": "orders", "tenant": "evil"})


@dataclass(frozen=True)
class Bao:
    """The module's OpenBao: where it is, its root token, and a sync admin client."""

    address: str
    root: str
    api: openbao.Api
    state_dir: Path

    def key(self, key_type: str = "aes256-gcm96", mount: str = "transit") -> str:
        """A fresh key of `key_type`; returns its name."""
        name = f"k-{uuid.uuid4().hex[:12]}"
        self.api.call("POST", f"{mount}/keys/{name}", {"type": key_type})
        return name

    def token(self, policy_hcl: str = "", **options: object) -> str:
        """A child token; with `policy_hcl`, under a fresh policy holding just that."""
        policies = ["default"]
        if policy_hcl:
            policy = f"p-{uuid.uuid4().hex[:12]}"
            self.api.call("POST", f"sys/policies/acl/{policy}", {"policy": policy_hcl})
            policies.append(policy)
        body = self.api.call("POST", "auth/token/create", {"policies": policies, **options})
        token: str = body["auth"]["client_token"]
        return token


def _launcher(state_dir: Path) -> Launcher:
    return Launcher(state_dir, lambda records: None)


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    state_dir = tmp_path_factory.mktemp("openbao")
    launcher = _launcher(state_dir)
    started = openbao.start(launcher, free_port(), timeout=30)
    try:
        address, root = started.variables["VAULT_ADDR"], started.variables["VAULT_TOKEN"]
        yield Bao(address, root, openbao.Api(address, root), state_dir)
    finally:
        for record in launcher.records:
            record.stop()


@pytest.fixture
async def kms(bao: Bao) -> AsyncIterator[VaultKms]:
    kms = await VaultKms.connect(bao.address, bao.root)
    yield kms
    await kms.close()


def _public_key(der: bytes) -> ec.EllipticCurvePublicKey:
    key = serialization.load_der_public_key(der)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def _raw(bao: Bao, method: str, path: str, payload: dict[str, object] | None = None) -> object:
    """Vault's HTTP API with nothing from envpipe: urllib and json only."""
    request = urllib.request.Request(  # noqa: S310 - the test's own http URL
        f"{bao.address}/v1/{path}",
        data=json.dumps(payload).encode() if payload is not None else None,
        headers={"X-Vault-Token": bao.root},
        method=method,
    )
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        return json.loads(response.read())["data"]


# --- the happy path -----------------------------------------------------------------------------


async def test_implements_the_protocol(kms: VaultKms) -> None:
    assert isinstance(kms, Kms)
    assert kms.provider == "vault"


async def test_wrap_unwrap_round_trip(kms: VaultKms, bao: Bao) -> None:
    name = bao.key()
    first = await kms.generate_data_key(f"vault:transit:{name}", CONTEXT)
    second = await kms.generate_data_key(f"vault:transit:{name}", CONTEXT)

    assert first.key_id == f"vault:transit:{name}"
    assert first.wrapped.startswith(b"vault:v1:")
    assert len(first.plaintext) == 32
    assert first.plaintext != second.plaintext
    assert base64.b64encode(first.plaintext) not in first.wrapped
    assert await kms.unwrap(first.key_id, first.wrapped, CONTEXT) == first.plaintext
    assert await kms.unwrap(second.key_id, second.wrapped, CONTEXT) == second.plaintext


async def test_wrong_context_is_a_request_error(kms: VaultKms, bao: Bao) -> None:
    key = await kms.generate_data_key(f"vault:transit:{bao.key()}", CONTEXT)

    for context in (OTHER, EncryptionContext.of({})):
        with pytest.raises(KmsRequestError) as caught:
            await kms.unwrap(key.key_id, key.wrapped, context)
        assert type(caught.value) is KmsRequestError  # not KeyUnavailable, not AccessDenied
        assert not caught.value.retriable
        assert caught.value.operation == "unwrap"
        assert caught.value.code == "http_400"
        assert "message authentication failed" in str(caught.value)
        assert key.wrapped.decode() not in str(caught.value)


async def test_garbled_ciphertext_is_a_request_error(kms: VaultKms, bao: Bao) -> None:
    key = await kms.generate_data_key(f"vault:transit:{bao.key()}", CONTEXT)
    for wrapped in (key.wrapped[:-8], b"not-vault", b"\xff" * 40):
        with pytest.raises(KmsRequestError) as caught:
            await kms.unwrap(key.key_id, wrapped, CONTEXT)
        assert type(caught.value) is KmsRequestError


async def test_signature_verifies_locally(kms: VaultKms, bao: Bao) -> None:
    signing = await kms.resolve_signing_key(f"vault:transit:{bao.key('ecdsa-p256')}")
    assert signing.endswith(":1")
    message = b"header bytes S"
    digest = hashlib.sha256(message).digest()

    signature = await kms.sign(signing, message, digest)

    decode_dss_signature(signature)  # DER, not Vault's "vault:v1:" string
    public_key = _public_key(await kms.get_public_key(signing))
    public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    public_key.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    with pytest.raises(InvalidSignature):
        public_key.verify(signature, message + b"!", ec.ECDSA(hashes.SHA256()))


async def test_resolve_checks_form_and_type(kms: VaultKms, bao: Bao) -> None:
    wrapping, signing = bao.key(), bao.key("ecdsa-p256")
    assert await kms.resolve_wrapping_key(f"vault:transit:{wrapping}") == (
        f"vault:transit:{wrapping}"
    )
    assert await kms.resolve_signing_key(f"vault:transit:{signing}:7") == (
        f"vault:transit:{signing}:7"
    )
    with pytest.raises(ConfigError, match="aes256-gcm96") as caught:
        await kms.resolve_wrapping_key(f"vault:transit:{signing}")
    assert caught.value.setting == "ENVPIPE_KMS_KEY_ID"
    with pytest.raises(ConfigError, match="ecdsa-p256") as caught:
        await kms.resolve_signing_key(f"vault:transit:{wrapping}")
    assert caught.value.setting == "ENVPIPE_SIGNING_KEY_ID"
    with pytest.raises(KmsRequestError, match="aes256-gcm96"):
        await kms.generate_data_key(f"vault:transit:{signing}", CONTEXT)


@pytest.mark.parametrize(
    ("key_id", "setting"),
    [
        ("transit:orders", "ENVPIPE_KMS_KEY_ID"),
        ("vault:transit", "ENVPIPE_KMS_KEY_ID"),
        ("vault:transit:orders:1", "ENVPIPE_KMS_KEY_ID"),  # wrapping ids carry no version
        ("vault:../sys:orders", "ENVPIPE_KMS_KEY_ID"),
        ("vault:transit/:orders", "ENVPIPE_KMS_KEY_ID"),
        ("vault:transit:or/ders", "ENVPIPE_KMS_KEY_ID"),
        ("vault:transit:orders:0", "ENVPIPE_SIGNING_KEY_ID"),
        ("vault:transit:orders:v1", "ENVPIPE_SIGNING_KEY_ID"),
        ("vault:transit:orders:1:2", "ENVPIPE_SIGNING_KEY_ID"),
    ],
)
async def test_malformed_ids_name_the_setting(kms: VaultKms, key_id: str, setting: str) -> None:
    resolve = (
        kms.resolve_wrapping_key if setting == "ENVPIPE_KMS_KEY_ID" else kms.resolve_signing_key
    )
    with pytest.raises(ConfigError) as caught:
        await resolve(key_id)
    assert caught.value.setting == setting
    call = (
        kms.generate_data_key(key_id, CONTEXT)
        if setting == "ENVPIPE_KMS_KEY_ID"
        else kms.get_public_key(key_id)
    )
    with pytest.raises(KmsRequestError, match="invalid_key_id"):  # at call time: not config
        await call


async def test_a_mount_with_slashes(kms: VaultKms, bao: Bao) -> None:
    bao.api.call("POST", "sys/mounts/team/a/transit", {"type": "transit"})
    name = bao.key(mount="team/a/transit")
    key = await kms.generate_data_key(f"vault:team/a/transit:{name}", CONTEXT)
    assert key.key_id == f"vault:team/a/transit:{name}"
    assert await kms.unwrap(key.key_id, key.wrapped, CONTEXT) == key.plaintext


# --- key lifecycle ------------------------------------------------------------------------------


async def test_wrapping_key_rotation(kms: VaultKms, bao: Bao) -> None:
    key_id = f"vault:transit:{bao.key()}"
    old = await kms.generate_data_key(key_id, CONTEXT)
    bao.api.call("POST", f"transit/keys/{key_id.rsplit(':', 1)[1]}/rotate")
    new = await kms.generate_data_key(key_id, CONTEXT)

    assert old.wrapped.startswith(b"vault:v1:")
    assert new.wrapped.startswith(b"vault:v2:")
    assert new.key_id == old.key_id == key_id  # the version travels in the ciphertext
    assert await kms.unwrap(key_id, old.wrapped, CONTEXT) == old.plaintext
    assert await kms.unwrap(key_id, new.wrapped, CONTEXT) == new.plaintext


async def test_signing_key_rotation(kms: VaultKms, bao: Bao) -> None:
    name = bao.key("ecdsa-p256")
    first = await kms.resolve_signing_key(f"vault:transit:{name}")
    bao.api.call("POST", f"transit/keys/{name}/rotate")
    second = await kms.resolve_signing_key(f"vault:transit:{name}")

    assert (first, second) == (f"vault:transit:{name}:1", f"vault:transit:{name}:2")
    one, two = await kms.get_public_key(first), await kms.get_public_key(second)
    assert one != two
    digest = hashlib.sha256(b"S").digest()
    for key_id, der in ((first, one), (second, two)):
        signature = await kms.sign(key_id, b"S", digest)
        _public_key(der).verify(signature, b"S", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):  # signed by version 1, checked with version 2
        _public_key(two).verify(
            await kms.sign(first, b"S", digest), b"S", ec.ECDSA(hashes.SHA256())
        )

    forged = f"vault:transit:{name}:99"
    with pytest.raises(KeyUnavailableError) as caught:
        await kms.get_public_key(forged)
    assert not caught.value.retriable
    with pytest.raises(KeyUnavailableError):  # Vault answers this one with a 500
        await kms.sign(forged, b"S", digest)


async def test_min_decryption_version_makes_old_dek_unavailable(kms: VaultKms, bao: Bao) -> None:
    name = bao.key()
    old = await kms.generate_data_key(f"vault:transit:{name}", CONTEXT)
    bao.api.call("POST", f"transit/keys/{name}/rotate")
    new = await kms.generate_data_key(f"vault:transit:{name}", CONTEXT)
    bao.api.call("POST", f"transit/keys/{name}/config", {"min_decryption_version": 2})

    with pytest.raises(KeyUnavailableError, match="too old") as caught:
        await kms.unwrap(old.key_id, old.wrapped, CONTEXT)
    assert caught.value.code == "http_400"
    assert await kms.unwrap(new.key_id, new.wrapped, CONTEXT) == new.plaintext


async def test_deleted_key_is_unavailable_and_not_recreated(kms: VaultKms, bao: Bao) -> None:
    name = bao.key()
    key = await kms.generate_data_key(f"vault:transit:{name}", CONTEXT)
    bao.api.call("POST", f"transit/keys/{name}/config", {"deletion_allowed": True})
    bao.api.call("DELETE", f"transit/keys/{name}")

    with pytest.raises(KeyUnavailableError, match="not found"):
        await kms.unwrap(key.key_id, key.wrapped, CONTEXT)
    with pytest.raises(KeyUnavailableError, match="no key"):
        await kms.generate_data_key(key.key_id, CONTEXT)
    with pytest.raises(KeyUnavailableError):
        await kms.resolve_wrapping_key(key.key_id)
    # The root token may create keys, yet the shredded key did not come back.
    with pytest.raises(ServiceError, match="404"):
        bao.api.call("GET", f"transit/keys/{name}")


# --- tokens ---------------------------------------------------------------------------------


async def test_forbidden_token_names_the_path(bao: Bao, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    name = bao.key()
    token = bao.token(
        f'path "transit/encrypt/{name}" {{ capabilities = ["update"] }}\n'
        f'path "transit/keys/{name}" {{ capabilities = ["read"] }}'
    )
    kms = await VaultKms.connect(bao.address, TokenSource.fixed(token, "VAULT_TOKEN"))
    try:
        key = await kms.generate_data_key(f"vault:transit:{name}", CONTEXT)
        with pytest.raises(KmsAccessDeniedError) as caught:
            await kms.unwrap(key.key_id, key.wrapped, CONTEXT)
        with pytest.raises(KmsAccessDeniedError) as signing:
            await kms.sign(f"vault:transit:{name}:1", b"S", hashlib.sha256(b"S").digest())
        text = repr(kms)
    finally:
        await kms.close()

    message = str(caught.value)
    assert f'may not update transit/decrypt/{name}; its policy must allow "update"' in message
    assert "VAULT_TOKEN" in message
    assert not caught.value.retriable
    assert f"transit/sign/{name}/sha2-256" in str(signing.value)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "Vault token from VAULT_TOKEN" in logged  # the renewer did log about this token
    for shown in (message, str(signing.value), text, logged):
        assert token not in shown
        assert bao.root not in shown


def _documented_policies(wrapping: str, signing: str) -> tuple[str, str]:
    """The encrypt and decrypt policies of docs/vault.md, for these key names."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "vault.md").read_text()
    blocks = re.findall(r"```hcl\n(.*?)```", text, re.DOTALL)
    assert len(blocks) == 2
    named = [
        block.replace("orders-signing", signing).replace("orders", wrapping) for block in blocks
    ]
    return named[0], named[1]


async def test_documented_policies_are_enough_and_no_more(bao: Bao) -> None:
    wrapping, signing = bao.key(), bao.key("ecdsa-p256")
    encrypt_hcl, decrypt_hcl = _documented_policies(wrapping, signing)
    encrypt_token = bao.token(encrypt_hcl)
    encryptor = await VaultKms.connect(bao.address, encrypt_token)
    decryptor = await VaultKms.connect(bao.address, bao.token(decrypt_hcl))
    try:
        key_id = await encryptor.resolve_wrapping_key(f"vault:transit:{wrapping}")
        signing_id = await encryptor.resolve_signing_key(f"vault:transit:{signing}")
        key = await encryptor.generate_data_key(key_id, CONTEXT)
        digest = hashlib.sha256(b"S").digest()
        signature = await encryptor.sign(signing_id, b"S", digest)
        with pytest.raises(KmsAccessDeniedError, match=f"transit/decrypt/{wrapping}"):
            await encryptor.unwrap(key_id, key.wrapped, CONTEXT)

        assert await decryptor.unwrap(key_id, key.wrapped, CONTEXT) == key.plaintext
        public_key = _public_key(await decryptor.get_public_key(signing_id))
        public_key.verify(signature, b"S", ec.ECDSA(hashes.SHA256()))
        with pytest.raises(KmsAccessDeniedError, match=f"transit/keys/{wrapping}"):
            await decryptor.generate_data_key(key_id, CONTEXT)

        # Shredded: the encrypt worker sees key_unavailable, and its token cannot re-create
        # the key through encrypt (no "create"), even bypassing envpipe's own check.
        bao.api.call("POST", f"transit/keys/{wrapping}/config", {"deletion_allowed": True})
        bao.api.call("DELETE", f"transit/keys/{wrapping}")
        with pytest.raises(KeyUnavailableError):
            await encryptor.generate_data_key(key_id, CONTEXT)
        with pytest.raises(ServiceError, match="403"):
            bao.api.call(
                "POST", f"transit/encrypt/{wrapping}", {"plaintext": ""}, token=encrypt_token
            )
        with pytest.raises(ServiceError, match="404"):
            bao.api.call("GET", f"transit/keys/{wrapping}")
    finally:
        await encryptor.close()
        await decryptor.close()


async def test_revoked_token_is_access_denied(bao: Bao) -> None:
    token = bao.token()
    kms = await VaultKms.connect(bao.address, token, renew=False)
    try:
        bao.api.call("POST", "auth/token/revoke", {"token": token})
        with pytest.raises(KmsAccessDeniedError, match="token expired"):
            await kms.resolve_signing_key("vault:transit:anything")
    finally:
        await kms.close()


async def test_token_file_is_read_again_when_it_changes(bao: Bao, tmp_path: Path) -> None:
    name = bao.key("ecdsa-p256")
    policy = f'path "transit/keys/{name}" {{ capabilities = ["read"] }}'
    first, second = bao.token(policy), bao.token(policy)
    path = tmp_path / "token"
    path.write_text(first + "\n")
    kms = await VaultKms.connect(bao.address, TokenSource.from_file(path), renew=False)
    try:
        assert await kms.resolve_signing_key(f"vault:transit:{name}") == f"vault:transit:{name}:1"
        bao.api.call("POST", "auth/token/revoke", {"token": first})
        with pytest.raises(KmsAccessDeniedError, match="ENVPIPE_VAULT_TOKEN_FILE"):
            await kms.resolve_signing_key(f"vault:transit:{name}")

        path.with_suffix(".new").write_text(second)
        path.with_suffix(".new").replace(path)  # as Vault Agent's sink does
        assert await kms.resolve_signing_key(f"vault:transit:{name}") == f"vault:transit:{name}:1"

        path.write_text("")  # a sink caught mid-write: keep the last good token
        assert await kms.resolve_signing_key(f"vault:transit:{name}") == f"vault:transit:{name}:1"
    finally:
        await kms.close()


async def test_renewable_token_outlives_its_ttl(bao: Bao) -> None:
    name = bao.key("ecdsa-p256")
    policy = f'path "transit/keys/{name}" {{ capabilities = ["read"] }}'
    options = {"ttl": "3s", "renewable": True, "explicit_max_ttl": "120s"}
    renewed = await VaultKms.connect(bao.address, bao.token(policy, **options))
    unrenewed = await VaultKms.connect(bao.address, bao.token(policy, **options), renew=False)
    try:
        await asyncio.sleep(4.5)
        assert await renewed.resolve_signing_key(f"vault:transit:{name}") == (
            f"vault:transit:{name}:1"
        )
        with pytest.raises(KmsAccessDeniedError):  # the control: it did expire
            await unrenewed.resolve_signing_key(f"vault:transit:{name}")
    finally:
        await renewed.close()
        await renewed.close()  # idempotent
        await unrenewed.close()
    with pytest.raises(KmsRequestError, match="client_closed"):
        await renewed.resolve_signing_key(f"vault:transit:{name}")


# --- outages and the network ----------------------------------------------------------------


async def test_closed_port_is_retriable_and_quick(caplog: pytest.LogCaptureFixture) -> None:
    started = time.monotonic()
    kms = await VaultKms.connect(f"http://127.0.0.1:{free_port()}", "t")  # Vault down at start
    try:
        with pytest.raises(KmsUnavailableError) as caught:
            await kms.generate_data_key("vault:transit:orders", CONTEXT)
        assert time.monotonic() - started < 2
    finally:
        await kms.close()
    assert caught.value.retriable
    assert caught.value.code == "connection_refused"
    assert caught.value.operation == "generate_data_key"
    assert any("retrying in" in record.getMessage() for record in caplog.records)


async def test_silent_server_times_out() -> None:
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        address = f"http://127.0.0.1:{listener.getsockname()[1]}"
        kms = await VaultKms.connect(address, "t", renew=False, total_timeout=0.5)
        try:
            started = time.monotonic()
            with pytest.raises(KmsUnavailableError) as caught:
                await kms.unwrap("vault:transit:orders", b"vault:v1:AAAA", CONTEXT)
            assert time.monotonic() - started < 2
        finally:
            await kms.close()
    assert caught.value.code == "timeout"


async def test_stopped_server_is_unavailable(tmp_path: Path) -> None:
    launcher = _launcher(tmp_path)
    started = openbao.start(launcher, free_port(), timeout=30)
    kms = await VaultKms.connect(started.variables["VAULT_ADDR"], started.variables["VAULT_TOKEN"])
    try:
        assert (await kms.generate_data_key(started.kms_key_id, CONTEXT)).wrapped
        for record in launcher.records:
            assert record.stop()
        with pytest.raises(KmsUnavailableError) as caught:
            await kms.generate_data_key(started.kms_key_id, CONTEXT)
        assert caught.value.retriable
    finally:
        await kms.close()
        for record in launcher.records:
            record.stop()


async def test_namespace_is_sent(bao: Bao) -> None:
    namespace = f"ns{uuid.uuid4().hex[:8]}"
    bao.api.call("POST", f"sys/namespaces/{namespace}")
    bao.api.call("POST", "sys/mounts/transit", {"type": "transit"}, namespace=namespace)
    name = f"k-{uuid.uuid4().hex[:12]}"
    bao.api.call("POST", f"transit/keys/{name}", {"type": "aes256-gcm96"}, namespace=namespace)
    inside = await VaultKms.open(
        Settings(), {"VAULT_ADDR": bao.address, "VAULT_TOKEN": bao.root, "BAO_NAMESPACE": namespace}
    )
    outside = await VaultKms.connect(bao.address, bao.root)
    try:
        key = await inside.generate_data_key(f"vault:transit:{name}", CONTEXT)
        assert await inside.unwrap(key.key_id, key.wrapped, CONTEXT) == key.plaintext
        with pytest.raises(KeyUnavailableError):  # the key exists only in the namespace
            await outside.generate_data_key(f"vault:transit:{name}", CONTEXT)
    finally:
        await inside.close()
        await outside.close()


async def test_open_reads_the_environment(bao: Bao, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        await VaultKms.open(Settings(), {"VAULT_TOKEN": bao.root})
    assert caught.value.setting == "VAULT_ADDR"
    with pytest.raises(ConfigError) as caught:
        await VaultKms.open(Settings(), {"BAO_ADDR": bao.address})
    assert caught.value.setting == "VAULT_TOKEN"
    assert "ENVPIPE_VAULT_TOKEN_FILE" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        await VaultKms.open(Settings(), {"VAULT_ADDR": "vault.example:8200", "VAULT_TOKEN": "t"})
    assert caught.value.setting == "VAULT_ADDR"

    (tmp_path / "token").write_text(bao.root)
    kms = await VaultKms.open(
        Settings(vault_token_file=str(tmp_path / "token")), {"BAO_ADDR": bao.address}
    )
    try:
        assert bao.root not in repr(kms)
        name = bao.key()
        key = await kms.generate_data_key(f"vault:transit:{name}", CONTEXT)
        assert await kms.unwrap(key.key_id, key.wrapped, CONTEXT) == key.plaintext
    finally:
        await kms.close()


async def test_tls_needs_the_right_ca(
    bao: Bao, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """OpenBao's -dev-tls makes its own CA: trusted through VAULT_CACERT, refused otherwise."""
    launcher, port = _launcher(tmp_path), free_port()
    argv = [openbao.bao_binary(), "server", "-dev", "-dev-no-store-token", "-dev-tls"]
    argv += [f"-dev-tls-cert-dir={tmp_path}", f"-dev-listen-address=127.0.0.1:{port}"]
    child = launcher.spawn(
        "kms", "OpenBao TLS server", argv, env=openbao.server_environment(tmp_path, bao.root)
    )
    ca = tmp_path / "vault-ca.pem"

    def probe() -> None:
        context = ssl.create_default_context(cafile=ca)  # FileNotFoundError until it exists
        urllib.request.urlopen(
            f"https://127.0.0.1:{port}/v1/sys/health", timeout=1, context=context
        )

    try:
        launcher.wait_ready({child: probe}, 30, expected=(OSError,))
        environ = {"VAULT_ADDR": f"https://127.0.0.1:{port}", "VAULT_TOKEN": bao.root}
        key_id = "vault:transit:orders"
        trusted = await VaultKms.open(Settings(), {**environ, "VAULT_CACERT": str(ca)})
        untrusted = await VaultKms.open(Settings(), environ)
        caplog.set_level(logging.WARNING)
        unverified = await VaultKms.open(Settings(kms_verify_tls=False), environ)
        try:
            # An answer from Vault itself (this server has no transit) proves TLS worked.
            with pytest.raises(KeyUnavailableError, match="no transit engine is mounted"):
                await trusted.resolve_wrapping_key(key_id)
            with pytest.raises(KmsUnavailableError, match="VAULT_CACERT") as caught:
                await untrusted.resolve_wrapping_key(key_id)
            assert caught.value.code == "tls_error"
            with pytest.raises(KeyUnavailableError, match="no transit engine is mounted"):
                await unverified.resolve_wrapping_key(key_id)
        finally:
            for kms in (trusted, untrusted, unverified):
                await kms.close()
        assert any("NOT verified" in record.getMessage() for record in caplog.records)
        with pytest.raises(ConfigError) as bad_ca:
            await VaultKms.open(Settings(), {**environ, "VAULT_CACERT": str(tmp_path / "none")})
        assert bad_ca.value.setting == "VAULT_CACERT"
    finally:
        for record in launcher.records:
            record.stop()


# --- interoperability: nothing from envpipe on the other side ---------------------------------


async def test_interop_with_raw_vault_api(kms: VaultKms, bao: Bao) -> None:
    name, signing = bao.key(), bao.key("ecdsa-p256")
    key = await kms.generate_data_key(f"vault:transit:{name}", CONTEXT)
    # C as the contract fixes it: one Avro block, keys sorted, then 0.
    c = b"\x04" + b"\x1cenvpipe:stream\x0corders" + b"\x0ctenant\x08acme" + b"\x00"
    assert c == CONTEXT.encoded
    data = _raw(
        bao,
        "POST",
        f"transit/decrypt/{name}",
        {"ciphertext": key.wrapped.decode(), "associated_data": base64.b64encode(c).decode()},
    )
    assert isinstance(data, dict)
    assert base64.b64decode(data["plaintext"]) == key.plaintext

    message = b"the signed header bytes S"
    signature = await kms.sign(
        f"vault:transit:{signing}:1", message, hashlib.sha256(message).digest()
    )
    data = _raw(bao, "GET", f"transit/keys/{signing}")
    assert isinstance(data, dict)
    public_key = serialization.load_pem_public_key(data["keys"]["1"]["public_key"].encode())
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))


# --- classification of answers Vault gives but a dev server will not ---------------------------


@pytest.mark.parametrize(
    ("status", "errors", "expected"),
    [
        (503, ["Vault is sealed"], KmsUnavailableError),
        (429, [], KmsUnavailableError),
        (500, ["internal error"], KmsUnavailableError),
        (502, [], KmsUnavailableError),
        (500, ["1 error occurred:\n\t* no such key version\n\n"], KeyUnavailableError),
        (
            500,
            ["requested version for signing is higher than the latest key version"],
            KeyUnavailableError,
        ),
        (500, ["key type aes256-gcm96 does not support signing"], KmsRequestError),
        (400, ["encryption key not found"], KeyUnavailableError),
        (
            400,
            ["ciphertext or signature version is disallowed by policy (too old)"],
            KeyUnavailableError,
        ),
        (400, ["cipher: message authentication failed"], KmsRequestError),
        (400, ["invalid ciphertext: version is too new"], KmsRequestError),
        (403, ["1 error occurred:\n\t* permission denied\n\n"], KmsAccessDeniedError),
        (405, ["unsupported operation"], KmsRequestError),
    ],
)
def test_classification_by_message(
    status: int, errors: list[str], expected: type[KmsError]
) -> None:
    raw = json.dumps({"errors": errors}).encode()
    error = classify_response(
        "unwrap",
        DecodedResponse.parse(status, raw),
        path="transit/decrypt/orders",
        capability="update",
        token_origin="VAULT_TOKEN",
    )
    assert type(error) is expected
    assert error.code == f"http_{status}"
    assert "\n" not in str(error)


def test_proxy_error_page_is_retriable() -> None:
    error = classify_response(
        "sign",
        DecodedResponse.parse(502, b"<html><body>Bad Gateway</body></html>"),
        path="transit/sign/s/sha2-256",
        capability="update",
        token_origin="VAULT_TOKEN",
    )
    assert isinstance(error, KmsUnavailableError)
    assert "<html" not in str(error)


async def test_token_and_namespace_headers_reach_the_server() -> None:
    """A tiny aiohttp server stands in for Vault, to see exactly what is sent."""
    seen: list[dict[str, str]] = []

    async def keys(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"data": {"type": "ecdsa-p256", "latest_version": 3}})

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect("/v1/transit/keys/orders")

    app = web.Application()
    app.router.add_get("/v1/transit/keys/orders", keys)
    app.router.add_get("/v1/transit/keys/moved", moved)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        address = f"http://127.0.0.1:{runner.addresses[0][1]}"
        kms = await VaultKms.open(
            Settings(),
            {"VAULT_ADDR": address, "BAO_TOKEN": "s.secret", "VAULT_NAMESPACE": "team/a/"},
        )
        try:
            assert await kms.resolve_signing_key("vault:transit:orders") == "vault:transit:orders:3"
            with pytest.raises(KmsUnavailableError, match="redirect"):
                await kms.resolve_signing_key("vault:transit:moved")
        finally:
            await kms.close()
    finally:
        await runner.cleanup()
    assert len(seen) == 1  # the redirect was not followed, so the token went nowhere else
    assert seen[-1]["X-Vault-Token"] == "s.secret"
    assert seen[-1]["X-Vault-Namespace"] == "team/a"


def test_config_show_names_sources_not_the_token() -> None:
    environ = {"BAO_ADDR": "https://vault:8200", "VAULT_TOKEN": "s.secret", "VAULT_CACERT": "/ca"}
    shown = describe_vault_credentials(Settings(), environ)
    assert "s.secret" not in shown
    assert "VAULT_TOKEN (value redacted)" in shown
    assert "BAO_ADDR=https://vault:8200" in shown
    assert "VAULT_CACERT=/ca" in shown
    shown = describe_vault_credentials(Settings(vault_token_file="/run/token"), {})
    assert "VAULT_ADDR not set" in shown
    assert "ENVPIPE_VAULT_TOKEN_FILE=/run/token" in shown
