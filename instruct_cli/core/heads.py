"""Scalar heads on a causal-LM body: the reward model's score and PPO's value function.

A reward (or value) model here is NOT a sequence-classification model: it is the same causal-LM base that
every other role uses, with a LoRA adapter, plus a `ScalarHead` (a `Linear(hidden_size, 1)`) applied to the
decoder's last hidden states. PPO can then keep one base in memory and switch roles with `set_adapter`.

* `last_hidden_states` runs the decoder body without the lm_head (no vocab-sized logits), with position ids
  taken from the attention mask, so left- and right-padded batches give the same states.
* `sequence_scores` reads one scalar per sequence at its LAST REAL token (by attention mask, whatever the
  padding side) — never at "the first pad token", which is wrong for left padding and for pad == EOS.
  `packed_sequence_scores` reads them from shared-prefix packed rows (packing.py) at each sequence's end.
* The head is saved INSIDE the adapter folder (`score_head.safetensors` + `score_head.json`), so a run's
  `adapter/` holds everything the role needs, and it round-trips exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from instruct_cli.core import packing
from instruct_cli.core.errors import UserError

HEAD_WEIGHTS = "score_head.safetensors"
HEAD_CONFIG = "score_head.json"


class ScalarHead(nn.Linear):
    """`Linear(hidden_size, 1)` applied to hidden states: (..., hidden) -> (..., 1), computed in its own dtype.

    The input is cast to the head's dtype (float32 by default), so a bf16 body feeds an fp32 head safely, and
    autocast is off inside: under bf16 autocast the Linear would otherwise run in bf16 while training (rm, the
    value loss) and in fp32 when scoring, and the two would disagree.
    """

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32, seed: int | None = None):
        super().__init__(hidden_size, 1, bias=True, dtype=dtype)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            # std 1/sqrt(h): a unit-norm-per-feature hidden state (after the final norm) gives scores of order 1
            weight = torch.randn(self.weight.shape, generator=generator, dtype=torch.float32) / hidden_size**0.5
            self.weight.copy_(weight.to(dtype))
            self.bias.zero_()

    @property
    def hidden_size(self) -> int:
        """The width of the hidden states the head reads."""
        return self.in_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # noqa: D102 - see the class docstring
        with torch.autocast(hidden.device.type, enabled=False):
            return super().forward(hidden.to(self.weight.dtype))


def hidden_size_of(model) -> int:
    """The hidden size of a (peft-wrapped) transformers model, from its config."""
    config = model.config
    config = getattr(config, "get_text_config", lambda: config)()
    return int(config.hidden_size)


def save_head(head: ScalarHead, folder: Path) -> None:
    """Write the head into `folder` (normally the adapter folder): weights as safetensors + its size as JSON."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in head.state_dict().items()}
    save_file(state, str(folder / HEAD_WEIGHTS))
    (folder / HEAD_CONFIG).write_text(
        json.dumps(
            {"hidden_size": head.in_features, "out_features": 1, "dtype": str(head.weight.dtype).replace("torch.", "")}
        )
        + "\n"
    )


def has_head(folder: Path) -> bool:
    """True when `folder` holds a saved head."""
    return (Path(folder) / HEAD_WEIGHTS).is_file() and (Path(folder) / HEAD_CONFIG).is_file()


def load_head(folder: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> ScalarHead:
    """The head saved in `folder` by `save_head`, exactly as it was saved (dtype kept unless `dtype` is given)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not has_head(folder):
        raise UserError(
            f"{folder} has no scalar head ({HEAD_WEIGHTS})",
            where=str(folder),
            fix="Pass the folder of a run made by `instruct rm`, or rerun that step with --force",
        )
    meta = json.loads((folder / HEAD_CONFIG).read_text())
    state = load_file(str(folder / HEAD_WEIGHTS))
    saved_dtype = state["weight"].dtype
    head = ScalarHead(int(meta["hidden_size"]), dtype=saved_dtype)
    head.load_state_dict(state, strict=True)
    return head.to(device=device, dtype=dtype or saved_dtype)


# ------------------------------------------------------------------------------------------ the body
def decoder_body(model) -> nn.Module:
    """The decoder stack of a (peft-wrapped) causal LM: everything but the lm_head.

    LoRA layers are injected in place, so the body of a PeftModel runs whichever adapter is active.
    """
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if isinstance(body, nn.Module) and body is not model:
        return body
    if hasattr(model, "get_decoder"):
        return model.get_decoder()
    raise TypeError(f"Cannot find the decoder body of {type(model).__name__}")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (cumsum - 1, pads clamped to 0): padding-side independent."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_hidden_states(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """The final (normed) hidden states of the decoder body, (B, T, hidden), without computing vocab logits.

    `attention_mask` is a (B, T) padding mask (positions then come from it), or a ready 4-D mask with its
    `position_ids` (packed rows, see packing.py), which transformers passes to the attention unchanged.
    """
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    output = decoder_body(model)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real (mask 1) token of each row, whatever the padding side: (B,)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


def sequence_scores(model, head: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar per sequence: the head on the hidden state of its last real token. (B,) in the head's dtype."""
    hidden = last_hidden_states(model, input_ids, attention_mask)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return head(hidden[rows, last_token_index(attention_mask).to(hidden.device)]).squeeze(-1)


def packed_sequence_scores(
    model, head: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, segments: torch.Tensor, ends
) -> torch.Tensor:
    """One scalar per packed sequence (packing.pack's rows): the head at each sequence's last token (`ends`,
    flat indices into rows x width). (sequences,) in the head's dtype; equal to `sequence_scores` of the
    sequences one by one up to float rounding."""
    hidden = packed_hidden_states(model, input_ids, position_ids, segments)
    return head(hidden[ends.to(hidden.device)]).squeeze(-1)


def packed_hidden_states(
    model, input_ids: torch.Tensor, position_ids: torch.Tensor, segments: torch.Tensor
) -> torch.Tensor:
    """`last_hidden_states` of packed rows (packing.pack), flattened to (rows * width, hidden): each token's
    state as in its own sequence alone, indexed by packing's flat indices."""
    body = decoder_body(model)
    dtype = body.get_input_embeddings().weight.dtype
    mask = packing.attention_mask(segments, body.config._attn_implementation, dtype)
    hidden = last_hidden_states(model, input_ids, mask, position_ids)
    return hidden.reshape(-1, hidden.shape[-1])


# ------------------------------------------------------------------------------------- reward model
class RewardModel(nn.Module):
    """A peft model (`body`) and a `ScalarHead` (`head`) as one module: forward returns sequence scores (B,).

    Being one module, `named_parameters()` holds both the LoRA weights and the head, so the shared training
    loop trains, checkpoints and resumes the head with the adapter at no extra cost.
    """

    def __init__(self, body, head: ScalarHead):
        super().__init__()
        self.body = body
        self.head = head

    @property
    def config(self):
        """The base model's config."""
        return self.body.config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        ends: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores of padded sequences (`attention_mask`), or of packed rows (`position_ids`, `segments` and
        `ends` from packing.pack); through forward either way, so DDP's gradient hooks see both."""
        if segments is not None:
            return packed_sequence_scores(self.body, self.head, input_ids, position_ids, segments, ends)
        return sequence_scores(self.body, self.head, input_ids, attention_mask)

    @property
    def packs(self) -> bool:
        """True when the body takes packed rows exactly (packing.supports)."""
        return packing.supports(self.body)


def save_adapter(model: RewardModel, folder: Path) -> None:
    """Save the LoRA adapter (peft's `save_pretrained`) and the head into the same folder."""
    model.body.save_pretrained(folder)
    save_head(model.head, folder)


def load_adapter_weights(model: RewardModel, folder: Path) -> None:
    """Load an adapter + head saved by `save_adapter` into `model`'s active adapter and head, in place."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    device = next(model.head.parameters()).device
    set_peft_model_state_dict(
        model.body, load_peft_weights(str(folder), device=str(device)), adapter_name=model.body.active_adapter
    )
    saved = load_head(folder, device=device, dtype=model.head.weight.dtype)
    with torch.no_grad():
        model.head.weight.copy_(saved.weight)
        model.head.bias.copy_(saved.bias)
