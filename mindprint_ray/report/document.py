"""A tiny document model rendered twice: Markdown (images linked) and self-contained HTML (images embedded)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

CSS = """body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right;vertical-align:top}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}code{background:#f4f4f4;padding:0 .2em}"""


@dataclass
class Document:
    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", level, text))

    def para(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: list[str]) -> None:
        self.blocks.append(("ul", items))

    def table(self, headers: list[str], rows: list[list]) -> None:
        self.blocks.append(("table", headers, [[str(c) for c in r] for r in rows]))

    def image(self, file: Path, alt: str) -> None:
        self.blocks.append(("img", file, alt))

    # ---- rendering ---------------------------------------------------------------------------------
    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for b in self.blocks:
            out += _md_block(b) + [""]
        return "\n".join(out)

    def html(self) -> str:
        body = "\n".join(_html_block(b) for b in self.blocks)
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}'
            f"</title><style>{CSS}</style></head><body>\n<h1>{html.escape(self.title)}</h1>\n{body}\n</body></html>\n"
        )


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_block(b: tuple) -> list[str]:
    kind = b[0]
    if kind == "h":
        return ["#" * b[1] + " " + b[2]]
    if kind == "p":
        return [b[1]]
    if kind == "ul":
        return [f"- {item}" for item in b[1]]
    if kind == "table":
        head = "| " + " | ".join(map(_md_cell, b[1])) + " |"
        rule = "|" + "|".join("---:" if right else "---" for right in _numeric_columns(b)) + "|"
        return [head, rule] + ["| " + " | ".join(map(_md_cell, r)) + " |" for r in b[2]]
    return [f"![{b[2]}]({b[1].name})"]


def _numeric_columns(b: tuple) -> list[bool]:
    """Right-align a column (except the first) when every cell looks like a number, amount or duration."""
    rows = b[2]
    return [
        i > 0 and all(bool(r[i]) and (r[i][0].isdigit() or r[i][0] in "$+-") for r in rows) for i in range(len(b[1]))
    ]


def _inline(text: str) -> str:
    """Escape, then render `code` spans."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html_block(b: tuple) -> str:
    kind = b[0]
    if kind == "h":
        return f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>"
    if kind == "p":
        return f"<p>{_inline(b[1])}</p>"
    if kind == "ul":
        return "<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b[1]) + "</ul>"
    if kind == "table":
        align = ["" if right else ' style="text-align:left"' for right in _numeric_columns(b)]
        head = "".join(f"<th{a}>{_inline(h)}</th>" for h, a in zip(b[1], align))
        rows = "".join("<tr>" + "".join(f"<td{a}>{_inline(c)}</td>" for c, a in zip(r, align)) + "</tr>" for r in b[2])
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    data = base64.b64encode(Path(b[1]).read_bytes()).decode("ascii")
    return f'<p><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}"></p>'
