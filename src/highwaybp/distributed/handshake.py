"""The configuration handshake of the multi-process runtimes (`HighwayPipeline`, the
`ExactPipeline` baselines, DDG): when a runtime is built, every rank sends its
configuration to every other (two small all-gathers) and all of them compare.

Ranks configured differently (other boundaries, a longer chain, another k) do not fail by
themselves: their messages keep the same shapes, so a stage runs layers another stage also
runs, or takes one step's tensor as another's, and the run trains silently wrong. As DDP
checks parameter shapes across ranks when it is built, the runtimes call
`check_same_config` once with an ordered mapping field -> value (JSON values); any field
whose value is not the same on every rank raises `ConfigMismatchError` on every rank,
naming the field, each value and the ranks that hold it (every rank sees every
configuration, so each raises the same error).

`layer_fingerprint` and `dtype_text` are the per-layer and per-model parts of a
configuration; `config_differences` is the comparison (a pure function, testable without
processes).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from highwaybp.distributed.transport import TransportError


class ConfigMismatchError(TransportError):
    """The ranks of a multi-process runtime were built with different configurations."""


def layer_fingerprint(layer: nn.Module) -> str:
    """What every rank's copy of `layer` must agree on: the residual map of a
    `ResidualLayer` (its type and options), and each parameter's and buffer's name, shape
    and dtype ("block.0.weight:6x6:float64"). Values are not compared (ranks may hold
    different weights, e.g. after loading their own checkpoints)."""
    parts = []
    residual = getattr(layer, "residual", None)
    if isinstance(residual, nn.Module):
        extra = residual.extra_repr()
        parts.append(f"{type(residual).__name__}({extra})")
    for kind, named in (("", layer.named_parameters()), ("buffer ", layer.named_buffers())):
        for name, t in named:
            shape = "x".join(str(d) for d in t.shape) or "scalar"
            parts.append(f"{kind}{name}:{shape}:{str(t.dtype).removeprefix('torch.')}")
    return "; ".join(parts) or "no parameters"


def dtype_text(modules: Iterable[nn.Module]) -> str:
    """The floating-point dtypes of the modules' parameters ("float64", or
    "float32+float64" for a mixed model; "none" without parameters)."""
    dtypes = {str(p.dtype).removeprefix("torch.") for m in modules for p in m.parameters()}
    return "+".join(sorted(dtypes)) or "none"


def _ranks_text(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def _by_value(values: Sequence[Any]) -> str:
    """"rank 0 has X, ranks 1, 2 have Y" (values in order of first appearance)."""
    groups: list[tuple[Any, list[int]]] = []
    for rank, value in enumerate(values):
        for seen, ranks in groups:
            if seen == value:
                ranks.append(rank)
                break
        else:
            groups.append((value, [rank]))
    return ", ".join(
        f"{_ranks_text(ranks)} {'has' if len(ranks) == 1 else 'have'} "
        f"{'(not set)' if value is _MISSING else json.dumps(value)}"
        for value, ranks in groups)


_MISSING = object()


def config_differences(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per field whose value differs between the ranks' configurations
    (configs[r] is rank r's), in the order of rank 0's fields; [] if all agree.

    A list-valued field named "layers" (one fingerprint per layer) is reported at its first
    differing layer, so the line stays short for a long chain. If the field "runtime"
    differs (ranks building different runtimes), only it is reported: the other fields
    are not comparable then."""
    fields = list(configs[0])
    for config in configs[1:]:
        fields += [f for f in config if f not in fields]
    runtimes = [config.get("runtime", _MISSING) for config in configs]
    if any(r != runtimes[0] for r in runtimes):
        fields = ["runtime"]
    lines = []
    for name in fields:
        values = [config.get(name, _MISSING) for config in configs]
        if all(v == values[0] for v in values[1:]):
            continue
        if name == "layers" and all(isinstance(v, list) for v in values):
            longest = max(len(v) for v in values)
            i = next(i for i in range(longest)
                     if any(v[i:i + 1] != values[0][i:i + 1] for v in values))
            per_rank = [v[i] if i < len(v) else "(no such layer)" for v in values]
            lines.append(f"layers: layer {i + 1} differs: {_by_value(per_rank)}")
        else:
            lines.append(f"{name}: {_by_value(values)}")
    return lines


def _wait(work: Any, timeout: float, what: str) -> None:
    if not work.wait(datetime.timedelta(seconds=timeout)):
        raise TimeoutError(f"{what} did not complete")


def _all_gather_bytes(data: bytes, world: int, device: torch.device, timeout: float,
                      group: Any) -> list[bytes]:
    """Every rank's `data` (of any length): one all-gather of the lengths, one of the
    bytes padded to the longest."""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    _wait(dist.all_gather(sizes, size, group=group, async_op=True), timeout,
          "the all-gather of the configurations' sizes")
    lengths = [int(s.item()) for s in sizes]
    buf = torch.zeros(max(lengths), dtype=torch.uint8)
    buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(device)
    bufs = [torch.empty_like(buf) for _ in range(world)]
    _wait(dist.all_gather(bufs, buf, group=group, async_op=True), timeout,
          "the all-gather of the configurations")
    return [bytes(b[:n].cpu().numpy().tobytes()) for b, n in zip(bufs, lengths)]


# Per process group (None: the default one): handshakes this process took part in there.
_handshakes: dict[Any, int] = {}


def check_same_config(label: str, config: Mapping[str, Any], *, rank: int, world: int,
                      timeout: float, device: torch.device | str = "cpu",
                      group: Any = None) -> int:
    """Compare this rank's `config` (field -> JSON value) with every other rank's; raise
    `ConfigMismatchError` on every rank if any field differs. A collective: every rank of
    `group` (default: the world) must call it once, at the same point (the runtime's
    construction); each wait is bounded by `timeout` seconds (a `TransportError` names a
    peer that never arrived). Does nothing for world == 1 (and returns 0).

    Returns the runtime's channel: how many handshakes this process took part in before on
    this group, the same number on every rank of it (each is a collective). A runtime's
    `Link` puts it in every message's tag header, so two runtimes on one process group (a
    training and an evaluation pipeline) stepped in a different order on different ranks
    fail at once instead of taking each other's messages."""
    if world <= 1:
        return 0
    mine = json.dumps(dict(config)).encode()
    try:
        raw = _all_gather_bytes(mine, world, torch.device(device), timeout, group)
    except Exception as err:
        raise TransportError(
            f"{label} rank {rank}/{world}: comparing the configuration with the other ranks "
            f"failed (timeout {timeout:.0f}s): {type(err).__name__}: {err}. A peer failed or "
            "never built its part (see its message); every rank stops.") from err
    key = None if group is None or group is dist.group.WORLD else group
    channel = _handshakes.get(key, 0)
    _handshakes[key] = channel + 1
    lines = config_differences([json.loads(r.decode()) for r in raw])
    if lines:
        raise ConfigMismatchError(
            f"{label} rank {rank}/{world}: the ranks were built with different "
            "configurations, and their messages would still fit each other (a silently "
            "wrong result); every rank stops. Differences:\n  " + "\n  ".join(lines)
            + "\nBuild it with the same arguments on every rank (the same chain from the "
            "same seed, the same method and options).")
    return channel
