"""Serving expert libraries over HTTP (`mergetool serve`) and a client for them.

    from mergetool.serve import Client
    Client("http://127.0.0.1:8000").predict(["some text"])
"""

from __future__ import annotations


def __getattr__(name: str):
    if name == "Client":  # lazy: the client needs only httpx, not the server's stack
        from mergetool.serve.client import Client

        return Client
    raise AttributeError(name)


__all__ = ["Client"]
