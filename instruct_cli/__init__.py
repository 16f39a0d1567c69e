"""instruct: the InstructGPT recipe (SFT -> reward model -> PPO) as composable command-line steps."""

__version__ = "0.1.0"
