"""The captioning service's machinery, which serve.py builds its app from: reading an upload into memory (the
photo as a multipart field or as the raw body), gathering concurrent requests into one forward pass (Batcher),
and the handling of one POST /caption (Service). Whatever the service will not caption is a Refused: an HTTP
status and one line, for the client and the log."""

import asyncio
import hmac
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi.responses import JSONResponse
from PIL import Image
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from captioner.files import DataError
from utils import cores

log = logging.getLogger("serve")  # serve.py's name: the service's log lines are one logger's, whichever file writes


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
