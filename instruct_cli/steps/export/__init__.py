"""`instruct export`: merge a run's LoRA adapter into its base and write the result for other tools.

Two formats:
  * `transformers` (default): a plain folder that loads with `AutoModelForCausalLM.from_pretrained` alone (no
    peft, no bitsandbytes), with its tokenizer and chat template, ready for vLLM or the hub;
  * `gguf`: one `.gguf` file for llama.cpp and Ollama, tokenizer and chat template inside (gguf_file.py), and an
    Ollama `Modelfile` beside it (ollama.py).
Either way the output folder appears in one rename, complete, with `instruct-export.json` saying where it
came from. `run` (runner.py) checks the flags, merges the adapter and writes either format.
"""

from instruct_cli.steps.export.runner import DTYPES, FORMATS, run

__all__ = ["DTYPES", "FORMATS", "run"]
