// The service worker of `export.py --format web`: on the first visit it keeps every file of the folder
// (export.py writes their list and a hash of their content below); from then on the page is answered from
// that cache, with or without a network. A new export has a new hash: its files replace the old ones.
// Every answer also says the page is cross-origin isolated (it loads nothing from elsewhere anyway): an isolated
// page may share memory between threads, so the models run on several cores from the second visit on, as a
// static host seldom sends these headers itself.
const VERSION = "__VERSION__";
const FILES = ["__FILES__"];
const CACHE = "describe-a-photo-" + VERSION;

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(CACHE).then((cache) => cache.addAll(FILES)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil(caches.keys()
    .then((keys) => Promise.all(keys.filter((k) => k.startsWith("describe-a-photo-") && k !== CACHE)
      .map((k) => caches.delete(k))))
    .then(() => self.clients.claim()));
});

const ISOLATED = { "Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
                   "Cross-Origin-Resource-Policy": "same-origin" };

function isolated(response) {
  // the response with the headers that make the page cross-origin isolated
  if (!response || response.status === 0) return response;
  const headers = new Headers(response.headers);
  for (const [name, value] of Object.entries(ISOLATED)) headers.set(name, value);
  return new Response(response.body, { status: response.status, statusText: response.statusText, headers });
}

self.addEventListener("fetch", (event) => {
  if (event.request.method !== "GET") return;
  event.respondWith(caches.open(CACHE)
    .then((cache) => cache.match(event.request, { ignoreSearch: true }))
    .then((hit) => hit || fetch(event.request))
    .then(isolated));
});
