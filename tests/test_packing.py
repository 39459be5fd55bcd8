"""Bit packing of integer codes (neuqi.packing)."""

from __future__ import annotations

import pytest
import torch

from neuqi.errors import ConfigError
from neuqi.formats.packing import codes_per_unit, pack, packed_width, unpack


def reference_pack(row: list[int], bits: int) -> list[int]:
    """Independent reference: the row as one little-endian integer, code i at bit bits·i."""
    value = sum(c << (bits * i) for i, c in enumerate(row))
    return list(value.to_bytes(len(row) * bits // 8, "little"))


@pytest.mark.parametrize("bits", range(2, 9))
def test_round_trip_all_codes(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    n = 8 * codes_per_unit(bits) * 3
    codes = torch.randint(0, 1 << bits, (5, n), generator=g, dtype=torch.uint8)
    codes[0] = (1 << bits) - 1  # the top code M, which randint alone might miss
    codes[1] = 0
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, n * bits // 8)
    assert torch.equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits", range(2, 9))
def test_layout_matches_reference(bits: int) -> None:
    g = torch.Generator().manual_seed(100 + bits)
    row = torch.randint(0, 1 << bits, (16,), generator=g).tolist()
    packed = pack(torch.tensor([row], dtype=torch.uint8), bits)
    assert packed[0].tolist() == reference_pack(row, bits)


def test_known_bytes() -> None:
    assert pack(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
    assert pack(torch.tensor([[0xA, 0x5]], dtype=torch.uint8), 4).tolist() == [[0x5A]]
    # 3-bit is dense: 8 codes -> 3 bytes (24 bits), here codes 0..7
    assert pack(torch.arange(8, dtype=torch.uint8)[None], 3).tolist() == [reference_pack(list(range(8)), 3)]
    assert packed_width(8, 3) == 3


def test_leading_dims_and_int_dtypes() -> None:
    codes = torch.randint(0, 8, (2, 3, 16))
    assert torch.equal(unpack(pack(codes, 3), 3, 16), codes.to(torch.uint8))


@pytest.mark.parametrize("bits,width", [(3, 12), (2, 6), (4, 3), (6, 2)])
def test_width_not_multiple_is_refused(bits: int, width: int) -> None:
    with pytest.raises(ConfigError, match="multiple of"):
        pack(torch.zeros(2, width, dtype=torch.uint8), bits)


def test_bad_codes_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"\[0, 3\]"):
        pack(torch.tensor([[0, 1, 2, 4]], dtype=torch.uint8), 2)
    with pytest.raises(ConfigError, match="integer"):
        pack(torch.zeros(1, 4), 2)
    with pytest.raises(ConfigError, match="bits"):
        pack(torch.zeros(1, 8, dtype=torch.uint8), 9)
    with pytest.raises(ConfigError, match="last dim"):
        unpack(torch.zeros(1, 5, dtype=torch.uint8), 4, 8)
