"""`instruct chat`: context across turns (in a real terminal and in the prompt builder), /reset, /system,
/save rows that prepare-data reads, plain mode from a pipe, the context window, Ctrl-C / Ctrl-D, bad flags.

The model is a run folder with a strong random adapter on the tiny model: unlike the bare tiny model (whose
greedy answer is newlines whatever it is asked), its greedy answer changes with the conversation before it.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from typer.testing import CliRunner

from instruct_cli.cli import app
from instruct_cli.core import chat, models
from instruct_cli.core.config import ChatConfig
from instruct_cli.core.errors import UserError
from instruct_cli.steps import chat as chat_step
from tests.test_models import make_run_folder

REPO = Path(__file__).resolve().parents[1]
QUESTION = "apple banana"
FLAGS = ["--quantization", "none", "--greedy", "--max-new-tokens", "8"]
runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    return make_run_folder(tmp_path_factory.mktemp("chat-run"), tiny_model_dir)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return models.load_tokenizer(str(tiny_model_dir))


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def generate_answers(model, prompts, tmp_path):
    """What `instruct generate` answers (greedy, one prompt per batch) for each list of messages."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": messages}) + "\n" for messages in prompts))
    out = tmp_path / "answers.jsonl"
    result = invoke("generate", "--model", model, "--input", path, "--output", out, "--batch-size", 1, *FLAGS)
    assert result.exit_code == 0, result.output
    return [json.loads(line)["response"] for line in out.read_text().splitlines()]


def saved_rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ----------------------------------------------------------------------------------- the prompt window
def test_prompt_window_renders_the_whole_history(tokenizer):
    turns = [user("first question"), assistant("first answer"), user("second question")]
    ids, hidden = chat_step.prompt_window(tokenizer, "Be brief.", turns, budget=None)
    system = {"role": "system", "content": "Be brief."}
    first_turn = chat.template_ids(tokenizer, [system, *turns[:2]])
    assert hidden == 0
    assert ids[: len(first_turn)] == first_turn and len(ids) > len(first_turn)  # the first exchange, then more
    assert ids == chat.encode_prompt(tokenizer, [system, *turns])
    assert "first answer" in tokenizer.decode(ids)


def test_prompt_window_leaves_out_the_oldest_exchanges_but_keeps_the_system_prompt(tokenizer):
    turns = []
    for number in range(3):
        turns += [user(f"question {number} apple banana cherry"), assistant(f"answer {number} red green blue")]
    turns.append(user("last question"))
    system = {"role": "system", "content": "You are a helpful assistant."}
    last_two = chat.encode_prompt(tokenizer, [system, *turns[4:]])  # the last exchange and the new message
    ids, hidden = chat_step.prompt_window(tokenizer, system["content"], turns, budget=len(last_two))
    assert (ids, hidden) == (last_two, 2)
    ids, hidden = chat_step.prompt_window(tokenizer, system["content"], turns, budget=len(last_two) - 1)
    assert (ids, hidden) == (chat.encode_prompt(tokenizer, [system, turns[-1]]), 3)
    assert chat_step.prompt_window(tokenizer, system["content"], turns, budget=5) == (None, 3)
    ids, hidden = chat_step.prompt_window(tokenizer, system["content"], turns, budget=None, skip=1)
    assert hidden == 1 and ids == chat.encode_prompt(tokenizer, [system, *turns[2:]])  # the window never moves back


# ------------------------------------------------------------------------------------ a real terminal
def spawn(*args):
    env = dict(os.environ, TERM="xterm-256color", OMP_NUM_THREADS="1")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "instruct_cli", "chat", *map(str, args)],
        cwd=str(REPO),
        env=env,
        encoding="utf-8",
        codec_errors="replace",
        dimensions=(30, 120),
        timeout=120,
    )
    child.logfile_read = transcript = Transcript()
    return child, transcript


class Transcript:
    """Everything the terminal showed, for failure messages and checks."""

    def __init__(self):
        self.text = ""

    def write(self, data):
        self.text += data

    def flush(self):
        pass


def say(child, line, expect=">>> "):
    child.sendline(line)
    child.expect(expect)
    if expect != ">>> ":
        child.expect(">>> ")


def test_chat_keeps_context_in_a_terminal(tmp_path, run_dir):
    saved = tmp_path / "chats.jsonl"
    child, shown = spawn("--model", run_dir, *FLAGS)
    child.expect("/help for commands")
    child.expect(">>> ")
    say(child, QUESTION)
    say(child, QUESTION)  # the same question, now with the first exchange before it
    say(child, f"/save {saved}", expect="Saved the conversation")
    say(child, "/reset", expect="New conversation")
    say(child, QUESTION)
    say(child, f"/save {saved}", expect="2 conversation")
    say(child, "/reset")
    say(child, "/system You are a helpful assistant.", expect="System prompt set")
    say(child, QUESTION)
    say(child, f"/save {saved}", expect="3 conversation")
    say(child, "/help", expect="append the conversation to FILE")
    say(child, "/nonsense", expect="Unknown command /nonsense")
    child.sendeof()  # Ctrl-D
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, shown.text
    assert "Traceback" not in shown.text

    first, after_reset, with_system = saved_rows(saved)
    assert [m["role"] for m in first["messages"]] == ["user", "assistant", "user", "assistant"]
    answer_1, answer_2 = first["messages"][1]["content"], first["messages"][3]["content"]
    assert answer_1 and answer_2 != answer_1  # same question, different conversation before it
    assert after_reset["messages"] == [user(QUESTION), assistant(answer_1)]  # /reset forgot the first exchange
    system = {"role": "system", "content": "You are a helpful assistant."}
    assert with_system["messages"][0] == system and with_system["messages"][1] == user(QUESTION)
    # the second answer is exactly what the model says to the whole history, and not to the question alone
    expected = generate_answers(
        run_dir,
        [[user(QUESTION)], [user(QUESTION), assistant(answer_1), user(QUESTION)], [system, user(QUESTION)]],
        tmp_path,
    )
    assert expected == [answer_1, answer_2, with_system["messages"][2]["content"]]


def test_ctrl_c_at_the_prompt_leaves_cleanly(run_dir):
    child, shown = spawn("--model", run_dir, *FLAGS)
    child.expect(">>> ")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, shown.text
    assert "Traceback" not in shown.text and "Interrupted" not in shown.text


def test_ctrl_c_during_an_answer_stops_it_and_drops_the_exchange(tiny_model_dir, capsys):
    class StoppedModel:
        def parameters(self):
            import torch

            yield torch.zeros(1)

        def generate(self, **kwargs):
            raise KeyboardInterrupt

    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    session = chat_step.ChatSession(StoppedModel(), tokenizer, ChatConfig(max_new_tokens=8), context=512)
    session.conversation.turns = [user("hi"), assistant("hello")]
    assert session.send("tell me more") is None
    assert session.conversation.turns == [user("hi"), assistant("hello")]
    assert "Answer stopped" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ plain mode
def test_plain_mode_from_a_pipe_saves_rows_prepare_data_reads(tmp_path, run_dir, tiny_model_dir):
    saved = tmp_path / "chats.jsonl"
    saved.write_text('{"messages": [{"role": "user", "content": "old"}, {"role": "assistant", "content": "row"}]}')
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "instruct_cli", "chat", "--model", str(run_dir), *FLAGS],
        input=f"{QUESTION}\n\nhello world\n/save {saved}\n",
        capture_output=True,
        text=True,
        errors="replace",
        cwd=str(REPO),
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    old, new = saved_rows(saved)  # the existing row (it had no final newline) is kept
    assert old["messages"][1]["content"] == "row"
    assert [m["content"] for m in new["messages"] if m["role"] == "user"] == [QUESTION, "hello world"]
    answers = [m["content"] for m in new["messages"] if m["role"] == "assistant"]
    # stdout holds the two answers and nothing else: no prompt, banner or notice
    assert re.sub(r"\s", "", result.stdout) == re.sub(r"\s", "", "".join(answers))
    assert ">>>" not in result.stdout and "Saved the conversation" in result.stderr

    prepared = tmp_path / "data"
    done = invoke("prepare-data", "-i", saved, "-o", prepared, "--model", tiny_model_dir)  # format detected
    assert done.exit_code == 0, done.output
    rows = [json.loads(line) for split in prepared.glob("sft.*.jsonl") for line in split.read_text().splitlines()]
    assert sorted(json.dumps(row["messages"]) for row in rows) == sorted(json.dumps(r["messages"]) for r in (old, new))


def test_a_long_conversation_leaves_out_its_oldest_exchanges(tmp_path, run_dir):
    saved = tmp_path / "long.jsonl"
    lines = [f"question {n} apple banana cherry" for n in range(4)] + [" ".join(["apple"] * 80), f"/save {saved}"]
    result = invoke("chat", "--model", run_dir, *FLAGS, "--max-context", 64, input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    assert "no longer sees its first" in result.stderr
    assert "too long for the model's context" in result.stderr
    messages = saved_rows(saved)[0]["messages"]  # /save keeps the whole conversation, not just the window
    assert [m["content"] for m in messages if m["role"] == "user"] == lines[:4]


def test_save_refuses_what_prepare_data_could_not_read(tmp_path):
    with pytest.raises(UserError, match="not a .jsonl file"):
        chat_step.save_conversation(tmp_path / "notes.txt", [user("a"), assistant("b")])
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        chat_step.save_conversation(tmp_path / "folder.jsonl", [user("a"), assistant("b")])
    assert chat_step.save_conversation(tmp_path / "new.jsonl", [user("a"), assistant("b")]) == 1


def test_bad_flags_are_one_paragraph_errors(tmp_path, run_dir):
    cases = [
        (["--temperature", "0"], "temperature"),
        (["--max-context", "0"], "max_context"),
        (["--max-context", "8", "--max-new-tokens", "8"], "leaves no room"),
        (["--max-new-tokens", "600"], "attends to 512 tokens"),
        (["--model", tmp_path / "nowhere"], "does not exist"),
        (["--bogus"], "No such option"),
    ]
    for args, expected in cases:
        model = [] if "--model" in args else ["--model", run_dir]
        result = invoke("chat", *model, "--quantization", "none", *args, input="hi\n")
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output and "Traceback" not in result.output, (args, result.output)


def test_help_has_examples():
    result = invoke("chat", "--help")
    assert "Examples" in result.output and "/save" in result.output
