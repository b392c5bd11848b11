"""Pure checks of dpsgs.comm.nccl.describe (no GPU needed): CUDA-array-interface parsing,
contiguity, dtype codes, streams, and clear errors for host arrays."""

from __future__ import annotations

import pytest

from dpsgs.comm import nccl
from dpsgs.comm.dtypes import WIRE_CODES


class FakeCudaArray:
    """Only the __cuda_array_interface__ (v3) of a CuPy-like array; nothing is dereferenced."""

    def __init__(self, shape, typestr="<f4", strides=None, stream=None, ptr=0x7F0000000000):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (ptr, False),
                                         "strides": strides, "version": 3, "stream": stream}


@pytest.mark.parametrize("typestr, code, itemsize", [("<f2", 0, 2), ("<f4", 2, 4), ("<f8", 3, 8),
                                                     ("<i4", 4, 4), ("<i8", 5, 8), ("|u1", 6, 1),
                                                     ("|i1", 7, 1), ("|b1", 8, 1)])
def test_cai_descriptor(typestr, code, itemsize):
    ptr, nbytes, dtype, shape, device, stream = nccl.describe(FakeCudaArray((3, 5), typestr, stream=1))
    assert (ptr, nbytes, dtype, shape, device, stream) == (0x7F0000000000, 15 * itemsize, code, (3, 5), -1, 1)


def test_cai_contiguous_strides_accepted_and_zero_size():
    assert nccl.describe(FakeCudaArray((2, 3), strides=(12, 4)))[1] == 24
    assert nccl.describe(FakeCudaArray((0, 3), strides=(4, 8)))[1] == 0
    assert nccl.describe(FakeCudaArray((4, 1), strides=(4, 999)))[1] == 16   # size-1 dims: any stride


def test_cai_rejects_non_contiguous_and_unknown_types():
    with pytest.raises(ValueError, match="non-contiguous"):
        nccl.describe(FakeCudaArray((2, 3), strides=(4, 8)))
    with pytest.raises(ValueError, match="unsupported CUDA array type"):
        nccl.describe(FakeCudaArray((2,), typestr="<c8"))


def test_explicit_stream_wins():
    assert nccl.describe(FakeCudaArray((2,), stream=2), stream=0xABC)[5] == 0xABC
    assert nccl.describe(FakeCudaArray((2,)))[5] == 0   # no stream key: legacy default stream


def test_host_arrays_are_refused_with_a_pointer_to_the_mpi_path():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="expected a CUDA tensor"):
        nccl.describe(torch.zeros(3))
    np = pytest.importorskip("numpy")
    with pytest.raises(ValueError, match="expected a torch CUDA tensor or a CUDA array"):
        nccl.describe(np.zeros(3))


def test_dtype_codes_match_the_contract():
    # docs/api.md: float16=0 bfloat16=1 float32=2 float64=3 int32=4 int64=5 uint8=6 int8=7 bool=8
    assert list(WIRE_CODES.values()) == list(range(9))


# On a device (conftest.py: "cuda" marked gpu, so `-m gpu` runs it on a GPU machine; "sim"
# on the simulator in CI): the descriptor of a real tensor of the rank's accelerator.
def test_tensor_descriptor_names_its_memory_dtype_device_and_current_stream(device):
    torch = pytest.importorskip("torch")
    from dpsgs.comm.accelerator import accelerator

    accel = accelerator(device, 0)
    accel.make_current()
    x = accel.empty((3, 5), torch.bfloat16)
    ptr, nbytes, code, shape, dev, stream = accel.describe(x)
    assert (ptr, nbytes, code, shape, dev) == (x.data_ptr(), 30, WIRE_CODES["bfloat16"], (3, 5), 0)
    assert stream == accel.current_stream()
    side = accel.new_stream()
    with accel.use_stream(side):
        assert accel.describe(x)[5] == side != stream
    assert accel.describe(x)[5] == stream
    with pytest.raises(ValueError, match="non-contiguous"):
        accel.describe(accel.empty((4, 4), torch.float32).t())
    with pytest.raises(ValueError, match="unsupported dtype"):
        accel.describe(accel.empty((2,), torch.complex64))
