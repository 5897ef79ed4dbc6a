"""The greedy argmax kernels (runner/argmax.py) against torch.argmax: first index of the max, rows
spread over several programs. On CPU the kernels run in Triton's interpreter."""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the kernels cannot run")

from loopserve.runner.argmax import CHUNK, argmax_rows_triton, greedy_argmax  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_matches_torch_on_rows_over_several_programs():
    gen = torch.Generator().manual_seed(0)
    vocab = 2 * CHUNK + 123  # three programs a row, the last one mostly padding
    x = torch.randn(6, vocab, generator=gen)
    x[1, CHUNK + 7] = x[1, 2 * CHUNK + 100] = 50.0       # a tie across programs: the first wins
    x[2, 10] = x[2, 11] = 50.0                            # a tie inside one program
    x[3] = float("-inf")                                  # nothing but -inf: index 0, as torch
    x[4, -1] = 60.0                                       # the max in the last, padded program
    x[5, :] = -3.0                                        # all equal
    got = argmax_rows_triton(x.to(DEVICE))
    assert got.dtype == torch.long
    assert got.cpu().tolist() == x.argmax(dim=-1).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_small_vocab_and_other_dtypes(dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 700, generator=gen).to(dtype)      # one program, most of it padding
    assert argmax_rows_triton(x.to(DEVICE)).cpu().tolist() == x.float().argmax(dim=-1).tolist()
    assert argmax_rows_triton(x[:0].to(DEVICE)).shape == (0,)


def test_nan_counts_as_the_largest_value():
    x = torch.zeros(2, 300)
    x[0, 5], x[0, 200] = 9.0, float("nan")
    x[1, 7] = float("nan")
    assert argmax_rows_triton(x.to(DEVICE)).cpu().tolist() == [200, 7] == x.argmax(dim=-1).tolist()


def test_dispatch():
    """The kernels on a CUDA tensor, torch.argmax elsewhere (the CPU path needs no interpreter)."""
    x = torch.randn(4, 1000)
    assert greedy_argmax(x.to(DEVICE)).cpu().tolist() == x.argmax(dim=-1).tolist()
