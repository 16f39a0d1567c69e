"""`instruct plan`: will this recipe fit my GPU? Peak device memory per step, from the model's config alone.

Nothing is loaded but the model's `config.json` (a local folder, a hub id, the built-in model, or
`--model-config FILE`), so planning a 70B run is as instant as planning a 135M one. Every number is derived
from how the steps of this package actually run (sft.py, rm.py, ppo.py, evaluate.py) on transformers, peft
and bitsandbytes; `benchmarks/bench_plan.py` checks each step against the allocator's own accounting.

Notation: V vocabulary, h hidden size, i MLP (intermediate) size, L layers, n_q / n_kv attention / key-value
heads, d head size, r LoRA rank; b sequences in a batch, s tokens per sequence, N = b*s tokens. Sizes in bytes.

Weights (what stays on the device all step long)
    parameters     embedding V*h, per layer q h*n_q*d, k and v h*n_kv*d each, o n_q*d*h, gate and up h*i each,
                   down i*h, two norms h (plus the biases and per-head q/k norms some families have), the
                   final norm h, and an untied lm_head V*h.
    nf4            quantised Linear layers (q, k, v, o, gate, up, down) cost 0.5 byte/param packed, plus the
                   absmax constants: one per 64 weights, itself quantised to 8 bits with double quantisation
                   (1 byte per 64 weights, and an fp32 per 256 blocks: ~0.127 bit/param in all).
    int8           1 byte/param plus an fp32 scale per output row.
    the rest       embeddings, lm_head, norms, biases stay unquantised. In the training steps
                   peft.prepare_model_for_kbit_training casts them to fp32 (4 bytes), so a 4-bit Llama-3-8B
                   carries 2 x 0.5B fp32 embedding/lm_head parameters = 4.2 GB next to 3.7 GB of 4-bit layers.
                   Without quantisation, or in eval (no preparation), they are in the compute dtype.
    LoRA           r*(in + out) per targeted Linear (all-linear = q, k, v, o, gate, up, down), fp32.
    training       AdamW: fp32 gradient + 2 fp32 moments per trainable parameter (LoRA, scalar heads).
    PPO roles      one base; four LoRA sets (policy, reference, value, reward) and two heads (h + 1 each).

Activations (what autograd keeps for the backward pass), per token and layer, as an inventory of the
tensors saved (`layer_inventory`): the fp32 input of each RMSNorm (4h bytes each) and its 1/rms, the normed
input of the LoRA'd projections, LoRA's A outputs (r each), q, k, v (k and v repeated to n_q heads when a
padding mask is present, as transformers' sdpa path does for grouped-query attention), the attention output
and its log-sum-exp, the float attention mask (s per token), and the MLP's gate, SiLU(gate), up and their
product (4i). With LoRA dropout each LoRA'd projection keeps its own dropped copy and mask (1 byte on CUDA).
The dtypes follow the run: the residual stream has the embedding's dtype (fp32 after kbit preparation),
autocast casts the matmul inputs (and LoRA's) to bf16 on a GPU, bitsandbytes returns its input's dtype.
    without checkpointing   N * (L * inventory), plus the final norm's fp32 input (4h)
    with checkpointing      N * L * h * stream bytes (each layer's input); during the backward one layer is
                            recomputed (its inventory) next to its gradients: the output gradient (h) and at
                            the SiLU(gate) * up product two intermediate gradients (2i), plus, with a 4-bit
                            base, the largest weight dequantised for the input gradient.
Without gradients (rollouts, scoring, eval) one layer at a time is alive: its input, the post-attention sum
and the normed copy (3h) and four MLP-sized tensors (4i), plus the float mask.

Logits
    SFT      the loss over the N labelled positions (sft projects only those onto the vocabulary; planned
             as if every position were labelled, so an upper bound): the logits, the copy cross-entropy
             gets and the fp32 log-softmax; in the backward the saved log-softmax, its gradient and the
             input gradient: 3 fp32 copies, 12 bytes per N*V element (with bf16 logits the forward holds
             10, the backward 12).
             With autocast an fp32 (kbit-prepared) lm_head is also cast to bf16 and kept: V*h*2.
    PPO      only the response positions (logits_to_keep): b x (T+1) x V. Rollout log-probs and entropy:
             the logits + 4 fp32 copies (scaled, log-softmax, exp, product); the update: the logits + the
             saved log-softmax, its gradient and the input gradient.
    eval     perplexity over batch x max_length positions: logits + the fp32 copy + log-softmax (s + 8 bytes
             per element); response log-probs over b x (T+1) positions the same.
KV cache (PPO rollouts, eval sampling): 2 * L * n_kv * d * (prompt + new tokens) * b * bytes, in the dtype of
k and v: fp32 for a 4-bit base in PPO (its stream was upcast for training and bitsandbytes returns fp32).

Peak = weights + adapters + optimizer states + the largest of the moments a step goes through (the loss,
one layer's backward, the rollout's prefill and its last token, scoring, the rollout's log-probs, the PPO
update, the optimizer step), with the gradients counted where they exist (always in sft/rm, which may
accumulate; PPO frees them after every minibatch). `Breakdown.phase` names the moment.
Planned at the configured maxima (full-length batches with padding, the longest prompts and responses).
On a GPU the compute dtype is bf16 and about 0.5 GB goes to the CUDA context; the estimate is of the memory
torch allocates (`torch.cuda.max_memory_allocated`), to which the caching allocator adds some fragmentation,
so a step within 10% of the card is marked tight.

The package, one concern a module (each imports only those above it; the core, never another step):
    gpus.py         the GPU table, find_gpu, parse_memory, GiB and gib
    shapes.py       ModelShape from a config.json, the built-in reference configs, parameter counts, LoRA sizes
    memory.py       the byte models above: precision, weights, activations, KV cache, logits
    estimate.py     Breakdown and Moment, estimate_sft/rm/ppo/eval and estimate_step, StepPlan, judge/Verdict
    suggestions.py  the config changes that make a step fit (candidate_changes, suggest)
    recipe.py       the steps, models and adapters of a recipe; plan_recipe
    render.py       the printed breakdown (show) and the fit table of docs/commands/plan.md (fit_table)
    runner.py       `run`: the command (--table, --json or the printed plan of a recipe)
This __init__ only re-exports the names tests, benchmarks and the cli use as plan.X (and the types a
StepPlan holds); the rest is imported from the module that owns it.
"""

from .estimate import (
    Breakdown,
    StepPlan,
    Verdict,
    estimate_eval,
    estimate_ppo,
    estimate_rm,
    estimate_sft,
    judge,
)
from .gpus import GiB, find_gpu, parse_memory
from .memory import (
    base_weight_bytes,
    kv_cache_bytes,
    layer_bytes_per_token,
    nf4_bytes,
    precision,
    training_activation_bytes,
)
from .recipe import plan_recipe
from .render import TABLE_MODELS, fit_table, show
from .runner import run
from .shapes import (
    REFERENCE_MODELS,
    Lora,
    ModelShape,
    lora_for,
    lora_parameters,
    lora_targets,
    parameter_counts,
    read_model_shape,
)
from .suggestions import suggest

__all__ = [
    "GiB",
    "REFERENCE_MODELS",
    "TABLE_MODELS",
    "Breakdown",
    "Lora",
    "ModelShape",
    "StepPlan",
    "Verdict",
    "base_weight_bytes",
    "estimate_eval",
    "estimate_ppo",
    "estimate_rm",
    "estimate_sft",
    "find_gpu",
    "fit_table",
    "judge",
    "kv_cache_bytes",
    "layer_bytes_per_token",
    "lora_for",
    "lora_parameters",
    "lora_targets",
    "nf4_bytes",
    "parameter_counts",
    "parse_memory",
    "plan_recipe",
    "precision",
    "read_model_shape",
    "run",
    "show",
    "suggest",
    "training_activation_bytes",
]
