//! KV-cache quality: next-token distributions with a compressed cache against the f16 cache,
//! over a long text scored by chunked prefill (so every chunk after the first attends to a
//! compressed past). Prints, per mode, the mean KL divergence and top-1 agreement.
//!
//!   cargo run --release -p mlx-native-lm --example kv_quality -- MODEL.gguf TEXT_FILE [TOKENS] [MODES] [CHUNK]
use mlx_native::kv_quant::KvFormat;
use mlx_native::weights::gguf::GgufFile;
use mlx_native::MlxDevice;
use mlx_native_lm::kv_quality::{compare, log_probs};
use mlx_native_lm::models::gguf::load;
use mlx_native_lm::tokenizer::{Tokenizer, VocabSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let model = args
        .get(1)
        .ok_or("usage: kv_quality MODEL TEXT [TOKENS] [MODES] [CHUNK]")?;
    let text = std::fs::read_to_string(args.get(2).ok_or("missing TEXT")?)?;
    let n: usize = args.get(3).map_or(Ok(2048), |s| s.parse())?;
    let modes: Vec<String> = args
        .get(4)
        .map_or("q8,q4,tq4,tq3,tq2.5,tq2".into(), |s| s.clone())
        .split(',')
        .map(str::to_string)
        .collect();
    let gpu = MlxDevice::new()?;
    let f = GgufFile::open(model)?;
    let tok = Tokenizer::from_vocab(&VocabSpec::from_gguf(&f)?)?;
    let m = load(&gpu, &f, true)?;
    let mut ids = tok.encode(&text, true)?;
    ids.truncate(n);
    // Chunk size (5th argument, default 256): a big vocabulary needs smaller chunks, as each
    // chunk's logits [chunk, vocab] must fit one storage binding (128 MiB on lavapipe).
    let chunk: usize = args.get(5).map_or(Ok(256), |s| s.parse())?;
    let base = log_probs(&m, &ids, chunk, KvFormat::F16)?;
    println!("model {model}, {} tokens, chunks of {chunk}", ids.len());
    println!("{:<7} {:>12} {:>8}", "mode", "mean KL", "top-1");
    for mode in &modes {
        let q = compare(&base, &log_probs(&m, &ids, chunk, KvFormat::parse(mode)?)?);
        println!("{:<7} {:>12.5} {:>7.2}%", mode, q.mean_kl, 100.0 * q.top1);
    }
    Ok(())
}
