"""The server's limits, one place for their defaults (shown by `mergetool serve --help` and the README)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

MIB = 1 << 20


class ServeLimits(BaseModel):
    """Batching and backpressure. Every limit answers with its own status code, never a 500."""
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_batch: int = Field(64, ge=1, le=4096)  # inputs per model run (whole requests are batched)
    max_wait_ms: float = Field(10.0, ge=0, le=60_000)  # how long the first queued input waits for others
    max_queue: int = Field(1024, ge=1)  # queued inputs; beyond it: 429 with Retry-After
    max_body_bytes: int = Field(MIB, ge=1024)  # request body; beyond it: 413
    max_inputs: int = Field(256, ge=1)  # inputs per request; beyond it: 422
    timeout_s: float = Field(30.0, gt=0)  # per request, queueing included; beyond it: 504
    retry_after_s: int = Field(1, ge=1)  # the Retry-After header of a 429

    @model_validator(mode="after")
    def _request_fits_the_queue(self) -> "ServeLimits":
        if self.max_inputs > self.max_queue:  # such a request would be told to retry forever
            raise ValueError(f"max_inputs ({self.max_inputs} per request) is over max_queue ({self.max_queue} queued "
                             "inputs): such a request could never be queued; keep max_inputs ≤ max_queue")
        return self
