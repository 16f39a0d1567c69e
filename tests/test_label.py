"""label: parsing typed orders, the judgment log (append, undo, live rows), agreement maths against
hand-computed values, the real command in a pseudo-terminal (rank, undo, quit, resume, kill -9, finish),
plain-text mode from a pipe, --stats, errors, and rankings feeding prepare-data and rm end to end."""

import json
import math
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import pexpect
import pytest
from typer.testing import CliRunner

from instruct_cli.cli import app
from instruct_cli.core import artifacts
from instruct_cli.steps import label
from instruct_cli.steps.label import Command, OrderError, parse_command, parse_order
from tests.test_rm import rm_flags

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.", "Say hello", "Count to three"]


# -------------------------------------------------------------------------------------- parsing orders
@pytest.mark.parametrize("typed", ["2 1 4 3", "2>1>4>3", "2 > 1 > 4 > 3", "2,1,4,3", "2143", " 2  1 4 3 "])
def test_parse_order_spellings_of_one_order(typed):
    assert parse_order(typed, 4) == ([1, 0, 3, 2], [])


@pytest.mark.parametrize("typed", ["2 1=4 3", "2>1=4>3", "2 1 = 4 3", "21=43"])
def test_parse_order_ties_are_broken_by_typing_order(typed):
    assert parse_order(typed, 4) == ([1, 0, 3, 2], [[0, 3]])
    assert parse_order("4=1 2=3", 4) == ([3, 0, 1, 2], [[3, 0], [1, 2]])
    assert label.format_order(*parse_order("2 1=4 3", 4)) == "2 > 1 = 4 > 3"


@pytest.mark.parametrize(
    "typed, message",
    [
        ("", "Type an order"),
        ("2 1 4", "3 is missing"),
        ("2 1 4 3 5", "no response 5"),
        ("0 1 2 3", "no response 0"),
        ("2 2 1 4 3", "appears more than once"),
        ("1=2=3=4", "type `s` to skip"),
        ("2 1=", "`=` must stand"),
        ("2 < 1 4 3", "Cannot read '<'"),
        ("a b", "Cannot read"),
        ("1 2 3 4 x", "Cannot read 'x'"),
    ],
)
def test_parse_order_refuses_bad_input_with_a_reason(typed, message):
    with pytest.raises(OrderError, match=message):
        parse_order(typed, 4)


def test_compact_form_only_below_ten_responses():
    assert parse_order("10 9 8 7 6 5 4 3 2 1", 10)[0] == list(range(9, -1, -1))
    with pytest.raises(OrderError, match="no response 1098"):
        parse_order("1098 7 6 5 4 3 2 1", 10)


def test_parse_command_words_and_view():
    assert parse_command("s", 4) == Command("skip")
    assert parse_command(" F ", 4) == Command("flag")
    assert parse_command("u", 4).action == "undo" and parse_command("quit", 4).action == "quit"
    assert parse_command("m", 4).action == "more" and parse_command("?", 4).action == "help"
    assert parse_command("v 3", 4) == Command("view", response=2) == parse_command("v3", 4)
    assert parse_command("2>1=4>3", 4) == Command("rank", ranking=(1, 0, 3, 2), ties=((0, 3),))
    for bad, message in (("v 5", "no response 5"), ("v", "Say which"), ("x", "Cannot read")):
        with pytest.raises(OrderError, match=message):
            parse_command(bad, 4)


# ------------------------------------------------------------------------------- the log: undo, live rows
def row(labeler, index, **extra):
    return {"labeler": labeler, "index": index, **extra}


def test_undo_takes_back_the_labelers_last_judgment_only():
    rows = [row("a", 0), row("b", 0), row("a", 1), row("b", 1)]
    assert label.undo_last(rows, "a") == 2
    assert label.undo_last(rows, "b") == 3
    assert label.undo_last(rows, "c") is None
    assert label.undo_last([], "a") is None


def test_live_judgments_one_per_labeler_and_prompt_latest_wins():
    rows = [row("a", 0, n=1), row("b", 0, n=2), row("a", 0, n=3), {"junk": True}, row("a", 1, n=4)]
    assert [r["n"] for r in label.live_judgments(rows)] == [2, 3, 4]
    assert [r["n"] for r in label.live_judgments(rows, "a")] == [3, 4]


def test_append_and_undo_on_disk_keep_other_lines_byte_for_byte(tmp_path):
    label.append_judgment(tmp_path, row("a", 0, typed="1 2"))
    (tmp_path / label.RANKINGS).open("a").write('{"labeler": "b",  "index": 0}')  # odd spacing, no newline
    label.append_judgment(tmp_path, row("a", 1, typed="2 1"))
    label.append_judgment(tmp_path, row("b", 1, typed="1 2"))
    lines = (tmp_path / label.RANKINGS).read_text().splitlines()
    assert len(lines) == 4 and lines[1] == '{"labeler": "b",  "index": 0}'  # the cut line did not swallow the next
    assert label.undo_judgment(tmp_path, "a")["index"] == 1
    assert (tmp_path / label.RANKINGS).read_text().splitlines() == [lines[0], lines[1], lines[3]]
    assert label.undo_judgment(tmp_path, "a")["index"] == 0
    assert label.undo_judgment(tmp_path, "a") is None
    assert [r["index"] for r in artifacts.read_jsonl(tmp_path / label.UNDONE)] == [1, 0]
    assert [r["labeler"] for r in artifacts.read_jsonl(tmp_path / label.RANKINGS)] == ["b", "b"]
    (tmp_path / "empty").mkdir()
    assert label.undo_judgment(tmp_path / "empty", "a") is None


def test_sample_store_keeps_the_first_sample_of_a_prompt(tmp_path):
    store = label.SampleStore(tmp_path)
    first = store.add(0, [{"role": "user", "content": "hi"}], ["a", "b"], {"seed": 0})
    other = label.SampleStore(tmp_path)  # another process sharing the folder
    assert other.add(0, [{"role": "user", "content": "hi"}], ["c", "d"], {"seed": 1})["responses"] == ["a", "b"]
    assert store.get(0) == first and len(artifacts.read_jsonl(tmp_path / label.SAMPLES)) == 1
    store.add(1, [{"role": "user", "content": "yo"}], ["e", "f"], {})
    other.refresh()
    assert other.indices() == [0, 1]


def test_line_budgets_give_short_responses_their_lines_and_share_the_rest():
    assert label.line_budgets([1, 30, 1, 1], 13) == [1, 10, 1, 1]
    assert label.line_budgets([20, 30, 1, 1], 14) == [6, 6, 1, 1]
    assert label.line_budgets([3, 3], 100) == [3, 3]
    assert label.line_budgets([9, 9, 9], 0) == [2, 2, 2]  # a tiny terminal still shows the start of each


def test_screen_text_is_clipped_and_made_safe():
    shown, hidden = label.clip("\n".join(f"line {i}" for i in range(10)), 40, 3)
    assert shown.splitlines() == ["line 0", "line 1", "line 2"] and hidden == 7
    assert label.clip("short", 40, 3) == ("short", 0)
    assert label.printable("a\x1b[2Jb\n\tc") == "a\\x1b[2Jb\n\tc"


# ---------------------------------------------------------------------------------- agreement maths
def places(typed, k=4):
    return label.levels(*parse_order(typed, k))


def test_levels_give_tied_responses_one_place():
    assert places("2 1=4 3") == {1: 0, 0: 1, 3: 1, 2: 2}
    assert places("1 2 3 4") == {0: 0, 1: 1, 2: 2, 3: 3}


def test_agreement_and_kendall_tau_match_hand_computed_values():
    same = places("1 2 3 4")
    assert label.pairwise_agreement(same, same) == (6, 6) and label.kendall_tau(same, same) == 1.0
    reversed_ = places("4 3 2 1")
    assert label.pairwise_agreement(same, reversed_) == (0, 6) and label.kendall_tau(same, reversed_) == -1.0
    one_swap = places("2 1 3 4")  # 5 concordant, 1 discordant pair: tau = 4/6
    assert label.pairwise_agreement(same, one_swap) == (5, 6)
    assert label.kendall_tau(same, one_swap) == pytest.approx(4 / 6)
    # with a tie: pairs (0,1) discordant, (0,2) tied in one, the other 4 concordant; tau-b = 3 / sqrt(6 * 5)
    tied = places("2 1=3 4")
    assert label.pairwise_agreement(same, tied) == (4, 5)
    assert label.kendall_tau(same, tied) == pytest.approx(3 / math.sqrt(30))


def test_agreement_over_labelers_pools_pairs_and_averages_tau():
    rows = [
        {"labeler": "a", "index": 0, "ranking": [0, 1, 2, 3], "ties": []},
        {"labeler": "b", "index": 0, "ranking": [1, 0, 2, 3], "ties": []},
        {"labeler": "a", "index": 1, "ranking": [0, 1, 2], "ties": []},
        {"labeler": "b", "index": 1, "ranking": [0, 1, 2], "ties": []},
        {"labeler": "b", "index": 2, "ranking": [0, 1, 2], "ties": []},  # only b: no overlap
        {"labeler": "a", "index": 2, "skipped": True},
    ]
    (result,) = label.agreement(rows)
    assert result["labelers"] == ("a", "b") and result["prompts"] == 2 and result["pairs"] == 9
    assert result["agreement"] == pytest.approx(8 / 9)
    assert result["kendall_tau"] == pytest.approx((4 / 6 + 1) / 2)


# ------------------------------------------------------------------------------ the real command, in a pty
@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory, tiny_model_dir):
    return make_prompts(tmp_path_factory.mktemp("prompts"), tiny_model_dir, PROMPTS)


def make_prompts(folder, model_dir, prompts):
    (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
    result = runner.invoke(
        app,
        [
            "prepare-data",
            "-i",
            str(folder / "prompts.txt"),
            "-o",
            str(folder / "data"),
            "--task",
            "prompts",
            "--eval-fraction",
            "0",
            "--model",
            str(model_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    return folder / "data"


def label_args(model_dir, prompts, out, labeler="alice"):
    # temperature 2: the random tiny model says only newlines at 1.0, and empty responses are dropped by prepare-data
    return [
        "label",
        "--model",
        str(model_dir),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--k",
        "4",
        "--labeler",
        labeler,
        "--quantization",
        "none",
        "--max-new-tokens",
        "12",
        "--temperature",
        "2",
        "--top-p",
        "1",
        "--batch-size",
        "4",
    ]


def spawn(args):
    env = dict(os.environ, TERM="xterm-256color", PAGER="cat", OMP_NUM_THREADS="1")  # tiny model: one thread
    child = pexpect.spawn(
        sys.executable,
        ["-m", "instruct_cli", *args],
        cwd=str(REPO),
        env=env,
        encoding="utf-8",
        dimensions=(30, 110),
        timeout=180,
    )
    child.logfile_read = transcript = Transcript()
    return child, transcript


class Transcript:
    """What the labeler saw, for failure messages and for checks on what was (not) shown."""

    def __init__(self):
        self.text = ""

    def write(self, data):
        self.text += data

    def flush(self):
        pass


def screen_of(child, position, index):
    child.expect(rf"prompt {position} of 4 \(#{index}\)")
    child.expect("rank>")


@pytest.fixture(scope="module")
def alice_labels(tmp_path_factory, tiny_model_dir, prompts_dir, isolated_cache):
    """Alice labels in a terminal: ranks two prompts, undoes one, quits; resumes, ranks one, is killed (-9)
    while typing; resumes and finishes. Returns the labels folder and what each session showed."""
    out = tmp_path_factory.mktemp("alice") / "labels"
    args = label_args(tiny_model_dir, prompts_dir, out)
    shown = {}

    child, shown["first"] = spawn(args)
    screen_of(child, 1, 0)
    child.sendline("2 1 4 3")
    screen_of(child, 2, 1)
    child.sendline("2>1=4>3")
    screen_of(child, 3, 2)
    child.sendline("u")
    child.expect(r"prompt 2 of 4 \(#1\)")
    child.expect(r"Undid your judgment of prompt #1")
    child.expect("rank>")
    child.sendline("1 2 5")
    child.expect("There is no response 5")
    child.sendline("v 2")  # the pager (cat here) shows response 2 in full, then the screen comes back
    screen_of(child, 2, 1)
    child.sendline("1 2 3 4")
    screen_of(child, 3, 2)
    child.sendline("q")
    child.expect(pexpect.EOF)
    child.close()
    shown["first_exit"] = child.exitstatus
    shown["after_first"] = (out / label.RANKINGS).read_text()

    child, shown["second"] = spawn(args)
    screen_of(child, 3, 2)  # resumes at the next unlabelled prompt
    child.sendline("1 3 2 4")
    screen_of(child, 4, 3)
    child.send("4 3")  # being typed when the session is killed
    child.kill(signal.SIGKILL)
    child.expect(pexpect.EOF)
    child.close()
    shown["second_signal"] = child.signalstatus
    shown["after_kill"] = (out / label.RANKINGS).read_text()

    child, shown["third"] = spawn(args)
    screen_of(child, 4, 3)
    child.sendline("4 3 2 1")
    child.expect("judged this session")
    child.expect(pexpect.EOF)
    child.close()
    shown["third_exit"] = child.exitstatus
    return out, shown


def typed_rows(path, labeler="alice"):
    return [
        (r["index"], r["typed"], r["ranking"], r["ties"]) for r in artifacts.read_jsonl(path) if r["labeler"] == labeler
    ]


def test_terminal_session_rank_undo_quit_resume_kill_finish(alice_labels):
    out, shown = alice_labels
    assert shown["first_exit"] == 0 and shown["second_signal"] == signal.SIGKILL and shown["third_exit"] == 0
    first = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown["first"].text)  # without the terminal's colour codes
    assert "╭─ 1 ─" in first and "╭─ 4 ─" in first and "╭─ prompt" in first  # the prompt and K numbered panels
    assert typed_rows(out / label.RANKINGS) == [
        (0, "2 1 4 3", [1, 0, 3, 2], []),
        (1, "1 2 3 4", [0, 1, 2, 3], []),
        (2, "1 3 2 4", [0, 2, 1, 3], []),
        (3, "4 3 2 1", [3, 2, 1, 0], []),
    ]
    assert typed_rows(out / label.UNDONE) == [(1, "2>1=4>3", [1, 0, 3, 2], [[0, 3]])]
    # quitting and kill -9 lost nothing typed and entered; only the half-typed "4 3" is gone
    assert len(shown["after_first"].splitlines()) == 2 and len(shown["after_kill"].splitlines()) == 3
    # samples were drawn once per prompt; the resumed sessions reused them and never loaded the model
    samples = artifacts.read_jsonl(out / label.SAMPLES)
    assert sorted(s["index"] for s in samples) == [0, 1, 2, 3]
    assert "Loading the model" not in shown["third"].text
    rows = artifacts.read_jsonl(out / label.RANKINGS)
    for r in rows:
        sample = next(s for s in samples if s["index"] == r["index"])
        assert [resp[0]["content"] for resp in r["responses"]] == sample["responses"]
        assert r["prompt"] == [{"role": "user", "content": PROMPTS[r["index"]]}]
        assert r["generation"]["temperature"] == 2.0 and r["generation"]["k"] == 4
        assert r["seconds"] >= 0 and r["time"] and r["id"]
    assert artifacts.read_manifest(out)["kind"] == "labels"


@pytest.fixture(scope="module")
def two_labelers(alice_labels, tmp_path_factory, tiny_model_dir, prompts_dir):
    """Bob labels a copy of Alice's folder from a pipe (plain text), with a tie, a skip and a flag."""
    out = tmp_path_factory.mktemp("two") / "labels"
    shutil.copytree(alice_labels[0], out)
    result = runner.invoke(
        app, label_args(tiny_model_dir, prompts_dir, out, labeler="bob"), input="2 1 4 3\nnonsense\n2 1=3 4\ns\nf\n"
    )
    return out, result


def test_plain_text_mode_reads_commands_from_a_pipe(two_labelers, tiny_model_dir, prompts_dir):
    out, result = two_labelers
    assert result.exit_code == 0, result.output
    assert "== prompt 1 of 4 (#0) · labeler bob ==" in result.output and "Cannot read" in result.output
    assert "\x1b[" not in result.output  # plain text, no terminal codes
    bob = [r for r in artifacts.read_jsonl(out / label.RANKINGS) if r["labeler"] == "bob"]
    assert [(r["index"], r.get("ranking"), r.get("ties"), r.get("skipped"), r.get("flagged")) for r in bob] == [
        (0, [1, 0, 3, 2], [], None, None),
        (1, [1, 0, 2, 3], [[0, 2]], None, None),
        (2, None, None, True, None),
        (3, None, None, None, True),
    ]
    assert "judged this session" in result.output and "4 (2 ranked, 1 skipped, 1 flagged)" in result.output
    again = runner.invoke(app, label_args(tiny_model_dir, prompts_dir, out, labeler="bob"), input="")
    assert again.exit_code == 0 and "Nothing left to label for bob" in again.output


def test_stats_counts_and_agreement(two_labelers):
    out, _ = two_labelers
    result = runner.invoke(app, ["label", "--stats", str(out)])
    assert result.exit_code == 0, result.output
    # prompt 0: same order (6 of 6 pairs, tau 1); prompt 1: `1 2 3 4` vs `2 1=3 4` (4 of 5, tau 3/sqrt(30))
    (pair,) = label.agreement(label.live_judgments(artifacts.read_jsonl(out / label.RANKINGS)))
    assert pair["pairs"] == 11 and pair["agreement"] == pytest.approx(10 / 11)
    assert pair["kendall_tau"] == pytest.approx((1 + 3 / math.sqrt(30)) / 2)
    for text in ("alice / bob", "0.909", "+0.774", "prompts ranked by 2+ labelers", "alice", "bob"):
        assert text in result.output, result.output


def test_rankings_feed_prepare_data_and_rm(two_labelers, tiny_model_dir, tmp_path):
    out, _ = two_labelers
    result = runner.invoke(
        app,
        [
            "prepare-data",
            "-i",
            str(out),
            "-o",
            str(tmp_path / "prefs"),
            "--task",
            "prefs",
            "--eval-fraction",
            "0.2",
            "--model",
            str(tiny_model_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = artifacts.read_manifest(tmp_path / "prefs")
    assert manifest["sources"][0]["format"] == "ranked"
    assert manifest["dropped"]["flagged"] == 2  # bob's skip and flag
    kept = manifest["counts"]["train"] + manifest["counts"]["eval"]
    # 6 rankings; bob's first equals alice's (a duplicate); a response the random model left empty drops its row
    assert kept + manifest["dropped"].get("duplicate", 0) + manifest["dropped"].get("empty", 0) == 6 and kept >= 2
    row = json.loads((tmp_path / "prefs" / "prefs.train.jsonl").read_text().splitlines()[0])
    assert len(row["responses"]) == 4 and sorted(row["ranking"]) == [0, 1, 2, 3]
    result = runner.invoke(
        app,
        rm_flags(
            tiny_model_dir,
            tmp_path / "prefs",
            tmp_path / "rm",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--eval-every",
            "2",
        ),
    )
    assert result.exit_code == 0, result.output
    assert artifacts.require_complete(tmp_path / "rm", "rm")["status"] == "complete"


# ------------------------------------------------------------------------------------------------ errors
def test_errors_are_one_paragraph_with_exit_code_2(tmp_path, tiny_model_dir, prompts_dir, alice_labels):
    other_prompts = make_prompts(tmp_path, tiny_model_dir, ["Something else entirely", "And more"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    base = label_args(tiny_model_dir, prompts_dir, tmp_path / "new")
    labels = str(alice_labels[0])

    def with_flag(flag, value, args=base):
        position = args.index(flag)
        return args[: position + 1] + [str(value)] + args[position + 2 :]

    cases = [
        (["label"], "needs --prompts"),
        (with_flag("--prompts", tmp_path / "missing"), "does not exist"),
        (with_flag("--prompts", tmp_path / "prompts.txt"), "takes a data folder"),
        (with_flag("--k", 1), "at least 2"),
        (with_flag("--k", 3, with_flag("--out", labels)), "started with --k 4"),
        (with_flag("--prompts", other_prompts, with_flag("--out", labels)), "started with other prompts"),
        (with_flag("--out", tmp_path / "busy"), "not a labels folder"),
        (with_flag("--out", prompts_dir), "holds a 'data' output"),
        (base + ["--split", "eval"], "has no prompts"),
        (base + ["--max-prompts", "0"], "--max-prompts must be greater than 0"),
        (["label", "--stats", str(tmp_path)], "has no rankings.jsonl"),
    ]
    for args, expected in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output and "Traceback" not in result.output, (args, result.output)
    assert not (tmp_path / "new").exists()  # nothing was created by a refused command


def test_help_has_examples():
    result = runner.invoke(app, ["label", "--help"])
    assert result.exit_code == 0
    assert "instruct label --model runs/sft --prompts data/prompts" in result.output and "--stats" in result.output
