"""SynthDocs: a synthetic document-page retrieval corpus, rendered with PIL and deterministic from a seed.

Pages look like document pages (a coloured title band with title bars, grey text lines, a chart or table block, a
logo in a corner, a footer), but what a query can ask for is carried by attributes a small randomly initialised
vision tower picks up in minutes on a CPU: the title band's colour, the logo's shape and colour, and the chart type.
Rendered words were measured not to be learnable by a ~1M-parameter model in that time (see README).

Every combination of (band colour, logo colour, logo shape, chart type) belongs to exactly one split, so held-out
pages show unseen combinations of seen attribute values. Document ids are random hex strings with no relation to
relevance, so score ties in an untrained model cannot inflate its baseline.

Domains (`embedded:synthdocs-a`, `embedded:synthdocs-b`): two disjoint parts of the corpus by attribute value, for
pretraining on one and adapting to the other. Domain B holds every combination in which the title band or the logo
has one of `DOMAIN_B_COLOURS` (purple, brown); domain A holds the rest, so a model trained on A never saw those
colours, nor the words naming them. Each domain is split by combination as the whole corpus is. The whole corpus
(`embedded:synthdocs`, no domain) is unchanged by this: same pages, same manifest.

Layout on disk (`write_synthdocs(dir)`):
    train/data-*.parquet         the `vidore/colpali_train_set` columns: query, image, image_filename, answer, source
    validation/{corpus,queries,qrels}.parquet
    test/{corpus,queries,qrels}.parquet     corpus: id, image; queries: id, text; qrels: query-id, corpus-id, score
    synthdocs.json               the generation parameters and counts
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from colintern.utils import atomic_directory, cache_dir, file_lock, manifest_matches

logger = logging.getLogger(__name__)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (235, 205, 30),
    "green": (40, 160, 70),
    "cyan": (30, 190, 215),
    "blue": (40, 70, 205),
    "purple": (135, 55, 175),
    "brown": (120, 75, 35),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
CHARTS = ("bar chart", "pie chart", "line chart", "table", "text only")
DOC_WORDS = ("report", "page", "document", "slide", "brochure", "memo", "form", "sheet")
QUERY_TEMPLATES = (
    "{doc} with a {band} header, a {logo_colour} {shape} logo and a {chart}",
    "{doc} with {band} header and {logo_colour} {shape} and {chart}",
    "which {doc} has a {chart}, a {band} title band and a {logo_colour} {shape}?",
    "{band} banner, {logo_colour} {shape} in the corner, {chart}",
    "find the {doc} showing a {chart} under a {band} header, with a {logo_colour} {shape} logo",
    "a {logo_colour} {shape} logo on a {doc} with a {band} heading and a {chart}",
)
EMBEDDED_DATASET = "embedded:synthdocs"  # the alias accepted wherever a dataset path is
FORMAT_VERSION = 1  # bump when the rendering or the layout on disk changes
SPLIT_FILES = ("corpus", "queries", "qrels")
DOMAIN_B_COLOURS = ("purple", "brown")
DOMAINS = ("a", "b")


@dataclass(frozen=True)
class SynthDocsConfig:
    """Generation parameters. The defaults are what the demo preset uses."""

    seed: int = 0
    page_width: int = 128  # small pages: the demo model sees them as one 128px tile
    page_height: int = 176
    logo_scale: float = 1.4  # logo radius relative to the base (~8.5% of the page width); measured to learn faster
    n_train: int = 6000  # training pairs (each combination of the train split rendered ~4 times)
    test_fraction: float = 0.15  # fraction of attribute combinations held out for the test split
    validation_fraction: float = 0.05
    max_eval_pages: int | None = None  # cap on test/validation corpus size (None: one page per held-out combination)
    domain: str | None = None  # "a" or "b" (see DOMAINS); None: the whole corpus

    def __post_init__(self) -> None:
        if self.domain is not None and self.domain not in DOMAINS:
            raise ValueError(f"SynthDocs domain must be one of {', '.join(DOMAINS)} or None, not {self.domain!r}")

    def to_dict(self) -> dict:
        """The generation parameters as recorded in the manifest; `domain` only when set (the whole corpus keeps the
        manifest, and so the cache and the mteb revision, it had before domains existed)."""
        data = asdict(self)
        if data["domain"] is None:
            del data["domain"]
        return data


@dataclass(frozen=True)
class PageSpec:
    """What a page shows: everything a query can name."""

    band: str
    logo_colour: str
    shape: str
    chart: str

    def describe(self) -> str:
        return f"{self.band} header, {self.logo_colour} {self.shape} logo, {self.chart}"


def all_combinations() -> list[PageSpec]:
    return [PageSpec(*combo) for combo in itertools.product(COLOURS, COLOURS, SHAPES, CHARTS)]


def in_domain(spec: PageSpec, domain: str | None) -> bool:
    """Whether a page belongs to `domain` ("b": band or logo in DOMAIN_B_COLOURS; "a": neither; None: all)."""
    if domain is None:
        return True
    novel = spec.band in DOMAIN_B_COLOURS or spec.logo_colour in DOMAIN_B_COLOURS
    return novel if domain == "b" else not novel


def split_combinations(config: SynthDocsConfig) -> dict[str, list[PageSpec]]:
    """Assign every attribute combination (of the config's domain) to one split, deterministically from the seed."""
    combos = [spec for spec in all_combinations() if in_domain(spec, config.domain)]
    random.Random(f"synthdocs-split-{config.seed}").shuffle(combos)
    n_test = round(len(combos) * config.test_fraction)
    n_val = round(len(combos) * config.validation_fraction)
    return {
        "test": combos[:n_test],
        "validation": combos[n_test : n_test + n_val],
        "train": combos[n_test + n_val :],
    }


def make_query(spec: PageSpec, rng: random.Random) -> str:
    template = rng.choice(QUERY_TEMPLATES)
    return template.format(
        doc=rng.choice(DOC_WORDS), band=spec.band, logo_colour=spec.logo_colour, shape=spec.shape, chart=spec.chart
    )


# ---------------------------------------------------------------------------------------------------- rendering
GREY_DARK, GREY, GREY_LIGHT = (90, 90, 90), (150, 150, 150), (205, 205, 205)


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "cross":
        w = r * 0.38
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
            (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
            (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    raise ValueError(f"unknown polygon shape {shape!r}")


def _draw_logo(draw: ImageDraw.ImageDraw, shape: str, colour: tuple[int, int, int], cx: float, cy: float, r: float):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r), fill=colour)


def _text_lines(draw, rng: random.Random, x0: int, x1: int, y0: int, y1: int, line_h: int) -> None:
    """Grey bars standing in for lines of body text."""
    y = y0
    while y + line_h <= y1:
        length = rng.uniform(0.55, 1.0) * (x1 - x0)
        draw.rectangle([x0, y, x0 + length, y + max(1, line_h // 3)], fill=GREY_LIGHT)
        y += line_h


def _draw_chart(draw, rng: random.Random, chart: str, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if chart == "bar chart":
        n = rng.randint(4, 7)
        bar_w = w / (n * 1.6)
        for i in range(n):
            bh = rng.uniform(0.2, 0.95) * h
            bx = x0 + (i + 0.3) * w / n
            draw.rectangle([bx, y1 - bh, bx + bar_w, y1], fill=GREY_DARK)
        draw.line([x0, y1, x1, y1], fill=GREY_DARK, width=1)
    elif chart == "pie chart":
        r = min(w, h) / 2 * 0.9
        cx, cy = x0 + w / 2, y0 + h / 2
        start = rng.uniform(0, 360)
        shades = (GREY_DARK, GREY, GREY_LIGHT, (120, 120, 120))
        cuts = sorted(rng.uniform(0, 360) for _ in range(3))
        bounds = [0.0, *cuts, 360.0]
        for i in range(4):
            draw.pieslice([cx - r, cy - r, cx + r, cy + r], start + bounds[i], start + bounds[i + 1], fill=shades[i])
    elif chart == "line chart":
        n = rng.randint(5, 9)
        points = [(x0 + i * w / (n - 1), y0 + rng.uniform(0.1, 0.9) * h) for i in range(n)]
        draw.line([x0, y1, x1, y1], fill=GREY, width=1)
        draw.line([x0, y0, x0, y1], fill=GREY, width=1)
        draw.line(points, fill=GREY_DARK, width=max(2, w // 40))
    elif chart == "table":
        rows, cols = rng.randint(4, 6), rng.randint(3, 4)
        for r in range(rows + 1):
            y = y0 + r * h / rows
            draw.line([x0, y, x1, y], fill=GREY_DARK, width=1)
        for c in range(cols + 1):
            x = x0 + c * w / cols
            draw.line([x, y0, x, y1], fill=GREY_DARK, width=1)
        draw.rectangle([x0, y0, x1, y0 + h / rows], fill=GREY_LIGHT, outline=GREY_DARK)
    elif chart == "text only":
        _text_lines(draw, rng, x0, x1, y0, y1, max(4, h // 8))
    else:
        raise ValueError(f"unknown chart type {chart!r}")


def render_page(
    spec: PageSpec, rng: random.Random, width: int = 192, height: int = 256, logo_scale: float = 1.0
) -> Image.Image:
    """Draw one page. Layout details (logo corner, sizes, filler) vary with `rng`; the attributes do not."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    margin = round(width * 0.06)
    band_h = round(height * rng.uniform(0.13, 0.17))
    draw.rectangle([0, 0, width, band_h], fill=COLOURS[spec.band])
    # title "text" in the band
    draw.rectangle([margin, band_h * 0.35, margin + width * rng.uniform(0.35, 0.55), band_h * 0.6], fill=(255, 255, 255))

    logo_r = width * rng.uniform(0.075, 0.095) * logo_scale
    corner = rng.randrange(4)  # 0: top-left below band, 1: top-right, 2: bottom-left, 3: bottom-right
    cx = margin + logo_r if corner in (0, 2) else width - margin - logo_r
    cy = band_h + margin + logo_r if corner in (0, 1) else height - margin - logo_r - height * 0.04

    # body: text lines, a chart block, more text lines; kept clear of the logo's corner
    text_top = band_h + margin
    line_h = max(5, height // 40)
    text_x0 = margin + (2 * logo_r + margin if corner == 0 else 0)
    text_x1 = width - margin - (2 * logo_r + margin if corner == 1 else 0)
    _text_lines(draw, rng, text_x0, text_x1, text_top, text_top + 4 * line_h, line_h)
    chart_top = text_top + 4 * line_h + margin // 2
    chart_h = round(height * rng.uniform(0.32, 0.38))
    chart_w = round((width - 2 * margin) * rng.uniform(0.7, 0.95))
    chart_x0 = margin + rng.randint(0, width - 2 * margin - chart_w)
    _draw_chart(draw, rng, spec.chart, (chart_x0, chart_top, chart_x0 + chart_w, chart_top + chart_h))
    lower_top = chart_top + chart_h + margin // 2
    lower_bottom = height - margin - round(height * 0.05)
    bx0 = margin + (2 * logo_r + margin if corner == 2 else 0)
    bx1 = width - margin - (2 * logo_r + margin if corner == 3 else 0)
    _text_lines(draw, rng, bx0, bx1, lower_top, lower_bottom - (2 * logo_r if corner >= 2 else 0), line_h)
    draw.line([margin, height - margin, width - margin, height - margin], fill=GREY, width=1)  # footer rule
    _draw_logo(draw, spec.shape, COLOURS[spec.logo_colour], cx, cy, logo_r)
    return image


# ---------------------------------------------------------------------------------------------------- datasets
def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _doc_id(config: SynthDocsConfig, split: str, index: int) -> str:
    return hashlib.sha1(f"{config.seed}/{split}/{index}".encode()).hexdigest()[:12]


def generate_train_rows(config: SynthDocsConfig) -> list[dict]:
    """Training pairs in the `vidore/colpali_train_set` column layout (image as PNG bytes)."""
    combos = split_combinations(config)["train"]
    rows = []
    for index in range(config.n_train):
        rng = random.Random(f"synthdocs-train-{config.seed}-{index}")
        spec = combos[index % len(combos)] if index < len(combos) else rng.choice(combos)
        page = render_page(spec, rng, config.page_width, config.page_height, config.logo_scale)
        rows.append(
            {
                "query": make_query(spec, rng),
                "image": {"bytes": _png_bytes(page), "path": None},
                "image_filename": f"synthdocs/train/{_doc_id(config, 'train', index)}.png",
                "answer": spec.describe(),
                "source": "synthdocs",
            }
        )
    random.Random(f"synthdocs-train-order-{config.seed}").shuffle(rows)
    return rows


def generate_retrieval_split(config: SynthDocsConfig, split: str) -> dict[str, list[dict]]:
    """One page and one query per held-out combination, as mteb's corpus / queries / qrels."""
    combos = split_combinations(config)[split]
    if config.max_eval_pages is not None:
        combos = combos[: config.max_eval_pages]
    corpus, queries, qrels = [], [], []
    for index, spec in enumerate(combos):
        rng = random.Random(f"synthdocs-{split}-{config.seed}-{index}")
        doc_id = _doc_id(config, split, index)
        page = render_page(spec, rng, config.page_width, config.page_height, config.logo_scale)
        corpus.append({"id": doc_id, "image": {"bytes": _png_bytes(page), "path": None}})
        query_id = f"q-{_doc_id(config, split + '-query', index)}"
        queries.append({"id": query_id, "text": make_query(spec, rng)})
        qrels.append({"query-id": query_id, "corpus-id": doc_id, "score": 1})
    # order by id: the position of a page in the corpus says nothing about which query it answers
    corpus.sort(key=lambda row: row["id"])
    queries.sort(key=lambda row: row["id"])
    return {"corpus": corpus, "queries": queries, "qrels": qrels}


def write_synthdocs(output_dir: str | Path, config: SynthDocsConfig = SynthDocsConfig()) -> Path:
    """Render SynthDocs into `output_dir` (atomically: a partial directory is never left behind)."""
    import datasets

    output_dir = Path(output_dir)
    image_feature = datasets.Image()
    with atomic_directory(output_dir) as tmp:
        logger.info("Rendering SynthDocs (seed %d, %d training pages) into %s", config.seed, config.n_train, output_dir)
        train = datasets.Dataset.from_list(generate_train_rows(config)).cast_column("image", image_feature)
        (tmp / "train").mkdir()
        train.to_parquet(str(tmp / "train" / "data-00000-of-00001.parquet"))
        counts = {"train": len(train)}
        for split in ("validation", "test"):
            tables = generate_retrieval_split(config, split)
            (tmp / split).mkdir()
            for name in SPLIT_FILES:
                table = datasets.Dataset.from_list(tables[name])
                if name == "corpus":
                    table = table.cast_column("image", image_feature)
                table.to_parquet(str(tmp / split / f"{name}.parquet"))
            counts[split] = {name: len(rows) for name, rows in tables.items()}
        manifest = {"name": "SynthDocs", "config": config.to_dict(), "counts": counts, "format_version": FORMAT_VERSION}
        (tmp / "synthdocs.json").write_text(json.dumps(manifest, indent=2))
    return output_dir


def read_manifest(path: str | Path) -> dict:
    return json.loads((Path(path) / "synthdocs.json").read_text())


def ensure_synthdocs(root: str | Path | None = None, domain: str | None = None) -> Path:
    """Path of the SynthDocs corpus (or one domain of it), rendering it on first use under `$COLINTERN_HOME` (safe
    under concurrent callers)."""
    config = SynthDocsConfig(domain=domain)
    name = "synthdocs" if domain is None else f"synthdocs-{domain}"
    path = Path(root or cache_dir()) / name
    expected = {"format_version": FORMAT_VERSION, "config": config.to_dict()}
    if manifest_matches(path, "synthdocs.json", expected):
        return path
    with file_lock(path.parent / f".{name}.lock"):
        if not manifest_matches(path, "synthdocs.json", expected):
            write_synthdocs(path, config)
    return path


DOMAIN_DATASETS = {f"{EMBEDDED_DATASET}-{domain}": domain for domain in DOMAINS}  # embedded:synthdocs-a, -b


def is_embedded_dataset(name: str) -> bool:
    return name == EMBEDDED_DATASET or name in DOMAIN_DATASETS


def resolve_dataset(name_or_path: str) -> str:
    """`embedded:synthdocs[-a|-b]` -> the local corpus or domain (rendered if needed); other names pass through."""
    if name_or_path == EMBEDDED_DATASET:
        return str(ensure_synthdocs())
    if name_or_path in DOMAIN_DATASETS:
        return str(ensure_synthdocs(domain=DOMAIN_DATASETS[name_or_path]))
    return name_or_path
