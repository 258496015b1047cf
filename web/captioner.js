// The captioner in the browser: export.py's Runner in JavaScript. The same preprocessing (Pillow's bilinear
// resize, to the integer), the same beam search, the same confidence signals, fit and alt text, run with
// onnxruntime-web's WebAssembly backend on the graphs of `export.py --format web`. Nothing is sent anywhere:
// the photo is read from the file the person chose, in this page.
import * as ort from "./ort.wasm.min.mjs";

const MAX_PIXELS = 89478485;  // Pillow's Image.MAX_IMAGE_PIXELS: a larger "photo" is refused, as Runner refuses it

export async function loadCaptioner(base = "./") {
  const config = await (await fetch(base + "captioner.json")).json();
  ort.env.wasm.numThreads = 1;  // threads need a cross-origin isolated page, which a static host seldom gives
  const options = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
  const [encoder, step, bank] = await Promise.all([
    ort.InferenceSession.create(base + "encoder.onnx", options),
    ort.InferenceSession.create(base + "decoder_step.onnx", options),
    config.calibration ? loadBank(base, config.calibration.bank) : null,
  ]);
  return new Captioner(config, encoder, step, bank);
}

async function loadBank(base, { file, shape }) {
  // fp16, little-endian [K, F] -> Float32Array, through a table of all 65536 halves
  const halves = new Uint16Array(await (await fetch(base + file)).arrayBuffer());
  if (halves.length !== shape[0] * shape[1]) throw new Error(`${file} is not ${shape[0]} x ${shape[1]}`);
  const table = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1, exp = (h >> 10) & 0x1f, frac = h & 0x3ff;
    table[h] = exp === 0 ? sign * frac * 2 ** -24 : exp === 31 ? (frac ? NaN : sign * Infinity)
      : sign * (1 + frac / 1024) * 2 ** (exp - 15);
  }
  const bank = new Float32Array(halves.length);
  for (let i = 0; i < halves.length; i++) bank[i] = table[halves[i]];
  return { rows: shape[0], dim: shape[1], data: bank };
}

// ------------------------------------------------------------------------------------------ preprocessing

export class UnreadableImage extends Error {}

export async function readPixels(file) {
  // The photo upright (its EXIF orientation applied, as ImageOps.exif_transpose does), its colours as stored
  // (no colour-profile conversion, as Pillow), on white where it is transparent -> {width, height, rgba}.
  let bitmap;
  try {
    bitmap = await createImageBitmap(file, { imageOrientation: "from-image", colorSpaceConversion: "none",
                                             premultiplyAlpha: "none" });
  } catch (e) {
    throw new UnreadableImage("this file is not an image this browser can read");
  }
  const { width, height } = bitmap;
  if (width * height > MAX_PIXELS) {
    bitmap.close();
    throw new UnreadableImage(`refused: over ${MAX_PIXELS.toLocaleString("en")} pixels, too large to be a photo`);
  }
  const canvas = new OffscreenCanvas(width, height);
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.fillStyle = "#fff";
  context.fillRect(0, 0, width, height);
  context.drawImage(bitmap, 0, 0);
  bitmap.close();
  return { width, height, rgba: context.getImageData(0, 0, width, height).data };
}

const PRECISION_BITS = 22;  // Pillow's fixed point for 8-bit images (Resample.c: 32 - 8 - 2)

function coefficients(inSize, outSize) {
  // Pillow's precompute_coeffs + normalize_coeffs_8bpc for its bilinear filter (support 1): for each output
  // pixel, the first input pixel, how many, and their weights in fixed point.
  const scale = inSize / outSize, filterscale = Math.max(scale, 1), support = filterscale;
  const ksize = Math.ceil(support) * 2 + 1, bounds = new Int32Array(outSize * 2), kk = new Int32Array(outSize * ksize);
  const weights = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale, ss = 1 / filterscale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      const d = Math.abs((x + xmin - center + 0.5) * ss);
      weights[x] = d < 1 ? 1 - d : 0;
      ww += weights[x];
    }
    for (let x = 0; x < xmax; x++) {
      const k = ww !== 0 ? weights[x] / ww : weights[x];
      kk[xx * ksize + x] = Math.trunc(k < 0 ? -0.5 + k * 2 ** PRECISION_BITS : 0.5 + k * 2 ** PRECISION_BITS);
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, bounds, kk };
}

function resamplePass(src, width, height, outSize, horizontal) {
  // One of Pillow's two passes over RGBA bytes: along rows (horizontal) or columns, to outSize pixels.
  const c = coefficients(horizontal ? width : height, outSize);
  const outW = horizontal ? outSize : width, outH = horizontal ? height : outSize;
  const out = new Uint8ClampedArray(outW * outH * 4);
  const half = 2 ** (PRECISION_BITS - 1), one = 2 ** PRECISION_BITS;
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) {
      const i = horizontal ? x : y, xmin = c.bounds[i * 2], n = c.bounds[i * 2 + 1];
      for (let ch = 0; ch < 3; ch++) {
        let ss = half;
        for (let t = 0; t < n; t++) {
          const at = horizontal ? (y * width + xmin + t) * 4 : ((xmin + t) * width + x) * 4;
          ss += src[at + ch] * c.kk[i * c.ksize + t];
        }
        out[(y * outW + x) * 4 + ch] = Math.min(255, Math.max(0, Math.floor(ss / one)));
      }
    }
  }
  return out;
}

function roundHalfEven(v) {
  const f = Math.floor(v);
  return v - f !== 0.5 ? Math.round(v) : f % 2 === 0 ? f : f + 1;
}

export function preprocess({ width, height, rgba }, preset) {
  // export.preprocess: resize to a square with Pillow's BILINEAR (horizontal pass, then vertical, each only
  // where the size changes), centre crop, scale to [0, 1], normalise, all in float32 -> [1, 3, S, S].
  const size = preset.resize, crop = preset.crop;
  let pixels = rgba;
  if (width !== size) pixels = resamplePass(pixels, width, height, size, true);
  if (height !== size) pixels = resamplePass(pixels, size, height, size, false);
  const top = roundHalfEven((size - crop) / 2), f = Math.fround, plane = crop * crop;
  const out = new Float32Array(3 * plane);
  for (let ch = 0; ch < 3; ch++) {
    const mean = f(preset.mean[ch]), std = f(preset.std[ch]);
    for (let y = 0; y < crop; y++) {
      for (let x = 0; x < crop; x++) {
        const v = f(pixels[((y + top) * size + x + top) * 4 + ch] / 255);
        out[ch * plane + y * crop + x] = f(f(v - mean) / std);
      }
    }
  }
  return new ort.Tensor("float32", out, [1, 3, crop, crop]);
}

// ------------------------------------------------------------------------------------------ the captioner

function logSoftmax(logits, from, n) {
  // log-probabilities [n] of logits[from .. from + n)
  let max = -Infinity;
  for (let i = 0; i < n; i++) max = Math.max(max, logits[from + i]);
  let sum = 0;
  for (let i = 0; i < n; i++) sum += Math.exp(logits[from + i] - max);
  const out = new Float64Array(n), log = Math.log(sum);
  for (let i = 0; i < n; i++) out[i] = logits[from + i] - max - log;
  return out;
}

function take(tensor, rows, axis) {
  // np.take(tensor, rows, axis): the state of the beams `rows`
  const dims = tensor.dims, outer = dims.slice(0, axis).reduce((a, b) => a * b, 1);
  const inner = dims.slice(axis + 1).reduce((a, b) => a * b, 1), n = dims[axis];
  const out = new Float32Array(outer * rows.length * inner);
  for (let o = 0; o < outer; o++) {
    rows.forEach((r, j) => out.set(tensor.data.subarray((o * n + r) * inner, (o * n + r + 1) * inner),
                                   (o * rows.length + j) * inner));
  }
  return new ort.Tensor("float32", out, [...dims.slice(0, axis), rows.length, ...dims.slice(axis + 1)]);
}

export class Captioner {
  constructor(config, encoder, step, bank) {
    this.config = config;
    this.encoder = encoder;
    this.stepSession = step;
    this.bank = bank;
    this.axes = config.state_batch_axes;
    const specials = config.specials || ["<PAD>", "<SOS>", "<EOS>", "<UNK>"];
    this.specials = specials.length;
    this.sos = specials.indexOf("<SOS>");
    this.eos = specials.indexOf("<EOS>");
    this.vocab = config.vocab;
  }

  async start(image) {
    // -> {state: [Tensor], pooled: Float32Array [F] or null}
    const out = await this.encoder.run({ image });
    const names = this.encoder.outputNames;
    return { state: names.slice(0, this.axes.length).map((n) => out[n]),
             pooled: this.config.encoder_pooled ? out[names[this.axes.length]].data : null };
  }

  async step(tokens, state) {
    // -> {logits: Float32Array [B * V], never-said words at -Infinity; V; state; attention [B * R] or null}
    const feed = { tokens: new ort.Tensor("int64", BigInt64Array.from(tokens, BigInt), [tokens.length]) };
    state.forEach((s, i) => { feed[`state${i}`] = s; });
    const out = await this.stepSession.run(feed);
    const names = this.stepSession.outputNames, logits = out[names[0]].data, v = out[names[0]].dims[1];
    for (let b = 0; b < tokens.length; b++) for (const w of this.config.never_say) logits[b * v + w] = -Infinity;
    return { logits, v, state: names.slice(1, 1 + this.axes.length).map((n) => out[n]),
             attention: this.config.step_attention ? out[names[names.length - 1]].data : null };
  }

  select(state, rows) {
    return state.map((s, i) => take(s, rows, this.axes[i]));
  }

  words(ids) {
    return ids.filter((i) => i >= this.specials).map((i) => this.vocab[i]).join(" ");
  }

  async search(state, beam, maxLen) {
    return beam === 1 ? this.greedy(state, maxLen) : this.beam(state, maxLen, beam);
  }

  async greedy(state, maxLen) {
    let tokens = [this.sos];
    const out = [];
    for (let t = 0; t < maxLen; t++) {
      const r = await this.step(tokens, state);
      state = r.state;
      let best = 0;
      for (let i = 1; i < r.v; i++) if (r.logits[i] > r.logits[best]) best = i;
      if (best === this.eos) break;
      out.push(best);
      tokens = [best];
    }
    return out;
  }

  async beam(state, maxLen, k) {
    // Runner._beam: k beams, finished ones extend only with EOS at no cost, the ranking by probability
    state = this.select(state, new Array(k).fill(0));
    let scores = new Array(k).fill(-Infinity), tokens = new Array(k).fill(this.sos);
    let seqs = Array.from({ length: k }, () => []), done = new Array(k).fill(false), lengths = new Array(k).fill(0);
    scores[0] = 0;
    for (let t = 0; t < maxLen; t++) {
      const r = await this.step(tokens, state);
      const top = [];  // the k best (score, beam, word), best first; ties to the earlier, as a stable sort
      for (let b = 0; b < k; b++) {
        const logp = done[b] ? null : logSoftmax(r.logits, b * r.v, r.v);
        for (let w = 0; w < r.v; w++) {
          const s = scores[b] + (done[b] ? (w === this.eos ? 0 : -Infinity) : logp[w]);
          if (top.length === k && !(s > top[k - 1][0])) continue;
          let at = top.length;
          while (at > 0 && top[at - 1][0] < s) at--;
          top.splice(at, 0, [s, b, w]);
          if (top.length > k) top.pop();
        }
      }
      const beams = top.map((e) => e[1]);
      seqs = top.map(([, b, w]) => [...seqs[b], w]);
      lengths = beams.map((b) => lengths[b] + (done[b] ? 0 : 1));
      done = top.map(([, b, w]) => done[b] || w === this.eos);
      scores = top.map((e) => e[0]);
      state = this.select(r.state, beams);
      tokens = top.map((e) => e[2]);
      if (done.every(Boolean)) break;
    }
    let best = 0;  // length penalty 0, as export.py --check: the likeliest
    for (let b = 1; b < k; b++) if (scores[b] > scores[best]) best = b;
    const ids = seqs[best], end = ids.indexOf(this.eos);
    return end >= 0 ? ids.slice(0, end) : ids;
  }

  async signals(state, ids) {
    // Runner.signals: the caption read again word by word -> [mean word logp, least, mean margin, words,
    // attention entropy]
    const words = [...ids, this.eos], chosen = [], margins = [], entropy = [];
    let tokens = [this.sos];
    for (let t = 0; t < words.length; t++) {
      const r = await this.step(tokens, state), logp = logSoftmax(r.logits, 0, r.v), word = words[t];
      state = r.state;
      let other = -Infinity;
      for (let i = 0; i < r.v; i++) if (i !== word && logp[i] > other) other = logp[i];
      chosen.push(logp[word]);
      margins.push(Math.max(logp[word] - other, -20));
      if (r.attention && t < ids.length) {
        let h = 0;
        for (const a of r.attention) { const w = Math.max(a, 1e-12); h -= w * Math.log(w); }
        entropy.push(h / Math.log(r.attention.length));
      }
      tokens = [word];
    }
    const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;
    return [mean(chosen), Math.min(...chosen), mean(margins), ids.length, entropy.length ? mean(entropy) : 0];
  }

  assess(signals, pooled) {
    // Runner.assess: -> {confidence, unfamiliar}
    const fit = this.config.calibration, { rows, dim, data } = this.bank, sims = new Float64Array(rows);
    for (let r = 0; r < rows; r++) {
      let s = 0;
      for (let i = 0; i < dim; i++) s += data[r * dim + i] * pooled[i];
      sims[r] = s;
    }
    sims.sort();
    const near = sims.slice(rows - Math.min(fit.nearest, rows)), familiarity = near.reduce((a, b) => a + b, 0) / near.length;
    let z = fit.bias;
    [...signals, familiarity].forEach((x, i) => { z += ((x - fit.mean[i]) / fit.std[i]) * fit.weights[i]; });
    const unfamiliar = familiarity < fit.familiar_above;
    return { confidence: unfamiliar ? 0 : 1 / (1 + Math.exp(-z)), unfamiliar };
  }

  level(confidence) {
    const t = this.config.calibration.thresholds || {};
    return confidence >= (t.high ?? 1) ? "high" : confidence >= (t.medium ?? 1) ? "medium" : "low";
  }

  async describe(file, beam = 3, maxLen = 40) {
    // Runner.describe of a photo file -> {caption, alt_text, confidence, confidence_level}
    const ms = [performance.now()];  // the time each part took, for the benchmark
    const image = preprocess(await readPixels(file), this.config.preprocessing);
    ms.push(performance.now());
    const { state, pooled } = await this.start(image);
    ms.push(performance.now());
    const ids = await this.search(state, beam, maxLen), caption = this.words(ids);
    ms.push(performance.now());
    let confidence = null, level = null, unfamiliar = false;
    if (this.config.calibration) {
      ({ confidence, unfamiliar } = this.assess(await this.signals(state, ids), pooled));
      level = this.level(confidence);
      confidence = Math.round(confidence * 1000) / 1000;
    }
    ms.push(performance.now());
    const parts = ["read", "encoder", "search", "confidence"];
    return { caption, alt_text: altText(caption, level, unfamiliar, this.config.alt_text), confidence,
             confidence_level: level, ms: Object.fromEntries(parts.map((n, i) => [n, Math.round(ms[i + 1] - ms[i])])) };
  }
}

export function altText(caption, level, unfamiliar, rules) {
  // export.alt_text: the caption as one sentence, hedged by level, cut to fit
  if (unfamiliar || !caption.trim()) return rules.abstain;
  let text = caption.split(/\s+/).filter((w) => w && w !== '"').join(" ");
  text = text.replace(new RegExp(rules.attached, "g"), "$1").replaceAll(" - ", "-").replace(/[ .,;:]+$/, "");
  text = text ? text[0].toUpperCase() + text.slice(1) + "." : "";
  if (level in rules.hedges) {
    text = rules.hedges[level] + (text[0].toLowerCase() + text.slice(1)).replace(new RegExp(rules.progressive), "$1 $2");
  }
  if (text.length > rules.max_chars) {
    const cut = text.slice(0, rules.max_chars - 1), space = cut.lastIndexOf(" ");
    text = (space >= 0 ? cut.slice(0, space) : cut).replace(/[,;:]+$/, "") + "\u2026";
  }
  return text;
}
