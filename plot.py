"""A picture of learning: the train and validation loss of a train.py run against the step, from its log.jsonl.

    python plot.py out/log.jsonl                  # writes out/loss.png

matplotlib draws it, an optional install (pip install matplotlib) that nothing else in this project needs.
"""
import sys
from pathlib import Path

from errors import GPT2Error
from files import json_lines


def read_log(path):  # -> the log's step entries (with "loss") and evaluation entries (with "val_loss")
    try:
        entries = [entry for _, entry in json_lines(Path(path).read_bytes())]
    except OSError as e:
        raise GPT2Error(f"cannot read {path} ({e.strerror}): give the log.jsonl that train.py wrote in its out_dir",
                        ["log"]) from None

    def numbers_at(entry, *keys):  # whether entry is a dict with a number at each of keys
        return isinstance(entry, dict) and all(isinstance(entry.get(key), (int, float)) for key in ("step", *keys))

    steps = [e for e in entries if numbers_at(e, "loss")]
    evaluations = [e for e in entries if numbers_at(e, "train_loss", "val_loss")]
    if not steps and not evaluations:
        raise GPT2Error(f"{path} holds no losses: give the log.jsonl that train.py wrote in its out_dir", ["log"])
    return steps, evaluations


def main(log="out/log.jsonl", /, out: str | None = None, title: str | None = None):
    """Plot the train and validation loss of a train.py run against the step.

    Args:
        log: the log.jsonl that train.py writes in its out_dir.
        out: the image to write, a .png (or .svg, .pdf); by default loss.png beside the log.
        title: the plot's title; by default the log's path.
    """
    steps, evaluations = read_log(log)
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise GPT2Error("plot.py draws with matplotlib, which is not installed: pip install matplotlib") from None
    out = Path(log).with_name("loss.png") if out is None else Path(out)
    if not out.name:
        raise GPT2Error(f"out must name an image file, got {str(out)!r}: give one such as loss.png", ["out"])
    out = out if out.suffix else out.with_suffix(".png")  # what matplotlib writes for a name without one
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.subplots()
    # each step's loss is on its own random batch, hence noisy: drawn lightly under the evaluations' estimates
    axes.plot([e["step"] for e in steps], [e["loss"] for e in steps], color="tab:blue", alpha=0.3, linewidth=0.8,
              label="train loss, each step's batch")
    for key, color, label in (("train_loss", "tab:blue", "train loss"), ("val_loss", "tab:orange", "validation loss")):
        axes.plot([e["step"] for e in evaluations], [e[key] for e in evaluations], "o-", color=color, label=label)
    # each $ escaped: matplotlib would read the text between two as a formula
    axes.set(xlabel="step", ylabel="loss (nats per token)", title=(str(log) if title is None else title).replace("$", r"\$"))
    axes.grid(alpha=0.3)
    axes.legend()
    try:
        figure.savefig(out, dpi=100)
    except (OSError, ValueError) as e:  # ValueError: a file type matplotlib cannot write
        raise GPT2Error(f"cannot write {out} ({e}): give another out", ["out"]) from None
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    from cli import run_cli

    run_cli(main)
