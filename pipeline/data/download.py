"""Downloading a file: streamed to a temporary name beside the target, checked, then renamed.

Nothing ever sits under the final name unless it arrived whole and passed the check.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import DataError

__all__ = ["download", "is_url", "url_basename"]

#: the most bytes a download may bring (CIFAR-10's python archive is 163 MB): a server that
#: announces or sends more is cut off, with or without an md5 to check
MAX_DOWNLOAD_BYTES = 1 << 30

#: progress(stage, done, total): total may be 0 when unknown
Progress = Callable[[str, int, int], None]

_SCHEMES = ("http", "https", "ftp", "file")


def is_url(text: str) -> bool:
    return urllib.parse.urlsplit(str(text)).scheme.lower() in _SCHEMES


def url_basename(url: str) -> str:
    name = os.path.basename(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    return name or "download"


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    md5: str | None = None,
    check: Callable[[Path, str], None] | None = None,
    progress: Progress | None = None,
    timeout: float = 60.0,
    hint: str = "",
    max_bytes: int = MAX_DOWNLOAD_BYTES,
) -> str:
    """Download ``url`` to ``dest``; return the file's md5 (hex).

    The bytes go to a temporary file in ``dest``'s folder; if ``md5`` is given and differs,
    or ``check(temp_path, md5)`` raises, the temporary file is removed and nothing is left
    under ``dest``. ``progress("download", bytes_done, bytes_total)`` is called as it goes.
    ``hint`` (what to do without network) ends the message of a failed, cut or short download.
    More than ``max_bytes`` (announced or received) stops it with nothing saved.
    """
    more = f"; {hint}" if hint else ""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.download-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    digest = hashlib.md5()
    try:
        try:
            resp = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - scheme checked by caller
        except urllib.error.HTTPError as exc:
            raise DataError(
                f"{url}: download failed (HTTP {exc.code} {exc.reason}){more}"
            ) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise DataError(f"{url}: download failed ({reason}){more}") from None
        with resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            if total > max_bytes:
                raise DataError(_too_big(url, f"announces {total:,} bytes", max_bytes))
            done = 0
            if progress:
                progress("download", 0, total)
            while True:
                try:
                    block = resp.read(1 << 20)
                except (OSError, ValueError) as exc:
                    raise DataError(
                        f"{url}: download interrupted after {done} bytes ({exc}){more}"
                    ) from None
                if not block:
                    break
                done += len(block)
                if done > max_bytes:
                    raise DataError(_too_big(url, f"sent more than {max_bytes:,} bytes", max_bytes))
                out.write(block)
                digest.update(block)
                if progress:
                    progress("download", done, total)
        if total and done != total:
            raise DataError(
                f"{url}: download truncated ({done} of {total} bytes); nothing was saved{more}"
            )
        got = digest.hexdigest()
        if md5 is not None and got != md5:
            raise DataError(
                f"{url}: downloaded file has md5 {got}, expected {md5}; nothing was saved"
            )
        if check is not None:
            check(tmp, got)
        os.replace(tmp, dest)
        return got
    except OSError as exc:
        raise DataError(f"{url}: cannot save to {dest} ({exc.strerror or exc})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _too_big(url: str, what: str, max_bytes: int) -> str:
    return (
        f"{url}: download refused: the server {what}, the most allowed is {max_bytes:,}; "
        "nothing was saved"
    )
