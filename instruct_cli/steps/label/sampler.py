"""Sampling ahead of the labeler: the queue of prompts still to judge, and the background thread that samples
their K responses with the model (torch and transformers are imported only in that thread).

Owns Queue, Sampler, sample_responses and generation_settings. Uses `store` (the samples are kept in a
SampleStore) and instruct_cli.core (config, models, chat, sampling).
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from pathlib import Path

from instruct_cli.core.config import GenerateConfig, LabelConfig
from instruct_cli.steps.label.store import SampleStore


def sample_responses(
    model, tokenizer, prompts: list[list[dict]], k: int, settings: GenerateConfig, stop: threading.Event | None = None
) -> list[list[str]] | None:
    """K sampled responses for each prompt, generated as one left-padded batch of len(prompts) x K sequences.

    Returns None when `stop` was set during generation (the batch is then incomplete and thrown away).
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from instruct_cli.core.chat import encode_prompt
    from instruct_cli.core.sampling import left_pad, sample, sampling_kwargs

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full(
                (input_ids.shape[0],), bool(stop and stop.is_set()), dtype=torch.bool, device=input_ids.device
            )

    device = next(model.parameters()).device
    encoded = [ids for messages in prompts for ids in [encode_prompt(tokenizer, messages)] * k]
    input_ids, attention_mask = left_pad(encoded, tokenizer.pad_token_id, device)
    with torch.inference_mode():
        output = sample(  # exactly the configured sampling: the model's generation_config is set aside
            model,
            tokenizer,
            input_ids,
            attention_mask,
            stopping_criteria=StoppingCriteriaList([Stop()]),
            **sampling_kwargs(settings, tokenizer),
        )
    if stop is not None and stop.is_set():
        return None
    texts = [tokenizer.decode(row[input_ids.shape[1] :], skip_special_tokens=True).strip() for row in output]
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


class Queue:
    """The prompts the labeler has still to judge, in the order they are shown; shared with the sampler."""

    def __init__(self, indices: list[int]):
        self.cond = threading.Condition()
        self._pending = deque(indices)

    def __len__(self) -> int:
        with self.cond:
            return len(self._pending)

    def current(self) -> int | None:
        """The prompt on screen (None when everything is judged)."""
        with self.cond:
            return self._pending[0] if self._pending else None

    def upcoming(self, count: int) -> list[int]:
        """The next `count` prompts, the one on screen first."""
        with self.cond:
            return list(itertools.islice(self._pending, count))

    def pop(self) -> None:
        """The prompt on screen was judged: move on."""
        with self.cond:
            self._pending.popleft()
            self.cond.notify_all()

    def push_front(self, index: int) -> None:
        """Show `index` next (after an undo)."""
        with self.cond:
            self._pending.appendleft(index)
            self.cond.notify_all()


class Sampler:
    """Samples the K responses of the prompts the labeler will see next, in a background thread, so that the
    labeler never waits once the first prompt is up: the one on screen first, then up to two batches ahead.

    The thread loads the model itself, so prompts sampled in an earlier session can be labelled meanwhile.
    An error in the thread (a bad --model, say) is raised in the labeling thread by `check` and `wait_for`.
    """

    def __init__(self, config: LabelConfig, prompts: list[list[dict]], store: SampleStore, queue: Queue):
        self.config, self.prompts, self.store, self.queue = config, prompts, store, queue
        self.generation = generation_settings(config)
        self.settings = GenerateConfig(
            max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k
        )
        self.loaded = False
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="instruct-label-sampler", daemon=True)

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def next_batch(self) -> list[int]:
        """Which prompts to sample next: the one on screen alone if it is missing, else a batch ahead."""
        missing = [i for i in self.queue.upcoming(1 + 2 * self.config.batch_size) if self.store.get(i) is None]
        if missing and missing[0] == self.queue.current():
            return missing[:1]
        return missing[: self.config.batch_size]

    def _loop(self) -> None:
        import torch

        from instruct_cli.core import inference

        try:
            # no line about the choice: the labelling screen is up by now
            model, tokenizer, _ = inference.load_for_inference(
                self.config.model, self.config.quantization, self.config.device, announce=False
            )
            self.loaded = True
            while not self._stop.is_set():
                with self.queue.cond:
                    batch = self.next_batch()
                    if not batch:
                        self.queue.cond.wait(timeout=1.0)
                        continue
                torch.manual_seed(self.config.seed * 1_000_003 + batch[0])
                responses = sample_responses(
                    model, tokenizer, [self.prompts[i] for i in batch], self.config.k, self.settings, self._stop
                )
                if responses is None:
                    break
                for index, texts in zip(batch, responses):
                    self.store.add(index, self.prompts[index], texts, self.generation)
                with self.queue.cond:
                    self.queue.cond.notify_all()
        except BaseException as exc:  # handed to the labeling thread, which raises it
            self.error = exc
            with self.queue.cond:
                self.queue.cond.notify_all()

    def check(self) -> None:
        """Raise the error that stopped the sampling thread, if any."""
        if self.error is not None:
            raise self.error

    def wait_for(self, index: int) -> dict:
        """Block until prompt `index` has its sample; re-raises an error of the sampling thread."""
        with self.queue.cond:
            while self.store.get(index) is None:
                self.check()
                self.queue.cond.wait(timeout=0.5)
        return self.store.get(index)

    def stop(self) -> None:
        """Stop sampling (a batch under way is abandoned at its next token) and wait for the thread."""
        self._stop.set()
        with self.queue.cond:
            self.queue.cond.notify_all()
        self._thread.join(timeout=30)


def generation_settings(config: LabelConfig) -> dict:
    """The sampling settings stored with every sample and judgment."""
    model = config.model
    if Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    return {
        "model": model,
        "quantization": config.quantization,
        "k": config.k,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": config.top_k,
        "max_new_tokens": config.max_new_tokens,
        "seed": config.seed,
    }
