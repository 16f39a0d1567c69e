"""bench_plan's measurement: the peak memory the allocator hands out while a step runs, above the exact bytes
of the loaded model(s) -- on a CPU from torch.profiler's allocation events (overall and per labelled phase),
on a GPU from torch.cuda.max_memory_allocated -- and the phase labels the steps put around their code."""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass

import torch


@dataclass
class Measured:
    """The peak of one measured run: its model bytes, the peak of allocations after it, and per phase."""

    model_bytes: int
    peak_after_load: int
    phases: dict[str, int]
    """Phase label path (e.g. "update/policy logits") -> model bytes + the peak of the running sum inside it."""

    @property
    def total(self) -> int:
        return self.model_bytes + self.peak_after_load

    def peak_in(self, prefixes: list[str]) -> int:
        """model bytes + the highest peak of the phases whose label path starts with one of `prefixes`."""
        peaks = [p for name, p in self.phases.items() if any(name == x or name.startswith(x + "/") for x in prefixes)]
        return max(peaks, default=0)

    def merge(self, other: "Measured") -> "Measured":
        """Two models measured one after the other (eval): the larger peak, every phase of both."""
        top = self if self.total >= other.total else other
        return Measured(top.model_bytes, top.peak_after_load, {**self.phases, **other.phases})


def model_bytes(module: torch.nn.Module) -> int:
    """Exact bytes of a module's tensors: parameters, buffers and bitsandbytes' quantisation state."""
    seen: dict[int, int] = {}

    def add(tensor):
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()

    for tensor in list(module.parameters()) + list(module.buffers()):
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        while state is not None:
            for name in ("absmax", "code", "offset"):
                add(getattr(state, name, None))
            state = getattr(state, "state2", None)
    return sum(seen.values())


def _profiler_peaks(prof) -> tuple[int, dict[str, int]]:
    """(peak of the running sum of allocations, that peak per phase label path) from a CPU profile."""
    from torch._C._profiler import _EventType

    events: list[tuple[int, int, str]] = []

    def walk(nodes, path):
        for node in nodes:
            if node.tag == _EventType.Allocation:
                events.append((node.start_time_ns, node.extra_fields.alloc_size, path))
                continue
            name = node.name
            inner = (path + "/" if path else "") + name[len("phase:") :] if name.startswith("phase:") else path
            walk(node.children, inner)

    walk(prof.profiler.kineto_results.experimental_event_tree(), "")
    events.sort(key=lambda event: event[0])
    running = peak = 0
    phases: dict[str, int] = {}
    for _, size, path in events:
        running += size
        peak = max(peak, running)
        phases[path] = max(phases.get(path, 0), running)
    return peak, phases


def measure(run, model: torch.nn.Module | list[torch.nn.Module]) -> Measured:
    """Run `run()` and measure its peak above the loaded model(s)."""
    modules = model if isinstance(model, list) else [model]
    loaded = sum(model_bytes(m) for m in modules)
    # free what earlier runs left in reference cycles now: the profiler knows the sizes of blocks allocated
    # under an earlier profile, and their frees during this one would lower the running sum
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return Measured(loaded, torch.cuda.max_memory_allocated() - base, {})
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    peak, phases = _profiler_peaks(prof)
    return Measured(loaded, peak, {name: loaded + value for name, value in phases.items()})


@contextlib.contextmanager
def labelled(module, labels: dict[str, str]):
    """While active, allocations inside `module.<function>` are reported under the phase `label`."""
    originals = {name: getattr(module, name) for name in labels}

    def wrap(function, label):
        def wrapper(*args, **kwargs):
            with phase(label):
                return function(*args, **kwargs)

        return wrapper

    for name, label in labels.items():
        setattr(module, name, wrap(originals[name], label))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(module, name, function)


def phase(name: str):
    """A label the measurement reports as the place of the peak."""
    return torch.profiler.record_function("phase:" + name)
