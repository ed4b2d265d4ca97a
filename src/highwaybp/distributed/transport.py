"""Point-to-point transport on torch.distributed for multi-process runtimes (DDG, and the
layer-parallel `HighwayPipeline`; `label` names the runtime in messages): a shape header
negotiated once per link, sends and receives that wait at most `timeout` seconds, a
watchdog thread that ends a rank that made no progress, and errors that name the rank, the
peer and the step (`TransportError`).

Every message travels with a small tag header sent just before it on the same tag:
(channel, sequence number on this link and tag, step, iteration, kind, element count,
dtype), the channel naming the runtime (`highwaybp.distributed.handshake`). The
receiver checks it against what it is about to receive, so two ranks whose message streams
drift apart (one sends a scan carry more per step, or is a step behind) fail at the first
message that does not fit, with a `MessageMismatchError` naming both sides' step,
iteration and kind, instead of taking a tensor of another step or iteration as this
one's."""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.distributed as dist

_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.complex64,
    torch.complex128,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]  # codes in headers: append only
_HEADER_LEN = 10  # ndim, dtype code, up to 8 dims
_TAG_HEADER, _TAG_ACT, _TAG_ERR = 1, 2, 3
# What a message is (the `what` of a send or receive; its index is the header's kind).
MESSAGE_KINDS = ("an activation", "an error", "a scan carry", "a VJP", "an exact gradient")


class TransportError(RuntimeError):
    """A rank of a multi-process runtime (DDG, the layer-parallel pipeline) failed, timed
    out, or lost a peer."""


class MessageMismatchError(TransportError):
    """A received message's tag header is not the one this rank expected: the ranks'
    message streams have drifted apart."""


# ----------------------------------------------------------------------------- watchdog


class Watchdog:
    """Ends the process (exit code 3) when `beat()` was not called for `limit` seconds.

    The receives already time out; this covers any other hang (a blocked send, teardown
    of a process group whose peer died) so that no rank can outlive a failure for long.
    """

    def __init__(
        self, limit: float, rank: int, on_fire: Optional[Callable[[str], None]] = None,
        label: str = "DDG",
    ) -> None:
        self.limit = limit
        self.label = label
        self.rank = rank
        self.on_fire = on_fire
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def beat(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            idle = time.monotonic() - self._last
            if idle > self.limit:
                msg = (
                    f"{self.label} rank {self.rank}: watchdog: no progress for {idle:.1f}s (limit "
                    f"{self.limit:.0f}s); a peer failed or hangs, so every rank stops"
                )
                sys.stderr.write(f"[{self.label.lower()} rank {self.rank}] {msg}\n")
                sys.stderr.flush()
                if self.on_fire is not None:
                    try:
                        self.on_fire(msg)
                    finally:
                        os._exit(3)
                os._exit(3)


# ----------------------------------------------------------------------------- comm


class Link:
    """Point-to-point messages of one rank with bounded waits and clear errors.

    `send_to`/`recv_from` (and the activation and error helpers) send each tensor after a
    tag header (see the module doc); `iteration` is the sender's and receiver's iteration
    of the step (None where the step has none, e.g. the forward)."""

    def __init__(self, rank: int, world: int, timeout: float, device: torch.device,
                 label: str = "DDG", channel: int = 0) -> None:
        self.rank, self.world = rank, world
        self.channel = channel  # which runtime of this process group (the handshake's)
        self.label = label  # names the runtime in error messages
        self.timeout = datetime.timedelta(seconds=timeout)
        self.device = device
        self.sends: list[Any] = []
        self.in_shape: Optional[tuple[torch.Size, torch.dtype]] = None
        self.header_sent = False
        self.out_shape: Optional[tuple[torch.Size, torch.dtype]] = None
        # Messages sent to / received from each (peer, tag) so far: the headers' seq.
        self._sent: dict[tuple[int, int], int] = {}
        self._received: dict[tuple[int, int], int] = {}

    def _fail(self, what: str, peer: int, step: int, err: BaseException) -> TransportError:
        return TransportError(
            f"{self.label} rank {self.rank}/{self.world}: {what} rank {peer} failed at step {step} "
            f"(timeout {self.timeout.total_seconds():.0f}s): {type(err).__name__}: {err}. "
            "A peer died, raised or is stuck; every rank stops."
        )

    def _post_recv(self, buf: torch.Tensor, src: int, tag: int, what: str, step: int):
        try:
            work = dist.irecv(buf, src=src, tag=tag)
            if not work.wait(self.timeout):
                raise TimeoutError("receive did not complete")
        except Exception as err:
            raise self._fail(f"receiving {what} from", src, step, err) from err
        return buf

    def _post_send(self, tensor: torch.Tensor, dst: int, tag: int, what: str,
                   step: int) -> None:
        try:
            self.sends.append((dist.isend(tensor.contiguous(), dst=dst, tag=tag), dst, what))
        except Exception as err:
            raise self._fail(f"sending {what} to", dst, step, err) from err

    def _tag_header(self, seq: int, step: int, iteration: Optional[int], what: str,
                    tensor: torch.Tensor) -> list[int]:
        if what not in MESSAGE_KINDS:
            raise ValueError(f"unknown message kind {what!r}; one of {MESSAGE_KINDS}")
        if tensor.dtype not in _DTYPES:
            raise TransportError(
                f"{self.label} sends tensors with dtype in {_DTYPES}; got {tensor.dtype}")
        return [self.channel, seq, step, -1 if iteration is None else iteration,
                MESSAGE_KINDS.index(what), tensor.numel(), _DTYPES.index(tensor.dtype)]

    def _send(self, tensor: torch.Tensor, dst: int, tag: int, what: str, step: int,
              iteration: Optional[int] = None) -> None:
        seq = self._sent.get((dst, tag), 0)
        header = self._tag_header(seq, step, iteration, what, tensor)
        self._post_send(torch.tensor(header, dtype=torch.int64, device=self.device), dst, tag,
                        what, step)
        self._post_send(tensor, dst, tag, what, step)
        self._sent[(dst, tag)] = seq + 1

    def _recv(self, buf: torch.Tensor, src: int, tag: int, what: str, step: int,
              iteration: Optional[int] = None) -> torch.Tensor:
        seq = self._received.get((src, tag), 0)
        expected = self._tag_header(seq, step, iteration, what, buf)
        got = torch.empty(len(expected), dtype=torch.int64, device=self.device)
        got = self._post_recv(got, src, tag, what, step).cpu().tolist()
        if got != expected:
            raise MessageMismatchError(
                f"{self.label} rank {self.rank}/{self.world}: expected {_describe(expected)} "
                f"from rank {src}, but rank {src} sent {_describe(got)}. The ranks' message "
                "streams have drifted apart (ranks configured differently, or one that "
                "skipped or repeated a step or a call); every rank stops rather than use a "
                "tensor meant for another step, iteration or purpose."
            )
        self._received[(src, tag)] = seq + 1
        return self._post_recv(buf, src, tag, what, step)

    def send_to(self, tensor: torch.Tensor, dst: int, tag: int, what: str, step: int,
                iteration: Optional[int] = None) -> None:
        """Post a send of `tensor` to rank `dst` (completed by `flush`); `what` is one of
        `MESSAGE_KINDS`."""
        self._send(tensor, dst, tag, what, step, iteration)

    def recv_from(self, buf: torch.Tensor, src: int, tag: int, what: str,
                  step: int, iteration: Optional[int] = None) -> torch.Tensor:
        """Receive into `buf` from rank `src`, waiting at most `timeout`; raises
        `MessageMismatchError` if the message is not `what` of this step and iteration
        (or not the next one on this link, or not of buf's size and dtype)."""
        return self._recv(buf, src, tag, what, step, iteration)

    def flush(self, step: int) -> None:
        """Wait for this step's sends (bounded), so buffers can be freed."""
        for work, dst, what in self.sends:
            try:
                if not work.wait(self.timeout):
                    raise TimeoutError("send did not complete")
            except Exception as err:
                raise self._fail(f"sending {what} to", dst, step, err) from err
        self.sends = []

    def send_activation(self, y: torch.Tensor, step: int) -> None:
        if not self.header_sent:  # once per run (also after a resume)
            if y.dim() > _HEADER_LEN - 2 or y.dtype not in _DTYPES:
                raise TransportError(
                    f"{self.label} sends tensors of <= {_HEADER_LEN - 2} dims with dtype in "
                    f"{_DTYPES}; module {self.rank} returned {tuple(y.shape)} {y.dtype}"
                )
            header = torch.zeros(_HEADER_LEN, dtype=torch.int64, device=self.device)
            header[0], header[1] = y.dim(), _DTYPES.index(y.dtype)
            header[2 : 2 + y.dim()] = torch.tensor(y.shape, dtype=torch.int64)
            self._post_send(header, self.rank + 1, _TAG_HEADER, "the shape header", step)
            self.header_sent = True
            self.out_shape = (y.shape, y.dtype)
        elif (y.shape, y.dtype) != self.out_shape:
            raise TransportError(
                f"{self.label} rank {self.rank}: the activation of step {step} is "
                f"{tuple(y.shape)} {y.dtype}, but {tuple(self.out_shape[0])} "
                f"{self.out_shape[1]} was negotiated at the start; batches must keep one "
                "shape (drop the last partial batch)"
            )
        self._send(y.detach(), self.rank + 1, _TAG_ACT, "an activation", step)

    def recv_activation(self, step: int) -> torch.Tensor:
        if self.in_shape is None:  # shape negotiation, once
            header = torch.zeros(_HEADER_LEN, dtype=torch.int64, device=self.device)
            self._post_recv(header, self.rank - 1, _TAG_HEADER, "the shape header", step)
            header = header.cpu().tolist()
            ndim = int(header[0])
            self.in_shape = (torch.Size(header[2 : 2 + ndim]), _DTYPES[int(header[1])])
        shape, dtype = self.in_shape
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        return self._recv(buf, self.rank - 1, _TAG_ACT, "an activation", step)

    def send_error(self, g: torch.Tensor, step: int) -> None:
        self._send(g.detach(), self.rank - 1, _TAG_ERR, "an error", step)

    def recv_error(self, like: torch.Tensor, step: int) -> torch.Tensor:
        buf = torch.empty_like(like)
        return self._recv(buf, self.rank + 1, _TAG_ERR, "an error", step)


def _describe(header: list[int]) -> str:
    """A tag header in words: "a scan carry of step 2, iteration 1 (runtime 0, message 5
    on this link and tag, 12 float64 elements)"."""
    channel, seq, step, iteration, kind, numel, dtype = header
    what = MESSAGE_KINDS[kind] if 0 <= kind < len(MESSAGE_KINDS) else f"message kind {kind}"
    name = str(_DTYPES[dtype]).removeprefix("torch.") if 0 <= dtype < len(_DTYPES) else dtype
    at = "" if iteration < 0 else f", iteration {iteration}"
    return (f"{what} of step {step}{at} (runtime {channel}, message {seq} on this link and "
            f"tag, {numel} {name} elements)")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for the spawn launcher's rendezvous)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
