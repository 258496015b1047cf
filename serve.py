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

This file is the command (its flags, the app's routes, its processes); reading uploads, the batching and
the handling of a request are captioner/service.py's, and the page's files are web/service/ and the
stylesheet it shares with the web export's page, web/style.css.
"""

import argparse
import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import string
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from captioner.backbones import EncoderWeightsError
from captioner.files import DataError
from captioner.read_text import LANGUAGES
from captioner.runtimes import RUNTIME_CHOICES, RUNTIME_HELP
from captioner.service import Refused, Service, client
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

WEB = Path(__file__).resolve().parent / "web"
TOKEN_FIELD = re.compile(r"<!--token-->\n(.*?)<!--/token-->\n", re.S)  # page.html's access code field


class Page:
    """GET /: web/service/page.html, one self-contained page (no framework, no CDN: it works offline), with the
    stylesheet it shares with the web export's page (web/style.css) and its script (web/service/page.js) written
    into it, and a Content-Security-Policy that lets only that script and style run, by their hashes. The access
    code field (between <!--token--> and <!--/token-->) is there only when the service asks for a token."""

    def __init__(self, needs_token):
        css, js = (WEB / "style.css").read_text(), (WEB / "service" / "page.js").read_text()
        page = TOKEN_FIELD.sub(r"\1" if needs_token else "", (WEB / "service" / "page.html").read_text())
        self.html = string.Template(page).substitute(style=css, script=js)
        self.csp = (f"default-src 'none'; script-src '{sha256(js)}'; style-src '{sha256(css)}'; "
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
