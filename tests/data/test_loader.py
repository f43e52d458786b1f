"""The Prefetcher: the batches of a plain loop, in order, errors where they belong, no thread left."""

import threading
import time

import numpy as np
import pytest
import torch

from flowbench.data import ArraySplit, Prefetcher


def split(n=50) -> ArraySplit:
    return ArraySplit(np.random.default_rng(0).integers(0, 256, (n, 3, 4, 4), dtype=np.uint8))


def index_batches(n=50, sizes=(7, 1, 16, 5, 9, 3, 12)):
    rng = np.random.default_rng(1)
    return [rng.integers(0, n, size) for size in sizes]


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "flowbench-prefetch"]


def test_batches_are_those_of_a_plain_loop_in_order():
    data, batches = split(), index_batches()
    with Prefetcher(data, batches, depth=2) as prefetched:
        got = list(prefetched)
    assert len(got) == len(batches)
    for pixels, indices in zip(got, batches, strict=True):
        assert pixels.dtype == torch.uint8 and pixels.device.type == "cpu"
        torch.testing.assert_close(pixels, data.batch(indices), rtol=0, atol=0)
        np.testing.assert_array_equal(pixels.numpy(), data.array[indices])
    assert not prefetch_threads()  # running out joins the thread


def test_it_reads_at_most_a_few_batches_ahead():
    drawn = []

    def counted():
        for i in range(100):
            drawn.append(i)
            yield np.array([i % 50])

    with Prefetcher(split(), counted(), depth=2) as prefetched:
        next(prefetched)
        time.sleep(0.3)  # ample time for the thread to run as far ahead as it may
        assert len(drawn) <= 1 + 2 + 1  # the one taken, a full queue of 2, one being put


def test_a_bad_index_is_raised_in_the_consumer_after_the_batches_before_it():
    data = split(50)
    batches = [np.arange(3), np.arange(4), np.array([1, 50]), np.arange(2)]
    prefetched = Prefetcher(data, batches)
    assert [len(next(prefetched)) for _ in range(2)] == [3, 4]
    with pytest.raises(IndexError):
        next(prefetched)
    assert not prefetch_threads()
    with pytest.raises(StopIteration):  # closed: nothing more comes
        next(prefetched)


def test_an_error_of_the_index_iterable_itself_reaches_the_consumer():
    def failing():
        yield np.arange(2)
        raise RuntimeError("epoch plan broke")

    with Prefetcher(split(), failing()) as prefetched:
        assert len(next(prefetched)) == 2
        with pytest.raises(RuntimeError, match="epoch plan broke"):
            next(prefetched)
    assert not prefetch_threads()


def test_close_mid_stream_joins_the_thread():
    endless = (np.array([i % 50]) for i in range(10**9))
    prefetched = Prefetcher(split(), endless, depth=3)
    next(prefetched)
    time.sleep(0.1)  # let the queue fill: the thread now waits for room
    prefetched.close()
    assert not prefetch_threads()
    prefetched.close()  # twice is harmless
    with Prefetcher(split(), (np.array([i % 50]) for i in range(10**9))) as early:
        next(early)
    assert not prefetch_threads()  # leaving the with-block mid-stream closes too


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batches_arrive_copied_from_pinned_memory():
    data, batches = split(), index_batches()
    with Prefetcher(data, batches, "cuda") as prefetched:
        got = [pixels * 1 for pixels in prefetched]  # consumer work on the current stream
    for pixels, indices in zip(got, batches, strict=True):
        assert pixels.is_cuda
        torch.testing.assert_close(pixels.cpu(), data.batch(indices), rtol=0, atol=0)
