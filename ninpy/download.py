"""Fetch one URL into one file, safely: resume, retry, verify, then move into place.

    download(url, path, digest, algorithm="md5")

The bytes go to `path + ".part"`. A broken connection is retried with exponential backoff, and each
retry asks only for the missing bytes (HTTP `Range: bytes=N-`); a server that ignores the range and
answers 200 gets the file restarted from zero. When the transfer ends, the digest of the ".part"
file is checked against the published one *before* anything is moved; only a verified file is
renamed onto `path` (`os.replace`, atomic on one file system). So `path` either does not exist or
holds the exact published bytes — never half a file.

Every failure is a `DataError` whose message names the file, what was wrong and what to do.
"""
import hashlib
import http.client
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

RETRIES = 3          # extra attempts after the first, for errors that may pass (dropped link, 5xx)
BACKOFF = 1.0        # seconds before the first retry; doubled before each next one
TIMEOUT = 30.0       # seconds of silence before a connection counts as broken
CHUNK = 1 << 20      # bytes read per step
USER_AGENT = "ninpy-download/1.0 (+urllib)"
_TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}


class DataError(RuntimeError):
    """A dataset file is missing, unreachable, truncated or corrupt; the message says what to do.

    `kind` is one of "offline" (no connection to the server), "http" (the server answered with an
    error), "truncated", "digest" (bytes differ from the published digest), "format" (the bytes do
    not parse), "missing" (not here, and downloading is off), "io" (the data directory cannot be
    written), "unknown" (no such dataset).
    """

    def __init__(self, message, kind="format", reason=None):
        super().__init__(message)
        self.kind = kind
        self.reason = reason  # the underlying exception, when there is one


def file_digest(path, algorithm="md5"):
    """Hex digest of a file's bytes ("md5" or "sha256"), read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url, path, digest=None, algorithm="md5", retries=None, backoff=None, timeout=None,
             progress=True):
    """Download `url` to `path`, verified against `digest` (hex, `algorithm` "md5" or "sha256").

    Returns `path` as a Path. Raises DataError (kind "offline", "http", "truncated" or "digest").
    """
    path = Path(path)
    part = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    stale = part.exists() and part.stat().st_size > 0  # from an earlier run: resumed, not trusted
    _transfer(url, path, part, RETRIES if retries is None else retries,
              BACKOFF if backoff is None else backoff, TIMEOUT if timeout is None else timeout,
              progress)
    if digest is not None:
        got = file_digest(part, algorithm)
        if got != digest.lower() and stale:
            # The old partial file may come from another version of the file: start from zero once.
            part.unlink()
            return download(url, path, digest, algorithm, retries, backoff, timeout, progress)
        if got != digest.lower():
            part.unlink()
            raise DataError(
                f"{path.name}: {algorithm} mismatch after downloading {url}: expected {digest}, "
                f"got {got}. The download was deleted. Run again to retry, or fetch the file "
                f"yourself, check its {algorithm}, and put it at {path}", kind="digest")
    os.replace(part, path)
    return path


def _transfer(url, path, part, retries, backoff, timeout, progress):
    """Fill `part` with every byte of `url`, retrying (and resuming) up to `retries` times."""
    error = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            if _fetch(url, part, timeout, progress):
                return
            error = DataError(f"the transfer from {url} ended early "
                              f"({part.stat().st_size} bytes received)", kind="truncated")
        except DataError as failure:
            error = failure
            if failure.kind == "http":
                break  # 403, 404, ...: asking again gives the same answer
            if failure.kind == "offline" and isinstance(failure.reason, socket.gaierror):
                break  # the host name does not resolve: no network, and waiting will not help
    kept = (f" ({part.stat().st_size} bytes kept in {part}; the next run resumes from there)"
            if part.exists() and part.stat().st_size else "")
    if error.kind == "offline":
        raise DataError(f"{path.name}: cannot reach {url} ({error}){kept}. Check the network "
                        f"connection, or download the file yourself and put it at {path}",
                        kind="offline", reason=error.reason)
    if error.kind == "retry":
        raise DataError(f"{path.name}: {error}, after {retries + 1} attempts{kept}. The server "
                        f"may be busy: run again later, or download the file yourself and put it "
                        f"at {path}",
                        kind="http")
    if error.kind == "http":
        raise DataError(f"{path.name}: {error}. Check the URL, or download the file yourself "
                        f"and put it at {path}", kind="http")
    raise DataError(f"{path.name}: {error}, after {retries + 1} attempts{kept}. Run again to "
                    f"resume, or download the file yourself and put it at {path}", kind="truncated")


def _fetch(url, part, timeout, progress):
    """One attempt: append the missing bytes of `url` to `part`. True when the length is complete.

    Raises DataError of kind "offline", "truncated" or "retry" (worth another attempt), or "http".
    """
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416 and offset:  # we already hold every byte (or more): the digest judges
            return True
        kind = "retry" if error.code in _TRANSIENT_HTTP else "http"
        raise DataError(f"{url} answered HTTP {error.code} {error.reason}", kind=kind) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise DataError(f"{reason}", kind="offline", reason=reason) from None

    with response:
        status = response.status
        if offset and status == 206 and not _range_starts_at(response, offset):
            status = 200  # a range we did not ask for: start again
        if status != 206:
            offset = 0  # the server ignored Range and sends the whole file: restart
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        mode = "ab" if offset else "wb"
        received = offset
        with open(part, mode) as file, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                            unit_divisor=1024, desc=part.name[:-5], leave=False,
                                            disable=not progress) as bar:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as error:  # cut short, timeout, reset
                    raise DataError(f"the connection to {url} broke after {received} bytes "
                                    f"({error!r})", kind="truncated") from None
                if not chunk:
                    break
                file.write(chunk)  # a full disk is an OSError for the caller, not a retry
                received += len(chunk)
                bar.update(len(chunk))
    return total is None or received >= total


def _range_starts_at(response, offset):
    """True when a 206 answer's Content-Range starts at `offset` ("bytes 100-199/200")."""
    content_range = response.headers.get("Content-Range", "")
    try:
        start = int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return False
    return start == offset
