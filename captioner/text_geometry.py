"""The text reader's geometry and pixel operations (read_text.py's steps around its networks), kept apart and
written out so that another runtime can repeat them to the bit: web/read_text.js does, function for function. The
photo as a BGR array (`to_array`, Pillow's bilinear resize, which web/pillow.js repeats), resized by area average
where a side shrinks (`resize`, `shrink`); the detector's probability map turned into text boxes
(`boxes_from_map`, Differentiable Binarization's postprocess); each box cut out and laid flat (`crop_box`,
`sample_box`); and the lines put in reading order in the photo's upright frame (`reading_order`). NumPy and Pillow
only (OpenCV for the map's regions).
"""

import math

import numpy as np
from PIL import Image

READ_SIZE = 1024      # long side (px) a photo is decoded at, at least, to be read (the text's size is measured here)
DB_THRESH = 0.3       # detector probability above which a pixel is text (PaddleOCR's DB default)
BOX_THRESH = 0.5      # mean probability a box needs
UNCLIP = 1.6          # how far a box grows back out from the detector's shrunk text kernel
MAX_CANDIDATES = 300  # detector regions examined at most: bounds the time on a page of noise
MAX_ASPECT = 40       # a crop wider than this many heights is squashed: bounds the recogniser's input
LINE_ASPECT = 1.2     # a line of text is at least this many times as long as it is high (a blob is not)


# ------------------------------------------------------------------------------------------- boxes

def _distance(p, q):
    """The distance between two points, in float64 (written out: JavaScript computes the same bits)."""
    dx, dy = float(p[0]) - float(q[0]), float(p[1]) - float(q[1])
    return math.sqrt(dx * dx + dy * dy)


def box_sides(box):
    """(width along the text, height) of a quadrilateral tl, tr, br, bl."""
    return _distance(box[0], box[1]), _distance(box[0], box[3])


def line_like(box, aspect=LINE_ASPECT):
    """A text line is long and thin (either way: the photo may be on its side); a blob is not."""
    w, h = box_sides(box)
    return max(w, h) >= aspect * min(w, h)


def box_area(box):
    """A quadrilateral's area (the shoelace formula, in float64, term by term)."""
    x, y = [float(v) for v in box[:, 0]], [float(v) for v in box[:, 1]]
    return 0.5 * abs(sum(x[i] * y[i - 1] - y[i] * x[i - 1] for i in range(4)))


def rect_corners(cx, cy, w, h, angle):
    """A rotated rectangle (centre, sides, angle in degrees) -> its corners tl, tr, br, bl (4, 2), with the
    top edge the one nearest the top of the image, and tl its left end."""
    a = math.radians(angle)
    u, v = np.array([math.cos(a), math.sin(a)]) * w / 2, np.array([-math.sin(a), math.cos(a)]) * h / 2
    c = np.array([cx, cy])
    pts = np.array([c - u - v, c + u - v, c + u + v, c - u + v], np.float32)
    return order_corners(pts)


def order_corners(pts):
    """Four corners in any order -> tl, tr, br, bl: the two leftmost are the left side (top one first)."""
    by_x = pts[np.lexsort((pts[:, 1], pts[:, 0]))]
    left, right = by_x[:2][np.argsort(by_x[:2, 1])], by_x[2:][np.argsort(by_x[2:, 1])]
    return np.array([left[0], right[0], right[1], left[1]], np.float32)


def boxes_from_map(prob, thresh=DB_THRESH, box_thresh=BOX_THRESH, unclip=UNCLIP, max_boxes=MAX_CANDIDATES):
    """The detector's probability map (h, w) -> [(box (4, 2) tl, tr, br, bl in map pixels, score)], largest
    regions first. Differentiable Binarization's postprocess: pixels above `thresh` (dilated by one pixel) form
    regions; each region's smallest rotated rectangle, if its mean probability reaches `box_thresh`, is grown by
    area * unclip / perimeter on every side, undoing the shrink the detector was trained with."""
    import cv2

    mask = cv2.dilate((prob > thresh).astype(np.uint8), np.ones((2, 2), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    order = 1 + np.argsort(-stats[1:, cv2.CC_STAT_AREA], kind="stable")[:max_boxes]
    out = []
    for k in order:
        x, y, w, h = stats[k, :4]
        inside = labels[y:y + h, x:x + w] == k
        ys, xs = np.nonzero(inside)
        (cx, cy), (rw, rh), angle = cv2.minAreaRect(np.stack([xs + x, ys + y], 1).astype(np.float32))
        if min(rw, rh) < 3:
            continue
        score = rect_mean(prob, cx, cy, rw, rh, angle)
        if score < box_thresh:
            continue
        grow = rw * rh * unclip / (2 * (rw + rh))
        if min(rw, rh) + 2 * grow < 5:
            continue
        out.append((rect_corners(cx, cy, rw + 2 * grow, rh + 2 * grow, angle), score))
    return out


def rect_mean(prob, cx, cy, w, h, angle):
    """The mean of prob (h, w) over the pixels whose centres lie in a rotated rectangle (its edges included):
    how sure the detector is of the region as a box, gaps between letters counted."""
    a = math.radians(angle)
    r = 0.5 * math.hypot(w, h)
    x0, x1 = max(int(math.floor(cx - r)), 0), min(int(math.ceil(cx + r)), prob.shape[1] - 1)
    y0, y1 = max(int(math.floor(cy - r)), 0), min(int(math.ceil(cy + r)), prob.shape[0] - 1)
    yy, xx = np.mgrid[y0:y1 + 1, x0:x1 + 1]
    dx, dy = xx - cx, yy - cy
    along, across = dx * math.cos(a) + dy * math.sin(a), -dx * math.sin(a) + dy * math.cos(a)
    inside = (np.abs(along) <= w / 2 + 0.5) & (np.abs(across) <= h / 2 + 0.5)
    return float(prob[y0:y1 + 1, x0:x1 + 1][inside].mean(dtype=np.float64)) if inside.any() else 0.0


def crop_box(img, box):
    """The box cut out of img (H, W, 3) and laid flat: (h, w, 3), w along the box's top edge."""
    w, h = box_sides(box)
    w, h = max(int(round(w)), 1), max(int(round(h)), 1)
    crop = sample_box(img, box, w, h)
    if w > MAX_ASPECT * h:  # a page-wide run of tiny print: squash it rather than feed a huge tensor
        crop = resize(crop, MAX_ASPECT * h, h)
    return crop


def sample_box(img, box, w, h):
    """The (h, w, 3) crop whose pixel (x, y) is img at tl + x/w (tr - tl) + y/h (bl - tl) of box (tl, tr, br, bl:
    a rectangle, so tl, tr and bl fix it). Each sample is bilinear between the four nearest pixels (the edge
    pixels repeated beyond the image), in float64, rounded half up: web/read_text.js computes the same bytes."""
    tl, tr, bl = ([float(v) for v in box[i]] for i in (0, 1, 3))
    ux, uy = (tr[0] - tl[0]) / w, (tr[1] - tl[1]) / w  # one crop pixel along the text, in img pixels
    vx, vy = (bl[0] - tl[0]) / h, (bl[1] - tl[1]) / h  # ... and across it
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    sx, sy = tl[0] + xs * ux + ys * vx, tl[1] + xs * uy + ys * vy  # (h, w) where each crop pixel samples
    x0, y0 = np.floor(sx), np.floor(sy)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]  # (h, w, 1): the weights of the right and lower pixels
    last_y, last_x = img.shape[0] - 1, img.shape[1] - 1
    xa, xb = np.clip(x0, 0, last_x).astype(np.intp), np.clip(x0 + 1, 0, last_x).astype(np.intp)
    ya, yb = np.clip(y0, 0, last_y).astype(np.intp), np.clip(y0 + 1, 0, last_y).astype(np.intp)
    top = img[ya, xa] * (1 - fx) + img[ya, xb] * fx  # (h, w, 3)
    bottom = img[yb, xa] * (1 - fx) + img[yb, xb] * fx
    value = top * (1 - fy) + bottom * fy
    return np.clip(np.floor(value + 0.5), 0, 255).astype(np.uint8)


def upright_centre(box, angle, width, height):
    """The box's centre and text height in the frame where the photo is turned `angle` degrees clockwise."""
    x, y = box.astype(np.float64).mean(axis=0)
    turned = {0: (x, y), 90: (height - y, x), 180: (width - x, height - y), 270: (y, width - x)}[angle]
    return turned[0], turned[1], min(box_sides(box))


def reading_order(items, angle, width, height):
    """items: (box, text) -> rows of text, top to bottom, left to right in the upright frame; boxes on one row
    are joined with a space."""
    placed = sorted(((upright_centre(b, angle, width, height), t) for b, t in items), key=lambda p: p[0][1])
    rows = []
    for (x, y, h), text in placed:
        if rows and abs(y - rows[-1]["y"]) < 0.5 * max(h, rows[-1]["h"]):
            rows[-1]["parts"].append((x, text))
        else:
            rows.append({"y": y, "h": h, "parts": [(x, text)]})
    return [" ".join(t for _, t in sorted(r["parts"])) for r in rows]


# ------------------------------------------------------------------------------------------- pixels

def scaled_size(width, height, long_side):
    """The size (w, h) a width x height image is scaled to so that its long side is at most long_side: the long
    side becomes long_side, the other its share of it rounded half up, at least 1 (integers: JavaScript agrees)."""
    longest = max(width, height)
    if longest <= long_side:
        return width, height
    return tuple(max(1, (2 * n * long_side + longest) // (2 * longest)) for n in (width, height))


def to_array(image, long_side=READ_SIZE):
    """PIL image -> BGR uint8 array (H, W, 3) at most long_side px long (the models were trained on BGR), scaled
    with Pillow's plain bilinear resize (web/pillow.js repeats it to the bit)."""
    image = image.convert("RGB")
    size = scaled_size(*image.size, long_side)
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    return np.ascontiguousarray(np.asarray(image)[:, :, ::-1])


def resize(img, width, height):
    """img (H, W, 3) uint8 -> (height, width, 3), the width first, then the height, each pass rounded to bytes: a
    side that shrinks is averaged over the area each new pixel covers (as cv2's INTER_AREA; Pillow's bilinear
    filter blurs more, and the detector then loses small print), one that grows is Pillow's bilinear resize.
    web/read_text.js computes the same bytes."""
    for axis, size in ((1, width), (0, height)):
        if size < img.shape[axis]:
            img = shrink(img, size, axis)
        elif size > img.shape[axis]:
            new = (size, img.shape[0]) if axis == 1 else (img.shape[1], size)  # Pillow's (w, h)
            img = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize(new, Image.BILINEAR))
    return img


def area_weights(n_in, n_out):
    """Shrinking n_in pixels to n_out: for each new pixel, its first old pixel and the old ones' weights (the
    share of the new pixel each covers), in float64."""
    scale = n_in / n_out
    starts, weights = [], []
    for i in range(n_out):
        lo, hi = i * scale, (i + 1) * scale
        first, end = math.floor(lo), min(math.ceil(hi), n_in)
        starts.append(first)
        weights.append([(min(j + 1, hi) - max(j, lo)) / scale for j in range(first, end)])
    return starts, weights


def shrink(img, size, axis):
    """img (H, W, 3) shrunk to `size` along axis (1: the width, 0: the height) by area averaging: each new pixel
    the weighted sum of the old ones it covers, added first to last in float64, rounded half up."""
    starts, weights = area_weights(img.shape[axis], size)
    shape = [1, 1, 1]
    shape[axis] = size
    total = np.zeros(img.shape[:axis] + (size,) + img.shape[axis + 1:])
    for t in range(max(len(w) for w in weights)):  # the t-th old pixel of every new one at once (weight 0: none)
        weight = np.array([w[t] if t < len(w) else 0.0 for w in weights]).reshape(shape)
        old = np.take(img, np.minimum(np.array(starts) + t, img.shape[axis] - 1), axis=axis)
        total = total + old * weight
    return np.clip(np.floor(total + 0.5), 0, 255).astype(np.uint8)


def resize_side(img, side):
    """img (H, W, 3) scaled so that its long side is about `side`, each side a multiple of 32 (the detector's
    grid): (h', w', 3)."""
    h, w = img.shape[:2]
    scale = side / max(h, w)
    new_w, new_h = (max(32, int(round(n * scale / 32)) * 32) for n in (w, h))  # round: half to even
    return resize(img, new_w, new_h)


def normalise(img):
    """BGR uint8 (h, w, 3) -> (3, h, w) float32 in [-1, 1], as the three networks were trained."""
    return (img.astype(np.float32) * (2 / 255) - 1).transpose(2, 0, 1)


def fit_height(crop, height, max_width):
    """A crop scaled to `height` px high, its width in proportion (at most max_width): (height, w, 3)."""
    w = min(max_width, math.ceil(height * crop.shape[1] / crop.shape[0]))
    return resize(crop, max(w, 1), height)
