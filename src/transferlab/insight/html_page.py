"""Self-contained HTML pages (audit.html, a run's report.html): inline CSS, images as data URIs, nothing fetched.

A page can be mailed, attached to a ticket or opened from a laptop without the run folder beside it.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional

from PIL import Image

from transferlab.data.images import load_rgb

STYLE = """body{font-family:system-ui,sans-serif;margin:2rem;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}td,th{border:1px solid #ddd;padding:.3rem .5rem;text-align:left;vertical-align:middle}
th{background:#f4f4f4}tr.warn td{background:#fde8e8}.pictures{display:flex;flex-wrap:wrap;gap:1rem}
figure{margin:0}figure img{max-width:560px;border:1px solid #ddd}figcaption{font-size:.85rem;color:#555}
img.thumb{height:96px;border:1px solid #ddd}.summary li{margin:.2rem 0}code{background:#f4f4f4;padding:0 .2rem}"""


def escape(value: object) -> str:
    return html.escape(str(value))


def png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def thumbnail_uri(path: Path, size: int = 128) -> Optional[str]:
    """A small JPEG of an image file as a data URI; None when the file cannot be read (it is then named, not shown)."""
    try:
        image = load_rgb(path)
    except Exception:  # noqa: BLE001 - an unreadable file gets no thumbnail, the page still lists it
        return None
    image.thumbnail((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def thumb(path: Path, size: int = 128) -> str:
    uri = thumbnail_uri(path, size)
    return f'<img class="thumb" src="{uri}" alt="{escape(Path(path).name)}">' if uri else "(unreadable)"


def table(head: Sequence[str], rows: Iterable[Sequence[str]], classes: Optional[Sequence[str]] = None) -> str:
    """`rows` hold HTML already (escape text cells with `escape`)."""
    header = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join(
        f"<tr{f' class={chr(34)}{classes[i]}{chr(34)}' if classes and classes[i] else ''}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
        for i, row in enumerate(rows)
    )
    return f"<table><tr>{header}</tr>{body}</table>"


def figure(path: Path, caption: str) -> str:
    return f'<figure><img src="{png_uri(path)}" alt="{escape(caption)}"><figcaption>{escape(caption)}</figcaption></figure>'


def page(title: str, body: Sequence[str]) -> str:
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title><style>{STYLE}</style></head>'
        f"<body><h1>{escape(title)}</h1>{''.join(body)}</body></html>"
    )
