"""report.html of `instruct eval` (step 5 of `run`): the report as one self-contained web page.

Owns the page: the verdict, the results table, every plot inline (the PNGs as base64 data URIs), every prompt
with all models' answers side by side and each answer's reward, and a text box that filters the answers by
prompt. It is read offline in any browser: no external CSS, script, font or image, and a Content-Security-Policy
that forbids loading any. Figures and words come from `report` (the same table rows, verdict and sentences as
report.md), nothing is recomputed. Uses the standard library, `report`, `reward_fns` (the reward functions'
table) and `judges` (the --judge reward models' table); nothing else of this package.
"""

from __future__ import annotations

import base64
import html
import mimetypes
from pathlib import Path

from instruct_cli.steps.evaluate import judges, reward_fns
from instruct_cli.steps.evaluate.report import (
    CAUTION,
    PLOT_TITLES,
    TABLE_COLUMNS,
    how_to_read,
    reward_model_lines,
    sampling_sentence,
    table_rows,
    value_text,
)

HEADER_BACKGROUND = "#dfe7f1"
"""The background of the tables' header rows (the browser test looks for it on the screenshot)."""
BEST_BACKGROUND = "#e3f4e1"
"""The background of the best-rewarded answer(s) of a prompt."""
TIE = 1e-6
"""Rewards this close count as equal when the best answer of a prompt is marked (as win-rate ties)."""

STYLE = """
:root { color-scheme: light; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1d232b;
       background: #fff; margin: 0; }
main { max-width: 1500px; margin: 0 auto; padding: 1.2em 1.6em 3em; }
h1 { font-size: 1.6em; margin: 0.2em 0 0.6em; }
h2 { font-size: 1.25em; margin: 1.6em 0 0.5em; border-bottom: 1px solid #d5dbe3; padding-bottom: 0.2em; }
h3 { font-size: 1.05em; margin: 1em 0 0.4em; }
.verdict p { margin: 0.3em 0; font-weight: 600; }
.verdict p.caution { font-weight: 400; color: #8a4b00; background: #fff4e0; padding: 0.3em 0.6em; }
.note { color: #4a5563; font-size: 0.92em; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #c9d1dc; padding: 0.35em 0.6em; vertical-align: top; text-align: left; }
thead th { background: HEADER_BACKGROUND; position: sticky; top: 0; }
#results th { white-space: nowrap; }
#results td + td { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
#results tr.baseline td { background: #f3f5f8; }
#results td:first-child, #answers th { overflow-wrap: anywhere; }
figure { margin: 0.8em 0 1.4em; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e7ec; }
figcaption { font-weight: 600; margin-bottom: 0.3em; }
.filter { display: flex; gap: 0.8em; align-items: center; margin: 0.6em 0; }
.filter input { font: inherit; padding: 0.3em 0.5em; width: 28em; max-width: 60vw; }
#answers { table-layout: fixed; width: 100%; }
#answers th.number { width: 2.8em; }
#answers th.prompt { width: 22%; }
#answers td { white-space: pre-wrap; overflow-wrap: anywhere; }
#answers td.best { background: BEST_BACKGROUND; }
.meta { display: block; white-space: normal; font-size: 0.85em; color: #4a5563; margin-bottom: 0.3em; }
.meta b { color: #1d232b; }
.role { font-size: 0.8em; text-transform: uppercase; color: #6b7480; margin-right: 0.4em; }
.message + .message { margin-top: 0.4em; }
.empty { color: #8a939e; font-style: italic; }
code { font-size: 0.9em; }
""".replace("HEADER_BACKGROUND", HEADER_BACKGROUND).replace("BEST_BACKGROUND", BEST_BACKGROUND)

# Filters the answers table by the text of each prompt (case-insensitive). The box starts with the URL's
# `#filter=TEXT` fragment, so that a filtered view can be linked to (and checked in a headless browser).
SCRIPT = """
(function () {
  var box = document.getElementById("filter");
  var shown = document.getElementById("shown");
  var rows = Array.prototype.slice.call(document.querySelectorAll("#answers tbody tr"));
  function apply() {
    var query = box.value.trim().toLowerCase();
    var count = 0;
    rows.forEach(function (row) {
      var match = row.querySelector("td.prompt").textContent.toLowerCase().indexOf(query) !== -1;
      row.hidden = !match;
      if (match) { count += 1; }
    });
    shown.textContent = count + " of " + rows.length + " prompts shown";
  }
  var hash = window.location.hash;
  if (hash.indexOf("#filter=") === 0) { box.value = decodeURIComponent(hash.slice(8)); }
  box.addEventListener("input", apply);
  apply();
})();
"""

POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
"""The page may load nothing from anywhere: only its own inline style, script and data-URI images."""


def escape(text: object) -> str:
    """Any text as HTML text or attribute value (quotes escaped too)."""
    return html.escape(str(text), quote=True)


def render_html(report: dict, samples: list[dict], folder: Path) -> str:
    """report.html: the verdict, the results table, the plots (read from `folder`), the answers side by side
    with a filter box, and the inputs. `report` is report.json's content, `samples` samples.jsonl's rows."""
    title = f"Evaluation report: {report['prompts']} prompts, baseline {report['baseline']}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        "<main>",
        "<h1>Evaluation report</h1>",
        verdict_section(report["verdict"]),
        results_section(report),
        plots_section(report["plots"], Path(folder)),
        answers_section(samples, report["baseline"]),
        inputs_section(report["inputs"]),
        "</main>",
        f"<script>{SCRIPT}</script>",
        "</body>",
        "</html>",
    ]
    return "\n".join(part for part in parts if part) + "\n"


def verdict_section(lines: list[str]) -> str:
    """The verdict, one paragraph per sentence; the reward-model caution set apart."""
    paragraphs = [
        f'<p class="caution">{escape(line)}</p>' if line.startswith(CAUTION) else f"<p>{escape(line)}</p>"
        for line in lines
    ]
    return '<section class="verdict" id="verdict">\n' + "\n".join(paragraphs) + "\n</section>"


def results_section(report: dict) -> str:
    """The results table (report.md's rows), how the answers were sampled, the reward model, how to read it."""
    header = "".join(f'<th scope="col">{escape(column)}</th>' for column in TABLE_COLUMNS)
    body = []
    for model, row in zip(report["models"], table_rows(report)):
        cells = "".join(f"<td>{escape(cell)}</td>" for cell in row)
        body.append(f'<tr class="baseline">{cells}</tr>' if model["baseline"] else f"<tr>{cells}</tr>")
    reward_model = "".join(f"<p>{escape(line)}</p>" for line in reward_model_lines(report))
    return "\n".join(
        [
            "<h2>Results</h2>",
            f"<p>{escape(sampling_sentence(report))} Baseline: <strong>{escape(report['baseline'])}</strong>.</p>",
            f'<table id="results">\n<thead><tr>{header}</tr></thead>\n<tbody>\n'
            + "\n".join(body)
            + "\n</tbody>\n</table>",
            functions_table(report),
            judges_table(report),
            reward_model,
            f'<p class="note">{escape(how_to_read(report))}</p>',
        ]
    )


def functions_table(report: dict) -> str:
    """The reward functions' table (report.md's rows): empty without reward functions."""
    return simple_table("Reward functions", "reward-functions", reward_fns.TABLE_COLUMNS, reward_fns.table_rows(report))


def judges_table(report: dict) -> str:
    """The --judge reward models' table (report.md's rows): empty without judges."""
    return simple_table("Judges", "judges", judges.TABLE_COLUMNS, judges.table_rows(report))


def simple_table(title: str, table_id: str, columns: list[str], rows: list[list[str]]) -> str:
    """A titled table of escaped text cells; empty when there are no rows."""
    if not rows:
        return ""
    header = "".join(f'<th scope="col">{escape(column)}</th>' for column in columns)
    body = "\n".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return (
        f'<h3>{escape(title)}</h3>\n<table id="{table_id}">\n<thead><tr>{header}</tr></thead>\n<tbody>\n'
        f"{body}\n</tbody>\n</table>"
    )


def data_uri(path: Path) -> str:
    """A file as a base64 data URI (its type guessed from the name: image/png, image/svg+xml)."""
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def plots_section(plots: list[str], folder: Path) -> str:
    """Every plot of the report inline, under its title (a plot whose file is gone is said to be missing)."""
    if not plots:
        return ""
    figures = ["<h2>Plots</h2>"]
    for plot in plots:
        title = escape(PLOT_TITLES.get(plot, plot))
        path = folder / plot
        if path.is_file():
            image = f'<img src="{data_uri(path)}" alt="{title}">'
        else:
            image = f'<p class="empty">{escape(plot)} is missing from {escape(folder)}</p>'
        figures.append(f"<figure>\n<figcaption>{title}</figcaption>\n{image}\n</figure>")
    return "\n".join(figures)


def prompt_cell(messages: list[dict]) -> str:
    """A prompt: its one message as is, or every message of the conversation under its role."""
    if len(messages) == 1:
        return escape(messages[0].get("content", ""))
    return "".join(
        f'<div class="message"><span class="role">{escape(m.get("role", ""))}</span>{escape(m.get("content", ""))}</div>'
        for m in messages
    )


def answer_cell(answer: dict, best: bool) -> str:
    """One model's answer: its reward, length, EOS and KL above the text."""
    facts = [f"reward <b>{answer['reward']:+.2f}</b>", f"{answer['tokens']} token" + "s" * (answer["tokens"] != 1)]
    if answer.get("eos") is False:
        facts.append("no EOS")
    if answer.get("kl") is not None:
        facts.append(f"KL {answer['kl']:.2f}")
    facts += [f"{escape(name)} {value_text(value)}" for name, value in (answer.get("reward_fn") or {}).items()]
    facts += [f"judge {escape(name)} {value:+.2f}" for name, value in (answer.get("judges") or {}).items()]
    text = escape(answer["text"]) if answer["text"] else '<span class="empty">(empty)</span>'
    meta = f'<span class="meta">{" · ".join(facts)}</span>'
    return f'<td class="answer best">{meta}{text}</td>' if best else f'<td class="answer">{meta}{text}</td>'


def answers_section(samples: list[dict], baseline: str) -> str:
    """Every prompt with each model's answer in its own column; the best-rewarded answer of a row is marked."""
    if not samples:
        return ""
    names = list(samples[0]["responses"])
    header = '<th class="number" scope="col">#</th><th class="prompt" scope="col">prompt</th>' + "".join(
        f'<th scope="col">{escape(name)}{" (baseline)" if name == baseline else ""}</th>' for name in names
    )
    rows = []
    for number, row in enumerate(samples, start=1):
        answers = [row["responses"][name] for name in names]
        top = max(answer["reward"] for answer in answers)
        cells = "".join(answer_cell(answer, len(names) > 1 and answer["reward"] >= top - TIE) for answer in answers)
        rows.append(
            f'<tr><td class="number">{number}</td><td class="prompt">{prompt_cell(row["prompt"])}</td>{cells}</tr>'
        )
    return "\n".join(
        [
            "<h2>Answers side by side</h2>",
            '<p class="note">Every prompt with each model\'s answer and its reward; the highest reward of a prompt '
            "is shaded green.</p>",
            '<div class="filter"><label for="filter">Filter prompts</label>'
            '<input id="filter" type="search" placeholder="text in the prompt" autocomplete="off">'
            f'<span id="shown">{len(samples)} of {len(samples)} prompts shown</span></div>',
            f'<table id="answers">\n<thead><tr>{header}</tr></thead>\n<tbody>\n'
            + "\n".join(rows)
            + "\n</tbody>\n</table>",
        ]
    )


def inputs_section(inputs: dict) -> str:
    """The inputs of the report with their content hashes."""
    rows = "".join(
        f"<tr><td>{escape(key)}</td><td>{escape(record.get('path', ''))}</td>"
        f"<td><code>{escape(str(record.get('sha256', ''))[:12])}</code></td></tr>\n"
        for key, record in inputs.items()
    )
    return (
        '<h2>Inputs</h2>\n<table id="inputs">\n<thead><tr><th scope="col">input</th><th scope="col">path</th>'
        f'<th scope="col">sha256</th></tr></thead>\n<tbody>\n{rows}</tbody>\n</table>'
    )
