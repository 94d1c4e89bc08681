"""Top-k car models for one or more images.

    python predict.py car.jpg [more.jpg photos/ ...] [--checkpoint runs/<name>/best.pt] [--topk 5] [--json]
    python predict.py car.jpg --model ghostnet.onnx          # an exported model, run with onnxruntime
    python predict.py car.jpg --model best.pte               # an ExecuTorch program (export.py --format pte)
    python predict.py car.jpg --bbox 30,40,600,380           # crop first (models trained with --crop-bbox)

Preprocessing is the checkpoint's own (images.load_image + the checkpoint's Preprocess), the same code
the training cache used, so a prediction sees exactly what training saw. The model runs BN-folded.
Unreadable inputs each get one line `error: <file>: <reason>` on stderr; the rest are still predicted
and the exit status is 2 when any failed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

import data
import images
import model as M
import runs
from common import pick_device


class PredictError(Exception):
    """A setup problem (no model, bad option) that stops the whole run."""


def newest_checkpoint() -> Path:
    """The most recently written runs/*/best.pt (runs.newest_checkpoint), or a PredictError naming the fix."""
    found = runs.newest_checkpoint("best.pt")
    if found is None:
        raise PredictError("no checkpoint given and no runs/*/best.pt found; train one with "
                           "`python train.py --data DIR` or pass --checkpoint PATH")
    return found


def expand_inputs(items: list[str]) -> Iterator[tuple[str, str | None]]:
    """(path, None) for each image to try, or (item, reason) for an item that yields none.

    A file named on the command line is always tried whatever its extension (load_image says what is
    wrong with it); a folder contributes its image files, recursively.
    """
    for item in items:
        p = Path(item)
        if p.is_dir():
            try:
                files = sorted(f for f in p.rglob("*") if f.suffix.lower() in data.IMAGE_EXTS and f.is_file()
                               and not any(part.startswith(".") for part in f.relative_to(p).parts))
            except OSError as e:  # e.g. a subfolder without read permission
                yield item, f"cannot list this folder ({e.strerror or e})"
                continue
            if not files:
                yield item, f"no images in this folder (looked for {', '.join(sorted(data.IMAGE_EXTS))})"
            for f in files:
                yield str(f), None
        elif p.exists():
            yield item, None
        else:
            yield item, "no such file or folder"


def parse_bbox(text: str) -> tuple[int, int, int, int]:
    try:
        x1, y1, x2, y2 = (int(round(float(v))) for v in text.split(","))
    except ValueError:
        raise PredictError(f"--bbox {text!r}: expected four numbers x1,y1,x2,y2 (pixels of the original image)")
    if x2 <= x1 or y2 <= y1 or min(x1, y1) < 0:
        raise PredictError(f"--bbox {text!r}: needs 0 <= x1 < x2 and 0 <= y1 < y2")
    return x1, y1, x2, y2


def torch_predictor(ckpt_path: Path, device: torch.device,
                    ghost_op: str = "auto") -> tuple[Callable, list[str], "images.Preprocess"]:
    """(probabilities of a float batch, class names, preprocessing) from a checkpoint, BN folded."""
    ckpt = runs.load_checkpoint(ckpt_path)
    prep = images.Preprocess.from_dict(ckpt["preprocess"])
    net = M.fuse_for_inference(runs.model_from_checkpoint(ckpt, ghost_op=ghost_op)).to(device).eval()

    @torch.inference_mode()
    def probs(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(net(x.to(device)).float(), dim=1).cpu()
    return probs, list(ckpt["class_names"]), prep


def onnx_predictor(onnx_path: Path) -> tuple[Callable, list[str], "images.Preprocess"]:
    """The same for an exported .onnx (metadata: class_names, preprocess, arch; input images, output logits)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise PredictError(f"{onnx_path}: running an .onnx model needs onnxruntime: pip install onnxruntime")
    if not onnx_path.is_file():
        raise PredictError(f"{onnx_path}: no such file; export one with `python export.py`")
    try:
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types for every kind of bad file
        raise PredictError(f"{onnx_path}: not a loadable ONNX model ({str(e).splitlines()[0][:200]})")
    meta = sess.get_modelmeta().custom_metadata_map
    try:
        class_names = json.loads(meta["class_names"])
        prep = images.Preprocess.from_dict(json.loads(meta["preprocess"]))
    except (KeyError, ValueError, TypeError) as e:
        raise PredictError(f"{onnx_path}: metadata 'class_names'/'preprocess' missing or invalid ({e}); "
                           "export the model with export.py")
    inp = sess.get_inputs()[0]
    fixed_batch = isinstance(inp.shape[0], int)  # exported for a fixed batch (usually 1): feed one at a time

    def probs(x: torch.Tensor) -> torch.Tensor:
        arr = x.float().cpu().numpy()
        chunks = [arr[i:i + 1] for i in range(len(arr))] if fixed_batch else [arr]
        logits = [torch.from_numpy(sess.run(["logits"], {inp.name: c})[0]) for c in chunks]
        return torch.softmax(torch.cat(logits).float(), dim=1)
    return probs, class_names, prep


def pte_predictor(pte_path: Path) -> tuple[Callable, list[str], "images.Preprocess"]:
    """The same for an ExecuTorch program (export.py --format pte): class names and preprocessing from its
    sidecar FILE.pte.json; run with ExecuTorch's Python runtime, one image at a time (a batch-1 program)."""
    try:
        from executorch.runtime import Runtime
    except ImportError:
        raise PredictError(f"{pte_path}: running a .pte program needs ExecuTorch: pip install executorch==1.5.1 "
                           "with a constraint that keeps your torch (README 'Use the model in an app')") from None
    side = Path(str(pte_path) + ".json")
    if not pte_path.is_file() or not side.is_file():
        raise PredictError(f"{pte_path}: the program or its sidecar {side.name} is missing; export both with "
                           "`python export.py CKPT --format pte`")
    try:
        meta = json.loads(side.read_text())
        class_names = json.loads(meta["class_names"])
        prep = images.Preprocess.from_dict(json.loads(meta["preprocess"]))
        method = Runtime.get().load_program(str(pte_path)).load_method("forward")
    except (KeyError, ValueError, TypeError) as e:
        raise PredictError(f"{side}: class_names / preprocess missing or invalid ({e}); export with export.py")
    except RuntimeError as e:
        raise PredictError(f"{pte_path}: not a loadable ExecuTorch program ({str(e).splitlines()[0][:200]})")

    def probs(x: torch.Tensor) -> torch.Tensor:
        x = x.float().cpu().contiguous()
        logits = [method.execute([x[i:i + 1]])[0] for i in range(len(x))]
        return torch.softmax(torch.cat(logits).float(), dim=1)
    return probs, class_names, prep


def model_predictor(path: Path) -> tuple[Callable, list[str], "images.Preprocess"]:
    """An exported file by its suffix: .pte (ExecuTorch), else ONNX."""
    return pte_predictor(path) if path.suffix == ".pte" else onnx_predictor(path)


def predict_files(paths: Iterator[tuple[str, str | None]], probs_fn: Callable, class_names: list[str],
                  prep: "images.Preprocess", topk: int, bbox: tuple[int, int, int, int] | None = None,
                  batch_size: int = 32, on_result: Callable | None = None,
                  on_error: Callable | None = None) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Decode in chunks (memory stays flat for big folders), predict, report each result as it comes."""
    k = min(topk, len(class_names))
    results: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []

    def fail(path: str, reason: str) -> None:
        errors.append({"file": path, "error": reason})
        if on_error:
            on_error(path, reason)

    def flush(batch: list[tuple[str, torch.Tensor]]) -> None:
        if not batch:
            return
        p = probs_fn(prep.to_model_input(torch.stack([t for _, t in batch])))
        top = p.topk(k, dim=1)
        for (path, _), vals, idx in zip(batch, top.values, top.indices):
            r = {"file": path, "top": [{"class": class_names[i], "index": int(i), "probability": float(v)}
                                       for v, i in zip(vals.tolist(), idx.tolist())]}
            results.append(r)
            if on_result:
                on_result(r)
        batch.clear()

    batch: list[tuple[str, torch.Tensor]] = []
    for path, reason in paths:
        if reason is not None:
            fail(path, reason)
            continue
        try:
            batch.append((path, images.load_image(path, prep, bbox=bbox)))
        except images.ImageError as e:
            fail(path, _reason(e, path))
        except Exception as e:  # a decoder bug must not take the other images down either
            fail(path, f"{type(e).__name__}: {_reason(e, path)}")
        if len(batch) >= batch_size:
            flush(batch)
    flush(batch)
    return results, errors


def _reason(e: Exception, path: str) -> str:
    """The exception's message on one line, without repeating the file name in front."""
    msg = " ".join(str(e).split()) or type(e).__name__
    for prefix in (f"{path}: ", f"{Path(path).resolve()}: "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return msg


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    ap.add_argument("--checkpoint", type=Path, help="a checkpoint (default: the newest runs/*/best.pt)")
    ap.add_argument("--model", type=Path, help="an exported model instead of a checkpoint: .onnx (needs onnxruntime) "
                                               "or .pte (ExecuTorch, needs executorch)")
    ap.add_argument("--topk", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda (checkpoints only)")
    ap.add_argument("--bbox", help="x1,y1,x2,y2: crop to this box first (for models trained with --crop-bbox)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--ghost-op", default="auto", choices=["auto", "ext", "torch"],
                    help="GhostModule implementation (auto: the C++ extension when built)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.topk < 1:
            raise PredictError("--topk must be at least 1")
        if args.model is not None and args.checkpoint is not None:
            raise PredictError("give either --checkpoint or --model, not both")
        bbox = parse_bbox(args.bbox) if args.bbox else None
        if args.model is not None:
            probs_fn, class_names, prep = model_predictor(args.model)
            source = str(args.model)
        else:
            ckpt_path = args.checkpoint
            if ckpt_path is None:
                ckpt_path = newest_checkpoint()
                print(f"using {ckpt_path} (newest runs/*/best.pt; pass --checkpoint to choose)", file=sys.stderr)
            try:
                device = pick_device(args.device)
            except ValueError as e:
                raise PredictError(str(e)) from None
            probs_fn, class_names, prep = torch_predictor(ckpt_path, device, args.ghost_op)
            source = str(ckpt_path)
        if bbox is not None and not prep.crop_bbox:
            print("note: this model was not trained with --crop-bbox; cropping to --bbox anyway", file=sys.stderr)
            prep = dataclasses.replace(prep, crop_bbox=True)
        elif bbox is None and prep.crop_bbox:
            print("note: this model was trained on bounding-box crops; pass --bbox x1,y1,x2,y2 for best results "
                  "(using the whole image)", file=sys.stderr)
    except (PredictError, runs.CheckpointError, data.DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def show(r: dict[str, Any]) -> None:
        if args.json:
            return
        print(r["file"])
        for i, t in enumerate(r["top"], 1):
            print(f"  {i}. {t['class']}  {t['probability']:.1%}")
        sys.stdout.flush()

    def err(path: str, reason: str) -> None:
        print(f"error: {path}: {reason}", file=sys.stderr)

    results, errors = predict_files(expand_inputs(args.inputs), probs_fn, class_names, prep, args.topk, bbox,
                                    args.batch_size, on_result=show, on_error=err)
    if args.json:
        print(json.dumps({"model": source, "predictions": results, "errors": errors}, indent=2))
    return 2 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
