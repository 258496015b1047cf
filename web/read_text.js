// Read the text in a photo, in the browser: read_text.py's TextReader (with text_geometry.py's steps around its
// networks) in JavaScript, step for step, so that the page says the very lines `inference.py` says. The same three
// networks (PaddleOCR's PP-OCRv6 text detector and recogniser, and its direction classifier) run in onnxruntime-web;
// every step around them is repeated here with the same arithmetic: Pillow's bilinear resize (pillow.js, to the
// bit), the same crop sampler, the same boxes from the detector's map, the same junk rules, reading order and turns.
// Only the networks' own float rounding differs (WebAssembly adds in another order than the CPU build of ONNX
// Runtime does).
//
// The settings, the word lists, the patterns and the recogniser's characters come from the export
// (read_text.export_rules(), saved as JSON, and words.txt): nothing is written twice.
import { resize } from "./pillow.js";

// ------------------------------------------------------------------------------------------------- images
// An image is {width, height, rgba}: 4 bytes a pixel, row by row, as a canvas gives them. The reader's own images
// hold the channels in the order the networks were trained on, B, G, R (then 255): pillow.js's resize treats each
// channel alike, so it does not mind the order.

export function scaledSize(width, height, longSide) {
  // text_geometry.scaled_size: the long side becomes longSide (if longer), the other its share, rounded half up, in
  // integers so that both languages agree -> [w, h]
  const longest = Math.max(width, height);
  if (longest <= longSide) return [width, height];
  return [width, height].map((n) => Math.max(1, Math.floor((2 * n * longSide + longest) / (2 * longest))));
}

export function readImage(image, longSide = 2048) {
  // text_geometry.to_array(image, CROP_SIDE): the photo (RGBA) scaled to at most longSide with Pillow's bilinear
  // resize, its channels turned to B, G, R -> the reader's image
  const [w, h] = scaledSize(image.width, image.height, longSide);
  const scaled = resize(image, w, h);
  const rgba = new Uint8ClampedArray(scaled.rgba.length);
  for (let i = 0; i < rgba.length; i += 4) {
    rgba[i] = scaled.rgba[i + 2];
    rgba[i + 1] = scaled.rgba[i + 1];
    rgba[i + 2] = scaled.rgba[i];
    rgba[i + 3] = 255;
  }
  return { width: w, height: h, rgba };
}

function turnLeft(image) {
  // np.rot90: a quarter turn counter-clockwise; (H, W) -> (W, H). Pixel (x, y) of the result is pixel
  // (W - 1 - y, x) of the image.
  const { width, height, rgba } = image, out = new Uint8ClampedArray(rgba.length);
  for (let y = 0; y < width; y++) {
    for (let x = 0; x < height; x++) {
      const from = (x * width + (width - 1 - y)) * 4, to = (y * height + x) * 4;
      for (let c = 0; c < 4; c++) out[to + c] = rgba[from + c];
    }
  }
  return { width: height, height: width, rgba: out };
}

function turnHalf(image) {
  // np.rot90(image, 2): upside down. Pixels are 4 bytes, so reversing the pixel order is enough.
  const { width, height, rgba } = image, out = new Uint8ClampedArray(rgba.length), n = width * height;
  for (let i = 0; i < n; i++) {
    for (let c = 0; c < 4; c++) out[i * 4 + c] = rgba[(n - 1 - i) * 4 + c];
  }
  return { width, height, rgba: out };
}

function areaWeights(nIn, nOut) {
  // text_geometry.area_weights: for each new pixel, its first old pixel, how many old ones it covers and their
  // weights (the share of the new pixel each covers), flat: weights[i * span + t] is the t-th of new pixel i
  const scale = nIn / nOut, span = Math.ceil(scale) + 1;
  const starts = new Int32Array(nOut), counts = new Int32Array(nOut), weights = new Float64Array(nOut * span);
  for (let i = 0; i < nOut; i++) {
    const lo = i * scale, hi = (i + 1) * scale, first = Math.floor(lo), end = Math.min(Math.ceil(hi), nIn);
    for (let j = first; j < end; j++) weights[i * span + j - first] = (Math.min(j + 1, hi) - Math.max(j, lo)) / scale;
    starts[i] = first;
    counts[i] = end - first;
  }
  return { starts, counts, weights, span };
}

function shrink(img, size, horizontal) {
  // text_geometry.shrink: the width (horizontal) or the height shrunk to `size` by area averaging, each new pixel
  // the weighted sum of the old ones it covers, added first to last in float64, rounded half up
  const { starts, counts, weights, span } = areaWeights(horizontal ? img.width : img.height, size);
  const width = horizontal ? size : img.width, height = horizontal ? img.height : size, src = img.rgba;
  const out = new Uint8ClampedArray(width * height * 4);
  // one step to the next old pixel along the shrunk side, in bytes
  const step = horizontal ? 4 : img.width * 4;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = horizontal ? x : y, n = counts[i], w0 = i * span, at = (y * width + x) * 4;
      const from = horizontal ? (y * img.width + starts[i]) * 4 : (starts[i] * img.width + x) * 4;
      let r = 0, g = 0, b = 0;
      for (let t = 0; t < n; t++) {
        const w = weights[w0 + t], p = from + t * step;
        r += src[p] * w;
        g += src[p + 1] * w;
        b += src[p + 2] * w;
      }
      out[at] = Math.floor(r + 0.5);  // a Uint8ClampedArray clamps to 0..255
      out[at + 1] = Math.floor(g + 0.5);
      out[at + 2] = Math.floor(b + 0.5);
      out[at + 3] = 255;
    }
  }
  return { width, height, rgba: out };
}

function resizeImage(img, width, height) {
  // text_geometry.resize: the width first, then the height; a side that shrinks is area-averaged, one that grows
  // is Pillow's bilinear resize (pillow.js)
  if (width < img.width) img = shrink(img, width, true);
  else if (width > img.width) img = resize(img, width, img.height);
  if (height < img.height) img = shrink(img, height, false);
  else if (height > img.height) img = resize(img, img.width, height);
  return img;
}

function roundHalfEven(v) {
  // Python's round(): a tie goes to the even neighbour
  const f = Math.floor(v);
  return v - f !== 0.5 ? Math.round(v) : f % 2 === 0 ? f : f + 1;
}

function resizeSide(img, side) {
  // text_geometry.resize_side: the long side about `side`, each side a multiple of 32 (the detector's grid)
  const scale = side / Math.max(img.height, img.width);
  const [w, h] = [img.width, img.height].map((n) => Math.max(32, roundHalfEven(n * scale / 32) * 32));
  return resizeImage(img, w, h);
}

function fitHeight(crop, height, maxWidth) {
  // text_geometry.fit_height: `height` px high, the width in proportion (at most maxWidth)
  const w = Math.min(maxWidth, Math.ceil(height * crop.width / crop.height));
  return resizeImage(crop, Math.max(w, 1), height);
}

export function sampleBox(img, box, w, h) {
  // text_geometry.sample_box: crop pixel (x, y) is img at tl + x/w (tr - tl) + y/h (bl - tl), bilinear between the
  // four nearest pixels (edge pixels repeated beyond the image), in float64, rounded half up. The operations are
  // Python's, in its order, so the bytes are the same.
  const [tl, tr, , bl] = box;
  const ux = (tr[0] - tl[0]) / w, uy = (tr[1] - tl[1]) / w;  // one crop pixel along the text, in img pixels
  const vx = (bl[0] - tl[0]) / h, vy = (bl[1] - tl[1]) / h;  // ... and across it
  const lastX = img.width - 1, lastY = img.height - 1, src = img.rgba;
  const out = new Uint8ClampedArray(w * h * 4);
  const clamp = (v, last) => Math.min(Math.max(v, 0), last);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const sx = tl[0] + x * ux + y * vx, sy = tl[1] + x * uy + y * vy;
      const x0 = Math.floor(sx), y0 = Math.floor(sy), fx = sx - x0, fy = sy - y0;
      const xa = clamp(x0, lastX), xb = clamp(x0 + 1, lastX), ya = clamp(y0, lastY), yb = clamp(y0 + 1, lastY);
      const at = (y * w + x) * 4;
      for (let c = 0; c < 3; c++) {
        const top = src[(ya * img.width + xa) * 4 + c] * (1 - fx) + src[(ya * img.width + xb) * 4 + c] * fx;
        const bottom = src[(yb * img.width + xa) * 4 + c] * (1 - fx) + src[(yb * img.width + xb) * 4 + c] * fx;
        out[at + c] = Math.min(Math.max(Math.floor(top * (1 - fy) + bottom * fy + 0.5), 0), 255);
      }
      out[at + 3] = 255;
    }
  }
  return { width: w, height: h, rgba: out };
}

function cropBox(img, box, maxAspect) {
  // text_geometry.crop_box: the box cut out and laid flat, w along its top edge; a page-wide run of tiny print is
  // squashed to maxAspect heights rather than fed as a huge tensor
  const [bw, bh] = boxSides(box);
  const w = Math.max(roundHalfEven(bw), 1), h = Math.max(roundHalfEven(bh), 1);
  const crop = sampleBox(img, box, w, h);
  return w > maxAspect * h ? resizeImage(crop, maxAspect * h, h) : crop;
}

function normaliseInto(img, x, offset, plane, width) {
  // text_geometry.normalise: B, G, R bytes -> [-1, 1] in float32, channel-first, into the tensor x at `offset`, whose
  // rows are `width` long and channels `plane` apart (a batch pads each crop to its widest). numpy computes
  // float32(byte * float32(2/255)) - 1; so does this.
  const scale = Math.fround(2 / 255);
  for (let c = 0; c < 3; c++) {
    for (let y = 0; y < img.height; y++) {
      for (let i = 0; i < img.width; i++) {
        x[offset + c * plane + y * width + i] = Math.fround(img.rgba[(y * img.width + i) * 4 + c] * scale) - 1;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------- geometry
// A box is four corners [x, y], tl, tr, br, bl, stored as float32 values (Math.fround) as numpy stores them.

function distance(p, q) {
  const dx = p[0] - q[0], dy = p[1] - q[1];
  return Math.sqrt(dx * dx + dy * dy);
}

function boxSides(box) {
  // (width along the text, height)
  return [distance(box[0], box[1]), distance(box[0], box[3])];
}

function lineLike(box, aspect) {
  // a text line is long and thin (either way: the photo may be on its side); a blob is not
  const [w, h] = boxSides(box);
  return Math.max(w, h) >= aspect * Math.min(w, h);
}

function area(box) {
  // the shoelace formula, term by term as text_geometry.box_area adds them
  let sum = 0;
  for (let i = 0; i < 4; i++) {
    const j = (i + 3) % 4;
    sum += box[i][0] * box[j][1] - box[i][1] * box[j][0];
  }
  return 0.5 * Math.abs(sum);
}

function orderCorners(pts) {
  // text_geometry.order_corners: the two leftmost corners (the lower y first on a tie) are the left side; each side
  // top first -> tl, tr, br, bl
  const byX = pts.map((p, i) => [p, i]).sort((a, b) => a[0][0] - b[0][0] || a[0][1] - b[0][1] || a[1] - b[1])
    .map(([p]) => p);
  const byY = (a, b) => a[1] - b[1];
  const left = byX.slice(0, 2).sort(byY), right = byX.slice(2).sort(byY);
  return [left[0], right[0], right[1], left[1]];
}

function rectCorners(cx, cy, w, h, angle) {
  // text_geometry.rect_corners: a rotated rectangle (centre, sides, angle in degrees) -> its corners, ordered
  const a = angle * (Math.PI / 180);
  const u = [Math.cos(a) * w / 2, Math.sin(a) * w / 2], v = [-Math.sin(a) * h / 2, Math.cos(a) * h / 2];
  const f = Math.fround;
  return orderCorners([
    [f(cx - u[0] - v[0]), f(cy - u[1] - v[1])], [f(cx + u[0] - v[0]), f(cy + u[1] - v[1])],
    [f(cx + u[0] + v[0]), f(cy + u[1] + v[1])], [f(cx - u[0] + v[0]), f(cy - u[1] + v[1])],
  ]);
}

function rectMean(prob, cx, cy, w, h, angle) {
  // text_geometry.rect_mean: the mean of the map over the pixels whose centres lie in the rotated rectangle
  const a = angle * (Math.PI / 180), cos = Math.cos(a), sin = Math.sin(a), r = 0.5 * Math.hypot(w, h);
  const x0 = Math.max(Math.floor(cx - r), 0), x1 = Math.min(Math.ceil(cx + r), prob.width - 1);
  const y0 = Math.max(Math.floor(cy - r), 0), y1 = Math.min(Math.ceil(cy + r), prob.height - 1);
  let sum = 0, n = 0;
  for (let y = y0; y <= y1; y++) {
    for (let x = x0; x <= x1; x++) {
      const dx = x - cx, dy = y - cy;
      const along = dx * cos + dy * sin, across = -dx * sin + dy * cos;
      if (Math.abs(along) <= w / 2 + 0.5 && Math.abs(across) <= h / 2 + 0.5) {
        sum += prob.data[y * prob.width + x];
        n++;
      }
    }
  }
  return n ? sum / n : 0;
}

function dilatedMask(prob, thresh) {
  // cv2.dilate((prob > thresh), 2 x 2 ones): a pixel is set where it or its upper, left or upper-left
  // neighbour is above the threshold (numpy compares float32 with float32(thresh))
  const { width, height, data } = prob, t = Math.fround(thresh), above = (x, y) => data[y * width + x] > t;
  const mask = new Uint8Array(width * height);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      mask[y * width + x] = above(x, y) || (y > 0 && above(x, y - 1)) || (x > 0 && above(x - 1, y))
        || (x > 0 && y > 0 && above(x - 1, y - 1)) ? 1 : 0;
    }
  }
  return mask;
}

function components(mask, width, height) {
  // cv2.connectedComponentsWithStats(mask, connectivity=8), in its order: the regions of set pixels (touching
  // at a side or a corner), each as the list of its pixels' [x, y], numbered as OpenCV numbers them (by the
  // first 2 x 2 block, in raster order, that holds one of their pixels)
  const parent = new Int32Array(width * height).fill(-1);
  const find = (i) => { while (parent[i] !== i) { parent[i] = parent[parent[i]]; i = parent[i]; } return i; };
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = y * width + x;
      if (!mask[i]) continue;
      parent[i] = i;
      for (const [dx, dy] of [[-1, 0], [-1, -1], [0, -1], [1, -1]]) {  // the neighbours already visited
        const nx = x + dx, ny = y + dy;
        if (nx < 0 || nx >= width || ny < 0 || !mask[ny * width + nx]) continue;
        const a = find(i), b = find(ny * width + nx);
        if (a !== b) parent[Math.max(a, b)] = Math.min(a, b);
      }
    }
  }
  const regions = new Map();  // root -> {pixels, block}
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (!mask[y * width + x]) continue;
      const root = find(y * width + x), block = (y >> 1) * width + (x >> 1);
      if (!regions.has(root)) regions.set(root, { pixels: [], block });
      const r = regions.get(root);
      r.pixels.push([x, y]);
      r.block = Math.min(r.block, block);
    }
  }
  return [...regions.values()].sort((a, b) => a.block - b.block).map((r) => r.pixels);
}

function convexHull(pixels) {
  // the convex hull of the pixels' centres (Andrew's monotone chain, in integers: exact), counter-clockwise in
  // the image's axes; only each row's two ends can be corners
  const ends = new Map();
  for (const [x, y] of pixels) {
    const e = ends.get(y);
    if (!e) ends.set(y, [x, x]);
    else { e[0] = Math.min(e[0], x); e[1] = Math.max(e[1], x); }
  }
  const pts = [];
  for (const [y, [a, b]] of ends) { pts.push([a, y]); if (b !== a) pts.push([b, y]); }
  pts.sort((p, q) => p[0] - q[0] || p[1] - q[1]);
  const cross = (o, a, b) => (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]);
  const half = (list) => {
    const out = [];
    for (const p of list) {
      while (out.length >= 2 && cross(out[out.length - 2], out[out.length - 1], p) <= 0) out.pop();
      out.push(p);
    }
    return out.slice(0, -1);
  };
  return pts.length < 3 ? pts : [...half(pts), ...half([...pts].reverse())];
}

function minAreaRect(pixels) {
  // cv2.minAreaRect: the smallest rotated rectangle around the pixels' centres -> {cx, cy, w, h, angle}. The
  // smallest has a side along an edge of the convex hull, so each edge is tried. Its (w, h, angle) may be
  // OpenCV's (h, w, angle + 90): the same rectangle, and nothing after this tells them apart.
  const hull = convexHull(pixels);
  if (hull.length < 3) return { cx: 0, cy: 0, w: 0, h: 0, angle: 0 };  // a line or a point: no box
  let best = null;
  for (let i = 0; i < hull.length; i++) {
    const p = hull[i], q = hull[(i + 1) % hull.length], len = distance(q, p);
    const ex = (q[0] - p[0]) / len, ey = (q[1] - p[1]) / len;  // along the edge; (-ey, ex) across it
    let lo = Infinity, hi = -Infinity, lo2 = Infinity, hi2 = -Infinity;
    for (const [x, y] of hull) {
      const along = x * ex + y * ey, across = -x * ey + y * ex;
      lo = Math.min(lo, along); hi = Math.max(hi, along); lo2 = Math.min(lo2, across); hi2 = Math.max(hi2, across);
    }
    const size = (hi - lo) * (hi2 - lo2);
    if (best === null || size < best.size) {
      const a = (lo + hi) / 2, b = (lo2 + hi2) / 2;
      best = { size, cx: a * ex - b * ey, cy: a * ey + b * ex, w: hi - lo, h: hi2 - lo2,
               angle: Math.atan2(ey, ex) * 180 / Math.PI };
    }
  }
  const f = Math.fround;  // OpenCV answers in float32
  return { cx: f(best.cx), cy: f(best.cy), w: f(best.w), h: f(best.h), angle: f(best.angle) };
}

export function boxesFromMap(prob, thresh, boxThresh, unclip, maxBoxes) {
  // text_geometry.boxes_from_map: the detector's map {width, height, data} -> [{box, score}], largest regions first.
  // Pixels above `thresh` (dilated by one) form regions; each region's smallest rotated rectangle, if the map's
  // mean in it reaches boxThresh, grows by area * unclip / perimeter on every side (the detector was trained
  // on text shrunk by as much).
  const regions = components(dilatedMask(prob, thresh), prob.width, prob.height);
  const order = regions.map((pixels, k) => k).sort((a, b) => regions[b].length - regions[a].length || a - b);
  const out = [];
  for (const k of order.slice(0, maxBoxes)) {
    const { cx, cy, w, h, angle } = minAreaRect(regions[k]);
    if (Math.min(w, h) < 3) continue;
    const score = rectMean(prob, cx, cy, w, h, angle);
    if (score < boxThresh) continue;
    const grow = w * h * unclip / (2 * (w + h));
    if (Math.min(w, h) + 2 * grow < 5) continue;
    out.push({ box: rectCorners(cx, cy, w + 2 * grow, h + 2 * grow, angle), score });
  }
  return out;
}

function uprightCentre(box, angle, width, height) {
  // text_geometry.upright_centre: the box's centre and text height in the frame turned `angle` degrees clockwise
  const x = (box[0][0] + box[1][0] + box[2][0] + box[3][0]) / 4;
  const y = (box[0][1] + box[1][1] + box[2][1] + box[3][1]) / 4;
  const turned = { 0: [x, y], 90: [height - y, x], 180: [width - x, height - y], 270: [y, width - x] }[angle];
  return [turned[0], turned[1], Math.min(...boxSides(box))];
}

function readingOrder(items, angle, width, height) {
  // text_geometry.reading_order: [box, text] -> rows of text, top to bottom, each left to right, in the upright
  // frame; a box whose centre is within half a line's height of a row's joins it
  const placed = items.map(([box, text]) => [uprightCentre(box, angle, width, height), text])
    .sort((a, b) => a[0][1] - b[0][1]);  // a stable sort, as Python's
  const rows = [];
  for (const [[x, y, h], text] of placed) {
    const last = rows[rows.length - 1];
    if (last && Math.abs(y - last.y) < 0.5 * Math.max(h, last.h)) last.parts.push([x, text]);
    else rows.push({ y, h, parts: [[x, text]] });
  }
  const byX = (a, b) => a[0] - b[0] || (a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0);
  return rows.map((r) => r.parts.sort(byX).map(([, t]) => t).join(" "));
}

// ------------------------------------------------------------------------------------------------- words

const codePoints = (s) => Array.from(s);  // Python counts and slices code points, not UTF-16 units
const isAlpha = (c) => /^\p{L}$/u.test(c);  // str.isalpha: categories Lu Ll Lt Lm Lo
const isAlnum = (c) => /^[\p{L}\p{N}]$/u.test(c);  // str.isalnum: letters and numbers

function triples(word) {
  // read_text._triples: the letter triples of ^word$
  const padded = codePoints(`^${word}$`), out = [];
  for (let i = 0; i + 3 <= padded.length; i++) out.push(padded.slice(i, i + 3).join(""));
  return out;
}

export class Words {
  // read_text.Words: the English words (words.txt, read_text.word_list()) and their letter triples; it also
  // keeps the exported patterns and word sets the junk rules use
  constructor(wordList, exported) {
    this.cost = new Set(wordList);
    this.triples = new Map();
    for (const w of this.cost) for (const t of triples(w)) this.triples.set(t, (this.triples.get(t) || 0) + 1);
    this.strip = new Set(codePoints(exported.patterns.strip));
    this.number = new RegExp(exported.patterns.number, "u");
    this.cjk = new RegExp(exported.patterns.cjk, "u");
    this.functionWords = new Set(exported.function_words);
    this.longName = exported.settings.LONG_NAME;
    this.maxWord = exported.settings.MAX_WORD;
  }

  core(token) {
    // read_text._core: without the punctuation around it or a possessive 's, lower-cased
    const cs = codePoints(token);
    let a = 0, b = cs.length;
    while (a < b && this.strip.has(cs[a])) a++;
    while (b > a && this.strip.has(cs[b - 1])) b--;
    const core = cs.slice(a, b).join("").toLowerCase();
    return (core.endsWith("'s") || core.endsWith("’s")) && codePoints(core).length > 3 ? core.slice(0, -2) : core;
  }

  isWord(token) {
    const core = this.core(token);
    return core.length > 0 && (this.cost.has(core) || this.number.test(core));
  }

  looksLikeWord(token) {
    // letters only (a hyphen between parts allowed), 4 to LONG_NAME of them, every letter triple common
    const core = this.core(token), parts = core.split("-"), n = codePoints(core).length;
    return n >= 4 && n <= this.longName && parts.every((p) => p.length > 0 && codePoints(p).every(isAlpha))
      && parts.every((p) => triples(p).every((t) => (this.triples.get(t) || 0) >= 3));
  }
}

function pySplit(text) {
  // str.split(): on runs of whitespace, no empty parts
  return text.split(/\s+/u).filter((t) => t.length > 0);
}

export function tidyLine(text, score, words, languages, rules) {
  // read_text.tidy_line: the recogniser's line -> [tidied line, kept?] under the junk rules (rules: Rules' fields)
  const cjk = words.cjk;
  text = pySplit(text).join(" ");
  if (!languages.includes("zh")) text = text.replace(new RegExp(cjk.source, "gu"), " ").trim();
  const letters = (t) => codePoints(t).filter(isAlpha).length;
  // a run of letters longer than a name the list lacks is words run together, or junk: not said
  const tokens = pySplit(text).filter((t) => letters(t) <= Math.min(rules.long_name, words.maxWord)
                                             || words.isWord(t));
  const line = tokens.join(" ");
  const alnum = codePoints(line).filter(isAlnum).length;
  if (!tokens.length || alnum < rules.min_alnum || alnum < 0.6 * codePoints(line.replaceAll(" ", "")).length) {
    return [line, false];
  }
  if (tokens.every((t) => words.functionWords.has(words.core(t)))) return [line, false];
  // a word the list lacks (a medicine's name) counts where the recogniser is sure and it looks like a word
  const good = tokens.filter((t) => words.isWord(t) || cjk.test(t)
                                    || (score >= rules.sure_score && words.looksLikeWord(t))).length / tokens.length;
  // a line read with great assurance is kept whatever its words (a brand, a name, another language)
  return [line, score >= rules.min_score && (good >= rules.min_word_share || score >= rules.trust_score)];
}

export function ctcDecode(probs, steps, classes, chars) {
  // read_text.ctc_decode: one line's output (steps, classes) -> [text, mean probability of its characters]: the
  // likeliest class at each step, repeats merged, blanks (class 0) dropped
  let text = "", sum = 0, n = 0, previous = -1;
  for (let t = 0; t < steps; t++) {
    let best = 0, p = probs[t * classes];
    for (let c = 1; c < classes; c++) if (probs[t * classes + c] > p) { best = c; p = probs[t * classes + c]; }
    if (best !== 0 && best !== previous) { text += chars[best - 1]; sum += p; n++; }
    previous = best;
  }
  return [text, n ? sum / n : 0];
}

function meanScore(read) {
  // read_text._mean_score: the length-weighted mean score of [text, score]
  let sum = 0, total = 0;
  for (const [t, s] of read) { const n = Math.max(codePoints(t).length, 1); sum += s * n; total += n; }
  return sum / Math.max(total, 1);
}

function worth(read, minScore) {
  // read_text._worth: the characters read at minScore or above, weighted by their scores
  let sum = 0;
  for (const [t, s] of read) if (s >= minScore) sum += codePoints(t.trim()).length * s;
  return sum;
}

function lineBatches(crops, batch) {
  // read_text.line_batches: crop indices, narrowest first, `batch` at a time (a batch is padded to its widest)
  const order = crops.map((c, i) => i).sort((a, b) => crops[a].width / crops[a].height
                                                      - crops[b].width / crops[b].height);
  const out = [];
  for (let i = 0; i < order.length; i += batch) out.push(order.slice(i, i + batch));
  return out;
}

// ------------------------------------------------------------------------------------------------- the reader

export class TextReader {
  // read_text.TextReader: the three networks' sessions, the settings and the words; firstLook() then read()

  static async load(ort, base, rules, wordsText, options = {}) {
    // the sessions from base + the model files' names (ort: the imported onnxruntime-web module)
    const made = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
    const [det, cls, rec] = await Promise.all(["det", "cls", "rec"].map(
      (k) => ort.InferenceSession.create(base + rules.models[k], made)));
    return new TextReader(ort, { det, cls, rec }, rules, wordsText.split("\n").filter(Boolean), options);
  }

  constructor(ort, sessions, rules, wordList, { languages = ["en"] } = {}) {
    // ort: onnxruntime-web; sessions: {det, cls, rec}; rules: read_text.export_rules(); wordList: its words
    this.ort = ort;
    this.sessions = sessions;
    this.rules = rules;
    this.s = rules.settings;  // READ_SIZE, DET_SIDE, ... by read_text.py's names
    this.languages = languages;
    this.words = new Words(wordList, rules);
  }

  async run(session, x, dims) {
    // one network on a float32 tensor -> its first output {data, dims}
    const result = await session.run({ [session.inputNames[0]]: new this.ort.Tensor("float32", x, dims) });
    const out = result[session.outputNames[0]];
    return { data: out.data, dims: out.dims };
  }

  async detect(img, side) {
    // the text probability map {width, height, data} of the image at about `side` px long
    const small = resizeSide(img, side);
    const x = new Float32Array(3 * small.height * small.width);
    normaliseInto(small, x, 0, small.height * small.width, small.width);
    const out = await this.run(this.sessions.det, x, [1, 3, small.height, small.width]);  // -> (1, 1, h, w)
    return { width: out.dims[3], height: out.dims[2], data: out.data };
  }

  async boxes(img, side, boxThresh) {
    // read_text.TextReader._boxes: the detector's boxes in img's pixels (scaled in float32, as numpy does)
    const prob = await this.detect(img, side), f = Math.fround, s = this.s;
    const sx = f(img.width / prob.width), sy = f(img.height / prob.height);
    return boxesFromMap(prob, s.DB_THRESH, boxThresh, s.UNCLIP, s.MAX_CANDIDATES)
      .map(({ box, score }) => ({ box: box.map(([x, y]) => [f(x * sx), f(y * sy)]), score }));
  }

  async direction(crops) {
    // read_text.Networks.direction: P(the crop is upside down) per crop
    const out = new Array(crops.length).fill(0), [h, w] = this.s.CLS_SHAPE;
    for (const idx of lineBatches(crops, this.rules.batch)) {
      const x = new Float32Array(idx.length * 3 * h * w);  // (B, 3, 48, 192), zero (grey) padded
      idx.forEach((i, j) => normaliseInto(fitHeight(crops[i], h, w), x, j * 3 * h * w, h * w, w));
      const p = await this.run(this.sessions.cls, x, [idx.length, 3, h, w]);  // -> (B, 2): P(0), P(180)
      idx.forEach((i, j) => { out[i] = p.data[j * 2 + 1]; });
    }
    return out;
  }

  async recognise(crops) {
    // read_text.Networks.recognise: [text, mean character probability] per crop
    const out = new Array(crops.length), h = this.s.REC_HEIGHT;
    for (const idx of lineBatches(crops, this.rules.batch)) {
      const ratio = Math.max(this.s.REC_MIN_WIDTH / h, ...idx.map((i) => crops[i].width / crops[i].height));
      const width = Math.trunc(h * ratio);
      const x = new Float32Array(idx.length * 3 * h * width);  // (B, 3, 48, W), zero (grey) padded
      idx.forEach((i, j) => normaliseInto(fitHeight(crops[i], h, width), x, j * 3 * h * width, h * width, width));
      const p = await this.run(this.sessions.rec, x, [idx.length, 3, h, width]);  // -> (B, T, C)
      const [, steps, classes] = p.dims;
      idx.forEach((i, j) => {
        out[i] = ctcDecode(p.data.subarray(j * steps * classes, (j + 1) * steps * classes), steps, classes,
                           this.rules.chars);
      });
    }
    return out;
  }

  async firstLook(image) {
    // read_text.TextReader.first_look: the detector on the photo at LOOK_SIDE; read() takes the look
    const start = performance.now(), s = this.s;
    const img = readImage(image, s.CROP_SIDE);
    const found = (await this.boxes(img, s.LOOK_SIDE, s.LOOK_THRESH)).map((b) => b.box)
      .filter((b) => lineLike(b, s.LOOK_ASPECT));
    return { img, boxes: found, passes: found.length >= s.LOOK_MIN_BOXES, seconds: (performance.now() - start) / 1000 };
  }

  async read(image, look = null) {
    // read_text.TextReader.read: the confident lines, in reading order -> {lines, confidence, coverage, angle,
    // seconds} as TextResult.as_dict gives them
    const start = performance.now();
    const raw = await this.readRaw(image, look);
    return { ...this.judge(raw), seconds: round4((performance.now() - start) / 1000) };
  }

  async readRaw(image, look = null) {
    // read_text.TextReader.read_raw: where no line is found in the photo as it is, it is looked at turned a
    // quarter (the detector misses much small print that runs sideways), and the reading that says more kept
    const img = look ? look.img : readImage(image, this.s.CROP_SIDE);
    let found = await this.readFrame(img, 0);
    if (!found.boxes.length) {
      const turned = await this.readFrame(img, 270);
      if (worth(turned.read, this.s.MIN_SCORE) > worth(found.read, this.s.MIN_SCORE)) found = turned;
    }
    return found;
  }

  async readFrame(img, turn) {
    // read_text.TextReader._read_frame: findLines and orient in one frame
    const found = await this.findLines(img, turn);
    const [boxes, read, angle] = await this.orient(found.frame, found.boxes);
    return { boxes, read, angle, turn, ...found.signals };
  }

  async findLines(img, turn) {
    // read_text.TextReader._find_lines: the frame (img turned `turn` clockwise: 270 is a quarter to the left),
    // its line boxes worth reading (largest print first, at most MAX_LINES) and the signals judge() needs
    const frame = turn === 270 ? turnLeft(img) : img, s = this.s;
    const { width, height } = frame;
    const found = await this.boxes(frame, s.DET_SIDE, s.BOX_THRESH);
    const lines = found.map((b) => b.box).filter((b) => lineLike(b, s.LINE_ASPECT));  // a blob is no line
    let covered = 0;
    for (const b of lines) covered += area(b);
    const least = s.MIN_TEXT_PX * Math.max(width, height) / s.READ_SIZE;  // MIN_TEXT_PX is at READ_SIZE
    const side = (b) => Math.min(...boxSides(b));
    const boxes = lines.filter((b) => side(b) >= least).sort((a, b) => side(b) - side(a)).slice(0, s.MAX_LINES);
    return { frame, boxes, signals: { coverage: Math.min(1, covered / (width * height)), width, height } };
  }

  async orient(img, boxes) {
    // read_text.TextReader._orient: text on its side has tall boxes; the direction classifier votes 0 or 180
    // over all crops, weighted by their length; where the reading is unsure the other direction is read too
    // -> [kept boxes, their readings, the clockwise turn that makes the text upright]
    const sides = boxes.map(boxSides);
    let tall = 0, wide = 0;
    for (const [w, h] of sides) { if (h > 1.5 * w) tall += w * h; if (w > 1.5 * h) wide += w * h; }
    const sideways = tall > wide;
    boxes = boxes.filter((b, i) => (sideways ? sides[i][1] > sides[i][0] / 1.5 : sides[i][0] > sides[i][1] / 1.5));
    let crops = boxes.map((b) => cropBox(img, b, this.s.MAX_ASPECT));
    if (sideways) crops = crops.map(turnLeft);  // the text now runs left to right, upright or upside down
    if (!crops.length) return [[], [], 0];
    const flipped = await this.direction(crops);
    let vote = 0;
    crops.forEach((c, i) => { vote += c.width * (2 * flipped[i] - 1); });
    let flip = vote > 0;
    let read = await this.recognise(flip ? crops.map(turnHalf) : crops);
    const retry = this.s.RETRY_LINES;
    if (meanScore(read) < this.s.RETRY_SCORE) {  // try the other way on the largest print first
      const other = flip ? crops : crops.map(turnHalf);
      const top = await this.recognise(other.slice(0, retry));
      if (meanScore(top) > meanScore(read.slice(0, retry))) {
        read = [...top, ...await this.recognise(other.slice(retry))];
        flip = !flip;
      }
    }
    return [boxes, read, ((sideways ? 270 : 0) + 180 * flip) % 360];
  }

  judge(raw) {
    // read_text.TextReader.judge: the junk rules, then reading order -> the result without its time
    const kept = [], scores = [];
    raw.boxes.forEach((box, i) => {
      const [text, score] = raw.read[i];
      const [line, keep] = tidyLine(text, score, this.words, this.languages, this.rules.rules);
      if (keep) { kept.push([box, line]); scores.push(score); }
    });
    const lines = readingOrder(kept, raw.angle, raw.width, raw.height);
    const confidence = scores.length ? scores.reduce((a, b) => a + b, 0) / scores.length : 0;
    return { lines, confidence: round4(confidence), coverage: round4(raw.coverage),
             angle: lines.length ? (raw.turn + raw.angle) % 360 : null };
  }
}

function round4(v) {
  return Math.round(v * 1e4) / 1e4;
}
