"""`instruct eval`: judge models on held-out prompts (reward, win-rate, KL, perplexity) and write a report.

    instruct eval --models runs/sft,runs/ppo --reward runs/rm --data data/prompts --out reports/ppo
    instruct eval --models runs/sft,runs/grpo --reward-fn final_number --data data/math --out reports/math

What each figure means (on the first --max-prompts rows of each eval split):
  reward       the reward model's normalised score of a response (0 = the mean, 1 = one standard deviation
               of the RM's training responses), as `instruct rm score` and PPO compute it, minus
               --missing-eos-penalty for a response without an EOS. Without --reward: the --reward-fn
               functions' weighted sum minus that penalty, as `instruct ppo --reward-fn` scores a rollout
  reward functions  per --reward-fn function: the mean over the responses it judged (None = not judged) and
               how many; for 0/1 values the accuracy with its Wilson 95% interval; the mean paired difference
               from the baseline with a bootstrap 95% interval
  win-rate     per prompt, a model's reward against the baseline's on the same prompt: 1 for a win, 0.5 for a
               tie (within 1e-6), 0 for a loss; the mean over prompts, with a percentile-bootstrap 95% interval
  KL           per response, the sum over its tokens of log p_model - log p_reference, both with the logits
               divided by the sampling temperature; its mean over a model's own samples estimates
               KL(model || reference) in nats per response. The reference is the SFT run: a ppo run's parent,
               an sft run itself (KL 0), and for `base` or another model the SFT run among --models
  perplexity   exp of the mean NLL of the assistant tokens of the SFT eval split (what `instruct sft` logs)
  judges       per --judge reward model (another rm run): every response scored as by --reward (its own
               normalisation), the mean, the win-rate and the length-controlled win-rate against the baseline
               with their 95% intervals; a win by --reward that a judge does not confirm is named in the verdict
  RM accuracy  how often the reward model ranks the chosen response first on the preference eval split
  length       response tokens up to and including the EOS; EOS rate: the share that ended before the limit
  distinct-n   distinct word n-grams / all word n-grams over a model's responses (Li et al. 2016)

The work, top to bottom (`run`):
  1. resolve   the models, the baseline, each model's KL reference, the prompts and the data splits
  2. answer    each model in turn (one in memory at a time): sample the prompts with the same settings and
               seed (or read --generations), the log-probs of its own samples, its perplexity; an SFT run
               that is also the KL reference of other models goes after them and measures their KL
  3. KL        each reference not evaluated itself, in turn: the log-probs of the samples measured against it
  4. score     the reward model: every response, and its accuracy on the preference eval split; the reward
               functions: every response, with its prompt's data columns; each --judge reward model in turn
  5. report    report.json, report.md, report.html, samples.jsonl, PNG plots; the report folder is marked
               complete last

The package, one concern a module (none imports this __init__, so there are no cycles):
  stats      outcomes, win-rate, bootstrap and Wilson intervals, distinct-n, KL sums, describe: pure functions
  entries    1. resolve: the flags, the models and their KL references, the prompts, the data folders, inputs
  measure    2-4. the model work: sampling, log-probs, KL, perplexity, reward scores, RM accuracy
  reward_fns 4-5. the reward functions: their values, per-model figures, table and sentences
  judges     5. the --judge reward models: win-rate figures (shared with the main win-rate), table, sentences
  report     5. report.json's figures, the verdict, the table, report.md, samples.jsonl; show and load
  plots      5. the PNG plots (matplotlib)
  html_report  5. report.html: the report as one self-contained web page (plots inline, answers filterable)
  compare    --compare of two reports
  runner     `run`, which calls them in that order, and `write_report`
This __init__ only re-exports the names the cli, tests and benchmarks use (`evaluate.run`, `evaluate.show`,
`evaluate.win_rate`, ...).
Everything here may use instruct_cli.core; nothing here may use another step (import-linter contracts).
"""

from instruct_cli.steps.evaluate.compare import compare
from instruct_cli.steps.evaluate.entries import Entry, Samples, read_generations
from instruct_cli.steps.evaluate.html_report import render_html
from instruct_cli.steps.evaluate.measure import release_memory, response_logprobs, sample_responses
from instruct_cli.steps.evaluate.plots import (
    plot_reward_distribution,
    plot_reward_kl,
    plot_training_curves,
    plot_win_rates,
    read_metrics,
)
from instruct_cli.steps.evaluate.report import load_report, show
from instruct_cli.steps.evaluate.runner import run, write_report
from instruct_cli.steps.evaluate.stats import (
    bootstrap_interval,
    describe,
    distinct_n,
    outcomes,
    sequence_kl,
    wilson_interval,
    win_rate,
)

__all__ = [
    "Entry",
    "Samples",
    "bootstrap_interval",
    "compare",
    "describe",
    "distinct_n",
    "load_report",
    "outcomes",
    "plot_reward_distribution",
    "plot_reward_kl",
    "plot_training_curves",
    "plot_win_rates",
    "read_generations",
    "read_metrics",
    "render_html",
    "release_memory",
    "response_logprobs",
    "run",
    "sample_responses",
    "sequence_kl",
    "show",
    "wilson_interval",
    "win_rate",
    "write_report",
]
