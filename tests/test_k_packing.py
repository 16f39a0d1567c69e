"""Each prompt once where several answers to it are scored: `instruct eval`'s reward-model accuracy and its
scoring of every model's answers, and PPO's reward, log-prob and value passes (K samples per prompt, and
distinct prompts side by side), packed (core/packing.py) and equal to the unpacked path to float tolerance;
the unpacked path is forced by making `packing.supports` say no, as it does for a model whose attention takes
no 4-D mask."""

import contextlib

import pytest
import torch

from instruct_cli.core import chat, heads, models, packing, preferences
from instruct_cli.core.config import EvalConfig
from instruct_cli.steps.evaluate import entries, measure
from instruct_cli.steps.ppo import roles as ppo_roles
from instruct_cli.steps.ppo import trajectory
from tests.test_shared_prefix import ROWS, reward_model


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return models.load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def rm(tiny_model_dir):
    return reward_model(tiny_model_dir, "sdpa").eval()


def spy(monkeypatch, module, name: str) -> list:
    """Record the calls of `module.name` (their arguments) while still running it."""
    calls, real = [], getattr(module, name)

    def recording(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, recording)
    return calls


@contextlib.contextmanager
def unpacked(monkeypatch):
    """Every packing decision says no while the block runs (today's path)."""
    with monkeypatch.context() as patch:
        patch.setattr(packing, "supports", lambda model: False)
        yield


# ------------------------------------------------------------------------------- eval: RM accuracy
def test_eval_reward_model_accuracy_packed_equals_unpacked(rm, tokenizer, monkeypatch):
    with unpacked(monkeypatch):
        assert not rm.packs
        plain = measure.reward_model_accuracy(rm, tokenizer, ROWS, max_length=128, batch_size=3, where="test")
    packed_batches = spy(monkeypatch, preferences, "collate_shared")
    packed = measure.reward_model_accuracy(rm, tokenizer, ROWS, max_length=128, batch_size=3, where="test")
    assert len(packed_batches) >= 2  # every batch was packed (4 groups, 3 a batch)
    assert (packed["pairs"], packed["prompts"]) == (plain["pairs"], plain["prompts"]) == (1 + 5 + 6 + 1, 4)
    for key in ("accuracy", "loss", "margin"):
        assert packed[key] == pytest.approx(plain[key], abs=1e-5), key
    assert 0 < plain["accuracy"] < 1 and plain["margin"] != 0  # real values: a mixed-up order would show


# ------------------------------------------------------------------------------- eval: rewards
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": " ".join(["the quick brown fox jumps over the lazy dog"] * 3)}],
]


def samples_of(tokenizer, answers: list[list[int]], ended: list[bool], queries=None) -> entries.Samples:
    queries = queries or [chat.encode_prompt(tokenizer, prompt) for prompt in PROMPTS]
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in answers]
    return entries.Samples(queries, answers, texts, ended)


def test_prompt_keys_group_only_inputs_that_begin_with_the_prompt():
    queries = [[1, 2, 3], [4, 5]]
    assert measure.prompt_keys(queries, [[1, 2, 3, 9], [4, 5, 7, 7]]) == [(0, (1, 2, 3)), (1, (4, 5))]
    assert measure.prompt_keys(queries, [[2, 3, 9, 9], [4, 5, 8]]) == [(0, (2, 3, 9)), (1, (4, 5))]  # cut: own key


def test_eval_rewards_of_every_model_packed_by_prompt_equal_unpacked(rm, tokenizer, monkeypatch):
    """Three models answer three prompts: two scored on their sampled ids, one (another rendering of the
    prompts) on its re-rendered text; one answer is cut from the left by max_length; one has no EOS."""
    eos = tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(0)

    def words(n: int) -> list[int]:
        return torch.randint(10, 300, (n,), generator=generator).tolist()

    first = samples_of(tokenizer, [words(3) + [eos], words(7) + [eos], words(5)], [True, True, False])
    second = samples_of(tokenizer, [words(9) + [eos], words(2) + [eos], words(60) + [eos]], [True, True, True])
    other = [[7] + chat.encode_prompt(tokenizer, prompt) for prompt in PROMPTS]  # another base's rendering
    third = samples_of(tokenizer, [words(4) + [eos], words(4) + [eos], words(1) + [eos]], [True] * 3, other)
    monkeypatch.setattr(preferences, "load_reward_model", lambda *args: (rm, tokenizer, {"gain": 2.0, "bias": -1.0}))
    bars = []

    class Bar:
        def __init__(self, total):
            self.total, self.done = total, 0

        def advance(self, count=1, **metrics):
            self.done += count

    @contextlib.contextmanager
    def recording_progress(description, total):
        bars.append(Bar(total))
        yield bars[-1]

    monkeypatch.setattr(measure, "progress", recording_progress)
    config = EvalConfig(
        reward="rm", quantization="none", device="cpu", missing_eos_penalty=1.5, max_length=80, batch_size=4
    )

    def scored() -> tuple[list[list[float]], dict]:
        models_ = [entries.Entry(name=n, spec=n, kind="sft", samples=s) for n, s in zip("abc", (first, second, third))]
        result = measure.score_with_reward_model(models_, PROMPTS, [], "", config)
        return [entry.rewards for entry in models_], result

    with unpacked(monkeypatch):
        plain, plain_result = scored()
    packed_rows = spy(monkeypatch, packing, "pack")
    packed, packed_result = scored()
    assert (
        packed_result["scored_on"] == plain_result["scored_on"] == {"a": "sampled ids", "b": "sampled ids", "c": "text"}
    )
    rows = sum(len(call[0]) for call in packed_rows)
    assert rows == 4  # one row per prompt for all three models, and one for the answer cut from the left
    assert [(bar.total, bar.done) for bar in bars] == [(9, 9), (9, 9)]
    for mine, theirs in zip(packed, plain):
        assert mine == pytest.approx(theirs, abs=1e-5)
    assert len({round(r, 4) for rewards in plain for r in rewards}) == 9  # a mixed-up order would show


# ------------------------------------------------------------------------------- ppo: K samples
def ppo_roles_with_reward(tiny_model_dir):
    """Roles with only a reward adapter (random, non-zero) and head: all that `score` uses."""
    from peft import get_peft_model

    rm_model = reward_model(tiny_model_dir, "sdpa")
    body = rm_model.body
    state = {name: p.detach().clone() for name, p in body.named_parameters() if "lora_" in name}
    source = models.resolve_model(str(tiny_model_dir))
    base = models.load_base_model(source, "none", "cpu")
    model = get_peft_model(base, body.peft_config["default"], adapter_name=ppo_roles.REWARD)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(state[name.replace(f".{ppo_roles.REWARD}.", ".default.")])
    return ppo_roles.Roles(model, None, rm_model.head, reward_gain=1.7, reward_bias=-0.3)


def k_rollout(tokenizer, k: int, width: int) -> trajectory.Rollout:
    """Two prompts, each answered `k` times (consecutive rows), responses of different lengths: two that begin
    alike, two identical, and one that hit `width` new tokens without an EOS."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    queries = [chat.encode_prompt(tokenizer, PROMPTS[0]), chat.encode_prompt(tokenizer, PROMPTS[1])]
    answers = [
        [[11, 12, 13, eos], [11, 12, 40, 41, 42, eos], [50] * width, [60, eos]],
        [[70, 71, eos], [70, 71, eos], [80, 81, 82, 83, 84, 85, eos], [90, 91, 92, 93, 94, 95, 96, 97]],
    ]
    query = torch.full((2 * k, max(map(len, queries))), pad)
    query_mask = torch.zeros_like(query)
    response = torch.full((2 * k, width), pad)
    response_mask = torch.zeros((2 * k, width))
    for prompt in range(2):
        ids = torch.tensor(queries[prompt])
        for sample in range(k):
            row, answer = prompt * k + sample, answers[prompt][sample]
            query[row, -len(ids) :], query_mask[row, -len(ids) :] = ids, 1
            response[row, : len(answer)], response_mask[row, : len(answer)] = torch.tensor(answer), 1.0
    ended = (response == eos).any(1)
    return trajectory.Rollout(query, query_mask, response, response_mask, ended)


def test_ppo_scores_of_k_samples_packed_equal_unpacked(tiny_model_dir, tokenizer, monkeypatch):
    roles = ppo_roles_with_reward(tiny_model_dir)
    batch = k_rollout(tokenizer, k=4, width=8)
    assert batch.ended.tolist() == [True, True, False, True, True, True, True, False]
    with unpacked(monkeypatch):
        plain = trajectory.score(roles, batch, penalty=1.0)
    packed_calls = spy(monkeypatch, heads, "packed_hidden_states")
    packed = trajectory.score(roles, batch, penalty=1.0, group=4)
    assert len(packed_calls) == 2 and all(call[1].shape[0] == 1 for call in packed_calls)  # a row per prompt
    torch.testing.assert_close(packed, plain, rtol=0, atol=1e-5)
    assert float(plain[4]) == pytest.approx(float(plain[5]), abs=1e-6)  # identical answers, identical scores
    assert len({round(v, 4) for v in plain.tolist()}) == 7  # otherwise they differ: a mixed-up order would show
    # the unpacked score of one row alone, as a check on both
    alone = trajectory.score(roles, batch.rows(slice(2, 3)), penalty=1.0, packed=False)
    torch.testing.assert_close(alone, plain[2:3], rtol=0, atol=1e-5)


def test_shared_bins_count_a_shared_prefix_once():
    system = [1, 2, 3]  # what every rendered prompt begins with
    a, b, c = system + [4, 5, 6, 7], system + [8, 9, 10], system + [11, 12]
    # a + b alone need 7 + 6 = 13 positions, but share 3: 10 fit in 10
    assert packing.shared_bins([a, b, c], capacity=10) == [[0, 1], [2]]
    assert packing.shared_bins([a, b, c], capacity=12) == [[0, 1, 2]]  # 3 + 4 + 3 + 2
    assert packing.shared_bins([a, b, c], capacity=9) == [[0, 2], [1]]  # first fit: 3 + 4 + 2
    assert packing.shared_bins([[5] * 20, c], capacity=9) == [[0], [1]]  # too long: a row of its own


def test_pack_rows_points_at_the_state_before_each_response_token():
    """Two rollouts (left-padded prompts [1, 2, 3] and [1, 2], responses of 2 and 1 tokens in a T = 3 batch)
    in one packed row: the prefix [1, 2] once, then each sequence's rest."""
    query = torch.tensor([[1, 2, 3], [0, 1, 2]])
    query_mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    response = torch.tensor([[7, 8, 0], [9, 0, 0]])
    response_mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    packed = trajectory.pack_rows(query, query_mask, response, response_mask)
    (input_ids, position_ids, segments), *more = packed.rows
    assert not more and input_ids.tolist() == [[1, 2, 3, 7, 8, 9]]
    assert position_ids.tolist() == [[0, 1, 2, 3, 4, 2]]
    assert segments.tolist() == [[0, 0, 1, 1, 1, 2]]
    assert packed.ends.tolist() == [4, 5]  # each rollout's last token: 8 and 9
    # 7 is predicted at 3 (column 2), 8 at 7 (column 3); 9 at the second sequence's 2 (column 1, shared)
    assert packed.sources.tolist() == [2, 3, 1] and packed.targets.tolist() == [0, 1, 3]
    assert trajectory.unpack(torch.tensor([0.5, 0.25, 0.75]), packed, response).tolist() == [
        [0.5, 0.25, 0.0],
        [0.75, 0.0, 0.0],
    ]


def test_ppo_scores_of_distinct_prompts_are_packed_side_by_side(tiny_model_dir, tokenizer, monkeypatch):
    """K = 1: the rollouts share one row (their common prefix, the chat template's opening, computed once),
    with the scores of padded rows; --no-packing scores padded rows."""
    roles = ppo_roles_with_reward(tiny_model_dir)
    batch = k_rollout(tokenizer, k=4, width=8).rows(torch.tensor([2, 4]))  # two prompts, one answer each
    with unpacked(monkeypatch):
        plain = trajectory.score(roles, batch, penalty=1.0)
    packed_calls = spy(monkeypatch, heads, "packed_hidden_states")
    packed = trajectory.score(roles, batch, penalty=1.0)
    assert len(packed_calls) == 1  # one row: both fit in 256 positions
    torch.testing.assert_close(packed, plain, rtol=0, atol=1e-5)
    assert len(set(plain.tolist())) == 2
    trajectory.score(roles, batch, penalty=1.0, packed=False)
    assert len(packed_calls) == 1


# ------------------------------------------------------------------------ ppo: K-sample log-probs
def ppo_roles_with_policy(tiny_model_dir, value: bool = False):
    """Roles with policy (trainable), reference and reward adapters (and a trainable value adapter and head),
    all random and different."""
    import copy

    from peft import get_peft_model

    from instruct_cli.core import config as cfg
    from instruct_cli.core import recipes

    source = models.resolve_model(str(tiny_model_dir))
    base = models.load_base_model(source, "none", "cpu")
    options = recipes.build_config(cfg.RMConfig, "rm", None, dict(model=str(tiny_model_dir), lora_dropout=0.0))
    lora = models.lora_config(options)
    model = get_peft_model(base, copy.deepcopy(lora), adapter_name=ppo_roles.POLICY)
    for role in (ppo_roles.REFERENCE, ppo_roles.REWARD) + ((ppo_roles.VALUE,) if value else ()):
        model.add_adapter(role, copy.deepcopy(lora))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
            param.requires_grad_(
                "lora_" in name and (f".{ppo_roles.POLICY}." in name or f".{ppo_roles.VALUE}." in name)
            )
    value_head = heads.ScalarHead(heads.hidden_size_of(base), seed=1) if value else None
    return ppo_roles.Roles(model, value_head, heads.ScalarHead(heads.hidden_size_of(base), seed=0))


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_ppo_k_sample_logprobs_packed_equal_unpacked_and_first_ratio_is_one(
    tiny_model_dir, tokenizer, monkeypatch, precision
):
    """--advantage rloo, K = 4: the trajectory's policy and reference log-probs from packed groups equal the
    unpacked ones, and the update (minibatches of whole groups, packed alike) starts at a ratio of exactly 1,
    in fp32 and under bf16 autocast."""
    from instruct_cli.core import config as cfg
    from instruct_cli.core import training
    from instruct_cli.steps.ppo import update_step

    config = cfg.PPOConfig(advantage="rloo", samples_per_prompt=4, minibatch_size=4, rollout_batch_size=8)
    roles = ppo_roles_with_policy(tiny_model_dir)
    batch = k_rollout(tokenizer, k=4, width=8)
    accelerator = training.make_accelerator(0, precision, "cpu")
    assert trajectory.packs_groups(roles, config)
    with unpacked(monkeypatch):
        assert not trajectory.packs_groups(roles, config)
        plain, plain_stats = trajectory.make_trajectory(roles, batch, config, 0.05, accelerator)
    packed_calls = spy(monkeypatch, trajectory, "pack_rows")
    packed, packed_stats = trajectory.make_trajectory(roles, batch, config, 0.05, accelerator)
    assert [call[0].shape[0] for call in packed_calls] == [8, 4, 4]  # the reward pass, then each chunk
    tolerance = 1e-5 if precision == "no" else 0.1  # bf16 rounds differently in differently shaped batches
    for field in ("logprobs", "ref_logprobs", "kl", "advantages"):
        torch.testing.assert_close(getattr(packed, field), getattr(plain, field), rtol=0, atol=tolerance, msg=field)
    assert packed_stats["objective/entropy"] == pytest.approx(plain_stats["objective/entropy"], abs=tolerance)
    assert plain.logprobs.abs().sum() > 0 and (plain.logprobs != plain.ref_logprobs).any()
    assert (packed.logprobs[~batch.response_mask.bool()] == 0).all()

    optimizer = torch.optim.SGD(roles.trainable_parameters(), lr=0.1)
    stats = update_step.update(roles, optimizer, packed, config, accelerator)
    assert stats["policy/first_approxkl"] == 0.0 and stats["policy/first_clipfrac"] == 0.0, stats
    assert stats["policy/grad_norm"] > 0  # the packed forward carries gradients to the policy's LoRA weights


@pytest.mark.parametrize("precision, row_width", [("no", 256), ("bf16", 256), ("no", 1)])
def test_ppo_distinct_prompts_packed_side_by_side_equal_padded_and_first_ratio_is_one(
    tiny_model_dir, tokenizer, monkeypatch, precision, row_width
):
    """--advantage gae, K = 1: the trajectory's scores, log-probs and values from packed rows (each minibatch's
    rollouts side by side) equal those of padded rows, and the update, which packs its first minibatch as the
    trajectory did, starts at a policy ratio of exactly 1 and value predictions equal to the old ones.
    row_width 1: rows no wider than the padded batch, so a chunk becomes several rows of unequal width."""
    from instruct_cli.core import config as cfg
    from instruct_cli.core import training
    from instruct_cli.steps.ppo import update_step

    config = cfg.PPOConfig(advantage="gae", minibatch_size=4, rollout_batch_size=8, ppo_epochs=2, seed=2)
    roles = ppo_roles_with_policy(tiny_model_dir, value=True)
    batch = k_rollout(tokenizer, k=4, width=8)  # 8 rollouts; as K = 1 rows, the two prompts share no more
    accelerator = training.make_accelerator(0, precision, "cpu")
    assert trajectory.packs(roles, config) and not trajectory.packs_groups(roles, config)
    assert not trajectory.packs(roles, cfg.PPOConfig(packing=False))
    with unpacked(monkeypatch):
        assert not trajectory.packs(roles, config)
        plain, plain_stats = trajectory.make_trajectory(roles, batch, config, 0.05, accelerator, iteration=3)
    monkeypatch.setattr(packing, "ROW_WIDTH", row_width)
    layouts = []
    real_pack_rows = trajectory.pack_rows
    monkeypatch.setattr(trajectory, "pack_rows", lambda *args: layouts.append(real_pack_rows(*args)) or layouts[-1])
    packed, packed_stats = trajectory.make_trajectory(roles, batch, config, 0.05, accelerator, iteration=3)
    assert [len(layout.ends) for layout in layouts] == [8, 4, 4]  # the reward pass, then each chunk
    rows = [len(layout.rows) for layout in layouts]
    assert rows == [1, 1, 1] if row_width == 256 else min(rows) > 1, rows
    tolerance = 1e-5 if precision == "no" else 0.1
    for field in ("scores", "logprobs", "ref_logprobs", "values", "kl", "advantages", "returns"):
        torch.testing.assert_close(getattr(packed, field), getattr(plain, field), rtol=0, atol=tolerance, msg=field)
    assert packed_stats["objective/entropy"] == pytest.approx(plain_stats["objective/entropy"], abs=tolerance)
    assert plain.values.abs().sum() > 0 and (plain.logprobs != plain.ref_logprobs).any()
    assert (packed.values[~batch.response_mask.bool()] == 0).all()

    first_batch = []
    real = update_step.update_minibatch

    def recording(roles, batch, *args, **kwargs):
        if not first_batch:  # the value role's forward on the first minibatch, before any step
            with torch.no_grad(), accelerator.autocast():
                values = trajectory.response_values(roles, *batch[:4], trajectory.pack_rows(*batch[:4]))
            first_batch.extend([values, batch.values])
        return real(roles, batch, *args, **kwargs)

    monkeypatch.setattr(update_step, "update_minibatch", recording)
    optimizer = torch.optim.SGD(roles.trainable_parameters(), lr=0.1)
    stats = update_step.update(roles, optimizer, packed, config, accelerator, iteration=3)
    assert stats["policy/first_approxkl"] == 0.0 and stats["policy/first_clipfrac"] == 0.0, stats
    torch.testing.assert_close(first_batch[0], first_batch[1], rtol=0, atol=0)
    assert stats["policy/grad_norm"] > 0


def test_ppo_update_shuffles_whole_groups_only_when_packed(tiny_model_dir, tokenizer, monkeypatch):
    """Packed: every minibatch is whole groups (rows 2g, 2g + 1 for K = 2). Unpacked: today's row shuffle."""
    from instruct_cli.core import config as cfg
    from instruct_cli.core import training
    from instruct_cli.steps.ppo import update_step

    config = cfg.PPOConfig(advantage="rloo", samples_per_prompt=2, minibatch_size=2, ppo_epochs=2, seed=3)
    roles = ppo_roles_with_policy(tiny_model_dir)
    accelerator = training.make_accelerator(0, "no", "cpu")
    packed, _ = trajectory.make_trajectory(roles, k_rollout(tokenizer, k=4, width=8), config, 0.05, accelerator)
    numbered = packed._replace(scores=torch.arange(8.0))  # which rows each minibatch holds
    seen = []

    def record(roles, batch, *args):
        seen.append(batch.scores.long().tolist())
        return {"policy/clipfrac": 0.0, "policy/approxkl": 0.0}

    monkeypatch.setattr(update_step, "update_minibatch", record)
    optimizer = torch.optim.SGD(roles.trainable_parameters(), lr=0.0)
    update_step.update(roles, optimizer, numbered, config, accelerator, iteration=5)
    assert len(seen) == 8 and all(len(rows) == 2 and rows[0] % 2 == 0 and rows[1] == rows[0] + 1 for rows in seen)
    assert sorted(sum(seen[:4], [])) == list(range(8)) and seen[:4] != seen[4:]  # each epoch reshuffled
    seen.clear()
    with unpacked(monkeypatch):
        update_step.update(roles, optimizer, numbered, config, accelerator, iteration=5)
    generator = torch.Generator().manual_seed(3 * 1_000_003 + 5)
    expected = [order.tolist() for _ in range(2) for order in torch.randperm(8, generator=generator).split(2)]
    assert seen == expected
