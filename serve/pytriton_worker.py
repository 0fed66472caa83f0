"""Serve an exported zoo ONNX model inside a real Triton Inference Server through PyTriton.

A standalone script, run by the interpreter of the separate triton venv (nvidia-pytriton needs
numpy<2; the main venv has numpy>=2). It imports only the standard library, numpy, onnxruntime
and pytriton, never ``zoo`` or torch: everything it needs (names, shapes, the zoo config) is in
the ``.onnx`` file. :class:`serve.triton.PyTritonServer` starts it; by hand::

    $ZOO_CACHE/triton-venv/bin/python serve/pytriton_worker.py --onnx model.onnx --http-port 8000

Triton runs the model in its Python backend (PyTriton's proxy), which calls onnxruntime here;
dynamic batching merges concurrent requests up to ``--max-batch-size``. Serves until SIGTERM or
SIGINT, then shuts Triton down cleanly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import sysconfig
import threading


def _fix_libpython_path() -> None:
    """Put this interpreter's libpython folder first on LD_LIBRARY_PATH (inherited by tritonserver).

    Triton's Python backend stub links libpython dynamically; when it picks up another libpython
    than the one this interpreter runs on, the stub dies with
    ``'_thread.RLock' object has no attribute '_recursion_count'``.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir or not os.path.isdir(libdir):
        return
    parts = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if not parts or parts[0] != libdir:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *[p for p in parts if p != libdir]])


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx", required=True, help="exported model (serve/onnx.py)")
    p.add_argument("--name", help="model name in Triton (default: the zoo name stored in the file)")
    p.add_argument("--host", default="127.0.0.1", help="address of the HTTP, gRPC and metrics endpoints")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-queue-delay-us", type=int, default=500)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: default)")
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument("--exit-timeout-s", type=int, default=30, help="how long shutdown waits for in-flight requests")
    p.add_argument("--parent-pid", type=int, default=0, help="stop when this process is gone (0: never)")
    return p.parse_args(argv)


def _session(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as serve.onnx.OnnxEncoder
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(path, sess_options=opts, providers=providers)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    _fix_libpython_path()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    log = logging.getLogger("zoo.pytriton_worker")

    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    if not os.path.isfile(args.onnx):
        print(f"error: {args.onnx}: ONNX file not found", file=sys.stderr)
        return 2
    sess = _session(args.onnx, args.threads)
    meta = sess.get_modelmeta().custom_metadata_map
    cfg = json.loads(meta.get("zoo_config", "{}"))
    name = args.name or cfg.get("name") or os.path.splitext(os.path.basename(args.onnx))[0]
    (inp,) = sess.get_inputs()
    outs = sess.get_outputs()
    if len(inp.shape) != 4 or not all(isinstance(d, int) for d in inp.shape[1:]):
        print(f"error: {args.onnx}: input {inp.name!r} has shape {inp.shape}; expected [batch,3,H,W]",
              file=sys.stderr)
        return 2
    output_names = [o.name for o in outs]

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        images = np.ascontiguousarray(inputs[inp.name], dtype=np.float32)
        results = sess.run(output_names, {inp.name: images})
        return dict(zip(output_names, results))

    config = TritonConfig(
        http_address=args.host,
        http_port=args.http_port,
        grpc_address=args.host,
        grpc_port=args.grpc_port,
        metrics_address=args.host,
        metrics_port=args.metrics_port,
        log_verbose=args.log_verbose,
        exit_timeout_secs=args.exit_timeout_s,
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    triton = Triton(config=config)
    try:
        triton.bind(
            model_name=name,
            infer_func=infer,
            inputs=[Tensor(name=inp.name, dtype=np.float32, shape=tuple(inp.shape[1:]))],
            outputs=[Tensor(name=o.name, dtype=np.float32, shape=tuple(o.shape[1:])) for o in outs],
            config=ModelConfig(
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
            ),
            strict=True,
        )
        triton.run()
        log.info("model %r (%s -> %s) served at http://%s:%d", name, inp.name, output_names,
                 args.host, args.http_port)
        while not stop.wait(1.0):
            if not triton.is_alive():
                log.error("Triton or its model proxy died")
                return 1
            if args.parent_pid and os.getppid() != args.parent_pid:
                log.info("parent process %d is gone: stopping", args.parent_pid)
                break
    finally:
        triton.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
