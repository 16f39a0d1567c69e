"""The measurements of `instruct eval` that need a model (steps 2-4 of `run`: answer, KL, score).

Owns sampling responses, reading them from a file, the response log-probs (PPO's layout), perplexity, the reward
model's accuracy and scores, and the order models are loaded in (one in memory at a time, each freed before the
next). Results go into the entries. Uses the core (chat, lm, models, preferences, rl, sampling, training,
config, console), `stats` for the KL sums and `entries` for what is measured; not the report, plots or compare.
"""

from __future__ import annotations

import gc
from functools import partial
from pathlib import Path

import torch

from instruct_cli.core import chat, inference, lm, models, preferences, rl, sampling, training
from instruct_cli.core.config import EvalConfig
from instruct_cli.core.console import progress, warn
from instruct_cli.steps.evaluate.entries import Entry, Samples, judge_names, same_path
from instruct_cli.steps.evaluate.stats import sequence_kl


# ------------------------------------------------------------------------------------- models on prompts
@torch.no_grad()
def sample_responses(
    model,
    tokenizer,
    prompts: list[list[dict]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    max_length: int,
    bar=None,
) -> Samples:
    """Answer each prompt once: left-padded batches in prompt order, sampled at `temperature` (top-k off,
    nucleus `top_p`), each response cut after its first EOS. The caller seeds torch."""
    device = next(model.parameters()).device
    queries = [chat.encode_prompt(tokenizer, messages)[-max_length:] for messages in prompts]
    responses, texts, ended = [], [], []
    for start in range(0, len(queries), batch_size):
        chunk = queries[start : start + batch_size]
        input_ids, attention_mask = sampling.left_pad(chunk, tokenizer.pad_token_id, device)
        output = sampling.sample(
            model,
            tokenizer,
            input_ids,
            attention_mask,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_new_tokens=max_new_tokens,
        )
        generated = output[:, input_ids.shape[1] :]
        mask, has_eos = rl.truncate_after_eos(generated, tokenizer.eos_token_id)
        for row in range(len(chunk)):
            ids = generated[row, : int(mask[row].sum())].tolist()
            responses.append(ids)
            texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
            ended.append(bool(has_eos[row]))
        if bar is not None:
            bar.advance(len(chunk))
    return Samples(queries, responses, texts, ended)


def samples_from_file(tokenizer, prompts: list[list[dict]], answers: list[dict], max_length: int) -> Samples:
    """Samples for responses read from a file ({"text", "eos", "ids"}): their token ids when the file has them
    (a report's samples.jsonl does), else the text re-encoded with an EOS appended unless `eos` is false."""
    queries = [chat.encode_prompt(tokenizer, messages)[-max_length:] for messages in prompts]
    responses = [
        answer["ids"]
        if answer.get("ids")
        else tokenizer.encode(answer["text"], add_special_tokens=False)
        + ([] if answer.get("eos") is False else [tokenizer.eos_token_id])
        for answer in answers
    ]
    retokenised = not all(answer.get("ids") for answer in answers)
    return Samples(queries, responses, [a["text"] for a in answers], [a.get("eos") for a in answers], retokenised)


@torch.no_grad()
def response_logprobs(
    model,
    queries: list[list[int]],
    responses: list[list[int]],
    *,
    pad_id: int,
    temperature: float,
    batch_size: int,
    bar=None,
) -> list[list[float]]:
    """log p(token | prompt, earlier tokens) of every response token under `model`, with the logits divided by
    the sampling temperature (the distribution the tokens were drawn from). The layout is PPO's: prompts
    left-padded, responses right-padded, positions counted over real tokens."""
    device = next(model.parameters()).device
    logprobs: list[list[float]] = []
    for start in range(0, len(queries), batch_size):
        chunk = responses[start : start + batch_size]
        query, query_mask = sampling.left_pad(queries[start : start + batch_size], pad_id, device)
        width = max(1, max(len(ids) for ids in chunk))
        response = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        response_mask = torch.zeros((len(chunk), width))
        for row, ids in enumerate(chunk):
            response[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            response_mask[row, : len(ids)] = 1.0
        response, response_mask = response.to(device), response_mask.to(device)
        input_ids, attention_mask, position_ids = sampling.sequences(query, query_mask, response, response_mask)
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=width + 1,
            use_cache=False,
        ).logits[:, :-1]
        token_logprobs = rl.token_logprobs(logits, response, temperature)
        logprobs += [token_logprobs[row, : len(ids)].tolist() for row, ids in enumerate(chunk)]
        if bar is not None:
            bar.advance(len(chunk))
    return logprobs


def perplexity(model, tokenizer, conversations: list[list[dict]], max_length: int, batch_size: int) -> dict:
    """Mean assistant-token NLL and perplexity on SFT conversations, exactly as `instruct sft` evaluates."""
    device = next(model.parameters()).device
    encoded = [chat.encode_conversation(tokenizer, messages, max_length) for messages in conversations]
    batches = training.eval_batches(
        encoded,
        [len(ids) for ids, _ in encoded],
        batch_size,
        partial(lm.collate, pad_id=tokenizer.pad_token_id, device=device),
    )
    metrics = lm.evaluate(model, batches)
    return {"loss": metrics["eval/loss"], "perplexity": metrics["eval/perplexity"], "conversations": len(conversations)}


def reward_model_accuracy(model, tokenizer, rows: list[dict], max_length: int, batch_size: int, where: str) -> dict:
    """The reward model's pair accuracy, loss and mean margin on preference rows (as `instruct rm` evaluates):
    each row's prompt computed once for all its responses (packed rows) where the model takes them."""
    device = next(model.head.parameters()).device
    groups, _ = preferences.encode_rows(tokenizer, rows, max_length, where)
    collate = preferences.collate_shared if model.packs else preferences.collate
    batches = training.eval_batches(
        groups,
        preferences.group_lengths(groups, model.packs),
        batch_size,
        partial(collate, pad_id=tokenizer.pad_token_id, device=device),
    )
    metrics = preferences.evaluate(model, batches)
    return {
        "accuracy": metrics["eval/accuracy"],
        "loss": metrics["eval/loss"],
        "margin": metrics["eval/margin"],
        "pairs": sum(len(group.pairs) for group in groups),
        "prompts": len(groups),
    }


def release_memory() -> None:
    """Give a freed model's memory back before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ 2-4. measuring
def answer_and_measure(
    entry: Entry,
    entries: list[Entry],
    prompts: list[list[dict]],
    answers: list[dict] | None,
    conversations: list[list[dict]],
    config: EvalConfig,
) -> None:
    """Load one model: its samples (generated, seed reset first, or from --generations), the log-probs of its
    own samples (when a KL is to be measured), its perplexity on the SFT eval split, and, when it is the KL
    reference of models already answered, their KL. Then free it."""
    # exact: the KL and perplexity need fp32 log-probs on a CPU, not the faster bf16 of plain sampling
    model, tokenizer, source = inference.load_for_inference(entry.spec, config.quantization, config.device, exact=True)
    entry.fingerprint = source.fingerprint
    if answers is None:
        torch.manual_seed(config.seed)
        with progress(f"generate {entry.name}", total=len(prompts)) as bar:
            entry.samples = sample_responses(
                model,
                tokenizer,
                prompts,
                max_new_tokens=config.max_new_tokens,
                temperature=config.temperature,
                top_p=config.top_p,
                batch_size=config.batch_size,
                max_length=config.max_length,
                bar=bar,
            )
    else:
        entry.samples = samples_from_file(tokenizer, prompts, answers, config.max_length)
    if entry.is_own_reference:
        entry.kl = [0.0] * len(prompts)
    elif entry.reference is not None:
        with progress(f"log-probs {entry.name}", total=len(prompts)) as bar:
            entry.own_logprobs = response_logprobs(
                model,
                entry.samples.queries,
                entry.samples.responses,
                pad_id=tokenizer.pad_token_id,
                temperature=config.temperature,
                batch_size=config.batch_size,
                bar=bar,
            )
    if conversations:
        entry.perplexity = perplexity(model, tokenizer, conversations, config.max_length, config.batch_size)
    if entry.path is not None:
        kl_against(model, tokenizer, source, entry.path, entries, config)
    del model
    release_memory()


def kl_against(
    model, tokenizer, source: models.ModelSource, reference: Path, entries: list[Entry], config: EvalConfig
) -> None:
    """The KL of every entry measured against `reference` (loaded as `model`) whose own log-probs are ready."""
    for entry in entries:
        if entry.kl is not None or entry.own_logprobs is None or not same_path(entry.reference, reference):
            continue
        if entry.fingerprint != source.fingerprint:
            warn(
                f"The KL of {entry.name} is not measured: it has another base model than its reference "
                f"{reference}, so their tokens cannot be compared"
            )
            entry.own_logprobs = None
            continue
        with progress(f"KL {entry.name}", total=len(entry.samples.responses)) as bar:
            reference_logprobs = response_logprobs(
                model,
                entry.samples.queries,
                entry.samples.responses,
                pad_id=tokenizer.pad_token_id,
                temperature=config.temperature,
                batch_size=config.batch_size,
                bar=bar,
            )
        entry.kl = sequence_kl(entry.own_logprobs, reference_logprobs)


def measure_remaining_kl(entries: list[Entry], config: EvalConfig) -> None:
    """Load each KL reference that was not among the models evaluated, once, for the models measured against it."""
    references: list[Path] = []
    for entry in entries:
        if (
            entry.kl is None
            and entry.own_logprobs is not None
            and not any(same_path(entry.reference, r) for r in references)
        ):
            references.append(entry.reference)
    for reference in references:
        model, tokenizer, source = inference.load_for_inference(
            str(reference), config.quantization, config.device, exact=True
        )
        kl_against(model, tokenizer, source, reference, entries, config)
        del model
        release_memory()


def answering_order(entries: list[Entry]) -> list[Entry]:
    """The entries with the KL references of other entries last, so that a reference evaluated anyway (the sft
    run next to its ppo run) measures their KL while it is loaded, instead of being loaded twice."""

    def is_reference(entry: Entry) -> bool:
        return entry.path is not None and any(
            other is not entry and other.reference is not None and same_path(other.reference, entry.path)
            for other in entries
        )

    return sorted(entries, key=is_reference)


def score_with_reward_model(
    entries: list[Entry], prompts: list[list[dict]], pref_rows: list[dict], prefs_where: str, config: EvalConfig
) -> dict | None:
    """Normalised reward of every response (into each entry), and the RM's accuracy on preference rows.

    A response is scored as PPO scores a rollout: the sampled token ids after the prompt's ids, read at the
    last real token, minus `missing_eos_penalty` when it has no EOS. Only when the reward model's tokenizer
    renders the prompts differently (another base) is the response's text re-rendered with its template.
    Every model's answers to a prompt are scored together, the prompt computed once (`prompt_keys`)."""
    model, tokenizer, norm = preferences.load_reward_model(config.reward, config.quantization, config.device)
    rewards, scored_on = normalised_rewards(model, tokenizer, norm, entries, prompts, config, "reward model")
    for entry, mine in zip(entries, rewards):
        entry.rewards = mine
    accuracy = None
    if pref_rows:
        accuracy = reward_model_accuracy(model, tokenizer, pref_rows, config.max_length, config.batch_size, prefs_where)
    del model
    release_memory()
    return {
        "path": str(config.reward),
        "normalization": norm,
        "missing_eos_penalty": config.missing_eos_penalty,
        "scored_on": scored_on,
        **(accuracy or {}),
    }


def normalised_rewards(
    model, tokenizer, norm: dict, entries: list[Entry], prompts: list[list[dict]], config: EvalConfig, label: str
) -> tuple[list[list[float]], dict[str, str]]:
    """Every entry's rewards by one loaded reward model (normalised with its `norm`, minus the missing-EOS
    penalty), in entry order, and how each entry's responses were scored (`reward_inputs`)."""
    device = next(model.head.parameters()).device
    queries = [chat.encode_prompt(tokenizer, prompt)[-config.max_length :] for prompt in prompts]
    sequences, keys, counts, scored_on = [], [], [], {}
    for entry in entries:
        inputs, scored_on[entry.name] = reward_inputs(tokenizer, prompts, queries, entry.samples, config.max_length)
        sequences += inputs
        keys += prompt_keys(queries, inputs)
        counts.append(len(inputs))
    with progress(label, total=len(sequences)) as bar:
        raw = preferences.score_grouped(model, sequences, keys, tokenizer.pad_token_id, device, config.batch_size, bar)
    rewards, start = [], 0
    for entry, count in zip(entries, counts):
        mine, start = raw[start : start + count], start + count
        rewards.append(
            [
                preferences.normalize(value, norm) - (config.missing_eos_penalty if ended is False else 0.0)
                for value, ended in zip(mine, entry.samples.ended)
            ]
        )
    return rewards, scored_on


def score_with_judges(entries: list[Entry], prompts: list[list[dict]], config: EvalConfig) -> list[dict]:
    """Each --judge reward model in turn (one in memory at a time): every response scored exactly as the main
    reward model scores it, with the judge's own normalisation, into `entry.judge_rewards[name]`. Returns what
    report.json says of each judge: its name, path, normalisation and how the responses were scored."""
    judges = []
    for name, path in judge_names(config).items():
        model, tokenizer, norm = preferences.load_reward_model(path, config.quantization, config.device)
        rewards, scored_on = normalised_rewards(model, tokenizer, norm, entries, prompts, config, f"judge {name}")
        for entry, mine in zip(entries, rewards):
            entry.judge_rewards = {**(entry.judge_rewards or {}), name: mine}
        del model
        release_memory()
        judges.append(
            {
                "name": name,
                "path": str(Path(path).resolve()),
                "normalization": norm,
                "missing_eos_penalty": config.missing_eos_penalty,
                "scored_on": scored_on,
            }
        )
    return judges


def prompt_keys(queries: list[list[int]], sequences: list[list[int]]) -> list[tuple]:
    """For each of one model's reward-model inputs (one per prompt, in prompt order), the key of the packed row
    it is scored in: its prompt's number and the ids it begins with, as many as the reward model's rendering
    of that prompt has. Answers of several models to a prompt share a key when their inputs begin with the
    same prompt ids; an input cut from the left or re-rendered otherwise is grouped only with inputs that
    begin alike (packing is exact whatever it groups; a group without a shared prefix only saves nothing)."""
    return [(number, tuple(ids[: len(query)])) for number, (query, ids) in enumerate(zip(queries, sequences))]


def reward_inputs(
    tokenizer, prompts: list[list[dict]], queries: list[list[int]], samples, max_length: int
) -> tuple[list[list[int]], str]:
    """What the reward model reads for each response, and how it was made: "sampled ids" (prompt ids +
    response ids through the EOS, as PPO scores them) when the reward model's tokenizer renders every prompt
    (`queries`: the prompts' ids under it, cut to max_length) as the answering model did, else "text" (the
    response re-rendered through the chat template)."""
    if queries == samples.queries:
        how = "re-tokenised text" if samples.retokenised else "sampled ids"
        return [(query + response)[-max_length:] for query, response in zip(queries, samples.responses)], how
    texts = [[{"role": "assistant", "content": text}] for text in samples.texts]
    return [preferences.encode_response(tokenizer, p, t, max_length) for p, t in zip(prompts, texts)], "text"
