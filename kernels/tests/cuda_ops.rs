//! Every CUDA kernel against its CPU twin, in the manner of llama.cpp's `test-backend-ops`: cases are
//! generated from parameter lists (sizes chosen not to be multiples of the block, the warp or the tiles),
//! each case runs the op on both sides on the same random inputs and compares them with one routine (the
//! normalised mean squared error, NMSE = sum (cuda - cpu)^2 / sum cpu^2) against a bound per op.
//!
//! Where no CUDA driver, NVRTC or device is found, every case is reported as ignored with the reason (CI
//! has no GPU: the target compiles and passes by skipping, and says so). `compile::*` needs only NVRTC (CI
//! installs it: `.ci/run`), and fails instead of being ignored where `MOE_GATE_REQUIRE_NVRTC` is set.
//!
//! Run on a GPU machine: `cargo test -p moe-kernels --features cuda --test cuda_ops`.

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    #[cfg(feature = "cuda")]
    let trials = cases::all();
    #[cfg(not(feature = "cuda"))]
    let trials = vec![libtest_mimic::Trial::ignorable_test("cuda_kernels", || {
        Ok(libtest_mimic::Completion::ignored_with(
            "built without the `cuda` feature: run with --features cuda",
        ))
    })];
    libtest_mimic::run(&args, trials).exit();
}

#[cfg(feature = "cuda")]
mod cases {
    use std::sync::Arc;

    use libtest_mimic::{Completion, Failed, Trial};
    use moe_kernels::GgmlType;
    use moe_kernels::cpu::{KvView, RopeTable, causal_attention_head, rms_norm, route, silu};
    use moe_kernels::cuda::{
        AttentionShape, CudaDevice, CudaError, REQUIRE_NVRTC_ENV, Routing, SEEDED_NO_FMA_CONTRACTION,
        SEEDED_SOFTMAX_NO_MAX, Tuning, compile_program, compile_program_variant, compile_source,
        kernel_entry_names,
    };
    use moe_kernels::quant::{dequantize_row, dot_row, quantize_row};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    // Bounds on the NMSE between the CUDA result and its CPU twin. Both sides compute in f32 from the same
    // inputs (the same dequantised weights: see `get_rows`), so they differ only by rounding in a
    // different summation order: a dot product of K terms then differs by about sqrt(K) * 2^-24 relative
    // (3e-6 for K = 2304, NMSE ~ 1e-11); a wrong nibble, scale or index gives NMSE >= 1e-3.
    /// Dot products (matvec, MoE experts): 1000x above the rounding level, 1e5 below a layout error.
    const NMSE_DOT: f64 = 1e-8;
    /// Element-wise results after one reduction (RMSNorm, RoPE, router weights): a few roundings each.
    const NMSE_ELEMENTWISE: f64 = 1e-12;
    /// Attention: two dot products and a softmax over at most ~100 positions.
    const NMSE_ATTENTION: f64 = 1e-10;

    type Outcome = Result<Completion, Failed>;

    /// The device, or the reason there is none (the case is then ignored).
    fn device() -> Result<Arc<CudaDevice>, String> {
        CudaDevice::get(0).map_err(|e| e.to_string())
    }

    /// Runs `body` on the device, turning "no CUDA here" into an ignored case.
    fn on_device(body: impl FnOnce(&CudaDevice) -> Result<(), String>) -> Outcome {
        match CudaDevice::get(0) {
            Ok(d) => body(&d).map(|()| Completion::Completed).map_err(Failed::from),
            Err(e) if e.is_unavailable() => Ok(Completion::ignored_with(e.to_string())),
            Err(e) => Err(Failed::from(e.to_string())),
        }
    }

    fn cuda(e: CudaError) -> String {
        e.to_string()
    }

    /// sum (a - b)^2 / sum b^2, in f64 (sum (a - b)^2 when b is all zero).
    fn nmse(a: &[f32], b: &[f32]) -> f64 {
        assert_eq!(a.len(), b.len());
        let (mut err, mut norm) = (0.0f64, 0.0f64);
        for (&x, &y) in a.iter().zip(b) {
            err += (x as f64 - y as f64).powi(2);
            norm += (y as f64).powi(2);
        }
        if norm > 0.0 { err / norm } else { err }
    }

    /// Fails (naming the case) when the NMSE is above `bound` or not a number; prints it either way.
    fn check_nmse(case: &str, a: &[f32], b: &[f32], bound: f64) -> Result<(), String> {
        if let Some(i) = a.iter().position(|v| !v.is_finite()) {
            return Err(format!("{case}: CUDA output {i} is {}", a[i]));
        }
        let e = nmse(a, b);
        println!("    {case}: NMSE {e:.3e} (bound {bound:.0e})");
        if e.is_nan() || e > bound {
            return Err(format!("{case}: NMSE {e:.3e} exceeds {bound:.0e}"));
        }
        Ok(())
    }

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    fn normal_ish(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
        // Sum of uniforms: roughly normal, bounded, deterministic.
        (0..n).map(|_| (r.random::<f32>() + r.random::<f32>() + r.random::<f32>() - 1.5) * scale).collect()
    }

    /// `rows` rows of `cols` random weights quantised to `ty` (llama.cpp's quantisers), and their bytes.
    fn random_matrix(r: &mut ChaCha8Rng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
        let row_bytes = ty.row_bytes(cols).expect("test shapes hold whole blocks");
        let mut bytes = vec![0u8; rows * row_bytes];
        for row in bytes.chunks_exact_mut(row_bytes) {
            let w = normal_ish(r, cols, 0.5);
            quantize_row(ty, &w, row);
        }
        bytes
    }

    /// Row lengths to test per type: not multiples of 8 or 32 for the float types; 1, 3 and 9 blocks
    /// (fewer and more blocks than lanes) for the quantised ones.
    fn widths(ty: GgmlType) -> Vec<usize> {
        match ty.block_size() {
            1 => vec![67, 300, 1029],
            b => vec![b, 3 * b, 9 * b],
        }
    }

    pub fn all() -> Vec<Trial> {
        let mut t = Vec::new();
        t.push(Trial::ignorable_test("compile::compute_90::every_kernel_of_both_policies", compile_all_case));
        for option in [SEEDED_SOFTMAX_NO_MAX, SEEDED_NO_FMA_CONTRACTION] {
            t.push(Trial::ignorable_test(
                format!("compile::compute_90::seeded_variant::{option}"),
                move || compile_variant_case(option, vec![option.to_string()]),
            ));
        }
        // Every tuning knob (MOE_GATE_CUDA_TUNE) away from its shipped value at once, so each loop runs
        // with more or fewer batches than it ships with.
        let tuned = "CHUNK_BATCH=2,DEC_BATCH=8,GU_BATCH=4,DC_BATCH=2,ROUTER_BATCH=4";
        t.push(Trial::ignorable_test(format!("compile::compute_90::tuned::{tuned}"), move || {
            let tuning = Tuning::parse(tuned).map_err(|e| e.to_string())?;
            compile_variant_case(tuned, tuning.nvrtc_options())
        }));
        for ty in GgmlType::ALL {
            for cols in widths(ty) {
                t.push(Trial::ignorable_test(format!("get_rows::{ty}::{cols}"), move || {
                    on_device(|d| get_rows_case(d, ty, cols))
                }));
                for (rows, n_tok) in [(1, 1), (37, 3), (130, 9), (5, 17)] {
                    t.push(Trial::ignorable_test(
                        format!("matvec::{ty}::{rows}x{cols}::t{n_tok}"),
                        move || on_device(|d| matvec_case(d, ty, rows, cols, n_tok)),
                    ));
                }
            }
        }
        t.push(Trial::ignorable_test("compile::errors_carry_the_nvrtc_log", compile_error_case));
        t.push(Trial::ignorable_test("invalid_arguments_are_refused", || on_device(invalid_arguments_case)));
        t.push(Trial::ignorable_test("out_of_memory_is_typed_and_recoverable", || {
            on_device(out_of_memory_case)
        }));
        for (rows, n) in [(1, 5), (3, 64), (7, 1000), (2, 2048)] {
            t.push(Trial::ignorable_test(format!("rmsnorm::{rows}x{n}"), move || {
                on_device(|d| rmsnorm_case(d, rows, n))
            }));
        }
        for (n_tok, n_head, head_dim, pos0, norm) in
            [(1, 4, 16, 0, true), (5, 2, 24, 3, true), (3, 32, 128, 1000, true), (9, 4, 64, 7, false)]
        {
            t.push(Trial::ignorable_test(
                format!("head_norm_rope::t{n_tok}_h{n_head}_d{head_dim}_at{pos0}_norm{norm}"),
                move || on_device(|d| rope_case(d, n_tok, n_head, head_dim, pos0, norm)),
            ));
        }
        for (n_tok, n_head, n_kv, head_dim, pos0) in
            [(1, 4, 2, 16, 0), (5, 4, 2, 16, 0), (1, 32, 4, 128, 70), (37, 4, 1, 24, 3), (8, 8, 8, 256, 11)]
        {
            t.push(Trial::ignorable_test(
                format!("attention::t{n_tok}_h{n_head}_kv{n_kv}_d{head_dim}_at{pos0}"),
                move || on_device(|d| attention_case(d, n_tok, n_head, n_kv, head_dim, pos0)),
            ));
        }
        for (n_tok, n_expert, k, ties) in
            [(1, 8, 2, false), (13, 128, 8, false), (6, 37, 5, false), (4, 16, 4, true)]
        {
            t.push(Trial::ignorable_test(
                format!("softmax_topk::t{n_tok}_e{n_expert}_k{k}_ties{ties}"),
                move || on_device(|d| topk_case(d, n_tok, n_expert, k, ties)),
            ));
        }
        let moe_cases = [
            ("q4_k_m_mix", GgmlType::Q4_K, GgmlType::Q6_K, 256, 256, 8, 2, 11),
            ("q8_0_odd", GgmlType::Q8_0, GgmlType::Q8_0, 96, 160, 7, 3, 9),
            ("f32_odd", GgmlType::F32, GgmlType::F32, 45, 70, 5, 2, 6),
            ("q5_k_wide", GgmlType::Q5_K, GgmlType::Q5_K, 512, 256, 16, 4, 20),
        ];
        for (name, ty_gu, ty_down, hidden, ffn, n_expert, k, n_tok) in moe_cases {
            t.push(Trial::ignorable_test(format!("moe::{name}"), move || {
                on_device(|d| moe_case(d, MoeShape { ty_gu, ty_down, hidden, ffn, n_expert, k, n_tok }))
            }));
        }
        let qkv_cases = [
            ("q4_k_m_mix", GgmlType::Q4_K, GgmlType::Q6_K, 512, 272, 40),
            ("q8_0", GgmlType::Q8_0, GgmlType::Q8_0, 256, 64, 33),
            ("f32_odd", GgmlType::F32, GgmlType::F32, 300, 48, 17),
        ];
        for (name, ty_qk, ty_v, hidden, nq, nkv) in qkv_cases {
            t.push(Trial::ignorable_test(format!("decode_fused::norm_qkv::{name}"), move || {
                on_device(|d| norm_qkv_case(d, (ty_qk, ty_v), hidden, nq, nkv))
            }));
        }
        for (ty, hidden, n_expert, k) in [(GgmlType::F32, 512, 128, 8), (GgmlType::Q8_0, 256, 37, 5)] {
            t.push(Trial::ignorable_test(
                format!("decode_fused::norm_router_topk::{ty}_e{n_expert}_k{k}"),
                move || on_device(|d| norm_router_case(d, ty, hidden, n_expert, k)),
            ));
        }
        if let Err(reason) = device() {
            eprintln!("CUDA kernel tests: no usable CUDA here, the device cases are ignored: {reason}");
        } else if let Ok(d) = device() {
            eprintln!("CUDA kernel tests on {}", d.info());
        }
        t
    }

    /// The device's dequantisation is bit-identical to the CPU's (both are ggml's f32 formulas, rounded
    /// operation by operation). Looks up rows in a shuffled order, with repeats.
    fn get_rows_case(d: &CudaDevice, ty: GgmlType, cols: usize) -> Result<(), String> {
        let mut r = rng(cols as u64 * 31 + ty.ggml_id() as u64);
        let rows = 11;
        let bytes = random_matrix(&mut r, ty, rows, cols);
        let w = d.upload_matrix(ty, cols, rows, 1, &bytes).map_err(cuda)?;
        let ids: Vec<i32> = vec![3, 0, 10, 3, 7, 1];
        let ids_d = d.upload(&ids).map_err(cuda)?;
        let mut out = d.alloc_zeros::<f32>(ids.len() * cols).map_err(cuda)?;
        d.get_rows(&w, ids_d.as_slice(), out.as_mut()).map_err(cuda)?;
        let got = d.download(out.as_slice()).map_err(cuda)?;
        let row_bytes = ty.row_bytes(cols).unwrap();
        for (t, &id) in ids.iter().enumerate() {
            let mut want = vec![0f32; cols];
            dequantize_row(ty, &bytes[id as usize * row_bytes..(id as usize + 1) * row_bytes], &mut want);
            let have = &got[t * cols..(t + 1) * cols];
            if let Some(i) = (0..cols).find(|&i| have[i].to_bits() != want[i].to_bits()) {
                return Err(format!("row {id} weight {i}: CUDA {} vs CPU {}", have[i], want[i]));
            }
        }
        // An id outside the table reads nothing and yields NaN.
        let bad = d.upload(&[rows as i32]).map_err(cuda)?;
        d.get_rows(&w, bad.as_slice(), out.slice_mut(0..cols).map_err(cuda)?).map_err(cuda)?;
        let got = d.download(out.slice(0..cols).map_err(cuda)?).map_err(cuda)?;
        if !got.iter().all(|v| v.is_nan()) {
            return Err("an out-of-range id did not give NaN".into());
        }
        Ok(())
    }

    /// `y = W x` for several tokens against `dot_row`, then accumulated on top of a non-zero `y`.
    fn matvec_case(
        d: &CudaDevice,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        n_tok: usize,
    ) -> Result<(), String> {
        let mut r = rng((rows * 1000 + cols * 7 + n_tok) as u64 + ty.ggml_id() as u64);
        let bytes = random_matrix(&mut r, ty, rows, cols);
        let x = normal_ish(&mut r, n_tok * cols, 1.0);
        let y0 = normal_ish(&mut r, n_tok * rows, 1.0);
        let w = d.upload_matrix(ty, cols, rows, 1, &bytes).map_err(cuda)?;
        let xd = d.upload(&x).map_err(cuda)?;
        let mut yd = d.alloc_zeros::<f32>(n_tok * rows).map_err(cuda)?;
        d.matvec(&w, xd.as_slice(), n_tok, yd.as_mut(), false).map_err(cuda)?;
        let got = d.download(yd.as_slice()).map_err(cuda)?;
        let row_bytes = ty.row_bytes(cols).unwrap();
        let mut want = vec![0f32; n_tok * rows];
        for t in 0..n_tok {
            for o in 0..rows {
                want[t * rows + o] =
                    dot_row(ty, &bytes[o * row_bytes..(o + 1) * row_bytes], &x[t * cols..(t + 1) * cols]);
            }
        }
        check_nmse(&format!("matvec {ty} {rows}x{cols} t{n_tok}"), &got, &want, NMSE_DOT)?;
        let mut yd = d.upload(&y0).map_err(cuda)?;
        d.matvec(&w, xd.as_slice(), n_tok, yd.as_mut(), true).map_err(cuda)?;
        let got = d.download(yd.as_slice()).map_err(cuda)?;
        let want: Vec<f32> = want.iter().zip(&y0).map(|(a, b)| a + b).collect();
        check_nmse(&format!("matvec+= {ty} {rows}x{cols} t{n_tok}"), &got, &want, NMSE_DOT)
    }

    /// The whole program (every `.cu` part, the `fast` and the `exact` kernels) compiles for compute_90
    /// through the same `compile_program` a device uses, and its PTX has an entry for every kernel a
    /// device looks up (`kernel_entry_names`). Needs only NVRTC.
    fn compile_all_case() -> Outcome {
        let ptx = match compile_program("compute_90") {
            Ok(ptx) => ptx,
            Err(e) if e.is_unavailable() => return without_nvrtc(e),
            Err(e) => return Err(e.to_string().into()),
        };
        let names = kernel_entry_names();
        let missing: Vec<&String> = names.iter().filter(|n| !ptx.contains(&format!(".entry {n}("))).collect();
        if !missing.is_empty() {
            return Err(format!("the PTX lacks the entries {missing:?}").into());
        }
        println!("    compute_90: {} kernels compiled, {} bytes of PTX", names.len(), ptx.len());
        // For kernel tuning: `ptxas -arch=sm_90 -v FILE` on a machine with the CUDA toolkit then lists each
        // kernel's registers and spills (docs/benchmarks.md).
        if let Some(path) = std::env::var_os("MOE_GATE_PTX_OUT") {
            std::fs::write(&path, &ptx).map_err(|e| format!("writing the PTX to {path:?}: {e}"))?;
        }
        Ok(Completion::Completed)
    }

    /// A compile variant (the options a seeded defect asks for, `moe_engine::defect`, selftest only; or a
    /// tuning's defines) compiles too, with every entry, and differs from the shipped program's PTX (the
    /// options changed something).
    fn compile_variant_case(option: &str, options: Vec<String>) -> Outcome {
        let options: Vec<&str> = options.iter().map(String::as_str).collect();
        let (shipped, variant) =
            match (compile_program("compute_90"), compile_program_variant("compute_90", &options)) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(e), _) | (_, Err(e)) if e.is_unavailable() => return without_nvrtc(e),
                (Err(e), _) | (_, Err(e)) => return Err(e.to_string().into()),
            };
        let names = kernel_entry_names();
        let missing: Vec<&String> =
            names.iter().filter(|n| !variant.contains(&format!(".entry {n}("))).collect();
        if !missing.is_empty() {
            return Err(format!("{option}: the PTX lacks the entries {missing:?}").into());
        }
        if variant == shipped {
            return Err(format!("{option}: the variant's PTX equals the shipped program's").into());
        }
        Ok(Completion::Completed)
    }

    /// "No NVRTC here": ignored with the reason, or failed where `MOE_GATE_REQUIRE_NVRTC` says NVRTC was
    /// installed (CI), so a compile check cannot pass by skipping.
    fn without_nvrtc(e: CudaError) -> Outcome {
        if std::env::var(REQUIRE_NVRTC_ENV).is_ok_and(|v| v != "0") {
            Err(format!("{REQUIRE_NVRTC_ENV} is set but NVRTC is not usable: {e}").into())
        } else {
            Ok(Completion::ignored_with(e.to_string()))
        }
    }

    /// Inconsistent lengths and misaligned activations are refused on the host, before any launch.
    /// A program NVRTC rejects comes back as `CudaError::Compile` whose log names the program, the line
    /// and the offending identifier (issue 5: "kernel compile errors surface with the NVRTC log").
    fn compile_error_case() -> Outcome {
        let src = "extern \"C\" __global__ void k(float* y) {\n    y[0] = not_declared_anywhere;\n}\n";
        match compile_source("broken_probe.cu", src, "compute_90") {
            Err(e) if e.is_unavailable() => without_nvrtc(e),
            Err(CudaError::Compile { program, log, .. }) => {
                let message = CudaError::Compile {
                    program: program.clone(),
                    arch: "compute_90".into(),
                    status: String::new(),
                    log: log.clone(),
                }
                .to_string();
                let expected = ["broken_probe.cu(2)", "not_declared_anywhere"];
                if program == "broken_probe.cu"
                    && expected.iter().all(|s| log.contains(s) && message.contains(s))
                {
                    Ok(Completion::Completed)
                } else {
                    Err(format!("the compile error lacks {expected:?}: program {program}, log:\n{log}")
                        .into())
                }
            }
            Err(other) => Err(format!("expected a Compile error, got {other:?}").into()),
            Ok(_) => Err("NVRTC accepted a program that uses an undeclared identifier".into()),
        }
    }

    /// An allocation of twice the device's memory is `CudaError::OutOfMemory` naming the stage and the
    /// sizes, not a panic, and the device works afterwards (the context is not poisoned).
    fn out_of_memory_case(d: &CudaDevice) -> Result<(), String> {
        let (_, total) = d.memory().map_err(cuda)?;
        let values = 2 * total / size_of::<f32>();
        match d.alloc_zeros::<f32>(values) {
            Err(CudaError::OutOfMemory { stage, bytes, total: reported, .. }) => {
                if bytes != values * size_of::<f32>() || reported != total || stage.is_empty() {
                    return Err(format!("OutOfMemory with stage {stage:?}, {bytes} bytes of {reported}"));
                }
            }
            Err(other) => return Err(format!("expected OutOfMemory, got {other:?}")),
            Ok(_) => return Err(format!("an allocation of {} bytes succeeded", values * 4)),
        }
        rmsnorm_case(d, 3, 64).map_err(|e| format!("after the failed allocation: {e}"))
    }

    fn invalid_arguments_case(d: &CudaDevice) -> Result<(), String> {
        let mut r = rng(7);
        let (rows, cols) = (4, 256);
        let w = d
            .upload_matrix(GgmlType::Q4_K, cols, rows, 1, &random_matrix(&mut r, GgmlType::Q4_K, rows, cols))
            .map_err(cuda)?;
        let x = d.upload(&normal_ish(&mut r, 2 * cols + 1, 1.0)).map_err(cuda)?;
        let mut y = d.alloc_zeros::<f32>(2 * rows).map_err(cuda)?;
        let refused = |res: Result<(), CudaError>, what: &str| match res {
            Err(CudaError::InvalidArgument { .. }) => Ok(()),
            other => Err(format!("{what}: expected InvalidArgument, got {other:?}")),
        };
        let x_short = x.slice(0..cols).map_err(cuda)?;
        refused(d.matvec(&w, x_short, 2, y.as_mut(), false), "x shorter than 2 tokens")?;
        let x_odd = x.slice(1..2 * cols + 1).map_err(cuda)?;
        refused(d.matvec(&w, x_odd, 2, y.as_mut(), false), "misaligned activations")?;
        let y_short = y.slice_mut(0..rows).map_err(cuda)?;
        refused(d.matvec(&w, x.slice(0..2 * cols).map_err(cuda)?, 2, y_short, false), "y too short")?;
        if d.upload_matrix(GgmlType::Q4_K, 100, 1, 1, &[0u8; 144]).is_ok() {
            return Err("a row of 100 Q4_K weights was accepted".into());
        }
        #[allow(clippy::reversed_empty_ranges)] // a reversed range is one of the bad inputs
        let reversed = 5..3;
        if x.slice(reversed).is_ok() || x.slice(0..2 * cols + 2).is_ok() {
            return Err("an out-of-range view was accepted".into());
        }
        Ok(())
    }

    fn rmsnorm_case(d: &CudaDevice, rows: usize, n: usize) -> Result<(), String> {
        let mut r = rng((rows * 7919 + n) as u64);
        let x = normal_ish(&mut r, rows * n, 2.0);
        let w: Vec<f32> = normal_ish(&mut r, n, 0.2).iter().map(|v| 1.0 + v).collect();
        let eps = 1e-6f32;
        let (xd, wd) = (d.upload(&x).map_err(cuda)?, d.upload(&w).map_err(cuda)?);
        let mut out = d.alloc_zeros::<f32>(rows * n).map_err(cuda)?;
        d.rmsnorm(xd.as_slice(), wd.as_slice(), rows, n, eps, out.as_mut()).map_err(cuda)?;
        let got = d.download(out.as_slice()).map_err(cuda)?;
        let mut want = vec![0f32; rows * n];
        for (xr, o) in x.chunks_exact(n).zip(want.chunks_exact_mut(n)) {
            rms_norm(xr, &w, eps, o);
        }
        check_nmse(&format!("rmsnorm {rows}x{n}"), &got, &want, NMSE_ELEMENTWISE)
    }

    /// Fails unless `a` and `b` are the same bits, naming the first difference.
    fn check_bits(case: &str, a: &[f32], b: &[f32]) -> Result<(), String> {
        match a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits()) {
            None if a.len() == b.len() => Ok(()),
            None => Err(format!("{case}: {} values against {}", a.len(), b.len())),
            Some(i) => Err(format!("{case}: value {i} is {} fused against {} unfused", a[i], b[i])),
        }
    }

    /// The fused decode kernel `norm_qkv` against the four launches it replaces (rmsnorm, matvec of q,
    /// matvec_to_row of k and v at cache row 5 of 7): the same bits, by construction (same code paths).
    fn norm_qkv_case(
        d: &CudaDevice,
        (ty_qk, ty_v): (GgmlType, GgmlType),
        hidden: usize,
        nq: usize,
        nkv: usize,
    ) -> Result<(), String> {
        let (max_pos, pos) = (7, 5);
        let mut r = rng((hidden * 31 + nq * 7 + nkv) as u64 + ty_v.ggml_id() as u64);
        let x = normal_ish(&mut r, hidden, 2.0);
        let norm: Vec<f32> = normal_ish(&mut r, hidden, 0.2).iter().map(|v| 1.0 + v).collect();
        let q_w =
            d.upload_matrix(ty_qk, hidden, nq, 1, &random_matrix(&mut r, ty_qk, nq, hidden)).map_err(cuda)?;
        let k_w = d
            .upload_matrix(ty_qk, hidden, nkv, 1, &random_matrix(&mut r, ty_qk, nkv, hidden))
            .map_err(cuda)?;
        let v_w =
            d.upload_matrix(ty_v, hidden, nkv, 1, &random_matrix(&mut r, ty_v, nkv, hidden)).map_err(cuda)?;
        let (xd, nd) = (d.upload(&x).map_err(cuda)?, d.upload(&norm).map_err(cuda)?);
        let pos_d = d.upload(&[pos as i32]).map_err(cuda)?;
        let eps = 1e-6f32;
        let run = |fused: bool| -> Result<Vec<Vec<f32>>, CudaError> {
            let mut h = d.alloc_zeros::<f32>(hidden)?;
            let mut q = d.alloc_zeros::<f32>(nq)?;
            let (mut kc, mut vc) =
                (d.alloc_zeros::<f32>(max_pos * nkv)?, d.alloc_zeros::<f32>(max_pos * nkv)?);
            if fused {
                let caches = (kc.as_mut(), vc.as_mut());
                let w = (&q_w, &k_w, &v_w);
                d.norm_qkv(
                    xd.as_slice(),
                    nd.as_slice(),
                    eps,
                    h.as_mut(),
                    w,
                    q.as_mut(),
                    caches,
                    max_pos,
                    pos_d.as_slice(),
                )?;
            } else {
                d.rmsnorm(xd.as_slice(), nd.as_slice(), 1, hidden, eps, h.as_mut())?;
                d.matvec(&q_w, h.as_slice(), 1, q.as_mut(), false)?;
                d.matvec_to_row(&k_w, h.as_slice(), kc.as_mut(), max_pos, pos_d.as_slice())?;
                d.matvec_to_row(&v_w, h.as_slice(), vc.as_mut(), max_pos, pos_d.as_slice())?;
            }
            [h, q, kc, vc].iter().map(|b| d.download(b.as_slice())).collect()
        };
        if !d.has_norm_qkv(&q_w, &k_w, &v_w) {
            return Err(format!("no fused kernel for {ty_qk} / {ty_v}"));
        }
        let (fused, plain) = (run(true).map_err(cuda)?, run(false).map_err(cuda)?);
        for (what, (a, b)) in ["h", "q", "k cache", "v cache"].iter().zip(fused.iter().zip(&plain)) {
            check_bits(&format!("norm_qkv {ty_qk}/{ty_v} {what}"), a, b)?;
        }
        if plain[2][pos * nkv..(pos + 1) * nkv].iter().all(|&v| v == 0.0) {
            return Err("the k row was not written".into());
        }
        Ok(())
    }

    /// h, logits, expert ids and weights of one router launch.
    type RouterOutputs = (Vec<f32>, Vec<f32>, Vec<i32>, Vec<f32>);

    /// The fused decode kernel `norm_router_topk` against rmsnorm then router_topk: the same bits in h,
    /// the logits, the chosen experts and their weights; run twice, so its counter was left at 0.
    fn norm_router_case(
        d: &CudaDevice,
        ty: GgmlType,
        hidden: usize,
        n_expert: usize,
        k: usize,
    ) -> Result<(), String> {
        let mut r = rng((hidden * 13 + n_expert * 3 + k) as u64);
        let x = normal_ish(&mut r, hidden, 2.0);
        let norm: Vec<f32> = normal_ish(&mut r, hidden, 0.2).iter().map(|v| 1.0 + v).collect();
        let w = d
            .upload_matrix(ty, hidden, n_expert, 1, &random_matrix(&mut r, ty, n_expert, hidden))
            .map_err(cuda)?;
        let (xd, nd) = (d.upload(&x).map_err(cuda)?, d.upload(&norm).map_err(cuda)?);
        let eps = 1e-6f32;
        let mut counter = d.alloc_zeros::<i32>(1).map_err(cuda)?;
        let mut run = |fused: bool| -> Result<RouterOutputs, CudaError> {
            let mut h = d.alloc_zeros::<f32>(hidden)?;
            let mut logits = d.alloc_zeros::<f32>(n_expert)?;
            let (mut ids, mut wts) = (d.alloc_zeros::<i32>(k)?, d.alloc_zeros::<f32>(k)?);
            if fused {
                let (x, n) = (xd.as_slice(), nd.as_slice());
                d.norm_router_topk(
                    x,
                    n,
                    eps,
                    h.as_mut(),
                    &w,
                    logits.as_mut(),
                    (k, true),
                    ids.as_mut(),
                    wts.as_mut(),
                    counter.as_mut(),
                )?;
            } else {
                d.rmsnorm(xd.as_slice(), nd.as_slice(), 1, hidden, eps, h.as_mut())?;
                d.router_topk(
                    &w,
                    h.as_slice(),
                    logits.as_mut(),
                    k,
                    true,
                    ids.as_mut(),
                    wts.as_mut(),
                    counter.as_mut(),
                )?;
            }
            let got = (d.download(h.as_slice())?, d.download(logits.as_slice())?);
            Ok((got.0, got.1, d.download(ids.as_slice())?, d.download(wts.as_slice())?))
        };
        let plain = run(false).map_err(cuda)?;
        for round in 0..2 {
            let fused = run(true).map_err(cuda)?;
            let case = format!("norm_router_topk {ty} e{n_expert} k{k} round {round}");
            check_bits(&format!("{case} h"), &fused.0, &plain.0)?;
            check_bits(&format!("{case} logits"), &fused.1, &plain.1)?;
            check_bits(&format!("{case} weights"), &fused.3, &plain.3)?;
            if fused.2 != plain.2 {
                return Err(format!("{case}: experts {:?} against {:?}", fused.2, plain.2));
            }
        }
        Ok(())
    }

    fn rope_case(
        d: &CudaDevice,
        n_tok: usize,
        n_head: usize,
        head_dim: usize,
        pos0: usize,
        norm: bool,
    ) -> Result<(), String> {
        let theta = 1e6;
        let mut r = rng((n_tok * 131 + n_head * 17 + head_dim + pos0) as u64);
        // Rows wider than the heads, to exercise the row stride (as for keys in the KV cache).
        let stride = n_head * head_dim + 3;
        let x = normal_ish(&mut r, n_tok * stride, 1.5);
        let w: Vec<f32> = normal_ish(&mut r, head_dim, 0.2).iter().map(|v| 1.0 + v).collect();
        let eps = 1e-6f32;
        let table = RopeTable::<f32>::new(head_dim, theta);
        let inv_freq: Vec<f64> =
            (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64)).collect();
        let mut xd = d.upload(&x).map_err(cuda)?;
        let (wd, fd) = (d.upload(&w).map_err(cuda)?, d.upload(&inv_freq).map_err(cuda)?);
        let n = norm.then(|| (wd.as_slice(), eps));
        d.head_norm_rope(xd.as_mut(), stride, n_tok, n_head, head_dim, n, pos0, fd.as_slice())
            .map_err(cuda)?;
        let got = d.download(xd.as_slice()).map_err(cuda)?;
        let mut table = table;
        table.ensure(pos0 + n_tok);
        let mut want = x.clone();
        for t in 0..n_tok {
            for h in 0..n_head {
                let s = t * stride + h * head_dim;
                let head = &mut want[s..s + head_dim];
                if norm {
                    let src = head.to_vec();
                    rms_norm(&src, &w, eps, head);
                }
                table.apply(head, pos0 + t);
            }
        }
        check_nmse(
            &format!("head_norm_rope t{n_tok} h{n_head} d{head_dim} at{pos0}"),
            &got,
            &want,
            NMSE_ELEMENTWISE,
        )
    }

    fn attention_case(
        d: &CudaDevice,
        n_tok: usize,
        n_head: usize,
        n_kv: usize,
        head_dim: usize,
        pos0: usize,
    ) -> Result<(), String> {
        let mut r = rng((n_tok * 7 + n_head * 131 + n_kv * 17 + head_dim + pos0 * 3) as u64);
        let n_pos = pos0 + n_tok;
        let kv_dim = n_kv * head_dim;
        let q = normal_ish(&mut r, n_tok * n_head * head_dim, 1.0);
        let keys = normal_ish(&mut r, n_pos * kv_dim, 1.0);
        let values = normal_ish(&mut r, n_pos * kv_dim, 1.0);
        let scale = (1.0 / (head_dim as f64).sqrt()) as f32;
        let (qd, kd, vd) =
            (d.upload(&q).map_err(cuda)?, d.upload(&keys).map_err(cuda)?, d.upload(&values).map_err(cuda)?);
        let mut out = d.alloc_zeros::<f32>(q.len()).map_err(cuda)?;
        let shape = AttentionShape { n_tok, n_head, n_kv_head: n_kv, head_dim, pos0 };
        d.attention(qd.as_slice(), kd.as_slice(), vd.as_slice(), out.as_mut(), shape, scale).map_err(cuda)?;
        let got = d.download(out.as_slice()).map_err(cuda)?;
        let mut want = vec![0f32; q.len()];
        let mut scores = Vec::new();
        for t in 0..n_tok {
            for h in 0..n_head {
                let kvh = h / (n_head / n_kv);
                let kv = KvView { keys: &keys, values: &values, row_width: kv_dim, offset: kvh * head_dim };
                let s = (t * n_head + h) * head_dim;
                causal_attention_head(
                    &q[s..s + head_dim],
                    kv,
                    pos0 + t + 1,
                    scale,
                    &mut scores,
                    &mut want[s..s + head_dim],
                );
            }
        }
        check_nmse(
            &format!("attention t{n_tok} h{n_head} kv{n_kv} d{head_dim} at{pos0}"),
            &got,
            &want,
            NMSE_ATTENTION,
        )
    }

    /// Ids must match exactly, weights to rounding. With `ties`, every token's logits repeat a few values,
    /// so equal probabilities meet at the top-k boundary and the lower index must win on both sides.
    fn topk_case(d: &CudaDevice, n_tok: usize, n_expert: usize, k: usize, ties: bool) -> Result<(), String> {
        let mut r = rng((n_tok * 1000 + n_expert * 10 + k) as u64);
        let logits: Vec<f32> = if ties {
            (0..n_tok * n_expert).map(|_| (r.random_range(0..3u32)) as f32 * 0.5).collect()
        } else {
            normal_ish(&mut r, n_tok * n_expert, 3.0)
        };
        let ld = d.upload(&logits).map_err(cuda)?;
        let mut ids = d.alloc_zeros::<i32>(n_tok * k).map_err(cuda)?;
        let mut wts = d.alloc_zeros::<f32>(n_tok * k).map_err(cuda)?;
        d.softmax_topk(ld.as_slice(), n_tok, n_expert, k, true, ids.as_mut(), wts.as_mut()).map_err(cuda)?;
        let got_ids = d.download(ids.as_slice()).map_err(cuda)?;
        let got_w = d.download(wts.as_slice()).map_err(cuda)?;
        let mut want_w = vec![0f32; n_tok * k];
        let mut probs = vec![0f32; n_expert];
        for t in 0..n_tok {
            let mut experts = vec![0u32; k];
            route(
                &logits[t * n_expert..(t + 1) * n_expert],
                true,
                &mut probs,
                &mut experts,
                &mut want_w[t * k..(t + 1) * k],
            );
            let got: Vec<u32> = got_ids[t * k..(t + 1) * k].iter().map(|&e| e as u32).collect();
            if got != experts {
                return Err(format!("token {t}: CUDA chose {got:?}, CPU {experts:?}"));
            }
        }
        check_nmse(
            &format!("softmax_topk weights t{n_tok} e{n_expert} k{k}"),
            &got_w,
            &want_w,
            NMSE_ELEMENTWISE,
        )
    }

    #[derive(Clone, Copy)]
    struct MoeShape {
        ty_gu: GgmlType,
        ty_down: GgmlType,
        hidden: usize,
        ffn: usize,
        n_expert: usize,
        k: usize,
        n_tok: usize,
    }

    /// A whole MoE block after the router: experts chosen on the device from router logits in which token
    /// t strongly prefers expert t mod E (so every expert is selected at least once), then gate, up (with
    /// SwiGLU), down and the weighted sum added to x, by both schedules (per slot and grouped by expert),
    /// against the CPU composition of `route`, `dot_row` and `silu`. The two schedules must agree bit for
    /// bit: they run the same arithmetic per output.
    fn moe_case(d: &CudaDevice, s: MoeShape) -> Result<(), String> {
        let MoeShape { ty_gu, ty_down, hidden, ffn, n_expert, k, n_tok } = s;
        if n_tok < n_expert {
            return Err("the case must have at least one token per expert".into());
        }
        let mut r = rng((hidden * 13 + ffn * 7 + n_expert * 3 + k + n_tok) as u64);
        let gate_w = random_matrix(&mut r, ty_gu, n_expert * ffn, hidden);
        let up_w = random_matrix(&mut r, ty_gu, n_expert * ffn, hidden);
        let down_w = random_matrix(&mut r, ty_down, n_expert * hidden, ffn);
        let h = normal_ish(&mut r, n_tok * hidden, 1.0);
        let x0 = normal_ish(&mut r, n_tok * hidden, 1.0);
        let mut logits = normal_ish(&mut r, n_tok * n_expert, 1.0);
        for t in 0..n_tok {
            logits[t * n_expert + t % n_expert] += 8.0;
        }
        let slots = n_tok * k;

        let gd = d.upload_matrix(ty_gu, hidden, ffn, n_expert, &gate_w).map_err(cuda)?;
        let ud = d.upload_matrix(ty_gu, hidden, ffn, n_expert, &up_w).map_err(cuda)?;
        let dd = d.upload_matrix(ty_down, ffn, hidden, n_expert, &down_w).map_err(cuda)?;
        let (hd, ld) = (d.upload(&h).map_err(cuda)?, d.upload(&logits).map_err(cuda)?);
        let mut ids = d.alloc_zeros::<i32>(slots).map_err(cuda)?;
        let mut wts = d.alloc_zeros::<f32>(slots).map_err(cuda)?;
        d.softmax_topk(ld.as_slice(), n_tok, n_expert, k, true, ids.as_mut(), wts.as_mut()).map_err(cuda)?;
        let mut groups = d.expert_groups(n_expert, slots).map_err(cuda)?;
        d.moe_group(ids.as_slice(), slots, &mut groups).map_err(cuda)?;

        let mut results = Vec::new();
        for grouped in [false, true] {
            let routing =
                if grouped { Routing::Grouped(&groups) } else { Routing::PerSlot { ids: ids.as_slice() } };
            let mut gate = d.alloc_zeros::<f32>(slots * ffn).map_err(cuda)?;
            let mut act = d.alloc_zeros::<f32>(slots * ffn).map_err(cuda)?;
            let mut out = d.alloc_zeros::<f32>(slots * hidden).map_err(cuda)?;
            let mut x = d.upload(&x0).map_err(cuda)?;
            d.moe_matvec(&gd, hd.as_slice(), k, routing, slots, gate.as_mut(), None).map_err(cuda)?;
            d.moe_matvec(&ud, hd.as_slice(), k, routing, slots, act.as_mut(), Some(gate.as_slice()))
                .map_err(cuda)?;
            d.moe_matvec(&dd, act.as_slice(), 1, routing, slots, out.as_mut(), None).map_err(cuda)?;
            d.moe_combine(
                out.as_slice(),
                ids.as_slice(),
                wts.as_slice(),
                n_tok,
                k,
                hidden,
                n_expert,
                x.as_mut(),
            )
            .map_err(cuda)?;
            results.push(d.download(x.as_slice()).map_err(cuda)?);
        }

        // The CPU composition.
        let (gu_rb, down_rb) = (ty_gu.row_bytes(hidden).unwrap(), ty_down.row_bytes(ffn).unwrap());
        let mut want = x0.clone();
        let mut seen = vec![false; n_expert];
        let mut probs = vec![0f32; n_expert];
        for t in 0..n_tok {
            let ht = &h[t * hidden..(t + 1) * hidden];
            let (mut experts, mut weights) = (vec![0u32; k], vec![0f32; k]);
            route(&logits[t * n_expert..(t + 1) * n_expert], true, &mut probs, &mut experts, &mut weights);
            let mut sum = vec![0f32; hidden];
            for (&e, &wt) in experts.iter().zip(&weights) {
                let e = e as usize;
                seen[e] = true;
                let act: Vec<f32> = (0..ffn)
                    .map(|f| {
                        let row = (e * ffn + f) * gu_rb;
                        let g = dot_row(ty_gu, &gate_w[row..row + gu_rb], ht);
                        let u = dot_row(ty_gu, &up_w[row..row + gu_rb], ht);
                        silu(g) * u
                    })
                    .collect();
                for (o, s) in sum.iter_mut().enumerate() {
                    let row = (e * hidden + o) * down_rb;
                    *s += wt * dot_row(ty_down, &down_w[row..row + down_rb], &act);
                }
            }
            for (xv, s) in want[t * hidden..(t + 1) * hidden].iter_mut().zip(&sum) {
                *xv += s;
            }
        }
        if let Some(e) = seen.iter().position(|&s| !s) {
            return Err(format!("expert {e} was never selected: the case does not cover every expert"));
        }
        check_nmse(
            &format!("moe per-slot {ty_gu}/{ty_down} e{n_expert} k{k} t{n_tok}"),
            &results[0],
            &want,
            NMSE_DOT,
        )?;
        check_nmse(
            &format!("moe grouped {ty_gu}/{ty_down} e{n_expert} k{k} t{n_tok}"),
            &results[1],
            &want,
            NMSE_DOT,
        )?;
        if let Some(i) = (0..want.len()).find(|&i| results[0][i].to_bits() != results[1][i].to_bits()) {
            return Err(format!(
                "per-slot and grouped schedules differ at {i}: {} vs {}",
                results[0][i], results[1][i]
            ));
        }
        Ok(())
    }
}
