"""normbench report --html: one self-contained page holding the terminal's tables and figures,
every value escaped; rendered by headless Chromium where it is installed."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest

import normbench
from normbench.results import METRICS_FILE
from tests.test_report import run_report, write_diagnostics, write_run

HOSTILE = "<script>alert(1)</script> \"quoted\" 'single' &amp;"
HOSTILE_RUN = "<img src=x onerror=alert(2)> \"run\" 'id'"  # a folder name and a run_id
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = "headless Chromium not installed (Debian: apt-get install chromium; .ci/run does)"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Classification (two models' worth of settings: relu and a hostile activation) and
    regression runs, a diverged and a failed seed, and a running run with a hostile id."""
    root = tmp_path_factory.mktemp("mixed")
    for seed in range(3):
        for lr in (0.01, 0.1):
            for norm, base in (("batch", 0.8), ("none", 0.6)):
                status = "diverged" if (norm, lr, seed) == ("none", 0.1, 2) else "ok"
                write_run(root, norm, lr, seed, base + 0.01 * seed + lr, status)
                write_run(root, norm, lr, seed, base - 0.1, **{"model.activation": HOSTILE})
            write_run(root, "batch", lr, seed, 0.5 + 0.02 * seed, task="regression")
            write_run(root, "none", lr, seed, 0.4 + 0.03 * seed, task="regression")
    write_run(root, "batch", 0.1, 3, 0.0, "failed")
    running = write_run(root, "none", 0.01, 9, 0.5, "running")
    text = (root / running / METRICS_FILE).read_text().replace(running, HOSTILE_RUN)
    (root / running).rename(root / HOSTILE_RUN)
    (root / HOSTILE_RUN / METRICS_FILE).write_text(text)
    return root


def markdown_texts(markdown: str) -> list[str]:
    """Every title, cell, caption and note of the markdown report (the terminal's tables)."""
    texts = []
    for line in markdown.splitlines():
        if line.startswith("| ---"):
            continue
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip("|").split(" | ")]
            texts += [re.sub(r"^\*\*(.*)\*\*$", r"\1", c).replace("\\|", "|") for c in cells]
        elif line.strip():
            texts.append(line.removeprefix("### "))
    return texts


def write_page(results: Path, folder: Path, **kwargs) -> str:
    page = folder / "report.html"
    run_report(results, html=page, **kwargs)
    return page.read_text(encoding="utf-8")


def assert_self_contained(page: str) -> None:
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page), "a network address"
    sources = re.findall(r'src="([^"]*)"', page)
    assert all(src.startswith("data:image/png;base64,") for src in sources)


def test_html_holds_the_terminal_tables_figures_and_notes_escaped(
    mixed: Path, tmp_path: Path
) -> None:
    page = write_page(mixed, tmp_path)
    markdown = run_report(mixed, fmt="markdown")
    missing = [text for text in markdown_texts(markdown) if html.escape(text) not in page]
    assert not missing, f"not in the page: {missing[:5]}"
    marked = re.findall(r'<td class="marked">(★|\*) ', page)
    assert len(marked) == len(re.findall(r"\| \*\*", markdown)) > 0  # the same cells marked
    assert "Holm-Bonferroni" in page and "confidence interval" in page
    assert "task=regression: val_loss at the last epoch, by lr" in page  # one block per study
    # hostile values are text: escaped where shown, never markup
    assert HOSTILE not in page and HOSTILE_RUN not in page
    assert html.escape(HOSTILE) in page and html.escape(HOSTILE_RUN) in page
    assert_self_contained(page)
    assert f"normbench {normbench.__version__}" in page and "Left out" in page
    figures = re.findall(r"<figcaption>([^<]*)</figcaption>", page)
    assert sorted(figures) == [
        "classification/learning_curves.png", "classification/val_acc_vs_lr.png",
        "regression/learning_curves.png", "regression/val_loss_vs_lr.png",
    ]  # fmt: skip
    assert len(page.encode()) < 5_000_000


def test_html_by_batch_size_and_diagnostics_figures(tmp_path: Path) -> None:
    results = tmp_path / "results"
    for seed in range(2):
        for batch_size in (8, 32):
            write_run(results, "batch", 0.1, seed, 0.9, batch_size=batch_size)
        write_diagnostics(results, write_run(results, "batch", 0.1, seed, 0.9), 0.0)
        write_diagnostics(results, write_run(results, "none", 0.1, seed, 0.5), 0.5)
    page = write_page(results, tmp_path, by="batch_size")
    assert "val_acc_vs_batch_size.png" in page and "by batch_size" in page
    page = write_page(results, tmp_path, diagnostics=True)
    assert "Diagnostics per layer" in page and "drift p50" in page
    assert_self_contained(page)
    assert re.findall(r"<figcaption>([^<]*)</figcaption>", page) == [
        "diagnostics_percentiles.png", "diagnostics_grad_norm.png"
    ]


def test_cli_html_names_the_command_that_made_it_without_importing_torch(
    mixed: Path, tmp_path: Path
) -> None:
    page = tmp_path / "page.html"
    args = ["report", "--results", str(mixed), "--where", "task=regression", "--html", str(page)]
    code = (
        "import sys\nfrom normbench.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {page}" in result.stderr
    text = page.read_text(encoding="utf-8")
    assert html.escape(f"normbench report --results {mixed} --where task=regression") in text
    assert "task=classification" not in text


class Dom(HTMLParser):
    """The tags and the text of a serialized DOM (text unescaped, as a reader sees it)."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: Counter[str] = Counter()
        self.text: list[str] = []
        self.feed(markup)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags[tag] += 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def chromium(*args: str) -> subprocess.CompletedProcess:
    """Headless Chromium, isolated (a fresh profile, no network services), with its log."""
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--hide-scrollbars", "--enable-logging=stderr", "--v=0",
             f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, "HOME": profile},
        )  # fmt: skip


def console_errors(log: str) -> list[str]:
    """The page's console messages and script or policy errors in Chromium's log."""
    pattern = re.compile(r"CONSOLE|Uncaught|Refused to|Content Security Policy", re.IGNORECASE)
    return [line for line in log.splitlines() if pattern.search(line)]


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_chromium_renders_every_table_at_phone_width(mixed: Path, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    page = tmp_path / "report.html"
    run_report(mixed, html=page)
    url = page.as_uri()
    dom = chromium("--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert not console_errors(dom.stderr), console_errors(dom.stderr)
    rendered = Dom(dom.stdout)
    texts = markdown_texts(run_report(mixed, fmt="markdown"))
    shown = "\n".join(rendered.text)
    missing = [text for text in texts if text not in shown]
    assert not missing, f"not rendered: {missing[:5]}"  # every title, cell, caption and note
    assert rendered.tags["table"] == Dom(page.read_text()).tags["table"] >= 7
    assert rendered.tags["script"] == 0 and rendered.tags["img"] == 4  # the figures only
    assert HOSTILE in shown and HOSTILE_RUN in shown  # shown as text, not run
    shot = tmp_path / "phone.png"
    result = chromium(f"--screenshot={shot}", "--window-size=390,2000", url)
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    assert not console_errors(result.stderr), console_errors(result.stderr)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (2000, 390)
    stddev, inked = pixels.std(), (pixels < 128).mean()
    assert stddev > 20 and inked > 0.01, f"blank screenshot? stddev {stddev}, inked {inked}"
