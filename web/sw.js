// The service worker of `export.py --format web`: on the first visit it keeps every file of the folder
// (export.py writes their list and a hash of their content below); from then on the page is answered from
// that cache, with or without a network. A new export has a new hash: its files replace the old ones.
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

self.addEventListener("fetch", (event) => {
  if (event.request.method !== "GET") return;
  event.respondWith(caches.open(CACHE)
    .then((cache) => cache.match(event.request, { ignoreSearch: true }))
    .then((hit) => hit || fetch(event.request)));
});
