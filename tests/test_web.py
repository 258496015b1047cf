"""The web export (export.py --format web) in a real browser: headless Chromium (Debian's chromium and
chromedriver, through Selenium, as test_browser.py) opens the exported folder from a local static server,
describes photos through the file input exactly as export.py --check and inference.py do (the text read, the
problems named, the thing, the turn, the caption, the words), sends no photo anywhere, works again with the
server gone (its service worker's cache), and passes an accessibility audit (axe-core, from npm), as serve.py's
page does. Skips, saying why, without a browser, without `npm ci`, or without the shipped model."""

import json

import pytest
from PIL import Image
from test_browser import active_id, chromium, serving_in_thread  # noqa: F401
from test_serve import args_for, probe, torch_threads  # noqa: F401

import export
import serve
from captioner import description, exporting, runner
from tests.conftest import ROOT, SAMPLE, run_script
from tests.test_read_text import text_photo
from tests.test_things import monitor_in_a_dark_room
from tools.bench_web import SAME, page_describe, page_tensor, ready_ms, same_description, static_server
from utils import SHIPPED_CHECKPOINT

pytestmark = pytest.mark.slow  # the whole suite runs it; the quick tier leaves it out

PHOTOS = sorted((SAMPLE / "Images").glob("*.jpg"))[:20]
AXE = ROOT / "node_modules" / "axe-core" / "axe.min.js"
WCAG = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa"]
TARGET_PX = 44  # WCAG 2.5.5's target size, in CSS pixels: every button and input is at least this
READY_S, ANSWER_S = 180, 120  # how long a test waits for the page to get ready, and for its answer to a photo


@pytest.fixture(scope="session")
def site(tmp_path_factory):
    """The web export of the shipped model, once a session."""
    if not (ROOT / "node_modules" / "onnxruntime-web").is_dir():
        pytest.skip("no node_modules/onnxruntime-web: run `npm ci`")
    if not SHIPPED_CHECKPOINT.is_file():
        pytest.skip(f"no shipped model at {SHIPPED_CHECKPOINT}")
    out = tmp_path_factory.mktemp("site")
    proc = run_script("export.py", "--checkpoint", SHIPPED_CHECKPOINT, "--format", "web", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def expected(site):
    """export.py --check's (runner.Runner's) description of each of PHOTOS, at beam 3, by name."""
    return described_by("export.py", "--check", site, *PHOTOS, "--beam", 3)


def described_by(*command):
    """A command's --json answer (export.py --check's or inference.py's), each row by its image's path."""
    proc = run_script(*command, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {row["image"]: row for row in json.loads(proc.stdout)}


def parts(said):
    """What must be the same in two descriptions of a photo (bench_web.SAME), problems by name, the thing by its
    name and level."""
    thing = said.get("thing")
    return {**{k: said.get(k) for k in SAME}, "photo_problems": [p["problem"] for p in said["photo_problems"]],
            "thing": thing and (thing["name"], thing["level"])}


@pytest.fixture(scope="session")
def hard_photos(tmp_path_factory):
    """Generated photos the description is about, beyond a caption: a lit screen with text in a dark room, a
    label upside down, a label on its side, a photo far too dark, and a sample photo on its side."""
    folder = tmp_path_factory.mktemp("hard")
    label = text_photo(["BRISTOL Tablets", "Take one tablet daily"])
    sample = Image.open(PHOTOS[3]).convert("RGB")
    photos = {"screen.png": monitor_in_a_dark_room(), "upside_down.png": label.rotate(180),
              "sideways.jpg": label.transpose(Image.Transpose.ROTATE_90),
              "dark.jpg": Image.eval(sample, lambda v: v // 30),  # nothing lit: dark whatever the heads say
              "turned.jpg": sample.transpose(Image.Transpose.ROTATE_270)}
    for name, im in photos.items():
        im.save(folder / name, quality=92)
    return sorted(folder.iterdir())


def audit(driver):
    """axe-core's WCAG 2.2 A/AA violations on the open page (ids and the nodes they name), and each button and
    input smaller than TARGET_PX in either direction."""
    driver.execute_script(AXE.read_text())
    found = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {runOnly: {type: 'tag', values: arguments[0]}})"
        ".then(r => done(r.violations.map(v => [v.id, v.nodes.map(n => n.html)])), e => done(String(e)));", WCAG)
    small = driver.execute_script(
        "return [...document.querySelectorAll('button, input')].filter(e => !e.hidden).map(e => {"
        "const r = e.getBoundingClientRect(); return [e.id, r.width, r.height]; })"
        ".filter(([, w, h]) => w < arguments[0] || h < arguments[0]);", TARGET_PX)
    return found, small


def test_web_page_describes_like_the_runner_sends_nothing_and_works_offline(chromium, site, expected):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    files = {"/", *(f"/{p.name}" for p in site.iterdir())}
    with static_server(site) as server:
        chromium.get(server.url)
        assert chromium.title == "Describe a photo"
        assert ready_ms(chromium, READY_S) > 0, chromium.find_element("id", "answer").text
        chromium.execute_script("window.spoken = []; speechSynthesis.speak = u => spoken.push(u.text);")
        ActionChains(chromium).send_keys(Keys.TAB).perform()
        assert active_id(chromium) == "photo"  # the first stop of the keyboard: the labelled file input
        said = {p: page_describe(chromium, p, ANSWER_S) for p in PHOTOS}
        ActionChains(chromium).send_keys(Keys.TAB).perform()
        assert active_id(chromium) == "speak"
        ActionChains(chromium).send_keys(Keys.ENTER).perform()
        assert chromium.execute_script("return spoken") == [said[PHOTOS[-1]]["description"]]
        # the service worker has kept every file: from now on the page needs no server
        chromium.execute_async_script("const done = arguments[arguments.length - 1];"
                                      "navigator.serviceWorker.ready.then(() => done(true));")
        requests = list(server.requests)
    for photo in PHOTOS:
        want, got = expected[str(photo)], said[photo]
        assert parts(got) == parts(want) and got["announced"] == want["description"], photo.name
        assert got["confidence"] == pytest.approx(want["confidence"], abs=2e-3)
    # only GETs of the folder's own files, none with a body: no photo left the browser
    assert requests and all(m == "GET" and p.split("?")[0] in files and n == 0 for m, p, n in requests), requests

    chromium.refresh()  # the server is gone
    assert ready_ms(chromium, READY_S) > 0, chromium.find_element("id", "answer").text
    again = page_describe(chromium, PHOTOS[0], ANSWER_S)
    assert again["announced"] == expected[str(PHOTOS[0])]["description"]
    blocked = [e["message"] for e in chromium.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not blocked  # the page's scripts, styles and WebAssembly run under its policy


def test_web_preprocessing_is_pillows_to_the_pixel(chromium, site):  # noqa: F811
    """The page's resize (Pillow's BILINEAR, in fixed point) of the photo the browser decodes gives the
    tensor runner.preprocess gives, exactly."""
    import numpy as np

    with static_server(site) as server:
        chromium.get(server.url)
        ready_ms(chromium, READY_S)
        preset = json.loads((site / "captioner.json").read_text())["preprocessing"]
        for photo in PHOTOS[:5]:
            want = runner.preprocess(photo, preset).ravel()
            assert np.array_equal(page_tensor(chromium, photo, preset), want), photo.name


def test_the_page_inference_and_the_runner_say_the_same_of_hard_photos(chromium, site, hard_photos):  # noqa: F811
    """A screen with text in a dark room, labels upside down and on their side, a dark photo, a photo on its side:
    the page announces what export.py --check and inference.py say, text lines, problems, thing, turn and all."""
    runner_said = described_by("export.py", "--check", site, *hard_photos)
    python_said = described_by("inference.py", *hard_photos, "--checkpoint", SHIPPED_CHECKPOINT)
    with static_server(site) as server:
        chromium.get(server.url)
        ready_ms(chromium, READY_S)
        page_said = {p: page_describe(chromium, p, ANSWER_S) for p in hard_photos}
    for photo in hard_photos:
        want = parts(python_said[str(photo)])
        assert parts(runner_said[str(photo)]) == want, photo.name
        assert parts(page_said[photo]) == want and same_description(page_said[photo], runner_said[str(photo)]), \
            photo.name
    by_name = {p.name: python_said[str(p)] for p in hard_photos}
    # and they say what these photos are about
    assert "windows cannot repair" in " ".join(by_name["screen.png"]["text"]).lower()
    assert "dark" not in parts(by_name["screen.png"])["photo_problems"]
    for name in ("upside_down.png", "sideways.jpg"):
        assert by_name[name]["text"][0].startswith("BRISTOL") and by_name[name]["turned"], name
    assert "dark" in parts(by_name["dark.jpg"])["photo_problems"]


def test_the_pages_wording_is_description_pys(chromium, site):  # noqa: F811
    """describe.js words captions (alt text, at every level, for short, long and odd captions) and combines the
    parts of a description as description.py does, every rule read from the export's captioner.json."""
    captions = ["a dog is running through the grass .", "a man 's bike is red , and it is fast .", "", "  ",
                'a " quoted " word - and a dash', "people are standing in front of a building " * 6,
                "a supercalifragilisticexpialidocious" * 5]
    cases = [(c, level, unfamiliar) for c in captions for level in (None, "low", "medium", "high")
             for unfamiliar in (False, True)]
    want = [description.alt_text(c, level, unfamiliar) for c, level, unfamiliar in cases]
    rules = json.loads((site / "captioner.json").read_text())["describe"]["description"]
    with static_server(site) as server:
        chromium.get(server.url)
        got = chromium.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "import('./describe.js').then(m => done(arguments[0].map(([c, l, u]) => m.altText(c, l, u, "
            "arguments[1]))), e => done(String(e)));", cases, rules)
    assert got == want


def test_both_pages_pass_an_accessibility_audit(chromium, site, tmp_path):  # noqa: F811
    """axe-core's WCAG 2.2 A and AA rules find nothing on the offline page (with a photo described) or on
    serve.py's (with and without its access code field, and with an answer shown), and every button and input
    is a target of at least 44 x 44 CSS pixels."""
    if not AXE.is_file():
        pytest.skip("no node_modules/axe-core: run `npm ci`")
    with static_server(site) as server:
        chromium.get(server.url)
        ready_ms(chromium, READY_S)
        page_describe(chromium, PHOTOS[0], ANSWER_S)
        assert audit(chromium) == ([], [])
    for token in (False, True):  # serve.py's page as it serves it, its API left out
        (tmp_path / "index.html").write_text(serve.Page(token).html)
        with static_server(tmp_path) as server:
            chromium.get(server.url)
            assert audit(chromium) == ([], []), f"token field: {token}"
            chromium.execute_script("document.getElementById('answer').textContent = 'A dog runs.';"
                                    "document.getElementById('speak').disabled = false;")
            assert audit(chromium) == ([], []), f"token field: {token}, an answer shown"
    # and the audit does see what it looks for: an unlabelled input, 10 pixels wide
    chromium.execute_script("document.querySelector('main').insertAdjacentHTML('beforeend', "
                            "'<input id=\"tiny\" style=\"width: 10px\">');")
    found, small = audit(chromium)
    assert "label" in [rule for rule, _ in found] and [e[0] for e in small] == ["tiny"]


def test_the_service_serves_the_offline_page_too(chromium, site, probe):  # noqa: F811
    """serve.py --web-dir: the same page at /offline/, describing in the browser (no POST /caption), beside
    the service's own page; only the folder's own files, and a clear 404 without --web-dir."""
    with torch_threads(1), serving_in_thread(serve.make_app(args_for(probe.path, "--web-dir", str(site)),
                                                            probe.captioner)) as url:
        chromium.get(url + "offline")
        assert chromium.current_url == url + "offline/" and ready_ms(chromium, READY_S) > 0
        assert page_describe(chromium, PHOTOS[0], ANSWER_S)["caption"]
        assert chromium.execute_async_script("const done = arguments[arguments.length - 1];"
                                             "fetch(arguments[0]).then(r => done(r.status));",
                                             url + "offline/nothing.js") == 404
    for name in ("../serve.py", "../../etc/passwd", "nothing.js"):
        with pytest.raises(Exception, match="no such file"):
            serve.web_file(site, name)
    with pytest.raises(Exception, match="no offline page here"):
        serve.web_file(None, "")


def test_a_web_export_without_npm_ci_says_so_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(exporting, "WEB_RUNTIME", ("not-installed.mjs",))
    out = tmp_path / "site"
    assert export.cli(["--format", "web", "--out", str(out), "--checkpoint", str(SHIPPED_CHECKPOINT)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "run `npm ci`" in errors[0] and not out.exists()
