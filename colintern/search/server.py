"""A small local search page over an index: a query box, ranked page thumbnails, a page's similarity maps on click.

    python scripts/search.py serve --index DIR [--port 8000]     then open http://127.0.0.1:8000/

Python's standard `http.server` (no web framework); the model and the index are loaded once and shared by the
request threads (model calls are serialised by a lock). Routes:
    /                            the page; `/?q=text&k=5` runs that search when it opens (links can be shared)
    /api/search?q=text&k=5       {"query", "results": [{rank, index, file, page, score, image, explain}], "seconds"}
    /page/N.png                  the N-th indexed page as rendered
    /explain/N.png?q=text        the similarity maps of each query token over page N (see colintern.search.explain)
"""

from __future__ import annotations

import html
import json
import logging
import tempfile
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlparse

from colintern.search.index import Searcher
from colintern.utils import ColinternError

logger = logging.getLogger(__name__)

MAX_K = 100

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>colintern search: {title}</title>
<style>
 body {{ font-family: sans-serif; margin: 1.5em; background: #fafafa; }}
 form {{ display: flex; gap: .5em; margin-bottom: 1em; }}
 #query {{ flex: 1; font-size: 1.1em; padding: .4em; }}
 #status {{ color: #555; margin: .5em 0; }}
 #results {{ display: flex; flex-wrap: wrap; gap: 1em; list-style: none; padding: 0; }}
 .result {{ width: 180px; background: white; border: 1px solid #ddd; padding: .5em; cursor: pointer; }}
 .result.selected {{ border-color: #c33; }}
 .result img {{ width: 100%; display: block; }}
 .meta {{ font-size: .85em; word-break: break-all; }}
 #explain {{ max-width: 100%; margin-top: 1em; }}
</style></head>
<body>
<h1>Search {title}</h1>
<form id="search-form">
 <input id="query" name="q" type="search" placeholder="What are you looking for?" autofocus>
 <input id="k" name="k" type="number" min="1" max="{max_k}" value="5" style="width:4em">
 <button id="go" type="submit">Search</button>
</form>
<div id="status">{n_pages} pages of {n_documents} documents; model {model}</div>
<ol id="results"></ol>
<img id="explain" alt="" hidden>
<script>
const form = document.getElementById("search-form"), box = document.getElementById("query");
const results = document.getElementById("results"), statusLine = document.getElementById("status");
const explain = document.getElementById("explain");
async function search(q, k) {{
  statusLine.textContent = "Searching…";
  results.replaceChildren(); explain.hidden = true;
  history.replaceState(null, "", "?q=" + encodeURIComponent(q) + "&k=" + k);
  const response = await fetch("/api/search?q=" + encodeURIComponent(q) + "&k=" + k);
  const data = await response.json();
  if (!response.ok) {{ statusLine.textContent = "Error: " + data.error; return; }}
  statusLine.textContent = data.results.length + " results in " + data.seconds.toFixed(2) + " s";
  for (const hit of data.results) {{
    const item = document.createElement("li");
    item.className = "result";
    item.dataset.file = hit.file; item.dataset.page = hit.page; item.dataset.score = hit.score;
    const image = document.createElement("img");
    image.src = hit.image; image.alt = hit.file + " page " + hit.page;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = hit.rank + ". " + hit.file + ", page " + hit.page + " (score " + hit.score.toFixed(2) + ")";
    item.append(image, meta);
    item.addEventListener("click", () => {{
      for (const other of results.children) other.classList.remove("selected");
      item.classList.add("selected");
      explain.src = hit.explain; explain.alt = "similarity maps of " + hit.file + " page " + hit.page;
      explain.hidden = false;
    }});
    results.append(item);
  }}
}}
form.addEventListener("submit", (event) => {{
  event.preventDefault();
  if (box.value.trim()) search(box.value, document.getElementById("k").value || 5);
}});
const params = new URLSearchParams(location.search);
if (params.get("q")) {{
  box.value = params.get("q"); document.getElementById("k").value = params.get("k") || 5;
  search(box.value, document.getElementById("k").value);
}}
</script>
</body></html>
"""


class SearchApp:
    """The index and model behind the page; one per server."""

    def __init__(self, searcher: Searcher):
        self.searcher = searcher
        self.lock = threading.Lock()
        documents = {entry.document for entry in searcher.entries}
        self.page = PAGE.format(
            title=html.escape(searcher.index.path.resolve().name), max_k=MAX_K, n_pages=len(searcher.entries),
            n_documents=len(documents), model=html.escape(searcher.index.model),
        ).encode()

    def search(self, query: str, k: int) -> dict:
        start = time.perf_counter()
        with self.lock:
            hits = self.searcher.search(query, k)
        results = []
        for hit in hits:
            item = hit.to_dict()
            item["image"] = f"/page/{hit.index}.png"
            item["explain"] = f"/explain/{hit.index}.png?q={quote(query)}"
            results.append(item)
        return {"query": query, "results": results, "seconds": time.perf_counter() - start}

    def explain_png(self, index: int, query: str) -> bytes:
        from colintern.search.index import Hit

        entry = self.searcher.entries[index]
        with self.lock:
            from colintern.model.scoring import max_sim

            score = float(max_sim([self.searcher.encode_query(query)], [self.searcher.embeddings[index]])[0, 0])
            hit = Hit(0, index, entry.document, entry.page, score, entry.image)
            with tempfile.TemporaryDirectory() as tmp:
                path = self.searcher.explain(hit, query, Path(tmp) / "explain.png")
                return path.read_bytes()


def make_handler(app: SearchApp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "colintern-search"

        def log_message(self, format, *args):
            logger.debug("%s %s", self.address_string(), format % args)

        def send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def error(self, status: int, message: str) -> None:
            self.send(status, json.dumps({"error": message}).encode(), "application/json")

        def page_index(self, name: str) -> int | None:
            stem = name.removesuffix(".png")
            if not stem.isdigit() or int(stem) >= len(app.searcher.entries):
                return None
            return int(stem)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            params = {key: values[-1] for key, values in parse_qs(url.query).items()}
            parts = url.path.strip("/").split("/")
            try:
                if url.path == "/":
                    self.send(HTTPStatus.OK, app.page, "text/html; charset=utf-8")
                elif url.path == "/api/search":
                    query = params.get("q", "")
                    try:
                        k = int(params.get("k", 5))
                    except ValueError:
                        return self.error(HTTPStatus.BAD_REQUEST, "k must be a whole number")
                    if not query.strip() or not 1 <= k <= MAX_K:
                        return self.error(HTTPStatus.BAD_REQUEST, f"give a query (q) and k between 1 and {MAX_K}")
                    body = json.dumps(app.search(query, k)).encode()
                    self.send(HTTPStatus.OK, body, "application/json")
                elif len(parts) == 2 and parts[0] in ("page", "explain"):
                    index = self.page_index(parts[1])
                    if index is None:
                        return self.error(HTTPStatus.NOT_FOUND, "no such page")
                    if parts[0] == "page":
                        body = app.searcher.entries[index].image.read_bytes()
                        return self.send(HTTPStatus.OK, body, _image_type(app.searcher.entries[index].image))
                    if not params.get("q", "").strip():
                        return self.error(HTTPStatus.BAD_REQUEST, "give the query (q)")
                    self.send(HTTPStatus.OK, app.explain_png(index, params["q"]), "image/png")
                else:
                    self.error(HTTPStatus.NOT_FOUND, "not found")
            except ColinternError as error:
                self.error(HTTPStatus.BAD_REQUEST, str(error))
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception:  # keep the server up; the traceback goes to the log
                logger.exception("Request %s failed", self.path)
                self.error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (see the server's log)")

    return Handler


def _image_type(path: Path) -> str:
    return "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"


def make_server(searcher: Searcher, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server for `searcher` bound to (host, port) (port 0: a free one; see `server.server_address`)."""
    server = ThreadingHTTPServer((host, port), make_handler(SearchApp(searcher)))
    server.daemon_threads = True
    return server


def serve(index_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str | None = None) -> None:
    """Serve the search page of `index_dir` until interrupted."""
    searcher = Searcher(index_dir, device=device)
    try:
        server = make_server(searcher, host, port)
    except OSError as error:
        raise ColinternError(f"Cannot listen on {host}:{port} ({error.strerror}): choose another --port.") from error
    address = f"http://{host}:{server.server_address[1]}/"
    print(f"Search page for {index_dir} ({len(searcher.entries)} pages): {address}  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()

