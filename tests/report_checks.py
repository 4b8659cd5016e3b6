"""Checks of a run report's HTML against its ``summary.json`` (shared by the report tests)."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser


class _Cells(HTMLParser):
    """Collects ``<td data-key=...>`` texts, ``<img src>`` values and every URL-bearing
    attribute."""

    def __init__(self):
        super().__init__()
        self.cells: dict[str, str] = {}
        self.images: list[str] = []
        self.urls: list[str] = []
        self._key = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for name in ("src", "href"):
            if name in a:
                self.urls.append(a[name])
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag == "td" and "data-key" in a:
            self._key = a["data-key"]
            self.cells[self._key] = ""

    def handle_data(self, data):
        if self._key is not None:
            self.cells[self._key] += data

    def handle_endtag(self, tag):
        if tag == "td":
            self._key = None


def _expected(summary: dict, key: str):
    parts = key.split("|")
    a = summary["ablation"]
    if parts[0] == "test":
        _, arm, sl, metric = parts
        row = next(r for r in a["test"] if r["arm"] == arm and r["slice"] == sl)
        return row.get(metric), ".4f"
    _, x, y, sl, metric, field = parts
    p = next(p for p in a["pairs"] if (p["a"], p["b"], p["slice"], p["metric"]) ==
             (x, y, sl, metric))
    return p[field], "+.4f"


def check_report(html: str, summary: dict) -> dict[str, int]:
    """Assert every ablation number equals the summary's (as printed), every image is a
    non-empty PNG embedded in the page, and nothing is loaded from a network. Returns counts."""
    p = _Cells()
    p.feed(html)
    counts = {"test": 0, "pair": 0, "images": 0}
    for key, text in p.cells.items():
        value, spec = _expected(summary, key)
        want = "–" if value is None else format(value, spec)
        assert text.strip() == want, (key, text, want)
        counts[key.split("|")[0]] += 1
    for src in p.images:
        assert src.startswith("data:image/png;base64,"), src[:60]
        png = base64.b64decode(src.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
        counts["images"] += 1
    assert all(u.startswith("data:") for u in p.urls), [u[:60] for u in p.urls]
    assert not re.search(r"(https?:)?//[\w.-]+\.\w+/", html.replace("http://www.w3.org", "")), \
        "the report references a network address"
    return counts
