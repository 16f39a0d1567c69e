"""report.html of `instruct eval`: a well-formed, self-contained page whose table holds report.json's figures,
whose plots are inline PNGs, whose answers are escaped and filterable; and, where a Chromium is installed, a
headless browser that renders the table and a plot and runs the filter.

The report folder is written by `evaluate.write_report` (what `instruct eval` calls) from four made-up models,
as issue 17 compares (sft, ppo, rloo, dpo): no model is loaded, so it takes about a second."""

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from instruct_cli.core.config import EvalConfig
from instruct_cli.steps import evaluate
from instruct_cli.steps.evaluate import html_report
from instruct_cli.steps.evaluate.report import PLOT_TITLES, TABLE_COLUMNS, table_rows

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NASTY_ANSWER = "<script>alert('pwned')</script> & \"quotes\" </td></tr></table>"
NASTY_PROMPT = "What does <b>bold</b> & <i>this</i> mean?"
VOID = {"meta", "img", "input", "br", "hr", "link", "source", "col", "wbr", "area", "base", "embed", "track"}
WORDS = ["apple", "river", "cloud", "stone", "tiger", "maple", "ocean", "ember", "frost", "lemon", "cedar", "prism"]


def write_metrics(folder, rows):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A report folder of four models on 12 prompts (one answer holds a script tag, one prompt HTML)."""
    root = tmp_path_factory.mktemp("html-report")
    write_metrics(root / "runs/sft", [{"step": s, "loss/train": 2.0 / s} for s in range(1, 6)])
    write_metrics(
        root / "runs/ppo", [{"step": s, "objective/score": 0.1 * s, "objective/kl": 0.05 * s} for s in (1, 2)]
    )
    prompts = [[{"role": "user", "content": f"Tell me about the {word}."}] for word in WORDS]
    prompts[3] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": NASTY_PROMPT}]
    rng = np.random.default_rng(0)
    entries = []
    for shift, (name, kind) in enumerate(
        [("runs/sft", "sft"), ("runs/ppo", "ppo"), ("rloo", "model"), ("dpo", "model")]
    ):
        texts = [f"{name} says the {word} is {'nice ' * (1 + shift)}".strip() for word in WORDS]
        if name == "runs/ppo":
            texts[5] = NASTY_ANSWER
        responses = [list(range(3 + shift + i % 3)) for i in range(len(WORDS))]
        ended = [i % 4 != 0 for i in range(len(WORDS))]
        path = root / name if kind != "model" else None
        entry = evaluate.Entry(name, name, kind, path=path, reference=root / "runs/sft")
        entry.samples = evaluate.Samples([[1, 2]] * len(WORDS), responses, texts, ended)
        entry.rewards = (rng.normal(size=len(WORDS)) + 0.3 * shift).tolist()
        entry.kl = [0.0] * len(WORDS) if kind == "sft" else rng.uniform(0, 2, size=len(WORDS)).tolist()
        entry.perplexity = {"perplexity": 3.5 + shift, "conversations": 12}
        entries.append(entry)
    config = EvalConfig(reward=root / "runs/rm", out=root / "report", bootstrap=200)
    reward_model = {"path": "runs/rm", "accuracy": 0.55, "pairs": 12, "margin": 0.31, "scored_on": {}}
    inputs = {"reward": {"path": "runs/rm", "sha256": "ab" * 32}}
    out = root / "report"
    out.mkdir()
    evaluate.write_report(out, entries, entries[0], prompts, reward_model, inputs, config)
    return out


class Page(HTMLParser):
    """The parts of report.html the tests read, and a check that every element is closed in order."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.mismatched: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.table_id = None
        self.cell: list[str] | None = None
        self.row: list[str] | None = None
        self.row_classes: dict[str, list[str]] = {}
        self.cell_classes: list[str] = []
        self.images: list[dict] = []
        self.inputs: list[dict] = []
        self.scripts: list[str] = []
        self.in_script = False
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.sources += [attrs[key] for key in ("src", "href") if key in attrs]
        if tag not in VOID:
            self.open.append(tag)
        if tag == "table":
            self.table_id = attrs.get("id")
            self.tables[self.table_id] = []
        elif tag == "tr":
            self.row = []
        elif tag in ("td", "th"):
            self.cell = []
            if tag == "td":
                self.cell_classes.append(attrs.get("class", ""))
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "input":
            self.inputs.append(attrs)
        elif tag == "script":
            self.in_script = True
            self.scripts.append("")

    def handle_endtag(self, tag):
        if not self.open or self.open[-1] != tag:
            self.mismatched.append(tag)
        else:
            self.open.pop()
        if tag in ("td", "th") and self.row is not None:
            self.row.append("".join(self.cell))
            self.cell = None
        elif tag == "tr" and self.table_id is not None:
            self.tables[self.table_id].append(self.row)
            self.row = None
        elif tag == "table":
            self.table_id = None
        elif tag == "script":
            self.in_script = False

    def handle_data(self, data):
        if self.in_script:
            self.scripts[-1] += data
        elif self.cell is not None:
            self.cell.append(data)


@pytest.fixture(scope="module")
def page(folder):
    parser = Page()
    parser.feed((folder / "report.html").read_text(encoding="utf-8"))
    parser.close()
    return parser


def test_the_page_is_well_formed_and_self_contained(folder, page):
    text = (folder / "report.html").read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and page.open == [] and page.mismatched == []
    # nothing is loaded from anywhere: every src is a data URI, no link, and a policy that forbids loading
    assert page.sources and all(source.startswith("data:") for source in page.sources)
    assert "<link" not in text and "http://" not in text and "https://" not in text
    assert "default-src 'none'" in text


def test_the_results_table_holds_report_json(folder, page):
    report = json.loads((folder / "report.json").read_text())
    header, *rows = page.tables["results"]
    assert header == TABLE_COLUMNS
    assert rows == table_rows(report)  # the same cells as report.md and the terminal
    assert [row[0] for row in rows] == ["runs/sft (baseline)", "runs/ppo", "rloo", "dpo"]
    for row, model in zip(rows, report["models"]):  # and the numbers are report.json's
        assert row[1] == f"{model['reward']['mean']:+.2f} ± {model['reward']['std']:.2f}"
        assert row[3] == f"{model['kl']['mean']:.2f}" and row[4] == f"{model['perplexity']['perplexity']:.4g}"
        if model["win_rate"]:
            assert row[2].startswith(f"{100 * model['win_rate']['rate']:.0f}% (")
    verdict = " ".join((folder / "report.html").read_text().split('id="verdict"')[1].split("</section>")[0].split())
    for line in report["verdict"]:
        assert line.replace("'", "&#x27;") in verdict


def test_every_plot_is_an_inline_png(folder, page):
    import matplotlib.image

    report = json.loads((folder / "report.json").read_text())
    assert report["plots"] == ["reward_distribution.png", "win_rate.png", "reward_kl.png", "training_curves.png"]
    assert [image["alt"] for image in page.images] == [PLOT_TITLES[plot] for plot in report["plots"]]
    for image, plot in zip(page.images, report["plots"]):
        kind, encoded = image["src"].split(",", 1)
        assert kind == "data:image/png;base64"
        data = base64.b64decode(encoded)
        assert data[:8] == PNG_SIGNATURE and data == (folder / plot).read_bytes()
        height, width, _ = matplotlib.image.imread(io.BytesIO(data)).shape
        assert height > 100 and width > 100


def test_answers_side_by_side_escaped_with_a_filter(folder, page):
    samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    header, *rows = page.tables["answers"]
    names = ["runs/sft", "runs/ppo", "rloo", "dpo"]
    assert header == ["#", "prompt", "runs/sft (baseline)", *names[1:]]
    assert len(rows) == len(samples) == len(WORDS)
    for row, sample in zip(rows, samples):
        assert row[1].endswith(sample["prompt"][-1]["content"])
        for cell, name in zip(row[2:], names):
            answer = sample["responses"][name]
            assert cell.startswith(f"reward {answer['reward']:+.2f} · {answer['tokens']} tokens")
            assert cell.endswith(answer["text"])
            assert ("no EOS" in cell) == (answer["eos"] is False)
    # the text is shown as text: the parser reads back the original strings, and only the page's own script runs
    assert NASTY_ANSWER in rows[5][3] and rows[3][1] == "systemBe brief.user" + NASTY_PROMPT
    text = (folder / "report.html").read_text()
    assert "<script>alert" not in text and "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in text
    assert len(page.scripts) == 1 and 'getElementById("filter")' in page.scripts[0]
    # the best-rewarded answer of each prompt is marked
    answer_classes = [c for c in page.cell_classes if c.startswith("answer")]
    for number, sample in enumerate(samples):
        rewards = [sample["responses"][name]["reward"] for name in names]
        marked = [c == "answer best" for c in answer_classes[4 * number : 4 * number + 4]]
        assert marked == [r == max(rewards) for r in rewards]
    (box,) = page.inputs
    assert box["id"] == "filter" and box["type"] == "search"


# ------------------------------------------------------------------------------------ a real browser
def chromium() -> str | None:
    return next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome") if shutil.which(n)),
        None,
    )


def browse(folder, *flags, fragment=""):
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *flags]
    url = (folder / "report.html").resolve().as_uri() + fragment
    return subprocess.run([*command, url], capture_output=True, text=True, timeout=60, cwd=folder)


@pytest.mark.skipif(chromium() is None, reason="no chromium installed (apt-get install chromium)")
def test_headless_chromium_shows_the_table_and_a_plot(folder, tmp_path):
    import matplotlib.image

    shot = tmp_path / "report.png"
    result = browse(folder, f"--screenshot={shot}", "--window-size=1200,2000")
    assert shot.is_file(), result.stderr
    pixels = (matplotlib.image.imread(shot)[..., :3] * 255).round().astype(int)
    assert pixels.shape[:2] == (2000, 1200)
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colours > 200  # text, a table and plots; a blank or unstyled page has a handful

    def share_of(hex_colour, tolerance=3):
        target = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
        return float((np.abs(pixels - target).max(axis=-1) <= tolerance).mean())

    # the results table's header band is drawn, and so is the reward plot: matplotlib's first two colours
    # (its line and histogram edges), which nothing else on the page uses
    assert share_of(html_report.HEADER_BACKGROUND) > 0.002
    assert share_of("#1f77b4", 10) > 0.0005 and share_of("#ff7f0e", 10) > 0.0005

    # the filter runs: `#filter=WORD` leaves one prompt's row shown
    dom = browse(folder, "--dump-dom", "--virtual-time-budget=2000", fragment="#filter=TIGER").stdout
    assert "1 of 12 prompts shown" in dom
    assert dom.count("<tr hidden") == 11
