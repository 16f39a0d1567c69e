"""What every step shares. A core module never imports a step.

errors        UserError: the one-paragraph message (what, where, what to do)
console       progress bars, tables, info/warn/error lines
config        one dataclass per step; each field's docstring is its flag's help; range checks
recipes       recipe files and flags -> validated configs; the recipe's steps in order
artifacts     run folders: manifest, atomic writes, metrics.jsonl, content hashes
data_folders  reading a data folder written by prepare-data
models        resolving a model reference, GGUF conversion, quantised loading, LoRA settings
chat          chat templates: prompts and conversations as token ids, assistant-token labels
sampling      left padding, prompt + response sequences, generate() arguments
heads         the scalar head of reward and value models; hidden states; scores at the last token
lm            the next-token loss on labelled tokens (sft, ppo-ptx, eval perplexity)
preferences   preference rows as reward-model batches; pairwise loss; loading an RM run
training      the training loop of sft and rm: batching, accumulation, checkpoints, resume
rl            the maths of PPO on tensors: GAE, whitening, clipped losses, KL control
tiny          tiny random chat models for tests
"""
