"""The on-device phone page as a static folder (`python export.py CKPT --format web`): the model runs in the
phone's browser with onnxruntime-web (WebAssembly), offline after the first load, and the photo never leaves
the phone. Any static host serves the folder, or `python serve.py --on-device FOLDER`.

    index.html, app.js          the page (web/ in the repository): decode, images.py's preprocessing, top-5
    model.onnx, model.json      the model, its class names and preprocessing
    ort.wasm.min.js, ort-wasm-simd-threaded.{mjs,wasm}   onnxruntime-web, the version web/package.json pins
    manifest.webmanifest, icon-192.png, icon-512.png, sw.js   home-screen install and the offline cache

onnxruntime-web comes from npm (`npm install` in web/, which .ci/run does), never from a CDN at run time.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from common import project_dir

WEB = project_dir("web")  # web/ in a checkout; share/ghostcars/web after `pip install .` (npm install there)
ORT_DIST = WEB / "node_modules" / "onnxruntime-web" / "dist"
ORT_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
PAGE_FILES = ("index.html", "app.js")


class WebError(Exception):
    """The folder cannot be written; one line naming the fix."""


def ort_version() -> str:
    try:
        return json.loads((ORT_DIST.parent / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        raise WebError(f"onnxruntime-web is not installed in {WEB}; run `npm install` there "
                       f"(web/package.json pins its version)") from None


def icon(size: int) -> Image.Image:
    """A car on the page's blue: the home-screen icon."""
    im = Image.new("RGB", (size, size), (31, 111, 235))
    d = ImageDraw.Draw(im)
    u = size / 16
    d.rounded_rectangle((2 * u, 7 * u, 14 * u, 10.5 * u), radius=u, fill="white")  # body
    d.polygon([(4.5 * u, 7 * u), (6 * u, 4.5 * u), (10.5 * u, 4.5 * u), (12 * u, 7 * u)], fill="white")  # cabin
    for cx in (5 * u, 11 * u):
        d.ellipse((cx - 1.5 * u, 9 * u, cx + 1.5 * u, 12 * u), fill=(27, 31, 36))
    return im


def manifest(arch: str) -> dict[str, Any]:
    return {"name": "Which car is this?", "short_name": "Which car", "start_url": ".", "scope": ".",
            "display": "standalone", "background_color": "#f6f8fa", "theme_color": "#1f6feb",
            "description": f"Names the car model in a photo, on this device ({arch}, onnxruntime-web)",
            "icons": [{"src": f"icon-{s}.png", "sizes": f"{s}x{s}", "type": "image/png", "purpose": "any"}
                      for s in (192, 512)]}


def write_site(out: Path, meta: dict[str, str]) -> list[str]:
    """Everything but model.onnx (written by export.py before) into `out`; returns the folder's files.
    meta: export.metadata's strings (class names and preprocessing as JSON)."""
    version = ort_version()
    missing = [f for f in ORT_FILES if not (ORT_DIST / f).is_file()]
    if missing:
        raise WebError(f"{ORT_DIST} lacks {', '.join(missing)}; run `npm ci` in {WEB}")
    if not (out / "model.onnx").is_file():
        raise WebError(f"{out / 'model.onnx'} is missing; export the ONNX model first")
    for f in PAGE_FILES:
        shutil.copyfile(WEB / f, out / f)
    for f in ORT_FILES:
        shutil.copyfile(ORT_DIST / f, out / f)
    info = {"arch": meta["arch"], "class_names": json.loads(meta["class_names"]),
            "preprocess": json.loads(meta["preprocess"]), "input": meta["input"], "onnxruntime_web": version}
    (out / "model.json").write_text(json.dumps(info, indent=1) + "\n")
    (out / "manifest.webmanifest").write_text(json.dumps(manifest(meta["arch"]), indent=1) + "\n")
    for s in (192, 512):
        icon(s).save(out / f"icon-{s}.png")
    files = ["./", *PAGE_FILES, *ORT_FILES, "model.onnx", "model.json", "manifest.webmanifest",
             "icon-192.png", "icon-512.png"]
    h = hashlib.sha256()
    for f in files[1:]:
        h.update((out / f).read_bytes())
    sw = (WEB / "sw.js").read_text().replace("__VERSION__", f"ghostcars-{h.hexdigest()[:16]}")
    (out / "sw.js").write_text(sw.replace("__FILES__", json.dumps(files)))
    return [*files[1:], "sw.js"]
