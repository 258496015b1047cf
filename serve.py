"""The captioning service: an HTTP API that apps and screen readers can call, and a page to use on a phone.

    python serve.py                                   # the shipped model (or yours), on http://127.0.0.1:8000
    curl -F image=@photo.jpg http://127.0.0.1:8000/caption
    CAPTION_TOKEN=$(openssl rand -hex 16) python serve.py --host 0.0.0.0 --workers 2   # others may call it

POST /caption takes the photo as a multipart field named "image", or as the raw request body (Content-Type
image/... or application/octet-stream), and answers what `inference.py --json` says of it: {"caption",
"alt_text", "confidence", "confidence_level", "description", "text", "thing", "photo_problems",
"photo_scores", "retake_hint", "turned"}; the page announces the description; ?n_best=K adds the beam search's K best,
?beam=N chooses the beam (up to --max-beam). GET /health says whether the model is ready, and which; GET / is the page;
with --web-dir, GET /offline/ is the web export's page, which describes photos in the browser.

Requests that arrive together are captioned together: the first waits at most --max-wait-ms for others, up
to --max-batch photos, and one forward pass serves them all. Photos are decoded in a few worker threads and
the model runs in a thread of its own, so the event loop only moves bytes. Every refusal is a JSON
{"error": "..."} with a 4xx status (503 while loading or too busy) and one log line; uploads are read into
memory under a size cap, never written to disk, and no request names a file on the server.
"""

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from PIL import Image
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from captioner.backbones import EncoderWeightsError
from captioner.files import DataError
from captioner.read_text import LANGUAGES
from captioner.runtimes import RUNTIME_CHOICES, RUNTIME_HELP
from utils import USER_CHECKPOINTS, HelpFormatter, cores, find_checkpoint, pick_device, positive, text_languages

log = logging.getLogger("serve")
ARGV_ENV = "CAPTION_SERVE_ARGV"  # --workers: how each worker process gets the command line (uvicorn imports it)
TOKEN_ENV = "CAPTION_TOKEN"


def get_args_parser():
    p = argparse.ArgumentParser(description="Serve the captioner over HTTP: an API and a page for phones.",
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", action="append",
                   help=f"checkpoint to serve (default: the first of {', '.join(USER_CHECKPOINTS)}, else the model "
                        "that ships in checkpoints/pretrained/); given several times: their ensemble")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--runtime", choices=RUNTIME_CHOICES, default="auto", help=RUNTIME_HELP)
    p.add_argument("--cache-dir", default="cache", help="where the CNN's ONNX file is kept (shared with training)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but loopback exposes the service: give it a --token")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                   help=f"shared secret that POST /caption requires as 'Authorization: Bearer TOKEN' (default: "
                        f"${TOKEN_ENV}, which keeps it out of the process list; none: no check)")
    p.add_argument("--workers", type=positive(int), default=1,
                   help="server processes sharing the port, each with its own model and its share of the cores")
    p.add_argument("--threads", type=positive(int),
                   help="PyTorch threads per process (default: the cores this process may use / --workers)")
    p.add_argument("--decode-threads", type=positive(int),
                   help="threads per process that decode uploads (default: a quarter of those, 1 to 4)")
    p.add_argument("--max-batch", type=positive(int), default=8,
                   help="most photos captioned in one forward pass; 1 turns batching off")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="longest a photo waits for others to fill its batch, in milliseconds")
    p.add_argument("--max-upload-mb", type=positive(float), default=20.0,
                   help="largest request body, in MiB (413 above it)")
    p.add_argument("--max-queue", type=positive(int), default=64,
                   help="most requests in progress at once per process; more get 503 with Retry-After")
    p.add_argument("--upload-timeout", type=positive(float), default=30.0,
                   help="seconds a client may take between two pieces of its upload (408 after)")
    p.add_argument("--no-text", action="store_true", help="do not read the text in photos")
    p.add_argument("--text-languages", default="en", type=text_languages,
                   help=f"the languages of the text to read, comma-separated: {', '.join(LANGUAGES)}")
    p.add_argument("--beam", type=positive(int), default=3, help="beam width when a request does not say")
    p.add_argument("--max-beam", type=positive(int), default=8, help="widest beam a request may ask for (?beam=N)")
    p.add_argument("--web-dir", help="also serve at /offline/ this folder, made by `export.py --format web`: the "
                                     "page that describes photos in the browser itself, sending none (docs/web.md)")
    p.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM): wise beyond loopback")
    p.add_argument("--ssl-keyfile", help="the certificate's private key (PEM)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="info: one line per request; warning: only refusals and errors")
    return p


def check_args(p, args):
    """The flag combinations argparse cannot check by itself: parser.error (one line, exit 2)."""
    if args.beam > args.max_beam:
        p.error(f"--beam {args.beam} is wider than --max-beam {args.max_beam}")
    if args.max_wait_ms < 0:
        p.error(f"--max-wait-ms must be >= 0, got {args.max_wait_ms}")
    if not 0 < args.port < 65536:
        p.error(f"--port must be 1 to 65535, got {args.port}")
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        p.error("--ssl-certfile and --ssl-keyfile go together")
    if args.web_dir and not (Path(args.web_dir) / "captioner.json").is_file():
        p.error(f"--web-dir {args.web_dir} holds no web export: make one with `export.py --format web --out DIR`")
    return args


def host_warning(host, token):
    """The line to warn with when the service is exposed beyond this machine with no token, else None."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        loopback = False
    if loopback or token:
        return None
    return (f"warning: --host {host} lets other machines use the service and no --token guards it: anyone who can "
            f"reach the port can caption with your CPU (give --token or ${TOKEN_ENV})")


class Refused(Exception):
    """A request the service will not caption: its HTTP status and one line for the client and the log."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# ---------------------------------------------------------------------------------------- reading uploads

RAW_TYPES = ("application/octet-stream",)  # besides image/*: what a raw body may be declared as


def upload_kind(content_type):
    """'multipart' or 'raw' from a request's Content-Type, or Refused(415)."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        return "multipart"
    if kind.startswith("image/") or kind in RAW_TYPES:
        return "raw"
    raise Refused(415, f"Content-Type {kind or '(none)'} is not a photo: send it as the multipart field 'image' "
                       "(curl -F image=@photo.jpg) or as the raw body with Content-Type image/jpeg (or image/png, "
                       "..., application/octet-stream)")


async def read_body(request, limit, timeout):
    """The request body, read into memory (never spooled to disk), or Refused: 413 once it passes `limit`
    bytes (at once when Content-Length says so), 408 when the client stalls for `timeout` seconds.
    ClientDisconnect propagates when the client leaves mid-upload."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Refused(400, f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise Refused(413, f"upload of {int(declared) / 2**20:.1f} MiB is over the limit of "
                               f"{limit / 2**20:g} MiB")
    body, chunks = bytearray(), request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), timeout)
        except StopAsyncIteration:
            return bytes(body)
        except TimeoutError:
            raise Refused(408, f"upload stalled: nothing received for {timeout:g} s") from None
        body += chunk
        if len(body) > limit:
            raise Refused(413, f"upload over the limit of {limit / 2**20:g} MiB")


class _Parts:
    """python-multipart's callbacks, collecting every part (headers and data) of a body held in memory."""

    def __init__(self):
        self.parts, self.ended = [], False
        self._field, self._value = bytearray(), bytearray()

    def callbacks(self):
        return {"on_part_begin": lambda: self.parts.append({"headers": {}, "data": bytearray()}),
                "on_part_data": lambda d, s, e: self.parts[-1]["data"].extend(d[s:e]),
                "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
                "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
                "on_header_end": self._header_end,
                "on_end": self._end}

    def _header_end(self):
        self.parts[-1]["headers"][bytes(self._field).lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _end(self):
        self.ended = True


def multipart_image(body, content_type):
    """The bytes of the multipart field 'image' (a file), or Refused: 400 for a malformed body or no such field,
    415 when the part itself says it is no photo (text/plain, ...)."""
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise Refused(400, "multipart/form-data without a boundary")
    collected = _Parts()
    try:
        parser = MultipartParser(boundary, collected.callbacks())
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, ValueError) as e:
        raise Refused(400, f"malformed multipart body ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    if not collected.ended:
        raise Refused(400, "malformed multipart body (it ends before its closing boundary)")
    for part in collected.parts:
        disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))[1]
        if disposition.get(b"name") == b"image":
            kind = part["headers"].get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            if kind and not (kind.startswith("image/") or kind in RAW_TYPES):
                raise Refused(415, f"the 'image' field is {kind}, not a photo")
            return bytes(part["data"])
    raise Refused(400, "no 'image' field in the form: send the photo as image=@photo.jpg")


# ---------------------------------------------------------------------------------------- micro-batching

class Batcher:
    """Gathers concurrent requests into batches: the first photo waits at most max_wait seconds for others, up
    to max_batch, and each batch is one call of run_batch(images, key) in `executor` (the model's one thread),
    off the event loop. Photos share a batch only with photos of the same key (beam, n_best). coming(): how
    many requests are on their way (uploading, decoding); with none, a lone photo does not wait at all."""

    def __init__(self, run_batch, executor, max_batch, max_wait, coming=lambda: 1):
        self.run_batch, self.executor, self.coming = run_batch, executor, coming
        self.max_batch, self.max_wait = max_batch, max_wait
        self.queue = asyncio.Queue()
        self.stats = {"batches": 0, "photos": 0, "largest_batch": 0}

    async def submit(self, image, key):
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((key, image, future))
        return await future

    async def _gather(self):
        """The next batch: one request, then whatever arrives within max_wait (queued ones at once)."""
        batch = [await self.queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0 or not self.coming():
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def run(self):
        loop = asyncio.get_running_loop()
        while True:
            batch = [item for item in await self._gather() if not item[2].done()]  # callers gone: skip
            for key in dict.fromkeys(k for k, _, _ in batch):
                group = [(image, future) for k, image, future in batch if k == key]
                try:
                    results = await loop.run_in_executor(self.executor, self.run_batch, [i for i, _ in group], key)
                except Exception as e:  # a bug or an exhausted machine: these requests fail, the service stays
                    log.exception("captioning a batch of %d failed", len(group))
                    results = [Refused(500, f"captioning failed ({type(e).__name__})")] * len(group)
                self.stats["batches"] += 1
                self.stats["photos"] += len(group)
                self.stats["largest_batch"] = max(self.stats["largest_batch"], len(group))
                for (_, future), r in zip(group, results):
                    if future.done():
                        continue
                    if isinstance(r, Exception):
                        future.set_exception(r)
                    else:
                        future.set_result(r)


# ---------------------------------------------------------------------------------------- the service

class Service:
    """One model, its threads and its batcher, and the handling of one caption request."""

    def __init__(self, captioner, args, model_name, model_pool):
        self.captioner, self.args, self.model_name = captioner, args, model_name
        self.size = captioner.preset["resize"]
        self.limit = int(args.max_upload_mb * 2**20)
        self.decode_pool = ThreadPoolExecutor(args.decode_threads or default_decode_threads(args), "decode")
        self.model_pool = model_pool  # one forward at a time: each uses all torch threads
        self.batcher = Batcher(self.describe, self.model_pool, args.max_batch, args.max_wait_ms / 1000,
                               lambda: self.coming)
        self.ready, self.in_flight, self.coming, self.task = False, 0, 0, None

    def describe(self, photos, key):
        """decode()'s photos, looked at (description.Look: the photo check, the text) and captioned as one batch,
        here in the model's thread: the text reader's ONNX Runtime sessions serve one caller at a time, and a
        look in the decode threads would keep photos from gathering into batches."""
        beam, n_best = key
        looks = [self.captioner.look(loaded) for _, loaded, _ in photos]
        return self.captioner.describe_batch([im for im, _, _ in photos], beam=beam, n_best=n_best, looks=looks)

    def decode(self, body, kind, content_type):
        """Upload bytes -> (the photo, upright RGB at the model's input size; the photo as loaded; the bytes), in
        a decode thread: the photo check and the text reading look at the photo as loaded, as inference.py does.
        Resizing here spares the model's thread; describe's own resize of an image already that size is a copy,
        so the caption is the one inference.py gives the same file."""
        data = multipart_image(body, content_type) if kind == "multipart" else body
        if not data:
            raise Refused(400, "empty upload: no photo in it")
        try:
            image = self.captioner.load(io.BytesIO(data), name="upload")
        except DataError as e:
            raise Refused(422, str(e)) from None
        return image.resize((self.size, self.size), Image.Resampling.BILINEAR), image, data

    def search(self, query):
        """(beam, n_best) from the query string, or Refused(400)."""
        def number(name, default, low, high):
            text = query.get(name)
            if text is None:
                return default
            if not text.isdigit() or not low <= int(text) <= high:
                raise Refused(400, f"{name}={text}: must be a whole number from {low} to {high}")
            return int(text)

        beam = number("beam", self.args.beam, 1, self.args.max_beam)
        n_best = number("n_best", None, 1, self.args.max_beam)
        if n_best and n_best > beam:
            raise Refused(400, f"n_best={n_best} needs beam={n_best} or more: a beam search of {beam} keeps "
                               f"{beam} captions")
        return beam, n_best

    def check(self, request):
        """Refused unless the request may be captioned now: its token, readiness, room in the queue."""
        if self.args.token:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.args.token}".encode()):
                raise Refused(401, "missing or wrong token: send 'Authorization: Bearer TOKEN'",
                              {"WWW-Authenticate": "Bearer"})
        if not self.ready:
            raise Refused(503, "the model is still loading: try again in a few seconds", {"Retry-After": "5"})
        if self.in_flight >= self.args.max_queue:
            raise Refused(503, f"busy: {self.in_flight} photos in progress; try again shortly", {"Retry-After": "1"})

    async def caption(self, request):
        """POST /caption: the whole of one request, answered with the description or one JSON error."""
        start = time.perf_counter()
        self.check(request)
        self.in_flight += 1
        try:
            key, image = await self.prepare(request)
            result = await self.batcher.submit(image, key)
        finally:
            self.in_flight -= 1
        # no caption in the log: it describes someone's photo
        log.info("%s POST /caption 200 %.0f ms", client(request), (time.perf_counter() - start) * 1000)
        return JSONResponse(result)

    async def prepare(self, request):
        """((beam, n_best), the decoded photo) of a request, counted in self.coming while under way."""
        self.coming += 1
        try:
            key = self.search(request.query_params)
            ctype = request.headers.get("content-type", "")
            kind = upload_kind(ctype)
            body = await read_body(request, self.limit, self.args.upload_timeout)
            request.state.body_read = True
            loop = asyncio.get_running_loop()
            return key, await loop.run_in_executor(self.decode_pool, self.decode, body, kind, ctype)
        finally:
            self.coming -= 1

    def health(self):
        return {"status": "ready" if self.ready else "loading", "model": self.model_name,
                "device": str(self.captioner.device), "max_batch": self.args.max_batch,
                "in_flight": self.in_flight, **self.batcher.stats}

    def warm_up(self):
        """One caption of a grey photo: the first forward pass allocates and chooses kernels, slow once."""
        grey = Image.new("RGB", (self.size, self.size), (128, 128, 128))
        self.describe([(grey, grey, None)], (self.args.beam, None))

    def warmed(self, future):
        if future.exception():
            log.error("the model failed its first caption, so the service stays unready: %s", future.exception())
        self.ready = future.exception() is None

    def close(self):
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.model_pool.shutdown(wait=False, cancel_futures=True)


def default_decode_threads(args):
    """A quarter of the PyTorch threads, 1 to 4: a photo decodes (at reduced scale) in a few milliseconds, a
    fraction of its share of a forward pass, so more would only take cores from the model."""
    return max(1, min(4, (args.threads or max(1, cores() // args.workers)) // 4))


def client(request):
    return f"{request.client.host}:{request.client.port}" if request.client else "-"


def refusal(request, status, message, headers=None):
    """A refusal: one log line (no traceback) and {"error": message}."""
    log.warning("%s %s %s %d: %s", client(request), request.method, request.url.path, status, message)
    return JSONResponse({"error": message}, status, headers=headers)


@contextlib.asynccontextmanager
async def lifespan(app):
    service = app.state.service
    service.task = asyncio.create_task(service.batcher.run())
    warm = asyncio.get_running_loop().run_in_executor(service.model_pool, service.warm_up)
    warm.add_done_callback(service.warmed)
    try:
        yield
    finally:
        service.task.cancel()
        service.close()


def make_app(args, captioner=None, model_name=None):
    """The FastAPI application for parsed `args` (get_args_parser), serving `captioner` (an
    describe.Captioner; default: loaded from args.checkpoint). All its state lives in app.state.service."""
    paths = args.checkpoint or [find_checkpoint(None)]  # said once, on stderr, where it chose
    model_pool = model_thread()
    if captioner is None:
        captioner = model_pool.submit(load_captioner, paths, args).result()
    # load_image makes Pillow's decompression-bomb warning an error within warnings.catch_warnings, which is
    # not thread-safe: with several decode threads one could restore the filters while another decodes. The
    # same rule set process-wide cannot be lost that way.
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
    app = FastAPI(title="Captioner", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service = Service(captioner, args, model_name or describe_checkpoint(paths), model_pool)
    page = Page(bool(args.token))

    @app.post("/caption")
    async def caption(request: Request):
        try:
            return await service.caption(request)
        except Refused as e:
            headers = dict(e.headers or {})
            if not getattr(request.state, "body_read", False):  # what is left of it cannot start the next request
                headers["Connection"] = "close"
            return refusal(request, e.status, e.message, headers)
        except ClientDisconnect:
            return refusal(request, 400, "the client disconnected mid-upload")

    @app.get("/health")
    async def health():
        return JSONResponse(service.health(), 200 if service.ready else 503)

    @app.get("/")
    async def index():
        return page.response()

    @app.get("/offline")
    async def offline_folder():
        return RedirectResponse("/offline/")  # the page's files are named relative to the folder

    @app.get("/offline/{name:path}")
    async def offline(name: str):
        return web_file(args.web_dir, name)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # 404, 405: the same JSON shape as every other refusal
        return refusal(request, exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        return refusal(request, 400, "invalid request")

    return app


WEB_TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
             ".webmanifest": "application/manifest+json", ".html": "text/html; charset=utf-8"}


def web_file(folder, name):
    """GET /offline/NAME: a file of the folder `export.py --format web` made (--web-dir), its page for the folder
    itself; only the folder's own files, so that no name leads out of it. 404 for anything else."""
    if not folder:
        raise StarletteHTTPException(404, "no offline page here: make one with `python export.py --format web "
                                          "--out site/` and serve it with --web-dir site/")
    files = {p.name: p for p in Path(folder).iterdir() if p.is_file()}
    path = files.get(name or "index.html")
    if path is None:
        raise StarletteHTTPException(404, f"/offline/{name}: no such file")
    return FileResponse(path, media_type=WEB_TYPES.get(path.suffix, "application/octet-stream"),
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


def model_thread():
    """The one thread that runs PyTorch in this process: loading, warm-up and every batch. OpenMP (libgomp)
    keeps a team of threads for each thread that calls into it, and once it manages more threads than there
    are cores it stops spinning between operations and sleeps instead: with a second caller (the main thread
    that loaded the model) each forward pass on 2 cores took 1.7x as long (measured: 144 ms against 85 ms
    for one photo at beam 3)."""
    pool = ThreadPoolExecutor(1, "model")
    pool.submit(torch.set_num_threads, torch.get_num_threads()).result()  # this thread's own OpenMP setting
    return pool


def load_captioner(paths, args):
    from captioner.describe import Captioner  # here, not at the top: `serve.py --help` need not load PyTorch's models

    return Captioner(paths if len(paths) > 1 else paths[0], pick_device(args.device), runtime=args.runtime,
                     cache_dir=args.cache_dir, read_text=not args.no_text, text_languages=args.text_languages)


def describe_checkpoint(checkpoints):
    """The checkpoint(s) as /health names them: relative to the working folder where inside it, so that the
    service does not tell clients where on the server its files are."""
    def name(p):
        p = Path(p).resolve()
        with contextlib.suppress(ValueError):
            return str(p.relative_to(Path.cwd()))
        return p.name

    return ", ".join(name(p) for p in checkpoints)


# ---------------------------------------------------------------------------------------- the page

PAGE_CSS = """
:root { color-scheme: light dark; --fg: #111; --bg: #fff; --accent: #0b57d0; --muted: #333; }
@media (prefers-color-scheme: dark) { :root { --fg: #f4f4f4; --bg: #111; --accent: #8ab4f8; --muted: #ddd; } }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg); font: 1.375rem/1.5 system-ui, sans-serif; }
main { max-width: 40rem; margin: 0 auto; padding: 1rem 1.25rem 3rem; }
h1 { font-size: 2rem; margin: 0.5rem 0 1rem; }
label { display: block; font-weight: 700; margin: 1.25rem 0 0.5rem; }
p.help { color: var(--muted); margin: 0 0 1rem; }
input[type=file], input[type=password], button { font: inherit; color: var(--fg); width: 100%; }
input[type=password] { padding: 0.6rem; border: 3px solid var(--fg); border-radius: 0.5rem; background: var(--bg); }
input[type=file]::file-selector-button, button {
  font: inherit; font-weight: 700; min-height: 3.5rem; padding: 0.6rem 1.2rem; margin: 0 1rem 0.5rem 0;
  color: var(--bg); background: var(--accent); border: 3px solid var(--accent); border-radius: 0.75rem;
  cursor: pointer; }
button { width: auto; }
button:disabled { opacity: 0.45; cursor: not-allowed; }
:focus-visible, input[type=file]:focus-visible::file-selector-button {
  outline: 4px solid var(--fg); outline-offset: 4px; }
#answer { font-size: 1.75rem; font-weight: 600; min-height: 2.5em; margin: 1.5rem 0 1rem; padding: 0.75rem 1rem;
  border-left: 0.5rem solid var(--accent); }
#answer:empty { border-color: transparent; }
img { display: block; max-width: 100%; height: auto; margin-top: 1.5rem; border-radius: 0.5rem; }
"""

PAGE_JS = """
const input = document.getElementById("photo"), answer = document.getElementById("answer");
const speak = document.getElementById("speak"), shown = document.getElementById("shown");
const token = document.getElementById("token");
let said = "";
if (token) {  // a link ending in #token=... fills it once; this browser then remembers it
  const fromLink = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromLink) { localStorage.setItem("caption-token", fromLink); history.replaceState(null, "", location.pathname); }
  token.value = localStorage.getItem("caption-token") || "";
}
if (!("speechSynthesis" in window)) { speak.hidden = true; }
function say(text) { answer.textContent = text; }
input.addEventListener("change", async () => {
  const file = input.files[0];
  if (!file) return;
  speak.disabled = true;
  said = "";
  say("Describing the photo\\u2026");
  const form = new FormData();
  form.append("image", file);
  const headers = {};
  if (token && token.value) {
    headers.Authorization = "Bearer " + token.value;
    localStorage.setItem("caption-token", token.value);
  }
  let response, body;
  try {
    response = await fetch("caption", { method: "POST", body: form, headers });
    body = await response.json();
  } catch (e) {
    say("Sorry, the service could not be reached. Check the connection and try again.");
    return;
  }
  if (!response.ok) { say("Sorry, no description: " + (body.error || response.statusText)); return; }
  said = body.description || body.alt_text || body.caption;
  if (shown.src) URL.revokeObjectURL(shown.src);
  shown.src = URL.createObjectURL(file);
  shown.alt = said;
  shown.hidden = false;
  say(said);
  speak.disabled = false;
});
speak.addEventListener("click", () => {
  if (!said) return;
  speechSynthesis.cancel();  // a second press starts over rather than queueing another reading
  speechSynthesis.speak(new SpeechSynthesisUtterance(said));
});
"""

PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Describe a photo</title>
<link rel="icon" href="data:,">
<style>{css}</style>
</head>
<body>
<main>
<h1>Describe a photo</h1>
<p class="help" id="help">Take a photo or choose one. Its description is announced when it is ready, and the
Read aloud button speaks it again.</p>
{token_field}<label for="photo">Take or choose a photo</label>
<input id="photo" name="image" type="file" accept="image/*" capture="environment" aria-describedby="help">
<div id="answer" role="status" aria-live="polite" aria-atomic="true"></div>
<button id="speak" type="button" disabled>Read aloud</button>
<img id="shown" alt="" hidden>
</main>
<script>{js}</script>
</body>
</html>
"""

TOKEN_FIELD = """<label for="token">Access code</label>
<input id="token" type="password" autocomplete="current-password" spellcheck="false">
"""


class Page:
    """GET /: one self-contained page (no framework, no CDN: it works offline), with a Content-Security-Policy
    that lets only its own inline script and style run, by their hashes."""

    def __init__(self, needs_token):
        self.html = PAGE_HTML.format(css=PAGE_CSS, js=PAGE_JS, token_field=TOKEN_FIELD if needs_token else "")
        self.csp = (f"default-src 'none'; script-src '{sha256(PAGE_JS)}'; style-src '{sha256(PAGE_CSS)}'; "
                    "img-src blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                    "frame-ancestors 'none'")

    def response(self):
        return HTMLResponse(self.html, headers={"Content-Security-Policy": self.csp,
                                                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})


def sha256(text):
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


# ---------------------------------------------------------------------------------------- running it

def set_threads(args):
    """Size PyTorch's thread pool so that the processes and the decode threads do not oversubscribe the CPU."""
    torch.set_num_threads(args.threads or max(1, cores() // args.workers))
    with contextlib.suppress(RuntimeError):  # only settable before the first parallel work
        torch.set_num_interop_threads(1)


def worker_app():
    """--workers N: the app of one worker process, built from the command line main() left in the environment."""
    args = check_args(get_args_parser(), get_args_parser().parse_args(json.loads(os.environ[ARGV_ENV])))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    set_threads(args)
    try:
        return make_app(args)
    except (DataError, EncoderWeightsError) as e:
        log.error("error: %s", e)
        raise SystemExit(1) from None


def main(args, argv=None):
    """Serve until interrupted. argv: the command line, handed to worker processes when --workers > 1."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    warning = host_warning(args.host, args.token)
    if warning:
        print(warning, file=sys.stderr)
    set_threads(args)
    # keep-alive: uvicorn's 5 s closes connections that clients (and load balancers, commonly 60 s) still hold
    # for their next photo, and a POST sent as the server closes fails in the client; 75 s, as nginx's
    common = {"host": args.host, "port": args.port, "log_level": args.log_level, "access_log": False,
              "ssl_certfile": args.ssl_certfile, "ssl_keyfile": args.ssl_keyfile, "timeout_graceful_shutdown": 10,
              "timeout_keep_alive": 75}
    if args.workers == 1:
        app = make_app(args)  # a bad checkpoint stops here, in one line, before the port opens
        print(f"serving {app.state.service.model_name} on {url(args)} ({torch.get_num_threads()} PyTorch threads)",
              file=sys.stderr)
        uvicorn_run(app, **common)
        return
    for path in args.checkpoint or [find_checkpoint(None)]:
        if not Path(path).is_file():
            raise DataError(f"checkpoint not found: {path}")
    run_workers(args, sys.argv[1:] if argv is None else argv, common)


def run_workers(args, argv, common):
    """--workers N: this process becomes a lean uvicorn supervisor (exec: PyTorch, imported here, would
    otherwise keep ~400 MiB in a process that captions nothing), which starts N workers (worker_app), each
    loading its own model. They get the command line through the environment; a worker's first answer waits
    for its model, hence the long health-check timeout."""
    os.environ[ARGV_ENV] = json.dumps(argv)
    print(f"serving on {url(args)} with {args.workers} worker processes, each its own model", file=sys.stderr,
          flush=True)
    code = (f"import sys, uvicorn; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            f"uvicorn.run('serve:worker_app', factory=True, workers={args.workers}, "
            f"timeout_worker_healthcheck=300, **{common!r})")
    os.execv(sys.executable, [sys.executable, "-c", code])


def uvicorn_run(app, **kwargs):
    import uvicorn

    uvicorn.run(app, **kwargs)


def url(args):
    host = f"[{args.host}]" if ":" in args.host else args.host
    return f"{'https' if args.ssl_certfile else 'http'}://{host}:{args.port}/"


def cli(argv=None):
    parser = get_args_parser()
    args = check_args(parser, parser.parse_args(argv))
    try:
        main(args, argv)
    except (DataError, EncoderWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(cli())
