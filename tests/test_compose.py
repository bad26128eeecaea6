"""The docker-compose deployment, checked without a Docker engine.

Nothing here starts a container or touches the network: each test parses docker-compose.yml,
the Dockerfile or a file the compose file mounts, and checks one thing that `docker compose
up` would otherwise reveal only at run time, or never (a dashboard panel that stays empty).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml

from pipeline.config import CONFIG_FILE_ENV, Settings, env_name, load_settings
from workers.cli import main as envpipe_cli
from workers.dev.apache_kafka import VERSION_ENV as DEV_KAFKA_VERSION_ENV
from workers.metrics import METRIC_FAMILIES

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "envpipe.json"

#: Services the other checks look up by role. Prometheus and Grafana are found by image.
TOPIC_INIT_SERVICE = "kafka-init"
SAMPLE_PRODUCER_SERVICE = "producer"
PROMETHEUS_IMAGE = "prom/prometheus"
GRAFANA_IMAGE = "grafana/grafana"
#: Defaults of those images when the compose file does not override them.
PROMETHEUS_DEFAULT_CONFIG = "/etc/prometheus/prometheus.yml"
GRAFANA_DEFAULT_PROVISIONING = "/etc/grafana/provisioning"

WORKER_COMMANDS = frozenset({"encrypt", "decrypt"})
#: Settings, plus the names the dev tools read (deploy.md tells users about them too).
KNOWN_ENVPIPE_NAMES = frozenset(
    {env_name(spec.name) for spec in dataclasses.fields(Settings)}
    | {CONFIG_FILE_ENV, DEV_KAFKA_VERSION_ENV}
)
ENVPIPE_NAME = re.compile(r"\bENVPIPE_[A-Z0-9_]+")
METRIC_NAME = re.compile(r"\benvpipe_[a-z_]+")
#: Series a histogram or counter family exposes beside its own name.
SERIES_SUFFIX = re.compile(r"_(bucket|sum|count|created)$")
#: Dashboard JSON keys whose string values are PromQL.
EXPRESSION_KEYS = frozenset({"expr", "query", "definition"})

Service = dict[str, Any]


# --- reading the compose file ---------------------------------------------------------------


@pytest.fixture(scope="module")
def services() -> dict[str, Service]:
    compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    found: dict[str, Service] = compose["services"]
    assert found, "docker-compose.yml defines no services"
    return found


@pytest.fixture(scope="module")
def workers(services: dict[str, Service]) -> dict[str, Service]:
    """The services that run `envpipe encrypt` or `envpipe decrypt`."""
    found = {name: service for name, service in services.items() if worker_command(service)}
    assert found, "no service runs an envpipe worker"
    return found


def command_args(service: Service) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command]


def worker_command(service: Service) -> str | None:
    """`encrypt` or `decrypt` if the service runs that envpipe worker (the image's entrypoint)."""
    first = command_args(service)[:1]
    return first[0] if first and first[0] in WORKER_COMMANDS else None


def environment(service: Service) -> dict[str, str]:
    """A service's environment as a map; entries without a value (pass-through) are left out."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(entry.split("=", 1) for entry in raw if "=" in entry)
    return {name: str(value) for name, value in raw.items() if value is not None}


def dependencies(service: Service) -> dict[str, str]:
    """depends_on as {service: condition}; the short list form means `service_started`."""
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return dict.fromkeys(raw, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in raw.items()}


def has_healthcheck(service: Service) -> bool:
    check = service.get("healthcheck")
    return bool(check) and not check.get("disable", False)


def published_ports(service: Service) -> Iterator[tuple[int, str]]:
    """(host port, protocol) for each port published on the host, ranges expanded."""
    for spec in service.get("ports") or []:
        if isinstance(spec, dict):
            published, protocol = spec.get("published"), spec.get("protocol", "tcp")
        else:
            mapping, _, protocol = str(spec).partition("/")
            parts = mapping.rsplit(":", 2)
            published = parts[-2] if len(parts) > 1 else None
        if published in (None, ""):
            continue  # Docker picks a free host port
        low, _, high = str(published).partition("-")
        for port in range(int(low), int(high or low) + 1):
            yield port, protocol or "tcp"


def container_ports(service: Service) -> set[int]:
    ports = {int(str(port).partition("/")[0]) for port in service.get("expose") or []}
    for spec in service.get("ports") or []:
        target = spec.get("target") if isinstance(spec, dict) else str(spec).rsplit(":", 1)[-1]
        ports.add(int(str(target).partition("/")[0]))
    return ports


def bind_mounts(service: Service) -> Iterator[tuple[Path, PurePosixPath]]:
    """(host path, container path) of each bind mount; named volumes are skipped."""
    for spec in service.get("volumes") or []:
        if isinstance(spec, dict):
            if spec.get("type") == "bind":
                yield ROOT / spec["source"], PurePosixPath(spec["target"])
        elif str(spec).startswith((".", "/")):
            source, target = str(spec).split(":")[:2]
            yield ROOT / source, PurePosixPath(target)


def host_path(service: Service, container_path: str) -> Path:
    """Where a path inside the container comes from on the host, through the bind mounts."""
    wanted = PurePosixPath(container_path)
    for source, target in sorted(bind_mounts(service), key=lambda m: -len(m[1].parts)):
        if wanted == target or target in wanted.parents:
            return source / wanted.relative_to(target)
    raise AssertionError(f"{container_path} is not bind-mounted from the repository")


def option_value(args: list[str], option: str, default: str | None = None) -> str | None:
    """The value of `--option VALUE` or `--option=VALUE` in an argument list."""
    for index, arg in enumerate(args):
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
        if arg == option and index + 1 < len(args):
            return args[index + 1]
    return default


def service_by_image(services: dict[str, Service], image: str) -> tuple[str, Service]:
    matches = [(n, s) for n, s in services.items() if str(s.get("image", "")).startswith(image)]
    assert len(matches) == 1, f"expected one service running {image}, found {len(matches)}"
    return matches[0]


def worker_options(service: Service) -> dict[str, Any]:
    """Parse a worker's command with the real CLI: unknown or missing flags raise UsageError."""
    args = command_args(service)
    command = envpipe_cli.commands[args[0]]
    return command.make_context(args[0], args[1:]).params


def worker_settings(service: Service) -> Settings:
    """The worker's settings, validated by the same code that loads them at start."""
    return load_settings(environ=environment(service))


def read_yaml_files(folder: Path) -> list[Any]:
    files = sorted([*folder.glob("*.yml"), *folder.glob("*.yaml")])
    assert files, f"no provisioning files in {folder}"
    return [yaml.safe_load(path.read_text(encoding="utf-8")) for path in files]


# --- services, images, names, ports, start-up order -----------------------------------------


def test_every_service_has_an_image_or_a_build_that_exists(services: dict[str, Service]) -> None:
    problems = []
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            if not service.get("image"):
                problems.append(f"{name}: neither image nor build")
            continue
        spec = {"context": build} if isinstance(build, str) else build
        context = ROOT / spec.get("context", ".")
        dockerfile = context / spec.get("dockerfile", "Dockerfile")
        if not context.is_dir():
            problems.append(f"{name}: build context {context} does not exist")
        elif not dockerfile.is_file():
            problems.append(f"{name}: {dockerfile} does not exist")
    assert not problems


def test_images_are_pinned_to_a_version(services: dict[str, Service]) -> None:
    """`latest` or no tag would make two `docker compose up` runs differ."""
    unpinned = []
    for name, service in services.items():
        image = service.get("image")
        if image is None or "@sha256:" in image:
            continue
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if tag in ("", "latest"):
            unpinned.append(f"{name}: {image}")
    assert not unpinned


@pytest.mark.parametrize(
    "path",
    [
        COMPOSE_FILE,
        DOCKERFILE,
        DEPLOY_DOC,
        *sorted(path for path in (ROOT / "deploy").rglob("*") if path.is_file()),
    ],
    ids=lambda path: str(path.relative_to(ROOT)),
)
def test_envpipe_names_are_real_settings(path: Path) -> None:
    """Every ENVPIPE_* name, in environment maps, commands, scripts or prose, is a setting."""
    names = set(ENVPIPE_NAME.findall(path.read_text(encoding="utf-8")))
    assert names <= KNOWN_ENVPIPE_NAMES, sorted(names - KNOWN_ENVPIPE_NAMES)


def test_host_ports_do_not_collide(services: dict[str, Service]) -> None:
    """Stricter than Docker: one host port is used once, whatever address it is bound to."""
    owners: dict[tuple[int, str], list[str]] = {}
    for name, service in services.items():
        for port in published_ports(service):
            owners.setdefault(port, []).append(name)
    assert owners, "nothing is published on the host"
    collisions = {port: names for port, names in owners.items() if len(names) > 1}
    assert not collisions


def test_depends_on_targets_exist(services: dict[str, Service]) -> None:
    missing = [
        f"{name} -> {target}"
        for name, service in services.items()
        for target in dependencies(service)
        if target not in services
    ]
    assert not missing


def test_healthchecked_dependencies_are_awaited_healthy(services: dict[str, Service]) -> None:
    """A dependency with a healthcheck is waited on until healthy; without one it cannot be."""
    wrong = []
    for name, service in services.items():
        for target, condition in dependencies(service).items():
            if target in services and has_healthcheck(services[target]) != (
                condition == "service_healthy"
            ):
                wrong.append(f"{name} waits for {target} with {condition}")
    assert not wrong


# --- the workers ----------------------------------------------------------------------------


def test_compose_runs_an_encrypt_and_a_decrypt_worker(workers: dict[str, Service]) -> None:
    assert {worker_command(service) for service in workers.values()} == WORKER_COMMANDS


def test_worker_commands_parse_with_the_cli(workers: dict[str, Service]) -> None:
    for name, service in workers.items():
        try:
            worker_options(service)
        except click.UsageError as exc:
            pytest.fail(f"{name}: {exc.format_message()}")


def test_decrypt_workers_have_a_dead_letter_topic(workers: dict[str, Service]) -> None:
    """Checked here too: the CLI's own `required` on --dlq is not enforced by click 8.3."""
    for name, service in workers.items():
        if worker_command(service) == "decrypt":
            assert worker_options(service)["dlq"], f"{name} has no --dlq"


def test_workers_build_from_the_repository(workers: dict[str, Service]) -> None:
    assert all("build" in service for service in workers.values())


def test_worker_settings_name_keys_metrics_and_json_logs(workers: dict[str, Service]) -> None:
    for name, service in workers.items():
        settings = worker_settings(service)
        assert settings.kms_key_id, name
        assert settings.signing_key_id, name
        assert settings.metrics_port > 0, name
        assert settings.log_format == "json", name


def test_workers_reach_kafka_and_the_kms_by_service_name(
    services: dict[str, Service], workers: dict[str, Service]
) -> None:
    advertised = {
        address.split("://", 1)[1]
        for service in services.values()
        for address in environment(service).get("KAFKA_ADVERTISED_LISTENERS", "").split(",")
        if "://" in address
    }
    for name, service in workers.items():
        settings = worker_settings(service)
        for server in settings.bootstrap_servers.split(","):
            assert server in advertised, f"{name}: {server} is not an advertised listener"
            assert server.rsplit(":", 1)[0] in services, f"{name}: {server} is not a service"
        endpoint = urlsplit(settings.kms_endpoint)
        assert endpoint.hostname in services, f"{name}: KMS {endpoint.hostname} is no service"
        assert endpoint.port in container_ports(services[endpoint.hostname]), name


def test_topics_read_at_start_are_created_by_the_init_job(
    services: dict[str, Service], workers: dict[str, Service]
) -> None:
    """Auto-creation is off: the sources and the producer's topic must exist before they start."""
    created = set(command_args(services[TOPIC_INIT_SERVICE]))
    read = {worker_options(service)["source"] for service in workers.values()}
    produced_to = option_value(command_args(services[SAMPLE_PRODUCER_SERVICE]), "--topic")
    assert read | {produced_to} <= created


# --- Prometheus and Grafana -----------------------------------------------------------------


def test_prometheus_scrapes_every_worker_metrics_port(
    services: dict[str, Service], workers: dict[str, Service]
) -> None:
    _, prometheus = service_by_image(services, PROMETHEUS_IMAGE)
    config_path = option_value(
        command_args(prometheus), "--config.file", default=PROMETHEUS_DEFAULT_CONFIG
    )
    config = yaml.safe_load(host_path(prometheus, str(config_path)).read_text(encoding="utf-8"))
    targets = {
        target
        for job in config["scrape_configs"]
        if job.get("metrics_path", "/metrics") == "/metrics"
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    expected = {f"{name}:{worker_settings(s).metrics_port}" for name, s in workers.items()}
    assert expected <= targets, sorted(expected - targets)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def json_items(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair in a JSON document, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from json_items(value)
    elif isinstance(node, list):
        for item in node:
            yield from json_items(item)


def dashboard_families(dashboard: dict[str, Any]) -> set[str]:
    """Metric families the dashboard's PromQL names, `_bucket`-style series suffixes removed."""
    expressions = [
        value
        for key, value in json_items(dashboard)
        if key in EXPRESSION_KEYS and isinstance(value, str)
    ]
    assert expressions, "the dashboard has no PromQL expressions"
    return {
        SERIES_SUFFIX.sub("", name)
        for expression in expressions
        for name in METRIC_NAME.findall(expression)
    }


def test_dashboard_uses_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    unknown = dashboard_families(dashboard) - METRIC_FAMILIES.keys()
    assert not unknown


def test_dashboard_uses_every_metric_family(dashboard: dict[str, Any]) -> None:
    unused = METRIC_FAMILIES.keys() - dashboard_families(dashboard)
    assert not unused


def test_grafana_provisioning_points_at_the_mounted_dashboard(
    services: dict[str, Service],
) -> None:
    _, grafana = service_by_image(services, GRAFANA_IMAGE)
    settings = environment(grafana)
    provisioning = settings.get("GF_PATHS_PROVISIONING", GRAFANA_DEFAULT_PROVISIONING)
    providers = [
        provider
        for document in read_yaml_files(host_path(grafana, f"{provisioning}/dashboards"))
        for provider in document.get("providers", [])
        if provider.get("type", "file") == "file"
    ]
    folders = [host_path(grafana, provider["options"]["path"]) for provider in providers]
    assert DASHBOARD.parent in folders, folders
    home = settings.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home is not None:
        assert host_path(grafana, home) == DASHBOARD


def test_dashboard_queries_the_provisioned_prometheus(
    services: dict[str, Service], dashboard: dict[str, Any]
) -> None:
    _, grafana = service_by_image(services, GRAFANA_IMAGE)
    prometheus_name, prometheus = service_by_image(services, PROMETHEUS_IMAGE)
    provisioning = environment(grafana).get("GF_PATHS_PROVISIONING", GRAFANA_DEFAULT_PROVISIONING)
    sources = [
        source
        for document in read_yaml_files(host_path(grafana, f"{provisioning}/datasources"))
        for source in document.get("datasources", [])
        if source.get("type") == "prometheus"
    ]
    for source in sources:
        url = urlsplit(source["url"])
        assert url.hostname == prometheus_name, source["url"]
        assert url.port in container_ports(prometheus), source["url"]
    used = {value["uid"] for key, value in json_items(dashboard) if key == "datasource"}
    assert used, "the dashboard names no data source"
    assert used <= {source.get("uid") for source in sources}


# --- the image ------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    logical, pending = [], ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    start = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[start:]


def test_dockerfile_runs_envpipe_as_a_non_root_user() -> None:
    stage = final_stage()
    assert stage[0][1].split()[0] == "python:3.11-slim"
    entrypoints = [json.loads(args) for name, args in stage if name == "ENTRYPOINT"]
    assert entrypoints[-1:] == [["envpipe"]]
    users = [args.split(":")[0] for name, args in stage if name == "USER"]
    assert users, "the image runs as root"
    assert users[-1] not in ("root", "0")


def copied_from_context() -> set[str]:
    """Sources of every COPY/ADD that reads the build context (not another stage)."""
    sources: set[str] = set()
    for name, args in dockerfile_instructions():
        if name not in ("COPY", "ADD"):
            continue
        tokens = json.loads(args) if args.startswith("[") else shlex.split(args)
        if any(token.startswith("--from") for token in tokens):
            continue
        paths = [token for token in tokens if not token.startswith("--")]
        sources.update(path.removeprefix("./").rstrip("/") or "." for path in paths[:-1])
    return sources


def dockerignored(relative: str, patterns: list[str]) -> bool:
    """Whether a context path or one of its parents matches a pattern (no `!` exceptions)."""
    parts = PurePosixPath(relative).parts
    prefixes = ["/".join(parts[: index + 1]) for index in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pattern) for p in prefixes for pattern in patterns)


def test_docker_build_copies_what_the_wheel_build_reads() -> None:
    """hatchling needs pyproject.toml, its `readme`, the packages and the force-included dirs."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    wheel = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = {
        "pyproject.toml",
        pyproject["project"]["readme"],
        *wheel["packages"],
        *wheel.get("force-include", {}),
    }
    copied = copied_from_context()
    assert "." in copied or needed <= copied, sorted(needed - copied)
    patterns = [
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith(("#", "!"))
    ]
    files = [
        path.relative_to(ROOT).as_posix()
        for top in sorted(needed)
        for path in [ROOT / top, *(ROOT / top).rglob("*")]
        if path.is_file() and "__pycache__" not in path.parts
    ]
    assert [path for path in files if dockerignored(path, patterns)] == []


# --- the Kafka it describes is the Kafka the tests run ------------------------------------

#: Settings where compose deliberately differs from the tested broker: compose creates its
#: topics up front, so a typo must fail rather than make a new topic.
_COMPOSE_ONLY = {"auto.create.topics.enable"}
#: Per-node facts (ports, ids, paths, listeners) that differ by nature between the two.
_PER_NODE = {
    "node.id",
    "controller.quorum.voters",
    "controller.listener.names",
    "inter.broker.listener.name",
    "log.dirs",
    "listeners",
    "advertised.listeners",
    "listener.security.protocol.map",
    "num.network.threads",
    "num.io.threads",
}


def test_compose_runs_the_kafka_version_the_tests_run(services: dict[str, Service]) -> None:
    from workers.dev.kafka_jars import KAFKA_VERSION

    images = {
        name: service["image"]
        for name, service in services.items()
        if str(service.get("image", "")).startswith("apache/kafka:")
    }
    assert images, "no service runs apache/kafka"
    assert set(images.values()) == {f"apache/kafka:{KAFKA_VERSION}"}, images


def test_compose_kraft_settings_agree_with_the_tested_broker(
    services: dict[str, Service], tmp_path: Path
) -> None:
    from workers.dev.apache_kafka import NodeLayout, server_properties

    tested = dict(
        line.split("=", 1)
        for line in server_properties(NodeLayout(1, 9092, 9093, tmp_path), "1@localhost:9093")
        .strip()
        .splitlines()
    )
    environment = services["kafka"]["environment"]
    for name, value in tested.items():
        if name in _PER_NODE | _COMPOSE_ONLY:
            continue
        variable = "KAFKA_" + name.upper().replace(".", "_")
        assert str(environment.get(variable)) == value, f"{variable}: compose vs tested {value}"
    assert str(environment["KAFKA_AUTO_CREATE_TOPICS_ENABLE"]) == "false"
