"""Apache Kafka's jars from Maven Central, cached outside the checkout and checked on every use.

`kafka_classpath()` returns a directory holding the broker's runtime jars. The first call runs
Maven on `kafka-pom.xml` (shipped beside this module) with strict checksums, into a temporary
directory that is renamed into place only once complete and hashed, so a half-finished fetch
is never seen. Every later call checks the jars against that manifest (SHA-256 per jar, and
no jar missing or extra); a corrupted or partial cache is fetched again, never used.

    ${XDG_CACHE_HOME:-~/.cache}/envpipe/kafka-<version>/
        *.jar
        SHA256SUMS      "<sha256>  <jar>" lines, written last

Java 17+ and Maven must be installed; without them this fails at once, naming the packages.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import ServiceError
from workers.supervisor import Child, log_tail

__all__ = [
    "KAFKA_VERSION",
    "MANIFEST",
    "POM",
    "cache_dir",
    "java_binary",
    "kafka_classpath",
    "maven_binary",
    "verify",
]

#: The tested release; `ENVPIPE_DEV_KAFKA_VERSION` picks another 4.x (workers.dev.apache_kafka).
KAFKA_VERSION = "4.4.0"
POM = Path(__file__).with_name("kafka-pom.xml")
MANIFEST = "SHA256SUMS"
MIN_JAVA = 17
JAVA_HINT = "install Java 17 or newer (Debian: apt-get install openjdk-17-jre-headless)"
MAVEN_HINT = "install Maven (Debian: apt-get install maven)"
_FETCH_SECONDS = 900.0
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
# `openjdk version "17.0.15" 2025-04-15`, `java version "1.8.0_381"`
_JAVA_VERSION = re.compile(r'version "(?:1\.)?(\d+)')


def java_binary() -> str:
    """The `java` on PATH if it is 17 or newer; else a ServiceError that says what to install."""
    java = shutil.which("java")
    if java is None:
        raise ServiceError(f"Apache Kafka needs Java, and there is no `java` on PATH; {JAVA_HINT}")
    try:
        shown = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        ).stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServiceError(f"`{java} -version` failed ({exc}); {JAVA_HINT}") from exc
    found = _JAVA_VERSION.search(shown)
    if found is None or int(found.group(1)) < MIN_JAVA:
        first = shown.strip().splitlines()[0] if shown.strip() else "no version"
        raise ServiceError(
            f"Apache Kafka 4 needs Java {MIN_JAVA}+, but {java} is {first!r}; {JAVA_HINT}"
        )
    return java


def maven_binary() -> str:
    """The `mvn` on PATH, which fetches the jars; else a ServiceError naming the package."""
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ServiceError(
            f"fetching Apache Kafka's jars needs Maven, and there is no `mvn` on PATH; {MAVEN_HINT}"
        )
    return mvn


def cache_dir(version: str = KAFKA_VERSION, root: Path | None = None) -> Path:
    """Where the jars of `version` live: under `root`, else ${XDG_CACHE_HOME:-~/.cache}/envpipe."""
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = Path(base) / "envpipe"
    return root / f"kafka-{version}"


def kafka_classpath(version: str = KAFKA_VERSION, root: Path | None = None) -> Path:
    """The checked jar directory of Kafka `version`, fetched first if missing or damaged.

    Fails at once without Java 17+ or Maven. Concurrent callers wait for one fetch.
    """
    if not _VERSION.match(version):
        raise ServiceError(f"Kafka version {version!r} is not of the form 4.4.0")
    java_binary()
    target = cache_dir(version, root)
    if verify(target) is None:
        return target
    mvn = maven_binary()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".kafka-{version}.lock"):
        problem = verify(target)  # another process may have fetched it meanwhile
        if problem is None:
            return target
        if target.exists():
            _say(f"the cached Kafka {version} jars in {target} are unusable ({problem}); fetching")
        _fetch(mvn, version, target)
    return target


def verify(directory: Path) -> str | None:
    """None if `directory` holds exactly the jars its manifest lists, unchanged; else why not."""
    expected = _read_manifest(directory)
    if isinstance(expected, str):
        return expected
    present = {path.name for path in directory.glob("*.jar")}
    if missing := sorted(expected.keys() - present):
        return f"{len(missing)} jar(s) missing, e.g. {missing[0]}"
    if extra := sorted(present - expected.keys()):
        return f"{len(extra)} jar(s) not in {MANIFEST}, e.g. {extra[0]}"
    for name, digest in sorted(expected.items()):
        if _sha256(directory / name) != digest:
            return f"{name} does not match its SHA-256 in {MANIFEST}"
    return None


def _read_manifest(directory: Path) -> dict[str, str] | str:
    """The manifest as {jar: sha256}, or why there is no usable one."""
    manifest = directory / MANIFEST
    try:
        lines = manifest.read_text().splitlines()
    except FileNotFoundError:
        return "not fetched yet" if not directory.exists() else f"{MANIFEST} is missing"
    except OSError as exc:
        return f"{manifest} is unreadable ({exc})"
    expected: dict[str, str] = {}
    for line in lines:
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name.endswith(".jar") or "/" in name:
            return f"{MANIFEST} is malformed"
        expected[name] = digest
    return expected or f"{MANIFEST} lists no jars"


def _fetch(mvn: str, version: str, target: Path) -> None:
    """Maven into a temporary sibling directory, hash, then rename it into place."""
    started = time.monotonic()
    _say(
        f"fetching Apache Kafka {version} jars from Maven Central into {target} "
        "(first use only; it can take a minute)"
    )
    staging = Path(tempfile.mkdtemp(prefix=f".kafka-{version}.", dir=target.parent))
    try:
        jars = staging / "jars"
        log = staging / "mvn.log"
        argv = [
            mvn,
            "-q",
            "-B",
            "--strict-checksums",
            "-f",
            str(POM),
            f"-Dkafka.version={version}",
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={jars}",
        ]
        maven = Child.spawn(argv, name="Maven", log=log)
        code = maven.wait_sync(_FETCH_SECONDS)
        if code is None:
            maven.stop_sync()
            raise ServiceError(
                f"Maven did not fetch the Kafka {version} jars within {_FETCH_SECONDS:g} s; "
                f"{log_tail(log)}"
            )
        if code != 0 or not any(jars.glob("*.jar")):
            raise ServiceError(
                f"Maven could not fetch org.apache.kafka:kafka_2.13:{version} (exit code {code}); "
                f"is Maven Central reachable, and is {version} released? {log_tail(log)}"
            )
        manifest = "".join(f"{_sha256(jar)}  {jar.name}\n" for jar in sorted(jars.glob("*.jar")))
        (jars / MANIFEST).write_text(manifest)
        stale = staging / "stale"
        if target.exists():
            target.rename(stale)  # a damaged cache: out of the way, then gone
        jars.rename(target)
        size = sum(jar.stat().st_size for jar in target.glob("*.jar")) / (1 << 20)
        _say(
            f"fetched {manifest.count(chr(10))} jars ({size:.0f} MiB) "
            f"in {time.monotonic() - started:.1f} s"
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as jar:
        while chunk := jar.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One fetch at a time per version, across processes."""
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _say(message: str) -> None:
    """Progress of the slow first fetch, on stderr (stdout may be a pipe someone parses)."""
    print(f"envpipe: {message}", file=sys.stderr, flush=True)
