//! Parity with MLX's attention: fixtures written by `scripts/fixtures/mlx_sdpa.py` with
//! MLX 0.32.4 (`mlx[cpu]`, Linux) hold queries, keys and values by position, masks, sinks
//! and `mx.fast.scaled_dot_product_attention` outputs (causal, additive masks, GQA/MQA,
//! sinks, head dims 64..256). Keys and values go through `KvCache::append` (f16 caches get
//! f16-representable values, so the cache holds them exactly) and `sdpa_decode` /
//! `sdpa_prefill` must agree with MLX at f32-accumulation level.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mlx_native::ops::{sdpa_decode, sdpa_prefill, SdpaOptions};
use mlx_native::{DType, DeviceOptions, KvCache, KvCacheConfig, MlxBuffer, MlxDevice};
use safetensors::SafeTensors;

fn gpu() -> MlxDevice {
    MlxDevice::with_options(DeviceOptions {
        poison_allocations: true,
        ..DeviceOptions::default()
    })
    .unwrap_or_else(|e| panic!("GPU tests need an adapter (lavapipe in CI): {e}"))
}

fn f32s(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn i32s(st: &SafeTensors<'_>, name: &str) -> Vec<usize> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    t.data()
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as usize)
        .collect()
}

#[test]
fn sdpa_matches_mlx_fixtures() {
    let path = format!(
        "{}/tests/fixtures/sdpa/sdpa.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e} (run mlx_sdpa.py)"));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st
        .names()
        .iter()
        .filter_map(|n| n.strip_suffix(".cfg").map(str::to_string))
        .collect();
    names.sort();
    assert!(names.len() >= 7, "fixture cases: {names:?}");
    let g = gpu();
    for name in &names {
        let cfg = i32s(&st, &format!("{name}.cfg"));
        let [d, nh, kvh, q0, t, causal, has_mask, has_sinks, kv_f16] = cfg[..] else {
            panic!("{name}.cfg: {cfg:?}")
        };
        let len = q0 + t;
        let mut cc = KvCacheConfig::new(1, kvh, d, len + 4);
        cc.dtype = if kv_f16 == 1 { DType::F16 } else { DType::F32 };
        cc.max_chunk = len;
        let mut cache = KvCache::new(&g, &cc).unwrap();
        let k =
            MlxBuffer::from_slice(&g, &f32s(&st, &format!("{name}.k")), &[len, kvh, d]).unwrap();
        let v =
            MlxBuffer::from_slice(&g, &f32s(&st, &format!("{name}.v")), &[len, kvh, d]).unwrap();
        let q = MlxBuffer::from_slice(&g, &f32s(&st, &format!("{name}.q")), &[t, nh, d]).unwrap();
        let mask = (has_mask == 1).then(|| {
            MlxBuffer::from_slice(&g, &f32s(&st, &format!("{name}.mask")), &[t, len]).unwrap()
        });
        let sinks = (has_sinks == 1).then(|| {
            MlxBuffer::from_slice(&g, &f32s(&st, &format!("{name}.sinks")), &[nh]).unwrap()
        });
        let mut opts = SdpaOptions::new(d);
        opts.scale = f32s(&st, &format!("{name}.scale"))[0];
        // With a mask, MLX's fixture folds the causal triangle into it; ours applies both.
        opts.causal = causal == 1;
        opts.mask = mask.as_ref();
        opts.sinks = sinks.as_ref();
        let mut pass = g.begin();
        // The cache before the chunk, then the chunk: as an engine does.
        if q0 > 0 {
            cache
                .append(
                    &mut pass,
                    0,
                    &k.view(0, &[q0, kvh, d]).unwrap(),
                    &v.view(0, &[q0, kvh, d]).unwrap(),
                    0,
                )
                .unwrap();
        }
        let kc = k.view(q0 * kvh * d, &[t, kvh, d]).unwrap();
        let vc = v.view(q0 * kvh * d, &[t, kvh, d]).unwrap();
        cache.append(&mut pass, 0, &kc, &vc, q0).unwrap();
        let out = if t == 1 && !name.starts_with("prefill") {
            sdpa_decode(
                &mut pass,
                &q.reshape(&[nh, d]).unwrap(),
                &cache,
                0,
                len,
                &opts,
            )
            .unwrap()
        } else {
            sdpa_prefill(&mut pass, &q, &cache, 0, q0, &opts).unwrap()
        };
        pass.commit_and_wait().unwrap();
        let got = out.to_vec::<f32>(&g).unwrap();
        let want = f32s(&st, &format!("{name}.out"));
        assert_eq!(got.len(), want.len(), "{name}");
        // Both sides accumulate in f32 over identical inputs: differences are summation
        // order only (~1e-6 here); 1e-4 absolute + relative still catches any wrong key.
        // The cooperative-matrix prefill (where the device has it) rounds Q and the
        // probabilities to f16: 3e-3.
        let coop = t > 1 && mlx_native::ops::sdpa::prefill_uses_coop(g.caps());
        let tol0 = if coop { 3e-3 } else { 1e-4 };
        for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
            let tol = tol0 + tol0 * b.abs();
            assert!(
                a.is_finite() && (a - b).abs() <= tol,
                "{name}: element {i}: got {a}, MLX {b}"
            );
        }
        println!("{name}: matches MLX ({} elements)", got.len());
    }
}
