"""The report's two renderings: Markdown (report.md) and one self-contained HTML page (report.html,
its plots inlined), from the same sections."""

from __future__ import annotations

import base64
import dataclasses
import html
import re
from pathlib import Path

import pandas as pd

from flowbench.atomic import atomic_write


@dataclasses.dataclass
class Section:
    title: str
    paragraphs: list[str] = dataclasses.field(default_factory=list)
    table: pd.DataFrame | None = None
    bullets: list[str] = dataclasses.field(default_factory=list)
    plots: list[Path] = dataclasses.field(default_factory=list)  # shown in the section, not under Plots


def markdown_page(name, intro, sections, plots, figures, out: Path) -> str:
    lines = [f"# flowbench report: {name}", ""]
    for paragraph in intro:
        lines += [paragraph, ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        for paragraph in s.paragraphs:
            lines += [paragraph, ""]
        if s.table is not None:
            lines += [s.table.to_markdown(index=False, disable_numparse=True) if len(s.table) else "(none)", ""]
        lines += [f"![{p.stem}]({p.relative_to(out)})" for p in s.plots] + ([""] if s.plots else [])
        if s.bullets:
            lines += [f"- {b}" for b in s.bullets] + [""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(out)})" for p in plots] + [""]
    if figures:
        lines += ["## Samples (temperature 0.7) and reconstructions (top: data, bottom: decode(encode(x)))", ""]
        for caption, samples, recon in figures:
            lines += [f"**{caption}**", "", f"![samples]({samples.relative_to(out)})"]
            lines += [f"![reconstructions]({recon.relative_to(out)})"] if recon else []
            lines.append("")
    return "\n".join(lines)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _inline(text: str) -> str:
    """Markdown's **bold** and ../x/report.md links as HTML; everything else escaped."""
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))
    return re.sub(r"(\.\./[\w-]+/)report\.md", r'<a href="\1report.html">\1report.html</a>', text)


def html_page(name, intro, sections, plots, figures) -> str:
    body = [f"<h1>flowbench report: {html.escape(name)}</h1>"] + [f"<p>{_inline(p)}</p>" for p in intro]
    for s in sections:
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        body += [f"<p>{_inline(p)}</p>" for p in s.paragraphs]
        if s.table is not None:
            body.append(s.table.to_html(index=False, border=0, na_rep="—") if len(s.table) else "<p>(none)</p>")
        if s.plots:
            body += ['<div class="row">'] + [_img(p, p.stem) for p in s.plots] + ["</div>"]
        if s.bullets:
            body.append("<ul>" + "".join(f"<li>{html.escape(b)}</li>" for b in s.bullets) + "</ul>")
    body += ["<h2>Plots</h2>", '<div class="row">'] + [_img(p, p.stem) for p in plots] + ["</div>"]
    if figures:
        body.append("<h2>Samples (temperature 0.7) and reconstructions</h2>")
        for caption, samples, recon in figures:
            body += [
                f"<figure>{_img(samples, 'samples')}"
                + (_img(recon, "reconstructions") if recon else "")
                + f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            ]
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{padding:4px 10px;border-bottom:1px solid #ddd;"
        "text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%;margin:4px}"
        ".row img{width:48%}figure{display:inline-block;margin:8px;vertical-align:top}"
        "figcaption{font-size:90%;color:#555}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>flowbench: {html.escape(name)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>"
    )


def write_text_atomic(path: Path, text: str) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return path
