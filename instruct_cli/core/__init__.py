"""What every step shares. A core module never imports a step.

errors        UserError: the one-paragraph message (what, where, what to do)
console       progress bars, tables, info/warn/error lines
settings      how one setting is declared (type, default, docstring, range, flag spelling) and checked
config        one dataclass per step, a field per setting
methods       tables of the variation points: advantage estimators, DPO losses (no torch)
step_table    the table of steps: config, module, inputs, outputs, policy or not, headline metrics
recipes       recipe files and flags -> validated configs; the recipe's steps in order
artifacts     run folders: manifest, atomic writes, metrics.jsonl, content hashes
trackers      --report-to: metrics.jsonl rows also sent to TensorBoard, wandb, mlflow (accelerate's trackers)
data_folders  reading a data folder written by prepare-data
models        resolving a model reference, GGUF conversion, quantised loading, LoRA settings
cpu_linear    frozen fp32 Linear layers on a CPU through oneDNN (about 2x MKL's matmul rate on AMD CPUs)
inference     loading to sample: `auto` quantisation and dtype, adapters merged once and cached
llama_engine  --engine llama.cpp: the GGUF file a model runs as (written once), exact sampling flags
gguf_file     writing a merged model as one GGUF file (export --format gguf, the llama.cpp engine)
chat          chat templates: prompts and conversations as token ids, assistant-token labels
sampling      left padding, prompt + response sequences, generate() arguments
lora_merge    a LoRA adapter folded into the base weights while sampling, the base bit-identical afterwards
heads         the scalar head of reward and value models; hidden states; scores at the last token
packing       packed rows, 4-D mask: a prompt and its K responses (rm, dpo, ppo, eval), rows side by side
              (sft), or both, sharing what prefix they have in common (ppo's passes)
lm            the next-token loss on labelled tokens (sft, ppo-ptx, eval perplexity); log-probs per sequence
preferences   preference rows as reward-model batches; pairwise loss; loading an RM run
dpo_loss      the maths of the DPO losses on sequence log-probs: pair losses, implicit rewards
training      how every training step starts (flags, --resume, accelerator, run folder) and the training
              loop of sft, rm and dpo: batching, accumulation, checkpoints, resume
checkpoints   stop signals (Ctrl-C, SIGTERM), checkpoint writing and restoring, per-process RNG
distributed   sums and gathers over the processes of a data-parallel run
rl            the maths of PPO on tensors: GAE, whitening, clipped losses, KL control; RLOO/GRPO, k3 KL
reward_functions  --reward-fn: loading a user's Python reward function and calling it safely
tiny          tiny random chat models for tests
"""
