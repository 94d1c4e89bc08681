"""The on-device page (export.py --format web, webapp.py, serve.py --on-device) in a real headless Chromium:
the page loads from loopback, the browser context goes offline, and real crops photos are classified in the
browser one after another with logits that match predict.py's (same preprocessing in JavaScript); a file that
is not an image gets one line; a reload while offline still predicts (the service worker)."""
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import export
import images
import model as M
import runs
import serve
import webapp
from test_serve import browser_or_skip
from test_train import REPO

CROPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "crops" / "stanford_cars"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """An exported page of a GhostNet trained for a few epochs on the crops (a small subset at 96 px with the
    fast recipe and its test crop, as a user's command line would train it: about half a minute). At 96 px
    with the 0.8 test crop, a 384x200 crop needs no JPEG draft decoding, so the page's pixels are Pillow's."""
    if not (CROPS / "devkit" / "cars_meta.mat").exists():
        pytest.skip(f"real crops not found at {CROPS}")
    try:
        webapp.ort_version()
    except webapp.WebError as e:
        if os.environ.get("CI"):
            pytest.fail(str(e))
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("web")
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--data", str(CROPS.parent), "--out", str(root),
                           "--name", "crops", "--recipe", "fast", "--img-size", "96", "--epochs", "3",
                           "--batch-size", "32", "--limit-train", "384", "--limit-val", "64", "--device", "cpu",
                           "--threads", "1", "--workers", "0", "--no-tensorboard", "--cache-dir", str(root / "cache")],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ck = root / "best.pt"  # final.pt of the run, where the tests look for it
    shutil.copyfile(root / "crops" / "final.pt", ck)
    assert runs.load_checkpoint(ck)["preprocess"]["test_crop"] == 0.8
    assert export.main([str(ck), "--format", "web", "--out", str(root / "site"), "--runs", "2",
                        "--verify-count", "2"]) == 0
    return root


def start(folder: Path) -> serve.Server:
    s = serve.Server(("127.0.0.1", 0), None, max_bytes=2**20, quiet=True, site=serve.site_files(folder))
    threading.Thread(target=s.serve_forever, daemon=True).start()
    return s


def torch_logits(ckpt_path: Path, photo: Path) -> torch.Tensor:
    """predict.py's logits for one photo: images.load_image with the checkpoint's preprocessing, BN folded."""
    ckpt = runs.load_checkpoint(ckpt_path)
    prep = images.Preprocess.from_dict(ckpt["preprocess"])
    net = M.fuse_for_inference(runs.model_from_checkpoint(ckpt, ghost_op="torch")).eval()
    with torch.inference_mode():
        return net(prep.to_model_input(images.load_image(photo, prep)[None])).float()[0]


def test_site_files_and_the_server_hand_out_only_them(site):
    meta = export.metadata(runs.load_checkpoint(site / "best.pt"), str(site / "best.pt"), fp16=False)
    files = set(webapp.write_site(site / "site", meta))
    assert {"index.html", "app.js", "model.onnx", "model.json", "sw.js", "manifest.webmanifest",
            *webapp.ORT_FILES} <= files
    manifest = json.loads((site / "site" / "manifest.webmanifest").read_text())
    assert {i["sizes"] for i in manifest["icons"]} == {"192x192", "512x512"}
    s = start(site / "site")
    try:
        conn = http.client.HTTPConnection(*s.server_address[:2], timeout=30)
        for path, status in (("/", 200), ("/model.json", 200), ("/ort-wasm-simd-threaded.wasm", 200),
                             ("/../best.pt", 404), ("/%2e%2e/best.pt", 404), ("/best.pt", 404)):
            conn.request("GET", path)
            r = conn.getresponse()
            r.read()
            assert r.status == status, path
            if status == 200:
                assert r.getheader("Cross-Origin-Embedder-Policy") == "require-corp"
        conn.request("POST", "/predict", body=b"x")
        r = conn.getresponse()
        assert r.status == 404 and b"runs on the phone" in r.read()
        conn.close()
    finally:
        s.shutdown()
        s.server_close()


@pytest.mark.slow
def test_page_predicts_offline_like_predict(site, tmp_path):
    sync_api, exe = browser_or_skip()
    photos = sorted((CROPS / "cars_test").glob("*.jpg"))[:6]
    want = {p.name: torch_logits(site / "best.pt", p) for p in photos}
    s = start(site / "site")
    url = f"http://127.0.0.1:{s.server_address[1]}/"
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
            context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2,
                                          is_mobile=True, has_touch=True)
            page = context.new_page()
            page.goto(url)
            page.wait_for_function("document.getElementById('status').textContent === 'Ready.'", timeout=60_000)
            page.evaluate("navigator.serviceWorker.ready.then(() => true)")  # the offline cache is filled
            context.set_offline(True)

            def predict_in_page(photo: Path) -> torch.Tensor:
                page.set_input_files("#file", str(photo))
                page.wait_for_function(f"document.getElementById('status').textContent === {json.dumps(photo.name)}",
                                       timeout=60_000)
                return torch.tensor(json.loads(page.inner_text("#logits")))

            first = None
            for p in photos:
                got = predict_in_page(p)
                first = got if first is None else first
                pw_, pt_ = got.softmax(0), want[p.name].softmax(0)
                assert (pw_ - pt_).abs().max() <= 0.02, p.name
                # stricter: the page resizes as Pillow does (these crops are too small for JPEG draft decoding),
                # so the logits differ only by the JPEG decoders' rounding of a few pixels (7e-3 of 6.6 seen)
                assert (got - want[p.name]).abs().max() <= 1e-2 * max(1.0, want[p.name].abs().max().item()), p.name
                top2 = pt_.topk(2).values
                if top2[0] - top2[1] > 0.05:
                    assert got.argmax() == want[p.name].argmax(), p.name
            bad = tmp_path / "notes.jpg"
            bad.write_text("not a photo")
            page.set_input_files("#file", str(bad))
            page.wait_for_selector("#status.error", timeout=30_000)
            assert "not an image" in page.inner_text("#status") and "\n" not in page.inner_text("#status")
            page.reload()  # offline: the service worker answers
            page.wait_for_function("document.getElementById('status').textContent === 'Ready.'", timeout=60_000)
            assert torch.equal(predict_in_page(photos[0]), first)
            page.screenshot(path=os.environ.get("GHOSTCARS_SCREENSHOT", str(tmp_path / "on-device.png")),
                            full_page=True)
            browser.close()
    finally:
        s.shutdown()
        s.server_close()


def test_https_with_the_users_certificate(site, tmp_path):
    """--tls-cert/--tls-key: the page over HTTPS (what a phone needs to install it and to work offline); one of
    the two alone, or a key that is not one, is a one-line error."""
    import shutil
    import ssl
    import subprocess
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    s = serve.Server(("127.0.0.1", 0), None, max_bytes=2**20, quiet=True, site=serve.site_files(site / "site"))
    assert serve.use_tls(s, cert, key) == "https"
    threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.check_hostname = False
        conn = http.client.HTTPSConnection("127.0.0.1", s.server_address[1], context=ctx, timeout=30)
        conn.request("GET", "/")
        r = conn.getresponse()
        assert r.status == 200 and b"Which car is this?" in r.read()
        conn.close()
    finally:
        s.shutdown()
        s.server_close()
    assert serve.main(["--on-device", str(site / "site"), "--port", "0", "--tls-cert", str(cert)]) == 2
    assert serve.main(["--on-device", str(site / "site"), "--port", "0", "--tls-cert", str(cert),
                       "--tls-key", str(cert)]) == 2
    assert serve.main(["--on-device", str(tmp_path)]) == 2  # not an exported page


@pytest.mark.slow
def test_parity_benchmark_runs_end_to_end(site, tmp_path):
    """benchmarks/web_parity.py on three crops photos: what it reports is what the page and predict.py gave."""
    browser_or_skip()
    sys_path = str(Path(__file__).resolve().parents[1] / "benchmarks")
    import sys
    sys.path.insert(0, sys_path)
    try:
        import web_parity
        assert web_parity.main(["--checkpoint", str(site / "best.pt"), "--data", str(CROPS.parent), "--limit", "3",
                                "--site", str(site / "site"), "--out", str(tmp_path)]) == 0
    finally:
        sys.path.remove(sys_path)
    res = json.loads((tmp_path / "web_parity.json").read_text())
    assert res["metrics"]["photos"] == 3 and res["metrics"]["top1_agree"] == 1.0
    assert res["metrics"]["max_prob_diff"] <= 0.02 and "web_parity.py" in res["command"]
