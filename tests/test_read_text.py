"""read_text.py: rendered text is read with its spaces, a photo without text stays silent and is not read, a photo on
its side or upside down is told and read upright, text blurred past reading is not guessed, hostile photos answer
in bounded time, unsupported languages are refused; the steps around the networks (text_geometry.py's boxes from the
detector's map and crops, the CTC decode) do what they say."""

import time

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageFont

pytest.importorskip("rapidocr")
pytest.importorskip("wordninja")

from captioner import read_text, text_geometry  # noqa: E402

PHRASE = "Please close the door"
BOUND_S = 20.0  # a hostile photo's answer on a loaded 2-core CI machine (about 1 s on an idle one)


@pytest.fixture(scope="module")
def reader():
    return read_text.TextReader(threads=2)


def text_photo(lines, size=40, width=760):
    """Dark text on a pale card in the middle of a grey-green surface, PIL's built-in font."""
    font = ImageFont.load_default(size=size)
    im = Image.new("RGB", (width, 120 + len(lines) * size * 3 // 2), (90, 110, 80))
    draw = ImageDraw.Draw(im)
    draw.rectangle((30, 30, width - 30, im.height - 30), fill=(245, 243, 235))
    for i, line in enumerate(lines):
        draw.text((60, 60 + i * size * 3 // 2), line, font=font, fill=(20, 20, 30))
    return im


def words(lines):
    return " ".join(lines).lower().split()


def test_reads_a_line_with_its_spaces(reader):
    im = text_photo([PHRASE])
    look = reader.first_look(im)
    assert look.passes
    res = reader.read(im, look)
    assert PHRASE.lower() in " ".join(res.lines).lower(), res.lines
    assert res.angle == 0 and 0 < res.coverage < 1 and 0.8 <= res.confidence <= 1
    assert set(res.as_dict()) == {"lines", "confidence", "coverage", "angle", "seconds"}


def test_lines_come_in_reading_order(reader):
    res = reader.read(text_photo(["Take one tablet", "twice a day"]))
    assert words(res.lines) == ["take", "one", "tablet", "twice", "a", "day"], res.lines


def test_photo_on_its_side_or_upside_down_is_told_and_read_upright(reader):
    im = text_photo(["Take one tablet", "twice a day"])
    for turn in (90, 180, 270):  # PIL turns counter-clockwise: the photo needs `turn` clockwise to stand upright
        turned = im.rotate(turn, expand=True)
        res = reader.read(turned, reader.first_look(turned))
        assert res.angle == turn, (turn, res)
        assert words(res.lines) == ["take", "one", "tablet", "twice", "a", "day"], res.lines


def test_small_print_on_its_side_is_found_and_read_upright(reader):
    """A label filling little of a large photo, on its side (a medicine box on a table, photographed across)."""
    label = text_photo(["ALLERGY RELIEF", "Cetirizine 10 mg"], size=22, width=420)
    photo = Image.new("RGB", (1800, 1350), (120, 90, 60))
    photo.paste(label.rotate(90, expand=True), (700, 420))
    look = reader.first_look(photo)
    assert look.passes
    res = reader.read(photo, look)
    assert res.angle == 90 and words(res.lines) == ["allergy", "relief", "cetirizine", "10", "mg"], res


def sky():
    """A photo without text: a blue gradient with grain, and a green ball."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    sky = np.stack([100 + xx / 8, 140 + yy / 10, 200 - yy / 6], -1) + rng.normal(0, 4, (480, 640, 3))
    im = Image.fromarray(np.clip(sky, 0, 255).astype(np.uint8))
    ImageDraw.Draw(im).ellipse((200, 150, 420, 370), fill=(60, 120, 40))
    return im


def test_photo_without_text_stays_silent(reader):
    im = sky()
    assert not reader.first_look(im).passes  # not worth reading: the photo costs only the look
    res = reader.read(im)
    assert res.lines == [] and res.angle is None and res.confidence == 0


def test_a_photo_without_text_is_not_read_past_the_first_look(reader):
    from captioner.description import look_at

    class Counting:
        """The reader, counting its full reads."""
        reads = 0

        def first_look(self, image):
            return reader.first_look(image)

        def read(self, image, look=None):
            self.reads += 1
            return reader.read(image, look)

    counting = Counting()
    assert look_at(sky(), counting).text is None and counting.reads == 0
    label = look_at(text_photo([PHRASE]), counting)
    assert counting.reads == 1 and PHRASE.lower() in " ".join(label.text.lines).lower()


def test_text_blurred_past_reading_is_not_guessed(reader):
    page = text_photo(["Dear Customer", "Your payment is due", "at the end of the month", "Thank you for your order",
                       "Please call us", "The office is open"], size=44, width=1000)
    # blurred by 0.14 of the font size: at 0.1 every line is still read; from 0.125 the detector sees one blob
    assert reader.read(page.filter(ImageFilter.GaussianBlur(0.14 * 44))).lines == []
    assert len(reader.read(page.filter(ImageFilter.GaussianBlur(0.1 * 44))).lines) == 6


@pytest.mark.slow
def test_hostile_photos_answer_in_bounded_time(reader):
    rng = np.random.default_rng(1)
    noise = Image.fromarray(rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8))  # 12 megapixels of noise
    tiny = Image.new("RGB", (2000, 1500), "white")  # a page of ten thousand tiny characters
    draw, font = ImageDraw.Draw(tiny), ImageFont.load_default(size=9)
    for y in range(0, 1500, 11):
        draw.text((2, y), "".join(rng.choice(list("abcdefghij klmnopqrstuvwxyz"), 330)), font=font, fill="black")
    wall = text_photo(["All text here and more text to read"] * 40, size=14)  # a photo that is all text
    for im in (noise, tiny, wall, Image.new("RGB", (3, 2000), "white")):
        start = time.perf_counter()
        res = reader.read(im)
        assert time.perf_counter() - start < BOUND_S
        assert len(res.lines) <= read_text.MAX_LINES
        assert all(sum(c.isalpha() for c in w) <= read_text.MAX_WORD for line in res.lines for w in line.split())
    assert reader.read(noise).lines == []


def test_junk_is_dropped_and_names_kept():
    w, rules = read_text.Words(), read_text.Rules()
    assert read_text.tidy_line("Atorvastatin 20 mg", 0.96, w, ("en",), rules) == ("Atorvastatin 20 mg", True)
    assert read_text.tidy_line("Farley's Orange Slices", 0.9, w, ("en",), rules)[1]  # a possessive name
    assert read_text.tidy_line("el evento", 0.97, w, ("en",), rules)[1]  # read with great assurance: kept
    assert not read_text.tidy_line("Iyuyqste xq", 0.9, w, ("en",), rules)[1]  # unsure, and no words
    assert not read_text.tidy_line("Take one tablet", 0.6, w, ("en",), rules)[1]  # words, but read unsure
    line, keep = read_text.tidy_line("qzxvbnmlkjhgfdsapoiuytrewq ok", 0.99, w, ("en",), rules)
    assert "qzxvbnmlkjhgfdsapoiuytrewq" not in line  # no word longer than a name is ever said
    assert read_text.tidy_line("药 Take one tablet", 0.95, w, ("en",), rules)[0] == "Take one tablet"


def test_boxes_from_the_map_and_the_ctc_decode():
    prob = np.zeros((64, 96), np.float32)
    prob[20:30, 10:70] = 0.9  # one line of text, 60 x 10 map pixels
    prob[50:52, 80:82] = 0.9  # a speck: too small to be a box
    (box, score), = text_geometry.boxes_from_map(prob)
    w, h = text_geometry.box_sides(box)
    grow = 60 * 10 * 1.6 / (2 * (60 + 10))  # area * unclip / perimeter of the region's rectangle, on each side
    assert score > 0.75 and w == pytest.approx(60 + 2 * grow, abs=1.5) and h == pytest.approx(10 + 2 * grow, abs=1.5)
    assert box[0][0] < box[1][0] and box[0][1] < box[3][1]  # tl, tr, br, bl
    chars = ["a", "b", " "]
    probs = np.eye(4)[[1, 1, 0, 1, 2, 0, 0, 3, 2]] * 0.9  # a a _ a b _ _ " " b
    assert read_text.ctc_decode(probs, chars) == ("aab b", pytest.approx(0.9))


def test_the_crop_sampler_lays_a_box_flat():
    """sample_box on boxes whose corners are whole pixels copies the pixels: along a row, and up a column (text
    running upwards), the crop's rows then being the image's columns."""
    img = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    flat = np.array([[30, 10], [50, 10], [50, 20], [30, 20]], np.float32)  # tl, tr, br, bl: 20 x 10
    assert np.array_equal(text_geometry.crop_box(img, flat), img[10:20, 30:50])
    up = np.array([[30, 29], [30, 9], [40, 9], [40, 29]], np.float32)  # reading upwards from (30, 29)
    crop = text_geometry.crop_box(img, up)
    assert crop.shape == (10, 20, 3)
    assert np.array_equal(crop, np.stack([img[29 - np.arange(20), 30 + y] for y in range(10)]))
    half = text_geometry.sample_box(img, flat + np.float32(0.5), 20, 10)  # between pixels: the mean of four, rounded
    mean4 = img[10:20, 30:50].astype(float) + img[11:21, 30:50] + img[10:20, 31:51] + img[11:21, 31:51]
    assert np.array_equal(half, np.floor(mean4 / 4 + 0.5).astype(np.uint8))


def test_a_photo_is_scaled_as_javascript_scales_it():
    assert text_geometry.scaled_size(4000, 3000, 2048) == (2048, 1536)
    assert text_geometry.scaled_size(3, 2000, 1024) == (2, 1024)  # 1.536 rounds up
    assert text_geometry.scaled_size(800, 600, 1024) == (800, 600)  # never enlarged
    im = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 500, 3), dtype=np.uint8))
    expected = np.asarray(im.resize((200, 120), Image.BILINEAR))[:, :, ::-1]  # Pillow's plain resize, as BGR
    assert np.array_equal(text_geometry.to_array(im, 200), expected)


def test_the_rules_the_web_page_reads():
    import json

    rules = json.loads(json.dumps(read_text.export_rules()))  # plain JSON
    assert set(rules["settings"]) == set(read_text.EXPORTED) and rules["settings"]["CLS_SHAPE"] == [48, 192]
    assert rules["rules"]["min_score"] == read_text.MIN_SCORE and rules["chars"][-1] == " "
    assert set(rules["models"]) == {"det", "cls", "rec"} and "of" in rules["short_words"]
    words = read_text.word_list()
    assert "tablet" in words and "td" not in words and all(w.isalpha() for w in words)


def test_languages_are_checked():
    assert read_text.parse_languages("en,zh") == ("en", "zh")
    assert read_text.parse_languages(["EN"]) == ("en",)
    with pytest.raises(ValueError) as e:
        read_text.TextReader(languages=("fr",))
    assert "\n" not in str(e.value) and "fr" in str(e.value) and "en" in str(e.value)
