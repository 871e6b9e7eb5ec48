"""Searching your own documents with a trained retriever: a page index on disk, queries, similarity maps, a web page.

May import `colintern.model`, `colintern.data` and plumbing.

    build_index(pdf_dir, index_dir, model_path)   render + encode pages into an index folder (resumable, incremental)
    Searcher(index_dir).search("text", k=5)        ranked pages (exact MaxSim)
    Searcher.explain(hit, "text", png_path)        the page and each query token's similarity map, as a PNG
    serve(index_dir, port)                         a local web page (query box, thumbnails, maps)
"""

from colintern.search.index import BuildStats, Hit, Searcher, SearchIndex, build_index

__all__ = ["BuildStats", "Hit", "SearchIndex", "Searcher", "build_index"]
