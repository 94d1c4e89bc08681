"""Export a trained checkpoint for use in an app, then check the exported file against PyTorch.

    python export.py runs/<name>/best.pt --format onnx            # -> runs/<name>/best.onnx
    python export.py runs/<name>/best.pt --format pt2             # -> runs/<name>/best.pt2 (+ best.pt2.json)
    python export.py runs/<name>/best.pt --format onnx --fp16 --batch 1 --out car.onnx
    python export.py runs/<name>/best.pt --format pte             # -> runs/<name>/best.pte (+ best.pte.json), ExecuTorch
    python export.py runs/<name>/best.pt --format web             # -> runs/<name>/web/, the on-device page (webapp.py)

What the file holds: the model with BatchNorm folded into the convolutions (model.fuse_for_inference)
and the ghost op lowered to standard operators (the plain-PyTorch path, model.set_ghost_op(m, "torch")),
so it runs where the ghost_ext extension does not exist; both formats are lowered the same way, so a
.pt2 loads with torch alone. Input "images": (N, C, H, W) float32, already resized and normalized as
the "preprocess" metadata says; output "logits": (N, num_classes) float32 (also with --fp16, which
computes in float16 inside the graph but keeps float32 at the edges, so apps feed the same tensors).

Preprocessing and labels travel with the model, so an app needs nothing else:
  ONNX: metadata_props "class_names" (JSON list), "preprocess" (JSON dict, the checkpoint's), "arch",
        plus "format", "num_classes", "precision", "input", "output", "source";
  pt2:  the same keys as JSON, both inside the archive (torch.export.save extra_files "ghostcars.json")
        and in a sidecar FILE.pt2.json. read_metadata(path) reads either format.

After writing, the file is run (onnxruntime / torch.export.load) on a few images (--images, else
synthetic) and its logits and top-1 compared with the original PyTorch model; both latencies at batch 1
on CPU are printed. ONNX needs the [export] extra: pip install onnx onnxscript onnxruntime.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

import data
import model as M
import webapp
from runs import CHECKPOINT_FORMAT, CheckpointError, config_of, load_checkpoint, model_from_checkpoint
from common import time_models
# names, not the module: verify_inputs takes a parameter called images
from images import ImageError, ImageSize, Preprocess, load_image

METADATA_FILE = "ghostcars.json"            # name inside the .pt2 archive (torch.export.save extra_files)
# Tolerances on the logits, as max|exported - pytorch| / max|pytorch| per image (an element-wise ratio
# blows up on logits near zero, so the scale is the image's largest logit).
TOL_FP32 = 1e-4
TOL_FP16 = 2e-2                             # float16 has ~3 decimal digits; errors add up over ~20 layers
TOL_INT8 = 0.25                             # 8-bit activations: a sanity bound; accuracy is what counts (bench_mobile)


class ExportError(Exception):
    """A user-facing export problem (missing extra, bad option); one line."""


class VerifyError(Exception):
    """The exported file does not reproduce the PyTorch model within tolerance."""


# ----------------------------------------------------------------------------------------------------
# the model as an app sees it


class AppModel(nn.Module):
    """images (float32, normalized) -> logits (float32). With fp16 the weights and activations are
    float16 inside, the casts at both edges keep the app's interface identical to the float32 file."""

    def __init__(self, net: nn.Module, fp16: bool = False):
        super().__init__()
        self.net = net.half() if fp16 else net
        self.fp16 = fp16

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.fp16:
            return self.net(images.half()).float()
        return self.net(images)


def app_model(ckpt: dict[str, Any], fp16: bool = False) -> AppModel:
    """BN-folded, ghost op lowered to plain PyTorch ops (exportable anywhere), eval mode."""
    net = model_from_checkpoint(ckpt, ghost_op="torch")
    fused = M.fuse_for_inference(net)
    M.set_ghost_op(fused, "torch")          # the copy keeps the setting, but say it: the export needs it
    return AppModel(fused, fp16).eval()


def metadata(ckpt: dict[str, Any], source: str, fp16: bool) -> dict[str, str]:
    """String key/values (ONNX metadata_props only hold strings); JSON where the value is structured."""
    # The checkpoint's dict with its defaults resolved (e.g. grayscale with RGB stats -> gray stats), so
    # an app that preprocesses by hand reads the values training really used.
    p = {**ckpt["preprocess"], **Preprocess.from_dict(ckpt["preprocess"]).to_dict()}
    chans = 1 if p["grayscale"] else 3
    height, width = ImageSize.of(p["img_size"]).hw
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": str(ckpt["arch"]),
        "num_classes": str(int(ckpt["num_classes"])),
        "class_names": json.dumps(list(ckpt["class_names"])),
        "preprocess": json.dumps(p),
        "precision": "float16" if fp16 else "float32",
        "input": f"images: float32 (N, {chans}, {height}, {width}); RGB (or gray) in [0, 1], "
                 "the central preprocess.test_crop of each side (1 = all of it) squash-resized, "
                 "then (x - mean) / std per channel when preprocess.normalize",
        "output": "logits: float32 (N, num_classes); softmax for probabilities, index into class_names",
        "source": Path(source).name,
    }


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Metadata of an exported .onnx or .pt2, with class_names / preprocess decoded from JSON."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx
        proto = onnx.load(str(path), load_external_data=False)
        raw = {p.key: p.value for p in proto.metadata_props}
    elif path.suffix == ".pte":             # an ExecuTorch program holds no metadata: the sidecar only
        raw = json.loads(sidecar_path(path).read_text())
    else:
        side = sidecar_path(path)
        if side.exists():
            raw = json.loads(side.read_text())
        else:                               # the copy inside the archive (a lone .pt2 still works)
            extra = {METADATA_FILE: ""}
            torch.export.load(str(path), extra_files=extra)
            raw = json.loads(extra[METADATA_FILE])
    out: dict[str, Any] = dict(raw)
    for key in ("class_names", "preprocess"):
        if key in out:
            out[key] = json.loads(out[key])
    return out


def sidecar_path(pt2: str | Path) -> Path:
    return Path(str(pt2) + ".json")


# ----------------------------------------------------------------------------------------------------
# exporters


def require_onnx() -> None:
    """The ONNX path's optional dependencies, or one line saying what to install."""
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"--format onnx needs {', '.join(missing)}: pip install onnx onnxscript onnxruntime "
                          "(the [export] extra)")


def _batch_dim(batch: str) -> Any:
    return torch.export.Dim("batch", min=1, max=4096) if batch == "dynamic" else None


def export_onnx(app: AppModel, example: torch.Tensor, out: Path, meta: dict[str, str], batch: str,
                opset: int) -> dict[str, Any]:
    """torch.onnx.export with the dynamo (torch.export-based) exporter: the default in torch 2.x and
    the one that is maintained; the TorchScript exporter is deprecated. All weights inline (a few MB),
    so the app ships one file."""
    import onnx
    dyn = _batch_dim(batch)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")     # exporter chatter; real failures raise
        prog = torch.onnx.export(app, (example,), dynamo=True, input_names=["images"],
                                 output_names=["logits"], opset_version=opset, optimize=True,
                                 dynamic_shapes={"images": {0: dyn}} if dyn is not None else None,
                                 verbose=False, external_data=False)
    proto = prog.model_proto
    onnx.helper.set_model_props(proto, meta)
    proto.doc_string = "GhostNet-family car classifier (ghostcars); see metadata_props"
    onnx.checker.check_model(proto, full_check=True)
    ops = sorted({(n.domain or "", n.op_type) for n in proto.graph.node})
    foreign = [f"{d}::{o}" for d, o in ops if d not in ("", "ai.onnx")]
    if foreign or len(proto.functions):
        raise ExportError(f"{out}: exported graph has non-standard operators {foreign or list(proto.functions)}; "
                          "it would need an extension to run (please report this)")
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out))
    opset_v = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return {"opset": opset_v, "op_types": [o for _, o in ops], "nodes": len(proto.graph.node)}


def export_pt2(app: AppModel, example: torch.Tensor, out: Path, meta: dict[str, str], batch: str) -> dict[str, Any]:
    """torch.export.export -> ExportedProgram; the ghost op is already lowered to aten ops, so
    torch.export.load needs neither this repo nor the extension."""
    dyn = _batch_dim(batch)
    with torch.no_grad():
        ep = torch.export.export(app, (example,), dynamic_shapes={"images": {0: dyn}} if dyn is not None else None)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    custom = sorted(t for t in targets if "ghost_ext" in t)
    if custom:
        raise ExportError(f"{out}: the ghost op was not lowered ({custom}); please report this")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(meta, indent=1)
    with warnings.catch_warnings():         # "No complete tensor found in the group": weights that are
        warnings.simplefilter("ignore")     # views of one storage; harmless on CPU, and verified below
        torch.export.save(ep, str(out), extra_files={METADATA_FILE: text})
    sidecar_path(out).write_text(text + "\n")
    return {"op_types": sorted(t.split(".")[1] if t.startswith("aten.") else t for t in targets),
            "nodes": len(ep.graph.nodes), "sidecar": str(sidecar_path(out))}


def require_executorch() -> None:
    import importlib.util
    if importlib.util.find_spec("executorch") is None:
        raise ExportError("--format pte needs ExecuTorch, installed so that it keeps this torch: "
                          "pip install executorch==1.5.1 -c <(echo torch==$(python -c 'import torch; "
                          "print(torch.__version__)'))")


def export_pte(app: AppModel, example: torch.Tensor, out: Path, meta: dict[str, str],
               calib: torch.Tensor | None = None) -> dict[str, Any]:
    """An ExecuTorch program for phones (ExecuTorch's Android/iOS runtimes): torch.export at batch 1, then
    every supported operator lowered to the XNNPACK delegate (ARM/x86 CPU kernels). The ghost op is already
    plain aten ops here (app_model uses the reference path), so the file needs no custom kernel. Class names
    and preprocessing go to the sidecar JSON, as for .pt2."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    import copy
    # XNNPACK lays out its own tensors: it takes the weights NCHW (fuse_for_inference made them channels_last)
    app = copy.deepcopy(app).to(memory_format=torch.contiguous_format)
    net = quantize_pt2e(app, calib) if calib is not None else app
    with torch.no_grad():
        ep = torch.export.export(net, (example[:1].contiguous(),))
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    names = [getattr(n.target, "__name__", str(n.target)) for n in edge.exported_program().graph.nodes
             if n.op == "call_function"]
    ops = sorted({n.split(".")[1] if n.startswith("aten.") else n for n in names})  # what XNNPACK did not take
    prog = edge.to_executorch()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(prog.buffer)
    sidecar_path(out).write_text(json.dumps(meta, indent=1) + "\n")
    return {"op_types": ops, "nodes": len(ops), "sidecar": str(sidecar_path(out))}


def calibration_batch(ckpt: dict[str, Any], count: int, seed: int = 0) -> torch.Tensor:
    """`count` training images of the checkpoint's own run (its --val-split hold-out and the test split left
    out), seeded, preprocessed as the model sees them: what int8 quantization calibrates its ranges on."""
    cfg = config_of(ckpt)
    spec = data.find_dataset(cfg.run.data)
    train = data.make_splits(spec, val_split=cfg.data.val_split, seed=data.holdout_seed(cfg.flat()))["train"]
    prep = Preprocess.from_dict(ckpt["preprocess"])
    return torch.stack([prep.to_model_input(load_image(r.path, prep)[None])[0]
                        for r in data.subset(train, count, seed)])


def quantize_onnx(fp32: Path, out: Path, calib: torch.Tensor) -> None:
    """Static int8 (QDQ) with onnxruntime's tools: int8 weights per channel, uint8 activations with ranges
    from the calibration images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Images(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calib.split(1))

        def get_next(self) -> dict | None:
            b = next(self.batches, None)
            return None if b is None else {"images": b.numpy()}
    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(str(pre), str(out), Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    pre.unlink()


def quantize_pt2e(app: AppModel, calib: torch.Tensor) -> torch.nn.Module:
    """PT2E static int8 with ExecuTorch's XNNPACK quantizer (symmetric, per-channel weights), calibrated on
    the images; the result is exported and lowered like the float32 model."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    gm = torch.export.export(app, (calib[:1],)).module()
    prepared = prepare_pt2e(gm, XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True)))
    with torch.no_grad():
        for b in calib.split(1):
            prepared(b)
    return convert_pt2e(prepared)


# ----------------------------------------------------------------------------------------------------
# verification: run the exported file and compare with PyTorch


def onnx_session_options(threads: int):
    """onnxruntime options for timing beside PyTorch: `threads` intra-op threads that do not spin."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # onnxruntime's pool spins on the cores for a while after each run by default; timed round robin with
    # PyTorch, that spin stole the cores from the PyTorch call after it (19.8 ms against 7.5 ms measured
    # alone, 2 threads). Without it each side's latency is its own.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def load_runner(path: Path, fmt: str, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A float32 images -> float32 logits function backed by the exported file only."""
    if fmt == "onnx":
        import onnxruntime as ort
        sess = ort.InferenceSession(str(path), onnx_session_options(threads), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(sess.run(["logits"], {"images": x.numpy()})[0])
    if fmt == "pte":
        from executorch.runtime import Runtime
        method = Runtime.get().load_program(str(path)).load_method("forward")
        # a batch-1 program: one image at a time
        return lambda x: torch.cat([method.execute([x[i:i + 1].contiguous()])[0] for i in range(len(x))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # some torch versions warn about read-only weight buffers
        module = torch.export.load(str(path)).module()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x)
    return run


def find_images(paths: list[str], limit: int) -> list[Path]:
    """Files as given, folders searched (sorted) for images; the first `limit`."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.suffix.lower() in data.IMAGE_EXTS)
        elif p.exists():
            found.append(p)
        else:
            raise ExportError(f"{p}: no such image or folder; pass --images with existing files")
        if len(found) >= limit:
            break
    if paths and not found:
        raise ExportError(f"no images found under {' '.join(paths)}; pass .jpg/.png files or a folder of them")
    return found[:limit]


def verify_inputs(prep_dict: dict[str, Any], images: list[str], count: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """Normalized float32 (count, C, H, W) through the same preprocessing predict.py uses."""
    prep = Preprocess.from_dict(prep_dict)
    files = find_images(images, count) if images else []
    if files:
        u8 = torch.stack([load_image(str(f), prep) for f in files])
        what = f"{len(files)} images from {images[0] if len(images) == 1 else 'the given paths'}"
    else:                                   # synthetic: smooth colour blobs, not white noise, so the
        g = torch.Generator().manual_seed(seed)  # activations look roughly like a photo's
        low = torch.randint(0, 256, (count, prep.channels, 8, 8), generator=g).float()
        u8 = nn.functional.interpolate(low, size=prep.hw, mode="bilinear",
                                       align_corners=False).round().clamp(0, 255).to(torch.uint8)
        what = f"{count} synthetic images"
    x = prep.to_model_input(u8)
    return x.float().contiguous(), what


def compare_logits(got: torch.Tensor, ref: torch.Tensor, tol: float) -> dict[str, Any]:
    """Relative error per image (max abs diff / max abs logit) and top-1 agreement. A top-1 change only
    counts where the reference's top-2 margin exceeds twice the absolute error (a real disagreement,
    not a near-tie that any rounding may flip)."""
    diff = (got - ref).abs().amax(1)
    rel = diff / ref.abs().amax(1).clamp_min(1e-12)
    top_ref, top_got = ref.argmax(1), got.argmax(1)
    two = ref.topk(min(2, ref.shape[1]), 1).values
    margin = two[:, 0] - two[:, -1]
    flips = (top_ref != top_got) & (margin > 2 * diff)
    return {"max_rel": float(rel.max()), "max_abs": float(diff.max()), "top1_agree": int((top_ref == top_got).sum()),
            "n": int(ref.shape[0]), "real_flips": int(flips.sum()), "tol": tol,
            "ok": bool(rel.max() <= tol and not flips.any())}


# ----------------------------------------------------------------------------------------------------
# command line


def default_out(ckpt_path: Path, fmt: str, fp16: bool, int8: bool = False) -> Path:
    return ckpt_path.with_suffix((".fp16" if fp16 else ".int8" if int8 else "") + "." + fmt)


def export(ckpt_path: str | Path, fmt: str = "onnx", out: str | Path | None = None, fp16: bool = False,
           batch: str = "dynamic", opset: int = 18, images: list[str] | None = None, verify_count: int = 8,
           verify: bool = True, threads: int | None = None, runs: int = 50,
           log: Callable[[str], None] = print, int8: bool = False, calib_count: int = 200) -> dict[str, Any]:
    """Export, verify and time; returns what it printed as a dict. Raises ExportError / VerifyError /
    CheckpointError / data.DataError / images.ImageError with one-line messages."""
    if fmt in ("onnx", "web"):
        require_onnx()                      # before the slow work, so the hint comes at once
    if fmt == "pte":
        require_executorch()
    if fp16 and fmt in ("pte", "web"):
        raise ExportError(f"--format {fmt} is float32 or --int8; drop --fp16")
    if int8 and (fp16 or fmt not in ("onnx", "pte")):
        raise ExportError("--int8 makes .onnx (onnxruntime QDQ) and .pte (XNNPACK) files; not with --fp16 or "
                          f"--format {fmt}")
    ckpt_path = Path(ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    site = None
    if fmt == "web":                        # a folder: the ONNX model in it, then the page around it
        webapp.ort_version()                # npm's copy of onnxruntime-web is there, before the slow work
        site = Path(out) if out else ckpt_path.parent / "web"
        site.mkdir(parents=True, exist_ok=True)
        out, fmt = site / "model.onnx", "onnx"
    out = Path(out) if out else default_out(ckpt_path, fmt, fp16, int8)
    if out.resolve() == ckpt_path.resolve():
        raise ExportError(f"{out}: --out would overwrite the checkpoint; choose another file")
    if threads is not None and threads < 1:
        raise ExportError(f"--threads {threads}: give at least 1")
    if fmt == "onnx" and opset < 18:
        raise ExportError(f"--opset {opset}: the torch.onnx (dynamo) exporter writes opset 18 or newer")
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    torch.manual_seed(0)

    app = app_model(ckpt, fp16)
    x, what = verify_inputs(ckpt["preprocess"], images or [], max(verify_count, 1))
    example = x[:1] if batch == "1" else x[:2] if len(x) >= 2 else x.repeat(2, 1, 1, 1)
    meta = metadata(ckpt, str(ckpt_path), fp16)
    calib = calibration_batch(ckpt, calib_count) if int8 else None
    if int8:
        meta["precision"] = f"int8 (static, calibrated on {len(calib)} training images)"
    t0 = time.perf_counter()
    if fmt == "onnx" and int8:  # float32 first, then onnxruntime's quantizer over it
        info = export_onnx(app, example, out.with_suffix(".fp32.onnx"), meta, batch, opset)
        quantize_onnx(out.with_suffix(".fp32.onnx"), out, calib)
        out.with_suffix(".fp32.onnx").unlink()
        import onnx
        info["op_types"] = sorted({n.op_type for n in onnx.load(str(out)).graph.node})
    else:
        info = (export_onnx(app, example, out, meta, batch, opset) if fmt == "onnx"
                else export_pte(app, example, out, meta, calib) if fmt == "pte"
                else export_pt2(app, example, out, meta, batch))
    info.update(path=str(out), size_mb=out.stat().st_size / 2**20, export_s=time.perf_counter() - t0)
    log(f"wrote {out} ({info['size_mb']:.2f} MB, {fmt}{', opset ' + str(info['opset']) if fmt == 'onnx' else ''}, "
        f"{meta['precision']}, batch {batch}, {info['export_s']:.1f} s) "
        f"arch={meta['arch']} classes={meta['num_classes']} "
        f"img_size={ImageSize.of(ckpt['preprocess']['img_size']).text}")
    log(f"  operators: {' '.join(info['op_types'])}")
    if fmt == "pt2":
        log(f"  metadata: inside the archive ({METADATA_FILE}) and {info['sidecar']}")
    if fmt == "pte":
        log(f"  metadata: {info['sidecar']} (class names, preprocessing); batch 1, XNNPACK delegate")
    if not verify:
        if site is not None:
            info["site"] = webapp.write_site(site, meta)
        return info

    # The reference is the checkpoint's own model, unfused, float32, with the plain-PyTorch ghost op
    # (the op's oracle), so the check covers BN folding, the lowering and the format in one comparison
    # and does not depend on whether (or how well) the extension is built here.
    ref_net = model_from_checkpoint(ckpt, ghost_op="torch").eval()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = ref_net(x).float()
    run = load_runner(out, fmt, threads)
    if batch == "1":
        got = torch.cat([run(x[i:i + 1]) for i in range(len(x))])
    else:
        got = run(x)
    cmp = compare_logits(got.float(), ref, TOL_INT8 if int8 else TOL_FP16 if fp16 else TOL_FP32)
    info["verify"] = cmp
    log(f"  verify on {what}: max rel error {cmp['max_rel']:.2e} (tolerance {cmp['tol']:.0e}), "
        f"max abs {cmp['max_abs']:.2e}, top-1 agrees {cmp['top1_agree']}/{cmp['n']} -> "
        f"{'OK' if cmp['ok'] else 'FAILED'}")

    fused = M.fuse_for_inference(ref_net)   # what predict.py runs: BN folded, extension if built
    M.set_ghost_op(fused, "auto")
    x1 = x[:1]

    runtime = {"onnx": "onnxruntime", "pte": "executorch.runtime"}.get(fmt, "torch.export.load")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # time_models runs under torch.inference_mode already
        times = time_models({"pytorch": fused, runtime: run}, {"pytorch": x1, runtime: x1}, runs, warmup=3)
    lat_torch, lat_exp = (statistics.median(times[n]) * 1e3 for n in ("pytorch", runtime))
    info["latency_ms"] = {"pytorch": lat_torch, runtime: lat_exp, "threads": threads}
    log(f"  latency batch 1, CPU, {threads} thread{'s' if threads > 1 else ''} (median): "
        f"{runtime} {lat_exp:.2f} ms, PyTorch eager (BN folded) {lat_torch:.2f} ms")
    if not cmp["ok"]:
        raise VerifyError(f"{out}: exported model differs from PyTorch (max rel error {cmp['max_rel']:.2e} > "
                          f"{cmp['tol']:.0e} or top-1 changed); the file was kept for inspection")
    if site is not None:
        info["site"] = webapp.write_site(site, meta)
        log(f"wrote the on-device page in {site} (onnxruntime-web {webapp.ort_version()}): serve it with "
            f"`python serve.py --on-device {site}` or any static HTTPS host")
    return info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a checkpoint to ONNX or a torch.export program (.pt2), "
                                "with preprocessing and class names inside, and verify it against PyTorch.")
    p.add_argument("checkpoint", help="checkpoint written by train.py, e.g. runs/<name>/best.pt")
    p.add_argument("--format", choices=("onnx", "pt2", "pte", "web"), default="onnx",
                   help="onnx: onnxruntime and any ONNX runtime (needs pip install onnx onnxscript onnxruntime); "
                        "pt2: torch.export.load in PyTorch; pte: an ExecuTorch program (XNNPACK) for Android/iOS apps (needs "
                        "executorch); web: a static folder, the phone page that runs the "
                        "model in the browser (needs `npm install` in web/) (default: onnx)")
    p.add_argument("--out", help="output file (default: the checkpoint's path with .onnx / .pt2, .fp16.onnx with --fp16; "
                                 "for web a folder, default web/ beside the checkpoint)")
    p.add_argument("--fp16", action="store_true",
                   help=f"float16 weights and compute, float32 input/output: half the file, for GPU / mobile "
                        f"runtimes (on x86 CPUs float32 is faster); verified to a relative tolerance of {TOL_FP16:g}")
    p.add_argument("--int8", action="store_true",
                   help="static int8 quantization calibrated on --calib-count training images of the run (onnx: "
                        "onnxruntime QDQ; pte: PT2E with the XNNPACK quantizer): about a quarter of the file")
    p.add_argument("--calib-count", type=int, default=200, help="calibration images for --int8 (default 200)")
    p.add_argument("--batch", choices=("dynamic", "1"), default="dynamic",
                   help="dynamic: any batch size; 1: fixed batch 1 (some mobile runtimes want static shapes)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18, the exporter's minimum)")
    p.add_argument("--images", nargs="+", metavar="PATH",
                   help="images or folders for the verification (default: synthetic images)")
    p.add_argument("--verify-count", type=int, default=8, help="how many images to verify on (default 8)")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison and the latency figures")
    p.add_argument("--threads", type=int, help="CPU threads for both latencies (default: torch's default)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per latency, PyTorch and the exported file interleaved (default 50)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        export(args.checkpoint, args.format, args.out, args.fp16, args.batch, args.opset, args.images,
               args.verify_count, not args.no_verify, args.threads, args.runs, int8=args.int8,
               calib_count=args.calib_count)
    except VerifyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ExportError, webapp.WebError, CheckpointError, data.DataError, ImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
