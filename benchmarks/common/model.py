"""The random Llama the benchmarks build at run time (the tokenizer and ChatML template of
`instruct_cli.core.tiny`, any width, depth and vocabulary), or the --model folder given instead."""

from __future__ import annotations

import shutil
from pathlib import Path


def build_model(
    folder: Path,
    *,
    hidden: int,
    layers: int,
    intermediate: int,
    heads: int,
    kv_heads: int = 0,
    vocab_size: int = 0,
    seed: int = 0,
    scale_embedding: bool = True,
    announce: bool = True,
) -> Path:
    """A random Llama with the tokenizer (and ChatML template) of `instruct_cli.core.tiny`, saved to `folder`.

    `vocab_size` > the tokenizer's pads the embedding and LM head (like real checkpoints, whose matrices are
    rounded up), so the cost of the vocabulary-sized logits can be made realistic; 0 keeps the tokenizer's 384.
    `kv_heads` < `heads` gives grouped-query attention (0: as many as `heads`). `scale_embedding` draws the
    embedding so that logits stay of order 10 (as the tiny model does), instead of transformers' default
    initialisation; `announce` prints the model's shape.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from instruct_cli.core.tiny import build_tiny_model

    tiny = build_tiny_model(folder.parent / (folder.name + "-tokenizer"), seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    vocab = max(len(tokenizer), vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    if scale_embedding:
        with torch.no_grad():  # as instruct_cli.core.tiny does (0.25 at hidden 64), scaled so logits stay of order 10
            model.model.embed_tokens.weight.normal_(0.0, 2.0 / hidden**0.5)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shutil.rmtree(tiny, ignore_errors=True)
    if announce:
        params = sum(p.numel() for p in model.parameters())
        print(
            f"[bench] built a random Llama in {folder}: hidden {hidden}, {layers} layers, intermediate "
            f"{intermediate}, {heads} heads, vocab {vocab}, {params / 1e6:.1f}M parameters",
            flush=True,
        )
    return folder


def default_model(work: Path, args) -> Path:
    """--model if given, else a random Llama built from the --hidden/--layers/... flags."""
    if args.model:
        return Path(args.model).resolve()
    return build_model(
        work / "model",
        hidden=args.hidden,
        layers=args.layers,
        intermediate=args.intermediate,
        heads=args.heads,
        vocab_size=args.vocab_size,
        seed=args.seed,
    )
