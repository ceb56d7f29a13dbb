//! Any byte string given to the GGUF parser yields a file or an error, never a panic, an
//! abort or an allocation out of proportion to the input; a file that parses can have all
//! its metadata read and all its tensors dequantized.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mlx_native::weights::gguf::GgufFile;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = GgufFile::parse("fuzz.gguf", data) else {
        return;
    };
    for (key, _) in f.metadata() {
        let _ = f.get_u32(key);
        let _ = f.get_f32(key);
        let _ = f.get_str(key);
        let _ = f.get_array(key).map(|a| a.to_i64s());
    }
    for t in f.tensors() {
        let bytes = f.tensor_bytes(&t.name).map(<[u8]>::len);
        assert_eq!(bytes.ok(), Some(t.n_bytes()));
        if let Ok(v) = f.dequantize_tensor(&t.name) {
            assert_eq!(v.len(), t.n_elems());
        }
    }
});
