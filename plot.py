"""A picture of learning: the train and validation loss of a train.py run against the step, from its log.jsonl.

    python plot.py out/log.jsonl                  # writes out/loss.png

matplotlib draws it, an optional install (pip install matplotlib) that nothing else in this project needs.
"""
import contextlib
import json
import sys
from pathlib import Path

from errors import GPT2Error


def read_log(path):  # -> the log's step entries (with "loss") and evaluation entries (with "val_loss")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GPT2Error(f"cannot read {path} ({e}): give the log.jsonl that train.py wrote in its out_dir",
                        ["log"]) from None
    entries = []
    for line in lines:
        with contextlib.suppress(ValueError):  # a line that a kill cut short
            entries.append(json.loads(line))
    entries = [entry for entry in entries if isinstance(entry, dict)]
    steps, evaluations = [e for e in entries if "loss" in e], [e for e in entries if "val_loss" in e]
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
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.subplots()
    # each step's loss is on its own random batch, hence noisy: drawn lightly under the evaluations' estimates
    axes.plot([e["step"] for e in steps], [e["loss"] for e in steps], color="tab:blue", alpha=0.3, linewidth=0.8,
              label="train loss, each step's batch")
    for key, color, label in (("train_loss", "tab:blue", "train loss"), ("val_loss", "tab:orange", "validation loss")):
        axes.plot([e["step"] for e in evaluations], [e[key] for e in evaluations], "o-", color=color, label=label)
    axes.set(xlabel="step", ylabel="loss (nats per token)", title=str(log) if title is None else title)
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
