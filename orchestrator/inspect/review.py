"""What a reviewer looks at: contact sheets (PNG, one row per suspect with the person's 7 pictures) and one
``review.html`` showing every sheet and its rows in rank order.

Why pictures of the whole person: a gender, age or swap finding is judged by looking at all of a person's
photos side by side, and an image-level finding by comparing it with the person's others. The page is
self-contained (no scripts, no outside resources, every text escaped) and links the sheets relatively, so
the folder can be zipped, copied or opened from the MLflow artifact view as it is.

Everything is rendered in memory first; the writer (``stage``) writes each file atomically, so an error
while rendering leaves nothing behind.
"""

from __future__ import annotations

import html
import io
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from trainers.data import STEM_ORDER
from trainers.labels import MASK_NAMES

THUMB = (84, 112)  # (width, height) of one picture on a sheet (3:4, like the competition's photos)
ROWS_PER_SHEET = 10
TEXT_WIDTH = 300
PAD = 6
CAPTION = 36  # room under each thumbnail for its three caption lines
LINE = 12  # pixels per text line (PIL's default font)
TEXT_CHARS = 46  # characters per line of the text panel
SUSPECT = (220, 30, 30)
SHEETS_DIR = "sheets"
_SHEET_COLUMNS = ("id", "kind", "given", "suggested", "confidence", "score", "drafted", "image")


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _thumbnail(path: Path) -> Image.Image:
    """The picture shrunk to fit THUMB on a grey ground; an unreadable file shows as a crossed box."""
    canvas = Image.new("RGB", THUMB, (200, 200, 200))
    try:
        with Image.open(path) as image:
            image.draft("RGB", THUMB)
            picture = image.convert("RGB")
        picture.thumbnail(THUMB, Image.Resampling.BILINEAR)
        canvas.paste(picture, ((THUMB[0] - picture.width) // 2, (THUMB[1] - picture.height) // 2))
    except OSError:
        draw = ImageDraw.Draw(canvas)
        draw.line((0, 0, *THUMB), fill=SUSPECT)
        draw.line((0, THUMB[1], THUMB[0], 0), fill=SUSPECT)
    return canvas


def _suspects(row: pd.Series, stems: dict[str, str]) -> dict[str, str]:
    """stem -> what the finding suggests for that picture; every picture for person-level findings."""
    if row["kind"] == "mask":
        stem = next((s for s, rel in stems.items() if rel == row["image"]), "")
        return {stem: row["suggested"]}
    if row["kind"] == "mask_swap":
        suggested = dict(part.split(": ", 1) for part in str(row["suggested"]).split(", "))
        return suggested
    return {}


def _text_lines(rank: int, row: pd.Series, room: int) -> list[str]:
    """The finding as at most ``room`` wrapped lines (the confidence line is kept last)."""
    lines = [
        f"#{rank}  id {row['id']}  [{row['kind']}]" + _standing(row),
        *textwrap.wrap(f"given: {row['given']}", TEXT_CHARS, subsequent_indent="  "),
        *textwrap.wrap(f"suggested: {row['suggested']}", TEXT_CHARS, subsequent_indent="  "),
        *textwrap.wrap(f"overlay: {row['fix'] or '(none; fix by hand)'}", TEXT_CHARS, subsequent_indent="  "),
    ]
    return [*lines[: room - 1], f"confidence {row['confidence']:.2f}   score {row['score']:.2f}"]


def _standing(row: pd.Series) -> str:
    """Whether the finding is in the draft, only listed for review, or below the default cut."""
    if row.get("drafted", False):
        return "  drafted"
    return "  (review only)" if row["flagged"] else "  (below the cut)"


def render_row(rank: int, row: pd.Series, person: pd.DataFrame, data_root: Path) -> Image.Image:
    """One sheet row: the finding as text, then the person's pictures with their given mask state;
    the pictures the finding is about are framed red with the suggested state."""
    font = _font()
    width = TEXT_WIDTH + len(STEM_ORDER) * (THUMB[0] + PAD) + PAD
    height = THUMB[1] + CAPTION + 2 * PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(_text_lines(rank, row, (height - 2 * PAD) // LINE)):
        draw.text((PAD, PAD + LINE * i), line, fill="black", font=font)
    stems = {str(r["stem"]): str(r["rel_path"]) for _, r in person.iterrows()}
    masks = {str(r["stem"]): int(r["mask"]) for _, r in person.iterrows()}
    suspects = _suspects(row, stems)
    for i, stem in enumerate(STEM_ORDER):
        if stem not in stems:
            continue
        x = TEXT_WIDTH + PAD + i * (THUMB[0] + PAD)
        canvas.paste(_thumbnail(data_root / stems[stem]), (x, PAD))
        colour = SUSPECT if stem in suspects else "black"
        if stem in suspects:
            draw.rectangle((x - 2, PAD - 2, x + THUMB[0] + 1, PAD + THUMB[1] + 1), outline=SUSPECT, width=2)
        top = PAD + THUMB[1] + 2
        draw.text((x, top), stem, fill="black", font=font)
        draw.text((x, top + LINE), MASK_NAMES[masks[stem]], fill=colour, font=font)
        if suspects.get(stem):
            draw.text((x, top + 2 * LINE), f"-> {suspects[stem]}", fill=colour, font=font)
    return canvas


def render_sheets(
    rows: pd.DataFrame,
    table: pd.DataFrame,
    data_root: Path,
    rows_per_sheet: int = ROWS_PER_SHEET,
    progress: Callable[[int, int], None] | None = None,
) -> list[bytes]:
    """The contact sheets as PNG bytes, ``rows_per_sheet`` findings each, in the order of ``rows``."""
    by_person = {key: group for key, group in table.groupby("person_id", sort=False)}
    sheets = []
    for start in range(0, len(rows), rows_per_sheet):
        chunk = rows.iloc[start : start + rows_per_sheet]
        images = [
            render_row(start + offset + 1, row, by_person[row["id"]], data_root)
            for offset, (_, row) in enumerate(chunk.iterrows())
        ]
        sheet = Image.new("RGB", (images[0].width, sum(image.height for image in images)), "white")
        y = 0
        for image in images:
            sheet.paste(image, (0, y))
            y += image.height
        buffer = io.BytesIO()
        sheet.save(buffer, format="PNG", optimize=False)
        sheets.append(buffer.getvalue())
        if progress is not None:
            progress(len(sheets), -(-len(rows) // rows_per_sheet))
    return sheets


def sheet_name(index: int) -> str:
    return f"{SHEETS_DIR}/sheet_{index + 1:03d}.png"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def review_page(
    rows: pd.DataFrame,
    n_sheets: int,
    summary_lines: Sequence[str],
    total: int,
    rows_per_sheet: int = ROWS_PER_SHEET,
) -> str:
    """The review page: the summary, then each sheet with a table of its rows, in rank order."""
    esc = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8"><title>foldtune label issues</title>',
        "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{max-width:100%;"
        "border:1px solid #ccc}.below{color:#777}</style></head><body>",
        "<h1>Label issues</h1>",
        "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in summary_lines) + "</ul>",
        f"<p>{len(rows)} of {total} findings are shown below, drafted ones first, each part by the "
        "strength of its evidence (score); all of them are in "
        '<a href="label_issues.csv">label_issues.csv</a>, the drafted fixes in '
        '<a href="relabel_draft.csv">relabel_draft.csv</a>, the measured precision and recall of the '
        'judge at every cut in <a href="judge.csv">judge.csv</a>.</p>',
    ]
    for index in range(n_sheets):
        chunk = rows.iloc[index * rows_per_sheet : (index + 1) * rows_per_sheet]
        first = index * rows_per_sheet + 1
        name = sheet_name(index)
        parts.append(
            f'<h2 id="sheet{index + 1}">Sheet {index + 1}: ranks {first}-{first + len(chunk) - 1}</h2>'
        )
        parts.append("<table><tr><th>rank</th>" + "".join(f"<th>{c}</th>" for c in _SHEET_COLUMNS) + "</tr>")
        for offset, (_, row) in enumerate(chunk.iterrows()):
            css = "" if row["flagged"] or row.get("drafted", False) else ' class="below"'
            cells = "".join(f"<td>{_cell(row.get(c, ''))}</td>" for c in _SHEET_COLUMNS)
            parts.append(f"<tr{css}><td>{first + offset}</td>{cells}</tr>")
        parts.append("</table>")
        parts.append(f'<a href="{esc(name)}"><img src="{esc(name)}" alt="contact sheet {index + 1}"></a>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
