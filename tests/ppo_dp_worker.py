"""One PPO iteration from a fixed global rollout, on however many processes launched it (test_ppo_platforms).

    python tests/ppo_dp_worker.py SFT RM PROMPTS PER_PROCESS MINIBATCH OUT.pt
    accelerate launch --multi_gpu --num_processes 2 tests/ppo_dp_worker.py ... (half the batch per process)

Every process samples the same global rollout (same seed, same prompts), keeps its contiguous share (as
`ppo.iteration_prompts` assigns prompts), then runs make_trajectory, the KL controller and the update. The
main process saves the statistics and the trainable weights, to be compared across process counts.
"""

import sys

import torch

from instruct_cli.core import chat, data_folders, recipes, rl, training
from instruct_cli.core import config as cfg
from instruct_cli.steps import ppo


def main(sft, rm, prompts_folder, per_process, minibatch, out):
    accelerator = training.make_accelerator(0, "no", "cpu")
    world, rank = accelerator.num_processes, accelerator.process_index
    values = dict(sft=sft, reward=rm, data=prompts_folder, out="unused", quantization="none")
    values.update(gradient_checkpointing=False, rollout_batch_size=int(per_process), minibatch_size=int(minibatch))
    values.update(ppo_epochs=2, max_new_tokens=12, lr=1e-3, target_kl=1.0, seed=0)
    config = recipes.build_config(cfg.PPOConfig, "ppo", None, values)
    roles, tokenizer, _, _ = ppo.load_roles(config, accelerator.device)
    prompts = data_folders.read_prompts(prompts_folder, "train")[: config.rollout_batch_size * world]
    encoded = [chat.encode_prompt(tokenizer, messages) for messages in prompts]
    torch.manual_seed(123)
    global_rollout = ppo.rollout(roles, tokenizer, encoded, config, accelerator)
    mine = global_rollout.rows(slice(rank * config.rollout_batch_size, (rank + 1) * config.rollout_batch_size))
    trajectory, stats = ppo.make_trajectory(roles, mine, config, 0.05, accelerator)
    controller = rl.KLController(0.05, config.target_kl, config.kl_horizon)
    controller.update(stats["objective/kl"])
    optimizer = training.prepare_optimizer(accelerator, torch.optim.AdamW(roles.trainable_parameters(), lr=1e-3))
    stats.update(ppo.update(roles, optimizer, trajectory, config, accelerator, iteration=0))
    if accelerator.is_main_process:
        trained = {id(p) for p in roles.trainable_parameters()}
        weights = {name: p.detach().clone() for name, p in roles.model.named_parameters() if id(p) in trained}
        weights["value_head.weight"] = roles.value_head.weight.detach().clone()
        torch.save({"stats": stats, "beta": controller.beta, "weights": weights}, out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
