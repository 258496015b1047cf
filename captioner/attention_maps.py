"""Where an attention decoder looked: the photo once per word of its caption, lit where the decoder looked when it
chose that word (inference.py --attention-map, evaluate.py's gallery, the walkthrough notebook)."""

import math

import torch
from PIL import Image, ImageDraw

from captioner.search import generate
from image_loader import load_image

PANEL, TITLE, COLUMNS = 224, 22, 5  # attention maps: each panel's side and title bar (pixels); panels a row


def attention_png(image, words, maps):
    """The photo once per word, dimmed except where the decoder looked when it chose that word, titled with the
    word, COLUMNS panels a row: a PIL image. maps [words, h, w], each map summing to 1, shown scaled to its
    own peak and upsampled smoothly over the photo."""
    photo = image.convert("RGB").resize((PANEL, PANEL), Image.Resampling.BILINEAR)
    dimmed = Image.blend(photo, Image.new("RGB", photo.size), 0.75)
    cols, rows = min(max(len(words), 1), COLUMNS), max(math.ceil(len(words) / COLUMNS), 1)
    sheet = Image.new("RGB", (cols * PANEL, rows * (PANEL + TITLE)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (word, m) in enumerate(zip(words, maps)):
        light = Image.fromarray((m / m.max() * 255).round().byte().numpy(), "L")
        x, y = (k % COLUMNS) * PANEL, (k // COLUMNS) * (PANEL + TITLE)
        sheet.paste(Image.composite(photo, dimmed, light.resize(photo.size, Image.Resampling.BICUBIC)), (x, y + TITLE))
        draw.text((x + 4, y + 4), word, fill="black")
    return sheet


@torch.no_grad()
def attention_map(model, vocab, transform, path, device, beam=3, max_len=40, length_penalty=0.0):
    """Caption the photo at `path` with an attention model: (the caption, attention_png of its words)."""
    image = load_image(path)
    x = transform(image).unsqueeze(0).to(device)
    ids = generate(model, x, max_len=max_len, beam=beam, length_penalty=length_penalty)[0]
    maps = model.attention_maps(x, [ids])[0]
    return vocab.decode(ids), attention_png(image, [vocab.itos[i] for i in ids], maps)
