"""A thin client for `mergetool serve` (httpx): predict, library, ready; 4xx/5xx raise ServeError."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import httpx


class ServeError(RuntimeError):
    """An error answer of the server: HTTP status, its error code and detail."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail = status, error, detail


class Client:
    """Client("http://127.0.0.1:8000").predict(["text", {"text": "a", "text_pair": "b"}], task=None)"""

    def __init__(self, url: str, timeout: float = 60.0, **httpx_options):
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout, **httpx_options)

    def predict(self, inputs: Sequence[Union[str, dict]], task: Optional[str] = None,
                return_logits: bool = False) -> list[dict]:
        body: dict = {"inputs": list(inputs)}
        if task is not None:
            body["task"] = task
        if return_logits:
            body["return_logits"] = True
        return self._check(self._http.post("/v1/predict", json=body))["outputs"]

    def library(self) -> dict:
        return self._check(self._http.get("/v1/library"))

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _check(resp: httpx.Response) -> dict:
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.status_code >= 400:
            if isinstance(data, dict):
                raise ServeError(resp.status_code, str(data.get("error")), str(data.get("detail")))
            raise ServeError(resp.status_code, "http_error", resp.text[:200])
        return data
