// Service worker of the on-device page: every file of the folder is cached at install, and served from the
// cache (network only for what is missing), so the page and its model work with no network after the first
// load. export.py writes FILES and VERSION (a hash of the folder's files) below; a new export is a new cache.
"use strict";
const VERSION = "__VERSION__";
const FILES = __FILES__;

self.addEventListener("install", (ev) => {
  ev.waitUntil(caches.open(VERSION).then((c) => c.addAll(FILES)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (ev) => {
  ev.waitUntil(caches.keys()
    .then((keys) => Promise.all(keys.filter((k) => k !== VERSION).map((k) => caches.delete(k))))
    .then(() => self.clients.claim()));
});

self.addEventListener("fetch", (ev) => {
  if (ev.request.method !== "GET") return;
  ev.respondWith(caches.match(ev.request, { ignoreSearch: true }).then((hit) => hit || fetch(ev.request)));
});
