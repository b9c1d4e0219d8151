"""The timing table's memory per stage (issue 15: each rank's memory when a stage starts and its
peak inside it). The CUDA numbers come from the allocator; here the table and the per-rank report
are checked on recorded values, and the CPU run records none."""

import torch

from ltx2_tp.cli import _memory_report
from ltx2_tp.pipelines.stages import StageTimer

GIB = 2**30


def test_table_has_memory_columns_when_recorded():
    t = StageTimer(memory=True)
    t.times = {"stage1_denoise": 2.0, "decode_and_write": 1.0}
    t.mem = {"stage1_denoise": (10 * GIB, 20 * GIB), "decode_and_write": (11 * GIB, 15 * GIB)}
    table = t.table()
    assert "GiB start" in table and "GiB peak" in table
    assert "10.00" in table and "20.00" in table and "15.00" in table
    assert t.peak == 20 * GIB
    assert "GiB" not in StageTimer().table()  # no memory recorded: the old table


def test_cpu_records_no_memory_and_the_report_says_prediction_only():
    t = StageTimer(memory=True)
    with t("stage1_denoise"):
        torch.ones(4)
    assert "stage1_denoise" in t.times and t.mem == {}
    assert _memory_report(None, torch.device("cpu"), t) == ""
