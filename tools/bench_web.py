"""Benchmark the web export (export.py --format web) in headless Chromium, WebAssembly backend, beside the
Python runner (export.py --check: runner.py, ONNX Runtime) on the same photos in the same run; print what was
measured.

    python bench_web.py [--photos 20] [--images DIR ...] [--site site/] [--json]   # or: python bench.py --web

Measures: the folder's size (all of it, the model files, the runtime), the time from opening the page to
ready (first visit, then from the service worker's cache: the later visits) and to its text reader loaded (in
the background, after ready), the time per description in the page (file chosen to description announced, and
its parts) and in Python (Runner.describe: file to description, the text read and all; median of 3 after a
warm-up), photo by photo, alternating, on the sample photos and on the photos in --images (real photos with
text: ../shared/vizwiz_dev/Images where it is there); whether the page's descriptions are the runner's (the
words announced, and each part: caption, level, text lines, problems named, thing, turn), and whether its
preprocessing (the browser's decode and Pillow's resize in JavaScript) gives the runner's input tensor to the
bit. Needs `npm ci`, and chromium + chromedriver (Debian's).
"""

import sys
from pathlib import Path

# ruff: noqa: E402 (the imports below need the path first)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's root: its commands and captioner/

import argparse
import contextlib
import functools
import http.server
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_IMAGES = ROOT / "data" / "flickr8k_sample" / "Images"
# photos taken by blind people, where present: those with reference captions, and those with quality labels only
REAL_IMAGES = [ROOT.parent / "shared" / "vizwiz_dev" / d / "Images" for d in (".", "labels_only")]
# what must be the same in the page as in the Python runner for a description to count as the same
SAME = ("description", "caption", "confidence_level", "text", "photo_problems", "thing", "turned")
# headless, and nothing reached but 127.0.0.1: no component updates, sync or other background traffic
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-quic",
                 "--disable-sync", "--disable-extensions", "--disable-default-apps", "--no-proxy-server",
                 "--disable-background-networking", "--disable-component-update", "--window-size=412,915",
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]
WAITING = "Describing the photo\u2026"  # what both pages (web/app.js's, serve.py's) say while they describe one


def get_args_parser():
    from utils import positive

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="the model to export (default: as export.py: yours, else the shipped one)")
    p.add_argument("--site", help="an existing web export to measure (default: export one into a temporary folder)")
    p.add_argument("--photos", type=positive(int), default=20, help="how many sample photos to describe in both")
    p.add_argument("--images", nargs="*", default=[str(d) for d in REAL_IMAGES if d.is_dir()],
                   help="folders of photos to describe too, at most --photos of them in all (default: the real photos "
                        "of ../shared/vizwiz_dev where present)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    return p


class _Logged(http.server.SimpleHTTPRequestHandler):
    """A static file server's handler that records every request: (method, path, bytes of body declared)."""

    def log_message(self, format, *args):
        self.server.requests.append((self.command, self.path, int(self.headers.get("Content-Length") or 0)))


@contextlib.contextmanager
def static_server(folder):
    """http.server serving `folder` on a free port of 127.0.0.1 in a thread; yields the server, whose
    `requests` lists every request and whose `url` is its address. Stops it afterwards."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Logged, directory=str(folder)))
    server.requests, server.url = [], f"http://127.0.0.1:{server.server_port}/"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextlib.contextmanager
def chromium(profile):
    """Headless Chromium through Selenium, with a fresh profile in the folder `profile`."""
    from selenium import webdriver

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: look for nothing online
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in [*BROWSER_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()


def ready_ms(driver, within=300):
    """Milliseconds from opening the page to its model ready, as the page measured it; ExportError, in the
    page's words, where it says it could not load (at once: it will not get ready however long one waits)."""
    from selenium.webdriver.support.ui import WebDriverWait

    from captioner.exporting import ExportError

    def ready(d):
        return d.execute_script("return document.documentElement.dataset.readyMs")

    WebDriverWait(driver, within).until(lambda d: ready(d) or d.find_element("id", "answer").text.startswith("Sorry"))
    if not ready(driver):
        raise ExportError(f"the page did not get ready: {driver.find_element('id', 'answer').text}")
    return int(ready(driver))


def page_describe(driver, photo, within=300):
    """Choose `photo` in the page's file input; -> what the page said of it: the answer's dict (runner.Runner's
    keys), with "announced" (the live region's words), ms (chosen to announced) and parts (the page's own split
    of ms)."""
    from selenium.webdriver.support.ui import WebDriverWait

    answer = driver.find_element("id", "answer")
    # emptied first: choosing the file already chosen would change nothing, and say nothing
    driver.execute_script("arguments[0].textContent = ''; arguments[0].dataset.result = '';"
                          "document.getElementById('photo').value = ''", answer)
    driver.find_element("id", "photo").send_keys(str(photo))
    WebDriverWait(driver, within).until(lambda d: answer.text not in ("", WAITING))
    result = json.loads(answer.get_attribute("data-result") or "{}")
    return {**result, "announced": answer.text,
            "ms": int(driver.execute_script("return document.documentElement.dataset.captionMs")),
            "parts": result.get("ms", {})}


def same_description(page, said):
    """Whether the page said of a photo what the runner said: every part of SAME, problems by name."""
    def named(d):
        return {**{k: d.get(k) for k in SAME}, "photo_problems": [p["problem"] for p in d.get("photo_problems") or []]}

    return named(page) == named(said) and page["announced"] == said["description"]


def page_tensor(driver, photo, preset):
    """The input tensor the page makes of `photo` (chosen in its file input), as float32 [3 * S * S]."""
    from selenium.common.exceptions import JavascriptException

    driver.find_element("id", "photo").send_keys(str(photo))
    got = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "import('./captioner.js').then(async m => {"
        "const t = m.preprocess(await m.readPixels(document.getElementById('photo').files[0]), arguments[0]);"
        "done(Array.from(t.data)); }, e => done(String(e)));", preset)
    if isinstance(got, str):  # the script's error, said now rather than after the script's timeout
        raise JavascriptException(f"the page could not preprocess {photo}: {got}")
    return np.array(got, dtype=np.float32)


def folder_sizes(site):
    sizes = {p.name: p.stat().st_size for p in Path(site).iterdir() if p.is_file()}
    mib = lambda names: round(sum(sizes[n] for n in names) / 2**20, 2)  # noqa: E731
    return {"folder_mib": mib(sizes), "model_mib": mib([n for n in sizes if n.endswith(".onnx")]),
            "text_model_mib": mib([n for n in sizes if n.endswith(".onnx") and n not in ("encoder.onnx",
                                                                                          "decoder_step.onnx")]),
            "runtime_mib": mib([n for n in sizes if n.startswith("ort")]),
            "data_mib": mib([n for n in sizes if n.endswith((".f16", ".txt"))])}


def measure(site, photos, profile):
    """Every figure of the module's docstring, for the export in `site`."""
    from captioner import runner as python
    described = python.Runner(site)
    preset = described.config["preprocessing"]
    r = {**folder_sizes(site), "photos": len(photos), "cores": os.cpu_count(),
         "load_before": round(os.getloadavg()[0], 2)}
    with static_server(site) as server, chromium(profile) as driver:
        driver.get(server.url)
        r["ready_first_visit_ms"] = ready_ms(driver)
        driver.execute_async_script("navigator.serviceWorker.ready.then(arguments[arguments.length - 1]);")
        warm = []
        for _ in range(3):  # from the service worker's cache
            driver.refresh()
            warm.append(ready_ms(driver))
        r["ready_warm_ms"] = statistics.median(warm)
        r["reader_ready_ms"] = reader_ms(driver)
        page_describe(driver, photos[0])  # warm-up, as the runner's
        rows = []
        for photo in photos:  # alternating, photo by photo
            said, python_s = python.timed_caption(lambda p: described.describe(p), photo)
            page = page_describe(driver, photo)
            rows.append({"photo": photo.name, "python_ms": python_s * 1000, "page_ms": page["ms"],
                         "same": same_description(page, said), "text": bool(said["text"]),
                         "python": said["description"], "page": page["announced"],
                         "page_said": {k: page.get(k) for k in SAME},
                         **{f"page_{k}_ms": v for k, v in page["parts"].items()}})
        diffs = [np.abs(page_tensor(driver, p, preset) - python.preprocess(p, preset).ravel()).max() for p in photos]
        r["uploads"] = [q for q in server.requests if q[0] != "GET" or q[2]]
    r.update(summary(rows))
    r["preprocessing_max_abs_diff"] = float(max(diffs))
    r["rows"] = rows
    return r


def reader_ms(driver, within=300):
    """Milliseconds from opening the page to its text reader loaded (in the background, after ready)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, within).until(lambda d: d.execute_script("return document.documentElement.dataset.readerMs"))
    return int(driver.execute_script("return document.documentElement.dataset.readerMs"))


def summary(rows):
    """Medians of the times per description, over all photos and over those with text read and without; how
    many descriptions were the same."""
    out = {}
    for group, sel in (("", rows), ("text_", [x for x in rows if x["text"]]),
                       ("no_text_", [x for x in rows if not x["text"]])):
        if sel:
            out[f"{group}python_ms"] = statistics.median(x["python_ms"] for x in sel)
            out[f"{group}page_ms"] = statistics.median(x["page_ms"] for x in sel)
            out[f"{group}page_over_python"] = statistics.median(x["page_ms"] / x["python_ms"] for x in sel)
            out[f"{group}photos"] = len(sel)
    for part in page_parts(rows[0]):
        out[part] = statistics.median(x[part] for x in rows)
    out["same_descriptions"] = sum(x["same"] for x in rows)
    return out


def page_parts(r):
    """The keys of `r` that hold a part of the page's time per caption (page_<part>_ms), in r's order; page_ms is
    the whole."""
    return [k for k in r if k.startswith("page_") and k.endswith("_ms") and k != "page_ms"]


def report(r):
    goals = [("model files", r["model_mib"], 40, "MiB"), ("whole folder", r["folder_mib"], 60, "MiB"),
             ("ready from the cache", r["ready_warm_ms"] / 1000, 3, "s"),
             ("description, page / Python (median of the photos' ratios)", r["page_over_python"], 2, "x")]
    print(f"web export: {r['folder_mib']} MiB in all (models {r['model_mib']}, of which text {r['text_model_mib']}; "
          f"runtime {r['runtime_mib']}; fits and word list {r['data_mib']}); {r['cores']} cores, load "
          f"{r['load_before']} before")
    print(f"ready: {r['ready_first_visit_ms']} ms on the first visit, {r['ready_warm_ms']:.0f} ms from the cache; "
          f"text reader loaded {r['reader_ready_ms']} ms after opening (in the background)")
    parts = ", ".join(f"{k[5:-3]} {r[k]:.0f}" for k in page_parts(r))
    for group, name in (("", "all"), ("text_", "with text read"), ("no_text_", "without text")):
        if f"{group}photos" in r:
            print(f"description, {name} ({r[f'{group}photos']} photos, medians): page {r[f'{group}page_ms']:.0f} ms, "
                  f"Python runner {r[f'{group}python_ms']:.0f} ms: {r[f'{group}page_over_python']:.2f}x")
    print(f"  the page's parts (all photos): {parts}")
    print(f"same description as the Python runner (words and every part): {r['same_descriptions']} of "
          f"{r['photos']}; preprocessing: largest difference {r['preprocessing_max_abs_diff']:g}; uploads seen: "
          f"{len(r['uploads'])}")
    for x in r["rows"]:
        if not x["same"]:
            print(f"  {x['photo']}: page: {x['page']!r}\n  {' ' * len(x['photo'])}  Python: {x['python']!r}")
    for name, value, goal, unit in goals:
        print(f"  {name}: {value:.2f} {unit} (goal <= {goal} {unit}: {'met' if value <= goal else 'missed'})")


def main(args):
    from captioner.exporting import export
    from utils import find_checkpoint

    photos = sorted(SAMPLE_IMAGES.glob("*.jpg"))[:args.photos]
    if args.images:
        from captioner.images import list_images

        photos += [p for folder in args.images for p in list_images(folder)][:args.photos]
    with tempfile.TemporaryDirectory(prefix="bench_web_") as tmp:
        site = Path(args.site) if args.site else Path(tmp) / "site"
        if not args.site:
            start = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # its lines of file sizes: stdout is the report's
                export(args.checkpoint or find_checkpoint(None), "web", site)
            export_s = time.perf_counter() - start
        r = measure(site, photos, Path(tmp) / "profile")
        r["export_s"] = None if args.site else round(export_s, 1)
    return r


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        r = main(args)
    except Exception as e:  # noqa: BLE001 (a missing browser, npm ci not run: one line)
        from captioner.exporting import ExportError

        if not isinstance(e, (ExportError, OSError)) and type(e).__module__.split(".")[0] != "selenium":
            raise
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        report(r)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
