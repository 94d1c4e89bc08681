// The on-device page: the photo is decoded, preprocessed and classified in this browser (onnxruntime-web,
// WebAssembly); nothing leaves the page once it has loaded. The preprocessing is images.py's, step by step:
// EXIF orientation, transparent pixels on white, RGB (or Pillow's L), JPEG draft scaling, the central
// test_crop of each side, Pillow's BILINEAR resize to the trained size, /255 and (x - mean) / std.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;  // {session, info}

// ---------------------------------------------------------------------------------------------------------
// Pillow's resampling (libImaging/Resample.c), 8 bits per channel, so that this page and predict.py feed the
// model the same pixels: fixed-point coefficients of 22 bits, the horizontal pass first, then the vertical.
const PRECISION_BITS = 32 - 8 - 2;

function coeffs(inSize, in0, in1, outSize) {
  in0 = Math.fround(in0);  // Pillow takes the box as C floats
  in1 = Math.fround(in1);
  const scale = Math.fround(in1 - in0) / outSize;
  const filterscale = Math.max(scale, 1.0);
  const support = 1.0 * filterscale;  // bilinear: support 1
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Int32Array(outSize * ksize);
  const k = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = in0 + (xx + 0.5) * scale;
    const ss = 1.0 / filterscale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    let ww = 0.0;
    for (let x = 0; x < xmax; x++) {
      const t = Math.abs((x + xmin - center + 0.5) * ss);
      k[x] = t < 1.0 ? 1.0 - t : 0.0;
      ww += k[x];
    }
    for (let x = 0; x < ksize; x++) {
      const w = x < xmax && ww !== 0.0 ? k[x] / ww : 0.0;
      kk[xx * ksize + x] = Math.trunc(w < 0 ? -0.5 + w * (1 << PRECISION_BITS) : 0.5 + w * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { bounds, kk, ksize };
}

function clip8(v) {
  if (v >= (1 << PRECISION_BITS) * 256) return 255;
  if (v <= 0) return 0;
  return Math.floor(v / (1 << PRECISION_BITS));
}

// img: {w, h, c, data: Uint8Array (h, w, c)}; box: [x0, y0, x1, y1] in img's pixels -> {w: W, h: H, ...}
function resize(img, W, H, box) {
  const { w, h, c } = img;
  const hc = coeffs(w, box[0], box[2], W);
  const vc = coeffs(h, box[1], box[3], H);
  const needH = W !== w || box[0] !== 0 || box[2] !== W;
  const needV = H !== h || box[1] !== 0 || box[3] !== H;
  let src = img;
  if (needH) {
    const first = vc.bounds[0];
    const last = vc.bounds[H * 2 - 2] + vc.bounds[H * 2 - 1];
    const out = new Uint8Array(W * (last - first) * c);
    for (let yy = 0; yy < last - first; yy++) {
      const row = (yy + first) * w * c;
      for (let xx = 0; xx < W; xx++) {
        const xmin = hc.bounds[xx * 2], xmax = hc.bounds[xx * 2 + 1], k = xx * hc.ksize;
        for (let ch = 0; ch < c; ch++) {
          let ss = 1 << (PRECISION_BITS - 1);
          for (let x = 0; x < xmax; x++) ss += src.data[row + (x + xmin) * c + ch] * hc.kk[k + x];
          out[(yy * W + xx) * c + ch] = clip8(ss);
        }
      }
    }
    for (let i = 0; i < H; i++) vc.bounds[i * 2] -= first;
    src = { w: W, h: last - first, c, data: out };
  }
  if (needV) {
    const out = new Uint8Array(src.w * H * c);
    for (let yy = 0; yy < H; yy++) {
      const ymin = vc.bounds[yy * 2], ymax = vc.bounds[yy * 2 + 1], k = yy * vc.ksize;
      for (let xx = 0; xx < src.w; xx++) {
        for (let ch = 0; ch < c; ch++) {
          let ss = 1 << (PRECISION_BITS - 1);
          for (let y = 0; y < ymax; y++) ss += src.data[((y + ymin) * src.w + xx) * c + ch] * vc.kk[k + y];
          out[(yy * src.w + xx) * c + ch] = clip8(ss);
        }
      }
    }
    src = { w: src.w, h: H, c, data: out };
  }
  return src;
}

// JPEG draft scaling (Pillow decodes large JPEGs at 1/2, 1/4 or 1/8 in the DCT domain): approximated by
// averaging s x s blocks, which is what a scaled IDCT computes for the block's DC term.
function draftScale(w, h, needW, needH) {
  const scale = Math.min(Math.floor(w / needW), Math.floor(h / needH));
  for (const s of [8, 4, 2]) if (scale >= s) return s;
  return 1;
}

function shrink(img, s) {
  const W = Math.ceil(img.w / s), H = Math.ceil(img.h / s), c = img.c;
  const out = new Uint8Array(W * H * c);
  for (let y = 0; y < H; y++) {
    for (let x = 0; x < W; x++) {
      for (let ch = 0; ch < c; ch++) {
        let sum = 0, n = 0;
        for (let dy = 0; dy < s && y * s + dy < img.h; dy++) {
          for (let dx = 0; dx < s && x * s + dx < img.w; dx++) {
            sum += img.data[((y * s + dy) * img.w + x * s + dx) * c + ch];
            n++;
          }
        }
        out[(y * W + x) * c + ch] = Math.round(sum / n);
      }
    }
  }
  return { w: W, h: H, c, data: out };
}

// ---------------------------------------------------------------------------------------------------------
// photo -> model input

async function decode(file) {
  // colorSpaceConversion "none": the file's own pixel values, as Pillow reads them (no ICC conversion)
  const bitmap = await createImageBitmap(file, { imageOrientation: "from-image", colorSpaceConversion: "none",
                                                 premultiplyAlpha: "none" });
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.fillStyle = "#fff";  // transparent pixels become white, as images.py composites them
  ctx.fillRect(0, 0, bitmap.width, bitmap.height);
  ctx.drawImage(bitmap, 0, 0);
  const rgba = ctx.getImageData(0, 0, bitmap.width, bitmap.height).data;
  bitmap.close();
  return { w: canvas.width, h: canvas.height, rgba };
}

function toChannels(px, gray) {
  const n = px.w * px.h, c = gray ? 1 : 3, data = new Uint8Array(n * c);
  for (let i = 0; i < n; i++) {
    const r = px.rgba[i * 4], g = px.rgba[i * 4 + 1], b = px.rgba[i * 4 + 2];
    if (gray) data[i] = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;  // Pillow's convert("L")
    else data.set([r, g, b], i * 3);
  }
  return { w: px.w, h: px.h, c, data };
}

function preprocess(px, prep, isJpeg) {
  const [H, W] = Array.isArray(prep.img_size) ? prep.img_size : [prep.img_size, prep.img_size];
  let img = toChannels(px, prep.grayscale);
  if (isJpeg) {
    // images.py asks for ceil(W * w0 / (w0 * test_crop)) x ceil(H * h0 / (h0 * test_crop)): the same floats here
    const needW = Math.max(1, Math.ceil(W * img.w / (img.w * prep.test_crop)));
    const needH = Math.max(1, Math.ceil(H * img.h / (img.h * prep.test_crop)));
    const s = draftScale(img.w, img.h, needW, needH);
    if (s > 1) img = shrink(img, s);
  }
  let box = [0, 0, img.w, img.h];
  if (prep.test_crop < 1.0) {
    const cw = img.w * prep.test_crop, ch = img.h * prep.test_crop;
    const x0 = (img.w - cw) / 2, y0 = (img.h - ch) / 2;
    box = [x0, y0, x0 + cw, y0 + ch];
  }
  const small = (W === img.w && H === img.h && prep.test_crop >= 1.0) ? img : resize(img, W, H, box);
  const c = small.c, x = new Float32Array(c * H * W);
  for (let ch = 0; ch < c; ch++) {
    const m = prep.normalize ? prep.mean[ch] : 0, s = prep.normalize ? prep.std[ch] : 1;
    for (let i = 0; i < H * W; i++) x[ch * H * W + i] = (small.data[i * c + ch] / 255 - m) / s;
  }
  return new ort.Tensor("float32", x, [1, c, H, W]);
}

// ---------------------------------------------------------------------------------------------------------
// the page

function say(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function load() {
  const info = await (await fetch("model.json")).json();
  ort.env.wasm.wasmPaths = "./";
  // several threads need cross-origin isolation (serve.py --on-device sends the headers); else one
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  const session = await ort.InferenceSession.create("model.onnx", { executionProviders: ["wasm"] });
  model = { session, info };
  const threads = ort.env.wasm.numThreads;
  $("about").textContent = `${info.arch}, ${info.class_names.length} car models, running on this device ` +
    `(WebAssembly, ${threads} thread${threads > 1 ? "s" : ""}); the photo never leaves it.`;
  for (const id of ["camera", "file"]) $(id).disabled = false;
  say("Ready.");
}

function show(logits, names) {
  const max = Math.max(...logits);
  const e = logits.map((v) => Math.exp(v - max));
  const sum = e.reduce((a, b) => a + b, 0);
  const top = e.map((v, i) => [v / sum, i]).sort((a, b) => b[0] - a[0]).slice(0, 5);
  $("results").replaceChildren(...top.map(([p, i]) => {
    const li = document.createElement("li");
    const row = document.createElement("div"); row.className = "row";
    const name = document.createElement("span"); name.className = "name"; name.textContent = names[i];
    const pct = document.createElement("span"); pct.className = "pct"; pct.textContent = `${(100 * p).toFixed(1)} %`;
    const bar = document.createElement("div"); bar.className = "bar";
    const fill = document.createElement("div"); fill.style.width = `${(100 * p).toFixed(1)}%`;
    bar.appendChild(fill); row.append(name, pct); li.append(row, bar);
    return li;
  }));
  $("logits").textContent = JSON.stringify(logits);  // for tests and the parity benchmark
}

async function classify(file) {
  $("results").replaceChildren();
  $("logits").textContent = "";
  let px;
  try {
    px = await decode(file);
  } catch (e) {
    say(`${file.name}: not an image this browser can read; choose a photo (JPEG, PNG or WebP)`, true);
    return;
  }
  $("preview").src = URL.createObjectURL(file);
  $("preview").style.display = "block";
  say(`Looking at ${file.name} ...`);
  const isJpeg = new Uint8Array(await file.slice(0, 3).arrayBuffer()).join() === "255,216,255";
  const x = preprocess(px, model.info.preprocess, isJpeg);
  const out = await model.session.run({ [model.session.inputNames[0]]: x });
  show(Array.from(out[model.session.outputNames[0]].data), model.info.class_names);
  say(file.name);
}

for (const id of ["camera", "file"]) {
  $(id).addEventListener("change", (ev) => {
    const file = ev.target.files[0];
    ev.target.value = "";  // the same photo chosen again is a new choice
    if (file) classify(file).catch((e) => say(`${file.name}: ${e.message || e}`, true));
  });
}

if ("serviceWorker" in navigator && self.isSecureContext) {
  navigator.serviceWorker.register("sw.js").catch(() => {});  // offline after the first load
}
load().catch((e) => say(`The model did not load: ${e.message || e}`, true));
