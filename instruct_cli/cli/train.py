"""The training commands: `instruct sft`, `instruct rm` (and `rm score`), `instruct dpo` and `instruct ppo`.

Each command's flags come from its step's config dataclass (cli/options.py); the command adds its docstring
and examples, then calls the step's `run` with the built config.
"""

from __future__ import annotations

import typer

from instruct_cli.cli.app import app, handles_user_errors
from instruct_cli.cli.options import config_command
from instruct_cli.core import config as cfg


@app.command()
@handles_user_errors
@config_command(cfg.SFTConfig, "sft")
def sft(config: cfg.SFTConfig) -> None:
    """Supervised fine-tuning: train a LoRA adapter on demonstrations (loss on assistant tokens only).

    [bold]Examples[/bold]

      instruct sft --data data/sft --out runs/sft

      instruct sft --model Qwen/Qwen2.5-0.5B-Instruct --data data/sft --out runs/sft --epochs 2 --lr 1e-4

      instruct sft --recipe recipes/quickstart.yaml --out runs/sft --resume

      instruct sft --data data/sft --out runs/sft --report-to tensorboard   # then: tensorboard --logdir runs
    """
    from instruct_cli.steps import sft as sft_step

    sft_step.run(config)


rm_app = typer.Typer(
    no_args_is_help=False,
    invoke_without_command=True,
    rich_markup_mode="rich",
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(rm_app, name="rm")


@rm_app.callback()
@handles_user_errors
@config_command(cfg.RMConfig, "rm")
def rm(ctx: typer.Context, config: cfg.RMConfig) -> None:
    """Train a reward model (LoRA + scalar head) on preference pairs or K-wise rankings.

    [bold]Examples[/bold]

      instruct rm --model runs/sft --data data/prefs --out runs/rm

      instruct rm --data data/prefs --out runs/rm --margin 0.5 --epochs 2

      instruct rm score --model runs/rm --input answers.jsonl --output scored.jsonl
    """
    from instruct_cli.steps import rm as rm_step

    rm_step.run(config)


@rm_app.command("score")
@handles_user_errors
@config_command(cfg.RMScoreConfig, "rm-score", recipe=False)
def rm_score(config: cfg.RMScoreConfig) -> None:
    """Score rows of prompt + response with a reward model run; adds a normalised `reward` to each row.

    [bold]Examples[/bold]

      instruct rm score --model runs/rm --input answers.jsonl --output scored.jsonl

      instruct generate -m runs/sft -i prompts.jsonl | instruct rm score -m runs/rm -i -
    """
    from instruct_cli.steps import rm as rm_step

    rm_step.score(config)


@app.command()
@handles_user_errors
@config_command(cfg.DPOConfig, "dpo")
def dpo(config: cfg.DPOConfig) -> None:
    """Direct preference optimisation: train the policy on preference pairs or rankings, with no reward model.

    The reference is the model it starts from (the SFT run's adapter), scored once on the same base.

    [bold]Examples[/bold]

      instruct dpo --model runs/sft --data data/prefs --out runs/dpo

      instruct dpo --model runs/sft --data data/prefs --out runs/ipo --loss ipo --beta 0.5

      instruct dpo --model runs/sft --data data/prefs --out runs/rdpo --loss robust --label-smoothing 0.1

      instruct dpo --model runs/sft --data data/prefs --out runs/dpo --resume
    """
    from instruct_cli.steps import dpo as dpo_step

    dpo_step.run(config)


@app.command()
@handles_user_errors
@config_command(cfg.PPOConfig, "ppo")
def ppo(config: cfg.PPOConfig) -> None:
    """RLHF with PPO: optimise the SFT policy against the reward model, on one shared base model.

    --advantage rloo or grpo trains without a value function (K samples per prompt); --reward-fn uses a Python
    function as the reward, instead of the reward model or added to it.

    [bold]Examples[/bold]

      instruct ppo --sft runs/sft --reward runs/rm --data data/prompts --out runs/ppo

      instruct ppo --sft runs/sft --reward runs/rm --data data/prompts --out runs/ppo --target-kl 6 --iterations 200

      instruct ppo --sft runs/sft --reward runs/rm --data data/prompts --out runs/rloo --advantage rloo

      instruct ppo --sft runs/sft --reward-fn examples/rewards.py:brevity --data data/prompts --out runs/grpo --advantage grpo --kl-coef 0.04

      instruct ppo --recipe recipes/quickstart.yaml --resume
    """
    from instruct_cli.steps import ppo as ppo_step

    ppo_step.run(config)
