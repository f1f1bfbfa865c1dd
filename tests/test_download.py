"""Downloading a model from a local HTTP server: resuming, retrying, failing clearly, two downloads at once, checking
each file before it takes its name, and downloading nothing when the command line is refused."""
import collections
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import gpt2
import download
from conftest import SHARED_124M_HEAD, ROOT, assert_clean_error, run_script, tf_variables
from download import download_gpt2_files, download_problem
from errors import GPT2Error
from files import size_text
from utils import load_encoder_hparams_and_params

LOGIN_PAGE = b"<!DOCTYPE html>\n<html><body>Please log in to use this network.</body></html>\n"
TURING = "Alan Turing theorized that computers would one day become"

DATA = "model.ckpt.data-00000-of-00001"


class ModelHandler(BaseHTTPRequestHandler):
    """Serves server.root's files as /models/124M/NAME, honouring "Range: bytes=N-" unless told to ignore it.

    The server's attributes script its misbehaviour: drop (names whose body breaks off halfway),
    fail_once (names answered 503 the first time), ignore_range, hold (an Event that the
    response for the data file waits for), portal (answer every request with a login page, as a captive
    portal does) and stall (names whose body stops halfway, the connection left open until release is set).
    Every request is counted in server.requests.
    """

    def do_GET(self):
        server = self.server
        name = self.path.removeprefix("/models/124M/")
        with server.lock:
            server.requests.append((name, self.headers.get("Range")))
            first_time = [n for n, _ in server.requests].count(name) == 1
        path = server.root / name
        if server.portal:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(LOGIN_PAGE)))
            self.end_headers()
            self.wfile.write(LOGIN_PAGE)
            return
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
        if name in server.drop or name in server.stall:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            if name in server.stall:
                server.release.wait(60)
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def serve():
    """serve(root, **behaviour) -> a running server on 127.0.0.1; its base_url ends in /models."""
    servers = []

    def start(root, drop=(), fail_once=(), ignore_range=False, hold=None, portal=False, stall=()):
        server = ThreadingHTTPServer(("127.0.0.1", 0), ModelHandler)
        server.daemon_threads = True
        server.root, server.drop, server.fail_once = root, set(drop), set(fail_once)
        server.ignore_range, server.hold, server.portal = ignore_range, hold, portal
        server.stall, server.release = set(stall), threading.Event()
        server.requests, server.lock = [], threading.Lock()
        server.base_url = f"http://127.0.0.1:{server.server_address[1]}/models"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.release.set()
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
    for name in download.OPENAI_FILES:
        assert (model_dir / name).read_bytes() == (source / name).read_bytes(), name
    assert not list(model_dir.glob("*.part"))


def download_error(model_dir, base_url, model_size="124M"):
    with pytest.raises(GPT2Error) as info:
        download_gpt2_files(model_size, model_dir, base_url)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_download_on_a_full_disk_names_the_file_and_keeps_no_part_of_it(tiny, serve, tmp_path, full_disk):
    source, _, _ = tiny
    server = serve(source)
    model_dir = tmp_path / "124M"
    small_files = [name for name in download.OPENAI_FILES if name != DATA]
    full_disk(model_dir, sum((source / name).stat().st_size for name in small_files) + 1000)
    message = download_error(model_dir, server.base_url)
    assert message.startswith(f"cannot write {model_dir / DATA} (No space left on device): it needs "
                              f"{size_text((source / DATA).stat().st_size)} and ")
    assert not list(model_dir.glob("*.part")) and not (model_dir / DATA).exists()
    assert all((model_dir / name).read_bytes() == (source / name).read_bytes() for name in small_files)


def test_a_full_download_loads_as_the_fixture(tiny, serve, tmp_path, monkeypatch):
    source, hparams, params = tiny
    server = serve(source)
    monkeypatch.setenv("GPT2_BASE_URL", server.base_url)

    _, loaded_hparams, loaded = load_encoder_hparams_and_params("124M", tmp_path)

    assert_same_files(tmp_path / "124M", source)
    assert gets(server) == {name: 1 for name in download.OPENAI_FILES}
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
    assert len(data_ranges) == len(download.RETRY_DELAYS) + 1 and data_ranges[0] is None
    offsets = [int(r.removeprefix("bytes=").removesuffix("-")) for r in data_ranges[1:]]
    assert offsets == sorted(offsets) and offsets[0] > 0
    # the data file comes last, checked against the index downloaded before it
    assert all((tmp_path / name).is_file() for name in set(download.OPENAI_FILES) - {DATA})

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
    assert str(tmp_path) in message and all(name in message for name in download.OPENAI_FILES)
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
    for name in set(download.OPENAI_FILES) - {"vocab.bpe", DATA}:
        assert (model_dir / name).read_bytes() == (source / name).read_bytes(), name


def test_two_processes_downloading_at_once_fetch_each_file_once(tiny, serve, tmp_path):
    source = tiny[0]
    release = threading.Event()
    server = serve(source, hold=release)
    model_dir = tmp_path / "124M"
    script = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from download import download_gpt2_files\n"
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
    assert gets(server) == {name: 1 for name in download.OPENAI_FILES}
    assert_same_files(model_dir, source)


def test_an_unreachable_server_fails_quickly(tmp_path):
    started = time.monotonic()
    message = download_error(tmp_path, "http://127.0.0.1:1/models")
    assert time.monotonic() - started < 10
    assert "http://127.0.0.1:1/models/124M/checkpoint" in message and str(tmp_path) in message
    assert list(tmp_path.iterdir()) == []  # the lock is on the folder: no lock file lingers


# --- each file is checked before it takes its name ---------------------------------------------------------------

def test_a_login_page_answering_every_address_is_not_kept(tiny, serve, tmp_path):
    source = tiny[0]
    portal = serve(source, portal=True)

    message = download_error(tmp_path, portal.base_url)

    assert f"{portal.base_url}/124M/checkpoint" in message and "not GPT-2's checkpoint" in message
    assert len(portal.requests) == 1  # a wrong file is not retried
    assert list(tmp_path.iterdir()) == []  # neither the file nor its .part is kept
    download_gpt2_files("124M", tmp_path, serve(source).base_url)
    assert_same_files(tmp_path, source)


@pytest.mark.parametrize("name", download.OPENAI_FILES)
def test_each_file_is_checked_before_it_takes_its_name(name, tiny, serve, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(tiny[0], served)
    (served / name).write_bytes(LOGIN_PAGE)
    server = serve(served)
    model_dir = tmp_path / "124M"

    message = download_error(model_dir, server.base_url)

    assert f"/124M/{name}" in message and f"not GPT-2's {name}" in message
    assert not (model_dir / name).exists() and not (model_dir / f"{name}.part").exists()


def test_a_data_file_shorter_than_its_index_says_is_not_kept(tiny, serve, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(tiny[0], served)
    size = (served / DATA).stat().st_size
    with open(served / DATA, "r+b") as f:
        f.truncate(size - 4)  # the server's Content-Length agrees: only the index shows it is short
    message = download_error(tmp_path / "124M", serve(served).base_url)
    assert f"it has {size - 4} bytes, the index puts its tensors in {size}" in message
    assert not (tmp_path / "124M" / DATA).exists()


def test_openai_files_pass_the_checks_and_a_truncated_data_file_does_not():
    if not SHARED_124M_HEAD.is_dir():
        pytest.skip(f"{SHARED_124M_HEAD} (OpenAI's real 124M index and first 3 MiB of data) is absent")
    for name in ("checkpoint", "hparams.json", "model.ckpt.index"):
        assert download_problem(name, SHARED_124M_HEAD / name, SHARED_124M_HEAD) is None, name
    size = (SHARED_124M_HEAD / DATA).stat().st_size
    assert download_problem(DATA, SHARED_124M_HEAD / DATA, SHARED_124M_HEAD) == \
        f"it has {size} bytes, the index puts its tensors in {124_439_808 * 4}"  # GPT-2 124M's parameters


def test_a_folder_poisoned_by_an_earlier_version_is_repaired_by_running_again(tiny, serve, tmp_path, loaded_model):
    source = tiny[0]
    server = serve(source)
    for name in download.OPENAI_FILES:  # every file "complete", and each a login page
        (tmp_path / "124M").mkdir(exist_ok=True)
        (tmp_path / "124M" / name).write_bytes(LOGIN_PAGE)

    result = run_script("gpt2.py", TURING, "--n_tokens_to_generate", 5, "--models_dir", tmp_path,
                        env=dict(os.environ, GPT2_BASE_URL=server.base_url))

    encoder, hparams, params = loaded_model("tiny")
    expected = encoder.decode(gpt2.generate(encoder.encode(TURING), params, hparams["n_head"], 5))
    assert (result.returncode, result.stdout) == (0, expected + "\n"), result.stderr
    assert gets(server) == {name: 1 for name in download.OPENAI_FILES}
    assert_same_files(tmp_path / "124M", source)
    notes = result.stderr.splitlines()
    assert len(notes) == len(download.OPENAI_FILES) and all("downloaded it again" in note for note in notes)


def test_repair_downloads_only_the_files_that_fail_their_check(tiny, serve, tmp_path, monkeypatch):
    source = tiny[0]
    shutil.copytree(source, tmp_path / "124M")
    (tmp_path / "124M" / "encoder.json").write_bytes(LOGIN_PAGE)
    server = serve(source)
    monkeypatch.setenv("GPT2_BASE_URL", server.base_url)
    load_encoder_hparams_and_params("124M", tmp_path)
    assert gets(server) == {"encoder.json": 1}
    assert_same_files(tmp_path / "124M", source)


def test_a_complete_part_file_is_kept_not_downloaded_again(tiny, serve, tmp_path):
    source = tiny[0]
    size = (source / DATA).stat().st_size
    (tmp_path / f"{DATA}.part").write_bytes((source / DATA).read_bytes())
    server = serve(source)

    download_gpt2_files("124M", tmp_path, server.base_url)

    assert [range_ for name, range_ in server.requests if name == DATA] == [f"bytes={size}-"]  # answered 416
    assert_same_files(tmp_path, source)


def test_a_stalled_connection_shows_its_stall_and_gives_up_naming_the_mirror(tiny, serve, tmp_path, monkeypatch,
                                                                               capsys):
    monkeypatch.setattr(download, "DOWNLOAD_TIMEOUT", (2, 0.5))
    monkeypatch.setattr(download, "RETRY_DELAYS", (0.01, 0.01))
    server = serve(tiny[0], stall={DATA})
    started = time.monotonic()

    message = download_error(tmp_path, server.base_url)

    assert time.monotonic() - started < 10
    assert f"{server.base_url}/124M/{DATA}" in message and "stalled: no data for 0.5 s" in message
    shown = capsys.readouterr().err.splitlines()
    assert [line for line in shown if "stalled" in line] == [f"{server.base_url}/124M/{DATA}: the connection "
                                                             "stalled: no data for 0.5 s; trying again"] * 2
    assert (tmp_path / f"{DATA}.part").stat().st_size > 0  # kept, to resume from


def test_a_mirror_that_stops_answering_is_given_up_within_a_minute():
    attempts = len(download.RETRY_DELAYS) + 1
    assert attempts * sum(download.DOWNLOAD_TIMEOUT) + sum(download.RETRY_DELAYS) < 60


# --- nothing is downloaded for a command line that is refused --------------------------------------------------------

REFUSED = [
    ("gpt2.py", [TURING, "--temprature", 0.8], ["--temprature", "--temperature"]),
    ("gpt2.py", [TURING, "-n", "abc"], ["-n", "--n_tokens_to_generate"]),
    ("gpt2.py", [TURING, "--n_tokens_to_generate", "abc"], ["--n_tokens_to_generate", "'abc'"]),
    ("gpt2.py", [TURING, "--top_k"], ["--top_k needs a value"]),
    ("gpt2.py", [TURING, "--stop", "---"], ["--stop needs a value", "--stop=VALUE"]),
    ("gpt2.py", [TURING, "--top_p", 2], ["--top_p", "(0, 1]"]),
    ("gpt2.py", [TURING, "--temperature", "nan"], ["--temperature"]),
    ("gpt2.py", [TURING, "--seed", 3.5], ["--seed", "whole number"]),
    ("gpt2.py", [TURING, "--seed", -2], ["--seed", "-1"]),
    ("gpt2.py", [TURING, "--stop", ""], ["--stop", "non-empty"]),
    ("gpt2.py", [TURING, "--stop", "\\q"], ["--stop", "escape"]),
    ("gpt2.py", [TURING, "--stop", "\\日"], ["--stop", "escape"]),
    ("gpt2.py", [TURING, "--stop", "\\ud83d"], ["--stop", "half of a surrogate pair"]),
    ("gpt2.py", [TURING, "--num_samples", 0], ["--num_samples"]),
    ("gpt2.py", [TURING, "--num_samples", 2], ["--num_samples", "--temperature"]),
    ("gpt2.py", [TURING, "--threads", 0], ["--threads"]),
    ("gpt2.py", [TURING, "--threads", 2**32 + 1], ["--threads", "4294967297"]),
    ("gpt2.py", [TURING, "--model_size", "7B"], ["--model_size", "7B", "124M"]),
    ("gpt2.py", [TURING, "--model_size", "355M", "--model_dir", "{text}"], ["--model_size", "--model_dir"]),
    ("gpt2.py", [TURING, "--score_file", "{text}"], ["prompt", "--score_file"]),
    ("gpt2.py", ["--prompt_file", "{text}", "--prompts_file", "{text}"], ["--prompt_file", "--prompts_file"]),
    ("gpt2.py", ["--prompts_file", "{text}", "--num_samples", 2, "--temperature", 1],
     ["--num_samples", "--prompts_file"]),
    ("gpt2.py", ["--prompt_file", "{absent}"], ["--prompt_file", "absent.txt"]),
    ("gpt2.py", ["Hello", "world"], ["'world'"]),
    ("gpt2.py", [b"caf\xe9"], ["UTF-8"]),
    ("gpt2_pico.py", [TURING, "--n_tokens_to_generate", -1], ["--n_tokens_to_generate"]),
    ("gpt2_pico.py", [TURING, "--temperature", 1], ["--temperature"]),
    ("gpt2_pico.py", [TURING, "--model_size", "7B"], ["--model_size", "7B"]),
]


@pytest.mark.parametrize("script, args, words", REFUSED)
def test_a_refused_command_line_downloads_nothing(script, args, words, tiny, serve, tmp_path):
    server = serve(tiny[0])
    (tmp_path / "text.txt").write_text(TURING, encoding="utf-8")
    paths = {"{text}": str(tmp_path / "text.txt"), "{absent}": str(tmp_path / "absent.txt")}
    args = [paths.get(arg, arg) if isinstance(arg, str) else arg for arg in args]

    result = run_script(script, *args, "--models_dir", tmp_path / "models",
                        env=dict(os.environ, GPT2_BASE_URL=server.base_url))

    assert_clean_error(result, *words)
    assert result.stdout == ""
    assert server.requests == []


def test_the_same_command_line_made_right_downloads_and_runs(tiny, serve, tmp_path, loaded_model):
    server = serve(tiny[0])
    result = run_script("gpt2.py", TURING, "--temperature", 0.8, "--n_tokens_to_generate", 5, "--seed", 1,
                        "--models_dir", tmp_path, env=dict(os.environ, GPT2_BASE_URL=server.base_url))
    encoder, hparams, params = loaded_model("tiny")
    expected = encoder.decode(gpt2.generate(encoder.encode(TURING), params, hparams["n_head"], 5, temperature=0.8,
                                            seed=1))
    assert (result.returncode, result.stdout, result.stderr) == (0, expected + "\n", "")
    assert gets(server) == {name: 1 for name in download.OPENAI_FILES}
