"""Issue 5: no DEK, no AWS credential and no payload byte in anything a run leaves behind.

The DEKs are taken from the KMS side: the fault proxy sits between the workers and the KMS
emulator and keeps the `Plaintext` of every GenerateDataKey and Decrypt answer. The
credentials are distinctive values given to the workers through the standard AWS variables
only. Then every byte the run produced is searched for them, in the encodings a careless log
line would use (raw, base64, hex, Python's bytes repr, and that repr escaped once more by a
JSON log formatter), and for the payload marker:

    worker logs (stdout + stderr, DEBUG)   no DEK, no credential, no marker
    stats files, `envpipe inspect` output  no DEK, no credential, no marker
    encrypted topic (keys, values, headers of what the encrypt worker wrote)
                                           no DEK, no credential, no marker
    decrypt DLQ                            no DEK, no credential; the marker only inside the
                                           value of a record that was plaintext when it was
                                           injected (the DLQ keeps original bytes, so that is
                                           the injected record itself); an envelope in the DLQ
                                           is its original encrypted bytes, without the marker
    decrypted topic                        no DEK, no credential (plaintext is its job)

The run provokes the error paths too: a KMS outage (throttled, then failing) while the
encrypt worker needs a fresh DEK, a decrypt worker that starts while the KMS fails, and bad
records of every kind going to the DLQ.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.rigs.kms_proxy import KmsFaultProxy, Mode
from tests import kit
from tests.kit import MARKER, REPO, Proc, Rec, Tail, Workers
from workers.contract import SOURCE_HEADER
from workers.dev import DevEnv
from workers.runtime import JSON_LOG_FIELDS, JsonFormatter

# Distinctive credentials. The access key id is not 20 upper-case characters, so moto keeps
# its default account and the dev keys stay visible (see workers/dev.py).
ACCESS_KEY_ID = "leakcheck-akid-6b1f9e"
SECRET_ACCESS_KEY = "leakcheck-secret-0c7d2a94e1b3f5a8"
SESSION_TOKEN = "leakcheck-token-93e0b7c4d2a1f6e8"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
    "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
    "AWS_SESSION_TOKEN": SESSION_TOKEN,
}
TEXT_FORMATTER = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


# --- what to look for, and where -------------------------------------------------------------


class DekTap:
    """Every plaintext DEK the KMS handed out through the proxy, by operation."""

    def __init__(self) -> None:
        self.by_operation: dict[str, set[bytes]] = {"GenerateDataKey": set(), "Decrypt": set()}
        self.calls: Counter[str] = Counter()

    def __call__(self, operation: str, request: bytes, response: bytes) -> None:
        self.calls[operation] += 1
        if operation in self.by_operation:
            plaintext = json.loads(response).get("Plaintext")
            if plaintext:
                self.by_operation[operation].add(base64.b64decode(plaintext))

    @property
    def deks(self) -> set[bytes]:
        return set().union(*self.by_operation.values())


def _forms(secret: bytes) -> Iterator[tuple[str, bytes]]:
    """The encodings a leaked value would show up in, whole and by halves."""
    yield "base64", base64.b64encode(secret)
    yield "base64url", base64.urlsafe_b64encode(secret).rstrip(b"=")
    half = len(secret) // 2
    for part, piece in (("", secret), ("head-", secret[:half]), ("tail-", secret[half:])):
        inner = repr(piece)[2:-1]  # b'\x12...' as %s or %r would print it
        yield f"{part}raw", piece
        yield f"{part}hex", piece.hex().encode()
        yield f"{part}HEX", piece.hex().upper().encode()
        yield f"{part}repr", inner.encode()
        yield f"{part}repr-in-json", json.dumps(inner)[1:-1].encode()


def _marker_forms() -> Iterator[tuple[str, bytes]]:
    """The marker raw, in hex and in base64 at each of the three alignments."""
    yield "marker", MARKER
    yield "marker-hex", MARKER.hex().encode()
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + MARKER)
        yield f"marker-base64/{shift}", encoded[4 : 4 * (len(encoded) // 4 - 1)]


def needles(deks: Iterable[bytes], *, marker: bool) -> dict[str, bytes]:
    """Search terms by name: each DEK in every form, the credentials, maybe the marker."""
    found: dict[str, bytes] = {}
    for number, dek in enumerate(sorted(deks)):
        for form, text in _forms(dek):
            found[f"DEK#{number}/{form}"] = text
    for name, value in CREDENTIALS.items():
        found[name] = value.encode()
        found[f"{name}/base64"] = base64.b64encode(value.encode())
    if marker:
        found.update(_marker_forms())
    return found


def search(haystack: bytes, terms: dict[str, bytes]) -> list[str]:
    return [name for name, text in terms.items() if text and text in haystack]


def record_bytes(record: Any, *, value: bool = True) -> bytes:
    parts = [record.key or b"", *(name.encode() + b"=" + data for name, data in record.headers)]
    if value:
        parts.append(record.value or b"")
    return b"\n".join(parts)


# --- the search itself must be able to fail ---------------------------------------------------


def _log_lines(dek: bytes) -> Iterator[str]:
    """A DEK logged carelessly, through the workers' own formatters."""
    for message, args in (
        ("unwrapped %s", (dek,)),
        ("unwrapped %r", (dek,)),
        ("dek=%s", (base64.b64encode(dek).decode(),)),
        ("dek=%s", (dek.hex(),)),
        ("half=%s", (dek[:16],)),
    ):
        record = logging.LogRecord("envpipe.test", logging.DEBUG, __file__, 1, message, args, None)
        yield TEXT_FORMATTER.format(record)
        yield JsonFormatter().format(record)


def test_the_search_finds_planted_secrets() -> None:
    dek = bytes(range(200, 232))
    terms = needles([dek], marker=True)
    for line in _log_lines(dek):
        assert search(line.encode(), terms), line
    assert search(f"x {SECRET_ACCESS_KEY} y".encode(), terms) == ["AWS_SECRET_ACCESS_KEY"]
    for prefix in (b"", b"a", b"ab"):  # the marker inside a base64'd payload, any alignment
        assert search(base64.b64encode(prefix + MARKER + b"tail"), terms)
    assert search(b"nothing to see here", terms) == []


# --- the end-to-end run ----------------------------------------------------------------------


async def _until(condition: Any, what: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened within {within}s: {what}")
        await asyncio.sleep(0.1)


async def _episode(proxy: KmsFaultProxy, proc: Proc, modes: Iterable[Mode]) -> None:
    """Fail the KMS in each mode until the worker has felt it and said so; then let it pass."""
    for mode in modes:
        before = proc.log.read_text(errors="replace").count("retry")
        await proxy.set_mode(mode)

        def hit(mode: Mode = mode) -> bool:
            return proxy.count(mode) > 0

        def retried(before: int = before) -> bool:
            return proc.log.read_text(errors="replace").count("retry") > before

        await _until(hit, f"a KMS call during {mode}")
        await _until(retried, f"{proc.name} logging a retry during {mode}")
    await proxy.set_mode("pass")


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_no_secret_or_payload_in_logs_stats_dlq_or_topics(
    dev_env: DevEnv, workers: Workers, tmp_path: Path, log_format: str
) -> None:
    bootstrap = dev_env.bootstrap_servers
    plain, enc, dec, dlq = (kit.name(f"leak-{part}") for part in ("plain", "enc", "dec", "dlq"))
    await kit.create_topic(bootstrap, plain)
    await kit.create_topic(bootstrap, enc)
    originals = kit.keyed(5_000, 300, prefix="leak-")
    first, second = originals[:3_000], originals[3_000:]
    environment = {
        **CREDENTIALS,
        "ENVPIPE_LOG_LEVEL": "DEBUG",
        "ENVPIPE_LOG_FORMAT": log_format,
        "ENVPIPE_KMS_RETRY_MAX_SECONDS": "0.5",
    }
    tap = DekTap()
    async with KmsFaultProxy(dev_env.kms_endpoint) as proxy:
        proxy.observer = tap
        environment["ENVPIPE_KMS_ENDPOINT"] = proxy.endpoint

        # Encrypt, with a KMS outage just when a fresh DEK is due (1,000 records per DEK).
        await kit.produce(bootstrap, plain, first)
        encrypt = await workers.encrypt(
            plain,
            enc,
            kit.name("g"),
            "--stop-when-idle",
            "4",
            name="encrypt",
            ENVPIPE_DEK_MAX_RECORDS="1000",
            ENVPIPE_DEK_GRACE_SECONDS="0",
            **environment,
        )
        async with Tail(bootstrap, enc) as tail:
            await tail.wait_for(len(first), within=60)
            await proxy.set_mode("throttle")
            await kit.produce(bootstrap, plain, second)
            await _episode(proxy, encrypt, ["throttle", "internal"])
        assert await encrypt.wait(90) == 0, encrypt.tail()

        # Bad records of every kind, made from what the worker wrote.
        sealed = await kit.read(bootstrap, enc)
        sample = sealed[0]
        async with kit.moto(dev_env, proxy.endpoint) as (kms, _):

            async def sign(message: bytes) -> bytes:
                return await kms.sign(
                    dev_env.signing_key_canonical, message, hashlib.sha256(message).digest()
                )

            bad_dek = await kit.forge(sample.value, sign=sign, wrapped_dek=b"\x01" * 150)
        bad = [
            (
                "bad_tag",
                Rec(
                    b"bad-tampered",
                    kit.flip(sample.value, len(sample.value) - 1),
                    tuple(sample.headers),
                ),
            ),
            ("bad_tag", Rec(b"bad-moved", sample.value, tuple(sample.headers))),
            ("unwrap_failed", Rec(b"bad-dek", bad_dek, tuple(sample.headers))),
            ("bad_signature", Rec(b"bad-sig", await kit.forge(sample.value, dek_id=bytes(16)))),
            # "P" (0x50) reads as Avro varint 40: a plausible future version, so the code
            # says unknown_version, not malformed
            ("unknown_version", Rec(b"bad-plaintext", MARKER + b" injected as is", ())),
            ("malformed", Rec(b"bad-json", b'{"note": "' + MARKER + b'"}', ())),
        ]
        metadata = await kit.produce(bootstrap, enc, [rec for _, rec in bad])

        # Decrypt, starting while the KMS fails.
        await proxy.set_mode("internal")
        decrypt = await workers.decrypt(
            enc, dec, dlq, kit.name("g"), "--stop-when-idle", "4", name="decrypt", **environment
        )
        await _episode(proxy, decrypt, ["internal"])
        assert await decrypt.wait(90) == 0, decrypt.tail()

        inspect = await workers.start(
            "inspect",
            "--topic",
            enc,
            "--limit",
            "100000",
            *(["--json"] if log_format == "json" else []),
            name="inspect",
            **environment,
        )
        assert await inspect.wait(60) == 0, inspect.tail()

    # The run did what it should, and the tap saw the DEKs it handed out.
    assert {r.key for r in sealed} == {r.key for r in originals}
    opened = await kit.read(bootstrap, dec)
    assert Counter((r.key, r.value) for r in opened) == Counter((r.key, r.value) for r in originals)
    letters = await kit.read(bootstrap, dlq)
    records = [*(("", Rec(r.key, r.value)) for r in sealed), *bad]
    kit.assert_dead_letters_by_source(letters, records, [*sealed, *metadata], enc)
    generated, unwrapped = tap.by_operation["GenerateDataKey"], tap.by_operation["Decrypt"]
    assert len(generated) >= len(originals) // 1_000, tap.calls
    assert unwrapped, "no DEK captured from a Decrypt answer"
    assert unwrapped <= generated  # the decrypt worker unwrapped the encrypt worker's DEKs
    assert all(len(dek) == 32 for dek in tap.deks)
    assert proxy.count("throttle") > 0
    assert proxy.count("internal") > 0

    # Now search everything.
    secret = needles(tap.deks, marker=False)
    everything = needles(tap.deks, marker=True)
    leaks: dict[str, list[str]] = {}

    def check(where: str, haystack: bytes, terms: dict[str, bytes]) -> None:
        if found := search(haystack, terms):
            leaks[where] = found

    files = sorted(tmp_path.glob("*.log")) + sorted(tmp_path.glob("*.json"))  # noqa: ASYNC240
    assert {path.name for path in files} >= {"encrypt.log", "decrypt.log", "encrypt.json"}
    if log_format == "json":  # the format was really applied: every worker line is JSON
        for path in (encrypt.log, decrypt.log):
            lines = path.read_text().splitlines()
            assert lines
            assert all(set(JSON_LOG_FIELDS) <= set(json.loads(line)) for line in lines)
    for path in files:
        check(path.name, path.read_bytes(), everything)
    for record in sealed:  # everything the encrypt worker wrote
        check(f"{enc}/{record.partition}/{record.offset}", record_bytes(record), everything)
    injected = {  # the DLQ keeps original bytes: plaintext injected as is may stay plaintext
        f"{enc}/{meta.partition}/{meta.offset}"
        for (_, rec), meta in zip(bad, metadata, strict=True)
        if MARKER in rec.value
    }
    for letter in letters:
        where = f"dlq<-{dict(letter.headers)[SOURCE_HEADER].decode()}"
        plaintext_allowed = where.removeprefix("dlq<-") in injected
        check(where, record_bytes(letter, value=not plaintext_allowed), everything)
        check(where + " value", letter.value or b"", secret)
    for record in opened:
        check(f"{dec}/{record.partition}/{record.offset}", record_bytes(record), secret)
    summary = {
        "log_format": log_format,
        "deks_captured": len(tap.deks),
        "searched_files": [path.name for path in files],
        "log_bytes": sum(path.stat().st_size for path in files),
        "kms_calls_through_proxy": dict(tap.calls),
        "faults": {mode: proxy.count(mode) for mode in ("throttle", "internal")},
        "dead_letters": dict(Counter(dict(r.headers)["envpipe.error"].decode() for r in letters)),
        "leaks": leaks,
    }
    (tmp_path / "secrets-summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nsecrets ({log_format}): {json.dumps(summary)}")
    assert not leaks


# --- credentials and `envpipe config show` ---------------------------------------------------


def _cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "PYTHONPATH": str(REPO),
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_config_show_never_prints_credentials(tmp_path: Path) -> None:
    """Credentials from the environment and from a shared credentials file stay out of it."""
    config = tmp_path / "envpipe.toml"
    config.write_text(
        "[envpipe]\n"
        'kms_key_id = "alias/from-toml"\n'
        'kms_endpoint = "http://127.0.0.1:4566"\n'
        'log_level = "DEBUG"\n'
    )
    profile = tmp_path / "credentials"
    profile.write_text(
        "[default]\n"
        "aws_access_key_id = leakcheck-profile-akid-41d2\n"
        "aws_secret_access_key = leakcheck-profile-secret-7f30c9a1\n"
    )
    terms = {
        **needles([], marker=False),
        "profile key id": b"leakcheck-profile-akid-41d2",
        "profile secret": b"leakcheck-profile-secret-7f30c9a1",
    }
    shown = _cli(
        tmp_path,
        "config",
        "show",
        "--config",
        str(config),
        ENVPIPE_SIGNING_KEY_ID="alias/from-env",
        AWS_SHARED_CREDENTIALS_FILE=str(profile),
        **CREDENTIALS,
    )
    assert shown.returncode == 0, shown.stderr
    output = shown.stdout + shown.stderr
    assert "alias/from-toml" in output  # both sources were read
    assert "alias/from-env" in output
    assert search(output.encode(), terms) == []
    assert "leakcheck" not in output


def test_credentials_are_not_settings_and_a_refusal_does_not_echo_them(tmp_path: Path) -> None:
    """Only the AWS chain supplies credentials: a TOML file cannot, and saying so must not
    print the value; an ENVPIPE_-prefixed credential variable is simply not a setting."""
    config = tmp_path / "envpipe.toml"
    config.write_text(f'[envpipe]\naws_secret_access_key = "{SECRET_ACCESS_KEY}"\n')
    refused = _cli(tmp_path, "config", "show", "--config", str(config))
    assert refused.returncode == 2
    assert "aws_secret_access_key" in refused.stderr  # names the setting ...
    assert search((refused.stdout + refused.stderr).encode(), needles([], marker=False)) == []

    ignored = _cli(
        tmp_path, "config", "show", ENVPIPE_AWS_SECRET_ACCESS_KEY=SECRET_ACCESS_KEY, **CREDENTIALS
    )
    assert ignored.returncode == 0, ignored.stderr
    assert search((ignored.stdout + ignored.stderr).encode(), needles([], marker=False)) == []
