//! Every WGSL kernel, in every specialization the ops can dispatch, parses and validates
//! with naga and translates through naga's MSL backend: the path wgpu takes on Apple
//! Silicon, which no machine here can run. Needs no GPU.

use mlx_native::kernels::{parse_and_validate, preprocess};
use mlx_native::ops::all_specs;

#[test]
fn every_specialization_validates_and_translates_to_msl() -> Result<(), String> {
    let specs = all_specs().map_err(|e| e.to_string())?;
    assert!(
        specs.len() > 20,
        "suspiciously few specializations: {}",
        specs.len()
    );
    let mut failures = Vec::new();
    // Specs that differ only in override constants share their source: parse and validate
    // each source once (the constants are applied per spec in `to_msl`).
    let mut parsed = std::collections::HashMap::new();
    for (kernel, spec) in &specs {
        for shader_f16 in [false, true] {
            let label = spec.label(*kernel);
            let src = match preprocess(*kernel, spec, shader_f16) {
                Ok(s) => s,
                Err(e) => {
                    failures.push(format!("{label}: {e}"));
                    continue;
                }
            };
            if !parsed.contains_key(&src) {
                let result = parse_and_validate(*kernel, spec, &src).map_err(|e| e.to_string());
                parsed.insert(src.clone(), result);
            }
            let (module, info) = match &parsed[&src] {
                Ok(m) => m,
                Err(e) => {
                    failures.push(format!("{label}: {e}"));
                    continue;
                }
            };
            if let Err(e) = to_msl(module, info, spec) {
                failures.push(format!("{label} (f16={shader_f16}): MSL: {e}"));
            }
        }
    }
    if failures.is_empty() {
        println!(
            "{} specializations validated and translated to MSL",
            specs.len()
        );
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

fn to_msl(
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
    spec: &mlx_native::Spec,
) -> Result<(), String> {
    let mut constants = naga::back::PipelineConstants::default();
    for (name, value) in spec.constants() {
        constants.insert(name.to_string(), value);
    }
    let stage = naga::ShaderStage::Compute;
    let (module, info) = naga::back::pipeline_constants::process_overrides(
        module,
        info,
        Some((stage, spec.entry)),
        &constants,
    )
    .map_err(|e| format!("{e:?}"))?;
    let options = naga::back::msl::Options {
        lang_version: (3, 0),
        fake_missing_bindings: true,
        ..Default::default()
    };
    let pipeline = naga::back::msl::PipelineOptions {
        entry_point: Some((stage, spec.entry.to_string())),
        ..Default::default()
    };
    let (msl, _) = naga::back::msl::write_string(&module, &info, &options, &pipeline)
        .map_err(|e| format!("{e:?}"))?;
    if !msl.contains("kernel") {
        return Err("MSL output has no kernel function".into());
    }
    Ok(())
}
