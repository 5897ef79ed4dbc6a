"""A decode step's inputs packed in a CUDA graph's layout and laid into its buffers by one kernel
(runner/step_inputs.py). On CPU the kernel runs in Triton's interpreter."""
import pytest
import torch

from loopserve.runner.step_inputs import StepInputs, pack_decode_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SCRATCH, BLOCK = 50, 4


def _inputs() -> StepInputs:
    # Three decoding sequences; the second one's input token is pending in row 4 of the step before.
    return StepInputs(token_ids=[11, -1, 13], positions=[5, 9, 2], slots=[21, 37, 10],
                      tables=[5, 1, 0, 8, 9, 7, 2, 0, 0], max_blocks=3, query_start_loc=[0, 1, 2, 3], seq_lens=[6, 10, 3], decode_idx=[0, 1, 2],
                      prefill_idx=[], logits_rows=[0, 1, 2], fill_dst=[1], fill_src=[4])


def test_packed_layout_pads_rows_onto_the_scratch_block():
    packed = pack_decode_inputs(_inputs(), b=4, scratch_block=SCRATCH, block_size=BLOCK)
    rows, fill, tables = packed[:16].reshape(4, 4), packed[16:20], packed[20:].reshape(4, 3)
    assert rows[:3].tolist() == [[11, 5, 21, 6], [-1, 9, 37, 10], [13, 2, 10, 3]]
    assert rows[3].tolist() == [0, 0, SCRATCH * BLOCK, 1]  # the padding row: one token of the scratch block
    assert fill.tolist() == [-1, 4, -1, -1]
    assert tables.tolist() == [[5, 1, 0], [8, 9, 7], [2, 0, 0], [SCRATCH, 0, 0]]


def test_unpack_writes_the_graph_buffers_and_takes_pending_tokens():
    pytest.importorskip("triton", reason="triton is not installed: the kernel cannot run")
    from loopserve.runner.host_copy import to_device
    from loopserve.runner.step_inputs import unpack_decode_inputs

    b, width = 4, 6
    ids = torch.full((8,), 99, dtype=torch.long, device=DEVICE)
    pos, slots = ids.clone(), ids.clone()
    lens = torch.full((8,), 99, dtype=torch.int32, device=DEVICE)
    tables = torch.full((8, width), 99, dtype=torch.long, device=DEVICE)
    prev = torch.tensor([70, 71, 72, 73, 74], device=DEVICE)
    packed = to_device(pack_decode_inputs(_inputs(), b, SCRATCH, BLOCK), torch.long, DEVICE)
    unpack_decode_inputs(packed, prev, b, 3, ids, pos, slots, lens, tables)
    assert ids[:b].tolist() == [11, 74, 13, 0] and ids[b:].tolist() == [99] * 4
    assert pos[:b].tolist() == [5, 9, 2, 0] and slots[:b].tolist() == [21, 37, 10, SCRATCH * BLOCK]
    assert lens.dtype == torch.int32 and lens[:b].tolist() == [6, 10, 3, 1]
    assert tables[:b, :3].tolist() == [[5, 1, 0], [8, 9, 7], [2, 0, 0], [SCRATCH, 0, 0]]
    assert (tables[:b, 3:] == 99).all() and (tables[b:] == 99).all()  # columns past the width untouched
    # No step before: nothing pending, prev is never read.
    no_fill = _inputs()
    no_fill.token_ids[1], no_fill.fill_dst, no_fill.fill_src = 12, [], []
    unpack_decode_inputs(to_device(pack_decode_inputs(no_fill, b, SCRATCH, BLOCK), torch.long, DEVICE), None, b, 3,
                         ids, pos, slots, lens, tables)
    assert ids[:b].tolist() == [11, 12, 13, 0]


def test_segments_start_16_byte_aligned_and_keep_their_sizes():
    import numpy as np

    from loopserve.runner.cuda_graphs import Segments

    ints = Segments((5, 4, 3, 4), 4)
    assert ints.starts == [0, 8, 12, 16] and ints.length == 20
    image = np.arange(ints.length, dtype=np.int32)
    assert [v.tolist() for v in ints.views(image)] == [[0, 1, 2, 3, 4], [8, 9, 10, 11], [12, 13, 14], [16, 17, 18, 19]]
    longs = Segments((3, 2), 8)
    assert longs.starts == [0, 4] and longs.length == 6
