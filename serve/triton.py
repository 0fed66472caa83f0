"""Triton Inference Server: model repository generation, and a real Triton server through PyTriton.

``write_model_repository`` writes ``REPO/<name>/config.pbtxt`` + ``REPO/<name>/1/model.onnx`` for
Triton's onnxruntime backend (NVIDIA's containers, GPU deployments), with dynamic batching.

``PyTritonServer`` runs the same ``.onnx`` inside a real ``tritonserver`` via PyTriton (the
Python backend calls onnxruntime), which works on a CPU machine without NVIDIA's container.
PyTriton needs numpy<2, so it lives in a separate virtual environment; the worker script
(``serve/pytriton_worker.py``) runs there and never imports zoo or torch. The interpreter is
``$ZOO_TRITON_PYTHON``, else ``$ZOO_CACHE/triton-venv/bin/python`` (default
``~/.cache/selfsup-zoo/triton-venv``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zoo.model import ZooModel

WORKER_SCRIPT = Path(__file__).with_name("pytriton_worker.py")
KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU", "auto": "KIND_AUTO"}
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
# The part of the zoo config a Triton client needs (name, preprocessing, output sizes), kept in config.pbtxt.
SERVING_KEYS = (
    "name", "architecture", "method", "dataset", "input_size", "mean", "std", "crop_pct", "interpolation",
    "embed_dim", "num_clusters", "license",
)  # fmt: skip
_ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 6: "TYPE_INT32", 7: "TYPE_INT64"}


class TritonUnavailableError(RuntimeError):
    """The PyTriton virtual environment is missing or the Triton server did not start."""


# ----------------------------------------------------------------------------- model repository
def _graph_io(onnx_path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Inputs and outputs (name, Triton type, dims with the batch axis) and the zoo config of an .onnx file."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    init = {i.name for i in proto.graph.initializer}

    def describe(values) -> list[dict[str, Any]]:
        out = []
        for v in values:
            if v.name in init:
                continue
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            if t.elem_type not in _ONNX_TO_TRITON:
                raise ValueError(f"{onnx_path}: {v.name!r} has ONNX element type {t.elem_type}, not supported")
            out.append({"name": v.name, "data_type": _ONNX_TO_TRITON[t.elem_type], "dims": dims})
        return out

    cfg: dict[str, Any] = {}
    for entry in proto.metadata_props:
        if entry.key == "zoo_config":
            cfg = json.loads(entry.value)
    return describe(proto.graph.input), describe(proto.graph.output), cfg


def _pbtxt_string(text: str) -> str:
    """A protobuf text-format string literal (UTF-8 kept, quotes/backslashes/control characters escaped)."""
    out = []
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def render_config_pbtxt(
    name: str,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    max_batch_size: int = 64,
    max_queue_delay_us: int = 500,
    instances: int = 1,
    kind: str = "gpu",
    zoo_config: dict[str, Any] | None = None,
) -> str:
    """Triton ``config.pbtxt`` text for an ONNX model; ``dims`` given WITH the batch axis, written without.

    The serving part of ``zoo_config`` (:data:`SERVING_KEYS`) goes into ``parameters["zoo_config"]`` as JSON.
    """
    def tensors(items: list[dict[str, Any]]) -> str:
        blocks = []
        for t in items:
            if not t["dims"] or t["dims"][0] not in (-1, 0):
                raise ValueError(f"{t['name']!r}: dims {t['dims']} lack a dynamic batch axis (export with one)")
            dims = t["dims"][1:]
            if any(d < 1 for d in dims):
                raise ValueError(f"{t['name']!r}: dims {t['dims']} must be fixed except the batch axis")
            blocks.append(
                "  {\n"
                f"    name: {_pbtxt_string(t['name'])}\n"
                f"    data_type: {t['data_type']}\n"
                f"    dims: [ {', '.join(str(d) for d in dims)} ]\n"
                "  }"
            )
        return "[\n" + ",\n".join(blocks) + "\n]"

    lines = [
        f"name: {_pbtxt_string(name)}",
        'platform: "onnxruntime_onnx"',
        'backend: "onnxruntime"',
        f"max_batch_size: {int(max_batch_size)}",
        f"input {tensors(inputs)}",
        f"output {tensors(outputs)}",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}",
        "}",
        "instance_group [",
        "  {",
        f"    count: {int(instances)}",
        f"    kind: {KINDS[kind]}",
        "  }",
        "]",
    ]
    serving = {k: zoo_config[k] for k in SERVING_KEYS if zoo_config and zoo_config.get(k) is not None}
    if serving:
        value = _pbtxt_string(json.dumps(serving, sort_keys=True, ensure_ascii=False, default=str))
        lines += ["parameters {", '  key: "zoo_config"', f"  value: {{ string_value: {value} }}", "}"]
    return "\n".join(lines) + "\n"


def write_model_repository(
    spec_or_onnx: str | os.PathLike | ZooModel,
    out: str | os.PathLike,
    name: str | None = None,
    max_batch_size: int = 64,
    max_queue_delay_us: int = 500,
    instances: int = 1,
    kind: str = "gpu",
) -> Path:
    """Write ``out/<name>/config.pbtxt`` and ``out/<name>/1/model.onnx`` (onnxruntime_onnx, dynamic batching).

    ``spec_or_onnx``: a model, registered name, model folder, ``hf-hub:`` name or an exported ``.onnx``.
    The model folder is assembled under a temporary name and renamed into place; other models in
    the repository are left alone. Returns ``out/<name>``.
    """
    from serve.onnx import onnx_for_model

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if max_queue_delay_us < 0:
        raise ValueError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")
    if instances < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
    onnx_path = onnx_for_model(spec_or_onnx)
    inputs, outputs, cfg = _graph_io(onnx_path)
    name = name or cfg.get("name") or onnx_path.stem
    if not _NAME_RE.match(name):
        raise ValueError(f"model name {name!r} may only contain letters, digits, '.', '_' and '-'")
    text = render_config_pbtxt(name, inputs, outputs, max_batch_size, max_queue_delay_us, instances, kind, cfg)

    from zoo.checkpoint import atomic_folder

    final = Path(out) / name
    with atomic_folder(final) as tmp:  # other models in the repository are left alone
        (tmp / "1").mkdir()
        shutil.copyfile(onnx_path, tmp / "1" / "model.onnx")
        (tmp / "config.pbtxt").write_text(text, encoding="utf-8")
    return final


def cli_triton(args: argparse.Namespace) -> int:
    """``zoo triton MODEL --out REPO``."""
    folder = write_model_repository(
        args.model,
        args.out,
        name=args.name,
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
        instances=args.instances,
        kind=args.kind,
    )
    repo = Path(args.out).resolve()
    print(f"wrote {folder}/config.pbtxt and {folder}/1/model.onnx")
    text = _write_text_tower(args)  # an image-text model: its text tower is a second model of the repository
    if text is not None:
        print(f"wrote {text}/config.pbtxt and {text}/1/model.onnx (text tower: tokens -> text_features)")
    print((folder / "config.pbtxt").read_text(encoding="utf-8").rstrip())
    print(
        "\nserve it with Triton's onnxruntime backend (NVIDIA container), e.g.\n"
        f"  docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 -v {repo}:/models "
        "nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models\n"
        "or, without the container: zoo serve --backend triton (PyTriton)"
    )
    return 0


def _write_text_tower(args: argparse.Namespace) -> Path | None:
    if str(args.model).endswith(".onnx"):
        return None
    from serve.onnx import load_model

    model = load_model(str(args.model))
    if not hasattr(model, "embed_text"):
        return None
    from serve.onnx_text import text_onnx_for_model

    return write_model_repository(text_onnx_for_model(model), args.out, max_batch_size=args.max_batch_size,
                                  max_queue_delay_us=args.max_queue_delay_us, instances=args.instances,
                                  kind=args.kind)


# ----------------------------------------------------------------------------- PyTriton
def triton_python() -> Path:
    """The interpreter of the PyTriton venv: ``$ZOO_TRITON_PYTHON`` or ``$ZOO_CACHE/triton-venv/bin/python``."""
    from serve.onnx import cache_root

    env = os.environ.get("ZOO_TRITON_PYTHON")
    path = Path(env) if env else cache_root() / "triton-venv" / "bin" / "python"
    if not path.exists():
        venv = path.parent.parent
        where = "$ZOO_TRITON_PYTHON" if env else "the default location"
        raise TritonUnavailableError(
            f"no PyTriton interpreter at {path} ({where}). PyTriton needs numpy<2, so it lives in its own "
            f"virtual environment; create it with\n"
            f"  python3 -m venv {venv} && {venv}/bin/pip install nvidia-pytriton onnxruntime 'numpy<2'\n"
            f"or point ZOO_TRITON_PYTHON at a python that has them"
        )
    return path


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise TritonUnavailableError(f"cannot listen on {host}:{port}: {exc}") from None


def _http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


class PyTritonServer:
    """A real Triton server (PyTriton) serving an exported zoo ``.onnx`` file, in a separate interpreter.

    >>> with PyTritonServer(onnx_path) as server:        # free ports on 127.0.0.1
    ...     client = tritonclient.http.InferenceServerClient(server.http_address)

    ``http_port=0`` picks a free port; gRPC and metrics always get free ports. ``start()`` waits
    until ``/v2/health/ready`` and the model's ready endpoint answer 200, or raises
    :class:`TritonUnavailableError` with the worker's log tail.
    """

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        name: str | None = None,
        host: str = "127.0.0.1",
        http_port: int = 0,
        max_batch_size: int = 64,
        max_queue_delay_us: int = 500,
        threads: int = 0,
        python: str | os.PathLike | None = None,
        startup_timeout_s: float = 120.0,
        exit_timeout_s: int = 30,
        log_path: str | os.PathLike | None = None,
    ):
        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise FileNotFoundError(f"{self.onnx_path}: ONNX file not found")
        if name is None:
            from serve.onnx import read_zoo_config

            try:
                name = read_zoo_config(self.onnx_path).get("name")
            except ValueError:
                name = None
            name = name or self.onnx_path.stem
        if not _NAME_RE.match(name):
            raise ValueError(f"model name {name!r} may only contain letters, digits, '.', '_' and '-'")
        self.name: str = name
        self.host = host
        self.http_port = int(http_port)
        self.max_batch_size = int(max_batch_size)
        self.max_queue_delay_us = int(max_queue_delay_us)
        self.threads = int(threads)
        self.python = Path(python) if python else None
        self.startup_timeout_s = float(startup_timeout_s)
        self.exit_timeout_s = int(exit_timeout_s)
        self._own_log = log_path is None
        self.log_path: Path | None = Path(log_path) if log_path else None
        self.process: subprocess.Popen | None = None
        self.grpc_port: int | None = None  # free ports chosen by start()
        self.metrics_port: int | None = None

    # -- addresses
    @property
    def _probe_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host

    @property
    def http_address(self) -> str:
        """``host:port`` as ``tritonclient.http.InferenceServerClient`` wants it."""
        return f"{self._probe_host}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        """``host:port`` of Triton's gRPC endpoint, for ``tritonclient.grpc.InferenceServerClient``."""
        return f"{self._probe_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.http_address}"

    # -- lifecycle
    def start(self) -> PyTritonServer:
        if self.process is not None:
            raise RuntimeError("server already started")
        python = self.python or triton_python()
        if self.http_port == 0:
            self.http_port = _free_port(self.host)
        else:
            _check_port_free(self.host, self.http_port)
        grpc_port, metrics_port = _free_port(self.host), _free_port(self.host)
        self.grpc_port, self.metrics_port = grpc_port, metrics_port
        if self.log_path is None:
            fd, log = tempfile.mkstemp(prefix=f"zoo-pytriton-{self.name}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(log)
        cmd = [
            str(python), str(WORKER_SCRIPT),
            "--onnx", str(self.onnx_path), "--name", self.name, "--host", self.host,
            "--http-port", str(self.http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
            "--max-batch-size", str(self.max_batch_size), "--max-queue-delay-us", str(self.max_queue_delay_us),
            "--threads", str(self.threads), "--exit-timeout-s", str(self.exit_timeout_s),
            "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log_fh:
            # its own session: stop() can end the worker's tritonserver and stubs with it
            self.process = subprocess.Popen(
                cmd, stdout=log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )  # fmt: skip
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            code = self.process.poll()
            if code is not None:
                raise TritonUnavailableError(
                    f"the PyTriton worker exited with code {code} before it was ready; log {self.log_path}:\n"
                    + self.log_tail()
                )
            if self.ready():
                return
            time.sleep(0.25)
        raise TritonUnavailableError(
            f"Triton was not ready at {self.http_url} after {self.startup_timeout_s:.0f} s; "
            f"log {self.log_path}:\n" + self.log_tail()
        )

    def ready(self) -> bool:
        """Server ready and the model ready (``/v2/health/ready`` and ``/v2/models/<name>/ready``)."""
        return (
            _http_status(f"{self.http_url}/v2/health/ready") == 200
            and _http_status(f"{self.http_url}/v2/models/{self.name}/ready") == 200
        )

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(no log)"
        text = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM the worker (it shuts Triton down), wait, then SIGKILL whatever of its session is left."""
        proc, self.process = self.process, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s if timeout_s is not None else self.exit_timeout_s + 30)
            except subprocess.TimeoutExpired:
                self._kill_group(proc.pid)
                proc.wait(timeout=10)
        self._kill_group(proc.pid)  # tritonserver / stub processes that outlived the worker
        if self._own_log and self.log_path is not None and proc.returncode == 0:
            self.log_path.unlink(missing_ok=True)
        return proc.returncode

    @staticmethod
    def _kill_group(pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> PyTritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_triton_backend(args: argparse.Namespace) -> int:
    """``zoo serve --backend triton``: the model inside a real Triton server (PyTriton) on ``--host:--port``."""
    from serve.onnx import onnx_for_model

    if getattr(args, "api_key", None):
        print(
            "error: --api-key / $ZOO_API_KEY is not enforced by the Triton backend (Triton's inference "
            "endpoints take no bearer token here); use --backend embedded, or unset it and put Triton behind "
            "an authenticating proxy",
            file=sys.stderr,
        )
        return 2
    if getattr(args, "index", None):
        print("note: --index is served by the embedded backend only; Triton serves the model's outputs",
              file=sys.stderr)
    onnx_path = onnx_for_model(args.model)
    delay_us = int(round(float(getattr(args, "max_queue_delay_ms", 0.5)) * 1000))
    server = PyTritonServer(
        onnx_path,
        host=args.host,
        http_port=args.port,
        max_batch_size=getattr(args, "max_batch_size", 64),
        max_queue_delay_us=delay_us,
        threads=getattr(args, "threads", 0),
    )
    stopping = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"starting Triton (PyTriton) for {server.name} from {onnx_path} ...", flush=True)
        server.start()
        print(f"Triton serving {server.name!r} at http://{args.host}:{server.http_port} "
              f"(KServe v2: /v2/models/{server.name}/infer); worker log {server.log_path}; Ctrl-C to stop",
              flush=True)
        while not stopping:
            if not server.alive():
                print(f"error: the Triton worker exited; log {server.log_path}:\n{server.log_tail()}",
                      file=sys.stderr)
                return 1
            time.sleep(0.5)
        print("stopping Triton ...", flush=True)
        return 0
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
