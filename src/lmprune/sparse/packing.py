"""One sparse weight, packed: its kept values in the weight's own dtype plus where they sit.

Two layouts, both along the last (stored) dimension, row by row, so that a batch-1 GEMV streams each
row's values and its position data once, front to back:
- `bitmask`: one bit per weight (bit j of byte k is column 8k+j, least significant bit first; each row
  padded to whole bytes), and the kept values of all rows concatenated in row-major order.
- `nm`: exactly n values per group of m consecutive weights (a group with fewer non-zeros keeps some
  zeros), and each value's position inside its group in `bits` bits (1, 2, 4 or 8, so no index straddles
  a byte; packed least significant first, each row padded to whole bytes). `transposed`: the groups run
  along the stored weight's second-to-last dimension (GPT-2's Conv1D stores [in, out]); the packed
  arrays then describe the stored weight with its last two dimensions swapped.
Leading dimensions (a fused [experts, out, in] tensor) are kept: every expert slice is packed on its own.

"Kept" means non-zero. A zero's sign is not kept: `W * mask` leaves -0.0 wherever a negative weight was
pruned, and keeping those would keep half the pruned weights; unpacking writes +0.0, which torch.equal
takes as equal and which gives the same result in every sum and product. Every other bit comes back.
Every packed weight carries a CRC-32 of its packed bytes, so a corrupted file is refused, not loaded.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from ..errors import LmpruneError

BITMASK, NM = "bitmask", "nm"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_BIT = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)  # LSB first


@dataclass
class PackedWeight:
    """A packed weight; `positions` is the bitmask or the packed in-group indices (uint8)."""

    layout: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    values: torch.Tensor
    positions: torch.Tensor
    n: int | None = None
    m: int | None = None
    bits: int | None = None
    transposed: bool = False

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.positions.nbytes

    def dense(self) -> torch.Tensor:
        """The weight as stored, bit for bit."""
        if self.layout == BITMASK:
            kept = unpack_bits(self.positions, 1, self.shape[-1]).bool()
            return torch.zeros(self.shape, dtype=self.dtype).masked_scatter_(kept, self.values)
        rows_shape = _swap_last(self.shape) if self.transposed else self.shape
        cols = rows_shape[-1]
        index = unpack_bits(self.positions, self.bits, cols // self.m * self.n).long()
        groups = torch.zeros(*rows_shape[:-1], cols // self.m, self.m, dtype=self.dtype)
        groups.scatter_(-1, index.reshape(*groups.shape[:-1], self.n),
                        self.values.reshape(*groups.shape[:-1], self.n))
        out = groups.reshape(rows_shape)
        return out.transpose(-1, -2).contiguous() if self.transposed else out

    def meta(self) -> dict:
        """What the file records beside the packed tensors (JSON)."""
        entry = {"layout": self.layout, "shape": list(self.shape), "dtype": dtype_name(self.dtype),
                 "crc32": self.crc32()}
        if self.layout == BITMASK:
            entry["nnz"] = self.values.numel()
        else:
            entry.update(n=self.n, m=self.m, bits=self.bits, transposed=self.transposed)
        return entry

    def crc32(self) -> int:
        return zlib.crc32(_bytes(self.positions), zlib.crc32(_bytes(self.values)))


def as_dense(weight: torch.Tensor | PackedWeight) -> torch.Tensor:
    """A weight as stored: packed ones unpacked, tensors as they are."""
    return weight.dense() if isinstance(weight, PackedWeight) else weight


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def nonzero(weight: torch.Tensor) -> torch.Tensor:
    """Where the weight is kept: not ±0 (NaN, should one slip through, is kept and comes back)."""
    return weight != 0


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Each row of small unsigned codes (< 2**bits), `bits` bits each, LSB first, row padded to bytes."""
    per_byte = 8 // bits
    cols = codes.shape[-1]
    padded = torch.zeros(*codes.shape[:-1], -(-cols // per_byte) * per_byte, dtype=torch.uint8)
    padded[..., :cols] = codes
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    return (padded.reshape(*codes.shape[:-1], -1, per_byte) << shifts).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """pack_bits backwards: [..., cols] uint8 codes."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :cols]


def pack_bitmask(weight: torch.Tensor) -> PackedWeight:
    kept = nonzero(weight)
    return PackedWeight(BITMASK, tuple(weight.shape), weight.dtype, weight[kept].contiguous(),
                        pack_bits(kept.to(torch.uint8), 1))


def index_bits(m: int) -> int:
    return next(b for b in (1, 2, 4, 8) if (1 << b) >= m)


def fits_nm(weight: torch.Tensor, n: int, m: int, transposed: bool = False) -> bool:
    """Every group of m consecutive weights along the (stored or swapped) last dimension has ≤ n non-zeros."""
    rows = weight.transpose(-1, -2) if transposed else weight
    if rows.shape[-1] % m or m > 256:
        return False
    return bool((nonzero(rows).reshape(*rows.shape[:-1], -1, m).sum(-1) <= n).all())


def pack_nm(weight: torch.Tensor, n: int, m: int, transposed: bool = False) -> PackedWeight:
    """The weight must fit n:m (fits_nm)."""
    rows = weight.transpose(-1, -2).contiguous() if transposed else weight
    groups = rows.reshape(*rows.shape[:-1], -1, m)
    # The non-zeros first, then the lowest zero positions; in position order inside the group.
    key = (~nonzero(groups)).to(torch.int16) * m + torch.arange(m, dtype=torch.int16)
    index = key.argsort(dim=-1, stable=True)[..., :n].sort(-1).values
    values = groups.gather(-1, index).reshape(*rows.shape[:-1], -1)
    bits = index_bits(m)
    return PackedWeight(NM, tuple(weight.shape), weight.dtype, values.contiguous(),
                        pack_bits(index.reshape(values.shape).to(torch.uint8), bits), n, m, bits, transposed)


def packed_bytes(weight: torch.Tensor, layout: str, n: int | None = None, m: int | None = None,
                 transposed: bool = False) -> int:
    """Bytes a layout takes for this weight, without packing it."""
    shape = _swap_last(weight.shape) if transposed else tuple(weight.shape)
    rows, cols = math.prod(shape[:-1]), shape[-1]
    if layout == BITMASK:
        return int(nonzero(weight).sum()) * weight.element_size() + rows * -(-cols // 8)
    kept = cols // m * n
    return rows * kept * weight.element_size() + rows * -(-kept * index_bits(m) // 8)


def choose_layout(weight: torch.Tensor, nm: tuple[int, int] | None = None) -> tuple[str, dict]:
    """(layout, its arguments) taking the fewest bytes; `nm` given: that N:M must fit (else ValueError).

    Without a given N:M, 2:4-style candidates n:4 and n:8 (n the fullest group) compete with the bitmask;
    a tie goes to N:M, whose fixed count per group decodes faster."""
    if nm is not None:
        for transposed in (False, True):
            if fits_nm(weight, *nm, transposed):
                return NM, dict(n=nm[0], m=nm[1], transposed=transposed)
        raise ValueError(f"not {nm[0]}:{nm[1]} sparse")
    best = (packed_bytes(weight, BITMASK), 1, BITMASK, {})
    if weight.shape[-1] > 0:
        for m in (4, 8):
            if weight.shape[-1] % m == 0:
                counts = nonzero(weight).reshape(*weight.shape[:-1], -1, m).sum(-1)
                n = max(int(counts.max()), 1)
                if n < m:
                    best = min(best, (packed_bytes(weight, NM, n, m), 0, NM, dict(n=n, m=m)))
    return best[2], best[3]


def pack(weight: torch.Tensor, layout: str, **args) -> PackedWeight:
    return pack_bitmask(weight) if layout == BITMASK else pack_nm(weight, **args)


def from_stored(meta: dict, values: torch.Tensor, positions: torch.Tensor, where: str) -> PackedWeight:
    """A PackedWeight from a file's tensors and their record, checked to the last bit: any disagreement
    (shapes, counts, stray bits, the CRC) is an LmpruneError naming `where`."""
    def bad(why: str) -> LmpruneError:
        return LmpruneError(f"{where}: {why} (a damaged or hand-edited sparse checkpoint)")

    try:
        layout, shape, dtype = meta["layout"], tuple(int(s) for s in meta["shape"]), DTYPES[meta["dtype"]]
        crc = int(meta["crc32"])
    except (KeyError, TypeError, ValueError):
        raise bad("its record is incomplete") from None
    if len(shape) < 2 or values.dtype != dtype or positions.dtype != torch.uint8:
        raise bad("its tensors do not have the recorded shape or dtype")
    if layout == BITMASK:
        nnz = meta.get("nnz")
        cols = shape[-1]
        if positions.shape != (*shape[:-1], -(-cols // 8)) or values.dim() != 1 or values.numel() != nnz:
            raise bad("its values or bitmask do not have the recorded shape")
        kept = int(unpack_bits(positions, 1, 8 * positions.shape[-1]).sum())
        if kept != nnz:
            raise bad(f"its bitmask marks {kept} weights but {nnz} values are stored")
        if cols % 8 and int(positions[..., -1].bitwise_right_shift(cols % 8).sum()):
            raise bad("its bitmask has bits set past the end of a row")
        packed = PackedWeight(BITMASK, shape, dtype, values, positions)
    elif layout == NM:
        try:
            n, m, bits, transposed = int(meta["n"]), int(meta["m"]), int(meta["bits"]), bool(meta["transposed"])
        except (KeyError, TypeError, ValueError):
            raise bad("its N:M record is incomplete") from None
        rows_shape = _swap_last(shape) if transposed else shape
        if not (0 < n < m <= 256) or bits != index_bits(m) or rows_shape[-1] % m:
            raise bad(f"its pattern {n}:{m} ({bits}-bit indices) does not fit its shape")
        kept = rows_shape[-1] // m * n
        if values.shape != (*rows_shape[:-1], kept) or positions.shape != (*rows_shape[:-1], -(-kept * bits // 8)):
            raise bad("its values or indices do not have the recorded shape")
        index = unpack_bits(positions, bits, kept).reshape(*rows_shape[:-1], -1, n).long()
        if (index.numel() and int(index.max()) >= m) or (n > 1 and bool((index.diff(dim=-1) <= 0).any())):
            raise bad(f"its in-group indices are not increasing positions below {m}")
        packed = PackedWeight(NM, shape, dtype, values, positions, n, m, bits, transposed)
    else:
        raise bad(f"its layout {layout!r} is unknown")
    if packed.crc32() != crc:
        raise bad("its packed bytes fail their CRC-32 check")
    return packed


def _swap_last(shape) -> tuple[int, ...]:
    return (*shape[:-2], shape[-1], shape[-2])


def _bytes(tensor: torch.Tensor):
    return tensor.contiguous().view(torch.uint8).numpy().data if tensor.numel() else b""


def as_row_bitmask(packed: PackedWeight, transpose: bool = False) -> PackedWeight:
    """The same weight (transposed when asked) as a 2-D bitmask along its last dimension, the one form
    the GEMV kernel reads. An N:M weight whose groups already run along that dimension keeps its values
    (in the same order) and trades its indices for the mask: for 2:4 both take one bit per weight."""
    along_last = packed.transposed == transpose
    if packed.layout == BITMASK and not transpose:
        return packed
    if packed.layout == NM and along_last:
        rows_shape = _swap_last(packed.shape) if transpose else packed.shape
        cols = rows_shape[-1]
        kept = cols // packed.m * packed.n
        index = unpack_bits(packed.positions, packed.bits, kept).long()
        index += torch.arange(kept) // packed.n * packed.m  # group start + position in the group
        mask = torch.zeros(*rows_shape[:-1], cols, dtype=torch.uint8).scatter_(-1, index, 1)
        return PackedWeight(BITMASK, tuple(rows_shape), packed.dtype, packed.values.reshape(-1), pack_bits(mask, 1))
    dense = packed.dense()
    return pack_bitmask(dense.transpose(-1, -2).contiguous() if transpose else dense)


def row_offsets(packed: PackedWeight) -> torch.Tensor:
    """int64 [rows + 1]: where each row's values start in a 2-D bitmask weight's values."""
    counts = unpack_bits(packed.positions, 1, packed.shape[-1]).sum(-1, dtype=torch.int64)
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
