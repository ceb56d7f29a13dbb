//! Dequantization of any bytes as any supported GGML type, with any element count: a
//! length error or exactly `n` values, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mlx_native::weights::ggml::{dequantize, GgmlType};

fuzz_target!(|data: &[u8]| {
    let [sel, n_lo, n_hi, rest @ ..] = data else {
        return;
    };
    let kind = GgmlType::ALL[*sel as usize % GgmlType::ALL.len()];
    // mostly the element count that fits the bytes, sometimes an arbitrary one
    let n = if n_hi & 0x80 == 0 {
        rest.len() / kind.block_bytes() * kind.block_elems()
    } else {
        usize::from(u16::from_le_bytes([*n_lo, *n_hi & 0x7f]))
    };
    if let Ok(v) = dequantize(kind, rest, n) {
        assert_eq!(v.len(), n);
    }
});
