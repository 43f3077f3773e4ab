"""initlab.lab.report.tensorboard writes its own events files: the CRC-32C of every record (numpy lanes for
long records, a byte loop for short ones) equals TensorBoard's, and TensorBoard's reader, which checks
both CRCs of every record, reads back what was written (and rejects a file whose CRC is wrong)."""
from __future__ import annotations

import random

import numpy as np
import pytest

from initlab.lab.report import tensorboard as tb


def _reference_crc(data: bytes) -> int:
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c

    return crc32c(data)


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 31, 32, 33, 63, 64, 65, 100, 1024, 1025, 4096, 4097, 11_000, 70_001])
def test_crc32c_is_tensorboards(n):
    rng = random.Random(n)
    data = bytes(rng.randrange(256) for _ in range(n))
    assert tb.crc32c(data) == _reference_crc(data)
    if n:  # negative control: one flipped bit changes both
        flipped = bytearray(data)
        flipped[rng.randrange(n)] ^= 1 << rng.randrange(8)
        assert tb.crc32c(bytes(flipped)) != tb.crc32c(data)
        assert tb.crc32c(bytes(flipped)) == _reference_crc(bytes(flipped))


def test_crc32cs_of_a_batch_of_mixed_lengths():
    """Strings of every size class computed together, each as TensorBoard computes it alone."""
    rng = random.Random(1)
    datas = [bytes(rng.randrange(256) for _ in range(rng.choice([2, 8, 30, 40, 70, 560, 3000, 11_000])))
             for _ in range(40)]
    assert tb.crc32cs(datas) == [_reference_crc(d) for d in datas]
    assert tb.crc32cs([]) == []


def _log(tmp_path):
    rng = np.random.default_rng(0)
    values = {"input": rng.random((20, 30)), "mat_mul_1": rng.standard_normal((20, 8)) * 3,
              "fc_out_1": np.maximum(rng.standard_normal((20, 8)), 0)}
    rows = [{"step": s, "split": sp, "metric": m, "value": 0.5 + 0.01 * s}
            for s in (0, 5, 10) for sp in ("train", "test") for m in ("acc", "loss") if not (s == 0 and sp == "train")]
    hist = {"weights/0": {"min": -1.0, "max": 1.0, "num": 10, "sum": 0.5, "sum_squares": 3.0,
                          "bucket_limit": [-0.5, 0.0, 0.5, 1.0], "bucket": [2, 3, 3, 2]}}
    path = tb.write_member_events(tmp_path / "m", values, rows, histograms=[(0, hist), (10, hist)],
                                  hparams={"scenario": "x", "lr": 0.1, "seed": 0})
    return path, values, rows


def test_events_read_back_through_tensorboards_reader(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path, values, rows = _log(tmp_path)
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert set(tags["histograms"]) == {"mat_mul_hist_1", "fc_out_1", "weights/0"}
    assert acc.Scalars("input_var")[0].value == pytest.approx(values["input"].var(), rel=1e-6)
    assert [(e.step, round(e.value, 5)) for e in acc.Scalars("test/acc")] == [(0, 0.5), (5, 0.55), (10, 0.6)]
    h = acc.Histograms("mat_mul_hist_1")[0].histogram_value
    assert h.num == values["mat_mul_1"].size and h.max == pytest.approx(values["mat_mul_1"].max())
    assert [e.step for e in acc.Histograms("weights/0")] == [0, 10]
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2

    (events,) = path.glob("events.out.tfevents.*")
    hp = [v.tag for raw in RawEventFileLoader(str(events)).Load() for v in event_pb2.Event.FromString(raw).summary.value
          if v.metadata.plugin_data.plugin_name == "hparams"]
    assert hp == ["_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"]


def test_a_wrong_crc_is_rejected_by_the_reader(tmp_path):
    """Negative control: the reader does check the CRCs, so the tests that read our files check them too."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader

    path, _, _ = _log(tmp_path)
    (events,) = path.glob("events.out.tfevents.*")
    n = len(list(RawEventFileLoader(str(events)).Load()))
    assert n > 10
    data = bytearray(events.read_bytes())
    data[-1] ^= 0xFF  # the last record's data CRC
    events.write_bytes(bytes(data))
    assert len(list(RawEventFileLoader(str(events)).Load())) == n - 1  # the record fails its check and is dropped


def test_hparams_are_the_same_bytes_in_every_process(tmp_path):
    """The HParams summaries' plugin data (a protobuf map, whose serialised order otherwise follows the
    process's hash seed) is written in key order: a log written by another process (a resumed run, a worker)
    is the same file, wall times aside. Checked against a fresh interpreter with another hash seed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams = {f"k{i}": (i if i % 2 else f"v{i}") for i in range(12)}

    def contents(log_dir: Path) -> list[bytes]:
        (f,) = log_dir.glob("events.out.tfevents*")
        return [v.metadata.plugin_data.content for ev in EventFileLoader(str(f)).Load() for v in ev.summary.value]

    log = tb.MemberLog(tmp_path / "here", hparams)
    log.close()
    code = ("import sys\nfrom initlab.lab.report import tensorboard as tb\n"
            f"tb.MemberLog(sys.argv[1], {hparams!r}).close()\n")
    root = str(Path(tb.__file__).resolve().parents[3])
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": root}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "there")], check=True, env=env, timeout=300)
    here, there = contents(tmp_path / "here"), contents(tmp_path / "there")
    assert len(here) == 3 and here == there
    for c in here:
        assert c == plugin_data_pb2.HParamsPluginData.FromString(c).SerializeToString(deterministic=True)
