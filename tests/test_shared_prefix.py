"""Shared-prefix packing (core/packing.py): each prompt once, its responses packed after it. The packed rows
give the scores, pairwise loss and LoRA gradients of one sequence per response (pairs, K = 4 rankings with
ties, multi-turn and left-truncated prompts), under sdpa and eager attention, in fp32 and bf16 autocast;
`rm score`/normalisation scoring by prompt equals scoring one by one; the prompt is cut once per group."""

import json

import pytest
import torch
from typer.testing import CliRunner

from instruct_cli.cli import app
from instruct_cli.core import config as cfg
from instruct_cli.core import heads, lm, models, packing, preferences, recipes

runner = CliRunner()


# ------------------------------------------------------------------------------------------- the layout
def test_pack_lays_out_prefix_once_and_restarts_positions():
    groups = [[[1, 2, 3, 4], [1, 2, 5]], [[7, 8]]]  # shared prefix [1, 2]; a lone sequence keeps its last token
    batch = packing.pack(groups, pad_id=0, device="cpu")
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 0, 0, 0]]
    assert batch["segments"].tolist() == [[0, 0, 1, 1, 2], [0, 1, -1, -1, -1]]
    assert batch["ends"].tolist() == [3, 4, 6]  # flat indices of each sequence's last token
    mask = packing.attention_mask(batch["segments"], "sdpa", torch.float32)[0, 0]
    assert mask.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, False, False, True],  # response 2 sees the prompt and itself, not response 1
    ]
    additive = packing.attention_mask(batch["segments"], "eager", torch.float32)[0, 0]
    assert torch.equal(additive == 0, mask)
    assert packing.shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # identical: each keeps its last token
    assert packing.shared_prefix_length([[1, 2], [3, 2]]) == 0
    assert packing.packed_length([[1, 2, 3, 4], [1, 2, 5]]) == 5


def test_prompt_is_cut_once_for_the_whole_group():
    prompt = list(range(100, 130))  # 30 shared tokens
    long, short, huge = prompt + [1] * 20, prompt + [2] * 5, prompt + [3] * 60
    cut = preferences.cut_group([long, short], max_length=40)
    assert cut == [long[10:], short[10:]]  # the same 10 prompt tokens go from both responses
    assert packing.shared_prefix_length(cut) == 20
    assert preferences.cut_group([long, short], max_length=60) == [long, short]  # nothing to cut
    # a response too long to fit beside the prompt: every response keeps the same last quarter of
    # max_length of the prompt (10 tokens), and the long one its own last 30 tokens (its EOS among them)
    cut = preferences.cut_group([long, short, huge], max_length=40)
    assert cut == [long[20:], short[20:], prompt[-10:] + huge[-30:]]
    assert packing.shared_prefix_length(cut) == 10 and max(len(ids) for ids in cut) == 40
    # no prompt to share: a response longer than max_length keeps its last tokens
    assert preferences.cut_group([[1] * 50, [2] * 10], max_length=40) == [[1] * 40, [2] * 10]


def test_dpo_labels_only_the_answer_tokens_a_cut_kept():
    from instruct_cli.steps import dpo

    prompt = list(range(100, 130))  # 30 shared tokens; the header (prompt + assistant glue) is 28 of them
    sequences = [prompt + [1] * 20, prompt + [3] * 60]
    spans = preferences.cut_spans(sequences, 40)
    kept = [dpo.kept_answer_tokens(span, len(ids), header=28) for span, ids in zip(spans, sequences)]
    # both keep prompt[20:30]: 2 of those 10 are answer (past the header); then 20 and 30 of their own
    assert kept == [22, 32]
    whole = preferences.cut_spans(sequences, 100)  # nothing cut: every answer token is kept
    assert [dpo.kept_answer_tokens(span, len(ids), header=28) for span, ids in zip(whole, sequences)] == [22, 62]


def test_supports_only_attention_that_takes_a_mask():
    from transformers import LlamaConfig, Qwen2Config

    class Stub:
        def __init__(self, config):
            self.config = config

    for implementation, expected in (("sdpa", True), ("eager", True), ("flash_attention_2", False)):
        config = LlamaConfig(num_hidden_layers=1)
        config._attn_implementation = implementation
        assert packing.supports(Stub(config)) is expected, implementation
    sliding = Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=16, max_window_layers=0)
    sliding._attn_implementation = "sdpa"
    assert not packing.supports(Stub(sliding))


# --------------------------------------------------------------------------------- packed == plain
def reward_model(tiny_model_dir, attention: str):
    from peft import get_peft_model

    source = models.resolve_model(str(tiny_model_dir))
    base = models.load_base_model(source, "none", "cpu")
    base.set_attn_implementation(attention)
    options = recipes.build_config(cfg.RMConfig, "rm", None, dict(model=str(tiny_model_dir), lora_dropout=0.0))
    torch.manual_seed(0)  # before peft draws lora_A: the same model whatever ran before in the session
    body = get_peft_model(base, models.lora_config(options))
    for name, param in body.named_parameters():
        if "lora_B" in name:  # a non-zero adapter, so gradients reach lora_A too
            torch.nn.init.normal_(param, std=0.2)
    return heads.RewardModel(body, heads.ScalarHead(heads.hidden_size_of(base), seed=0))


ROWS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "The capital is blue."},
    {
        "prompt": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Write a short poem about the sea."},
            {"role": "assistant", "content": "The sea is blue and always happy."},
            {"role": "user", "content": "Translate to French please."},
        ],
        "responses": ["yes", "La mer est bleue.", "no no no maybe", "hello world one two three four five"],
        "ranking": [1, 3, 0, 2],
        "ties": [[0, 2]],
    },
    {  # a long prompt that max_length cuts from the left
        "prompt": " ".join(["the quick brown fox jumps over the lazy dog"] * 12),
        "responses": ["good", "bad bad bad", "happy apple banana cherry", "one"],
        "ranking": [0, 2, 1, 3],
    },
    {"prompt": "Summarise this text.", "chosen": "Short.", "rejected": "Short."},  # identical responses
]


@pytest.fixture(scope="module")
def groups(tiny_model_dir):
    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    groups, cut = preferences.encode_rows(tokenizer, ROWS, max_length=128, where="test")
    assert cut == 4 and all(len(ids) <= 128 for ids in groups[2].responses)  # the long prompt was cut
    assert packing.shared_prefix_length(groups[2].responses) > 40  # ... once, so its responses still share it
    assert [len(g.responses) for g in groups] == [2, 4, 4, 2]
    return groups, tokenizer.pad_token_id


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    better, worse = preferences.pair_scores(model, batch)
    loss = preferences.pairwise_loss(better, worse, batch["pair_weight"], margin=0.2)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return preferences.response_scores(model, batch).detach(), loss.detach(), grads


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_the_same_scores_loss_and_gradients(tiny_model_dir, groups, attention):
    groups, pad_id = groups
    model = reward_model(tiny_model_dir, attention)
    assert model.packs
    plain = preferences.collate(groups, pad_id, "cpu")
    shared = preferences.collate_shared(groups, pad_id, "cpu")
    assert shared["input_ids"].numel() < plain["input_ids"].numel()  # the prompts are computed once
    assert preferences.batch_tokens(shared) == preferences.batch_tokens(plain)
    for key in ("better", "worse", "pair_weight"):
        assert torch.equal(shared[key], plain[key])
    scores, loss, grads = loss_and_grads(model, plain)
    packed_scores, packed_loss, packed_grads = loss_and_grads(model, shared)
    torch.testing.assert_close(packed_scores, scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed_loss, loss, rtol=0, atol=1e-6)
    assert len(grads) > 8 and grads.keys() == packed_grads.keys()
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name  # every LoRA matrix and the head gets a gradient
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert len(set(scores.tolist())) > 4  # the scores differ, so a mixed-up order would show


def test_packed_rows_match_under_bf16_autocast(tiny_model_dir, groups):
    groups, pad_id = groups
    model = reward_model(tiny_model_dir, "sdpa").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = preferences.response_scores(model, preferences.collate(groups, pad_id, "cpu"))
        packed = preferences.response_scores(model, preferences.collate_shared(groups, pad_id, "cpu"))
    with torch.no_grad():
        exact = preferences.response_scores(model, preferences.collate(groups, pad_id, "cpu"))
    assert (plain - exact).abs().max() > 0  # bf16 did change the arithmetic
    torch.testing.assert_close(packed, plain, rtol=0, atol=2e-2)  # bf16 vs fp32 differ by ~4e-2


def test_dpo_packed_rows_give_the_same_logprobs_loss_and_gradients(tiny_model_dir):
    """DPO's summed answer log-probs (answers that begin alike share their first tokens with the prompt)."""
    from instruct_cli.core.chat import template_ids
    from instruct_cli.steps import dpo

    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    rows = ROWS + [{"prompt": "Say hello.", "chosen": "hello world one", "rejected": "hello world two"}]
    groups, cut = dpo.encode_rows(tokenizer, rows, max_length=128, where="test")
    header = template_ids(tokenizer, [{"role": "user", "content": "Say hello."}], add_generation_prompt=True)
    assert cut == 4 and packing.shared_prefix_length(groups[-1].responses) > len(header)  # into the answers
    for group in groups:
        group.reference_logps = [-3.0 - i for i in range(len(group.responses))]
    model = lm.SequenceLogProbs(reward_model(tiny_model_dir, "sdpa").body)
    assert lm.packs(model.lm)
    config = cfg.DPOConfig(beta=0.3)
    results = []
    for collate in (dpo.collate, dpo.collate_shared):
        batch = collate(groups, tokenizer.pad_token_id, "cpu")
        model.zero_grad(set_to_none=True)
        sums, counts = lm.batch_logprobs(model, batch)
        loss, metrics = dpo.dpo_batch_loss(model, batch, config)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        results.append((sums.detach(), counts, loss.detach(), metrics["tokens"], grads))
    (sums, counts, loss, tokens, grads), (p_sums, p_counts, p_loss, p_tokens, p_grads) = results
    assert torch.equal(p_counts, counts) and p_tokens == tokens
    torch.testing.assert_close(p_sums, sums, rtol=0, atol=1e-4)
    torch.testing.assert_close(p_loss, loss, rtol=0, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(p_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_scoring_by_prompt_equals_scoring_one_by_one(tiny_model_dir, groups):
    groups, pad_id = groups
    model = reward_model(tiny_model_dir, "sdpa").eval()
    sequences = [ids for group in groups for ids in group.responses]
    keys = [number for number, group in enumerate(groups) for _ in group.responses]
    alone = preferences.score_sequences(model, sequences, pad_id, "cpu", batch_size=3)
    grouped = preferences.score_grouped(model, sequences, keys, pad_id, "cpu", batch_size=3)
    assert grouped == pytest.approx(alone, abs=1e-5)


def test_rm_flag_turns_packing_off_with_the_same_first_loss(tmp_path, tiny_model_dir):
    """`--no-shared-prefix` is recorded in the run's config, and with either layout the first step's loss
    on the same single batch is the same."""
    rows = [
        {"prompt": f"{w} is the capital of France?", "chosen": "Paris.", "rejected": f"{w} {w} {w}."}
        for w in ("red", "blue", "green", "apple")
    ]
    raw = tmp_path / "prefs.jsonl"
    raw.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = tmp_path / "data"
    args = ["prepare-data", "-i", raw, "-o", data, "--task", "prefs", "--eval-fraction", "0", "--model", tiny_model_dir]
    assert runner.invoke(app, [str(a) for a in args]).exit_code == 0
    losses = {}
    for flag in ("--shared-prefix", "--no-shared-prefix"):
        out = tmp_path / flag.strip("-")
        args = ["rm", "--model", tiny_model_dir, "--data", data, "--out", out, "--quantization", "none"]
        args += ["--max-steps", "1", "--batch-size", "4", "--lora-dropout", "0", flag]
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        losses[flag] = first["loss/train"]
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["config"]["shared_prefix"] is (flag == "--shared-prefix")
    assert losses["--shared-prefix"] == pytest.approx(losses["--no-shared-prefix"], abs=1e-5)


def test_real_shaped_benchmark_rows(tiny_model_dir):
    """bench_rm --data-shape real: prompts of ~100-400 tokens (some multi-turn), responses of ~30-200."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_common.py"
    spec = importlib.util.spec_from_file_location("bench_common", path)
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    rows = common.real_preference_rows(40, 0, tiny_model_dir)
    assert rows == common.real_preference_rows(40, 0, tiny_model_dir)  # deterministic
    tokenizer = models.load_tokenizer(str(tiny_model_dir))

    def tokens(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    prompts = [sum(tokens(m["content"]) for m in row["prompt"]) for row in rows]
    responses = [tokens(row[side]) for row in rows for side in ("chosen", "rejected")]
    assert 70 <= min(prompts) and max(prompts) <= 480 and 150 < sum(prompts) / len(prompts) < 350
    assert 15 <= min(responses) and max(responses) <= 260
    assert any(len(row["prompt"]) >= 3 for row in rows) and any(len(row["prompt"]) == 1 for row in rows)
