// The describer in the browser: runner.py in JavaScript. The same preprocessing (Pillow's bilinear resize, to the
// integer), the same beam search, confidence signals and fit, and the rest of what inference.py says of a photo:
// the photo check (describe.js), the text read (read_text.js, its models loaded in the background once the
// captioner is ready), the upright turn, the thing named, and description.py's wording, every rule read from the
// captioner.json that export.py wrote from the Python modules. It runs with onnxruntime-web's WebAssembly backend
// on the graphs of `export.py --format web`. Nothing is sent anywhere: the photo is read from the file the person
// chose, in this page.
import * as ort from "./ort.wasm.min.mjs";
import { Things, PhotoCheck, answer } from "./describe.js";
import { resize } from "./pillow.js";
import { TextReader } from "./read_text.js";

const MAX_PIXELS = 89478485;  // Pillow's Image.MAX_IMAGE_PIXELS: a larger "photo" is refused, as Runner refuses it

const SESSION = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };

export async function loadCaptioner(base = "./") {
  // The captioner, ready to describe; its text reader loads apart (loadReader), so the page is ready sooner.
  const config = await (await fetch(base + "captioner.json")).json();
  // threads need a cross-origin isolated page: sw.js makes it so from the second visit on (the same results,
  // measured; about 1.5x faster on 2 cores)
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  const things = config.describe?.things;
  const [encoder, step, bank, thingsWeight] = await Promise.all([
    ort.InferenceSession.create(base + "encoder.onnx", SESSION),
    ort.InferenceSession.create(base + "decoder_step.onnx", SESSION),
    config.calibration ? loadHalves(base, config.calibration.bank) : null,
    things ? loadHalves(base, things.classifier) : null,
  ]);
  return new Captioner(config, encoder, step, bank, thingsWeight, base);
}

async function loadHalves(base, { file, shape }) {
  // fp16, little-endian [K, F] -> {rows, dim, data: Float32Array}, through a table of all 65536 halves
  const halves = new Uint16Array(await (await fetch(base + file)).arrayBuffer());
  if (halves.length !== shape[0] * shape[1]) throw new Error(`${file} is not ${shape[0]} x ${shape[1]}`);
  const table = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1, exp = (h >> 10) & 0x1f, frac = h & 0x3ff;
    table[h] = exp === 0 ? sign * frac * 2 ** -24 : exp === 31 ? (frac ? NaN : sign * Infinity)
      : sign * (1 + frac / 1024) * 2 ** (exp - 15);
  }
  const data = new Float32Array(halves.length);
  for (let i = 0; i < halves.length; i++) data[i] = table[halves[i]];
  return { rows: shape[0], dim: shape[1], data };
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

function roundHalfEven(v) {
  const f = Math.floor(v);
  return v - f !== 0.5 ? Math.round(v) : f % 2 === 0 ? f : f + 1;
}

export function preprocess({ width, height, rgba }, preset) {
  // runner.to_input: resize to a square with Pillow's BILINEAR (pillow.js, each pass only where the size
  // changes), centre crop, scale to [0, 1], normalise, all in float32 -> [1, 3, S, S].
  const size = preset.resize, crop = preset.crop;
  const pixels = resize({ width, height, rgba }, size, size).rgba;
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
  constructor(config, encoder, step, bank, thingsWeight, base = "./") {
    this.config = config;
    this.encoder = encoder;
    this.stepSession = step;
    this.bank = bank;
    this.base = base;
    this.axes = config.state_batch_axes;
    const specials = config.specials || ["<PAD>", "<SOS>", "<EOS>", "<UNK>"];
    this.specials = specials.length;
    this.sos = specials.indexOf("<SOS>");
    this.eos = specials.indexOf("<EOS>");
    this.vocab = config.vocab;
    this.rules = config.describe || {};
    this.checker = new PhotoCheck(this.rules.photo_check);
    this.things = thingsWeight ? new Things(this.rules.things, thingsWeight.data) : null;
    this.reader = null;  // loadReader() sets it
  }

  loadReader() {
    // The text reader's three networks and word list (about 16 MB), once: describe() waits for them. Where the
    // export has none, or they cannot load, photos are described without their text (readerError says why).
    if (!this.readerLoading) {
      const rules = this.rules.reader;
      this.readerLoading = !rules ? Promise.resolve(null) : fetch(this.base + rules.words)
        .then((r) => r.text())
        .then((words) => TextReader.load(ort, this.base, rules, words))
        .then((reader) => { this.reader = reader; return reader; },
              (e) => { this.readerError = e.message; return null; });
    }
    return this.readerLoading;
  }

  async start(image) {
    // -> {state: [Tensor], unit: Float32Array [F] or null, raw: Float32Array [F] or null}: the decoder's first
    // state, and the CNN's pooled feature at unit length (confidence, photo check) and as it is (things)
    const out = await this.encoder.run({ image });
    const names = this.encoder.outputNames, n = this.axes.length;
    return { state: names.slice(0, n).map((name) => out[name]),
             unit: this.config.encoder_pooled ? out[names[n]].data : null,
             raw: this.config.encoder_pooled_raw ? out[names[n + 1]].data : null };
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
    // runner.Runner.describe of a photo file -> {caption, confidence, confidence_level, and description.answer's
    // alt_text, description, text, thing, photo_problems, photo_scores, retake_hint, turned; ms: each part's time}
    const ms = { start: performance.now() };
    const photo = await readPixels(file);
    const reader = await this.loadReader();
    ms.read = performance.now();
    const measures = this.checker.measures(photo);
    let text = null;
    if (reader) {  // a cheap first look, and the full read only where it finds text (of the look's own array)
      const look = await reader.firstLook(photo);
      text = look.passes ? await reader.read(photo, look) : null;
    }
    let turn = text && text.lines.length && text.angle ? text.angle : 0;
    ms.look = performance.now();
    let found = await this.captionOf(photo, turn, beam, maxLen);
    const headTurn = turn ? 0 : this.checker.uprightTurn(found.unit);
    if (headTurn) {  // a photo on its side with no text to tell by: turned where the check is sure, captioned again
      turn = headTurn;
      found = await this.captionOf(photo, turn, beam, maxLen);
    }
    ms.caption = performance.now();
    const thing = this.things && found.raw ? this.things.assess(found.raw) : null;
    const said = answer(this.rules.description, this.checker, { measures, text, turn }, found.unit, found.caption,
                        found.level, found.unfamiliar, turn, thing);
    const parts = ["start", "read", "look", "caption"];
    return { caption: found.caption, confidence: found.confidence, confidence_level: found.level, ...said,
             ms: Object.fromEntries(parts.slice(1).map((p, i) => [p, Math.round(ms[p] - ms[parts[i]])])) };
  }

  async captionOf(photo, turn, beam, maxLen) {
    // runner.Runner._caption: the caption of the photo turned `turn` degrees clockwise, its confidence and its
    // pooled features
    const image = preprocess(turned(photo, turn), this.config.preprocessing);
    const { state, unit, raw } = await this.start(image);
    const ids = await this.search(state, beam, maxLen);
    const found = { caption: this.words(ids), confidence: null, level: null, unfamiliar: false, unit, raw };
    if (this.config.calibration) {
      const { confidence, unfamiliar } = this.assess(await this.signals(state, ids), unit);
      Object.assign(found, { level: this.level(confidence), unfamiliar,
                             confidence: Math.round(confidence * 1000) / 1000 });
    }
    return found;
  }
}

export function turned({ width, height, rgba }, degrees) {
  // The image turned clockwise by 0, 90, 180 or 270 degrees, as PIL's transpose: pixels moved, none changed
  if (!degrees) return { width, height, rgba };
  const w = degrees === 180 ? width : height, h = degrees === 180 ? height : width;
  const out = new Uint8ClampedArray(rgba.length);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      // where the output pixel (x, y) comes from in the input
      const [sx, sy] = degrees === 90 ? [y, height - 1 - x] : degrees === 180 ? [width - 1 - x, height - 1 - y]
        : [width - 1 - y, x];
      out.set(rgba.subarray((sy * width + sx) * 4, (sy * width + sx) * 4 + 4), (y * w + x) * 4);
    }
  }
  return { width: w, height: h, rgba: out };
}
