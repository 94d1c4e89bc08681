"""A page and a small HTTP API that name the car in a photo: the study's app step, for a phone's browser.

    python serve.py                                        # newest runs/*/best.pt, http://127.0.0.1:8000
    python serve.py --checkpoint runs/<name>/best.pt --host 0.0.0.0   # reachable from a phone on this network
    python serve.py --model ghostnet.onnx                  # an exported model, run with onnxruntime

    python serve.py --on-device runs/<name>/web           # export.py --format web's page: the model runs on the phone
    python serve.py --on-device DIR --host 0.0.0.0 --tls-cert cert.pem --tls-key key.pem   # HTTPS: installable

    GET  /          the page: take or choose a photo, see the top-5 car models
    GET  /health    {"status": "ok", "model": ..., "classes": N}
    POST /predict   the image as the body (or multipart/form-data with one file): predict.py --json's JSON;
                    400 with {"error": "<one line>"} for an image that cannot be read, 413 above --max-mb

Nothing else is served: no path of the request ever reaches the file system. Each upload is decoded by
predict.py's own code (images.load_image: decompression bombs, truncated files, 16-bit, CMYK and alpha are
handled there), so the page, the API and the command line give the same answer for the same file.

Why the standard library's server: the project then needs nothing beyond requirements.txt, and
http.server is small enough to guard by hand. It is not meant for the open internet as it comes; the
guards added here are what a LAN demo or a reverse proxy's backend needs:
- at most --connections connections are handled at once; beyond that a request gets 503 at once
  instead of queueing without bound;
- every connection has a deadline (--request-seconds) and each socket read a timeout, so a slow or idle
  client (slowloris) loses its connection instead of holding a worker;
- a body must declare its length, and one above --max-mb gets 413 before any of it is read;
- at most --workers predictions run at once (the model is CPU-bound: more would only slow each other);
- any exception inside a request is answered with 500 and one line, never a dead server;
- it binds to 127.0.0.1 unless --host says otherwise.
"""
from __future__ import annotations

import argparse
import email.parser
import email.policy
import functools
import json
import re
import socket
import ssl
import sys
import tempfile
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

import predict
import runs
from common import project_dir


class UploadError(Exception):
    """A request whose body holds no usable upload (HTTP 400, one line)."""


class Predictor:
    """The model behind the API: predict.py's loaders and decoding, at most `workers` images at once."""

    def __init__(self, probs_fn: Callable, class_names: list[str], prep: Any, source: str, topk: int = 5,
                 workers: int = 2):
        self.probs_fn, self.class_names, self.prep, self.source = probs_fn, class_names, prep, source
        self.topk = topk
        self.slots = threading.BoundedSemaphore(workers)

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.source, "classes": len(self.class_names),
                "img_size": self.prep.img_size}

    def predict(self, name: str, payload: bytes) -> tuple[int, dict[str, Any]]:
        """(HTTP status, predict.py --json's object for this one upload, named `name` in it)."""
        # the client's name is only a label: the bytes go to a fresh private folder under a fixed name,
        # with the extension kept so that messages about the format read naturally
        suffix = Path(name).suffix.lower()
        suffix = suffix if suffix[1:].isalnum() and len(suffix) <= 6 else ""
        with tempfile.TemporaryDirectory(prefix="ghostcars-upload-") as folder:
            path = Path(folder) / f"upload{suffix}"
            path.write_bytes(payload)
            with self.slots:
                results, errors = predict.predict_files(iter([(str(path), None)]), self.probs_fn, self.class_names,
                                                        self.prep, self.topk)
        for r in results + errors:
            r["file"] = name
        out: dict[str, Any] = {"model": self.source, "predictions": results, "errors": errors}
        if errors:
            out["error"] = f"{name}: {errors[0]['error']}"
            return HTTPStatus.BAD_REQUEST, out
        return HTTPStatus.OK, out


def read_upload(content_type: str, body: bytes, header_name: str | None) -> tuple[str, bytes]:
    """(file name, image bytes) from a raw body or from the first file field of multipart/form-data."""
    if content_type.lower().startswith("multipart/form-data"):
        # the email package parses MIME multipart (the cgi module is gone from Python 3.13)
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
        if not msg.is_multipart():
            raise UploadError("multipart/form-data without a boundary; send the image as a form field named 'file'")
        for part in msg.iter_parts():
            if part.get_filename() is not None or part.get_param("name", header="content-disposition") == "file":
                return part.get_filename() or "upload", part.get_payload(decode=True) or b""
        raise UploadError("the form holds no file; send the image as a form field named 'file'")
    return (unquote(header_name) if header_name else "upload"), body


PAGE_PATH = "/"
# --on-device: the exported folder's files (webapp.py), served by name only, never by a path from the request
SITE_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".mjs": "text/javascript",
              ".wasm": "application/wasm", ".onnx": "application/octet-stream", ".json": "application/json",
              ".webmanifest": "application/manifest+json", ".png": "image/png"}


def site_files(folder: Path) -> dict[str, Path]:
    """{"/name": path} of a folder written by `export.py --format web`; "/" is its index.html."""
    if not (folder / "index.html").is_file() or not (folder / "model.onnx").is_file():
        raise predict.PredictError(f"{folder}: not an on-device page (no index.html / model.onnx); write one with "
                                   f"`python export.py runs/<name>/best.pt --format web --out {folder}`")
    files = {f"/{p.name}": p for p in folder.iterdir() if p.is_file() and p.suffix in SITE_TYPES}
    files[PAGE_PATH] = folder / "index.html"
    return files


class Handler(BaseHTTPRequestHandler):
    server: "Server"
    server_version = "ghostcars"
    timeout = 10  # seconds for any one socket read or write: an idle client is dropped

    # ---- routes
    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if self.server.site is not None:
            self.send_site_file(path)
        elif path == PAGE_PATH:
            self.send(HTTPStatus.OK, page().encode(), "text/html; charset=utf-8")
        elif path == "/health":
            self.send_json(HTTPStatus.OK, self.server.predictor.health())
        else:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no page {path}; open / or POST an image to /predict"})

    def send_site_file(self, path: str) -> None:
        f = self.server.site.get(path)
        if f is None:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no file {path}; open /"})
            return
        # cross-origin isolation: what multi-threaded WebAssembly (SharedArrayBuffer) needs in a browser
        self.send(HTTPStatus.OK, f.read_bytes(), SITE_TYPES[f.suffix],
                  {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"})

    def do_POST(self) -> None:
        if self.server.site is not None:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": "this server only hands out the page: the model runs on "
                                                           "the phone (--on-device)"})
            return
        if urlsplit(self.path).path != "/predict":
            self.send_json(HTTPStatus.NOT_FOUND, {"error": "POST the image to /predict"})
            return
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self.send_json(HTTPStatus.LENGTH_REQUIRED, {"error": "chunked uploads are not taken; send Content-Length"})
            return
        length = self.headers.get("Content-Length", "")
        if not length.strip().isdigit():
            self.send_json(HTTPStatus.LENGTH_REQUIRED, {"error": "the request has no Content-Length; send the image "
                                                                 "as the body or as a form field named 'file'"})
            return
        size, limit = int(length), self.server.max_bytes
        if size > limit:  # answered from the header alone: the body is never stored
            self.close_connection = True
            self.send_json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           {"error": f"the upload is {size / 2**20:.1f} MB; the limit is {limit / 2**20:g} MB "
                                     f"(a phone photo is usually 2-5 MB)"})
            self.discard(min(size, limit), seconds=2.0)
            return
        body = self.rfile.read(size)
        if len(body) < size:
            return  # the client went away (or ran out of time) before sending everything: nobody to answer
        try:
            name, payload = read_upload(self.headers.get("Content-Type", ""), body, self.headers.get("X-Filename"))
            if not payload:
                raise UploadError("the upload is empty; choose a photo")
        except UploadError as e:
            self.send_json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            return
        status, result = self.server.predictor.predict(name, payload)
        self.send_json(status, result)

    def discard(self, nbytes: int, seconds: float) -> None:
        """Read and drop up to nbytes of a refused body for a short while. Closing a socket with unread data
        makes TCP reset the connection, and a browser that is still sending then shows a network error
        instead of the 413's reason; a declared size beyond this is simply cut off."""
        end = time.monotonic() + seconds
        self.connection.settimeout(0.2)
        while nbytes > 0 and time.monotonic() < end:
            try:
                chunk = self.rfile.read1(min(nbytes, 65536))
            except OSError:  # the client paused (a timed-out socket file cannot be read again) or left
                return
            if not chunk:
                return
            nbytes -= len(chunk)

    # ---- replies
    def send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, obj: dict) -> None:
        self.send(status, (json.dumps(obj, indent=2) + "\n").encode(), "application/json")

    def handle_one_request(self) -> None:
        """http.server's, with any exception answered as 500 (one line) and logged; the server goes on."""
        try:
            super().handle_one_request()
        except (TimeoutError, ConnectionError, OSError):
            self.close_connection = True  # the client is gone or too slow: nothing to answer
        except Exception as e:  # a bug in a request must never take the server down
            self.close_connection = True
            traceback.print_exc(file=sys.stderr)
            try:
                self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"})
            except OSError:
                pass

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)


class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a bound on open connections and a deadline on each (see the module doc)."""
    daemon_threads = True

    def __init__(self, address: tuple[str, int], predictor: Predictor | None, max_bytes: int, connections: int = 32,
                 request_seconds: float = 30.0, quiet: bool = False, site: dict[str, Path] | None = None):
        self.predictor, self.max_bytes, self.quiet, self.site = predictor, max_bytes, quiet, site
        self.request_seconds = request_seconds
        self.connection_slots = threading.BoundedSemaphore(connections)
        super().__init__(address, Handler)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if not self.connection_slots.acquire(blocking=False):
            try:  # every slot busy: say so now rather than queue without bound
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        # the deadline: shutting the socket down ends whatever read or write the handler is blocked in
        deadline = threading.Timer(self.request_seconds, _shut, (request,))
        deadline.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            deadline.cancel()
            self.connection_slots.release()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def lan_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback, for the URL a phone opens (no traffic is sent)."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
    except OSError:
        return []
    return sorted({i[4][0] for i in infos if not i[4][0].startswith("127.")})


def load_predictor(args: argparse.Namespace) -> Predictor:
    """The model of --model (ONNX) or --checkpoint (default: the newest runs/*/best.pt); PredictError if none."""
    if args.model is not None and args.checkpoint is not None:
        raise predict.PredictError("give either --checkpoint or --model, not both")
    if args.model is not None:
        probs_fn, class_names, prep = predict.model_predictor(args.model)
        source = str(args.model)
    else:
        path = args.checkpoint
        if path is None:
            path = predict.newest_checkpoint()
            print(f"using {path} (newest runs/*/best.pt; pass --checkpoint to choose)", file=sys.stderr)
        try:
            device = predict.pick_device(args.device)
        except ValueError as e:
            raise predict.PredictError(str(e)) from None
        probs_fn, class_names, prep = predict.torch_predictor(path, device)
        source = str(path)
    return Predictor(probs_fn, class_names, prep, source, topk=args.topk, workers=args.workers)


def use_tls(server: Server, cert: Path | None, key: Path | None) -> str:
    """HTTPS with the user's certificate (a phone's browser installs the page and its service worker only
    from a secure context: https, or localhost). Returns the URL scheme."""
    if not cert and not key:
        return "http"
    if not (cert and key):
        raise ValueError("--tls-cert and --tls-key go together (the certificate and its private key, PEM)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    # the handshake happens in the connection's own thread (first read), so a slow client holds no other one
    server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    return "https"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="a checkpoint (default: the newest runs/*/best.pt)")
    ap.add_argument("--model", type=Path, help="an exported .onnx model instead (needs onnxruntime)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on; 0.0.0.0 lets a phone on the same network in")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda (checkpoints only)")
    ap.add_argument("--topk", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2, help="predictions run at once")
    ap.add_argument("--connections", type=int, default=32, help="connections handled at once (more get 503)")
    ap.add_argument("--max-mb", type=float, default=20.0, help="largest upload in MB (larger get 413)")
    ap.add_argument("--request-seconds", type=float, default=30.0, help="deadline of one connection")
    ap.add_argument("--quiet", action="store_true", help="no line per request")
    ap.add_argument("--on-device", type=Path, metavar="FOLDER",
                    help="serve the page of `export.py --format web` instead: the phone's browser runs the model "
                         "and the photo never leaves it (no --checkpoint / --model needed)")
    ap.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM), with --tls-key")
    ap.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for flag in ("topk", "workers", "connections"):
            if getattr(args, flag) < 1:
                raise predict.PredictError(f"--{flag} must be at least 1")
        site = site_files(args.on_device) if args.on_device else None
        predictor = None if site else load_predictor(args)
        server = Server((args.host, args.port), predictor, max_bytes=int(args.max_mb * 2**20),
                        connections=args.connections, request_seconds=args.request_seconds, quiet=args.quiet,
                        site=site)
        scheme = use_tls(server, args.tls_cert, args.tls_key)
    except ssl.SSLError as e:
        print(f"error: --tls-cert/--tls-key: {e.reason or e}; pass the certificate and its private key (PEM)",
              file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the port is taken
        print(f"error: cannot listen on {args.host}:{args.port} ({e.strerror or e}); try another --port",
              file=sys.stderr)
        return 2
    except (predict.PredictError, runs.CheckpointError, predict.data.DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    if site:
        print(f"serving the on-device page {args.on_device}: the phone runs the model, this server hands out files"
              + ("" if scheme == "https" else "; over plain http a phone on the LAN gets the page and the model "
                 "but no offline install (that needs HTTPS: --tls-cert/--tls-key)"))
    else:
        print(f"serving {predictor.source} ({len(predictor.class_names)} classes)")
    if host in ("0.0.0.0", "::"):
        for ip in lan_addresses() or ["<this machine's address>"]:
            print(f"open on a phone on this network: {scheme}://{ip}:{port}/")
        host = "127.0.0.1"
    print(f"open: {scheme}://{host}:{port}/   (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


@functools.cache  # one file read, not one per request
def page() -> str:
    """PAGE with the on-device page's <style> block (web/index.html): both pages look the same, from one copy."""
    html = (project_dir("web") / "index.html").read_text(encoding="utf-8")
    style = re.search(r"<style>.*?</style>", html, re.S)
    return PAGE.replace("__STYLE__", style.group(0) if style else "")


# The page: one file, no build step, no outside requests. Two buttons, because on phones a file input
# with `capture` opens the camera only, and one without it lets people pick from the gallery.
PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Which car is this?</title>
__STYLE__
</head>
<body>
<h1>Which car is this?</h1>
<p class="hint">Take a photo of a car, or choose one, and see the five car models it looks most like.</p>
<div class="buttons">
  <label class="button">Take a photo<input id="camera" type="file" accept="image/*" capture="environment"></label>
  <label class="button secondary">Choose a photo<input id="file" type="file" accept="image/*"></label>
</div>
<img id="preview" alt="the photo you chose">
<div id="status" role="status"></div>
<ol id="results" aria-label="top-5 car models"></ol>
<footer id="about"></footer>
<script>
const statusBox = document.getElementById("status");
const results = document.getElementById("results");
const preview = document.getElementById("preview");

function say(text, isError) {
  statusBox.textContent = text;
  statusBox.className = isError ? "error" : "";
}

function show(top) {
  results.innerHTML = "";
  for (const t of top) {
    const li = document.createElement("li");
    const row = document.createElement("div"); row.className = "row";
    const name = document.createElement("span"); name.className = "name"; name.textContent = t["class"];
    const pct = document.createElement("span"); pct.className = "pct";
    pct.textContent = (100 * t.probability).toFixed(1) + " %";
    const bar = document.createElement("div"); bar.className = "bar";
    const fill = document.createElement("div"); fill.style.width = (100 * t.probability).toFixed(1) + "%";
    bar.appendChild(fill); row.append(name, pct); li.append(row, bar); results.appendChild(li);
  }
}

async function send(file) {
  results.innerHTML = "";
  preview.src = URL.createObjectURL(file);
  preview.style.display = "block";
  say("Looking at " + file.name + " ...");
  let reply;
  try {
    const response = await fetch("predict", {method: "POST", body: file,
      headers: {"Content-Type": file.type || "application/octet-stream", "X-Filename": encodeURIComponent(file.name)}});
    reply = await response.json().catch(() => ({error: "the server answered " + response.status}));
    if (!response.ok) { say("This image cannot be used: " + (reply.error || response.status), true); return; }
  } catch (e) {
    say("The server cannot be reached; is it still running?", true);
    return;
  }
  say("Top " + reply.predictions[0].top.length + " car models for " + file.name + ":");
  show(reply.predictions[0].top);
}

for (const id of ["camera", "file"]) {
  document.getElementById(id).addEventListener("change", (e) => {
    if (e.target.files.length) send(e.target.files[0]);
    e.target.value = "";  // choosing the same photo again still sends it
  });
}

fetch("health").then(r => r.json()).then(h => {
  document.getElementById("about").textContent =
    "Model: " + h.model.split("/").slice(-2).join("/") + ", " + h.classes + " car models.";
}).catch(() => {});
</script>
</body>
</html>
"""


if __name__ == "__main__":
    sys.exit(main())
