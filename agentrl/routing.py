"""Routing rows: the per-token record of which experts a MoE model routed each token to.

Owns (DESIGN.md, "Contract 1: routing rows"):

* the layout of routing rows (``RoutingLayout``): which global layers are MoE, how many experts,
  top-k, and the storage dtype (uint8 when ``num_experts <= 256``, else uint16);
* the wire encoding SGLang uses (``meta_info["routed_experts"]``: base64 of little-endian integers,
  logical shape ``[rows, num_hidden_layers, top_k]``, dense layers filled with 0) and the one explicit
  conversion between wire rows and internal rows ``[rows, num_moe_layers, top_k]``;
* validation (shape, integer dtype, id range, no duplicate expert within a row/layer);
* stitching per-turn increments (``routed_experts_start_len``) and aligning rows to padded or packed
  token batches for replay;
* policy-version tags per row and the per-batch present / missing / stale report.

Does not own: computing routing (the model's router does that) or serving it (the inference engine).

A sequence of N tokens has N-1 routing rows: row i belongs to token i, and the last sampled token is
never fed through the model, so it has none.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "RoutingLayout",
    "RoutingRows",
    "RoutingRowsError",
    "align_packed",
    "align_padded",
    "concat_increments",
    "decode_wire",
    "encode_wire",
    "moe_to_wire",
    "padding_rows",
    "row_version_report",
    "validate_rows",
    "wire_to_moe",
]

_WIRE_DTYPE = np.dtype("<i4")
_INT32 = np.iinfo(np.int32)


class RoutingRowsError(ValueError):
    """Routing rows (or their layout) violate the contract; the message says what and where."""


@dataclass(frozen=True)
class RoutingLayout:
    """Which global layers are MoE, the expert count and top-k; fixes the row shape and dtype."""

    num_hidden_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "moe_layers", tuple(int(i) for i in self.moe_layers))
        if self.num_hidden_layers < 1:
            raise RoutingRowsError(f"num_hidden_layers must be >= 1, got {self.num_hidden_layers}")
        if not self.moe_layers:
            raise RoutingRowsError("layout has no MoE layers: a dense model has no routing rows")
        if list(self.moe_layers) != sorted(set(self.moe_layers)):
            raise RoutingRowsError(f"moe_layers must be strictly ascending, got {self.moe_layers}")
        if self.moe_layers[0] < 0 or self.moe_layers[-1] >= self.num_hidden_layers:
            raise RoutingRowsError(
                f"moe_layers must lie in [0, {self.num_hidden_layers}), got {self.moe_layers}"
            )
        if not 1 <= self.num_experts <= 65536:
            raise RoutingRowsError(f"num_experts must be in [1, 65536], got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise RoutingRowsError(
                f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}"
            )

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def dtype(self) -> np.dtype:
        """Storage dtype of expert ids: uint8 if num_experts <= 256, else uint16."""
        return np.dtype(np.uint8) if self.num_experts <= 256 else np.dtype(np.uint16)

    @classmethod
    def from_config(cls, cfg: Any) -> RoutingLayout:
        """Layout from a model config (transformers or ours), using Qwen3MoeDecoderLayer's MoE rule.

        Layer i is MoE iff i not in mlp_only_layers, num_experts > 0, (i+1) % decoder_sparse_step == 0
        and i >= first_k_dense_replace. Mixtral/OLMoE configs (no such fields) are all-MoE.
        """
        num_experts = getattr(cfg, "num_experts", None)
        if num_experts is None:
            num_experts = getattr(cfg, "num_local_experts", None)
        if num_experts is None:
            raise RoutingRowsError("config has neither num_experts nor num_local_experts")
        step = getattr(cfg, "decoder_sparse_step", None) or 1
        mlp_only = set(getattr(cfg, "mlp_only_layers", None) or ())
        first_dense = getattr(cfg, "first_k_dense_replace", None) or 0
        moe = tuple(
            i
            for i in range(cfg.num_hidden_layers)
            if i not in mlp_only and num_experts > 0 and (i + 1) % step == 0 and i >= first_dense
        )
        return cls(cfg.num_hidden_layers, moe, int(num_experts), int(cfg.num_experts_per_tok))


def _check_int_array(rows: np.ndarray, what: str) -> None:
    if not isinstance(rows, np.ndarray):
        raise RoutingRowsError(f"{what}: expected a numpy array, got {type(rows).__name__}")
    if not np.issubdtype(rows.dtype, np.integer):
        raise RoutingRowsError(f"{what}: expected an integer dtype, got {rows.dtype}")


def _check_shape(rows: np.ndarray, layers: int, top_k: int, what: str) -> None:
    if rows.ndim != 3:
        raise RoutingRowsError(
            f"{what}: expected 3 dims [rows, layers={layers}, top_k={top_k}], got shape {rows.shape}"
        )
    if rows.shape[1] != layers:
        raise RoutingRowsError(f"{what}: expected {layers} layers, got {rows.shape[1]} (shape {rows.shape})")
    if rows.shape[2] != top_k:
        raise RoutingRowsError(f"{what}: expected top_k={top_k}, got {rows.shape[2]} (shape {rows.shape})")


def encode_wire(rows: np.ndarray) -> str:
    """Integer rows [R, layers, k] -> base64 of their little-endian int32 bytes (SGLang's format)."""
    _check_int_array(rows, "encode_wire")
    if rows.ndim != 3:
        raise RoutingRowsError(f"encode_wire: expected 3 dims [rows, layers, top_k], got shape {rows.shape}")
    if rows.size and (rows.min() < _INT32.min or rows.max() > _INT32.max):
        raise RoutingRowsError(
            f"encode_wire: values [{rows.min()}, {rows.max()}] do not fit int32"
        )
    return base64.b64encode(np.ascontiguousarray(rows, dtype=_WIRE_DTYPE).tobytes()).decode("ascii")


def decode_wire(data: str, num_layers: int, top_k: int, dtype: str | None = None) -> np.ndarray:
    """Base64 wire rows -> int32 [R, num_layers, top_k].

    ``dtype`` is ``meta_info["routed_experts_dtype"]`` when the server sends one (e.g. "int16",
    "uint8", also "torch.int16"); the bytes are read as that little-endian integer type. Default int32.
    """
    name = "int32" if dtype is None else dtype.removeprefix("torch.")
    try:
        wire_dtype = np.dtype(name).newbyteorder("<")
    except TypeError as exc:
        raise RoutingRowsError(f"decode_wire: unknown routed_experts_dtype {dtype!r}") from exc
    if not np.issubdtype(wire_dtype, np.integer):
        raise RoutingRowsError(f"decode_wire: routed_experts_dtype must be an integer type, got {dtype!r}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RoutingRowsError(f"decode_wire: routed_experts is not valid base64: {exc}") from exc
    row_bytes = num_layers * top_k * wire_dtype.itemsize
    if row_bytes <= 0 or len(raw) % row_bytes:
        raise RoutingRowsError(
            f"decode_wire: {len(raw)} bytes is not a multiple of num_layers*top_k*itemsize = "
            f"{num_layers}*{top_k}*{wire_dtype.itemsize} = {row_bytes} ({wire_dtype.name})"
        )
    flat = np.frombuffer(raw, dtype=wire_dtype)
    if flat.size and (flat.min() < _INT32.min or flat.max() > _INT32.max):
        raise RoutingRowsError(f"decode_wire: values [{flat.min()}, {flat.max()}] do not fit int32")
    return flat.astype(np.int32).reshape(-1, num_layers, top_k)


def validate_rows(rows: np.ndarray, layout: RoutingLayout, expected_rows: int | None = None) -> None:
    """Check internal rows [R, num_moe_layers, top_k]: shape, integer dtype, id range, no duplicates."""
    _check_int_array(rows, "routing rows")
    _check_shape(rows, layout.num_moe_layers, layout.top_k, "routing rows")
    if expected_rows is not None and rows.shape[0] != expected_rows:
        raise RoutingRowsError(f"routing rows: expected {expected_rows} rows, got {rows.shape[0]}")
    if rows.size == 0:
        return
    bad = (rows < 0) | (rows >= layout.num_experts)
    if bad.any():
        r, l, _ = np.argwhere(bad)[0]
        raise RoutingRowsError(
            f"routing rows: expert id out of range [0, {layout.num_experts}) at row {r}, "
            f"moe layer {l} (global layer {layout.moe_layers[l]}): ids {rows[r, l].tolist()} "
            f"({int(bad.sum())} bad ids in total)"
        )
    ordered = np.sort(rows, axis=2)
    dup = (ordered[:, :, 1:] == ordered[:, :, :-1]).any(axis=2)
    if dup.any():
        r, l = np.argwhere(dup)[0]
        raise RoutingRowsError(
            f"routing rows: duplicate expert id at row {r}, moe layer {l} "
            f"(global layer {layout.moe_layers[l]}): ids {rows[r, l].tolist()} "
            f"({int(dup.sum())} (row, layer) pairs with duplicates)"
        )


def wire_to_moe(rows: np.ndarray, layout: RoutingLayout) -> np.ndarray:
    """Wire rows [R, num_hidden_layers, k] -> internal [R, num_moe_layers, k] in layout.dtype.

    Dense-layer entries are dropped unchecked; MoE-layer entries are validated before the cast.
    """
    _check_int_array(rows, "wire rows")
    _check_shape(rows, layout.num_hidden_layers, layout.top_k, "wire rows")
    moe = rows[:, list(layout.moe_layers), :]
    validate_rows(moe, layout)
    return moe.astype(layout.dtype)


def moe_to_wire(rows: np.ndarray, layout: RoutingLayout) -> np.ndarray:
    """Internal rows [R, num_moe_layers, k] -> wire int32 [R, num_hidden_layers, k], dense layers 0."""
    validate_rows(rows, layout)
    out = np.zeros((rows.shape[0], layout.num_hidden_layers, layout.top_k), dtype=np.int32)
    out[:, list(layout.moe_layers), :] = rows
    return out


def padding_rows(n: int, layout: RoutingLayout) -> np.ndarray:
    """[n, num_moe_layers, top_k] rows filled with arange(top_k) (distinct ids), layout.dtype."""
    pad = np.arange(layout.top_k, dtype=layout.dtype)
    return np.broadcast_to(pad, (n, layout.num_moe_layers, layout.top_k)).copy()


@dataclass
class RoutingRows:
    """Rows for one sequence (or a contiguous slice of it).

    experts: [R, L_moe, k] (layout.dtype); versions: [R] int64, the policy version that produced each
    row; start: index of the first row in the full sequence.
    """

    experts: np.ndarray
    versions: np.ndarray
    start: int = 0

    def __len__(self) -> int:
        return int(self.experts.shape[0])

    @property
    def end(self) -> int:
        return self.start + len(self)

    def validate(self, layout: RoutingLayout, expected_rows: int | None = None) -> None:
        """validate_rows on experts, plus: experts dtype == layout.dtype, versions int64 [R], start >= 0."""
        validate_rows(self.experts, layout, expected_rows)
        if self.experts.dtype != layout.dtype:
            raise RoutingRowsError(f"experts: expected dtype {layout.dtype}, got {self.experts.dtype}")
        if not isinstance(self.versions, np.ndarray) or self.versions.dtype != np.int64:
            got = getattr(self.versions, "dtype", type(self.versions).__name__)
            raise RoutingRowsError(f"versions: expected an int64 numpy array, got {got}")
        if self.versions.shape != (len(self),):
            raise RoutingRowsError(
                f"versions: expected shape ({len(self)},) (one per row), got {self.versions.shape}"
            )
        if self.start < 0:
            raise RoutingRowsError(f"start must be >= 0, got {self.start}")

    @classmethod
    def from_wire(
        cls, meta_info: dict[str, Any], layout: RoutingLayout, version: int, start: int = 0
    ) -> RoutingRows:
        """Decode SGLang's meta_info (routed_experts [+ routed_experts_dtype]); tag rows with version."""
        if "routed_experts" not in meta_info or meta_info["routed_experts"] is None:
            raise RoutingRowsError(
                "meta_info has no 'routed_experts' (was the request sent with return_routed_experts?)"
            )
        wire = decode_wire(
            meta_info["routed_experts"],
            layout.num_hidden_layers,
            layout.top_k,
            meta_info.get("routed_experts_dtype"),
        )
        experts = wire_to_moe(wire, layout)
        return cls(experts, np.full(len(experts), version, dtype=np.int64), start)

    def concat(self, other: RoutingRows) -> RoutingRows:
        """Append the next contiguous slice; other.start must equal self.end."""
        _check_contiguous(self.end, other.start, "concat")
        return RoutingRows(
            np.concatenate([self.experts, other.experts]),
            np.concatenate([self.versions, other.versions]),
            self.start,
        )


def _check_contiguous(end: int, start: int, where: str) -> None:
    """Raise unless a part starting at row `start` continues rows ending at `end`."""
    if start > end:
        raise RoutingRowsError(
            f"{where}: gap: next part starts at row {start} but rows so far end at {end} "
            f"({start - end} rows missing)"
        )
    if start < end:
        raise RoutingRowsError(
            f"{where}: overlap: next part starts at row {start} but rows so far end at {end} "
            f"({end - start} rows overlap)"
        )


def concat_increments(parts: Sequence[RoutingRows]) -> RoutingRows:
    """Stitch per-turn increments (turn t starts where turn t-1 ended) into one RoutingRows."""
    if not parts:
        raise RoutingRowsError("concat_increments: no parts")
    for i in range(1, len(parts)):
        _check_contiguous(parts[i - 1].end, parts[i].start, f"concat_increments part {i}")
    return RoutingRows(
        np.concatenate([p.experts for p in parts]),
        np.concatenate([p.versions for p in parts]),
        parts[0].start,
    )


def _full_sequence_rows(
    item: RoutingRows | np.ndarray, seq_len: int, layout: RoutingLayout, b: int
) -> np.ndarray:
    """Validated experts of sequence b (rows from its token 0), at most seq_len-1 of them."""
    if seq_len < 0:
        raise RoutingRowsError(f"sequence {b}: negative seq_len {seq_len}")
    if isinstance(item, RoutingRows):
        if item.start != 0:
            raise RoutingRowsError(f"sequence {b}: rows start at {item.start}, alignment needs start 0")
        item = item.experts
    validate_rows(item, layout)
    if item.shape[0] > max(seq_len - 1, 0):
        raise RoutingRowsError(
            f"sequence {b}: {item.shape[0]} rows for {seq_len} tokens (at most {max(seq_len - 1, 0)})"
        )
    return item


def align_padded(
    rows: Sequence[RoutingRows | np.ndarray],
    seq_lens: Sequence[int],
    layout: RoutingLayout,
    max_len: int | None = None,
    left_pad: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Replay rows for a padded token batch [B, S].

    Returns experts [B, S, L_moe, k] (layout.dtype) and has_row [B, S] bool. Token j of sequence b gets
    row j when one exists; pad positions, the last token and missing rows get padding rows and False.
    left_pad=True places each sequence at the right end.
    """
    if len(rows) != len(seq_lens):
        raise RoutingRowsError(f"{len(rows)} row sets for {len(seq_lens)} sequences")
    seq_len_max = max(seq_lens, default=0)
    width = seq_len_max if max_len is None else max_len
    if seq_len_max > width:
        raise RoutingRowsError(f"max_len {width} is shorter than the longest sequence ({seq_len_max})")
    experts = padding_rows(len(seq_lens) * width, layout).reshape(
        len(seq_lens), width, layout.num_moe_layers, layout.top_k
    )
    has_row = np.zeros((len(seq_lens), width), dtype=bool)
    for b, (item, n) in enumerate(zip(rows, seq_lens)):
        seq = _full_sequence_rows(item, n, layout, b)
        first = width - n if left_pad else 0
        experts[b, first : first + len(seq)] = seq
        has_row[b, first : first + len(seq)] = True
    return experts, has_row


def align_packed(
    rows: Sequence[RoutingRows | np.ndarray], seq_lens: Sequence[int], layout: RoutingLayout
) -> tuple[np.ndarray, np.ndarray]:
    """Replay rows for a packed batch (sequences concatenated): experts [T, L_moe, k], has_row [T]."""
    if len(rows) != len(seq_lens):
        raise RoutingRowsError(f"{len(rows)} row sets for {len(seq_lens)} sequences")
    total = int(sum(seq_lens))
    experts = padding_rows(total, layout)
    has_row = np.zeros(total, dtype=bool)
    offset = 0
    for b, (item, n) in enumerate(zip(rows, seq_lens)):
        seq = _full_sequence_rows(item, n, layout, b)
        experts[offset : offset + len(seq)] = seq
        has_row[offset : offset + len(seq)] = True
        offset += n
    return experts, has_row


def row_version_report(
    versions: Sequence[np.ndarray], seq_lens: Sequence[int], current_version: int
) -> dict[str, int]:
    """Per-batch counts: rows expected (sum of len-1), present, missing, stale (version < current).

    versions[b] holds the version of each row present for sequence b ([R_b], R_b <= seq_lens[b]-1).
    """
    if len(versions) != len(seq_lens):
        raise RoutingRowsError(f"{len(versions)} version arrays for {len(seq_lens)} sequences")
    expected = present = stale = 0
    for b, (v, n) in enumerate(zip(versions, seq_lens)):
        v = np.asarray(v)
        if v.ndim != 1 or len(v) > max(n - 1, 0):
            raise RoutingRowsError(
                f"sequence {b}: versions shape {v.shape} for {n} tokens (at most {max(n - 1, 0)} rows)"
            )
        expected += max(n - 1, 0)
        present += len(v)
        stale += int((v < current_version).sum())
    return {
        "rows_expected": expected,
        "rows_present": present,
        "rows_missing": expected - present,
        "rows_stale": stale,
    }
