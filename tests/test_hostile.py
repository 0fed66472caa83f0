"""The server under hostile input (issue 18): bounded memory per image and per request, no 5xx for any
client input (regressions + a hypothesis fuzz over KServe JSON, the binary extension and multipart
bodies), Triton-strict FP32 validation, parsing off the event loop; both upload field names."""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from serve.index import FeatureIndex  # noqa: E402
from serve.kserve import ApiError, check_fp32_tensor, fp32_from_bytes, fp32_from_json_data  # noqa: E402
from serve.preprocess import RESIZE_BUDGET, ImageDecodeError, Preprocessor, decode_image  # noqa: E402
from serve.server import create_app  # noqa: E402
from tests.server.helpers import ROOT, LiveServer, bomb_png, png_bytes  # noqa: E402

MEAN, STD = 0.5, 0.25
SHAPE = [1, 3, 28, 28]
N_IN = math.prod(SHAPE)


class TinyEncoder:
    """28x28 encoder in numpy: features = per-channel mean (float32, so huge inputs overflow to inf)."""

    name = "tiny"
    pretrained_cfg = {"name": "tiny", "input_size": [3, 28, 28], "mean": [MEAN] * 3, "std": [STD] * 3,
                      "crop_pct": 1.0, "interpolation": "bilinear"}
    input_shape = (3, 28, 28)
    output_names = ["features", "cluster_probs"]
    embed_dim = 3
    num_clusters = 3

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        with np.errstate(over="ignore", invalid="ignore"):
            f = images.mean(axis=(2, 3), dtype=np.float32)
            z = np.exp(np.tanh(np.nan_to_num(f)))
        return {"features": f, "cluster_probs": (z / z.sum(1, keepdims=True)).astype(np.float32)}


def constant_features(value: int) -> np.ndarray:
    """Features of a constant grey image ``value`` of ANY size: the transform makes it constant 28x28."""
    return np.full(3, (value / 255.0 - MEAN) / STD, dtype=np.float32)


@pytest.fixture(scope="module")
def srv():
    enc = TinyEncoder()
    feats = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    index = FeatureIndex.build(feats, [f"item{i}" for i in range(5)], model_name="tiny",
                               preprocess=Preprocessor(enc.pretrained_cfg).config(), index_type="flat")
    app = create_app(enc, index, max_body_bytes=32 << 20, max_batch_size=8, timeout_s=20.0)
    with LiveServer(app) as s:
        yield s


def infer_json(s, body: dict | bytes, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return s.http.post("/v2/models/tiny/infer", content=content, **kw)


def good_input(data) -> dict:
    return {"inputs": [{"name": "images", "shape": SHAPE, "datatype": "FP32", "data": data}]}


def strict_json(r: httpx.Response):
    """The body parsed as strict JSON (bare NaN / Infinity are not JSON)."""

    def refuse(c):
        raise AssertionError(f"non-JSON constant {c} in the response: {r.text[:200]}")

    return json.loads(r.content, parse_constant=refuse)


def vm_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------- 1, 2: bounded memory


def test_thin_image_resize_is_bounded_by_the_model_input():
    pre = Preprocessor(TinyEncoder.pretrained_cfg)
    seen = []
    inner = pre.transform

    class Checked:  # the transform must never be handed a resize bigger than the budget
        size = inner.size

        def resize_hw(self, h, w):
            return inner.resize_hw(h, w)

        def __call__(self, img):
            rh, rw = inner.resize_hw(img.height, img.width)
            seen.append((img.size, rh * rw))
            assert rh * rw <= RESIZE_BUDGET * 28 * 28, (img.size, (rh, rw))
            return inner(img)

    pre.transform = Checked()
    for size in [(400_000, 1), (1, 400_000), (40_000, 3), (28, 28)]:
        x = pre(Image.new("L", size, 200))
        np.testing.assert_allclose(x.mean(axis=(1, 2)), constant_features(200), atol=1e-6)
    assert seen[-1] == ((28, 28), 28 * 28)  # an ordinary image is not touched


def test_bounded_preprocessing_equals_the_full_transform():
    """Reduced / cropped paths agree with the unbounded zoo.data transform to interpolation rounding."""
    from zoo.data import transform_for

    cfg = TinyEncoder.pretrained_cfg
    pre, full = Preprocessor(cfg), transform_for(cfg)
    for h, w in [(30, 500), (4, 900), (900, 4), (300, 300), (1000, 1500), (28, 28)]:
        yy, xx = np.mgrid[0:h, 0:w]
        rgb = np.stack([127 + 100 * np.sin(xx / (w / 3 + 1) + k) * np.cos(yy / (h / 3 + 1) + k) for k in range(3)], -1)
        img = Image.fromarray(rgb.astype(np.uint8))
        a, b = full(img).numpy(), pre(img)
        # one uint8 level is 1/(255*STD) = 0.0157 after normalisation
        assert np.abs(a - b).max() <= 1.5 / (255 * STD), (h, w, np.abs(a - b).max())
    # EXIF-rotated images reduced first: still rotated once, like the full transform
    yy, xx = np.mgrid[0:300, 0:500]
    rgb = np.stack([127 + 100 * np.sin(xx / 60 + k) * np.cos(yy / 45 + 2 * k) for k in range(3)], -1)
    rgb[:50, :80] = 255  # an asymmetric mark: a wrong rotation moves it
    for orientation in (3, 6, 8):
        img = Image.fromarray(rgb.astype(np.uint8))
        exif = img.getexif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        img.save(buf, format="PNG", exif=exif.tobytes())
        img = decode_image(buf.getvalue())
        assert np.abs(full(img).numpy() - pre(img)).max() <= 1.5 / (255 * STD), orientation


@pytest.mark.skipif(not reset_peak(), reason="needs /proc/self/clear_refs (Linux)")
def test_thin_image_costs_no_memory(srv):
    """A 1x100000 PNG (300 bytes) made the resize allocate ~250 MB; now a few MB."""
    thin = png_bytes(Image.new("L", (100_000, 1), 200))
    srv.http.get("/v2/health/live")
    reset_peak()
    before = vm_kb("VmRSS")
    r = srv.http.post("/embed", files={"file": ("thin.png", thin, "image/png")}, params={"normalize": "false"})
    grown_mb = (vm_kb("VmHWM") - before) / 1024
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["embeddings"][0], constant_features(200), atol=1e-5)
    assert grown_mb < 60, grown_mb


@pytest.mark.skipif(not reset_peak(), reason="needs /proc/self/clear_refs (Linux)")
def test_embed_holds_one_decoded_image_at_a_time(srv):
    """Ten 3000x3000 PNGs (9 MB decoded each) were all decoded before any was preprocessed."""
    big = png_bytes(Image.new("L", (3000, 3000), 90))
    files = [("files", (f"big{i}.png", big, "image/png")) for i in range(10)]
    srv.http.get("/v2/health/live")
    reset_peak()
    before = vm_kb("VmRSS")
    r = srv.http.post("/embed", files=files, params={"normalize": "false"})
    grown_mb = (vm_kb("VmHWM") - before) / 1024
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["embeddings"]), np.tile(constant_features(90), (10, 1)), atol=1e-5)
    assert grown_mb < 60, grown_mb  # 10 decoded images alone are 86 MB


# ---------------------------------------------------------------------- 3: PIL's bomb warning


def test_images_between_89_and_179_mpx_are_a_400(srv, tmp_path):
    bomb = bomb_png(12000, 12000)  # 144 Mpx: PIL warns (DecompressionBombWarning) instead of raising
    for path in ("/classify", "/embed", "/search"):
        r = srv.http.post(path, files={"file": ("big.png", bomb, "image/png")})
        assert r.status_code == 400, r.text
        assert "big.png" in r.json()["error"] and "pixels" in r.json()["error"]
    with warnings.catch_warnings():  # a caller that turns warnings into errors gets the same answer
        warnings.simplefilter("error")
        for side in (12000, 20000):
            with pytest.raises(ImageDecodeError, match="pixels"):
                decode_image(bomb_png(side, side), max_pixels=10**9, name="x.png")
    from serve.demo import _load_query

    (tmp_path / "big.png").write_bytes(bomb)
    with pytest.raises(ImageDecodeError, match="big.png.*pixels"):
        _load_query(str(tmp_path / "big.png"))


# ---------------------------------------------------------------------- 4, 5, 9: strict KServe JSON


def test_deeply_nested_json_is_a_400(srv):
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"inputs":' + b"[" * 50_000 + b"]" * 50_000 + b"}"):
        r = infer_json(srv, body)
        assert r.status_code == 400 and "nested too deeply" in r.json()["error"], r.text
    r = infer_json(srv, good_input([[[[[[0.0]]]]]]))
    assert r.status_code == 400 and "nested more than 4" in r.json()["error"]
    assert srv.http.get("/v2/health/live").status_code == 200


@pytest.mark.parametrize("bad, literal", [(float("nan"), "NaN"), (float("inf"), "Infinity"),
                                          (-float("inf"), "-Infinity"), (1e39, "1e39"), (-3.5e38, "-3.5e38")])
def test_non_finite_and_out_of_range_fp32_are_refused_naming_the_index(srv, bad, literal):
    at = 1234
    values = [0.25] * N_IN
    text = json.dumps(good_input(values)).replace("0.25", literal, at + 1).replace(literal, "0.25", at)
    assert json.loads(text)["inputs"][0]["data"][at] != 0.25
    r = infer_json(srv, text.encode())
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "'images'" in err and f"element {at}" in err and "finite" in err
    # the binary extension: the same refusal (1e39 and -3.5e38 as float32 are +-inf)
    x = np.full(N_IN, 0.25, dtype="<f4")
    with np.errstate(over="ignore"):
        x[at] = np.float64(bad).astype(np.float32)
    hdr = json.dumps({"inputs": [{"name": "images", "shape": SHAPE, "datatype": "FP32",
                                  "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    r = infer_json(srv, hdr + x.tobytes(), headers={"Inference-Header-Content-Length": str(len(hdr))})
    assert r.status_code == 400 and f"element {at}" in r.json()["error"], r.text


def test_fp32_helpers_for_every_front_end():
    """The functions a gRPC front end calls: same rules, ApiError(400) naming tensor and index."""
    ok = fp32_from_json_data([[1, 2.5], [3, 4]], "t", [2, 2])
    np.testing.assert_array_equal(ok, np.array([[1, 2.5], [3, 4]], dtype=np.float32))
    assert ok.dtype == np.float32
    with pytest.raises(ApiError, match=r"'t': element 3 .* Inf"):
        fp32_from_bytes(np.array([0, 1, 2, np.inf], dtype="<f4").tobytes(), "t", [4])
    with pytest.raises(ApiError, match="element 1 .*outside the FP32 range"):
        check_fp32_tensor(np.array([0.0, 1e39]), "t")
    with pytest.raises(ApiError, match="16 bytes of FP32 data but shape"):
        fp32_from_bytes(b"\0" * 16, "t", [5])


@pytest.mark.parametrize("mutate, needle", [
    (lambda b: b["inputs"][0]["data"].__setitem__(7, "1.5"), "element 7 (at nesting depth 1) is str '1.5'"),
    (lambda b: b["inputs"][0]["data"].__setitem__(0, True), "element 0 (at nesting depth 1) is bool"),
    (lambda b: b["inputs"][0].__setitem__("data", [False] * N_IN), "is bool"),
    (lambda b: b["inputs"][0]["data"].__setitem__(3, None), "is NoneType"),
    (lambda b: b.__setitem__("parameters", []), "request: parameters must be a JSON object"),
    (lambda b: b["inputs"][0].__setitem__("parameters", []), "input 'images': parameters must be a JSON object"),
    (lambda b: b.__setitem__("outputs", [{"name": "features", "parameters": []}]), "parameters must be a JSON"),
    (lambda b: b.__setitem__("outputs", [{"name": "features", "parameters": {"binary_data": "yes"}}]),
     "binary_data must be true or false"),
    (lambda b: b.__setitem__("id", {"a": 1}), "'id' must be a string"),
    (lambda b: b["inputs"][0].__setitem__("shape", [True, 3, 28, 28]), "shape"),
    (lambda b: b["inputs"][0]["data"].__setitem__(5, 10**400), "outside the FP32 range"),
])
def test_triton_strictness(srv, mutate, needle):
    body = good_input([0.5] * N_IN)
    mutate(body)
    r = infer_json(srv, json.dumps(body).encode())
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"], r.json()
    r = infer_json(srv, good_input([0.5] * N_IN))
    assert r.status_code == 200
    np.testing.assert_allclose(strict_json(r)["outputs"][0]["data"], [0.5] * 3)


def test_outputs_that_overflow_are_a_400_with_valid_json(srv):
    """Finite inputs so large the model overflows (the tiny encoder's float32 mean): JSON cannot hold the
    result, so the answer is a 400 naming the output; asked as binary, the IEEE values come back."""
    body = good_input([3e38] * N_IN)
    r = infer_json(srv, body)
    assert r.status_code == 400 and "'features'" in r.json()["error"] and "not finite" in r.json()["error"]
    body["outputs"] = [{"name": "features", "parameters": {"binary_data": True}}]
    r = infer_json(srv, body)
    assert r.status_code == 200
    hl = int(r.headers["Inference-Header-Content-Length"])
    assert np.isinf(np.frombuffer(r.content[hl:], dtype="<f4")).all()


# ---------------------------------------------------------------------- 6: off the event loop


_SERVER = textwrap.dedent("""
    import sys
    import numpy as np
    from serve.server import bind_socket, create_app, run_server

    class Tiny:
        name = "tiny"
        pretrained_cfg = {"name": "tiny", "input_size": [3, 28, 28], "mean": [0.5] * 3, "std": [0.25] * 3}
        input_shape = (3, 28, 28)
        output_names = ["features"]
        embed_dim = 3
        num_clusters = None

        def run(self, images):
            return {"features": images.mean(axis=(2, 3))}

    sock = bind_socket("127.0.0.1", 0)
    print(sock.getsockname()[1], flush=True)
    sys.exit(run_server(create_app(Tiny(), max_body_bytes=32 << 20), sock, log_level="warning"))
""")


def test_health_and_metrics_answer_within_50ms_while_15mb_json_is_parsed(tmp_path):
    """A server process (its own GIL) parses a 15 MB JSON infer request while another client polls
    /v2/health/live and /metrics; every poll must answer within 50 ms. Parsing on the event loop
    stalled them for the whole parse (0.25 s here, 1.3 s in the issue). The machine is shared, so a
    measurement spoilt by the OS scheduler is repeated, up to 3 times; a blocked loop fails all three."""
    script = tmp_path / "server.py"
    script.write_text(_SERVER)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        base = f"http://127.0.0.1:{int(proc.stdout.readline())}"
        x = np.random.default_rng(1).random((330, *SHAPE[1:]), dtype=np.float32)
        body = json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
        assert len(body) > 15e6
        probe = httpx.Client(base_url=base, timeout=10)
        deadline = time.time() + 30
        while True:
            try:
                if probe.get("/v2/health/live").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        worst = []
        for _attempt in range(3):
            result = {}

            def big(result=result):
                with httpx.Client(base_url=base, timeout=60) as c:
                    result["r"] = c.post("/v2/models/tiny/infer", content=body)

            lat = []
            t = threading.Thread(target=big)
            t.start()
            while t.is_alive():
                for path in ("/v2/health/live", "/metrics"):
                    t0 = time.perf_counter()
                    assert probe.get(path).status_code == 200
                    lat.append(time.perf_counter() - t0)
                time.sleep(0.005)
            t.join()
            r = result["r"]
            assert r.status_code == 200, r.text[:300]
            np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"]).reshape(330, 3),
                                       x.mean(axis=(2, 3)), rtol=1e-5)
            assert len(lat) >= 6, lat  # the probes overlapped the request
            worst.append(max(lat))
            if max(lat) < 0.050:
                break
        probe.close()
        assert min(worst) < 0.050, worst
    finally:
        proc.terminate()
        proc.wait(20)


# ---------------------------------------------------------------------- issue 13.3: file / files


@pytest.mark.parametrize("field", ["file", "files"])
def test_every_image_endpoint_takes_file_and_files(srv, field):
    grey = [png_bytes(Image.new("L", (28, 28), v)) for v in (40, 200)]
    one = {field: ("g.png", grey[0], "image/png")}
    two = [(field, (f"g{i}.png", b, "image/png")) for i, b in enumerate(grey)]
    r = srv.http.post("/embed", files=one, params={"normalize": "false"})
    assert r.status_code == 200 and r.json()["files"] == ["g.png"]
    np.testing.assert_allclose(r.json()["embeddings"][0], constant_features(40), atol=1e-5)
    r = srv.http.post("/embed", files=two, params={"normalize": "false"})
    np.testing.assert_allclose(r.json()["embeddings"], [constant_features(40), constant_features(200)], atol=1e-5)
    enc = TinyEncoder()
    for b, v in zip(grey, (40, 200)):
        probs = enc.run(np.full((1, *SHAPE[1:]), constant_features(v)[0], np.float32))["cluster_probs"][0]
        r = srv.http.post("/classify", files={field: ("g.png", b, "image/png")})
        assert r.status_code == 200 and r.json()["cluster"] == int(np.argmax(probs)) and r.json()["file"] == "g.png"
        np.testing.assert_allclose(r.json()["probabilities"], probs, atol=1e-5)
    r = srv.http.post("/classify", files=two)
    assert [x["file"] for x in r.json()["results"]] == ["g0.png", "g1.png"]
    r = srv.http.post("/search", files=one, params={"k": 2})
    assert r.status_code == 200 and len(r.json()["neighbours"]) == 2 and r.json()["file"] == "g.png"
    r = srv.http.post("/search", files=two, params={"k": 2})
    assert [len(x["neighbours"]) for x in r.json()["results"]] == [2, 2]
    # both names in one request: all files, 'file' first
    r = srv.http.post("/embed", files=[("files", ("b.png", grey[1], "image/png")), ("file", ("a.png", grey[0], "image/png"))])
    assert r.json()["files"] == ["a.png", "b.png"]


def test_openapi_documents_both_field_names(srv):
    spec = srv.http.get("/openapi.json").json()
    for path in ("/embed", "/classify", "/search"):
        ref = spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
        props = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]
        assert {"file", "files"} <= set(props), (path, props)
        assert "'file' or 'files'" in props["file"]["description"]


# ---------------------------------------------------------------------- fuzz: 4xx or 200, never 5xx

_FUZZ = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
json_leaf = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6)
             | st.sampled_from([1e39, -1e39, 3.4e38, 0.5]))
json_any = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                        max_leaves=12)


@st.composite
def tensor_data(draw):
    """A right-sized data list (flat or nested) with a few elements replaced by anything JSON."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = rng.random(N_IN).tolist()
    for _ in range(draw(st.integers(0, 3))):
        values[draw(st.integers(0, N_IN - 1))] = draw(json_leaf)
    if draw(st.booleans()):
        values = np.array(values, dtype=object).reshape(SHAPE).tolist()
    return values[: draw(st.sampled_from([N_IN, N_IN - 1]))] if draw(st.booleans()) else values


def mostly(good, bad):
    """``good`` three times in four, else ``bad``: bodies stay valid enough to reach the deeper checks."""
    return st.one_of(st.just(good), st.just(good), st.just(good), bad)


infer_input = st.fixed_dictionaries({
    "name": mostly("images", json_any), "datatype": mostly("FP32", st.sampled_from(["FP16", "BYTES"]) | json_any),
    "shape": mostly(SHAPE, st.lists(st.integers(-1, 30) | json_leaf, max_size=5) | json_any),
    "data": tensor_data() | tensor_data() | json_any,
}, optional={"parameters": json_any | st.just({"binary_data_size": N_IN * 4})})
infer_body = st.fixed_dictionaries({"inputs": st.lists(infer_input, min_size=1, max_size=1) | json_any}, optional={
    "id": st.text(max_size=5) | json_any, "parameters": json_any | st.just({"binary_data_output": True}),
    "outputs": st.lists(st.fixed_dictionaries({"name": mostly("features", json_any)},
                                              optional={"parameters": json_any}), max_size=2) | json_any,
})


def _assert_served(r: httpx.Response) -> None:
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if r.headers.get("content-type", "").startswith("application/json"):
        body = strict_json(r)
        assert r.status_code == 200 or "error" in body


@_FUZZ
@given(body=infer_body, raw=st.none() | st.binary(max_size=64), gz=st.booleans())
def test_fuzz_kserve_json(srv, body, raw, gz):
    content = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Encoding": "gzip"} if gz else {}
    _assert_served(infer_json(srv, gzip.compress(content) if gz else content, headers=headers))


@_FUZZ
@given(seed=st.integers(0, 2**16), inject=st.lists(st.tuples(st.integers(0, N_IN - 1),
                                                           st.sampled_from([math.nan, math.inf, -math.inf])
                                                           | st.floats(width=32)), max_size=3),
       size=mostly(None, st.integers(-4, N_IN * 4 + 8) | json_leaf), extra=mostly(b"", st.binary(max_size=16)),
       hl=mostly(None, st.integers(-2, 100_000) | st.text("0123456789-x", min_size=1, max_size=4)),
       truncate=mostly(0, st.integers(1, 8)))
def test_fuzz_binary_extension(srv, seed, inject, size, extra, hl, truncate):
    x = np.random.default_rng(seed).random(N_IN).astype("<f4")
    for i, v in inject:
        x[i] = v
    hdr = json.dumps({"inputs": [{"name": "images", "shape": SHAPE, "datatype": "FP32",
                                  "parameters": {"binary_data_size": N_IN * 4 if size is None else size}}],
                      "outputs": [{"name": "features", "parameters": {"binary_data": True}}]}).encode()
    content = hdr + x.tobytes()[truncate:] + extra
    header_length = str(len(hdr)) if hl is None else str(hl)
    r = infer_json(srv, content, headers={"Inference-Header-Content-Length": header_length})
    _assert_served(r)
    if hl is None and size is None and not truncate and not extra:  # a valid request
        assert (r.status_code == 200) == bool(np.isfinite(x).all()), r.text[:200]


@st.composite
def upload(draw):
    kind = draw(st.sampled_from(["png", "bytes", "truncated", "bomb"]))
    if kind == "bytes":
        content = draw(st.binary(max_size=200))
    elif kind == "bomb":  # declared sizes around PIL's two bomb limits and ours
        side = draw(st.sampled_from([6400, 9500, 12000, 14000, 20000]))
        content = bomb_png(side, draw(st.sampled_from([side, 1, 2])))
    else:
        w, h = draw(st.integers(1, 300)), draw(st.integers(1, 40))
        mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P", "1", "I;16", "LA"]))
        fmt = draw(st.sampled_from(["PNG", "GIF", "BMP", "TIFF", "WEBP"]))
        img = Image.new(mode, (w, h) if draw(st.booleans()) else (h, w))
        buf = io.BytesIO()
        try:
            img.save(buf, format=fmt)
        except (OSError, ValueError, KeyError):
            img.convert("RGB").save(buf, format="PNG")
        content = buf.getvalue()
        if kind == "truncated":
            content = content[: draw(st.integers(0, max(0, len(content) - 1)))]
    field = draw(st.sampled_from(["file", "files", "image"]))
    return field, (draw(st.text(max_size=12)) or "x", content, draw(st.sampled_from(["image/png", "text/plain"])))


@_FUZZ
@given(files=st.lists(upload(), max_size=3), path=st.sampled_from(["/embed", "/classify", "/search"]),
       k=st.integers(-1, 8))
def test_fuzz_multipart_uploads(srv, files, path, k):
    r = srv.http.post(path, files=files or None, data=None if files else {"x": "1"},
                      params={"k": k} if path == "/search" else None)
    _assert_served(r)


def test_fuzz_left_the_server_healthy_and_without_5xx(srv):
    from tests.server.helpers import metric_samples, metric_sum

    assert srv.http.get("/v2/health/live").json() == {"live": True}
    assert srv.http.get("/v2/health/ready").json() == {"ready": True}
    samples = metric_samples(srv.http.get("/metrics").text)
    assert metric_sum(samples, "zoo_http_failures_total", kind="server") == 0
    assert metric_sum(samples, "zoo_http_failures_total", kind="client") > 100
