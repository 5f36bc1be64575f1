//! The byte layouts, pinned to the spec (ggml `ggml-common.h` and the `dequantize_row_*` formulas of
//! `ggml-quants.c`) rather than to our own encoder: every block here is written byte by byte at the
//! spec's offsets, and the expected weights are computed in the test from the format's formula. A few
//! weights are also checked against values worked out by hand in the comments.
//!
//! Every expected value is exact in f64 (f16 scales times small integers), so `dequantize_row_f64`
//! must match it exactly and `dequantize_row` must equal it rounded once to f32.

use moe_kernels::quant::{GgmlType, dequantize_row, dequantize_row_f64, dot_row, quantize_row};

/// f16 bit patterns used as scales (exact binary fractions).
const F16_2: u16 = 0x4000;
const F16_1: u16 = 0x3C00;
const F16_HALF: u16 = 0x3800;
const F16_QUARTER: u16 = 0x3400;
const F16_EIGHTH: u16 = 0x3000;
const F16_MINUS_1: u16 = 0xBC00;

/// Decodes `block` both ways and checks it against `expected` (exact values).
fn assert_decodes_to(ty: GgmlType, block: &[u8], expected: &[f64]) {
    assert_eq!(ty.row_bytes(expected.len()), Some(block.len()), "{ty}: test block size");
    let mut w64 = vec![f64::NAN; expected.len()];
    let mut w32 = vec![f32::NAN; expected.len()];
    dequantize_row_f64(ty, block, &mut w64);
    dequantize_row(ty, block, &mut w32);
    for (i, e) in expected.iter().enumerate() {
        assert_eq!(w64[i], *e, "{ty} weight {i} (f64)");
        assert_eq!(w32[i], *e as f32, "{ty} weight {i} (f32)");
    }
}

#[test]
fn type_table_matches_ggml() {
    // (type, ggml_type id, name, block size, bytes per block) from ggml.h / ggml.c type_traits.
    let table = [
        (GgmlType::F32, 0, "F32", 1, 4),
        (GgmlType::F16, 1, "F16", 1, 2),
        (GgmlType::Q4_0, 2, "Q4_0", 32, 18),
        (GgmlType::Q5_0, 6, "Q5_0", 32, 22),
        (GgmlType::Q5_1, 7, "Q5_1", 32, 24),
        (GgmlType::Q8_0, 8, "Q8_0", 32, 34),
        (GgmlType::Q4_K, 12, "Q4_K", 256, 144),
        (GgmlType::Q5_K, 13, "Q5_K", 256, 176),
        (GgmlType::Q6_K, 14, "Q6_K", 256, 210),
        (GgmlType::BF16, 30, "BF16", 1, 2),
    ];
    for (ty, id, name, block, size) in table {
        assert_eq!(ty.ggml_id(), id, "{name}");
        assert_eq!(GgmlType::from_ggml_id(id), Some(ty), "{name}");
        assert_eq!(ty.name(), name);
        assert_eq!(ty.to_string(), name);
        assert_eq!(ty.block_size(), block, "{name}");
        assert_eq!(ty.type_size(), size, "{name}");
        assert_eq!(ty.is_quantized(), block > 1, "{name}");
        assert!(GgmlType::ALL.contains(&ty));
    }
    assert_eq!(GgmlType::ALL.len(), table.len());
    // Q4_1 (3), the removed Q4_2/Q4_3 (4, 5), Q8_1 (9), Q2_K (10), Q3_K (11), Q8_K (15): unsupported.
    for id in [3, 4, 5, 9, 10, 11, 15, 16, 29, 31, 1000] {
        assert_eq!(GgmlType::from_ggml_id(id), None, "id {id}");
    }
}

#[test]
fn row_bytes_requires_whole_blocks_and_does_not_overflow() {
    assert_eq!(GgmlType::Q4_K.row_bytes(2048), Some(8 * 144));
    assert_eq!(GgmlType::Q8_0.row_bytes(64), Some(68));
    assert_eq!(GgmlType::F16.row_bytes(3), Some(6));
    assert_eq!(GgmlType::Q4_K.row_bytes(0), Some(0));
    assert_eq!(GgmlType::Q4_K.row_bytes(255), None);
    assert_eq!(GgmlType::Q5_0.row_bytes(48), None);
    assert_eq!(GgmlType::F32.row_bytes(usize::MAX), None);
    // usize::MAX / 32 blocks of 34 bytes overflow; of Q6_K's 256 weights in 210 bytes they do not.
    assert_eq!(GgmlType::Q8_0.row_bytes(usize::MAX / 32 * 32), None);
    assert_eq!(GgmlType::Q6_K.row_bytes(usize::MAX / 256 * 256), Some(usize::MAX / 256 * 210));
}

#[test]
fn q4_0_block_by_hand() {
    // block_q4_0: d (f16) @0, qs[16] @2; qs[j] = weight j (low nibble) | weight j+16 (high nibble).
    let mut block = vec![0u8; 18];
    block[0..2].copy_from_slice(&F16_HALF.to_le_bytes());
    for j in 0..16 {
        block[2 + j] = ((15 - j as u8) << 4) | j as u8;
    }
    let d = 0.5;
    let expected: Vec<f64> = (0..32)
        .map(|i| {
            let q = if i < 16 { block[2 + i] & 0xF } else { block[2 + i - 16] >> 4 };
            (f64::from(q) - 8.0) * d
        })
        .collect();
    // By hand: weight 0 is (0 - 8) * 0.5 = -4; weight 16 is (15 - 8) * 0.5 = 3.5; weight 31 is -4.
    assert_eq!((expected[0], expected[16], expected[31]), (-4.0, 3.5, -4.0));
    assert_decodes_to(GgmlType::Q4_0, &block, &expected);
}

/// The fifth bit of weight `i` of a Q5_0/Q5_1 block: bit `i` of the little-endian u32 `qh`.
fn q5_quant(qh: u32, qs: &[u8], i: usize) -> u8 {
    let low = if i < 16 { qs[i] & 0xF } else { qs[i - 16] >> 4 };
    low | ((((qh >> i) & 1) as u8) << 4)
}

#[test]
fn q5_0_block_by_hand() {
    // block_q5_0: d (f16) @0, qh (u32 LE) @2, qs[16] @6.
    let qh: u32 = 0x8001_0003; // fifth bits of weights 0, 1, 16, 31
    let mut block = vec![0u8; 22];
    block[0..2].copy_from_slice(&F16_QUARTER.to_le_bytes());
    block[2..6].copy_from_slice(&qh.to_le_bytes());
    for j in 0..16 {
        block[6 + j] = j as u8 * 5 + 1;
    }
    let expected: Vec<f64> =
        (0..32).map(|i| (f64::from(q5_quant(qh, &block[6..], i)) - 16.0) * 0.25).collect();
    // By hand: weight 0: low nibble 1, fifth bit 1 -> 17 - 16 = 1 -> 0.25. Weight 16: high nibble of
    // qs[0] = 0, fifth bit 1 -> 0 -> 0. Weight 2: qs[2] = 11 -> low 11, no fifth bit -> -5 * 0.25.
    assert_eq!((expected[0], expected[16], expected[2]), (0.25, 0.0, -1.25));
    assert_decodes_to(GgmlType::Q5_0, &block, &expected);
}

#[test]
fn q5_1_block_by_hand() {
    // block_q5_1: d (f16) @0, m (f16) @2, qh (u32 LE) @4, qs[16] @8.
    let qh: u32 = 0xF0F0_1234;
    let mut block = vec![0u8; 24];
    block[0..2].copy_from_slice(&F16_HALF.to_le_bytes());
    block[2..4].copy_from_slice(&F16_MINUS_1.to_le_bytes());
    block[4..8].copy_from_slice(&qh.to_le_bytes());
    for j in 0..16 {
        block[8 + j] = (j as u8).wrapping_mul(37).wrapping_add(9);
    }
    let expected: Vec<f64> = (0..32).map(|i| f64::from(q5_quant(qh, &block[8..], i)) * 0.5 - 1.0).collect();
    // By hand: weight 2: qs[2] = 83 = 0x53 -> low 3; qh bit 2 = 1 -> 19 * 0.5 - 1 = 8.5.
    assert_eq!(expected[2], 8.5);
    assert_decodes_to(GgmlType::Q5_1, &block, &expected);
}

#[test]
fn q8_0_block_by_hand() {
    // block_q8_0: d (f16) @0, qs[32] (i8) @2.
    let mut block = vec![0u8; 34];
    block[0..2].copy_from_slice(&F16_2.to_le_bytes());
    let qs: [i8; 32] = std::array::from_fn(|i| [-128, 127, -1, 0][i % 4] / (1 + i as i8 / 4));
    for (b, q) in block[2..].iter_mut().zip(qs) {
        *b = q as u8;
    }
    let expected: Vec<f64> = qs.iter().map(|q| f64::from(*q) * 2.0).collect();
    assert_eq!((expected[0], expected[1], expected[2]), (-256.0, 254.0, -2.0));
    assert_decodes_to(GgmlType::Q8_0, &block, &expected);
}

/// Scales and mins of the eight Q4_K/Q5_K sub-blocks used below (6-bit values, both sides of j = 4).
const SC: [u8; 8] = [1, 2, 63, 10, 17, 33, 48, 5];
const M: [u8; 8] = [0, 3, 7, 63, 20, 40, 1, 62];

/// The 12 `scales` bytes holding [`SC`] and [`M`], packed by hand from the spec:
/// bytes 0..4: `SC[j] | (SC[j+4] >> 4) << 6`; bytes 4..8: `M[j] | (M[j+4] >> 4) << 6`;
/// bytes 8..12: `(SC[j+4] & 15) | (M[j+4] & 15) << 4`.
const SCALES: [u8; 12] = [
    0x41, // 1 | (17 >> 4) << 6
    0x82, // 2 | (33 >> 4) << 6
    0xFF, // 63 | (48 >> 4) << 6
    0x0A, // 10 | (5 >> 4) << 6
    0x40, // 0 | (20 >> 4) << 6
    0x83, // 3 | (40 >> 4) << 6
    0x07, // 7 | (1 >> 4) << 6
    0xFF, // 63 | (62 >> 4) << 6
    0x41, // (17 & 15) | (20 & 15) << 4
    0x81, // (33 & 15) | (40 & 15) << 4
    0x10, // (48 & 15) | (1 & 15) << 4
    0xE5, // (5 & 15) | (62 & 15) << 4
];

/// The spec's unpacking of sub-block `j`'s scale and min (ggml `get_scale_min_k4`), written out.
fn unpack_scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

#[test]
fn k_scale_unpacking_matches_hand_packed_bytes() {
    for j in 0..8 {
        assert_eq!(unpack_scale_min(&SCALES, j), (SC[j], M[j]), "sub-block {j}");
    }
    // Written out for j = 1 (< 4) and j = 5 (>= 4):
    assert_eq!((SCALES[1] & 63, SCALES[5] & 63), (2, 3));
    assert_eq!((SCALES[9] & 0xF) | ((SCALES[1] >> 6) << 4), 33);
    assert_eq!((SCALES[9] >> 4) | ((SCALES[5] >> 6) << 4), 40);
}

/// The 4-bit part of weight `l` of sub-block `j` in Q4_K/Q5_K `qs`: pair `j / 2` owns bytes
/// `32 * (j / 2)..`; even sub-blocks use the low nibble, odd ones the high nibble.
fn k_low_bits(qs: &[u8], j: usize, l: usize) -> u8 {
    let byte = qs[32 * (j / 2) + l];
    if j.is_multiple_of(2) { byte & 0xF } else { byte >> 4 }
}

#[test]
fn q4_k_block_by_hand() {
    // block_q4_K: d (f16) @0, dmin (f16) @2, scales[12] @4, qs[128] @16.
    let mut block = vec![0u8; 144];
    block[0..2].copy_from_slice(&F16_HALF.to_le_bytes());
    block[2..4].copy_from_slice(&F16_QUARTER.to_le_bytes());
    block[4..16].copy_from_slice(&SCALES);
    for i in 0..128 {
        block[16 + i] = (i * 7 + 3) as u8;
    }
    let (d, dmin) = (0.5, 0.25);
    let expected: Vec<f64> = (0..256)
        .map(|i| {
            let (j, l) = (i / 32, i % 32);
            let q = k_low_bits(&block[16..], j, l);
            d * f64::from(SC[j]) * f64::from(q) - dmin * f64::from(M[j])
        })
        .collect();
    // By hand: sub-block 0, l = 0: qs[0] = 3 -> 0.5 * 1 * 3 - 0.25 * 0 = 1.5.
    // Sub-block 5 (pair 2, high nibble), l = 0: qs[64] = 451 mod 256 = 0xC3 -> 12;
    // 0.5 * 33 * 12 - 0.25 * 40 = 188.
    // Sub-block 3 (pair 1, high nibble), l = 1: qs[33] = 234 = 0xEA -> 14; 0.5 * 10 * 14 - 0.25 * 63 = 54.25.
    assert_eq!((expected[0], expected[160], expected[97]), (1.5, 188.0, 54.25));
    assert_decodes_to(GgmlType::Q4_K, &block, &expected);
}

#[test]
fn q5_k_block_by_hand() {
    // block_q5_K: d (f16) @0, dmin (f16) @2, scales[12] @4, qh[32] @16, qs[128] @48.
    // The fifth bit of weight l of sub-block j is bit j of qh[l].
    let mut block = vec![0u8; 176];
    block[0..2].copy_from_slice(&F16_HALF.to_le_bytes());
    block[2..4].copy_from_slice(&F16_QUARTER.to_le_bytes());
    block[4..16].copy_from_slice(&SCALES);
    for l in 0..32 {
        block[16 + l] = (l * 37 + 11) as u8;
    }
    for i in 0..128 {
        block[48 + i] = (i * 7 + 3) as u8;
    }
    let (d, dmin) = (0.5, 0.25);
    let expected: Vec<f64> = (0..256)
        .map(|i| {
            let (j, l) = (i / 32, i % 32);
            let q = k_low_bits(&block[48..], j, l) | (((block[16 + l] >> j) & 1) << 4);
            d * f64::from(SC[j]) * f64::from(q) - dmin * f64::from(M[j])
        })
        .collect();
    // By hand: sub-block 5, l = 1: qs[65] = 458 mod 256 = 0xCA -> high nibble 12; qh[1] = 48 = 0b110000
    // -> bit 5 set -> q = 28; 0.5 * 33 * 28 - 0.25 * 40 = 452. Sub-block 4, l = 1: low nibble 10, bit 4
    // set -> 26; 0.5 * 17 * 26 - 0.25 * 20 = 216. Sub-block 5, l = 0: qh[0] = 11, bit 5 clear -> 188.
    assert_eq!((expected[161], expected[129], expected[160]), (452.0, 216.0, 188.0));
    assert_decodes_to(GgmlType::Q5_K, &block, &expected);
}

#[test]
fn q6_k_block_by_hand() {
    // block_q6_K: ql[128] @0, qh[64] @128, scales[16] (i8) @192, d (f16) @208.
    const SCALES6: [i8; 16] = [-128, 127, 1, -1, 5, -7, 64, -64, 3, 2, -3, 100, -100, 0, 9, -9];
    let mut block = vec![0u8; 210];
    for (i, b) in block[..128].iter_mut().enumerate() {
        *b = (i * 13 + 5) as u8;
    }
    for i in 0..64 {
        block[128 + i] = (i * 29 + 7) as u8;
    }
    for (b, s) in block[192..208].iter_mut().zip(SCALES6) {
        *b = s as u8;
    }
    block[208..210].copy_from_slice(&F16_EIGHTH.to_le_bytes());
    let (ql, qh) = (&block[0..128], &block[128..192]);
    let expected: Vec<f64> = (0..256)
        .map(|i| {
            // Weight 128h + 32k + l: low 4 bits from ql[64h + l + 32 * (k % 2)] (low nibble for k < 2,
            // high nibble for k >= 2), high 2 bits from qh[32h + l] bits 2k..2k+2; sub-block i / 16.
            let (h, k, l) = (i / 128, (i % 128) / 32, i % 32);
            let byte = ql[64 * h + l + 32 * (k % 2)];
            let low = if k < 2 { byte & 0xF } else { byte >> 4 };
            let high = (qh[32 * h + l] >> (2 * k)) & 3;
            let q = i32::from(low | (high << 4)) - 32;
            0.125 * f64::from(SCALES6[i / 16]) * f64::from(q)
        })
        .collect();
    // By hand: weight 0: ql[0] = 5, qh[0] = 7 -> high 3 -> q = 53 - 32 = 21; 0.125 * -128 * 21 = -336.
    // Weight 80 (h 0, k 2, l 16): ql[16] = 213 = 0xD5 -> 13; qh[16] = 215 = 0b11010111, bits 4..6 = 1
    // -> q = 29 - 32 = -3; sub-block 5 -> 0.125 * -7 * -3 = 2.625.
    // Weight 255 (h 1, k 3, l 31): ql[127] = 120 = 0x78 -> 7; qh[63] = 42 = 0b00101010, bits 6..8 = 0
    // -> q = -25; sub-block 15 -> 0.125 * -9 * -25 = 28.125.
    assert_eq!((expected[0], expected[80], expected[255]), (-336.0, 2.625, 28.125));
    assert_decodes_to(GgmlType::Q6_K, &block, &expected);
}

#[test]
fn float_types_by_hand() {
    // F32 little-endian; F16 IEEE binary16; BF16 the top 16 bits of a binary32.
    let f32_row: Vec<u8> = [1.5f32, -0.1, 3.0e38].iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_decodes_to(GgmlType::F32, &f32_row, &[1.5, f64::from(-0.1f32), f64::from(3.0e38f32)]);
    // 0x3C00 = 1, 0xC000 = -2, 0x0001 = 2^-24 (smallest subnormal), 0x7BFF = 65504 (largest).
    let f16_row: Vec<u8> = [F16_1, 0xC000, 0x0001, 0x7BFF].iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_decodes_to(GgmlType::F16, &f16_row, &[1.0, -2.0, 2f64.powi(-24), 65504.0]);
    // 0x3F80 = 1, 0xC0A0 = -5, 0x0080 = 2^-126.
    let bf16_row: Vec<u8> = [0x3F80u16, 0xC0A0, 0x0080].iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_decodes_to(GgmlType::BF16, &bf16_row, &[1.0, -5.0, 2f64.powi(-126)]);
}

#[test]
#[should_panic(expected = "needs 144 bytes, got 143")]
fn dequantize_row_rejects_a_short_row() {
    dequantize_row(GgmlType::Q4_K, &[0u8; 143], &mut [0.0f32; 256]);
}

#[test]
#[should_panic(expected = "multiple of 32")]
fn dot_row_rejects_a_partial_block() {
    dot_row(GgmlType::Q8_0, &[0u8; 34], &[0.0f32; 31]);
}

#[test]
#[should_panic(expected = "quantize_row: a Q6_K row of 256 weights needs 210 bytes, got 209")]
fn quantize_row_rejects_a_wrong_destination() {
    quantize_row(GgmlType::Q6_K, &[0.0f32; 256], &mut [0u8; 209]);
}

#[test]
#[should_panic(expected = "dequantize_row_f64")]
fn dequantize_row_f64_rejects_a_long_row() {
    dequantize_row_f64(GgmlType::F16, &[0u8; 8], &mut [0.0f64; 3]);
}
