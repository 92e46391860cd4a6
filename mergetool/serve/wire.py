"""The wire format of `POST /v1/predict`, and the one reader of a request body.

    request:  {"inputs": [TEXT or {"text": ..., "text_pair": ...}, ...], "task": optional, "return_logits": false}
    response: {"outputs": [{"task", "label", "label_id", "score", "truncated"[, "logits", "routing"]}, ...]}

A bad body is a `BadRequest` (status, error code, one-line detail); the app answers it as {error, detail}."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from mergetool.core.safejson import UnsafeJSON, parse_json

JSON_TYPES = ("application/json",)


class BadRequest(Exception):
    """A client error: HTTP status, a short error code and a one-line detail (never the body itself)."""

    def __init__(self, status: int, error: str, detail: str, headers: Optional[dict] = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers or {}


class TextPair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1)
    text_pair: Optional[str] = Field(None, min_length=1)


class PredictRequest(BaseModel):
    """Documented in /docs; the body is read by `parse_predict`, which applies the same rules."""
    model_config = ConfigDict(extra="forbid")
    inputs: list[Union[str, TextPair]] = Field(min_length=1, description="texts or {text, text_pair}")
    task: Optional[str] = Field(None, description="skip the router and use this task for every input")
    return_logits: bool = Field(False, description="add each output's logits and routing probabilities")


class PredictOutput(BaseModel):
    task: str
    label: Union[str, float]
    label_id: Optional[int]
    score: float
    truncated: bool = Field(description="the input was longer than the model's token limit and was cut")
    logits: Optional[list[float]] = None
    routing: Optional[dict[str, float]] = Field(None, description="router probability per task (routed inputs)")


class PredictResponse(BaseModel):
    outputs: list[PredictOutput]


class ErrorBody(BaseModel):
    error: str
    detail: str


OPTIONAL_OUTPUTS = ("logits", "routing")  # only for requests with return_logits


def output_for(output: dict, return_logits: bool) -> dict:
    """An output as the request asked for it: without logits and routing unless return_logits."""
    return output if return_logits else {k: v for k, v in output.items() if k not in OPTIONAL_OUTPUTS}


@dataclass(frozen=True)
class ParsedPredict:
    items: list[tuple]  # (text, text_pair or None)
    task: Optional[str]
    return_logits: bool


def parse_predict(body: bytes, content_type: Optional[str], tasks: list[str], max_inputs: int) -> ParsedPredict:
    """The request, or a BadRequest naming what is wrong and how to fix it."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media not in JSON_TYPES:
        raise BadRequest(415, "unsupported_media_type", f"content type {media or 'none'!r} is not JSON; "
                         "send the body as application/json")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(400, "invalid_encoding", f"the body is not UTF-8 (byte {exc.start}); encode it as UTF-8")
    try:
        data = parse_json(text)
    except UnsafeJSON as exc:
        raise BadRequest(400, "invalid_json", f"the body is not valid JSON: {exc}")
    if not isinstance(data, dict):
        raise BadRequest(422, "invalid_request", 'the body must be a JSON object: {"inputs": [...]}')
    unknown = sorted(set(data) - set(PredictRequest.model_fields))
    if unknown:
        raise BadRequest(422, "invalid_request", f"unknown key {unknown[0][:40]!r}; "
                         "use inputs, task and return_logits")
    items = _inputs(data.get("inputs"), max_inputs)
    task = data.get("task")
    if task is not None and not (isinstance(task, str) and task in tasks):
        shown = repr(task[:60]) if isinstance(task, str) else type(task).__name__
        raise BadRequest(422, "unknown_task", f"task {shown} is not in this library; use one of "
                         f"{', '.join(tasks)} or leave it out to route")
    logits = data.get("return_logits", False)
    if not isinstance(logits, bool):
        raise BadRequest(422, "invalid_request", "return_logits must be true or false")
    return ParsedPredict(items, task, logits)


def _inputs(raw, max_inputs: int) -> list[tuple]:
    if raw is None:
        raise BadRequest(422, "invalid_request", 'the body has no "inputs"; send {"inputs": ["some text"]}')
    if not isinstance(raw, list) or not raw:
        raise BadRequest(422, "invalid_request", '"inputs" must be a non-empty list of texts')
    if len(raw) > max_inputs:
        raise BadRequest(422, "too_many_inputs", f"{len(raw)} inputs in one request; the limit is {max_inputs}, "
                         "split the list")
    return [_input(x, i) for i, x in enumerate(raw)]


def _input(x, i: int) -> tuple:
    where = f"inputs[{i}]"
    if isinstance(x, dict):
        extra = sorted(set(x) - {"text", "text_pair"})
        if extra:
            raise BadRequest(422, "invalid_request", f"{where} has unknown key {extra[0][:40]!r}; "
                             "use text and text_pair")
        text, pair = x.get("text"), x.get("text_pair")
        _text(text, f"{where}.text")
        if pair is not None:
            _text(pair, f"{where}.text_pair")
        return (text, pair)
    _text(x, where)
    return (x, None)


def _text(x, where: str) -> None:
    if not isinstance(x, str):
        kind = "missing" if x is None else f"a {type(x).__name__}"
        raise BadRequest(422, "invalid_request", f"{where} is {kind}, not a text; send a non-empty string")
    if not x.strip():
        raise BadRequest(422, "invalid_request", f"{where} is empty; send a non-empty string")
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, written as a JSON escape
        raise BadRequest(422, "invalid_request", f"{where} holds an unpaired surrogate escape; send valid "
                         "Unicode text") from None
