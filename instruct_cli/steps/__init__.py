"""One module or small package per command. A step imports the core, never another step: what two steps
share moves down into the core.

    prepare_data/  raw files -> a data folder          sft        supervised fine-tuning
    rm             reward model and `rm score`          ppo        PPO on one shared base
    dpo            DPO / IPO on preferences
    generate       answers from any model               evaluate/  the eval report
    label/         human rankings in the terminal       export     a merged transformers folder
    plan/          the memory planner                   pipeline   `instruct run`: a recipe's steps
"""
