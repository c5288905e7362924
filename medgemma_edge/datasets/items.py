"""A cohort as items: a folder (each image, DICOM file or study folder is one item) or a JSONL/CSV manifest.

Manifest fields, one item per JSONL line or CSV row:
- `id` (required, unique): names the item in the output;
- `images`: image or DICOM paths (JSONL: a list or one string; CSV: paths joined by `|`), relative to the
  manifest's folder unless absolute; `study`: a DICOM series folder or multi-frame file (instead of images);
- `question`: the text asked (or `--prompt` for every row that has none);
- `answer` (optional): the reference answer: a letter for multiple-choice items, else free text;
- `options` (optional): `{"A": "...", "B": "..."}` or a list (letters A, B, ... in order); CSV: JSON text, or
  option texts joined by `|`.
Other fields are ignored. Every row is checked before any model loads; bad rows are refused in one line that
names each one's line number. Files are not opened here: an unreadable image becomes that item's error line.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medgemma_edge.errors import UserError
from medgemma_edge.inputs.files import image_files

log = logging.getLogger(__name__)

MAX_ITEMS = 1_000_000
MAX_LINE_BYTES = 1 << 20
MAX_IMAGES = 64  # per item
MAX_ID_CHARS = 256
MAX_TEXT_CHARS = 1 << 16  # a question, an answer or an option
LETTERS = string.ascii_uppercase
MANIFEST_SUFFIXES = (".jsonl", ".csv")


@dataclass(frozen=True)
class Item:
    id: str
    images: tuple[str, ...] = ()  # file paths, in order
    study: str | None = None  # a DICOM series folder or multi-frame file (then no images)
    question: str | None = None  # None: the run's default prompt
    answer: str | None = None
    options: tuple[tuple[str, str], ...] | None = None  # (letter, text), letters A, B, ... in order
    line: int | None = None  # manifest line number, for messages

    def to_row(self) -> dict[str, Any]:
        """Plain JSON values (what travels to a Ray worker)."""
        row = asdict(self)
        row["images"] = list(self.images)
        row["options"] = None if self.options is None else [list(o) for o in self.options]
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Item":
        options = row.get("options")
        return cls(str(row["id"]), tuple(row.get("images") or ()), row.get("study"), row.get("question"),
                   row.get("answer"), None if options is None else tuple((str(a), str(b)) for a, b in options),
                   row.get("line"))

    @property
    def letters(self) -> tuple[str, ...]:
        return tuple(letter for letter, _ in self.options or ())


class BadRow(ValueError):
    pass


def read_items(source: Path | str) -> list[Item]:
    """The items of a folder or a manifest (.jsonl / .csv), in order; refused in one line when any row is bad."""
    path = Path(source)
    if path.is_dir():
        return folder_items(path)
    if not path.is_file():
        raise UserError(f"{path}: input not found; pass a folder of images/studies or a .jsonl/.csv manifest")
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise UserError(f"{path}: a manifest ends in .jsonl or .csv (one item per line or row); pass a folder "
                        f"of images instead, or rename the manifest")
    rows = _jsonl_rows(path) if suffix == ".jsonl" else _csv_rows(path)
    items: list[Item] = []
    bad: list[str] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        try:
            if isinstance(row, BadRow):
                raise row
            item = parse_row(row, path.parent, line)
            if item.id in seen:
                raise BadRow(f"id {item.id!r} is also on line {seen[item.id]}; ids must be unique")
            seen[item.id] = line
            items.append(item)
        except BadRow as exc:
            bad.append(f"line {line}: {exc}")
    if bad:
        lines = ", ".join(b.split(":", 1)[0].removeprefix("line ") for b in bad[:20]) + (", ..." if len(bad) > 20 else "")
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise UserError(f"{path}: {len(bad)} bad row(s) (lines {lines}): {shown}; fix them and run again "
                        f"(nothing was run)")
    if not items:
        raise UserError(f"{path}: the manifest holds no items; add one line (or CSV row) per item")
    return items


def folder_items(folder: Path) -> list[Item]:
    """Each image or DICOM file, and each sub-folder (a study), is one item named by its file or folder name."""
    images = image_files(folder)
    studies = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not images and not studies:
        raise UserError(f"{folder}: no images, DICOM files or study folders here; pass the folder that holds them")
    if len(images) + len(studies) > MAX_ITEMS:
        raise UserError(f"{folder}: more than {MAX_ITEMS:,} items; split the cohort into several folders")
    items = [Item(p.name, images=(str(p),)) for p in images] + [Item(p.name, study=str(p)) for p in studies]
    return sorted(items, key=lambda i: i.id)


def _jsonl_rows(path: Path) -> list[tuple[int, Any]]:
    rows: list[tuple[int, Any]] = []
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
                if len(raw) > MAX_LINE_BYTES:
                    raise UserError(f"{path}: line {number} is longer than {MAX_LINE_BYTES:,} bytes; one item per "
                                    f"line, images by path (not inline)")
                if not raw.strip():
                    continue
                if len(rows) >= MAX_ITEMS:
                    raise UserError(f"{path}: more than {MAX_ITEMS:,} items; split the manifest")
                try:
                    rows.append((number, json.loads(raw.decode("utf-8"))))
                except UnicodeDecodeError:
                    rows.append((number, BadRow("not UTF-8 text; save the manifest as UTF-8")))
                except (json.JSONDecodeError, RecursionError) as exc:
                    rows.append((number, BadRow(f"not JSON ({exc.msg if hasattr(exc, 'msg') else exc})")))
    except OSError as exc:
        raise UserError(f"{path}: cannot read the manifest ({exc.strerror}); check the file") from None
    return rows


def _csv_rows(path: Path) -> list[tuple[int, Any]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); save the CSV as UTF-8") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the manifest ({exc.strerror}); check the file") from None
    csv.field_size_limit(MAX_LINE_BYTES)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader, [])]
    except csv.Error as exc:
        raise UserError(f"{path}: line 1: not a CSV header ({exc}); the first row names the columns") from None
    if "id" not in header:
        raise UserError(f"{path}: line 1: the CSV header has no `id` column; name the columns id, images, "
                        f"question (and answer, options, study)")
    rows: list[tuple[int, Any]] = []
    while True:
        start = reader.line_num + 1  # a quoted cell may span lines: a row is named by its first line
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            rows.append((start, BadRow(f"not CSV ({exc})")))
            break
        if not any(c.strip() for c in cells):
            continue
        if len(rows) >= MAX_ITEMS:
            raise UserError(f"{path}: more than {MAX_ITEMS:,} items; split the manifest")
        if len(cells) > len(header):
            rows.append((start, BadRow(f"{len(cells)} cells, but the header names {len(header)} columns")))
            continue
        row = {k: v for k, v in zip(header, cells) if v != ""}
        rows.append((start, _csv_fields(row)))
    return rows


def _csv_fields(cells: dict[str, str]) -> dict[str, Any] | BadRow:
    out: dict[str, Any] = dict(cells)
    if "images" in out:
        out["images"] = [p.strip() for p in out["images"].split("|") if p.strip()]
    if "options" in out:
        text = out["options"].strip()
        if text[:1] in "[{":
            try:
                out["options"] = json.loads(text)
            except json.JSONDecodeError as exc:
                return BadRow(f"options: not JSON ({exc.msg}); give a JSON list/object or texts joined by |")
        else:
            out["options"] = [o.strip() for o in text.split("|")]
    return out


def parse_row(row: Any, base: Path, line: int) -> Item:
    """One manifest row to an Item; BadRow names the field and the fix."""
    if not isinstance(row, dict):
        raise BadRow(f"a {type(row).__name__}, not an object; write one JSON object per line")
    item_id = row.get("id")
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or not str(item_id).strip():
        raise BadRow("no `id`; give every item a unique id (text or a number)")
    item_id = str(item_id).strip()
    if len(item_id) > MAX_ID_CHARS or any(c in item_id for c in "\r\n\x00"):
        raise BadRow(f"id is longer than {MAX_ID_CHARS} characters or holds a line break; shorten it")
    images = row.get("images", [])
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) and p.strip() for p in images):
        raise BadRow("`images` must be a list of file paths (or one path)")
    if len(images) > MAX_IMAGES:
        raise BadRow(f"{len(images)} images, at most {MAX_IMAGES} per item")
    study = row.get("study")
    if study is not None and (not isinstance(study, str) or not study.strip()):
        raise BadRow("`study` must be the path of a DICOM series folder or multi-frame file")
    if study is not None and images:
        raise BadRow("give `images` or `study`, not both (a study is one input of its own)")
    question = _text(row, "question")
    answer = _text(row, "answer")
    options = _options(row.get("options"))
    if options is not None and answer is not None and answer.strip().upper() not in dict(options):
        raise BadRow(f"answer {answer!r} is not one of the option letters {', '.join(dict(options))}")
    if options is not None and answer is not None:
        answer = answer.strip().upper()

    def resolve(p: str) -> str:
        q = Path(p.strip()).expanduser()
        return str(q if q.is_absolute() else base / q)

    return Item(item_id, tuple(resolve(p) for p in images), resolve(study) if study else None, question, answer,
                options, line)


def _text(row: dict[str, Any], name: str) -> str | None:
    value = row.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadRow(f"`{name}` must be text")
    value = str(value)
    if len(value) > MAX_TEXT_CHARS:
        raise BadRow(f"`{name}` is longer than {MAX_TEXT_CHARS:,} characters")
    return value


def _options(value: Any) -> tuple[tuple[str, str], ...] | None:
    if value is None:
        return None
    if isinstance(value, list):
        pairs = list(zip(LETTERS, value))
        if len(value) > len(LETTERS):
            raise BadRow(f"{len(value)} options, at most {len(LETTERS)}")
    elif isinstance(value, dict):
        pairs = [(str(k).strip().upper(), v) for k, v in value.items()]
        letters = [k for k, _ in pairs]
        if letters != list(LETTERS[:len(letters)]):
            raise BadRow(f"option letters {', '.join(letters)}: use A, B, C, ... in order")
    else:
        raise BadRow("`options` must be an object {\"A\": text, ...} or a list of texts")
    if len(pairs) < 2:
        raise BadRow("a multiple-choice item needs at least two options")
    out = []
    for letter, text in pairs:
        if not isinstance(text, (str, int, float)) or isinstance(text, bool) or not str(text).strip():
            raise BadRow(f"option {letter} is empty or not text")
        if len(str(text)) > MAX_TEXT_CHARS:
            raise BadRow(f"option {letter} is longer than {MAX_TEXT_CHARS:,} characters")
        out.append((letter, str(text).strip()))
    return tuple(out)
