"""`instruct ppo`: RLHF with PPO on ONE shared base model (InstructGPT step 3).

One iteration: rollout (sample responses to a batch of prompts), score (reward model and/or reward function,
penalty when there is no EOS), KL to the reference, advantages (GAE with a value role, or critic-free RLOO /
GRPO over the K responses to each prompt), then the clipped policy and value update. The maths lives in
core/rl.py; this package moves tensors between the roles. Where each piece lives:

    loop.py         `run` (start-up through core/training.py's `start`, as every training step) and the
                    iteration loop `train`: trajectory, update, KL controller, logs, evaluation, checkpoints
    roles.py        the four adapters on one base (policy, reference, value, reward) and the two heads
    trajectory.py   rollout, score, KL, advantages: Rollout, Trajectory (shapes documented), make_trajectory
    update_step.py  the update: clipped losses over minibatches, the ptx term
    batches.py      what an iteration trains on: its prompts (iteration_prompts) and PPO-ptx batches
    evaluation.py   the held-out evaluation every --eval-every iterations and samples.jsonl

Data parallel (`accelerate launch --num_processes N`): each process samples its own share of the
iteration's prompts with its own random stream (seed + process index); whitening, the logged statistics and
the KL controller use every process's rollouts, the update sums gradients over processes, and only the main
process writes. N processes with --rollout-batch-size B cover the prompts of one process with N x B.
"""

from instruct_cli.steps.ppo.batches import iteration_prompts, prompt_batches, ptx_batches
from instruct_cli.steps.ppo.evaluation import evaluate
from instruct_cli.steps.ppo.loop import check_config, run, train
from instruct_cli.steps.ppo.roles import (
    POLICY,
    REFERENCE,
    REWARD,
    VALUE,
    Roles,
    check_runs,
    load_roles,
    save_outputs,
)
from instruct_cli.steps.ppo.trajectory import Rollout, Trajectory, make_trajectory, rollout, score
from instruct_cli.steps.ppo.update_step import update, update_minibatch

__all__ = [
    "POLICY",
    "REFERENCE",
    "REWARD",
    "VALUE",
    "Roles",
    "Rollout",
    "Trajectory",
    "check_config",
    "check_runs",
    "evaluate",
    "iteration_prompts",
    "load_roles",
    "make_trajectory",
    "prompt_batches",
    "ptx_batches",
    "rollout",
    "run",
    "save_outputs",
    "score",
    "train",
    "update",
    "update_minibatch",
]
