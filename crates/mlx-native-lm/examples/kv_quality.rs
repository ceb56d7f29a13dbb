//! KV-cache quality: next-token distributions with a compressed cache against the f16 cache,
//! over a long text scored by chunked prefill (so every chunk after the first attends to a
//! compressed past). Prints, per mode, the mean KL divergence and top-1 agreement.
//!
//!   cargo run --release -p mlx-native-lm --example kv_quality -- MODEL.gguf TEXT_FILE [TOKENS] [MODES]
use mlx_native::kv_quant::KvFormat;
use mlx_native::weights::gguf::GgufFile;
use mlx_native::MlxDevice;
use mlx_native_lm::models::gguf::load;
use mlx_native_lm::tokenizer::{Tokenizer, VocabSpec};

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let z: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
    row.iter().map(|&v| v as f64 - z).collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let model = args
        .get(1)
        .ok_or("usage: kv_quality MODEL TEXT [TOKENS] [MODES]")?;
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
    let vocab = m.cfg.vocab;
    let chunk = 256;
    let run = |format: KvFormat| -> Result<Vec<Vec<f64>>, Box<dyn std::error::Error>> {
        let mut cache = m.new_cache_with(ids.len(), format)?;
        let mut out = Vec::with_capacity(ids.len());
        for (c, part) in ids.chunks(chunk).enumerate() {
            let mut pass = gpu.begin();
            let logits = m.forward_all(&mut pass, part, c * chunk, &mut cache)?;
            pass.commit()?;
            let v = logits.to_vec::<f32>(&gpu)?;
            out.extend(v.chunks(vocab).map(log_softmax));
        }
        Ok(out)
    };
    let base = run(KvFormat::F16)?;
    println!("model {model}, {} tokens, chunks of {chunk}", ids.len());
    println!("{:<7} {:>12} {:>8}", "mode", "mean KL", "top-1");
    for mode in &modes {
        let fmt = KvFormat::parse(mode)?;
        let got = run(fmt)?;
        let (mut kl, mut agree) = (0.0, 0usize);
        for (p, q) in base.iter().zip(&got) {
            kl += p
                .iter()
                .zip(q)
                .map(|(&a, &b)| a.exp() * (a - b))
                .sum::<f64>();
            let am = |v: &Vec<f64>| {
                v.iter()
                    .enumerate()
                    .fold(
                        (0, f64::MIN),
                        |acc, (i, &x)| if x > acc.1 { (i, x) } else { acc },
                    )
                    .0
            };
            agree += usize::from(am(p) == am(q));
        }
        println!(
            "{:<7} {:>12.5} {:>7.2}%",
            mode,
            kl / base.len() as f64,
            100.0 * agree as f64 / base.len() as f64
        );
    }
    Ok(())
}
