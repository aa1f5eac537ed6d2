"""Tests for agentrl.routing (Contract 1: routing rows)."""

from __future__ import annotations

import base64
import struct

import numpy as np
import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from agentrl.routing import (
    RoutingLayout,
    RoutingRows,
    RoutingRowsError,
    align_packed,
    align_padded,
    concat_increments,
    decode_wire,
    encode_wire,
    moe_to_wire,
    padding_rows,
    row_version_report,
    validate_rows,
    wire_to_moe,
)

LAYOUT = RoutingLayout(num_hidden_layers=6, moe_layers=(1, 3, 4), num_experts=16, top_k=4)


def random_rows(rng: np.random.Generator, n: int, layout: RoutingLayout) -> np.ndarray:
    """[n, L_moe, k] valid rows: each (row, layer) is k distinct experts in random order."""
    keys = rng.random((n, layout.num_moe_layers, layout.num_experts))
    return np.argsort(keys, axis=2)[:, :, : layout.top_k].astype(layout.dtype)


# ----------------------------------------------------------------------------- wire encoding


def test_wire_round_trip_and_bytes_match_struct() -> None:
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 300, size=(7, 5, 3)).astype(np.int64)
    data = encode_wire(rows)
    flat = [int(x) for x in rows.reshape(-1)]
    expected = base64.b64encode(struct.pack("<" + "i" * len(flat), *flat)).decode("ascii")
    assert data == expected
    back = decode_wire(data, 5, 3)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, rows)


@pytest.mark.parametrize(("name", "fmt"), [("int16", "h"), ("uint8", "B"), ("int32", "i"), ("torch.int16", "h")])
def test_decode_honours_routed_experts_dtype(name: str, fmt: str) -> None:
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 128, size=(4, 3, 2))
    flat = [int(x) for x in rows.reshape(-1)]
    data = base64.b64encode(struct.pack("<" + fmt * len(flat), *flat)).decode("ascii")
    back = decode_wire(data, 3, 2, dtype=name)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, rows)


def test_decode_bad_byte_length_raises() -> None:
    data = base64.b64encode(struct.pack("<" + "i" * 7, *range(7))).decode("ascii")
    with pytest.raises(RoutingRowsError, match="multiple"):
        decode_wire(data, 2, 2)
    # 12 bytes: a multiple of 3*2*int16 (12) but not of 3*2*int32 (24)
    data16 = base64.b64encode(struct.pack("<" + "h" * 6, *range(6))).decode("ascii")
    assert decode_wire(data16, 3, 2, "int16").shape == (1, 3, 2)
    with pytest.raises(RoutingRowsError, match="multiple"):
        decode_wire(data16, 3, 2)


def test_decode_rejects_non_integer_dtype_and_bad_base64() -> None:
    with pytest.raises(RoutingRowsError, match="integer"):
        decode_wire(encode_wire(np.zeros((1, 1, 1), dtype=np.int32)), 1, 1, "float32")
    with pytest.raises(RoutingRowsError, match="base64"):
        decode_wire("not base64!!", 1, 1)


def test_empty_wire() -> None:
    assert decode_wire("", 4, 2).shape == (0, 4, 2)
    assert encode_wire(np.zeros((0, 4, 2), dtype=np.int32)) == ""


# ----------------------------------------------------------------------------- layout


def _tiny_qwen3_moe(**kw: object) -> transformers.Qwen3MoeConfig:
    return transformers.Qwen3MoeConfig(
        hidden_size=16,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=32,
        moe_intermediate_size=16,
        vocab_size=32,
        **kw,
    )


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3], num_experts=8, num_experts_per_tok=2),
        dict(num_hidden_layers=5, decoder_sparse_step=1, mlp_only_layers=[0, 2], num_experts=4, num_experts_per_tok=3),
        dict(num_hidden_layers=7, decoder_sparse_step=3, mlp_only_layers=[], num_experts=8, num_experts_per_tok=2),
    ],
)
def test_layout_matches_qwen3_moe_model(kw: dict) -> None:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = _tiny_qwen3_moe(**kw)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    reference = tuple(
        i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, Qwen3MoeSparseMoeBlock)
    )
    layout = RoutingLayout.from_config(cfg)
    assert layout.moe_layers == reference
    assert layout.num_hidden_layers == kw["num_hidden_layers"]
    assert layout.num_experts == kw["num_experts"]
    assert layout.top_k == kw["num_experts_per_tok"]
    assert layout.num_moe_layers == len(reference)
    assert layout.dtype == np.uint8


def test_layout_mixtral_all_moe() -> None:
    cfg = transformers.MixtralConfig(num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=2)
    layout = RoutingLayout.from_config(cfg)
    assert layout.moe_layers == (0, 1, 2, 3)
    assert (layout.num_experts, layout.top_k) == (8, 2)


def test_layout_from_plain_object_and_first_k_dense() -> None:
    class Cfg:
        num_hidden_layers = 5
        num_local_experts = 300
        num_experts_per_tok = 8
        first_k_dense_replace = 2

    layout = RoutingLayout.from_config(Cfg())
    assert layout.moe_layers == (2, 3, 4)
    assert layout.dtype == np.uint16
    assert RoutingLayout(2, (0,), 256, 2).dtype == np.uint8
    assert RoutingLayout(2, (0,), 257, 2).dtype == np.uint16


@pytest.mark.parametrize(
    ("args", "keyword"),
    [
        ((4, (), 8, 2), "no MoE"),
        ((4, (2, 1), 8, 2), "ascending"),
        ((4, (1, 4), 8, 2), r"\[0, 4\)"),
        ((4, (1,), 8, 9), "top_k"),
        ((4, (1,), 70000, 2), "num_experts"),
    ],
)
def test_layout_rejects_bad_values(args: tuple, keyword: str) -> None:
    with pytest.raises(RoutingRowsError, match=keyword):
        RoutingLayout(*args)


# ----------------------------------------------------------------------------- wire <-> moe


def test_wire_moe_round_trip_dense_layers_zero() -> None:
    rng = np.random.default_rng(2)
    rows = random_rows(rng, 9, LAYOUT)
    wire = moe_to_wire(rows, LAYOUT)
    assert wire.dtype == np.int32 and wire.shape == (9, 6, 4)
    dense = [i for i in range(6) if i not in LAYOUT.moe_layers]
    assert (wire[:, dense] == 0).all()
    for j, g in enumerate(LAYOUT.moe_layers):
        np.testing.assert_array_equal(wire[:, g], rows[:, j])
    back = wire_to_moe(wire, LAYOUT)
    assert back.dtype == LAYOUT.dtype
    np.testing.assert_array_equal(back, rows)


def test_wire_to_moe_validates() -> None:
    wire = moe_to_wire(padding_rows(3, LAYOUT), LAYOUT)
    wire[1, 3, 2] = 16
    with pytest.raises(RoutingRowsError, match="out of range"):
        wire_to_moe(wire, LAYOUT)
    with pytest.raises(RoutingRowsError, match="layers"):
        wire_to_moe(np.zeros((3, 5, 4), dtype=np.int32), LAYOUT)


# ----------------------------------------------------------------------------- validation


def test_validate_rows_accepts_valid() -> None:
    rows = random_rows(np.random.default_rng(3), 100_000, LAYOUT)
    validate_rows(rows, LAYOUT, expected_rows=100_000)
    validate_rows(rows.astype(np.int64), LAYOUT)


@pytest.mark.parametrize(
    ("mutate", "keyword"),
    [
        (lambda r: r, "expected 4 rows"),
        (lambda r: r[:, :2], "expected 3 layers"),
        (lambda r: r[:, :, :3], "top_k=4"),
        (lambda r: r[0], "3 dims"),
        (lambda r: r.astype(np.float32), "integer dtype"),
        (lambda r: _set(r.astype(np.int32), (2, 1, 0), -1), "out of range"),
        (lambda r: _set(r, (2, 1, 0), 16), "out of range"),
        (lambda r: _set(r, (2, 1, 0), r[2, 1, 3]), "duplicate"),
    ],
)
def test_validate_rows_rejects(mutate, keyword: str) -> None:
    rows = random_rows(np.random.default_rng(4), 5, LAYOUT)
    with pytest.raises(RoutingRowsError, match=keyword):
        validate_rows(mutate(rows), LAYOUT, expected_rows=4 if keyword == "expected 4 rows" else None)


def _set(a: np.ndarray, idx: tuple[int, ...], value: int) -> np.ndarray:
    a = a.copy()
    a[idx] = value
    return a


def test_validate_error_names_row_and_ids() -> None:
    rows = random_rows(np.random.default_rng(5), 5, LAYOUT)
    rows[3, 2, 1] = rows[3, 2, 0]
    with pytest.raises(RoutingRowsError, match=r"row 3, moe layer 2 \(global layer 4\)"):
        validate_rows(rows, LAYOUT)


def test_padding_rows_distinct() -> None:
    pad = padding_rows(5, LAYOUT)
    assert pad.shape == (5, 3, 4) and pad.dtype == LAYOUT.dtype
    assert (pad == np.arange(4)).all()
    validate_rows(pad, LAYOUT)


# ----------------------------------------------------------------------------- RoutingRows


def _split(rng: np.random.Generator, rows: np.ndarray, n_parts: int) -> list[RoutingRows]:
    cuts = np.sort(rng.choice(np.arange(1, len(rows)), size=n_parts - 1, replace=False))
    bounds = [0, *cuts.tolist(), len(rows)]
    return [
        RoutingRows(rows[a:b], np.full(b - a, turn, dtype=np.int64), start=a)
        for turn, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))
    ]


def test_concat_increments_stitches() -> None:
    rng = np.random.default_rng(6)
    rows = random_rows(rng, 40, LAYOUT)
    parts = _split(rng, rows, 4)
    full = concat_increments(parts)
    full.validate(LAYOUT, expected_rows=40)
    np.testing.assert_array_equal(full.experts, rows)
    expected_versions = np.concatenate([np.full(len(p), t) for t, p in enumerate(parts)])
    np.testing.assert_array_equal(full.versions, expected_versions)
    assert full.start == 0 and full.end == 40 and len(full) == 40
    pairwise = parts[0]
    for p in parts[1:]:
        pairwise = pairwise.concat(p)
    np.testing.assert_array_equal(pairwise.experts, rows)


def test_concat_gap_and_overlap_raise() -> None:
    rng = np.random.default_rng(7)
    a, b, c = _split(rng, random_rows(rng, 20, LAYOUT), 3)
    with pytest.raises(RoutingRowsError, match=f"gap.*{len(b)} rows missing"):
        concat_increments([a, c])
    shifted = RoutingRows(c.experts, c.versions, start=c.start - 1)
    with pytest.raises(RoutingRowsError, match="overlap.*1 rows overlap"):
        concat_increments([a, b, shifted])
    with pytest.raises(RoutingRowsError, match="gap"):
        a.concat(c)
    with pytest.raises(RoutingRowsError, match="no parts"):
        concat_increments([])


def test_routing_rows_validate_versions() -> None:
    rows = random_rows(np.random.default_rng(8), 3, LAYOUT)
    with pytest.raises(RoutingRowsError, match="versions.*shape"):
        RoutingRows(rows, np.zeros(2, dtype=np.int64)).validate(LAYOUT)
    with pytest.raises(RoutingRowsError, match="int64"):
        RoutingRows(rows, np.zeros(3, dtype=np.float64)).validate(LAYOUT)
    with pytest.raises(RoutingRowsError, match="dtype uint8"):
        RoutingRows(rows.astype(np.int32), np.zeros(3, dtype=np.int64)).validate(LAYOUT)


def test_from_wire_hand_built_meta_info() -> None:
    # 2 rows, 6 layers, k=4; MoE layers 1, 3, 4; dense layers 0.
    moe_part = {
        (0, 1): [3, 1, 4, 15],
        (0, 3): [9, 2, 6, 5],
        (0, 4): [0, 7, 8, 10],
        (1, 1): [11, 12, 13, 14],
        (1, 3): [1, 0, 2, 3],
        (1, 4): [15, 14, 13, 12],
    }
    values = []
    for r in range(2):
        for layer in range(6):
            values += moe_part.get((r, layer), [0, 0, 0, 0])
    meta = {"routed_experts": base64.b64encode(struct.pack("<" + "i" * len(values), *values)).decode()}
    rr = RoutingRows.from_wire(meta, LAYOUT, version=7, start=5)
    rr.validate(LAYOUT, expected_rows=2)
    assert rr.start == 5 and rr.end == 7
    assert rr.experts[0].tolist() == [moe_part[(0, 1)], moe_part[(0, 3)], moe_part[(0, 4)]]
    assert rr.experts[1].tolist() == [moe_part[(1, 1)], moe_part[(1, 3)], moe_part[(1, 4)]]
    assert rr.versions.tolist() == [7, 7]

    meta16 = {
        "routed_experts": base64.b64encode(struct.pack("<" + "h" * len(values), *values)).decode(),
        "routed_experts_dtype": "int16",
    }
    np.testing.assert_array_equal(RoutingRows.from_wire(meta16, LAYOUT, version=7).experts, rr.experts)
    with pytest.raises(RoutingRowsError, match="routed_experts"):
        RoutingRows.from_wire({}, LAYOUT, version=0)


# ----------------------------------------------------------------------------- alignment


def _reference_padded(rows, seq_lens, layout, width, left_pad):
    b_n = len(seq_lens)
    experts = np.zeros((b_n, width, layout.num_moe_layers, layout.top_k), dtype=layout.dtype)
    has = np.zeros((b_n, width), dtype=bool)
    for b in range(b_n):
        for s in range(width):
            experts[b, s] = np.arange(layout.top_k)
            j = s - (width - seq_lens[b]) if left_pad else s
            if 0 <= j < seq_lens[b] and j < len(rows[b]):
                experts[b, s] = rows[b][j]
                has[b, s] = True
    return experts, has


def _batch(rng: np.random.Generator):
    seq_lens = [6, 1, 9, 4]
    n_rows = [5, 0, 6, 3]  # sequence 2 has 2 missing rows
    rows = [random_rows(rng, n, LAYOUT) for n in n_rows]
    return rows, seq_lens, n_rows


@pytest.mark.parametrize("left_pad", [False, True])
@pytest.mark.parametrize("max_len", [None, 12])
def test_align_padded_matches_loop(left_pad: bool, max_len: int | None) -> None:
    rng = np.random.default_rng(9)
    rows, seq_lens, n_rows = _batch(rng)
    inputs = [RoutingRows(r, np.zeros(len(r), dtype=np.int64)) if i % 2 else r for i, r in enumerate(rows)]
    experts, has = align_padded(inputs, seq_lens, LAYOUT, max_len=max_len, left_pad=left_pad)
    width = max_len or max(seq_lens)
    ref_e, ref_h = _reference_padded(rows, seq_lens, LAYOUT, width, left_pad)
    assert experts.dtype == LAYOUT.dtype and experts.shape == (4, width, 3, 4)
    np.testing.assert_array_equal(experts, ref_e)
    np.testing.assert_array_equal(has, ref_h)
    assert has.sum(axis=1).tolist() == n_rows
    for b, n in enumerate(seq_lens):
        last = width - 1 if left_pad else n - 1
        assert not has[b, last]
    validate_rows(experts.reshape(-1, 3, 4), LAYOUT)


def test_align_packed_matches_loop() -> None:
    rng = np.random.default_rng(10)
    rows, seq_lens, n_rows = _batch(rng)
    experts, has = align_packed(rows, seq_lens, LAYOUT)
    total = sum(seq_lens)
    assert experts.shape == (total, 3, 4) and has.shape == (total,)
    ref_e = np.zeros_like(experts)
    ref_h = np.zeros(total, dtype=bool)
    t = 0
    for b, n in enumerate(seq_lens):
        for j in range(n):
            ref_e[t] = rows[b][j] if j < len(rows[b]) else np.arange(4)
            ref_h[t] = j < len(rows[b])
            t += 1
    np.testing.assert_array_equal(experts, ref_e)
    np.testing.assert_array_equal(has, ref_h)
    assert int(has.sum()) == sum(n_rows)
    ends = np.cumsum(seq_lens) - 1
    assert not has[ends].any()
    validate_rows(experts, LAYOUT)


def test_align_too_many_rows_raises() -> None:
    rng = np.random.default_rng(11)
    rows = [random_rows(rng, 4, LAYOUT)]
    with pytest.raises(RoutingRowsError, match="4 rows for 4 tokens"):
        align_padded(rows, [4], LAYOUT)
    with pytest.raises(RoutingRowsError, match="4 rows for 4 tokens"):
        align_packed(rows, [4], LAYOUT)
    with pytest.raises(RoutingRowsError, match="max_len"):
        align_padded([rows[0][:3]], [4], LAYOUT, max_len=3)
    with pytest.raises(RoutingRowsError, match="start"):
        align_padded([RoutingRows(rows[0][:2], np.zeros(2, dtype=np.int64), start=1)], [4], LAYOUT)


# ----------------------------------------------------------------------------- version report


def test_row_version_report_hand_example() -> None:
    # seq 0: 5 tokens -> 4 rows expected, all present, versions 3,3,4,5 -> 3 stale (3,3,4 < 5)
    # seq 1: 3 tokens -> 2 expected, 1 present (version 5) -> 1 missing, 0 stale
    # seq 2: 1 token  -> 0 expected
    versions = [np.array([3, 3, 4, 5]), np.array([5]), np.array([], dtype=np.int64)]
    report = row_version_report(versions, [5, 3, 1], current_version=5)
    assert report == {"rows_expected": 6, "rows_present": 5, "rows_missing": 1, "rows_stale": 3}
    with pytest.raises(RoutingRowsError):
        row_version_report([np.array([1, 1, 1])], [3], current_version=1)


# ----------------------------------------------------------------------------- properties


@st.composite
def layouts_and_rows(draw: st.DrawFn) -> tuple[RoutingLayout, np.ndarray]:
    hidden = draw(st.integers(1, 8))
    moe = draw(st.lists(st.integers(0, hidden - 1), min_size=1, unique=True).map(sorted))
    num_experts = draw(st.sampled_from([1, 2, 8, 64, 256, 257, 512, 65536]))
    top_k = draw(st.integers(1, min(num_experts, 8)))
    layout = RoutingLayout(hidden, tuple(moe), num_experts, top_k)
    n = draw(st.integers(0, 20))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # k distinct ids per (row, layer) without materialising num_experts-sized keys
    rows = np.stack(
        [rng.choice(num_experts, size=top_k, replace=False) for _ in range(n * layout.num_moe_layers)]
    ) if n else np.zeros((0, top_k), dtype=np.int64)
    return layout, rows.reshape(n, layout.num_moe_layers, top_k).astype(layout.dtype)


@settings(max_examples=150, deadline=None)
@given(layouts_and_rows())
def test_property_round_trips(case: tuple[RoutingLayout, np.ndarray]) -> None:
    layout, rows = case
    validate_rows(rows, layout)
    assert rows.dtype == (np.uint8 if layout.num_experts <= 256 else np.uint16)
    wire = moe_to_wire(rows, layout)
    decoded = decode_wire(encode_wire(wire), layout.num_hidden_layers, layout.top_k)
    np.testing.assert_array_equal(decoded, wire)
    back = wire_to_moe(decoded, layout)
    assert back.dtype == layout.dtype
    np.testing.assert_array_equal(back, rows)
    rr = RoutingRows.from_wire({"routed_experts": encode_wire(wire)}, layout, version=1)
    np.testing.assert_array_equal(rr.experts, rows)
