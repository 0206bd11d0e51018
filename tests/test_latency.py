"""The latency table: measured entries, monotone correction, two-point calibration, identity checks, JSON."""
import dataclasses

import pytest
import torch

from efficientllava.latency import LatencyTable, LatencyTableError, Workload, measure_latency_table, monotone
from efficientllava.pruning.toy_calibration import toy_model_and_batches
from efficientllava.toy_model import IMAGE


def synthetic_table(layers: int = 4) -> LatencyTable:
    """Entries linear in width and tokens (attention 1 ms per KV group per 10 tokens, MLP 1 ms per 100 channels per
    10 tokens) on one batch of 8 rows x 40 tokens with 16 image tokens."""
    workload = Workload(((8, 40),), 16, True)
    table = LatencyTable("CPU (1 thread(s))", "abc", "float32", "sdpa", workload, ["sig"] * layers)
    tokens = {40, 36, 32, 28}  # keep 1, 0.75, 0.5, 0.25 of 16 image tokens
    table.attn = {"sig": {f"8:{t}:{g}": 1e-4 * t * g for t in tokens for g in (1, 2)}}
    table.mlp = {"sig": {f"8:{t}:{c}": 1e-6 * t * c for t in tokens for c in range(44, 353, 44)}}
    table.rest = 0.01
    table.dense = table.predict([(2, 352)] * layers)
    return table


def test_prediction_follows_widths_and_tokens_from_layer_k():
    table = synthetic_table()
    dense = table.predict([(2, 352)] * 4)
    assert dense == pytest.approx(0.01 + 4 * (40 * 2e-4 + 40 * 352e-6))
    half_mlp = table.predict([(2, 176)] * 4)
    assert dense - half_mlp == pytest.approx(4 * 40 * 176e-6)
    tokens = table.predict([(2, 352)] * 4, token_layer=2, keep=0.25)  # layers 2, 3 see 28 tokens
    assert dense - tokens == pytest.approx(2 * 12 * (2e-4 + 352e-6))
    with pytest.raises(LatencyTableError, match="no MLP entry for block 0 with 100 channels kept on 8 rows x 40"):
        table.predict([(2, 100)] * 4)
    with pytest.raises(LatencyTableError, match="a plan for 3 blocks; the table was measured for 4"):
        table.predict([(2, 352)] * 3)


def test_calibration_reproduces_both_end_to_end_measurements():
    table = synthetic_table()
    anchor = [(1, 88)] * 4
    table.calibrate(0.05, [(2, 352)] * 4, 0.02, anchor, token_layer=1, keep=0.25)
    assert table.predict([(2, 352)] * 4) == pytest.approx(0.05)
    assert table.predict(anchor, 1, 0.25) == pytest.approx(0.02)
    assert table.scale > 0 and table.rest >= 0


def test_monotone_lowers_noise_spikes_to_the_cheapest_larger_entry():
    raw = {"8:40:1": 5.0, "8:40:2": 2.0, "8:30:1": 1.0, "8:30:2": 3.0}
    fixed = monotone(raw)
    assert fixed == {"8:40:1": 2.0, "8:40:2": 2.0, "8:30:1": 1.0, "8:30:2": 2.0}


def test_identity_checks_name_what_differs_and_json_round_trips(tmp_path):
    table = synthetic_table()
    path = table.save(tmp_path / "t.json")
    loaded = LatencyTable.load(path)
    assert loaded == table
    args = dict(device="CPU (1 thread(s))", model_hash="abc", dtype="float32", attention="sdpa",
                workload=table.workload)
    loaded.check(**args)
    for key, value, match in (("device", "NVIDIA H100 80GB HBM3", "measured with device 'CPU"),
                              ("model_hash", "xyz", "measured with model identity 'abc'; this run has 'xyz'"),
                              ("dtype", "bfloat16", "dtype 'float32'"),
                              ("workload", Workload(((64, 40),), 16, True), "workload")):
        with pytest.raises(LatencyTableError, match=match):
            loaded.check(**{**args, key: value})
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(LatencyTableError, match="is not a latency table"):
        LatencyTable.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LatencyTable.load(tmp_path / "none.json")


def test_measured_table_has_every_entry_a_search_asks_for():
    model, _, batches = toy_model_and_batches(seed=0, n=8, batch_size=4)
    workload = Workload.of_batches(batches[:1], IMAGE)
    paths = [f"model.language_model.layers.{i}" for i in range(4)]
    table = measure_latency_table(model, workload, {p: [1, 2] for p in paths}, {p: [176, 352] for p in paths},
                                  [0.5], dense_seconds=1.0, model_hash="h", repeats=1)
    rows, length = workload.shapes[0]
    short = length - 16 + 8
    assert set(table.mlp[table.layers[0]]) == {f"{rows}:{t}:{c}" for t in (length, short) for c in (176, 352)}
    assert set(table.attn[table.layers[0]]) == {f"{rows}:{t}:{g}" for t in (length, short) for g in (1, 2)}
    assert all(v > 0 for v in table.mlp[table.layers[0]].values())
    assert table.predict([(2, 352)] * 4) == pytest.approx(1.0)  # rest = dense - the dense blocks
    assert table.raw_mlp and table.device.startswith("CPU")


def test_workload_refuses_rows_with_different_image_counts():
    batch = {"input_ids": torch.tensor([[IMAGE, IMAGE, 7], [IMAGE, 7, 7]])}
    with pytest.raises(LatencyTableError, match=r"rows hold \[1, 2\] image tokens"):
        Workload.of_batches([batch], IMAGE)
    assert dataclasses.asdict(Workload.of_batches([{"input_ids": torch.tensor([[IMAGE, 7]])}], IMAGE)) == {
        "shapes": ((1, 2),), "image_tokens": 1, "padded": False}
