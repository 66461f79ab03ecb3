"""``python -m lenet_xp.serve``: its JSON API over real HTTP on 127.0.0.1, bad requests, a few
hundred concurrent requests, the page's files, and the command line (the browser test is
``test_serve_browser.py``)."""

from __future__ import annotations

import http.client
import io
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA
from serve_helpers import running_server

from lenet_xp import predict, serve
from lenet_xp.data.images import TooManyPixelsError, load_digit, read_grey
from lenet_xp.data.mnist import MEAN, STD, load_mnist

Image = pytest.importorskip("PIL.Image")

#: The body limit of the test server (small, so oversized bodies are quick to send).
MAX_BODY_MB = 1.0


@pytest.fixture(scope="module")
def server(trained_checkpoint):
    """A real server for the trained checkpoint on 127.0.0.1, a free port, in a thread."""
    with running_server(trained_checkpoint, max_body_mb=MAX_BODY_MB) as srv:
        yield srv


@pytest.fixture(scope="module")
def digits():
    """The first 40 MNIST test digits (uint8, white on black) and their labels."""
    mnist = load_mnist(DATA, download=False)
    return mnist.test_images[:40], mnist.test_labels[:40]


def request(srv, method, path, body=None, headers=None):
    """``(status, headers, body bytes)`` of one request to ``srv`` over a new connection."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def post(srv, body, content_type="image/png", path="/predict"):
    """``(status, JSON answer)`` of a ``POST``."""
    status, _, data = request(srv, "POST", path, body, {"Content-Type": content_type})
    return status, json.loads(data)


def png(array, mode="L"):
    """``array`` (uint8) as PNG bytes."""
    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, "PNG")
    return out.getvalue()


def photo(digit, fmt="PNG"):
    """A test digit as a photo of it would be: dark ink on light paper, larger, off-centre."""
    big = Image.fromarray(255 - digit).resize((112, 112), Image.Resampling.BILINEAR)
    picture = Image.new("L", (170, 150), 255)
    picture.paste(big, (40, 10))
    out = io.BytesIO()
    picture.save(out, fmt)
    return out.getvalue()


def raw(srv, data, shut=False):
    """Send ``data`` on a raw socket; the status line the server answers (or ``""``)."""
    with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=60) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)  # the client sends no more
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer.decode("latin-1")


def assert_one_line_error(status, answer, expected_status, *words):
    """A 4xx answer: ``{"error": one line}`` naming ``words``, no traceback."""
    assert status == expected_status, answer
    assert list(answer) == ["error"], answer
    message = answer["error"]
    assert message and "\n" not in message and "Traceback" not in message
    for word in words:
        assert word in message, (word, message)


# -- answers ------------------------------------------------------------------------------------
def test_page_files_and_info(server):
    status, headers, page = request(server, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    html = page.decode()
    assert (
        '<canvas id="canvas"' in html and "/static/app.js" in html and "/static/style.css" in html
    )
    assert "http://" not in html and "https://" not in html  # nothing fetched from elsewhere
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    for path, kind in [("/static/app.js", "text/javascript"), ("/static/style.css", "text/css")]:
        status, headers, data = request(server, "GET", path)
        assert status == 200 and headers["Content-Type"].startswith(kind) and len(data) > 1000
        assert b"http://" not in data and b"https://" not in data
    status, _, data = request(server, "GET", "/info")
    info = json.loads(data)
    assert status == 200 and info["arch"] == "lenet5" and info["epoch"] == 2
    assert info["parameters"] == 61706 and info["input_size"] == 28 and info["device"] == "cpu"
    assert info["max_body_bytes"] == int(MAX_BODY_MB * 2**20)
    assert info["max_pixels"] == serve.DEFAULT_MAX_PIXELS == 40_000_000
    assert server.server_address[0] == "127.0.0.1"  # the default: this machine only


def test_predicts_test_digits_as_pictures_and_arrays(server, digits):
    """PNG and JPEG photos, multipart uploads and JSON arrays of MNIST test digits are read
    right (chance: 10 %); the answer holds probabilities, the input and every layer's maps."""
    images, labels = digits
    got = {"photo png": [], "photo jpeg": [], "multipart": [], "array": [], "raw array": []}
    for image in images[:20]:
        got["photo png"].append(post(server, photo(image))[1]["digit"])
        got["photo jpeg"].append(post(server, photo(image, "JPEG"), "image/jpeg")[1]["digit"])
        boundary = uuid.uuid4().hex
        form = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.png"\r\n'
                f"Content-Type: image/png\r\n\r\n"
            ).encode()
            + png(image)
            + f"\r\n--{boundary}--\r\n".encode()
        )
        multipart = f"multipart/form-data; boundary={boundary}"
        got["multipart"].append(post(server, form, multipart)[1]["digit"])
        as_json = json.dumps({"image": image.tolist()}).encode()
        got["array"].append(post(server, as_json, "application/json")[1]["digit"])
        as_is = json.dumps({"image": (image / 255).tolist(), "prepare": False}).encode()
        got["raw array"].append(post(server, as_is, "application/json")[1]["digit"])
    for how, predicted in got.items():
        assert (np.array(predicted) == labels[:20]).sum() >= 18, (how, predicted)

    status, answer = post(server, png(images[0]))
    assert status == 200 and answer["digit"] == labels[0]
    probs = np.array(answer["probabilities"])
    assert probs.shape == (10,) and abs(probs.sum() - 1) < 1e-4 and probs.argmax() == labels[0]
    assert answer["probability"] == pytest.approx(probs.max())
    seen = np.array(answer["input"])
    assert seen.shape == (28, 28) and seen.min() >= 0 and seen.max() <= 1
    maps = answer["feature_maps"]
    assert [(m["layer"], m["type"], m["shape"]) for m in maps] == [
        ("conv1", "Conv2d", [6, 28, 28]),
        ("pool1", "MaxPool2d", [6, 14, 14]),
        ("relu1", "ReLU", [6, 14, 14]),
        ("conv2", "Conv2d", [16, 10, 10]),
        ("pool2", "MaxPool2d", [16, 5, 5]),
        ("relu2", "ReLU", [16, 5, 5]),
    ]
    for m in maps:
        assert np.array(m["maps"]).shape == tuple(m["shape"])
    assert np.array(maps[2]["maps"]).min() >= 0  # after a ReLU
    curl_d = json.dumps({"image": images[0].tolist()}).encode()  # curl -d sends a form type
    assert post(server, curl_d, "application/x-www-form-urlencoded")[1]["digit"] == labels[0]
    _, lean = post(server, png(images[0]), path="/predict?maps=0")
    assert "feature_maps" not in lean and lean["probabilities"] == answer["probabilities"]


def test_phone_photos_upright_and_transparent_pictures(server, digits):
    """A photo stored sideways with the camera's EXIF rotation is read upright; a drawing on
    a transparent background (dark ink, alpha) is read as ink on paper."""
    images, labels = digits
    for image, label in zip(images[:5], labels[:5], strict=True):
        sideways = Image.open(io.BytesIO(photo(image))).transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
        out = io.BytesIO()
        sideways.save(out, "JPEG", exif=exif.tobytes())
        assert post(server, out.getvalue(), "image/jpeg")[1]["digit"] == label
        rgba = np.zeros((*image.shape, 4), np.uint8)
        rgba[..., 3] = image  # black ink where the digit is, transparent elsewhere
        assert post(server, png(rgba, "RGBA"))[1]["digit"] == label


def test_the_server_prepares_a_picture_as_predict_does(
    server, trained_checkpoint, digits, tmp_path, capsys
):
    """One code path: the picture the server reports seeing is ``load_digit``'s, and its
    probability is ``lenet_xp.predict``'s for the same file."""
    images, _ = digits
    for i in (0, 1, 2):
        path = tmp_path / f"photo{i}.jpg"
        path.write_bytes(photo(images[i], "JPEG"))
        _, answer = post(server, path.read_bytes(), "image/jpeg")
        expected = np.clip(load_digit(path)[0] * STD + MEAN, 0, 1)
        np.testing.assert_allclose(answer["input"], expected, atol=6e-4)
        assert predict.main(["--checkpoint", str(trained_checkpoint), str(path)]) == 0
        line = capsys.readouterr().out.strip()  # PATH: DIGIT (probability P)
        assert line.startswith(f"{path}: {answer['digit']} (probability ")
        assert float(line.rsplit(" ", 1)[1].rstrip(")")) == pytest.approx(
            answer["probability"], abs=1e-3
        )


# -- bad requests -------------------------------------------------------------------------------
def bad_requests(digits):
    """``(what, method, path, body, content type, status, words in the error)``."""
    images, _ = digits
    blank = png(np.full((280, 280), 255, np.uint8))
    big = np.random.default_rng(0).integers(0, 256, int(MAX_BODY_MB * 2**20) + 1000, np.uint8)
    ok = png(images[0])
    return [
        ("not an image", "POST", "/predict", b"hello, world", "image/png", 400, ["not an image"]),
        ("empty", "POST", "/predict", b"", "image/png", 400, ["empty"]),
        ("blank canvas", "POST", "/predict", blank, "image/png", 400, ["blank"]),
        ("truncated", "POST", "/predict", ok[: len(ok) // 2], "image/png", 400, ["cannot read"]),
        ("oversized", "POST", "/predict", big.tobytes(), "image/png", 413, ["over the limit"]),
        ("bad JSON", "POST", "/predict", b'{"image": [1, 2', "application/json", 400, ["JSON"]),
        ("no image", "POST", "/predict", b'{"picture": []}', "application/json", 400, ["image"]),
        (
            "wrong shape",
            "POST",
            "/predict",
            json.dumps({"image": np.zeros((28, 27)).tolist()}).encode(),
            "application/json",
            400,
            ["28x28", "(28, 27)"],
        ),
        (
            "ragged",
            "POST",
            "/predict",
            json.dumps({"image": [[0] * 28] * 27 + [[0] * 3]}).encode(),
            "application/json",
            400,
            ["28x28"],
        ),
        (
            "out of range",
            "POST",
            "/predict",
            json.dumps({"image": np.full((28, 28), 300).tolist()}).encode(),
            "application/json",
            400,
            ["0 to 255"],
        ),
        (
            "not a number",
            "POST",
            "/predict",
            b'{"image": ' + json.dumps([["x"] * 28] * 28).encode() + b"}",
            "application/json",
            400,
            ["numbers"],
        ),
        (
            "NaN",
            "POST",
            "/predict",
            b"[" + b",".join([b"[" + b",".join([b"NaN"] * 28) + b"]"] * 28) + b"]",
            "application/json",
            400,
            ["0 to 255"],
        ),
        (
            "blank array",
            "POST",
            "/predict",
            json.dumps({"image": np.zeros((28, 28)).tolist(), "prepare": False}).encode(),
            "application/json",
            400,
            ["blank"],
        ),
        (
            "bad prepare",
            "POST",
            "/predict",
            json.dumps({"image": images[0].tolist(), "prepare": "yes"}).encode(),
            "application/json",
            400,
            ["prepare"],
        ),
        (
            "form without a file",
            "POST",
            "/predict",
            b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--b--\r\n',
            "multipart/form-data; boundary=b",
            400,
            ["no file"],
        ),
        ("unknown endpoint", "POST", "/classify", ok, "image/png", 404, ["/predict"]),
        ("unknown page", "GET", "/admin", None, None, 404, ["/admin"]),
        ("GET /predict", "GET", "/predict", None, None, 405, ["POST"]),
        ("DELETE", "DELETE", "/predict", None, None, 501, ["POST /predict"]),
    ]


def test_bad_requests_get_a_4xx_and_one_line_of_json(server, digits):
    for what, method, path, body, kind, status, words in bad_requests(digits):
        headers = {"Content-Type": kind} if kind else {}
        code, _, data = request(server, method, path, body, headers)
        print(what)
        assert_one_line_error(code, json.loads(data), status, *words)


def test_a_json_body_over_1_mib_is_refused_before_parsing(trained_checkpoint, digits):
    """Under the default 20 MB body limit, JSON over 1 MiB is a 413 (parsing its numbers
    would take about 8 times the text); a pretty-printed 28x28 array is far under it."""
    with running_server(trained_checkpoint) as srv:
        pretty = json.dumps({"image": (digits[0][0] / 255.0).tolist()}, indent=8).encode()
        code, _, data = request(srv, "POST", "/predict", pretty, {"Content-Type": "text/plain"})
        assert code == 200 and json.loads(data)["digit"] == digits[1][0], data
        padded = pretty[:-1] + b" " * (2**20 + 1 - len(pretty)) + b"}"  # still valid JSON
        code, _, data = request(srv, "POST", "/predict", padded, {"Content-Type": "text/plain"})
        assert_one_line_error(code, json.loads(data), 413, "JSON body is 1.0 MiB, over the")


def test_broken_connections_do_not_stop_the_server(server, digits):
    head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    answer = raw(server, f"{head}\r\n".encode())  # no Content-Length
    assert answer.startswith("HTTP/1.0 411") and '{"error":"send a Content-Length' in answer
    answer = raw(server, f"{head}Content-Length: many\r\n\r\n".encode())
    assert answer.startswith("HTTP/1.0 400") and "bad Content-Length" in answer
    answer = raw(server, f"{head}Content-Length: 5000\r\n\r\n".encode() + b"x" * 100, shut=True)
    assert answer.startswith("HTTP/1.0 400") and "shorter than its Content-Length" in answer
    assert '{"error":' in raw(server, b"NONSENSE\r\n\r\n")  # not even HTTP
    huge = f"{head}Content-Length: {50 * 2**30}\r\n\r\n".encode()  # 50 GiB announced: refused
    assert raw(server, huge + b"x" * 1000, shut=True).startswith("HTTP/1.0 413")
    with socket.create_connection(("127.0.0.1", server.server_address[1])) as sock:
        sock.sendall(f"{head}Content-Length: 10000\r\n\r\n".encode() + b"\x89PNG")  # and hang up
    status, answer = post(server, png(digits[0][0]))
    assert status == 200 and answer["digit"] == digits[1][0]


def test_hundreds_of_concurrent_mixed_requests(server, digits, monkeypatch):
    """8 threads send 320 requests in a random mix: good pictures and arrays get exactly the
    answer they get alone, bad ones their error, forward passes never overlap; then the
    server still answers."""
    images, _ = digits
    good = [png(image) for image in images[:10]] + [photo(image) for image in images[10:15]]
    jobs = [("POST", "/predict", body, "image/png") for body in good]
    arrays = [json.dumps({"image": image.tolist()}).encode() for image in images[15:20]]
    jobs += [("POST", "/predict", body, "application/json") for body in arrays]
    alone = [request(server, *job[:3], {"Content-Type": job[3]}) for job in jobs]
    assert all(status == 200 for status, _, _ in alone)
    expected = [(200, json.loads(data)) for _, _, data in alone]
    for _what, method, path, body, kind, status, words in bad_requests(digits):
        jobs.append((method, path, body, kind))
        expected.append((status, words))
    jobs.append(("GET", "/info", None, None))
    expected.append((200, json.loads(request(server, "GET", "/info")[2])))
    layer = server.classifier.model.conv1  # counts the forward passes running at once
    running, most, count_lock = [0], [0], threading.Lock()

    def probe(x, forward=layer.forward):
        with count_lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.002)
        try:
            return forward(x)
        finally:
            with count_lock:
                running[0] -= 1

    monkeypatch.setattr(layer, "forward", probe, raising=False)
    rng = random.Random(0)
    order = [rng.randrange(len(jobs)) for _ in range(320)]
    results: list = [None] * len(order)

    def worker(k: int) -> None:
        for n in range(k, len(order), 8):
            method, path, body, kind = jobs[order[n]]
            try:
                status, _, data = request(
                    server, method, path, body, kind and {"Content-Type": kind}
                )
                results[n] = (status, json.loads(data))
            except Exception as exc:  # noqa: BLE001 (reported below, with the request)
                results[n] = exc

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    seconds = time.perf_counter() - start
    for n, job in enumerate(order):
        got, (status, want) = results[n], expected[job]
        assert not isinstance(got, Exception), (jobs[job][:2], got)
        if status == 200:
            assert got == (200, want), jobs[job][:2]
        else:
            assert_one_line_error(*got, status, *want)
    print(f"{len(order)} requests from 8 threads in {seconds:.1f} s")
    assert most[0] == 1  # one forward pass at a time
    assert request(server, "GET", "/info")[0] == 200
    assert post(server, good[0]) == expected[0]


# -- large pictures ----------------------------------------------------------------------------
def png_of(side: int, pixels: bytes) -> bytes:
    """An 8-bit greyscale PNG of ``side`` x ``side`` pixels whose compressed rows are ``pixels``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        check = zlib.crc32(kind + data).to_bytes(4, "big")
        return len(data).to_bytes(4, "big") + kind + data + check

    header = chunk(b"IHDR", side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0]))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def blank_png(side: int) -> bytes:
    """A valid white PNG of ``side`` x ``side`` pixels, compressed row by row (12,000 a side:
    144 megapixels in about 170 KB, under Pillow's decompression-bomb limit)."""
    row, packer = b"\x00" + b"\xff" * side, zlib.compressobj(9)
    return png_of(side, b"".join(packer.compress(row) for _ in range(side)) + packer.flush())


def large_photo(digit: np.ndarray, size: tuple[int, int], fmt: str, mode: str = "L") -> bytes:
    """A test digit as a photo of ``size`` (width, height) pixels in ``mode`` ("L", "RGB",
    "RGBA": opaque): dark ink, light paper."""
    picture = Image.new(mode, size, (235, 235, 235, 255)[: len(mode)])
    side = min(size) // 2
    big = Image.fromarray(255 - digit).resize((side, side), Image.Resampling.BILINEAR)
    picture.paste(big.convert(mode), (size[0] // 3, size[1] // 4))
    out = io.BytesIO()
    picture.save(out, fmt, **({"compress_level": 1} if fmt == "PNG" else {"quality": 80}))
    return out.getvalue()


def ctrl_c_stops() -> None:
    """In the server's process, before it starts: SIGINT as a terminal's Ctrl+C delivers it,
    even when these tests run where SIGINT is ignored (a shell's background job), which the
    server would inherit (Python then installs no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def peak_mib(pid: int) -> float:
    """The peak resident memory of process ``pid`` so far, in MiB (Linux's VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def test_large_pictures_refused_from_the_header_memory_stays_small(trained_checkpoint, digits):
    """The real command, 4 uploads at a time: 144-megapixel PNGs are refused (413, one line)
    before decoding and raise the server's peak memory by under 64 MiB (decoded, they took
    1.5 GB); pictures at the limit, a 36-megapixel greyscale PNG and a 48-megapixel JPEG (read
    at 1/8 scale), are answered and raise it by under 160 MiB (a greyscale picture costs about
    1.5 bytes a pixel to decode and shrink); 40-megapixel colour PNGs, with and without alpha
    (5 and 6 bytes a pixel), by under 272 MiB: the decode budget (4 grey pictures at the
    limit, 240 MB = 229 MiB) plus 43 MiB for the rest (decoded four at a time, they took
    682 MiB; one at a time but with glibc's per-thread arenas keeping what they freed, 426)."""
    if not Path("/proc/self/status").exists():
        pytest.skip("reads peak memory from /proc (Linux)")
    images, labels = digits
    cmd = [sys.executable, "-m", "lenet_xp.serve", "--checkpoint", str(trained_checkpoint)]
    proc = subprocess.Popen(
        [*cmd, "--port", "0"], stdout=subprocess.PIPE, text=True, preexec_fn=ctrl_c_stops
    )
    try:
        line = ""
        while not line.startswith("open "):
            line = proc.stdout.readline()
            assert line, "the server stopped"
        port = int(line.split()[1].rstrip("/").rsplit(":", 1)[1])

        def post_all(bodies: list[bytes]) -> list[tuple[int, dict]]:
            def send(k: int) -> None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                conn.request("POST", "/predict?maps=0", bodies[k], {"Content-Type": "image/png"})
                response = conn.getresponse()
                answers[k] = (response.status, json.loads(response.read()))
                conn.close()

            answers: list = [None] * len(bodies)
            threads = [threading.Thread(target=send, args=(k,)) for k in range(len(bodies))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            return answers

        assert post_all([png(images[0])])[0][0] == 200  # warm: the first request's imports
        start = peak_mib(proc.pid)
        for status, answer in post_all([blank_png(12_000)] * 4):
            assert_one_line_error(status, answer, 413, "12000x12000", "144.0 megapixels", "40")
        assert peak_mib(proc.pid) - start < 64
        at_limit = [large_photo(images[1], (6000, 6000), "PNG")] * 2
        at_limit += [large_photo(images[1], (8000, 6000), "JPEG")] * 2
        answers = post_all(at_limit)
        assert [(status, answer["digit"]) for status, answer in answers] == [(200, labels[1])] * 4
        assert peak_mib(proc.pid) - start < 160
        colour = [large_photo(images[3], (6324, 6324), "PNG", mode) for mode in ("RGB", "RGBA")]
        answers = post_all(colour * 2)  # 39.99 megapixels each
        assert [(status, answer["digit"]) for status, answer in answers] == [(200, labels[3])] * 4
        print(f"server peak: {start:.0f} MiB, +{peak_mib(proc.pid) - start:.0f} for colour")
        assert peak_mib(proc.pid) - start < 272
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)


def test_a_picture_over_pillows_warning_size_is_one_error_and_no_warning():
    """144 megapixels is past Pillow's decompression-bomb *warning* (89 MP): the limit we set
    refuses it in one line, and Pillow's warning does not reach the server's log."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TooManyPixelsError, match="144.0 megapixels"):
            read_grey(blank_png(12_000), max_pixels=40_000_000)
    assert [str(w.message) for w in caught] == []


def test_max_pixels_flag(trained_checkpoint, digits, capsys):
    """``--max-pixels`` sets the limit (a picture just over it gets a 413 naming it, one at it
    an answer; past Pillow's decompression-bomb limit, a 413 too); a value that is not a
    number of pixels is a bad flag (exit status 2)."""
    images, labels = digits
    picture = large_photo(images[2], (100, 100), "PNG")
    with running_server(trained_checkpoint, max_pixels=9_999) as small:
        status, answer = post(small, picture)
        assert_one_line_error(status, answer, 413, "100x100", "0.009999 megapixels")
    with running_server(trained_checkpoint, max_pixels=10_000) as exact:
        status, answer = post(exact, picture)
        assert status == 200 and answer["digit"] == labels[2]
    with running_server(trained_checkpoint, max_pixels=10**12) as unlimited:
        status, answer = post(unlimited, png_of(20_000, b""))  # over Pillow's own limit
        assert_one_line_error(status, answer, 413, "too many pixels", "400000000")
    for bad in ("lots", "0", "nan", "-5"):
        with pytest.raises(SystemExit) as exit_:
            serve.main(["--checkpoint", str(trained_checkpoint), "--max-pixels", bad])
        assert exit_.value.code == 2 and "number of pixels" in capsys.readouterr().err


# -- the command line ---------------------------------------------------------------------------
def test_cli_serves_until_ctrl_c(trained_checkpoint):
    """The real command: it says where to look (127.0.0.1 by default), serves the page, and
    Ctrl+C stops it cleanly; ``--host 0.0.0.0`` says what that exposes."""
    for host in (None, "0.0.0.0"):
        cmd = [sys.executable, "-m", "lenet_xp.serve", "--checkpoint", str(trained_checkpoint)]
        cmd += ["--port", "0"] + (["--host", host] if host else [])
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=ctrl_c_stops,
        )  # fmt: skip
        try:
            lines = []
            while not (lines and lines[-1].startswith("open ")):
                line = proc.stdout.readline()
                assert line, (lines, proc.stderr.read())
                lines.append(line.strip())
            url = lines[-1].split()[1]
            assert url.startswith("http://127.0.0.1:") and lines[0].startswith("lenet5 from ")
            exposed = [line for line in lines if "exposes" in line]
            assert bool(exposed) == (host is not None)
            if host:
                assert "0.0.0.0" in exposed[0] and "no password" in exposed[0]
            port = int(url.rstrip("/").rsplit(":", 1)[1])
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/")
            assert conn.getresponse().status == 200
            conn.close()
        finally:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "Traceback" not in err, err


def test_cli_errors_are_one_line(trained_checkpoint, tmp_path, capsys):
    assert serve.main(["--checkpoint", str(tmp_path / "missing.npz")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{serve.PROG}: error: checkpoint ")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve.main(["--checkpoint", str(trained_checkpoint), "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"port {port} on 127.0.0.1 is in use" in err[0]
    with pytest.raises(SystemExit) as exit_:
        serve.main(["--checkpoint", str(trained_checkpoint), "--port", "70000"])
    assert exit_.value.code == 2 and "0 to 65535" in capsys.readouterr().err


def test_static_files_are_in_the_package():
    folder = Path(serve.__file__).parent / "web" / "static"
    assert {p.name for p in folder.iterdir()} >= {"index.html", "app.js", "style.css"}
    files = serve.static_files()
    assert set(files) == set(serve.STATIC)  # every URL is served, from a file that exists
    assert all(body and kind for body, kind in files.values())
