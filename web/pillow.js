// Pillow's resampling in JavaScript, to the bit: the same fixed-point arithmetic as its Resample.c and Reduce.c
// (Pillow 13), so that the page sees the very pixels the Python tool sees (runner.to_input, the photo check, the
// text reader). Images are {width, height, rgba}: RGBA bytes, row by row, as a canvas gives them; as in Pillow's
// RGB images, only R, G and B are resampled (alpha comes out 255).

const PRECISION_BITS = 22;  // Pillow's fixed point for 8-bit images (Resample.c: 32 - 8 - 2)

function coefficients(inSize, outSize, in0, in1) {
  // Pillow's precompute_coeffs + normalize_coeffs_8bpc for its bilinear filter (support 1), over the input span
  // [in0, in1) (a float32 box, as Pillow's C code holds it): for each output pixel, the first input pixel, how
  // many, and their weights in fixed point.
  const scale = Math.fround(in1 - in0) / outSize, filterscale = Math.max(scale, 1), support = filterscale;
  const ksize = Math.ceil(support) * 2 + 1, bounds = new Int32Array(outSize * 2), kk = new Int32Array(outSize * ksize);
  const weights = new Float64Array(ksize), ss = 1 / filterscale;
  for (let xx = 0; xx < outSize; xx++) {
    const center = in0 + (xx + 0.5) * scale;
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

function resamplePass(src, width, height, outSize, horizontal, in0, in1) {
  // One of Pillow's two passes over RGBA bytes: along rows (horizontal) or columns, to outSize pixels.
  const c = coefficients(horizontal ? width : height, outSize, in0, in1);
  const outW = horizontal ? outSize : width, outH = horizontal ? height : outSize;
  const out = new Uint8ClampedArray(outW * outH * 4);
  const half = 2 ** (PRECISION_BITS - 1), one = 2 ** PRECISION_BITS;
  const step = horizontal ? 4 : width * 4;  // one input pixel further along the pass, in bytes
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) {
      const i = horizontal ? x : y, xmin = c.bounds[i * 2], n = c.bounds[i * 2 + 1], k0 = i * c.ksize;
      const from = horizontal ? (y * width + xmin) * 4 : (xmin * width + x) * 4, at = (y * outW + x) * 4;
      let r = half, g = half, b = half;
      for (let t = 0; t < n; t++) {
        const k = c.kk[k0 + t], p = from + t * step;
        r += src[p] * k;
        g += src[p + 1] * k;
        b += src[p + 2] * k;
      }
      // Pillow clips to 0..255 after the shift; a Uint8ClampedArray would round, so clip first
      out[at] = Math.min(255, Math.max(0, Math.floor(r / one)));
      out[at + 1] = Math.min(255, Math.max(0, Math.floor(g / one)));
      out[at + 2] = Math.min(255, Math.max(0, Math.floor(b / one)));
      out[at + 3] = 255;
    }
  }
  return out;
}

function resample(image, outW, outH, box) {
  // Pillow's ImagingResampleInner with its bilinear filter: the box [x0, y0, x1, y1] of the input (float32) to
  // outW x outH, each pass only where it changes something; the vertical pass first where the height shrinks more
  // than twice as much as the width (as Pillow 13 orders them: the order changes the rounding in between).
  let { width, height, rgba } = image;
  const [x0, y0, x1, y1] = box.map(Math.fround);
  const horizontal = outW !== width || x0 !== 0 || x1 !== outW, vertical = outH !== height || y0 !== 0 || y1 !== outH;
  const horizontalFirst = !(height - outH > 0 && height - outH > (width - outW) * 2);
  const passH = () => { rgba = resamplePass(rgba, width, height, outW, true, x0, x1); width = outW; };
  const passV = () => { rgba = resamplePass(rgba, width, height, outH, false, y0, y1); height = outH; };
  if (horizontalFirst) {
    if (horizontal) passH();
    if (vertical) passV();
  } else {
    if (vertical) passV();
    if (horizontal) passH();
  }
  return { width, height, rgba };
}

export function reduce(image, fx, fy) {
  // Image.reduce((fx, fy)) of an RGB image (Reduce.c): each fx x fy block averaged, in Pillow's fixed point; the
  // blocks of the last column and row, where the size is no multiple of the factor, are smaller, and averaged
  // over the pixels they have -> {width: ceil(width / fx), height: ceil(height / fy), rgba}
  const { width, height, rgba } = image;
  const outW = Math.ceil(width / fx), outH = Math.ceil(height / fy), out = new Uint8ClampedArray(outW * outH * 4);
  for (let oy = 0; oy < outH; oy++) {
    const ya = oy * fy, yb = Math.min(ya + fy, height);
    for (let ox = 0; ox < outW; ox++) {
      const xa = ox * fx, xb = Math.min(xa + fx, width), count = (xb - xa) * (yb - ya);
      // division_UINT32(count, 8): 2^32 / (256 count), in float32 and truncated; (sum + count / 2) times it,
      // shifted right by 24, is the rounded mean
      const multiplier = Math.trunc(Math.fround(2 ** 32 / Math.fround(256 * count))), amend = count >> 1;
      let r = amend, g = amend, b = amend;
      for (let y = ya; y < yb; y++) {
        for (let at = (y * width + xa) * 4, end = (y * width + xb) * 4; at < end; at += 4) {
          r += rgba[at];
          g += rgba[at + 1];
          b += rgba[at + 2];
        }
      }
      const at = (oy * outW + ox) * 4;
      out[at] = Math.floor((r * multiplier) / 2 ** 24);
      out[at + 1] = Math.floor((g * multiplier) / 2 ** 24);
      out[at + 2] = Math.floor((b * multiplier) / 2 ** 24);
      out[at + 3] = 255;
    }
  }
  return { width: outW, height: outH, rgba: out };
}

export function resize(image, outW, outH, reducingGap = null) {
  // Image.resize((outW, outH), Image.BILINEAR, reducing_gap=reducingGap) of an RGB image -> {width, height, rgba}.
  // With a reducing gap, an image more than that many times larger is first reduced by the integer factor that
  // leaves it at least reducingGap times larger (cheap), and the rest resampled over the reduced image's box.
  let box = [0, 0, image.width, image.height];
  if (reducingGap) {
    const fx = Math.trunc(image.width / outW / reducingGap) || 1;
    const fy = Math.trunc(image.height / outH / reducingGap) || 1;
    if (fx > 1 || fy > 1) {
      box = [0, 0, image.width / fx, image.height / fy];
      image = reduce(image, fx, fy);
    }
  }
  return resample(image, outW, outH, box);
}
