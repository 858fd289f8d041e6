"""A small TCP proxy for tests that need to take a server away and give it back.

``TcpProxy(host, port).start()`` listens on a free loopback port (``proxy.port``) and forwards
every connection to ``host:port`` byte for byte (one thread per direction). Point a client at
the proxy instead of the server, then:

- ``proxy.cut("refuse")`` closes every forwarded connection and stops listening: new
  connections are refused (ECONNREFUSED), as when the server process is gone;
- ``proxy.cut("drop")`` closes every forwarded connection and keeps listening, but closes
  each new connection as soon as it is accepted, before a byte is forwarded (a server that
  accepts and then fails, or a load balancer with no healthy backend);
- ``proxy.restore()`` forwards again, on the same port.

Pure Python (sockets and threads), no dependency. ``proxy.accepted`` and ``proxy.forwarded``
count the connections it took and the ones it forwarded to the server.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Literal

CutMode = Literal["refuse", "drop"]


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.port = 0
        self.accepted = 0
        self.forwarded = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._stop_accepting = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self._sockets: set[socket.socket] = set()
        self._mode: CutMode | None = None  # None: forwarding

    # --- control ----------------------------------------------------------------------
    def start(self) -> TcpProxy:
        self._listen()
        return self

    @property
    def up(self) -> bool:
        return self._mode is None

    def cut(self, mode: CutMode = "refuse") -> None:
        """Close every forwarded connection; refuse or drop new ones until ``restore()``."""
        with self._lock:
            self._mode = mode
            live = list(self._sockets)
            self._sockets.clear()
        if mode == "refuse":
            self._close_listener()
        for sock in live:
            _hard_close(sock)

    def restore(self) -> None:
        with self._lock:
            self._mode = None
        if self._listener is None:
            self._listen()

    def close(self) -> None:
        self.cut("refuse")

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- internals ----------------------------------------------------------------------
    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.listen_host, self.port))  # port 0 the first time, the same port after
        listener.listen(128)
        listener.settimeout(0.05)  # the accept loop checks for a stop request between waits
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._stop_accepting = threading.Event()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(listener, self._stop_accepting), name=f"proxy-accept-{self.port}", daemon=True
        )
        self._accept_thread.start()

    def _close_listener(self) -> None:
        listener, thread = self._listener, self._accept_thread
        self._listener = self._accept_thread = None
        if listener is None:
            return
        self._stop_accepting.set()
        if thread is not None:
            thread.join(timeout=5)
        listener.close()

    def _accept_loop(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            client.settimeout(None)
            if not self.up:
                _hard_close(client)  # "drop": accepted, then closed before anything is forwarded
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _hard_close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                if not self.up:  # cut while we were connecting
                    _hard_close(client)
                    _hard_close(upstream)
                    continue
                self._sockets.update((client, upstream))
                self.forwarded += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._sockets.discard(src)
                self._sockets.discard(dst)
            _hard_close(src)
            _hard_close(dst)


def _hard_close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv() on it
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sock.close()
