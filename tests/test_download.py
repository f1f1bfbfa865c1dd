"""Downloading a model from a local HTTP server: resuming, retrying, failing clearly, and two downloads at once."""
import collections
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import utils
from conftest import ROOT, tf_variables
from utils import GPT2Error, download_gpt2_files, load_encoder_hparams_and_params

DATA = "model.ckpt.data-00000-of-00001"


class ModelHandler(BaseHTTPRequestHandler):
    """Serves server.root's files as /models/124M/NAME, honouring "Range: bytes=N-" unless told to ignore it.

    The server's attributes script its misbehaviour: drop (names whose body breaks off halfway),
    fail_once (names answered 503 the first time), ignore_range, and hold (an Event that the
    response for the data file waits for).
    """

    def do_GET(self):
        server = self.server
        name = self.path.removeprefix("/models/124M/")
        with server.lock:
            server.requests.append((name, self.headers.get("Range")))
            first_time = [n for n, _ in server.requests].count(name) == 1
        path = server.root / name
        if "/" in name or not path.is_file():
            self.send_error(404)
            return
        if name in server.fail_once and first_time:
            self.send_error(503)
            return
        if name == DATA and server.hold is not None:
            server.hold.wait(30)
        data = path.read_bytes()
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = 0 if server.ignore_range or not match else int(match[1])
        if start >= len(data) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if name in server.drop:
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def serve():
    """serve(root, **behaviour) -> a running server on 127.0.0.1; its base_url ends in /models."""
    servers = []

    def start(root, drop=(), fail_once=(), ignore_range=False, hold=None):
        server = ThreadingHTTPServer(("127.0.0.1", 0), ModelHandler)
        server.daemon_threads = True
        server.root, server.drop, server.fail_once = root, set(drop), set(fail_once)
        server.ignore_range, server.hold = ignore_range, hold
        server.requests, server.lock = [], threading.Lock()
        server.base_url = f"http://127.0.0.1:{server.server_address[1]}/models"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.hold is not None:
            server.hold.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def tiny(fixture_model):
    return fixture_model("tiny")


def gets(server):
    return collections.Counter(name for name, _ in server.requests)


def assert_same_files(model_dir, source):
    for name in utils.OPENAI_FILES:
        assert (model_dir / name).read_bytes() == (source / name).read_bytes(), name
    assert not list(model_dir.glob("*.part"))


def download_error(model_dir, base_url, model_size="124M"):
    with pytest.raises(GPT2Error) as info:
        download_gpt2_files(model_size, model_dir, base_url)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_full_download_loads_as_the_fixture(tiny, serve, tmp_path, monkeypatch):
    source, hparams, params = tiny
    server = serve(source)
    monkeypatch.setenv("GPT2_BASE_URL", server.base_url)

    _, loaded_hparams, loaded = load_encoder_hparams_and_params("124M", tmp_path)

    assert_same_files(tmp_path / "124M", source)
    assert gets(server) == {name: 1 for name in utils.OPENAI_FILES}
    assert loaded_hparams == hparams
    expected = tf_variables(params)
    for name, array in tf_variables(loaded).items():
        assert (array == expected[name]).all(), name


def test_a_dropped_connection_leaves_a_part_file_that_the_next_run_resumes(tiny, serve, tmp_path):
    source = tiny[0]
    size = (source / DATA).stat().st_size
    server = serve(source, drop={DATA})

    message = download_error(tmp_path, server.base_url)

    assert f"{server.base_url}/124M/{DATA}" in message and "resume" in message
    assert not (tmp_path / DATA).exists()
    part_size = (tmp_path / f"{DATA}.part").stat().st_size
    assert 0 < part_size < size
    # Every retry asked for the rest of what the .part already held.
    data_ranges = [range_ for name, range_ in server.requests if name == DATA]
    assert len(data_ranges) == len(utils.RETRY_DELAYS) + 1 and data_ranges[0] is None
    offsets = [int(r.removeprefix("bytes=").removesuffix("-")) for r in data_ranges[1:]]
    assert offsets == sorted(offsets) and offsets[0] > 0
    # the data file comes last, checked against the index downloaded before it
    assert all((tmp_path / name).is_file() for name in set(utils.OPENAI_FILES) - {DATA})

    server.drop.clear()
    download_gpt2_files("124M", tmp_path, server.base_url)

    assert [range_ for name, range_ in server.requests if name == DATA][-1] == f"bytes={part_size}-"
    assert_same_files(tmp_path, source)


def test_a_server_that_ignores_range_still_gives_the_right_file(tiny, serve, tmp_path):
    source = tiny[0]
    server = serve(source, drop={DATA})
    download_error(tmp_path, server.base_url)
    assert (tmp_path / f"{DATA}.part").stat().st_size > 0
    server.drop.clear()
    server.ignore_range = True
    server.requests.clear()

    download_gpt2_files("124M", tmp_path, server.base_url)

    assert server.requests[0][0] == DATA and server.requests[0][1].startswith("bytes=")
    assert_same_files(tmp_path, source)


def test_a_part_file_as_long_as_the_file_starts_over(tiny, serve, tmp_path):
    source = tiny[0]
    server = serve(source)
    (tmp_path / "vocab.bpe.part").write_bytes((source / "vocab.bpe").read_bytes() + b"junk")

    download_gpt2_files("124M", tmp_path, server.base_url)

    assert [range_ for name, range_ in server.requests if name == "vocab.bpe"] == [
        f"bytes={(source / 'vocab.bpe').stat().st_size + 4}-",  # answered 416
        None,
    ]
    assert_same_files(tmp_path, source)


def test_a_server_error_is_retried(tiny, serve, tmp_path):
    source = tiny[0]
    server = serve(source, fail_once={"hparams.json"})
    download_gpt2_files("124M", tmp_path, server.base_url)
    assert gets(server)["hparams.json"] == 2
    assert_same_files(tmp_path, source)


def test_an_unknown_size_is_a_404_that_says_where_to_put_the_files(tiny, serve, tmp_path):
    server = serve(tiny[0])
    message = download_error(tmp_path, server.base_url, model_size="999M")
    assert f"{server.base_url}/999M/checkpoint" in message and "404" in message
    assert str(tmp_path) in message and all(name in message for name in utils.OPENAI_FILES)
    assert len(server.requests) == 1  # a 404 is not retried
    assert list(tmp_path.iterdir()) == []  # the lock is on the folder: no lock file lingers


def test_a_missing_file_is_a_404_and_leaves_no_partial_file(tiny, serve, tmp_path):
    source = tmp_path / "served"
    shutil.copytree(tiny[0], source, ignore=shutil.ignore_patterns("vocab.bpe"))
    server = serve(source)
    model_dir = tmp_path / "124M"

    message = download_error(model_dir, server.base_url)

    assert f"{server.base_url}/124M/vocab.bpe" in message and str(model_dir) in message
    assert gets(server)["vocab.bpe"] == 1
    assert not (model_dir / "vocab.bpe").exists() and not (model_dir / "vocab.bpe.part").exists()
    assert DATA not in gets(server)  # the data file comes last
    for name in set(utils.OPENAI_FILES) - {"vocab.bpe", DATA}:
        assert (model_dir / name).read_bytes() == (source / name).read_bytes(), name


def test_two_processes_downloading_at_once_fetch_each_file_once(tiny, serve, tmp_path):
    source = tiny[0]
    release = threading.Event()
    server = serve(source, hold=release)
    model_dir = tmp_path / "124M"
    script = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from utils import download_gpt2_files\n"
        "print('downloading', flush=True)\n"
        f"download_gpt2_files('124M', {str(model_dir)!r}, {server.base_url!r})\n"
    )

    def start():
        return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    first = start()
    deadline = time.monotonic() + 30
    while DATA not in gets(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert DATA in gets(server), first.communicate(timeout=30)
    second = start()
    assert second.stdout.readline() == "downloading\n"
    time.sleep(0.5)  # time for the second process to ask for a file, if the lock didn't stop it
    requests_while_held = gets(server)
    release.set()
    results = [process.communicate(timeout=60) for process in (first, second)]

    assert [process.returncode for process in (first, second)] == [0, 0], results
    assert all(count == 1 for count in requests_while_held.values())
    assert gets(server) == {name: 1 for name in utils.OPENAI_FILES}
    assert_same_files(model_dir, source)


def test_an_unreachable_server_fails_quickly(tmp_path):
    started = time.monotonic()
    message = download_error(tmp_path, "http://127.0.0.1:1/models")
    assert time.monotonic() - started < 10
    assert "http://127.0.0.1:1/models/124M/checkpoint" in message and str(tmp_path) in message
    assert list(tmp_path.iterdir()) == []  # the lock is on the folder: no lock file lingers
