"""The one place a server address is bound: a taken port or a foreign address is one line naming --port."""

from __future__ import annotations

import socket

from mergetool.core.errors import MergetoolError


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one), SO_REUSEADDR set so a restart can rebind at once."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as exc:
        raise MergetoolError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", key="--port",
                             fix="choose a free port (or --port 0) and an address of this machine") from None
    return sock
