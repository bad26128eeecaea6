"""The `envpipe` command line. Thin: it parses, loads settings, and hands off to a module.

Every setting in `pipeline.config.Settings` is also a flag on the commands that use it
(`--dek-max-age-seconds`, ...), so precedence is flags > `ENVPIPE_*` environment > TOML
(`--config`) > defaults, as the contract fixes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import click

from pipeline.config import Settings, describe_settings, load_settings_explained
from pipeline.credentials import describe_credentials, redact_url
from pipeline.errors import EnvpipeError

F = TypeVar("F", bound=Callable[..., Any])


def settings_options(command: F) -> F:
    """Add `--config` and one flag per setting; the command receives `settings: Settings`."""
    helps = {env: (default, text) for env, default, text in describe_settings()}
    for spec in reversed(fields(Settings)):
        default, text = helps["ENVPIPE_" + spec.name.upper()]
        command = click.option(
            "--" + spec.name.replace("_", "-"),
            spec.name,
            default=None,
            help=f"{text} [env ENVPIPE_{spec.name.upper()}; default {default or 'unset'}]",
            metavar="VALUE",
        )(command)
    return click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="TOML file with settings (flags and ENVPIPE_* variables win over it).",
    )(command)


def build_settings(options: dict[str, Any]) -> Settings:
    """Pop the setting flags out of a command's options and load validated Settings."""
    return build_settings_explained(options)[0]


def build_settings_explained(options: dict[str, Any]) -> tuple[Settings, dict[str, str]]:
    """`build_settings`, plus where each value came from."""
    names = {spec.name for spec in fields(Settings)}
    flags = {name: options.pop(name) for name in list(options) if name in names}
    return load_settings_explained(flags, config_file=options.pop("config_file", None))


class _Group(click.Group):
    """Turn envpipe errors into one clear line and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EnvpipeError as exc:
            click.echo(f"envpipe: error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="envpipe")
def main() -> None:
    """Envelope encryption for Kafka, with keys held by a KMS.

    Start with `envpipe demo`. For a local broker and KMS: `envpipe dev up --state-dir DIR`,
    then `source DIR/dev.env`.
    """


_KMS_OPTION = click.option(
    "--kms",
    type=click.Choice(["aws", "vault", "pkcs11"]),
    default="aws",
    show_default=True,
    help="Cryptography service: moto (AWS KMS), OpenBao (Vault transit) or SoftHSM2 (PKCS#11).",
)
_BROKER_OPTION = click.option(
    "--broker",
    type=click.Choice(["tansu", "kafka"]),
    default="tansu",
    show_default=True,
    help="Broker: embedded Tansu, or Apache Kafka in KRaft mode (needs Java 17 and Maven).",
)


@main.group()
def dev() -> None:
    """Embedded broker (Tansu or Apache Kafka) and cryptography service on loopback, for work."""


@dev.command("up")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@_KMS_OPTION
@_BROKER_OPTION
@click.option("--broker-port", type=int, default=None, help="Broker port (default: a free one).")
@click.option("--kms-port", type=int, default=None, help="Service port (default: a free one).")
def dev_up(
    state_dir: Path, kms: str, broker: str, broker_port: int | None, kms_port: int | None
) -> None:
    """Start the services, create the dev keys and write STATE_DIR/dev.env."""
    from workers import dev as services

    env = services.up(state_dir, kms=kms, broker=broker, broker_port=broker_port, kms_port=kms_port)
    pids = ", ".join(f"{name} pid {pid}" for name, pid in env.pids.items()) or "no processes"
    click.echo(f"broker      {env.bootstrap_servers}  ({env.broker})")
    click.echo(f"kms         {env.provider}  ({pids})")
    click.echo(f"wrapping    {env.kms_key_id} = {env.kms_key_canonical}")
    click.echo(f"signing     {env.signing_key_id} = {env.signing_key_canonical}")
    click.echo(f"environment source {state_dir / 'dev.env'}")


@dev.command("down")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
def dev_down(state_dir: Path) -> None:
    """Stop the services started by `dev up` with this state dir (idempotent)."""
    from workers import dev as services

    stopped = services.down(state_dir)
    click.echo("stopped" if stopped else "nothing was running")


_STOP_WHEN_IDLE = click.option(
    "--stop-when-idle",
    type=click.FloatRange(min=0.1),
    default=None,
    metavar="SECONDS",
    help="Finish, commit and exit 0 once no record has arrived for SECONDS.",
)


def worker_options(
    reads: str, writes: str, *, dlq_required: bool, dlq_help: str
) -> Callable[[F], F]:
    """The flags every stream worker shares: topics, group, DLQ, idle stop and settings."""

    def decorate(command: F) -> F:
        command = settings_options(command)
        for option in reversed(
            (  # click lists the last-applied option first
                click.option("--source", required=True, help=f"{reads} topic to read."),
                click.option("--dest", required=True, help=f"{writes} topic to write."),
                click.option(
                    "--group", required=True, help="Consumer group id (share it to scale out)."
                ),
                # No `default=None` here: with it, click 8.3 treats a required flag as given.
                click.option("--dlq", required=dlq_required, help=dlq_help),
                _STOP_WHEN_IDLE,
            )
        ):
            command = option(command)
        return command

    return decorate


@main.command()
@worker_options(
    "Plaintext",
    "Encrypted",
    dlq_required=False,
    dlq_help=(
        "Dead-letter topic for records that cannot be sealed. It holds their PLAINTEXT: "
        "protect it like the source topic."
    ),
)
@click.option("--stream", default=None, help="Stream name in the encryption context [source].")
def encrypt(**options: Any) -> None:
    """Consume plaintext records, seal each value, produce envelopes (at-least-once)."""
    from workers import stream

    settings = build_settings(options)
    sys.exit(stream.run_encrypt(settings, **options))


@main.command()
@worker_options(
    "Encrypted",
    "Plaintext",
    dlq_required=True,
    dlq_help="Dead-letter topic for records that cannot be opened.",
)
def decrypt(**options: Any) -> None:
    """Consume envelopes, verify and open them, produce plaintext; failures go to --dlq."""
    from workers import stream

    settings = build_settings(options)
    sys.exit(stream.run_decrypt(settings, **options))


@main.command()
@worker_options(
    "Encrypted",
    "Encrypted",
    dlq_required=True,
    dlq_help="Dead-letter topic for records that cannot be opened or sealed again "
    "(their original bytes and the reason).",
)
@click.option(
    "--to-key",
    required=True,
    metavar="KEY",
    help="Wrapping key to seal under: ARN or alias, vault:MOUNT:NAME or pkcs11: URI "
    "(a template with {header:NAME} or {key} works too).",
)
def rewrap(**options: Any) -> None:
    """Re-encrypt a topic under another key: open each envelope (the reader's allowlists
    apply) and seal it again under --to-key, keeping its encryption context, key, timestamp
    and headers. At-least-once, with progress and a summary; written in ENVPIPE_FORMAT."""
    from workers import stream

    settings = build_settings(options)
    sys.exit(stream.run_rewrap(settings, **options))


@main.command()
@click.option("--topic", required=True, help="Encrypted topic to read (no group, no commit).")
@click.option("--limit", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per record.")
@settings_options
def inspect(**options: Any) -> None:
    """Show envelope headers and check signatures. Never decrypts a payload."""
    from workers import inspect as inspector

    settings = build_settings(options)
    sys.exit(inspector.run(settings, **options))


@main.command()
@click.option("--records", type=click.IntRange(min=1), default=100_000, show_default=True)
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@_KMS_OPTION
@click.option(
    "--format",
    "format_name",
    type=click.Choice(["v1", "v2"]),
    default="v1",
    show_default=True,
    help="Wire format the encrypt worker writes (v2 keeps headers in a keys topic).",
)
@_BROKER_OPTION
def demo(records: int, state_dir: Path | None, kms: str, format_name: str, broker: str) -> None:
    """The whole path on the embedded broker and a service, then a summary table."""
    from workers import demo as demonstration

    sys.exit(
        demonstration.run(
            records=records, state_dir=state_dir, kms=kms, format=format_name, broker=broker
        )
    )


@main.command()
@click.option("--quick", is_flag=True, help="About two minutes instead of about fifteen.")
@click.option("--smoke", is_flag=True, help="Tiny counts for the test suite; figures mean nothing.")
@click.option(
    "--sweep",
    is_flag=True,
    help="Instead: run the encrypt worker over a grid of batch size x processes and print "
    "the best setting for this machine (sweep.json; about 4 minutes, --quick about 2).",
)
@click.option(
    "--memory",
    is_flag=True,
    help="Instead: the worker's RSS under a slow destination and a 500 ms KMS "
    "(memory.json; about 5 minutes, --quick about 2.5).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("bench-results"),
    show_default=True,
    help="Directory for results.json, results.md, details.json and the PNG plots.",
)
def bench(quick: bool, smoke: bool, sweep: bool, memory: bool, out: Path) -> None:
    """Side-by-side benchmarks on the embedded broker and KMS (needs envpipe[bench])."""
    try:
        from benchmarks import memory as rss
        from benchmarks import run as benchmark
        from benchmarks import sweep as grid
    except ImportError as exc:
        raise click.ClickException(
            f"the benchmarks run from a source checkout (benchmarks/ is not in the wheel): {exc}"
        ) from exc
    mode = "smoke" if smoke else "quick" if quick else "full"
    if sweep:
        sys.exit(grid.main(out=out, mode=mode))
    if memory:
        sys.exit(rss.main(["--out", str(out), *(["--quick"] if quick else [])]))
    sys.exit(benchmark.main(out=out, quick=quick, smoke=smoke))


@main.group()
def config() -> None:
    """Inspect configuration."""


@config.command("show")
@settings_options
def config_show(**options: Any) -> None:
    """Print the effective settings and where each came from (flag, environment, TOML).

    Credentials are not shown: for the selected provider, only the names of the credential
    sources that are set (variables, files) are printed, never their values.
    """
    settings, sources = build_settings_explained(options)
    for spec in fields(Settings):
        value = getattr(settings, spec.name)
        if spec.metadata["secret"]:
            shown = "(set, redacted)" if value else ""
        else:
            shown = ",".join(value) if isinstance(value, tuple) else redact_url(str(value))
        click.echo(f"{spec.name:<32} {shown:<40} {sources.get(spec.name, 'default')}")
    click.echo(f"{'credentials':<32} {describe_credentials(settings, os.environ)}")


if __name__ == "__main__":
    main()
