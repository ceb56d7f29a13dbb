use mlx_native::weights::gguf::GgufFile;
use mlx_native::MlxDevice;
use mlx_native_lm::models::gguf::load;
use mlx_native_lm::tokenizer::{Tokenizer, VocabSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or("models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let gpu = MlxDevice::new()?;
    let f = GgufFile::open(&path)?;
    let tok = Tokenizer::from_vocab(&VocabSpec::from_gguf(&f)?)?;
    let t0 = std::time::Instant::now();
    let m = load(&gpu, &f, false)?;
    eprintln!("loaded in {:?}", t0.elapsed());
    let mut ids = tok.encode("The capital of France is", true)?;
    eprintln!("prompt ids {ids:?}");
    let mut cache = m.new_cache(256)?;
    let mut pos = 0;
    let mut feed = ids.clone();
    for _ in 0..20 {
        let mut pass = gpu.begin();
        let logits = m.forward(&mut pass, &feed, pos, &mut cache)?;
        let next = mlx_native::ops::argmax(&mut pass, &logits)?;
        pass.commit()?;
        let id = next.to_vec::<u32>(&gpu)?[0];
        pos += feed.len();
        ids.push(id);
        feed = vec![id];
    }
    eprintln!("{:?}\n{}", ids, tok.decode(&ids)?);
    Ok(())
}
