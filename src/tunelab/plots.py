"""Pictures of a run and pages: the loss curves, a search's history, and screenshots of a report page in headless
Chromium (how the tests look at the pages tunelab writes)."""
from __future__ import annotations

from pathlib import Path


def read_log(path: Path) -> tuple[list[dict], list[str]]:
    """The records of a metrics.jsonl, and one warning per line that is not a JSON object with a step (skipped):
    the runs pages of `tunelab ui` show what is readable and say what was not."""
    from . import jsonl

    records, warnings = [], []

    def bad(number: int, reason: str) -> None:
        what = "not valid JSON" if reason.startswith("not valid JSON") else "not a log record with a step"
        warnings.append(f"{path.name}, line {number}: {what} (skipped)")
    try:
        for number, record in jsonl.rows(path, on_bad=bad):
            if isinstance(record.get("step"), (int, float)):
                records.append(record)
            else:
                warnings.append(f"{path.name}, line {number}: not a log record with a step (skipped)")
    except FileNotFoundError:
        return [], []
    except OSError as exc:
        return [], [f"{path.name} cannot be read ({exc})"]
    return records, warnings


def read_jsonl(path: Path) -> list[dict]:
    """The records of a metrics.jsonl tunelab wrote (none if it is missing); a damaged line is an error here —
    reports and plots are not drawn from a log that lost lines without saying so."""
    records, warnings = read_log(path)
    if warnings:
        raise ValueError(f"{path}: " + "; ".join(warnings))
    return records


def plot_loss(records: list[dict], out: Path, title: str = "") -> bool:
    """Train vs validation loss over steps from metrics.jsonl records; False if there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not val:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------- compare

def plot_search_history(study, out: Path, metric: str, direction: str) -> None:
    """Validation metric per trial (pruned trials at their last reported value, marked x) and the best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    state = optuna.trial.TrialState
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    done = [t for t in study.trials if t.state == state.COMPLETE]
    pruned = [t for t in study.trials if t.state == state.PRUNED and t.intermediate_values]
    if done:
        ax.scatter([t.number for t in done], [t.value for t in done], color="tab:blue", label="complete", zorder=3)
        best, line = None, []
        for t in sorted(done, key=lambda t: t.number):
            if best is None or (t.value < best if direction == "minimize" else t.value > best):
                best = t.value
            line.append((t.number, best))
        ax.step(*zip(*line), where="post", color="tab:green", label="best so far")
    if pruned:
        ax.scatter([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                   marker="x", color="tab:red", label="pruned (last reported)", zorder=3)
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("tunelab search: optimisation history")
    ax.grid(alpha=0.3)
    if done or pruned:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str | None:
    import shutil

    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def screenshot(html_path: Path, png_path: Path, width: int = 1280, height: int = 2600) -> Path:
    """Render a report in headless Chromium and save a PNG of the page (`apt-get install chromium-headless-shell`
    on Debian). Raises RuntimeError when no browser is installed or the render fails."""
    import subprocess

    browser = find_browser()
    if browser is None:
        raise RuntimeError(f"no headless Chromium found (looked for {', '.join(BROWSERS)}); on Debian: "
                           f"apt-get install chromium-headless-shell")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--window-size={width},{height}", f"--screenshot={Path(png_path).resolve()}",
           Path(html_path).resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not Path(png_path).exists():
        raise RuntimeError(f"{browser} could not render {html_path}: {done.stderr.strip()[-500:]}")
    return Path(png_path)
