// What a person hears about a photo, in the page: photo_check.py (what is wrong with the photo, and which way is
// up), things.py (what the thing in it is) and description.py (all of it said in one description) in JavaScript.
// Every fit, threshold, hint and word comes from captioner.json, which export.py writes from those Python files
// (their export_rules), so this file holds the arithmetic alone. It does that arithmetic as Python does, to the
// bit where it can: the image measures in float32 with NumPy's order of summing, the heads in float64 (as the Python
// files compute them), so that the page says what inference.py and `export.py --check` say of the same photo.
import { resize } from "./pillow.js";

const f32 = Math.fround;  // a number rounded to float32, as each NumPy float32 operation rounds its result

// ------------------------------------------------------------------------------------ NumPy's float32 arithmetic

function pairwiseSum(a, start, n) {
  // NumPy's float32 sum of a[start .. start + n) (its pairwise_sum): up to 128 numbers in 8 running sums, longer
  // runs split in two halves (a multiple of 8 first). Summed in another order, the last bit can differ.
  if (n < 8) {
    let s = 0;
    for (let i = 0; i < n; i++) s = f32(s + a[start + i]);
    return s;
  }
  if (n <= 128) {
    let r0 = a[start], r1 = a[start + 1], r2 = a[start + 2], r3 = a[start + 3];
    let r4 = a[start + 4], r5 = a[start + 5], r6 = a[start + 6], r7 = a[start + 7];
    let i = 8;
    for (; i < n - (n % 8); i += 8) {
      const at = start + i;
      r0 = f32(r0 + a[at]); r1 = f32(r1 + a[at + 1]); r2 = f32(r2 + a[at + 2]); r3 = f32(r3 + a[at + 3]);
      r4 = f32(r4 + a[at + 4]); r5 = f32(r5 + a[at + 5]); r6 = f32(r6 + a[at + 6]); r7 = f32(r7 + a[at + 7]);
    }
    let s = f32(f32(f32(r0 + r1) + f32(r2 + r3)) + f32(f32(r4 + r5) + f32(r6 + r7)));
    for (; i < n; i++) s = f32(s + a[start + i]);
    return s;
  }
  let half = Math.floor(n / 2);
  half -= half % 8;
  return f32(pairwiseSum(a, start, half) + pairwiseSum(a, start + half, n - half));
}

function mean(a) {
  // a.mean() of a float32 array (all of it, one run)
  return f32(pairwiseSum(a, 0, a.length) / a.length);
}

function variance(a) {
  // a.var(): the mean of the squared deviations from the mean, each step in float32
  const m = mean(a), sq = a.map((v) => { const d = f32(v - m); return f32(d * d); });
  return mean(sq);
}

function blockSum(a, rowLength, top, left, rows, cols) {
  // NumPy's float32 sum over a rows x cols block of an array whose rows are rowLength long (a reduction over two
  // axes of a reshaped view): each row summed pairwise, the rows' sums added in turn
  let s = 0;
  for (let r = 0; r < rows; r++) s = f32(s + pairwiseSum(a, (top + r) * rowLength + left, cols));
  return s;
}

function blockVariance(a, rowLength, top, left, rows, cols) {
  // the variance of one block, as NumPy's var over the block's two axes computes it
  const n = rows * cols, m = f32(blockSum(a, rowLength, top, left, rows, cols) / n), sq = new Float32Array(n);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const d = f32(a[(top + r) * rowLength + left + c] - m);
      sq[r * cols + c] = f32(d * d);
    }
  }
  return f32(blockSum(sq, cols, 0, 0, rows, cols) / n);
}

function quantile(a, q) {
  // photo_check._quantile: the value of rank int(q * n) (the k-th smallest), found as np.partition finds it, by
  // selection rather than a full sort (the value is the same whichever way it is found)
  const k = Math.min(Math.trunc(q * a.length), a.length - 1), v = Float32Array.from(a);
  let lo = 0, hi = v.length - 1;
  while (lo < hi) {  // Hoare's selection: keep the side of the pivot that holds rank k
    const pivot = v[(lo + hi) >> 1];
    let i = lo, j = hi;
    while (i <= j) {
      while (v[i] < pivot) i++;
      while (v[j] > pivot) j--;
      if (i <= j) { const t = v[i]; v[i] = v[j]; v[j] = t; i++; j--; }
    }
    if (k <= j) hi = j;
    else if (k >= i) lo = i;
    else break;
  }
  return v[k];
}

export function pyRound(x, digits) {
  // Python's round(x, digits): the decimal nearest x's exact binary value (as toFixed finds it), a tie to the even
  // digit (toFixed rounds a tie up). A tie needs x to be a multiple of 2^-(digits + 1), so it is checked exactly.
  const scaled = x * 10 ** digits;
  if (Number.isInteger(x * 2 ** (digits + 1)) && Math.abs(scaled % 1) === 0.5) {
    const down = Math.floor(scaled), even = down % 2 === 0 ? down : down + 1;
    return Number(`${even}e-${digits}`);
  }
  return Number(x.toFixed(digits));
}

// ------------------------------------------------------------------------------------------- the image measures

function greyOf(small) {
  // Pillow's convert("L") of the small copy (its integer luma), and the brightest of R, G, B of each pixel
  const n = small.width * small.height, luma = new Uint8Array(n), brightest = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    const r = small.rgba[i * 4], g = small.rgba[i * 4 + 1], b = small.rgba[i * 4 + 2];
    luma[i] = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;
    brightest[i] = Math.max(r, g, b);
  }
  return { luma, brightest };
}

function levelAt(values, q) {
  // np.searchsorted(cdf, q) / 255 over the histogram of 8-bit values: the first level whose share reaches q
  const counts = new Float64Array(256);
  for (const v of values) counts[v]++;
  let cumulative = 0;
  for (let level = 0; level < 256; level++) {
    cumulative += counts[level];
    if (cumulative / values.length >= q) return level / 255;
  }
  return 1;
}

function laplacian(g, size) {
  // photo_check._laplacian: the 4-neighbour Laplacian of g [S, S] -> [S-2, S-2], summed in NumPy's order
  const n = size - 2, lap = new Float32Array(n * n);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < n; j++) {
      const up = g[i * size + j + 1], down = g[(i + 2) * size + j + 1];
      const left = g[(i + 1) * size + j], right = g[(i + 1) * size + j + 2], centre = g[(i + 1) * size + j + 1];
      lap[i * n + j] = f32(f32(f32(f32(up + down) + left) + right) - f32(4 * centre));
    }
  }
  return lap;
}

function gradEnergy(g, h, w) {
  // photo_check._grad_energy of g [h, w]: the mean squared step down plus the mean squared step across
  const down = new Float32Array((h - 1) * w), across = new Float32Array(h * (w - 1));
  for (let i = 0; i < h; i++) {
    for (let j = 0; j < w; j++) {
      if (i < h - 1) { const d = f32(g[(i + 1) * w + j] - g[i * w + j]); down[i * w + j] = f32(d * d); }
      if (j < w - 1) { const d = f32(g[i * w + j + 1] - g[i * w + j]); across[i * (w - 1) + j] = f32(d * d); }
    }
  }
  return f32(mean(down) + mean(across));
}

function halfSize(g, size) {
  // g [S, S] -> [S/2, S/2], each 2 x 2 box averaged: g.reshape(S/2, 2, S/2, 2).mean((1, 3))
  const h = size / 2, out = new Float32Array(h * h);
  for (let i = 0; i < h; i++) {
    for (let j = 0; j < h; j++) {
      const at = 2 * i * size + 2 * j;
      out[i * h + j] = f32(f32(f32(g[at] + g[at + 1]) + f32(g[at + size] + g[at + size + 1])) / 4);
    }
  }
  return out;
}

function blockSharpness(g, lap, size) {
  // photo_check.measures' rel: per block of a 4 x 4 grid, the log of the Laplacian's variance against the luma's
  // (flat blocks count as unsharp) -> [16]; the log in float64, rounded to float32, as photo_check.py takes it
  const b = Math.floor((size - 2) / 4), rel = new Float32Array(16);
  for (let bi = 0; bi < 4; bi++) {
    for (let bj = 0; bj < 4; bj++) {
      const l = blockVariance(lap, size - 2, bi * b, bj * b, b, b);  // lap's block, and the same pixels of g
      const v = blockVariance(g, size, 1 + bi * b, 1 + bj * b, b, b);
      rel[bi * 4 + bj] = f32(Math.log(f32(f32(l + f32(1e-6)) / f32(v + f32(1e-3)))));
    }
  }
  return rel;
}

function edges(g, size) {
  // |step across| + |step down| of each pixel of g [S, S] but the last row and column -> [S-1, S-1]
  const n = size - 1, grad = new Float32Array(n * n);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < n; j++) {
      const at = i * size + j;
      grad[i * n + j] = f32(Math.abs(f32(g[at + 1] - g[at])) + Math.abs(f32(g[at + size] - g[at])));
    }
  }
  return grad;
}

export function measures(image, rules) {
  // photo_check.measures of a decoded photo (full resolution, upright) -> Float32Array of rules.measures
  const size = rules.size, eps = rules.eps, small = resize(image, size, size, 2.0), { luma, brightest } = greyOf(small);
  const g = new Float32Array(luma.length), u8 = new Uint8Array(luma.length);  // [S, S] each
  for (let i = 0; i < luma.length; i++) {
    g[i] = luma[i] / 255;  // stored as float32: NumPy's float32 division
    u8[i] = Math.min(255, Math.max(0, f32(f32(g[i] * 255) + 0.5)));  // np.clip(...).astype(np.uint8): truncated
  }
  const [p02, p50, p98] = [0.02, 0.5, 0.98].map((q) => levelAt(u8, q));
  const share = (test) => u8.reduce((n, v) => n + (test(v) ? 1 : 0), 0) / u8.length;
  const v = variance(g), lap = laplacian(g, size), lapVar = variance(lap);
  // a smooth (blurred) ramp's step per pixel doubles at half size (4x the energy): ratio ~1 there, up to 16 for
  // detail at the pixel level (or noise)
  const ratio = (4 * gradEnergy(g, size, size) + eps) / (gradEnergy(halfSize(g, size), size / 2, size / 2) + eps);
  const rel = blockSharpness(g, lap, size), sorted = Float32Array.from(rel).sort();
  const grad = edges(g, size), strong = grad.reduce((n, x) => n + (x > f32(0.1) ? 1 : 0), 0) / grad.length;
  return Float32Array.from([
    mean(g), Math.sqrt(v), p02, p50, p98, share((x) => x <= 8), share((x) => x >= 250),
    Math.log(lapVar + eps), Math.log((lapVar + eps) / (v + 1e-4)), Math.log(ratio),
    Math.max(...rel), sorted[11], Math.log(quantile(lap.map(Math.abs), 0.5) + 1e-4),
    Math.log(strong + 1e-3), Math.log(quantile(grad, 0.995) / (p98 - p02 + 0.02) + 1e-3),
    levelAt(brightest, 0.98),
  ]);
}

// ------------------------------------------------------------------------------------------------ the photo check

function sigmoid(z) {
  return 1 / (1 + Math.exp(-z));
}

function dot(a, b) {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * b[i];
  return s;
}

function headProbabilities(head, x) {
  // photo_check._Head: one logistic head per problem on the standardised inputs x [D] -> {problem: probability}
  const out = {};
  head.problems.forEach((problem, j) => {
    let z = 0;
    for (let d = 0; d < x.length; d++) z += ((x[d] - head.mean[d]) / head.std[d]) * head.weights[j][d];
    out[problem] = sigmoid(z + head.bias[j]);
  });
  return out;
}

function past(score, threshold, eps) {
  // photo_check._past: a head's output moved so that its threshold lands on rules.named (0.5)
  const s = Math.min(Math.max(score, eps), 1 - eps), t = Math.min(Math.max(threshold, eps), 1 - eps);
  return 1 / (1 + Math.exp(-(Math.log(s / (1 - s)) - Math.log(t / (1 - t)))));
}

export class PhotoCheck {
  // photo_check.PhotoCheck from its export_rules (captioner.json's "photo_check"): scores a photo's fixable
  // problems, names those over rules.named with their hints, and says which quarter turn makes it upright.
  constructor(rules) {
    this.rules = rules;
  }

  measures(image) {
    return measures(image, this.rules);
  }

  scoresOf(imageMeasures, pooledUnit = null) {
    // photo_check.PhotoCheck.scores_of: the measures and, where given, the CNN's pooled feature at unit length
    // [F] -> {problem: score in [0, 1], 4 decimals}, in rules.problems order
    const { pooled_head: pooled, image_head: image, upright, measures: names } = this.rules;
    const out = pooledUnit && pooled ? headProbabilities(pooled, [...imageMeasures, ...pooledUnit])
      : headProbabilities(image, imageMeasures);
    if (pooledUnit && upright) out.rotated = Math.max(...this.turnProbabilities(pooledUnit).slice(1));
    const lit = Math.max(imageMeasures[names.indexOf("p98")], imageMeasures[names.indexOf("v98")]);
    if (lit < f32(this.rules.dark_floor)) out.dark = 1.0;  // nothing in the frame is lit (compared in float32)
    const th = this.thresholds(pooledUnit != null);
    return Object.fromEntries(this.rules.problems.filter((p) => p in out)
      .map((p) => [p, pyRound(past(out[p], th[p], this.rules.eps), 4)]));
  }

  thresholds(pooledAvailable = true) {
    // {problem: the head's output above which it is named}
    const { image_head: image, pooled_head: pooled, upright } = this.rules;
    const th = Object.fromEntries(image.problems.map((p, j) => [p, image.thresholds[j]]));
    if (pooledAvailable && pooled) pooled.problems.forEach((p, j) => { th[p] = pooled.thresholds[j]; });
    if (pooledAvailable && upright) th.rotated = upright.turn_above;
    return th;
  }

  problems(scores) {
    // [{problem, score, hint}] for each score over rules.named, in rules.problems order
    return Object.entries(scores).filter(([, s]) => s > this.rules.named)
      .map(([problem, score]) => ({ problem, score, hint: this.rules.hints[problem] }));
  }

  turnProbabilities(pooledUnit) {
    // the pooled feature [F] -> the probability [4] that each of rules.turns (clockwise) makes the photo upright
    const { weights, bias } = this.rules.upright;
    const z = weights.map((w, j) => dot(pooledUnit, w) + bias[j]);  // [F] . [4, F] -> [4]
    const top = Math.max(...z), e = z.map((v) => Math.exp(v - top)), total = e.reduce((a, b) => a + b, 0);
    return e.map((v) => v / total);
  }

  uprightTurn(pooledUnit) {
    // the clockwise turn that makes a photo without text upright; 0 when unsure: a wrong turn is worse than none
    if (!pooledUnit || !this.rules.upright) return 0;
    const probs = this.turnProbabilities(pooledUnit), best = probs.indexOf(Math.max(...probs));
    return best && probs[best] > this.rules.upright.turn_above ? this.rules.turns[best] : 0;
  }
}

// ------------------------------------------------------------------------------------------ what the thing is

function argmax(p, from, to) {
  // the index of the largest of p[from .. to), the first where several are (as NumPy's argmax)
  let best = from;
  for (let i = from; i < to; i++) if (p[i] > p[best]) best = i;
  return best;
}

function logit(p, clip) {
  const q = Math.min(Math.max(p, clip), 1 - clip);
  return Math.log(q) - Math.log1p(-q);
}

export class Things {
  // things.Things from its export_rules (captioner.json's "things") and its classifier weight (things.f16, as
  // float32 [1000 * F]): the CNN's pooled feature, as it is -> the thing's name, or null.
  constructor(rules, weight) {
    this.rules = rules;
    this.weight = weight;
    const groups = rules.classes.slice(0, rules.groups).map((c) => new Set(c));
    // each name's rivals: the groups that share no ImageNet class with it
    this.rivals = rules.classes.map((c) => groups.flatMap((g, j) => (c.some((i) => g.has(i)) ? [] : [j])));
  }

  probs(pooledRaw) {
    // the pooled feature [F] -> ImageNet class probabilities [1000]: the classifier, then a softmax
    const { bias } = this.rules, dim = pooledRaw.length, z = new Float64Array(bias.length);
    for (let k = 0; k < z.length; k++) {
      let s = 0;
      for (let d = 0; d < dim; d++) s += pooledRaw[d] * this.weight[k * dim + d];
      z[k] = s + bias[k];
    }
    const top = Math.max(...z), e = z.map((v) => Math.exp(v - top)), total = e.reduce((a, b) => a + b, 0);
    return e.map((v) => v / total);
  }

  score(p, name) {
    // things.signals and things.calibrate of one name: its logit, its lead over its likeliest rival, whether it
    // is a broader kind -> the estimated chance that the name is right
    const { clip, calibration: c, groups } = this.rules;
    const rival = Math.max(0, ...this.rivals[name].map((j) => p[j]));
    const signals = [logit(p[name], clip), logit(p[name], clip) - logit(rival, clip), name >= groups ? 1 : 0];
    return sigmoid(signals.reduce((z, s, i) => z + ((s - c.mean[i]) / c.std[i]) * c.weights[i], 0) + c.bias);
  }

  assess(pooledRaw) {
    // things.Things.assess of one photo -> {name, score (3 decimals), level: "medium" | "high"} or null: the likeliest
    // group where its score clears the threshold, else the likeliest broader kind where its does
    const { classes, groups, names, thresholds } = this.rules, probs = this.probs(pooledRaw);
    const p = classes.map((c) => c.reduce((s, i) => s + probs[i], 0));  // [C]: each name's probability
    const candidates = [argmax(p, 0, groups), argmax(p, groups, p.length)];  // the likeliest group, broader kind
    const scores = candidates.map((name) => this.score(p, name));
    const k = scores[0] >= thresholds.medium ? 0 : scores[1] >= thresholds.medium ? 1 : null;
    if (k === null) return null;
    const high = thresholds.high != null && scores[k] >= thresholds.high;
    return { name: names[candidates[k]], score: pyRound(scores[k], 3), level: high ? "high" : "medium" };
  }
}

// ------------------------------------------------------------------------------------------------ the wording

export function sentence(caption, rules) {
  // description.sentence: a tokenised caption as written prose ("a dog runs ." -> "A dog runs.")
  let text = caption.split(/\s+/).filter((w) => w && w !== '"').join(" ");
  text = text.replace(new RegExp(rules.attached, "g"), "$1").replaceAll(" - ", "-").replace(/[ .,;:]+$/, "");
  return text ? text[0].toUpperCase() + text.slice(1) + "." : "";
}

export function fitAltText(text, rules) {
  // description.fit_alt_text: cut at a word to rules.max_chars characters (code points, as Python counts them)
  const chars = Array.from(text);
  if (chars.length <= rules.max_chars) return text;
  const cut = chars.slice(0, rules.max_chars - 1).join(""), space = cut.lastIndexOf(" ");
  return (space >= 0 ? cut.slice(0, space) : cut).replace(/[,;:]+$/, "") + "\u2026";
}

export function altText(caption, level, unfamiliar, rules) {
  // description.alt_text: the caption as one sentence, hedged by its confidence level, cut to fit; rules.abstain
  // for a photo unlike any the fit saw
  if (unfamiliar || !caption.trim()) return rules.abstain;
  const plain = sentence(caption, rules);
  if (!Object.hasOwn(rules.hedges, level)) return fitAltText(plain, rules);
  const phrase = (plain[0].toLowerCase() + plain.slice(1)).replace(new RegExp(rules.progressive), "$1 $2");
  return fitAltText(rules.hedges[level] + phrase, rules);
}

export function thingSentence(thing, rules) {
  // description.thing_sentence: "Probably a computer screen." at medium, "A computer screen." at high; null
  if (!thing) return null;
  const name = thing.name;
  return thing.level === "high" ? `${name[0].toUpperCase()}${name.slice(1)}.` : `${rules.hedges.medium}${name}.`;
}

export function combine(rules, caption, level, unfamiliar, look, problems, turned = 0, thing = null) {
  // description.combine: what a person hears (description), the same cut to fit an alt attribute (alt_text), the
  // lines read (text) and the most serious problem's hint (retake_hint). look.text: {lines, coverage} or null;
  // problems: [{problem, score, hint}], most serious first; turned: the clockwise turn made before captioning.
  const lines = look.text ? [...look.text.lines] : [];
  let said = altText(caption, level, unfamiliar, rules);
  said = said === rules.abstain ? null : turned ? `${rules.turned}${said[0].toLowerCase()}${said.slice(1)}` : said;
  const text = lines.length
    ? `${rules.text}${lines.slice(0, rules.spoken_lines).map((l) => l.replace(/[. ]+$/, "")).join(". ")}.` : null;
  const sure = said !== null && (level == null || level === "high" || level === "medium");
  // the thing, named where its fit is sure, says more than a caption hedged as a guess; a sure caption says it
  // better ("A dog runs through the grass.", not "Probably a dog." too)
  const named = sure ? null : thingSentence(thing, rules);
  if (named) said = null;
  const hints = problems.filter((p) => p.hint).map((p) => p.hint).slice(0, rules.spoken_hints);
  const mostlyText = text !== null && look.text.coverage >= rules.mostly_text;
  let parts = [named, mostlyText ? text : null, sure ? said : null, mostlyText ? null : text, ...hints,
               sure ? null : said].filter((p) => p);
  if (said === null && text === null && named === null && hints.length) parts.unshift(rules.nothing_seen);
  let retake = hints.length ? hints[0] : null;
  if (!parts.length) [parts, retake] = [[rules.nothing, rules.nothing_hint], rules.nothing_hint];
  const description = parts.join(" ");
  return { description, alt_text: fitAltText(description, rules), text: lines, retake_hint: retake };
}

export function answer(rules, checker, look, pooledUnit, caption, level, unfamiliar, turned = 0, thing = null) {
  // description.answer: the photo check's scores (of look.measures and, where given, the pooled feature at unit
  // length) and the problems found, the thing named (Things.assess, or null), and what combine makes of it all.
  // look: {measures, text: {lines, coverage, angle, confidence} or null, turn}; rules: captioner.json's wording.
  const scores = checker.scoresOf(look.measures, pooledUnit);
  const read = look.text != null && look.text.lines.length > 0;
  const problems = checker.problems(scores).filter((p) => !(read && p.problem === "dark"));  // text was seen
  const told = problems.filter((p) => !(turned && p.problem === "rotated"));  // turned upright: says so itself
  const said = combine(rules, caption, level, unfamiliar, look, told, turned, thing);
  return { alt_text: said.alt_text, description: said.description, text: said.text, thing,
           photo_problems: problems.map((p) => ({ problem: p.problem, score: pyRound(p.score, 3) })),
           photo_scores: Object.fromEntries(Object.entries(scores).map(([k, v]) => [k, pyRound(v, 3)])),
           retake_hint: said.retake_hint, turned };
}
