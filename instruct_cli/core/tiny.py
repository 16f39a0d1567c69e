"""A tiny, randomly initialised chat model built on the spot: the stand-in for real models in tests and CI.

It has a real byte-level BPE tokenizer (trained in milliseconds on a fixed text), a ChatML chat template
like SmolLM2's, a pad token distinct from EOS, and a small Llama network, so every code path — chat
template, 4-bit loading, LoRA, generation — runs exactly as on a real model, only faster.
`python -m instruct_cli.core.tiny DIR` writes one to DIR (examples/pipeline.sh uses it in CI).
"""

from __future__ import annotations

import sys
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = (
    """
The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital of France.
Write a short poem about the sea. Summarise this text. Translate to French. yes no maybe thank you please
system user assistant You are a helpful assistant. 0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ? ! . , ; :
apple banana cherry red green blue one two three four five good bad happy sad always never hello world
"""
    * 4
)


def build_tiny_model(
    folder: Path, hidden_size: int = 64, layers: int = 2, vocab_size: int = 384, seed: int = 0
) -> Path:
    """Write a tiny Llama chat model with its tokenizer to `folder` (a plain transformers folder)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([_CORPUS], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(folder)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    # Larger (tied) embeddings than the 0.02 default: after the final RMSNorm the hidden state has a fixed
    # norm, so with tiny embeddings no logit could rise far above the others and nothing could be learned.
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 0.25)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m instruct_cli.core.tiny DIR")
    print(build_tiny_model(Path(sys.argv[1])))
