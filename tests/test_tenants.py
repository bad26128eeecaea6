"""Per-record key selection through real workers, once per provider (about 45 s in all).

`ENVPIPE_KMS_KEY_ID` holds `{header:tenant}`; each tenant has a wrapping key of its own (an
alias on moto, a transit key on OpenBao, a labelled AES object on SoftHSM2), gets DEKs and
signed headers of its own, and readers allow the tenant keys by listing them (aws) or by an
id prefix ending in `*` (vault, pkcs11). Records whose placeholder cannot be filled go to the
encrypt DLQ as `key_unresolved`; a tenant without a key is `key_unavailable`; tombstones pass
through as tombstones whatever their headers. `Tenants` is shared with test_shredding.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from pipeline.config import load_settings
from pipeline.decryptor import Decryptor
from pipeline.envelope import decode_header
from pipeline.errors import DecryptionError
from pipeline.kms import open_kms
from pipeline.kms.pkcs11_uri import canonical_key_uri
from tests import kit
from tests.kit import IDLE, Rec, Workers
from tests.providers import Hsm
from workers.dev import DevEnv, openbao, softhsm

#: Creates or destroys labelled AES keys on a SoftHSM2 token, in a child interpreter, so this
#: process's own PKCS#11 login state (shared by all its sessions) is never touched.
_HSM_ADMIN = """
import sys, pkcs11
from pkcs11 import Attribute, KeyType, MechanismFlag
module, token, action, *labels = sys.argv[1:]
with pkcs11.lib(module).get_token(token_label=token).open(
    rw=True, user_pin=sys.stdin.readline().rstrip("\\n")
) as session:
    for label in labels:
        if action == "create":
            session.generate_key(
                KeyType.AES, 256, label=label, store=True,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
            )
            continue
        found = list(session.get_objects({Attribute.LABEL: label}))
        if not found:
            raise SystemExit(f"no object labelled {label}")
        for obj in found:
            obj.destroy()
"""


@dataclass(frozen=True)
class Tenants:
    """Wrapping keys of a few tenants on one provider, named `tenant-<tag>-<tenant>`."""

    env: DevEnv
    tag: str
    #: tenant -> the canonical id its envelopes carry
    canonical: dict[str, str]
    hsm: Hsm | None = None

    @property
    def template(self) -> str:
        """ENVPIPE_KMS_KEY_ID: the tenant comes from the record's `tenant` header."""
        prefix = f"tenant-{self.tag}-"
        return {
            "aws": f"alias/{prefix}{{header:tenant}}",
            "vault": f"vault:transit:{prefix}{{header:tenant}}",
            "pkcs11": f"pkcs11:object={prefix}{{header:tenant}}",
        }[self.env.provider]

    @property
    def allowlist(self) -> str:
        """ENVPIPE_ALLOWED_KMS_KEYS: aws lists the ARNs, the others allow a `*` prefix."""
        if self.env.provider == "aws":
            return ",".join(self.canonical.values())
        some = next(iter(self.canonical.values()))
        return some[: some.index(f"tenant-{self.tag}-") + len(f"tenant-{self.tag}-")] + "*"

    @classmethod
    async def create(
        cls, request: pytest.FixtureRequest, env: DevEnv, names: Sequence[str]
    ) -> Tenants:
        tag = uuid4().hex[:8]
        labels = {name: f"tenant-{tag}-{name}" for name in names}
        if env.provider == "aws":
            async with kit.moto(env) as (_, client):
                canonical = {}
                for name, label in labels.items():
                    arn = (await client.create_key(Description=label))["KeyMetadata"]["Arn"]
                    await client.create_alias(AliasName=f"alias/{label}", TargetKeyId=arn)
                    canonical[name] = arn
            return cls(env, tag, canonical)
        if env.provider == "vault":
            for label in labels.values():
                await asyncio.to_thread(
                    vault_api(env).call, "POST", f"transit/keys/{label}", {"type": "aes256-gcm96"}
                )
            return cls(env, tag, {n: f"vault:transit:{label}" for n, label in labels.items()})
        hsm: Hsm = request.getfixturevalue("hsm")
        tenants = cls(
            env,
            tag,
            {
                name: canonical_key_uri(softhsm.TOKEN_LABEL, label, "secret-key")
                for name, label in labels.items()
            },
            hsm,
        )
        await tenants._hsm("create", *labels.values())
        return tenants

    async def destroy(self, name: str) -> None:
        """Crypto-shred one tenant: Vault's hard delete, or the HSM object destroyed."""
        label = f"tenant-{self.tag}-{name}"
        if self.env.provider == "vault":
            api = vault_api(self.env)
            await asyncio.to_thread(
                api.call, "POST", f"transit/keys/{label}/config", {"deletion_allowed": True}
            )
            await asyncio.to_thread(api.call, "DELETE", f"transit/keys/{label}")
        elif self.env.provider == "pkcs11":
            await self._hsm("destroy", label)
        else:
            raise AssertionError("moto does not refuse deleted keys: see test_shredding's proxy")

    async def _hsm(self, action: str, *labels: str) -> None:
        assert self.hsm is not None
        argv = [sys.executable, "-c", _HSM_ADMIN, self.hsm.module, softhsm.TOKEN_LABEL]
        done = await asyncio.to_thread(
            subprocess.run,
            [*argv, action, *labels],
            input=self.hsm.pin + "\n",
            env={**self.env.as_environ(), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]


def vault_api(env: DevEnv) -> openbao.Api:
    return openbao.Api(env.variables["VAULT_ADDR"], env.variables["VAULT_TOKEN"])


async def open_in_process(
    env: DevEnv, allowed_kms_keys: str, envelopes: Sequence[Any]
) -> list[bytes | DecryptionError]:
    """Open consumed envelopes with a reader in this process that has its own allowlist."""
    environ = {**env.as_environ(), "ENVPIPE_ALLOWED_KMS_KEYS": allowed_kms_keys}
    settings = load_settings(environ=environ)
    kms = await open_kms(settings, environ)
    try:
        reader = await Decryptor.from_settings(kms, settings)
        return await reader.open_many([(r.value, r.key) for r in envelopes])
    finally:
        await kms.close()


def tenant(name: str) -> tuple[tuple[str, bytes], ...]:
    return (("tenant", name.encode()),)


def tenant_records(tenants: Sequence[str], per_tenant: int) -> list[Rec]:
    """Interleaved records of each tenant, unique keys, `tenant` header among others."""
    records = kit.keyed(per_tenant * len(tenants), 150, prefix="t")
    return [
        Rec(r.key, r.value, (("trace", r.key or b""), *tenant(tenants[i % len(tenants)])))
        for i, r in enumerate(records)
    ]


@pytest.mark.timeout(120)
async def test_each_tenant_gets_its_own_key_and_unfillable_records_are_dead_lettered(
    request: pytest.FixtureRequest, provider_env: DevEnv, provider_workers: Workers
) -> None:
    env, bootstrap = provider_env, provider_env.bootstrap_servers
    tenants = await Tenants.create(request, env, ["acme", "globex", "initech"])
    plain, enc, edlq, dec, ddlq = (
        kit.name(f"tenants-{part}") for part in ("plain", "enc", "edlq", "dec", "ddlq")
    )
    await kit.create_topic(bootstrap, plain)
    good = tenant_records(list(tenants.canonical), 200)
    bad = [
        *(("key_unresolved", Rec(f"nohdr-{i}".encode(), b"no tenant header")) for i in range(8)),
        *(("key_unresolved", Rec(f"evil-{i}".encode(), b"v", tenant("../acme"))) for i in range(3)),
        *(("key_unresolved", Rec(f"empty-{i}".encode(), b"v", tenant(""))) for i in range(2)),
        *(("key_unavailable", Rec(f"ghost-{i}".encode(), b"v", tenant("ghost"))) for i in range(5)),
    ]
    tombstones = [
        *(Rec(f"gone-{i}".encode(), None) for i in range(6)),  # no header: still a tombstone
        *(Rec(f"gone-acme-{i}".encode(), None, tenant("acme")) for i in range(3)),
        Rec(None, None),
    ]
    produced: list[tuple[str, Rec]] = [("", r) for r in good]
    for index, item in enumerate([*bad, *(("", r) for r in tombstones)]):
        produced.insert(index * 37 % len(produced), item)  # interleaved with the good ones
    metadata = await kit.produce(bootstrap, plain, [r for _, r in produced])

    encrypt = await provider_workers.encrypt(
        plain,
        enc,
        kit.name("g"),
        "--dlq",
        edlq,
        "--stop-when-idle",
        IDLE,
        name="enc",
        ENVPIPE_KMS_KEY_ID=tenants.template,
    )
    assert await encrypt.wait(90) == 0, encrypt.tail()
    kit.assert_dead_letters_by_source(await kit.read(bootstrap, edlq), produced, metadata, plain)
    sealed = await kit.read(bootstrap, enc)
    assert len(sealed) == len(good) + len(tombstones)
    assert Counter(r.key for r in sealed if r.value is None) == Counter(r.key for r in tombstones)
    deks: defaultdict[str, set[bytes]] = defaultdict(set)
    for record in sealed:
        if record.value is not None:
            header, _ = decode_header(record.value)
            name = dict(record.headers)["tenant"].decode()
            assert header.kms_key_id == tenants.canonical[name]
            deks[name].add(header.dek_id)
    assert set(deks) == set(tenants.canonical)
    assert not set.intersection(*deks.values())  # each tenant's DEKs are its own
    stats = encrypt.stats()
    assert stats["dlq_reasons"] == dict(Counter(reason for reason, _ in bad))
    assert stats["records_in"] == stats["records_out"] + stats["dlq"] == len(produced)

    decrypt = await provider_workers.decrypt(
        enc,
        dec,
        ddlq,
        kit.name("g"),
        "--stop-when-idle",
        IDLE,
        name="dec",
        ENVPIPE_ALLOWED_KMS_KEYS=tenants.allowlist,
    )
    assert await decrypt.wait(90) == 0, decrypt.tail()
    expected = [r for reason, r in produced if not reason]
    assert Counter(map(strip_version, await kit.read(bootstrap, dec))) == Counter(expected)
    assert await kit.count(bootstrap, ddlq) == 0

    # A reader that allows one tenant's key opens that tenant's records only.
    opened = await open_in_process(env, tenants.canonical["acme"], [r for r in sealed if r.value])
    verdicts = Counter(
        ("opened" if isinstance(o, bytes) else o.reason.value, dict(r.headers)["tenant"])
        for o, r in zip(opened, [r for r in sealed if r.value], strict=True)
    )
    assert verdicts == {
        ("opened", b"acme"): 200,
        ("key_not_allowed", b"globex"): 200,
        ("key_not_allowed", b"initech"): 200,
    }


def strip_version(record: Any) -> Rec:
    return Rec(record.key, record.value, tuple(record.headers))


@pytest.mark.parametrize("provider_env", ["aws"], indirect=True)
async def test_a_small_encrypt_cache_still_seals_every_tenant(
    request: pytest.FixtureRequest, provider_env: DevEnv, provider_workers: Workers
) -> None:
    """More tenants than `ENVPIPE_ENCRYPT_CACHE_SIZE`: evictions cost DEKs, never records."""
    env, bootstrap = provider_env, provider_env.bootstrap_servers
    tenants = await Tenants.create(request, env, [f"t{i}" for i in range(6)])
    plain, enc = kit.name("small-plain"), kit.name("small-enc")
    await kit.create_topic(bootstrap, plain)
    records = tenant_records(list(tenants.canonical), 50)
    await kit.produce(bootstrap, plain, records)
    encrypt = await provider_workers.encrypt(
        plain,
        enc,
        kit.name("g"),
        "--stop-when-idle",
        IDLE,
        name="enc",
        ENVPIPE_KMS_KEY_ID=tenants.template,
        ENVPIPE_ENCRYPT_CACHE_SIZE="2",
        ENVPIPE_BATCH_MAX_RECORDS="60",
    )
    assert await encrypt.wait(90) == 0, encrypt.tail()
    sealed = await kit.read(bootstrap, enc)
    assert len(sealed) == len(records)
    stats = encrypt.stats()
    assert stats["cache"]["evict"] > 0
    # Interleaved tenants through a 2-entry LRU: many more DEKs than tenants.
    dek_ids = {decode_header(r.value)[0].dek_id for r in sealed}
    assert stats["kms_calls"]["generate_data_key"] == len(dek_ids) > len(tenants.canonical)
    opened = await open_in_process(env, tenants.allowlist, sealed)
    assert Counter(opened) == Counter(r.value for r in records)


def test_the_tenants_benchmark_writes_its_figures(tmp_path: Path) -> None:
    """`python -m benchmarks.tenants` at toy size: every case runs and the JSON has its shape
    (the figures themselves come from the full run; see docs/lifecycle.md)."""
    done = subprocess.run(
        [
            *(sys.executable, "-m", "benchmarks.tenants", "--records", "300"),
            *("--tenants", "20", "--out", str(tmp_path)),
        ],
        cwd=kit.REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    document = json.loads((tmp_path / "tenants.json").read_text())
    cases = {case["case"]: case for case in document["cases"]}
    assert set(cases) == {"fits", "default", "default_random"}
    assert cases["fits"]["deks"] == cases["default"]["deks"] == 20  # 20 tenants fit both
    assert all(case["rss_peak_mib"] >= case["rss_start_mib"] > 0 for case in cases.values())
    assert document["quota_arithmetic"]
