"""serve.py over real HTTP on loopback: the same answers as predict.py, every bad input a 4xx with a reason,
the guards (size limit, slow clients, concurrency, crashes), and the page in a real headless Chromium."""
import http.client
import json
import os
import shutil
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import data
import predict
import serve
from test_predict import EITHER, MUST_FAIL, car_image, make_bad, make_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
UPLOAD_KINDS = [k for k in MUST_FAIL + EITHER if k not in ("missing", "empty_dir")]  # files, not paths


def start(ckpt: Path, **server_options) -> serve.Server:
    args = serve.build_parser().parse_args(["--checkpoint", str(ckpt)])
    server = serve.Server(("127.0.0.1", 0), serve.load_predictor(args), max_bytes=2**20, quiet=True,
                          **server_options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("run") / "best.pt")


@pytest.fixture(scope="module")
def server(ckpt):
    s = start(ckpt)
    yield s
    s.shutdown()
    s.server_close()


def request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 60) -> tuple[int, dict | bytes]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        raw = r.read()
        is_json = r.getheader("Content-Type", "").startswith("application/json")
        return r.status, (json.loads(raw) if is_json else raw)
    finally:
        conn.close()


def post_file(server, path: Path) -> tuple[int, dict]:
    return request(server, "POST", "/predict", path.read_bytes(), {"X-Filename": path.name})


def multipart(field: str, filename: str, payload: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def predict_cli(path: Path, ckpt: Path, capsys) -> dict:
    predict.main([str(path), "--checkpoint", str(ckpt), "--json"])
    return json.loads(capsys.readouterr().out)


def assert_alive(server) -> None:
    status, health = request(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok"


# ---------------------------------------------------------------------------------------------- answers

def test_real_photo_same_top5_as_predict(real_data, tmp_path, capsys):
    """A real photo: the API's JSON is predict.py --json's, with the upload's name as the file."""
    names = data.find_dataset(real_data).class_names
    ck = make_checkpoint(tmp_path / "best.pt", class_names=names, img_size=96)
    photo = sorted((real_data / "cars_test").glob("*.jpg"))[0]
    cli = predict_cli(photo, ck, capsys)
    s = start(ck)
    try:
        form, form_type = multipart("file", photo.name, photo.read_bytes())
        for body, headers in [(photo.read_bytes(), {"X-Filename": photo.name}),  # the raw body
                              (form, {"Content-Type": form_type})]:  # a browser form's upload
            status, res = request(s, "POST", "/predict", body, headers)
            assert status == 200, res
            assert res["errors"] == [] and len(res["predictions"]) == 1
            got, want = res["predictions"][0], cli["predictions"][0]
            assert got["file"] == photo.name
            assert [t["class"] for t in got["top"]] == [t["class"] for t in want["top"]]
            assert [t["probability"] for t in got["top"]] == pytest.approx([t["probability"] for t in want["top"]],
                                                                          abs=1e-6)
    finally:
        s.shutdown()
        s.server_close()


def test_page_health_and_nothing_else(server, ckpt):
    status, page = request(server, "GET", "/")
    assert status == 200 and b'accept="image/*"' in page and b'capture="environment"' in page
    # one style for both pages: the on-device page's <style> block, not a copy that drifts
    on_device = (REPO / "web" / "index.html").read_bytes()
    style = on_device[on_device.index(b"<style>"):on_device.index(b"</style>")]
    assert style in page and b"__STYLE__" not in page
    status, health = request(server, "GET", "/health")
    assert status == 200 and health == {"status": "ok", "model": str(ckpt), "classes": 7, "img_size": 64}
    for path in ["/serve.py", "/../serve.py", "/%2e%2e/%2e%2e/etc/passwd", "/runs/best.pt", "/predict"]:
        status, res = request(server, "GET", path)
        assert status == 404 and "error" in res, path
    status, res = request(server, "POST", "/health", b"x")
    assert status == 404


# ---------------------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("kind", UPLOAD_KINDS)
def test_bad_upload_is_4xx_like_predict(kind, server, ckpt, tmp_path, capsys):
    """Every bad file of predict.py's list: the same outcome as the command line (a must-fail file is a 400
    with a one-line reason), and the server answers the next request."""
    bad = make_bad(kind, tmp_path)
    cli = predict_cli(bad, ckpt, capsys)
    status, res = post_file(server, bad)
    if cli["errors"]:
        assert status == 400, (kind, res)
        assert res["error"] == f"{bad.name}: {cli['errors'][0]['error']}"
        assert "\n" not in res["error"] and len(res["error"]) > len(bad.name) + 5
    else:
        assert status == 200 and [t["class"] for t in res["predictions"][0]["top"]] == \
            [t["class"] for t in cli["predictions"][0]["top"]]
    if kind in MUST_FAIL:
        assert status == 400
    assert_alive(server)


@pytest.mark.parametrize("case", ["empty", "form_without_file", "multipart_without_boundary", "no_length"])
def test_unusable_request_is_4xx(case, server):
    headers = {}
    if case == "empty":
        body = b""
    elif case == "form_without_file":
        boundary = "b0undary"
        body = f"--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n--{boundary}--\r\n".encode()
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    elif case == "multipart_without_boundary":
        body, headers["Content-Type"] = b"abc", "multipart/form-data"
    else:
        body = None  # http.client sends no Content-Length for a POST without a body
    status, res = request(server, "POST", "/predict", body, headers)
    assert status in (400, 411) and res["error"] and "\n" not in res["error"], (case, res)
    assert_alive(server)


def test_oversize_upload_is_413_unread(server):
    """A body declared far over the limit: 413 from the headers alone, while the client has sent none of it."""
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):  # the server closes the connection after its answer
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.0 413") and "the limit is 1 MB" in reply
    # a real oversize body too: refused, and the server goes on
    status, res = request(server, "POST", "/predict", b"\xff" * (2**20 + 1))
    assert status == 413
    assert_alive(server)


def test_sixteen_concurrent_requests(server, tmp_path):
    photos = [car_image(tmp_path / f"car{i}.jpg", size=(160 + 8 * i, 120)) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda p: post_file(server, p), photos))
    assert [s for s, _ in replies] == [200] * 16
    assert [r["predictions"][0]["file"] for _, r in replies] == [p.name for p in photos]


def test_slow_client_cannot_hold_the_server(ckpt, tmp_path):
    """A client that sends half its headers and stalls: the others are served meanwhile; the deadline
    closes its connection; with every slot held, a request gets 503 at once, not a hang."""
    s = start(ckpt, connections=2, request_seconds=3.0)
    try:
        slow = socket.create_connection(s.server_address[:2], timeout=30)
        slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Le")
        assert post_file(s, car_image(tmp_path / "a.jpg"))[0] == 200  # served while the slow one waits
        t0 = time.monotonic()
        assert slow.recv(1024) == b""  # the deadline closed it (the test's own timeout is 30 s)
        assert time.monotonic() - t0 < 29
        slow.close()
        time.sleep(0.5)  # its slot is free again
        # Both slots held by fresh stalled clients, well inside their 3 s deadline. (Holding them with the first
        # one raced: a prediction on a busy CPU can take most of its 3 s, and its slot then came free.)
        stalled = [socket.create_connection(s.server_address[:2], timeout=30) for _ in range(2)]
        for c in stalled:
            c.sendall(b"GET /health HTTP/1.1\r\n")
        time.sleep(0.3)
        status, _ = request(s, "GET", "/health", timeout=10)
        assert status == 503
        for c in stalled:
            c.close()
        time.sleep(0.5)
        assert_alive(s)
    finally:
        s.shutdown()
        s.server_close()


def test_exception_in_a_request_is_500_and_server_lives(server, tmp_path, monkeypatch):
    def broken(name, payload):
        raise RuntimeError("simulated bug")
    monkeypatch.setattr(server.predictor, "predict", broken)
    status, res = post_file(server, car_image(tmp_path / "a.jpg"))
    assert status == 500 and res["error"] == "RuntimeError: simulated bug"
    monkeypatch.undo()
    assert post_file(server, car_image(tmp_path / "b.jpg"))[0] == 200


# ---------------------------------------------------------------------------------------------- command line

def test_main_errors_are_one_line(tmp_path, ckpt, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert serve.main(["--port", "0"]) == 2  # no runs/*/best.pt here
    err = capsys.readouterr().err
    assert err.startswith("error: no checkpoint given") and err.count("\n") == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert serve.main(["--checkpoint", str(ckpt), "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1" in err and "try another --port" in err and err.count("\n") == 1


def test_newest_checkpoint_is_taken_and_named(tmp_path, ckpt, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_checkpoint(tmp_path / "runs" / "old" / "best.pt")
    newest = make_checkpoint(tmp_path / "runs" / "new" / "best.pt")
    os.utime(tmp_path / "runs" / "old" / "best.pt", (1, 1))
    predictor = serve.load_predictor(serve.build_parser().parse_args([]))
    assert Path(predictor.source).resolve() == newest.resolve()
    assert f"using {Path(predictor.source)}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the page

def chromium_path() -> str | None:
    return os.environ.get("GHOSTCARS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def browser_or_skip():
    """(playwright.sync_api, chromium executable); in CI both must be there (.ci/run installs them), so the
    page tests run there rather than skip."""
    if os.environ.get("CI"):
        import playwright.sync_api as sync_api
    else:
        sync_api = pytest.importorskip("playwright.sync_api")
    exe = chromium_path()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs Chromium for the page tests (.ci/run installs Debian's chromium)")
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    return sync_api, exe


@pytest.mark.slow
def test_page_in_headless_chromium(real_data, tmp_path):
    """A real browser opens the page, uploads a real photo, and reads the top-5 names the API gives; a bad
    file shows the reason. The phone-sized screenshot goes to $GHOSTCARS_SCREENSHOT (docs/app.png)."""
    sync_api, browser_exe = browser_or_skip()
    # docs/app.png is taken with a trained model ($GHOSTCARS_SCREENSHOT_CKPT); the test alone needs none
    ck = (Path(os.environ["GHOSTCARS_SCREENSHOT_CKPT"]) if os.environ.get("GHOSTCARS_SCREENSHOT_CKPT") else
          make_checkpoint(tmp_path / "best.pt", class_names=data.find_dataset(real_data).class_names, img_size=96))
    # docs/app.png shows a held-out photo of the data that model trained on ($GHOSTCARS_SCREENSHOT_PHOTO)
    photo = Path(os.environ.get("GHOSTCARS_SCREENSHOT_PHOTO") or sorted((real_data / "cars_test").glob("*.jpg"))[0])
    s = start(ck)
    try:
        _, api = post_file(s, photo)
        want = [t["class"] for t in api["predictions"][0]["top"]]
        url = f"http://127.0.0.1:{s.server_address[1]}/"
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_exe, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2,
                                    is_mobile=True, has_touch=True)
            page.goto(url)
            page.set_input_files("#file", str(photo))
            page.wait_for_function("document.querySelectorAll('#results li').length === 5", timeout=30_000)
            assert page.locator("#results .name").all_inner_texts() == want
            page.wait_for_function("document.getElementById('about').textContent.length > 0", timeout=10_000)
            page.screenshot(path=os.environ.get("GHOSTCARS_SCREENSHOT", str(tmp_path / "app.png")), full_page=True)
            bad = tmp_path / "notes.jpg"
            bad.write_text("not a photo")
            page.set_input_files("#file", str(bad))
            page.wait_for_selector("#status.error", timeout=30_000)
            assert "not an image" in page.inner_text("#status")
            assert page.locator("#results li").count() == 0
            browser.close()
    finally:
        s.shutdown()
        s.server_close()
