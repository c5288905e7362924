"""Images a client sends over the network, checked exactly like a file handed to `run`.

- a `data:` URL (PNG, JPEG, TIFF, or DICOM as `data:application/dicom;base64,...`): its bytes go into an
  anonymous memory file (Linux `memfd`; elsewhere a private temporary file, removed at once), so patient
  pixels never land on disk, and the file path goes through the same readers as `run`: the pixel bound
  from the header before any decoding, Pillow's bomb checks, EXIF orientation, DICOM rendering;
- a `file://` URL: only inside the folders the server was started with (`--allow-dir`), after every
  symbolic link is resolved;
- anything else (http, https, ftp...) is refused: nothing is ever downloaded.

Error messages name the image by its place in the request (never the memory file), and DICOM tags
never reach a message or a log line (inputs/dicom.py's rules).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import tempfile
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from medgemma_edge.errors import UserError
from medgemma_edge.fsutil import regular_file_size, sha256_file
from medgemma_edge.inputs.dicom import is_dicom, render
from medgemma_edge.inputs.images import load_image, to_rgb
from medgemma_edge.inputs.limits import check_pixels

# media types a data: URL may declare, and what the bytes must then be
MEDIA_TYPES = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "image/tiff": "tiff",
               "application/dicom": "dicom"}
ACCEPTED = "PNG, JPEG, TIFF or DICOM (data:application/dicom;base64,...)"


@dataclass(frozen=True)
class Upload:
    """A decoded, upright RGB image and the sha256 of the bytes as sent (what `run`'s audit line hashes)."""

    image: Image.Image
    sha256: str
    kind: str  # "png" | "jpeg" | "tiff" | "dicom"


def sniff(data: bytes) -> str | None:
    """The format the bytes themselves say they are (magic numbers), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[128:132] == b"DICM":  # PS3.10 7.1: a 128-byte preamble, then the magic
        return "dicom"
    return None


def data_url_bytes(url: str, max_bytes: int, name: str) -> tuple[str, bytes]:
    """(kind, bytes) of a base64 `data:` URL, bounded before decoding; one-line UserError otherwise."""
    if not url.startswith("data:"):
        raise UserError(f"{name}: not a data: URL; send the image as data:image/png;base64,...")
    header, comma, payload = url[5:].partition(",")
    params = [p.strip().lower() for p in header.split(";")]
    mime = params[0]
    if not comma or "base64" not in params[1:]:
        raise UserError(f"{name}: the data: URL is not base64 (expected data:{mime or 'image/png'};base64,...); "
                        f"encode the file in base64")
    kind = MEDIA_TYPES.get(mime)
    if kind is None:
        raise UserError(f"{name}: images of type {mime or '(none)'} are not accepted; send {ACCEPTED}")
    if len(payload) // 4 * 3 > max_bytes:  # bounded before the decoded copy is allocated
        raise UserError(f"{name}: the image is about {len(payload) // 4 * 3:,} bytes, more than the "
                        f"{max_bytes:,} this server accepts; send a smaller image")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{name}: the data: URL's base64 is corrupt; encode the file again") from None
    return kind, data


def upload_from_bytes(data: bytes, name: str, kind: str, frame: int | None = None) -> Upload:
    """Decode uploaded bytes of the declared `kind` as `run` decodes a file; DICOM at `frame` (default middle)."""
    if not data:
        raise UserError(f"{name}: the image is empty (0 bytes); send the file's content")
    found = sniff(data)
    if kind != "dicom" and found != kind:  # DICOM without its preamble has no magic, and is still DICOM
        raise UserError(f"{name}: declared as {kind} but the bytes are {found or 'not a known image format'}; "
                        f"send {ACCEPTED} with the matching data: type")
    with _memory_file(data) as path:
        try:
            img = _decode(path, kind == "dicom", frame)
        except UserError as exc:  # name the image by its place in the request, never the memory file
            raise UserError(str(exc).replace(str(path), name)) from None
    return Upload(img, hashlib.sha256(data).hexdigest(), kind)


def upload_from_file_url(url: str, allowed: Sequence[Path], name: str, frame: int | None = None) -> Upload:
    """A `file://` URL, only when it resolves (links followed) inside one of the `allowed` folders."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
        raise UserError(f"{name}: only file:///ABSOLUTE/PATH URLs name files on this machine; send the image as a "
                        f"data: URL instead")
    if not allowed:
        raise UserError(f"{name}: file:// URLs are refused (the server was started without --allow-dir); send the "
                        f"image as a data: URL, or restart the server with --allow-dir FOLDER")
    path = Path(urllib.parse.unquote(parts.path))
    real = path.resolve()
    if not path.is_absolute() or not any(real.is_relative_to(Path(d).resolve()) for d in allowed):
        # the same answer whether or not the file exists: the refusal is no oracle for the rest of the disk
        raise UserError(f"{name}: {path} is outside the folders this server may read (--allow-dir); "
                        f"move the file there or send it as a data: URL")
    if regular_file_size(real) is None:
        raise UserError(f"{name}: {path} is not a readable image file inside --allow-dir; check the path")
    digest = sha256_file(real)  # before decoding: the audit names the bytes that were read
    dicom = is_dicom(real)
    img = _decode(real, dicom, frame)
    with real.open("rb") as f:
        head = f.read(132)
    return Upload(img, digest, "dicom" if dicom else (sniff(head) or "image"))


def image_url(url: str, name: str, max_bytes: int, allowed: Sequence[Path] = (), frame: int | None = None) -> Upload:
    """Any image URL a client may send: data: and (inside `allowed`) file://; every other scheme refused."""
    scheme = url.split(":", 1)[0].lower() if ":" in url[:16] else ""
    if scheme == "data":
        kind, data = data_url_bytes(url, max_bytes, name)
        return upload_from_bytes(data, name, kind, frame)
    if scheme == "file":
        return upload_from_file_url(url, allowed, name, frame)
    if scheme in ("http", "https", "ftp", "ftps"):
        raise UserError(f"{name}: {scheme}:// image URLs are refused: this server never downloads anything; "
                        f"send the image as a data: URL (base64)")
    raise UserError(f"{name}: unsupported image URL (scheme {scheme or '(none)'}); send the image as a data: URL")


def _decode(path: Path, dicom: bool, frame: int | None) -> Image.Image:
    """RGB, upright: DICOM rendered at `frame`, other images decoded after their header passed the bound."""
    if frame is not None and not dicom:
        raise UserError(f"{path}: a frame was asked for, and this image is not DICOM; drop the frame")
    img = render(path, frame) if dicom else load_image(path)
    check_pixels(path, *img.size)
    return to_rgb(img)


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[Path]:
    """A path to `data` that lives in memory only (Linux memfd), else in a private temporary file."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("medgemma-upload", os.MFD_CLOEXEC)
        try:
            _write_all(fd, data)
            yield Path(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    folder = tempfile.mkdtemp(prefix="medgemma-upload-")  # mode 0700: private to this user
    path = Path(folder) / "upload"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        yield path
    finally:
        path.unlink(missing_ok=True)
        os.rmdir(folder)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
