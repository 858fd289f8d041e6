"""Run ArcadeDB with its Bolt plugin in the foreground until SIGTERM or SIGINT.

`devtools.local_services` starts this module as a detached process
(``python -m devtools.arcadedb_server --root D --bolt-port P ...``). The root password comes
from the environment variable ``KGS_BOLT_PASSWORD``, never from the command line, so it does
not show in ``ps`` or in the log. On SIGTERM/SIGINT the server is stopped through ArcadeDB's
own ``stop()`` (databases closed and flushed) and the process exits with status 0.

Why a timed wait: the JVM's threads can receive a process-directed signal instead of the main
thread; Python then runs the handler only when the main thread next wakes up, so the main
thread wakes every ``_WAKE_S`` seconds to notice it. This is the server's lifetime, not a
retry loop: it has no deadline by design.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

PASSWORD_ENV = "KGS_BOLT_PASSWORD"
READY_LINE = "arcadedb-server: ready"
_WAKE_S = 0.2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.arcadedb_server")
    parser.add_argument("--root", required=True, help="ArcadeDB root path (databases, config, logs)")
    parser.add_argument("--host", default="127.0.0.1", help="address every listener binds to")
    parser.add_argument("--bolt-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--database", required=True, help="database created on start if missing")
    args = parser.parse_args(argv)

    password = os.environ.get(PASSWORD_ENV)
    if not password:
        print(f"arcadedb-server: {PASSWORD_ENV} is not set", file=sys.stderr)
        return 2

    from arcadedb_embedded.server import ArcadeDBServer

    t0 = time.monotonic()
    server = ArcadeDBServer(
        root_path=args.root,
        root_password=password,
        config={
            "host": args.host,
            "server_plugins": "Bolt:com.arcadedb.bolt.BoltProtocolPlugin",
            "bolt_port": args.bolt_port,
            "http_port": args.http_port,
            "server_defaultDatabases": f"{args.database}[root]",
        },
    )
    # After the JVM started (in the constructor above): the JVM installs its own SIGTERM handler
    # at start-up, which would end the process without stopping the server.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    print(f"{READY_LINE} in {time.monotonic() - t0:.1f}s (bolt {args.host}:{args.bolt_port})", flush=True)
    try:
        while not stop.wait(_WAKE_S):
            pass
    finally:
        print("arcadedb-server: stopping", flush=True)
        server.stop()
        print("arcadedb-server: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
