"""The cards `instruct plan` knows and the sizes it reads and prints: the GPU table (`GPUS`, its aliases),
`find_gpu` for a card's name, `parse_memory` for `--gpu-memory`, and the GiB / `gib` units every estimate
is expressed in.

Uses only the core's UserError; no other module of the planner.
"""

from __future__ import annotations

import difflib
import re

from instruct_cli.core.errors import UserError

GiB = 1024**3
MiB = 1024**2


GPUS: dict[str, tuple[str, float]] = {
    "rtx-3060": ("RTX 3060 12GB", 12),
    "rtx-3060-ti": ("RTX 3060 Ti 8GB", 8),
    "rtx-3070": ("RTX 3070 8GB", 8),
    "rtx-3070-ti": ("RTX 3070 Ti 8GB", 8),
    "rtx-3080": ("RTX 3080 10GB", 10),
    "rtx-3080-12gb": ("RTX 3080 12GB", 12),
    "rtx-3080-ti": ("RTX 3080 Ti 12GB", 12),
    "rtx-3090": ("RTX 3090 24GB", 24),
    "rtx-3090-ti": ("RTX 3090 Ti 24GB", 24),
    "rtx-4060": ("RTX 4060 8GB", 8),
    "rtx-4060-ti": ("RTX 4060 Ti 16GB", 16),
    "rtx-4060-ti-8gb": ("RTX 4060 Ti 8GB", 8),
    "rtx-4070": ("RTX 4070 12GB", 12),
    "rtx-4070-super": ("RTX 4070 Super 12GB", 12),
    "rtx-4070-ti": ("RTX 4070 Ti 12GB", 12),
    "rtx-4070-ti-super": ("RTX 4070 Ti Super 16GB", 16),
    "rtx-4080": ("RTX 4080 16GB", 16),
    "rtx-4080-super": ("RTX 4080 Super 16GB", 16),
    "rtx-4090": ("RTX 4090 24GB", 24),
    "rtx-5060-ti": ("RTX 5060 Ti 16GB", 16),
    "rtx-5070": ("RTX 5070 12GB", 12),
    "rtx-5070-ti": ("RTX 5070 Ti 16GB", 16),
    "rtx-5080": ("RTX 5080 16GB", 16),
    "rtx-5090": ("RTX 5090 32GB", 32),
    "rtx-a4000": ("RTX A4000 16GB", 16),
    "rtx-a5000": ("RTX A5000 24GB", 24),
    "rtx-a6000": ("RTX A6000 48GB", 48),
    "rtx-6000-ada": ("RTX 6000 Ada 48GB", 48),
    "t4": ("T4 16GB", 16),
    "l4": ("L4 24GB", 24),
    "a10": ("A10 24GB", 24),
    "a10g": ("A10G 24GB", 24),
    "l40s": ("L40S 48GB", 48),
    "v100": ("V100 16GB", 16),
    "v100-32gb": ("V100 32GB", 32),
    "a100-40gb": ("A100 40GB", 40),
    "a100-80gb": ("A100 80GB", 80),
    "h100": ("H100 80GB", 80),
    "h200": ("H200 141GB", 131),
}
"""Known cards: key -> (name, memory in GiB). Spec sheets' "GB" of GPU memory are GiB (a 24 GB card reports
24564 MiB), except the H200's 141 GB, which are decimal."""
GPU_ALIASES = {
    "a4000": "rtx-a4000",
    "a5000": "rtx-a5000",
    "a6000": "rtx-a6000",
    "a100": "a100-40gb",
    "h100-80gb": "h100",
    "4060-ti-8gb": "rtx-4060-ti-8gb",
    "3080-12gb": "rtx-3080-12gb",
}


def gpu_key(name: str) -> str:
    """A card name as a lookup key: lower case, words joined by '-', without 'nvidia'/'geforce'/'rtx'."""
    text = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    text = re.sub(r"(\d)-?g(i?b)?$", r"\1gb", text)  # "12 GB", "12G" -> "12gb"
    return re.sub(r"^(nvidia-)?(geforce-)?(rtx-)?", "", text)


def _gpu_index() -> dict[str, str]:
    """Every spelling `find_gpu` accepts -> the key in GPUS: the key (without "rtx-"), with or without the
    card's size ("rtx-4090", "4090", "4090-24gb"), and the aliases."""
    index: dict[str, str] = {}
    for key, (_, size) in GPUS.items():
        short = key.removeprefix("rtx-")
        for spelling in (short, f"{short}-{size:g}gb"):
            index.setdefault(spelling, key)
    for alias, key in GPU_ALIASES.items():
        index[alias] = key
    return index


def find_gpu(name: str) -> tuple[str, int]:
    """(display name, bytes) of a known card, e.g. "RTX 4090", "rtx-3060", "A100 80GB", "4060 Ti"."""
    index = _gpu_index()
    key = index.get(gpu_key(name))
    if key is not None:
        display, size = GPUS[key]
        return display, int(size * GiB)
    close = difflib.get_close_matches(gpu_key(name), list(index), n=3, cutoff=0.6)
    names = list(dict.fromkeys(GPUS[index[c]][0] for c in close))
    hint = f"Did you mean {' or '.join(names)}? " if names else ""
    raise UserError(
        f"Unknown GPU {name!r}",
        where="--gpu",
        fix=f"{hint}Or give its memory, e.g. --gpu-memory 12GB. Known cards: "
        f"{', '.join(display for display, _ in GPUS.values())}",
    )


def parse_memory(text: str) -> int:
    """Bytes of a size such as "12GB", "12 GiB", "11.5G", "24000MB" or "12" (GB). GB counts 2^30 bytes, as
    GPU spec sheets do."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not match or float(match.group(1)) <= 0:
        raise UserError(
            f"Cannot read the memory size {text!r}",
            where="--gpu-memory",
            fix="Write it as a number with a unit, e.g. 12GB, 11.5GiB or 24000MB",
        )
    unit = {"": GiB, "k": 1024, "m": MiB, "g": GiB, "t": 1024 * GiB}[match.group(2)]
    return int(float(match.group(1)) * unit)


def gib(n: float) -> str:
    """Bytes as GB with one or two decimals ("0.53 GB", "12.4 GB")."""
    value = n / GiB
    return f"{value:.2f} GB" if value < 10 else f"{value:.1f} GB"
