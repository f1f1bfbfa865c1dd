"""Downloading OpenAI's released GPT-2 files, each checked before it takes its name.

A download resumes from its .part file, retries what a flaky connection breaks, gives up on a stalled mirror
within a minute, and keeps nothing that is not the file wanted (a login page saved as hparams.json, say).
GPT2_BASE_URL points at a mirror instead of OpenAI's bucket.
"""
import json
import os
import re
import sys
import time
from pathlib import Path

import requests
import urllib3
from tqdm import tqdm

from checkpoint import check_protobuf, parse_tf_index, read_tf_index
from encoder import read_merges, read_vocab
from errors import GPT2Error
from files import disk_space_for, locked
from params import OPENAI_HPARAMS, checked_hparams

OPENAI_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
OPENAI_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
                "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")
DATA_FILE = "model.ckpt.data-00000-of-00001"

# Seconds to connect, and without a byte before a connection counts as stalled. With the retries below, a mirror
# that stops answering is given up within a minute: 3 x (5 + 12) + 1.5 s.
DOWNLOAD_TIMEOUT = (5, 12)
RETRY_DELAYS = (0.5, 1.0)  # seconds before the second and third try: enough for a blip, quick to give up
CHUNK_BYTES = 1 << 20


def download_gpt2_files(model_size, model_dir, base_url=None, recheck=False):
    """Download those of OpenAI's files for model_size that model_dir lacks, from {base_url}/{model_size}/, each checked
    before it takes its name; recheck: also download again each file already there that fails that check.
    -> the names downloaded."""
    base_url = (base_url or os.environ.get("GPT2_BASE_URL") or OPENAI_BASE_URL).rstrip("/")
    model_dir = Path(model_dir)
    downloaded = []
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        # Held for the whole download, so a second process waits instead of writing the same .part files;
        # afterwards it finds the files in place and fetches nothing.
        with locked(model_dir):
            # the data file last: it is checked against the index, and a mirror that sends the wrong thing is
            # caught on the small files before the large one
            for name in sorted(OPENAI_FILES, key=lambda name: name == DATA_FILE):
                path, damage = model_dir / name, None
                if path.is_file():
                    damage = recheck and download_problem(name, path, model_dir)
                    if not damage:
                        continue
                    path.unlink()
                url = f"{base_url}/{model_size}/{name}"
                try:
                    fetch(url, path, lambda part: download_problem(name, part, model_dir))
                except DownloadError as e:
                    raise GPT2Error(
                        (f"{path} was not GPT-2's {name} ({damage}), and " if damage else "") +
                        f"cannot download {url}: {e}; check the network and the mirror (GPT2_BASE_URL), then run "
                        f"again to resume, or put {', '.join(OPENAI_FILES)} in {model_dir} by hand"
                    ) from None
                if damage:
                    note(f"{path} was not GPT-2's {name} ({damage}): downloaded it again")
                downloaded.append(name)
    except OSError as e:
        raise GPT2Error(f"cannot write the model into {model_dir}: {e}") from None
    return downloaded


def download_problem(name, path, model_dir):
    """Why the file at path is not OpenAI's file called name, or None. The data file is checked against the index
    in model_dir, which is downloaded before it."""
    try:
        if name == DATA_FILE:
            entries = read_tf_index(model_dir / "model.ckpt").values()
            size, expected = path.stat().st_size, max((entry.offset + entry.size for entry in entries), default=0)
            return None if size == expected else f"it has {size} bytes, the index puts its tensors in {expected}"
        data = path.read_bytes()
        if name == "checkpoint" and not data.startswith(b"model_checkpoint_path:"):
            return "it does not begin with model_checkpoint_path:"
        if name == "hparams.json":
            hparams = json.loads(data)
            if not isinstance(hparams, dict):
                return "it is not a JSON object"
            checked_hparams(hparams, path, OPENAI_HPARAMS)
        elif name == "encoder.json":
            read_vocab(path)
        elif name == "vocab.bpe":
            if not data.startswith(b"#version"):
                return "it does not begin with #version"
            read_merges(path)
        elif name == "model.ckpt.index":
            parse_tf_index(data, path)
        elif name == "model.ckpt.meta":
            check_protobuf(data)
    except RecursionError:
        return "its JSON is nested too deeply"
    except (OSError, ValueError, GPT2Error) as e:
        return str(e)
    return None


def note(message):  # a line on stderr that does not break a progress bar
    tqdm.write(message, file=sys.stderr)


class DownloadError(Exception):
    """Why a download attempt failed; transient failures (a dropped connection, a 5xx) are worth retrying.
    timed_out: the attempt waited for a mirror that did not answer, which the user should see while it happens."""

    def __init__(self, reason, transient, timed_out=False):
        super().__init__(reason)
        self.transient, self.timed_out = transient, timed_out


def fetch(url, path, problem_of):
    """Download url to path, retrying transient failures; each retry resumes from what path.part holds.
    problem_of(the complete .part) says why it is not the file wanted, or None: a file that fails is not kept."""
    for delay in (*RETRY_DELAYS, None):
        try:
            fetch_once(url, path, problem_of)
            return
        except DownloadError as e:
            if not e.transient or delay is None:
                raise
            if e.timed_out:
                note(f"{url}: {e}; trying again")
            time.sleep(delay)


def fetch_once(url, path, problem_of):
    """One attempt: append the rest of the file to path.part, then move it to path if it is complete and checks out."""
    part = path.with_name(path.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    try:
        response = http_get(url, start)
        if response.status_code == 416 and full_size(response) == start:
            response.close()  # the .part already holds the whole file
            size = total = start
        else:
            if response.status_code == 416:  # the .part is longer than the file: rather than trust it, start over
                response.close()
                start = 0
                response = http_get(url, start)
            size, total = receive(response, part, start)
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
        reason, timed_out = connection_failure(e)
        raise DownloadError(reason, transient=True, timed_out=timed_out) from None
    except requests.RequestException as e:
        raise DownloadError(str(e), transient=False) from None
    if total is not None and size != total:
        raise DownloadError(f"the server sent {size} of {total} bytes", transient=True)
    problem = problem_of(part)
    if problem:
        part.unlink()
        raise DownloadError(f"what the mirror sent is not GPT-2's {path.name}: {problem}", transient=False)
    os.replace(part, path)


def receive(response, part, start):
    """Write response's body to the file part, after its first start bytes -> (the file's size, the full size the
    server gave, or None)."""
    with response:
        offset, total = body_range(response, start)
        bar = tqdm(total=total, initial=offset, desc=part.name.removesuffix(".part"), unit="B", unit_scale=True,
                   unit_divisor=1024, file=sys.stderr, disable=None)
        # a full disk removes the .part: a download that cannot finish should not hold the space it took
        with (disk_space_for(part.with_suffix(""), total, temporary=part),
              open(part, "ab" if offset else "wb") as f, bar):
            for chunk in response.iter_content(CHUNK_BYTES):
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename declares the file complete
            return f.tell(), total


def connection_failure(error):  # -> (what a failed connection means in the user's words, whether it timed out)
    if isinstance(error, requests.ConnectTimeout):
        return f"no connection within {DOWNLOAD_TIMEOUT[0]} s", True
    # a stall while reading the body arrives as a ConnectionError around urllib3's ReadTimeoutError
    if isinstance(error, requests.ReadTimeout) or any(isinstance(a, urllib3.exceptions.ReadTimeoutError)
                                                      for a in error.args):
        return f"the connection stalled: no data for {DOWNLOAD_TIMEOUT[1]} s", True
    return f"the connection failed ({error})", False


def full_size(response):  # the file's size from a 416 answer's "Content-Range: bytes */SIZE", or None
    match = re.fullmatch(r"bytes \*/(\d+)", response.headers.get("Content-Range", ""))
    return int(match[1]) if match else None


def http_get(url, start):
    # identity: a compressed body would make Content-Length count other bytes than the ones written.
    headers = {"Accept-Encoding": "identity"} | ({"Range": f"bytes={start}-"} if start else {})
    return requests.get(url, headers=headers, stream=True, timeout=DOWNLOAD_TIMEOUT)


def body_range(response, start):
    """(where the response's body begins in the file, the file's full size or None) for a request from start."""
    if response.status_code == 206:
        content_range = response.headers.get("Content-Range", "")
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", content_range)
        if not match or int(match[1]) != start:
            raise DownloadError(f"asked for bytes from {start}, the server sent Content-Range {content_range!r}",
                                transient=False)
        return start, int(match[2])
    if response.status_code == 200:  # the whole file, also when the server ignored the Range header
        length = response.headers.get("Content-Length")
        return 0, None if length is None else int(length)
    code = response.status_code
    raise DownloadError(f"the server answered {code} {response.reason}", transient=code >= 500)
