"""KServe v2 / Triton request parsing and response building, strict as Triton is.

Shared by the HTTP front end (:mod:`serve.server`) and any other front end (gRPC): every check a
client can fail raises :class:`ApiError` (4xx) naming the problem, never anything else.

- :func:`parse_json` parses untrusted JSON: ``RecursionError`` (deep nesting), bad UTF-8, huge
  integers become a 400; the number hooks are Python functions, so a thread parsing a 15 MB body
  lets the event loop run between numbers (the C parser alone holds the GIL for the whole body).
- :func:`fp32_from_json_data` / :func:`fp32_from_bytes` turn a tensor's JSON ``data`` / raw bytes
  into a float32 array of the given shape; :func:`check_fp32_tensor` refuses NaN, Inf and values
  outside the FP32 range (``1e39``), naming the tensor and the flat index (Triton-strict).
- :func:`parse_infer_request`, :func:`requested_outputs`, :func:`build_infer_response`: the v2
  ``infer`` call over HTTP (JSON and the binary tensor data extension).
"""

from __future__ import annotations

import itertools
import json
import math
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

MODEL_VERSION = "1"
INFER_HEADER = "Inference-Header-Content-Length"
FP32_MAX = float(np.finfo(np.float32).max)
_CHUNK = 1 << 16  # elements per conversion step: the GIL is released between steps


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with ``status`` (4xx: the client's fault)."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


class ModelSpec(Protocol):
    """What parsing needs of a served model (``serve.server.ServedModel`` has it)."""

    name: str
    input_name: str
    input_shape: tuple[int, ...]
    output_names: list[str]


# ----------------------------------------------------------------------------------------- JSON


def _pause(done: int, total: int) -> None:
    """Release the GIL (``sleep(0)``) between conversion steps, so the event loop runs at once.

    Only when more steps follow: a one-step tensor (every single-image request) must not yield, since
    ``sleep(0)`` gives the core away to any other runnable process and costs the event loop its slice.
    """
    if done < total:
        time.sleep(0)


def _parse_int(s: str) -> int:
    return int(s)  # a Python-level hook: the interpreter can hand the GIL to the event loop between numbers


def _parse_float(s: str) -> float:
    return float(s)


def _parse_constant(s: str) -> float:
    return float(s)  # NaN / Infinity / -Infinity: parsed, then refused where a tensor holds them


# One decoder per thread, reused: json.loads(..., parse_int=...) builds a new decoder (and scanner) per
# call; per thread because the parse hooks can hand the GIL over mid-document.
_DECODERS = threading.local()


def _decoder() -> json.JSONDecoder:
    dec = getattr(_DECODERS, "dec", None)
    if dec is None:
        dec = _DECODERS.dec = json.JSONDecoder(parse_int=_parse_int, parse_float=_parse_float,
                                               parse_constant=_parse_constant)
    return dec


# A small document parses in microseconds on the loop: the C scanner without Python hooks, same results
# (the hooks only give the GIL away between the numbers of a large body parsed in a thread).
_SMALL_JSON = 64 << 10
_PLAIN_DECODER = json.JSONDecoder()


def parse_json(raw: bytes | memoryview, what: str = "inference request header") -> Any:
    """``json.loads`` for untrusted bytes; ApiError(400) naming the problem for anything malformed."""
    try:
        raw = raw if isinstance(raw, bytes) else bytes(raw)
        dec = _PLAIN_DECODER if len(raw) <= _SMALL_JSON else _decoder()
        return dec.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))  # as json.loads does
    except RecursionError:
        raise ApiError(400, f"{what} is nested too deeply to parse") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, integers over 4300 digits
        raise ApiError(400, f"{what} is not valid JSON ({e})") from None


# -------------------------------------------------------------------------------------- tensors


def check_fp32_tensor(arr: np.ndarray, name: str) -> np.ndarray:
    """``arr`` (any float dtype) as float32, or ApiError(400) naming the first NaN / Inf / out-of-range element.

    The rule of every front end: an FP32 input holds finite values within +-3.4028235e38. ``arr`` in
    float64 catches ``1e39``, which float32 would silently turn into ``inf``.
    """
    flat = arr.reshape(-1)
    if flat.dtype == np.float32 and flat.size <= _CHUNK and np.isfinite(flat).all():
        return arr  # float32 holds no value beyond the FP32 range but +-inf: finite is the whole rule
    bad = None
    for i in range(0, flat.size, _CHUNK):
        part = flat[i:i + _CHUNK]
        ok = np.abs(part) <= FP32_MAX  # NaN compares False
        _pause(i + _CHUNK, flat.size)
        if not ok.all():
            bad = i + int(np.argmin(ok))
            break
    if bad is not None:
        v = float(flat[bad])
        what = "NaN" if math.isnan(v) else ("Inf" if math.isinf(v) else f"{v!r}, outside the FP32 range")
        raise ApiError(400, f"input {name!r}: element {bad} (flat index) is {what}; FP32 inputs must be finite "
                            f"numbers within +-{FP32_MAX:.8g}")
    return arr.astype(np.float32, copy=False)


def fp32_from_bytes(raw: bytes | memoryview, name: str, shape: Sequence[int]) -> np.ndarray:
    """Little-endian FP32 bytes (binary extension, gRPC ``raw_input_contents``) -> checked ``[shape]`` array."""
    count = math.prod(shape)
    if len(raw) != count * 4:
        raise ApiError(400, f"input {name!r}: {len(raw)} bytes of FP32 data but shape {list(shape)} needs "
                            f"{count * 4}")
    arr = np.frombuffer(raw, dtype="<f4")
    return check_fp32_tensor(arr, name).reshape(shape)


def _kinds(level: list) -> set[type]:
    kinds: set[type] = set()
    for i in range(0, len(level), _CHUNK):
        kinds.update(map(type, level[i:i + _CHUNK]))
        _pause(i + _CHUNK, len(level))
    return kinds


def fp32_from_json_data(data: Any, name: str, shape: Sequence[int]) -> np.ndarray:
    """A tensor's JSON ``data`` (flat or nested lists of JSON numbers) -> checked float32 ``[shape]`` array.

    As Triton: strings (``"1.5"``), booleans and ``null`` are refused, not converted; the nesting may
    be at most ``len(shape)`` lists deep; the number of values must equal ``prod(shape)``.
    """
    count = math.prod(shape)
    if not isinstance(data, list):
        raise ApiError(400, f"input {name!r}: data must be a (flat or nested) list of numbers, got "
                            f"{type(data).__name__}")
    level = data
    kinds = _kinds(level)
    depth = 1
    while kinds == {list}:
        if depth >= len(shape):
            raise ApiError(400, f"input {name!r}: data is nested more than {len(shape)} lists deep for shape "
                                f"{list(shape)}")
        if sum(map(len, level)) > count:
            break  # too many values: reported below without building the list
        level = list(itertools.chain.from_iterable(level))
        kinds = _kinds(level)
        depth += 1
    if kinds == {list}:  # flattening stopped early: more values than the shape holds
        raise ApiError(400, f"input {name!r}: more than {count} values in data but shape {list(shape)} needs {count}")
    if not kinds <= {int, float}:
        i, v = next((i, v) for i, v in enumerate(level) if type(v) not in (int, float))
        got = "a list mixed with numbers" if isinstance(v, list) else f"{type(v).__name__} {v!r}"[:80]
        raise ApiError(400, f"input {name!r}: data element {i} (at nesting depth {depth}) is {got}; FP32 data "
                            "must be JSON numbers (no strings, booleans or null)")
    if len(level) != count:
        raise ApiError(400, f"input {name!r}: {len(level)} values in data but shape {list(shape)} needs {count}")
    arr = np.empty(count, dtype=np.float64)
    try:
        for i in range(0, count, _CHUNK):
            arr[i:i + _CHUNK] = level[i:i + _CHUNK]
            _pause(i + _CHUNK, count)
    except OverflowError:  # an integer beyond float64
        raise ApiError(400, f"input {name!r}: data holds an integer outside the FP32 range") from None
    return check_fp32_tensor(arr, name).reshape(shape)


# -------------------------------------------------------------------------------------- request


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Request body with Content-Encoding gzip/deflate undone, refusing output over ``limit`` bytes."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ApiError(415, f"unsupported Content-Encoding {encoding!r} (use gzip, deflate or none)")
    d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
        if len(out) > limit or d.unconsumed_tail:
            raise ApiError(413, f"request body decompresses to more than the limit of {limit} bytes")
        out += d.flush()
    except zlib.error as e:
        raise ApiError(400, f"request body is not valid {encoding} data ({e})") from None
    if not d.eof:
        raise ApiError(400, f"request body: truncated {encoding} stream")
    return out


def _params(obj: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``obj["parameters"]``: absent -> {}; present -> must be an object (``[]`` and ``null`` are refused)."""
    if "parameters" not in obj:
        return {}
    params = obj["parameters"]
    if not isinstance(params, dict):
        raise ApiError(400, f"{what}: parameters must be a JSON object, got {type(params).__name__}")
    return params


def json_header_length(body: bytes, header_length: str | None) -> int:
    """Bytes of JSON at the start of an infer body (the binary extension's header), checked; ApiError(400)."""
    if header_length is None:
        return len(body)
    try:
        hl = int(header_length)
    except ValueError:
        raise ApiError(400, f"{INFER_HEADER} header must be an integer, got {header_length!r}") from None
    if not 0 < hl <= len(body):
        raise ApiError(400, f"{INFER_HEADER} = {hl} but the body has {len(body)} bytes")
    return hl


def parse_infer_request(body: bytes, header_length: str | None, model: ModelSpec
                        ) -> tuple[dict[str, Any], np.ndarray]:
    """The request JSON and the input images ``[B,3,H,W]`` float32 of a v2 infer request; ApiError(400) if bad."""
    hl = json_header_length(body, header_length)
    req = parse_json(body if hl == len(body) else memoryview(body)[:hl])
    if not isinstance(req, dict):
        raise ApiError(400, "inference request must be a JSON object with 'inputs'")
    if "id" in req and not isinstance(req["id"], str):
        raise ApiError(400, f"request 'id' must be a string, got {type(req['id']).__name__}")
    _params(req, "request")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ApiError(400, "inference request has no 'inputs' list")
    binary = memoryview(body)[hl:]
    offset = 0
    images = None
    for i, inp in enumerate(inputs):
        if not isinstance(inp, dict):
            raise ApiError(400, f"inputs[{i}] must be an object with name, shape, datatype")
        name = inp.get("name")
        if name != model.input_name:
            raise ApiError(400, f"unknown input {name!r}"[:200] + f" for model {model.name!r}; it takes one input "
                                f"{model.input_name!r}")
        if images is not None:
            raise ApiError(400, f"input {name!r} given twice")
        datatype = inp.get("datatype")
        if datatype != "FP32":
            raise ApiError(400, f"input {name!r}: datatype {datatype!r}"[:200] + f" not supported; model "
                                f"{model.name!r} takes FP32")
        shape = inp.get("shape")
        want = [-1, *model.input_shape]
        if (not isinstance(shape, list) or len(shape) != 1 + len(model.input_shape)
                or not all(type(s) is int for s in shape) or shape[0] < 1 or tuple(shape[1:]) != model.input_shape):
            raise ApiError(400, f"input {name!r}: shape {shape!r}"[:200] + f" does not match the model's {want} "
                                "(batch >= 1)")
        count = math.prod(shape)
        params = _params(inp, f"input {name!r}")
        if "shared_memory_region" in params:
            raise ApiError(400, f"input {name!r}: shared memory is not supported by this server")
        size = params.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0:
                raise ApiError(400, f"input {name!r}: binary_data_size must be a non-negative integer")
            if "data" in inp:
                raise ApiError(400, f"input {name!r} has both 'data' and parameters.binary_data_size")
            if size != count * 4:
                raise ApiError(400, f"input {name!r}: binary_data_size {size} != {count * 4} bytes for shape "
                                    f"{shape} FP32")
            if offset + size > len(binary):
                raise ApiError(400, f"input {name!r}: binary_data_size {size} but only {len(binary) - offset} "
                                    "bytes of binary data follow the JSON header")
            images = fp32_from_bytes(binary[offset:offset + size], name, shape)
            offset += size
        else:
            if "data" not in inp:
                raise ApiError(400, f"input {name!r} has neither 'data' nor parameters.binary_data_size")
            images = fp32_from_json_data(inp["data"], name, shape)
        images = np.ascontiguousarray(images, dtype=np.float32)
    if offset != len(binary):
        raise ApiError(400, f"{len(binary) - offset} bytes of binary data after the JSON header are not claimed "
                            "by any input's binary_data_size")
    return req, images


def _flag(params: Mapping[str, Any], key: str, default: bool, what: str) -> bool:
    value = params.get(key, default)
    if type(value) is not bool:
        raise ApiError(400, f"{what}: {key} must be true or false, got {type(value).__name__}")
    return value


def requested_outputs(req: dict[str, Any], model: ModelSpec) -> list[tuple[str, bool]]:
    """``[(output name, as binary)]`` the request asks for (all outputs when it names none)."""
    default_binary = _flag(_params(req, "request"), "binary_data_output", False, "request parameters")
    outputs = req.get("outputs")
    if outputs is None:
        return [(n, default_binary) for n in model.output_names]
    if not isinstance(outputs, list):
        raise ApiError(400, "'outputs' must be a list of {name, parameters}")
    wanted = []
    for o in outputs:
        name = o.get("name") if isinstance(o, dict) else None
        if not isinstance(name, str) or name not in model.output_names:
            raise ApiError(400, f"unknown output {name!r}"[:200] + f" for model {model.name!r}; it has "
                                f"{model.output_names}")
        oparams = _params(o, f"output {name!r}")
        if oparams.get("classification"):
            raise ApiError(400, f"output {name!r}: the classification extension is not supported")
        if "shared_memory_region" in oparams:
            raise ApiError(400, f"output {name!r}: shared memory is not supported by this server")
        wanted.append((name, _flag(oparams, "binary_data", default_binary, f"output {name!r}")))
    return wanted


_RESPONSE_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # built once, not per response


def build_infer_response(req: dict[str, Any], model: ModelSpec, out: Mapping[str, np.ndarray],
                         wanted: Sequence[tuple[str, bool]] | None = None) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a v2 infer response (JSON, or JSON + binary tensors after it).

    The JSON is always valid (``allow_nan=False``): an output with NaN/Inf asked for as JSON is refused
    with a 400 naming it (finite inputs so extreme that the model overflows); binary outputs carry
    IEEE values as they are, as Triton's do. ``wanted``: :func:`requested_outputs` of ``req`` when the
    caller has it already.
    """
    resp: dict[str, Any] = {"model_name": model.name, "model_version": MODEL_VERSION}
    if "id" in req:
        resp["id"] = req["id"]
    tensors = []
    blobs: list[bytes] = []
    for name, binary in requested_outputs(req, model) if wanted is None else wanted:
        arr = np.ascontiguousarray(out[name], dtype="<f4")
        t: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(arr.shape)}
        if binary:
            raw = arr.tobytes()
            blobs.append(raw)
            t["parameters"] = {"binary_data_size": len(raw)}
        else:
            finite = np.isfinite(arr)
            if not finite.all():
                row = int(np.argmin(finite.reshape(len(arr), -1).all(axis=1))) if arr.ndim else 0
                raise ApiError(400, f"output {name!r} of model {model.name!r} is not finite (NaN/Inf) for batch "
                                    f"row {row}: the input is outside what the model can compute; ask for a "
                                    "binary output to receive IEEE values")
            t["data"] = arr.ravel().tolist()
        tensors.append(t)
    resp["outputs"] = tensors
    header = _RESPONSE_ENCODER.encode(resp).encode()
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return b"".join([header, *blobs]), {"Content-Type": "application/octet-stream", INFER_HEADER: str(len(header))}
