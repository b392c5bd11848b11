"""Messages of several tensors through the in-process loopback channel (the reference's
transport): byte-exact for mixed dtypes and zero-element tensors, counted in messages, and
checked tensor by tensor (HeaderMismatch names the index); bad message lengths refused."""

from __future__ import annotations

import pytest
import torch

from dpsgs.comm.errors import HeaderMismatch
from dpsgs.comm.loopback import LoopbackGroup
from dpsgs.comm.message import spec_of
from dpsgs.comm.protocol import MAX_MESSAGE_TENSORS, Channel

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64,
          torch.uint8, torch.int8, torch.bool]


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bytes reinterpreted as dtype (NaN and denormal payloads included)."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * size,), generator=g, dtype=torch.uint8)
    if dtype == torch.bool:
        raw &= 1                    # only 0 and 1 are bools
    return raw.view(dtype).reshape(shape)


def _message(i: int) -> tuple[torch.Tensor, ...]:
    """The i-th message: 1..5 tensors of rotating dtypes, some with no elements."""
    shapes = [(3, 5), (0,), (7,), (2, 0, 4), (), (1, 1, 9)]
    n = 1 + i % 5
    return tuple(_tensor(DTYPES[(i + j) % len(DTYPES)], shapes[(i + 2 * j) % len(shapes)], 100 * i + j)
                 for j in range(n))


def _pair(timeout: float = 5.0) -> tuple[Channel, Channel]:
    group = LoopbackGroup(2, 1, timeout=timeout)
    return (group.transport(0).channel(1, 11, True, "act s0->s1"),
            group.transport(1).channel(0, 11, False, "act s0->s1"))


def test_messages_of_mixed_dtypes_arrive_byte_exact_in_order() -> None:
    tx, rx = _pair()
    sent = [_message(i) for i in range(40)]
    for m in sent:
        tx.send(m)
        assert tx.in_flight <= 2
    for m in sent[:3]:
        for t in m:
            t.zero_() if t.dtype != torch.bool else t.logical_not_()   # the queue holds copies
    for i in range(40):
        want = _message(i)
        got = rx.recv([spec_of(t) for t in want]) if i % 2 else \
            rx.recv_into([torch.empty(t.shape, dtype=t.dtype) for t in want])
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want):
            assert (g.dtype, g.shape, _raw(g)) == (w.dtype, w.shape, _raw(w))
    assert (tx.sent, rx.received, tx.in_flight) == (40, 40, 0)      # messages, not tensors


def test_recv_into_fills_the_given_tensors() -> None:
    tx, rx = _pair()
    tx.send((torch.arange(4.0), torch.tensor([7], dtype=torch.int64)))
    out = (torch.empty(4), torch.empty(1, dtype=torch.int64))
    got = rx.recv_into(out)
    assert got[0] is out[0] and got[1] is out[1]
    assert torch.equal(out[0], torch.arange(4.0)) and out[1].item() == 7


def test_wrong_count_names_both_lists() -> None:
    tx, rx = _pair()
    tx.send((torch.zeros(2, 3), torch.zeros(4, dtype=torch.int64)))
    with pytest.raises(HeaderMismatch, match=r"^channel 'act s0->s1' message #0 on rank 1 from rank 0: "
                       r"expected 1 tensor\(s\) \[float32 \(2, 3\)\] but received 2 "
                       r"\[float32 \(2, 3\), int64 \(4,\)\]$"):
        rx.recv([(torch.float32, (2, 3))])
    assert rx.received == 1          # the message was taken off the channel


def test_wrong_dtype_of_tensor_i_names_the_index() -> None:
    tx, rx = _pair()
    tx.send((torch.zeros(2, 3), torch.zeros(0), torch.zeros(5, dtype=torch.float64)))
    with pytest.raises(HeaderMismatch, match=r"message #0 on rank 1 from rank 0: tensor 2 of 3: "
                       r"expected dtype float32 shape \(5,\) but received dtype float64 shape \(5,\)$"):
        rx.recv([(torch.float32, (2, 3)), (torch.float32, (0,)), (torch.float32, (5,))])


def test_wrong_shape_of_tensor_i_names_the_index_and_both_shapes() -> None:
    tx, rx = _pair()
    tx.send((torch.zeros(2, 3), torch.zeros(4, 1)))
    with pytest.raises(HeaderMismatch, match=r"tensor 1 of 2: expected dtype float32 shape \(1, 4\) "
                       r"but received dtype float32 shape \(4, 1\)$"):
        rx.recv_into([torch.empty(2, 3), torch.empty(1, 4)])


def test_message_lengths_outside_1_to_max_are_refused() -> None:
    tx, rx = _pair()
    too_many = tuple(torch.zeros(1) for _ in range(MAX_MESSAGE_TENSORS + 1))
    with pytest.raises(ValueError, match=rf"channel 'act s0->s1' send #0: a message holds 1 to "
                       rf"{MAX_MESSAGE_TENSORS} tensors; got {MAX_MESSAGE_TENSORS + 1}$"):
        tx.send(too_many)
    with pytest.raises(ValueError, match=r"holds 1 to 16 tensors; got 0$"):
        tx.send(())
    with pytest.raises(ValueError, match=r"a message is a tuple or list of tensors, got Tensor"):
        tx.send(torch.zeros(1))                                        # no single-tensor form
    with pytest.raises(ValueError, match=r"recv #0: a message holds 1 to 16 tensors; expected 17$"):
        rx.recv([(torch.float32, (1,))] * (MAX_MESSAGE_TENSORS + 1))
    with pytest.raises(ValueError, match=r"expected a sequence of \(dtype, shape\) pairs"):
        rx.recv((torch.float32, (1,)))
    assert tx.sent == 0
    tx.send(tuple(torch.full((1,), float(i)) for i in range(MAX_MESSAGE_TENSORS)))   # the maximum
    got = rx.recv([(torch.float32, (1,))] * MAX_MESSAGE_TENSORS)
    assert [t.item() for t in got] == list(range(MAX_MESSAGE_TENSORS))
