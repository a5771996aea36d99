"""bench/triton_ptx.py: the grouped kernels compiled for sm_90a without a GPU (Triton's
compiler and ptxas). The deferred pass's scatter at the 1.3B layer shape reports shared
memory, 16-byte loads, tensor-core instructions, its registers and its machine code
without subroutine calls (a runtime division by hk would add 12), and fewer of them, in
the whole kernel and in its main loop, than with 64-bit gather offsets; a tile whose
accumulator does not fit the registers (256 x 256 at 16 warps) reports ptxas's refusal
instead of raising; an unknown setting is a clear error."""
import sys

import pytest

from conftest import ROOT

pytest.importorskip("triton", reason="the grouped PEER kernels need Triton")
sys.path.insert(0, ROOT)
from bench import triton_ptx  # noqa: E402
from bench.grouped_tune import SHAPES  # noqa: E402


def test_reports_the_merged_scatter_and_a_tile_ptxas_refuses():
    row = triton_ptx.report("scatter_merged", SHAPES["wider_mb2"], {})
    assert "error" not in row, row
    assert row["smem"] > 0 and 0 < row["registers"] <= 255 and row["spill_bytes"] == 0, row
    assert any(k.endswith(("0x10", "v4.b32")) for k in row["loads"]), row["loads"]
    assert row["mma"], row
    # hk is a compile-time constant: no 64-bit division subroutine per row (12 calls before)
    assert row["sass"]["calls"] == 0 and row["sass"]["instructions"] > 0, row["sass"]
    # 32-bit gather offsets (I32, the default where they fit): fewer instructions, in the
    # main loop too (264 against 314 at Triton 3.9)
    wide = triton_ptx.report("scatter_merged", SHAPES["wider_mb2"], {"I32": 0})
    assert wide["sass"]["instructions"] > row["sass"]["instructions"], (wide, row)
    assert wide["sass"]["loop"] > row["sass"]["loop"] > 0, (wide["sass"], row["sass"])
    big = triton_ptx.report("scatter_merged", SHAPES["wider_mb2"],
                            {"BN": 256, "num_warps": 16})
    assert "registers" in big.get("error", ""), big
    with pytest.raises(ValueError, match="not settings of scatter_merged"):
        triton_ptx.report("scatter_merged", SHAPES["wider_mb2"], {"XX": 1})


def test_longest_loop_counts_from_a_label_to_the_branch_back():
    listing = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
.L_x_2:
        /*0020*/                   ISETP.GE.AND P0, PT, R2, 0x8, PT ;
        /*0030*/              @!P0 BRA `(.L_x_2) ;
        /*0040*/                   BRA `(.L_x_1) ;
        /*0050*/                   BRA `(.L_x_3) ;
.L_x_3:
        /*0060*/                   EXIT ;
"""
    # the outer loop (0x10-0x40, 4 instructions) is the longest; a forward branch is no loop
    assert triton_ptx.longest_loop(listing) == 4
    assert triton_ptx.longest_loop(listing.replace("BRA `(.L_x_1)", "NOP")) == 2
    assert triton_ptx.longest_loop("") == 0
