//! Robustness of the GGUF reader (issue 2 item 2): a real file cut at every 7th byte and, seeded, with
//! random bytes of its header flipped, must give a typed error or a file whose every tensor lies inside
//! it — never a panic, an out-of-bounds read or an allocation out of proportion to the file.

use std::path::Path;
use std::sync::Arc;

use moe_engine::gguf::{GgufError, GgufFile};
use moe_engine::weights::ModelWeights;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// llama.cpp's Q4_K_M of the tiny fixture: 27 tensors of five types, a vocabulary array, 135 KB.
fn fixture() -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/public-tiny/model.q4_k_m.gguf");
    std::fs::read(path).expect("fixture")
}

/// Parses `bytes` and checks what a success promises: tensor bytes inside the file, validation of the
/// weight set (which reads every tensor's range) without panic.
fn parse_and_check(bytes: Vec<u8>) -> Result<(), GgufError> {
    let len = bytes.len();
    let f = GgufFile::from_bytes(bytes)?;
    for t in f.tensors() {
        let range =
            f.data_range(t).unwrap_or_else(|| panic!("tensor {:?} accepted outside the file", t.name));
        assert!(range.end <= len && range.len() == t.n_bytes);
        assert_eq!(f.tensor_data(t).len(), t.n_bytes);
        assert_eq!(range.start % f.alignment, 0, "the data start and offsets are aligned");
    }
    if let Ok(weights) = ModelWeights::from_gguf(Arc::new(f)) {
        let layer = &weights.layers[0];
        assert_eq!(
            layer.ffn_up_exps.matrix(0).bytes().len() * weights.config.n_expert,
            layer.ffn_up_exps.bytes().len()
        );
    }
    Ok(())
}

#[test]
fn truncation_at_every_7th_byte_is_an_error() {
    let bytes = fixture();
    let data_start = GgufFile::from_bytes(bytes.clone()).expect("fixture parses").data_start();
    let mut errors = 0;
    for cut in (0..bytes.len()).step_by(7) {
        let result = parse_and_check(bytes[..cut].to_vec());
        // Every tensor is needed, and the last one ends at the end of the file: any cut loses bytes.
        let e = result.expect_err("a truncated file must not parse");
        assert!(!e.to_string().is_empty());
        if cut < data_start {
            assert!(
                matches!(e, GgufError::Truncated { .. } | GgufError::LengthPastEnd { .. }),
                "cut at {cut} in the header: {e}"
            );
        } else {
            assert!(matches!(e, GgufError::TensorOutOfRange { .. }), "cut at {cut} in the data: {e}");
        }
        errors += 1;
    }
    assert_eq!(errors, bytes.len().div_ceil(7));
}

#[test]
fn random_header_corruption_never_panics() {
    let original = fixture();
    let data_start = GgufFile::from_bytes(original.clone()).expect("fixture parses").data_start();
    let mut rng = ChaCha8Rng::seed_from_u64(0x6767_7566);
    let (mut parsed, mut refused) = (0, 0);
    for _ in 0..3000 {
        let mut bytes = original.clone();
        for _ in 0..rng.random_range(1..=4) {
            let at = rng.random_range(0..data_start);
            bytes[at] ^= rng.random_range(1..=255u8);
        }
        match parse_and_check(bytes) {
            Ok(()) => parsed += 1,
            Err(e) => {
                assert!(!e.to_string().is_empty());
                refused += 1;
            }
        }
    }
    // Most flips land in vocabulary strings (still valid files); the rest must be refused cleanly.
    assert_eq!(parsed + refused, 3000);
    assert!(refused > 0, "some corruption must be detected");
}
