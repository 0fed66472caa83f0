"""Text beside images in the feature server: a CLIP model's text tower as a second served model.

A CLIP model is served as two models of the one model table: ``<name>`` (images -> ``features``) and
``<name>_text`` (:class:`serve.onnx_text.OnnxTextEncoder`: text -> ``text_features``), each with its
own dynamic batcher. The text model tokenises on the server, so clients send strings:

- ``POST /embed_text`` ``{"texts": [...]}`` (or ``GET /embed_text?text=...``): L2-normalised embeddings.
- ``GET /search?text=...&k=10``: the indexed images nearest to a text query.
- ``POST /classify?labels=cat,dog`` with an image: zero-shot class probabilities over the given labels.
- KServe v2 ``/v2/models/<name>_text/infer`` with a ``BYTES`` input ``text`` (JSON strings or
  binary, 4-byte little-endian length before each string) -> ``text_features`` FP32.

Bad input is a 400 naming the problem: no text, an empty text, bytes that are not UTF-8, more than
:data:`MAX_TEXTS` texts or :data:`MAX_LABELS` labels, a text over :data:`MAX_TEXT_CHARS` characters.
Text longer than the model's context is cut to fit and the response says so (``truncated``; for
KServe the ``X-Zoo-Truncated`` header lists the cut inputs).
"""

from __future__ import annotations

import json
import struct
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import Response

from serve.kserve import json_header_length, parse_json
from serve.onnx_text import TEXT_FEATURES, OnnxTextEncoder
from serve.server import INFER_HEADER, MODEL_VERSION, ApiError, ServedModel, _decompress, build_infer_response

MAX_TEXTS = 256
MAX_LABELS = 100
MAX_TEXT_CHARS = 2000
TEXT_INPUT = "text"


class TextServedModel(ServedModel):
    """A served text tower: KServe metadata with a BYTES ``text`` input."""

    @property
    def preprocessor(self):  # text needs no image preprocessing (the server builds every model's at start)
        return None

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "versions": [MODEL_VERSION], "platform": "onnxruntime_onnx",
                "inputs": [{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1]}],
                "outputs": [{"name": TEXT_FEATURES, "datatype": "FP32", "shape": [-1, self.embed_dim]}]}

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["input"] = [{"name": TEXT_INPUT, "data_type": "TYPE_STRING", "dims": [1]}]
        return cfg


def check_texts(texts: Any, what: str = "text") -> list[str]:
    """The texts of a request, or ApiError(400) saying what is wrong with them."""
    if not isinstance(texts, list) or not texts:
        raise ApiError(400, f"no {what} given (send a non-empty list of strings)")
    if len(texts) > MAX_TEXTS:
        raise ApiError(400, f"{len(texts)} texts in one request; the limit is {MAX_TEXTS}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ApiError(400, f"{what} {i} is a {type(t).__name__}, not a string")
        if not t.strip():
            raise ApiError(400, f"{what} {i} is empty")
        if len(t) > MAX_TEXT_CHARS:
            raise ApiError(400, f"{what} {i} has {len(t)} characters; the limit is {MAX_TEXT_CHARS}")
    return texts


def parse_labels(labels: str) -> list[str]:
    names = [p.strip() for p in labels.split(",")]
    if len(names) > MAX_LABELS:
        raise ApiError(400, f"{len(names)} labels; the limit is {MAX_LABELS}")
    if len(names) < 2:
        raise ApiError(400, "zero-shot classification needs at least two labels (labels=cat,dog)")
    for i, n in enumerate(names):
        if not n:
            raise ApiError(400, f"label {i} is empty (labels=cat,dog: names separated by commas)")
    return check_texts(names, "label")


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None


def query_param(request: Request, name: str) -> str | None:
    """A query parameter decoded strictly as UTF-8 (Starlette would replace bad bytes silently)."""
    raw: bytes = request.scope.get("query_string", b"")
    for part in raw.split(b"&"):
        key, _, value = part.partition(b"=")
        if urllib.parse.unquote_to_bytes(key.replace(b"+", b" ")) == name.encode():
            return _decode(urllib.parse.unquote_to_bytes(value.replace(b"+", b" ")), f"query parameter {name!r}")
    return None


def parse_bytes_input(body: bytes, header_length: str | None, model: ServedModel) -> tuple[dict, list[str]]:
    """The request JSON and the strings of a KServe v2 infer request with one BYTES input."""
    hl = json_header_length(body, header_length)
    _decode(bytes(body[:hl]), "the inference request header")  # names bad UTF-8 as such
    req = parse_json(bytes(body[:hl]))  # the server's hardened parser: deep nesting, NaN, huge ints are 400s
    inputs = req.get("inputs") if isinstance(req, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ApiError(400, f"model {model.name!r} takes one input {TEXT_INPUT!r} (BYTES, shape [N])")
    inp = inputs[0]
    if inp.get("name") != TEXT_INPUT:
        raise ApiError(400, f"unknown input {inp.get('name')!r} for model {model.name!r}; it takes {TEXT_INPUT!r}")
    if inp.get("datatype") != "BYTES":
        raise ApiError(400, f"input {TEXT_INPUT!r}: datatype {inp.get('datatype')!r}; text goes in as BYTES")
    shape = inp.get("shape")
    if not isinstance(shape, list) or not all(type(s) is int for s in shape) or not shape or shape[0] < 1:
        raise ApiError(400, f"input {TEXT_INPUT!r}: shape {shape!r} must be [N] or [N,1] with N >= 1")
    count = int(np.prod(shape))
    size = (inp.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        blob, texts, at = memoryview(body)[hl:], [], 0
        if size != len(blob):
            raise ApiError(400, f"input {TEXT_INPUT!r}: binary_data_size {size} but {len(blob)} bytes follow")
        while at < len(blob):
            if at + 4 > len(blob):
                raise ApiError(400, f"input {TEXT_INPUT!r}: truncated BYTES element length at byte {at}")
            (n,) = struct.unpack_from("<I", blob, at)
            if at + 4 + n > len(blob):
                raise ApiError(400, f"input {TEXT_INPUT!r}: BYTES element of {n} bytes runs past the data")
            texts.append(_decode(bytes(blob[at + 4:at + 4 + n]), f"input {TEXT_INPUT!r} element {len(texts)}"))
            at += 4 + n
    else:
        data = inp.get("data")
        if not isinstance(data, list):
            raise ApiError(400, f"input {TEXT_INPUT!r} has neither 'data' nor parameters.binary_data_size")
        texts = [t for row in data for t in (row if isinstance(row, list) else [row])]
    if len(texts) != count:
        raise ApiError(400, f"input {TEXT_INPUT!r}: {len(texts)} strings but shape {shape} needs {count}")
    return req, check_texts(texts)


class TextAPI:
    """The text routes of one app; ``models`` is the server's model table (text towers replaced in place)."""

    def __init__(self, models: dict[str, ServedModel], index: Any, timed: Callable[[Awaitable], Awaitable]):
        self.models, self.index, self.timed = models, index, timed
        for name, mdl in list(models.items()):
            if isinstance(mdl.encoder, OnnxTextEncoder):
                models[name] = TextServedModel(mdl.encoder, mdl.batcher, mdl.max_batch_size, mdl.max_queue_delay_s)
        self.text_for = {m.encoder.image_model: m for m in models.values() if isinstance(m, TextServedModel)}

    def text_model(self, name: str | None) -> TextServedModel:
        if name in self.models and isinstance(self.models[name], TextServedModel):
            return self.models[name]
        if name in self.text_for:
            return self.text_for[name]
        if name is None and self.text_for:
            return next(iter(self.text_for.values()))
        raise ApiError(400, f"no text tower is served{f' for model {name!r}' if name else ''}: serve an image-text "
                            f"model (e.g. clip_convnet_shapes); text models here: {sorted(self.text_for)}")

    async def embed(self, tm: TextServedModel, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        try:
            tok = tm.encoder.tokenize(check_texts(texts))
        except (ValueError, TypeError) as e:
            raise ApiError(400, str(e)) from None
        out = await tm.batcher.submit(tok.ids.numpy())
        f = out[TEXT_FEATURES].astype(np.float32)
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12), tok.truncated

    def _truncation(self, tm: TextServedModel, truncated: list[bool]) -> dict[str, Any]:
        out: dict[str, Any] = {"truncated": truncated, "context_length": tm.encoder.context_length}
        if any(truncated):
            out["note"] = (f"{sum(truncated)} text(s) were longer than the model's context of "
                           f"{tm.encoder.context_length} tokens and were cut to fit")
        return out

    def labels(self, mdl: ServedModel, labels: str) -> list[str]:
        """The checked labels of a zero-shot request (ApiError when bad, or when ``mdl`` has no text tower)."""
        self.text_model(mdl.name)
        return parse_labels(labels)

    async def classify(self, mdl: ServedModel, images: np.ndarray, file: str, names: list[str]) -> dict[str, Any]:
        """Zero-shot: the image's probabilities over the user's labels (softmax of scaled cosine)."""
        tm = self.text_model(mdl.name)
        text, truncated = await self.embed(tm, names)
        feats = (await mdl.batcher.submit(images))["features"].astype(np.float32)[0]
        feats = feats / max(float(np.linalg.norm(feats)), 1e-12)
        logits = tm.encoder.logit_scale * (text @ feats).astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        best = int(np.argmax(probs))
        return {"model": mdl.name, "file": file, "labels": names, "label": names[best],
                "confidence": float(probs[best]), "probabilities": probs.tolist(),
                "similarities": (text @ feats).astype(np.float64).tolist(), **self._truncation(tm, truncated)}

    def register(self, app: FastAPI) -> None:
        """Add the text routes; KServe routes of the text models come before the server's generic ones."""

        @app.post("/embed_text", tags=["text"])
        async def embed_text_post(request: Request, model: str | None = Query(None)) -> dict[str, Any]:
            body = await request.body()
            try:
                payload = json.loads(_decode(body, "the request body"))
            except json.JSONDecodeError as e:
                raise ApiError(400, f'the body must be JSON {{"texts": [...]}} ({e})') from None
            texts = payload.get("texts") if isinstance(payload, dict) else None
            return await self._embed_response(model, texts)

        @app.get("/embed_text", tags=["text"])
        async def embed_text_get(request: Request, model: str | None = Query(None),
                                 text: str | None = Query(None, description="the text to embed")) -> dict[str, Any]:
            value = query_param(request, "text")
            return await self._embed_response(model, None if value is None else [value])

        @app.get("/search", tags=["text"])
        async def search_text(request: Request, text: str | None = Query(None, description="query text"),
                              k: int = Query(10, ge=1, le=1000)) -> dict[str, Any]:
            value = query_param(request, "text")
            if value is None:
                raise ApiError(400, "GET /search needs ?text=...; POST /search takes an image")
            if self.index is None:
                raise ApiError(409, "no index is loaded: start the server with --index FOLDER or the demo")
            tm = self.text_model(self.index.model_name)

            async def work() -> dict[str, Any]:
                import asyncio

                q, truncated = await self.embed(tm, [value])
                res = await asyncio.to_thread(self.index.search, q, k, self.index.model_name)
                return {"model": self.index.model_name, "text": value, "k": k, "index_size": int(self.index.ntotal),
                        "neighbours": res.to_list()[0], **self._truncation(tm, truncated)}

            return await self.timed(work())

        for name, tm in self.models.items():
            if isinstance(tm, TextServedModel):
                self._register_infer(app, name, tm)

    async def _embed_response(self, model: str | None, texts: Any) -> dict[str, Any]:
        tm = self.text_model(model)
        feats, truncated = await self.timed(self.embed(tm, check_texts(texts)))
        return {"model": tm.name, "dim": int(feats.shape[1]), "normalized": True, "embeddings": feats.tolist(),
                **self._truncation(tm, truncated)}

    def _register_infer(self, app: FastAPI, name: str, tm: TextServedModel) -> None:
        async def infer(request: Request) -> Response:
            from serve.server import _requested_outputs

            body = _decompress(await request.body(), request.headers.get("content-encoding", ""), 16 * 2**20)
            req, texts = parse_bytes_input(body, request.headers.get(INFER_HEADER), tm)
            _requested_outputs(req, tm)
            try:
                tok = tm.encoder.tokenize(texts)
            except (ValueError, TypeError) as e:
                raise ApiError(400, str(e)) from None
            out = await self.timed(tm.batcher.submit(tok.ids.numpy()))
            content, headers = build_infer_response(req, tm, out)
            cut = [str(i) for i, t in enumerate(tok.truncated) if t]
            if cut:
                headers["X-Zoo-Truncated"] = ",".join(cut)
            return Response(content, headers=headers, media_type=headers["Content-Type"])

        for path in (f"/v2/models/{name}/infer", f"/v2/models/{name}/versions/{MODEL_VERSION}/infer"):
            app.add_api_route(path, infer, methods=["POST"], tags=["kserve-v2"])
            app.router.routes.insert(0, app.router.routes.pop())  # before /v2/models/{name}/infer


def register_text_routes(app: FastAPI, models: dict[str, ServedModel], index: Any,
                         timed: Callable[[Awaitable], Awaitable]) -> TextAPI:
    """Wire the text tower(s) of ``models`` into ``app`` (a no-op table change when none is served)."""
    api = TextAPI(models, index, timed)
    api.register(app)
    return api
