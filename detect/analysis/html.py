"""A self-contained HTML page: inline CSS, no script, images beside it under relative paths.

The page must open from disk in any browser without network access, so it has no
external JS or CSS, and every image it shows is a file this writer saved (or was
told about) inside the report folder. :meth:`HtmlReport.write` refuses to write a
page that references anything else.
"""

from __future__ import annotations

import html
import io
import math
import re
from pathlib import Path

import numpy as np
from PIL import Image

from detect.utils.io import atomic_write_bytes, atomic_write_text

CSS = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1300px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; } h3 { margin-top: 1.4em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f2f2f2; }
figure { display: inline-block; margin: 0.4em; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; max-width: 480px; }
.note { color: #666; font-size: 0.9em; }
nav a { margin-right: 1em; }
.legend span { display: inline-block; padding: 1px 6px; margin: 2px; border-radius: 3px; font-size: 0.9em; }
td.heat { text-align: center; }
"""

_REF = re.compile(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", re.IGNORECASE)


def _cell(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return html.escape(str(value))


class HtmlReport:
    """Collects sections and the files they show, then writes ``index.html``.

    Args:
        out_dir: the report folder (created when missing).
        title: page title.
    """

    def __init__(self, out_dir: str | Path, title: str) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.parts: list[str] = []
        self.sections: list[tuple[str, str]] = []
        self.files: set[str] = set()

    # ------------------------------------------------------------------ files
    def path(self, rel: str) -> Path:
        """Absolute path of a report file, registered as written by this report."""
        if rel.startswith(("/", "\\")) or ".." in Path(rel).parts or ":" in rel:
            raise ValueError(f"report files must be relative paths inside the report folder, got {rel!r}")
        self.files.add(rel)
        target = self.out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def save_image(self, rel: str, image: np.ndarray, *, quality: int = 88) -> str:
        """Save an (H, W, 3) uint8 RGB array as JPEG or PNG (by extension); returns ``rel``."""
        buffer = io.BytesIO()
        kind = "PNG" if rel.lower().endswith(".png") else "JPEG"
        Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format=kind, quality=quality)
        atomic_write_bytes(self.path(rel), buffer.getvalue())
        return rel

    # ------------------------------------------------------------------ content
    def section(self, title: str) -> None:
        anchor = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or f"s{len(self.sections)}"
        self.sections.append((anchor, title))
        self.parts.append(f'<h2 id="{anchor}">{html.escape(title)}</h2>')

    def heading(self, text: str) -> None:
        self.parts.append(f"<h3>{html.escape(text)}</h3>")

    def text(self, text: str, *, note: bool = False) -> None:
        self.parts.append(f'<p{" class=note" if note else ""}>{html.escape(text)}</p>')

    def table(self, header: list[str], rows: list[list]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def figure(self, rel: str, caption: str = "", *, width: int | None = None, link: str | None = None) -> None:
        """An image (a file this report wrote) that opens ``link`` (default: itself) when clicked."""
        link = rel if link is None else link
        for ref in (rel, link):
            if ref not in self.files:
                raise ValueError(f"figure {ref!r} was not written by this report")
        size = f' width="{int(width)}"' if width else ""
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.parts.append(f'<figure><a href="{html.escape(link)}"><img src="{html.escape(rel)}" '
                          f'alt="{html.escape(caption or rel)}"{size}></a>{cap}</figure>')

    def legend(self, entries) -> None:
        """Class tags in their drawing colours (:class:`detect.visualize.LegendEntry` items)."""
        tags = "".join(f'<span style="background:{e.hex};color:{e.text_hex}">{html.escape(e.name)}</span>'
                       for e in entries)
        self.parts.append(f'<p class="legend">{tags}</p>')

    def matrix(self, corner: str, rows: list[str], columns: list[str], values: np.ndarray) -> None:
        """A table of counts, each cell shaded by its share of the largest count."""
        top = max(1, int(np.max(values))) if np.size(values) else 1
        head = "".join(f"<th>{html.escape(h)}</th>" for h in (corner, *columns))
        body = []
        for name, row in zip(rows, np.asarray(values)):
            cells = "".join(f'<td class="heat" style="background:rgba(52,101,164,{0.55 * v / top:.2f})">{int(v)}</td>'
                            for v in row)
            body.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")

    # ------------------------------------------------------------------ page
    def render(self) -> str:
        nav = " ".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in self.sections)
        return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                f"<title>{html.escape(self.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
                f"<h1>{html.escape(self.title)}</h1>\n<nav>{nav}</nav>\n" + "\n".join(self.parts)
                + "\n</body>\n</html>\n")

    def write(self) -> Path:
        """Write ``index.html``; every ``src``/``href`` must be an anchor or a file this report wrote."""
        page = self.render()
        bad = [ref for ref in referenced_files(page) if ref not in self.files]
        if bad:
            raise ValueError(f"the report references files it did not write: {bad[:5]}")
        path = self.out / "index.html"
        atomic_write_text(path, page)
        return path


def referenced_files(page: str) -> list[str]:
    """Every ``src``/``href`` of a page except in-page anchors, unescaped."""
    return [html.unescape(ref) for ref in _REF.findall(page) if not ref.startswith("#")]
