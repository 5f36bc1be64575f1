//! The `exact` kernels (`exact.cu`) against their CPU twins, bit for bit: the canonical operation order
//! of `docs/numerics.md` makes every result the CPU's, so each case compares f32 bit patterns (no
//! tolerance). Cases use sizes that are not multiples of the lanes, warps or blocks, mixed magnitudes
//! (so a different summation order would show), and ties for the router.
//!
//! Where no CUDA driver, NVRTC or device is found, each device case is reported as ignored with the reason
//! (CI has no GPU), never as passed. `compile::exact_kernels_have_no_fma` needs only NVRTC (CI installs
//! it: `.ci/run`), and fails instead of being ignored where `MOE_GATE_REQUIRE_NVRTC` is set.
//! Run on a GPU machine: `cargo test -p moe-kernels --features cuda --test cuda_exact`.

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    #[cfg(feature = "cuda")]
    let trials = cases::all();
    #[cfg(not(feature = "cuda"))]
    let trials = vec![libtest_mimic::Trial::ignorable_test("cuda_exact_kernels", || {
        Ok(libtest_mimic::Completion::ignored_with(
            "built without the `cuda` feature: run with --features cuda",
        ))
    })];
    libtest_mimic::run(&args, trials).exit();
}

#[cfg(feature = "cuda")]
mod cases {
    use libtest_mimic::{Completion, Failed, Trial};

    use moe_kernels::GgmlType;
    use moe_kernels::cpu::{KvView, RopeTable, causal_attention_head, exp_f32, rms_norm, route, silu};
    use moe_kernels::cuda::{
        AttentionShape, CudaDevice, CudaError, ExactRows, REQUIRE_NVRTC_ENV, compile_program,
    };
    use moe_kernels::quant::{dot_row, quantize_row};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    type Outcome = Result<Completion, Failed>;

    /// A device case: panics (an assertion) fail it.
    type DeviceCase = fn(&CudaDevice);

    /// Every case: the PTX check (NVRTC only), then the device cases.
    pub fn all() -> Vec<Trial> {
        let device_cases: [(&str, DeviceCase); 7] = [
            ("exp_is_the_cpus_bit_for_bit", exp_is_the_cpus_bit_for_bit),
            (
                "matvec_is_dot_row_bit_for_bit_for_every_format",
                matvec_is_dot_row_bit_for_bit_for_every_format,
            ),
            (
                "routed_slots_with_swiglu_and_combine_are_the_cpus_bit_for_bit",
                routed_slots_with_swiglu_and_combine_are_the_cpus_bit_for_bit,
            ),
            ("rmsnorm_is_the_cpus_bit_for_bit", rmsnorm_is_the_cpus_bit_for_bit),
            ("head_norm_rope_is_the_cpus_bit_for_bit", head_norm_rope_is_the_cpus_bit_for_bit),
            ("attention_is_the_cpus_bit_for_bit", attention_is_the_cpus_bit_for_bit),
            ("router_is_the_cpus_bit_for_bit_including_ties", router_is_the_cpus_bit_for_bit_including_ties),
        ];
        let mut t =
            vec![Trial::ignorable_test("compile::exact_kernels_have_no_fma", exact_kernels_have_no_fma)];
        t.extend(
            device_cases.into_iter().map(|(name, case)| Trial::ignorable_test(name, move || on_device(case))),
        );
        t
    }

    /// Runs `case` on device 0 (a panic fails it), or ignores it with the reason where there is no CUDA.
    fn on_device(case: DeviceCase) -> Outcome {
        match CudaDevice::get(0) {
            Ok(d) => {
                case(&d);
                Ok(Completion::Completed)
            }
            Err(e) if e.is_unavailable() => Ok(Completion::ignored_with(e.to_string())),
            Err(e) => Err(e.to_string().into()),
        }
    }

    fn cuda(e: CudaError) -> String {
        e.to_string()
    }

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    /// Values spread over several orders of magnitude, both signs: sums of them depend on the order.
    fn mixed(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| (r.random::<f32>() - 0.5) * scale * 10f32.powi(r.random_range(-2..3))).collect()
    }

    /// Fails naming the first index whose bits differ.
    fn same_bits(case: &str, got: &[f32], want: &[f32]) -> Result<(), String> {
        if got.len() != want.len() {
            return Err(format!("{case}: {} values vs {}", got.len(), want.len()));
        }
        match (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
            Some(i) => Err(format!("{case}: value {i}: CUDA {:e} vs CPU {:e}", got[i], want[i])),
            None => Ok(()),
        }
    }

    fn random_matrix(r: &mut ChaCha8Rng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
        let row_bytes = ty.row_bytes(cols).expect("whole blocks");
        let mut bytes = vec![0u8; rows * row_bytes];
        for row in bytes.chunks_exact_mut(row_bytes) {
            quantize_row(ty, &mixed(r, cols, 1.0), row);
        }
        bytes
    }

    /// The exact kernels' PTX has no fused multiply-add and no approximate or flush-to-zero operation:
    /// compiled through `compile_program`, as a device compiles them.
    fn exact_kernels_have_no_fma() -> Outcome {
        let ptx = match compile_program("compute_90") {
            Ok(p) => p,
            Err(e) if e.is_unavailable() => {
                return if std::env::var(REQUIRE_NVRTC_ENV).is_ok_and(|v| v != "0") {
                    Err(format!("{REQUIRE_NVRTC_ENV} is set but NVRTC is not usable: {e}").into())
                } else {
                    Ok(Completion::ignored_with(e.to_string()))
                };
            }
            Err(e) => return Err(e.to_string().into()),
        };
        let mut exact = 0;
        for entry in ptx.split(".entry ").skip(1) {
            let name: String = entry.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if name.contains("_exact") {
                exact += 1;
                // Any fused multiply-add would round a product and a sum once instead of twice.
                if entry.contains("fma.") || entry.contains("mad.f32") {
                    return Err(format!("{name} contains an FMA").into());
                }
                // Approximate division / square root would differ from the CPU's IEEE operations.
                if entry.contains(".approx.f32") || entry.contains(".ftz.") {
                    return Err(format!("{name}: approximate op").into());
                }
            }
        }
        // Ten formats' matvec_exact plus exp, rmsnorm, head_norm_rope, attention, softmax_topk, moe_combine.
        if exact != 16 {
            return Err(format!("{exact} exact entries found in the PTX, expected 16").into());
        }
        println!("    {exact} exact kernels: no FMA, no approximate or flush-to-zero operation");
        Ok(Completion::Completed)
    }

    fn exp_is_the_cpus_bit_for_bit(d: &CudaDevice) {
        let mut x: Vec<f32> = (0..=400_000).map(|i| -90.0 + 180.0 * i as f32 / 400_000.0).collect();
        x.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            88.72283,
            f32::from_bits(0x42b1_7218),
            -87.33654,
            -87.3366,
        ]);
        x.extend((0..10_000).map(|i| f32::from_bits(0x3000_0000 + i * 997)));
        let run = || -> Result<Vec<f32>, String> {
            let xd = d.upload(&x).map_err(cuda)?;
            let mut yd = d.alloc_zeros::<f32>(x.len()).map_err(cuda)?;
            d.exp_exact(xd.as_slice(), yd.as_mut()).map_err(cuda)?;
            d.download(yd.as_slice()).map_err(cuda)
        };
        let got = run().unwrap();
        let want: Vec<f32> = x.iter().map(|&v| exp_f32(v)).collect();
        same_bits("exp", &got, &want).unwrap();
    }

    fn matvec_is_dot_row_bit_for_bit_for_every_format(d: &CudaDevice) {
        for ty in GgmlType::ALL {
            let widths = match ty.block_size() {
                1 => vec![67, 300, 1029],
                b => vec![b, 3 * b, 9 * b],
            };
            for cols in widths {
                for (rows, n_tok) in [(1, 1), (37, 3), (130, 9)] {
                    matvec_case(d, ty, rows, cols, n_tok).unwrap();
                }
            }
        }
    }

    fn matvec_case(
        d: &CudaDevice,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        n_tok: usize,
    ) -> Result<(), String> {
        let case = format!("matvec_exact {ty} {rows}x{cols} t{n_tok}");
        let mut r = rng((rows * 1000 + cols * 7 + n_tok) as u64 + ty.ggml_id() as u64);
        let bytes = random_matrix(&mut r, ty, rows, cols);
        let x = mixed(&mut r, n_tok * cols, 2.0);
        let y0 = mixed(&mut r, n_tok * rows, 1.0);
        let row_bytes = ty.row_bytes(cols).unwrap();
        let mut want = vec![0f32; n_tok * rows];
        for t in 0..n_tok {
            for o in 0..rows {
                want[t * rows + o] =
                    dot_row(ty, &bytes[o * row_bytes..(o + 1) * row_bytes], &x[t * cols..][..cols]);
            }
        }
        let w = d.upload_matrix(ty, cols, rows, 1, &bytes).map_err(cuda)?;
        let xd = d.upload(&x).map_err(cuda)?;
        let mut yd = d.alloc_zeros::<f32>(n_tok * rows).map_err(cuda)?;
        let tokens = ExactRows::Tokens { n_tok };
        d.matvec_exact(&w, xd.as_slice(), tokens, yd.as_mut(), None, false).map_err(cuda)?;
        same_bits(&case, &d.download(yd.as_slice()).map_err(cuda)?, &want)?;
        // Accumulating: y0 + dot, one rounding.
        let mut yd = d.upload(&y0).map_err(cuda)?;
        d.matvec_exact(&w, xd.as_slice(), tokens, yd.as_mut(), None, true).map_err(cuda)?;
        let acc: Vec<f32> = y0.iter().zip(&want).map(|(a, b)| a + b).collect();
        same_bits(&format!("{case} +="), &d.download(yd.as_slice()).map_err(cuda)?, &acc)
    }

    fn routed_slots_with_swiglu_and_combine_are_the_cpus_bit_for_bit(d: &CudaDevice) {
        for (ty, hidden, ffn, n_expert, k, n_tok) in [
            (GgmlType::Q4_K, 256, 512, 8, 3, 5),
            (GgmlType::Q8_0, 96, 160, 7, 2, 4),
            (GgmlType::F32, 45, 70, 5, 2, 3),
        ] {
            moe_case(d, ty, hidden, ffn, n_expert, k, n_tok).unwrap();
        }
    }

    fn moe_case(
        d: &CudaDevice,
        ty: GgmlType,
        hidden: usize,
        ffn: usize,
        n_expert: usize,
        k: usize,
        n_tok: usize,
    ) -> Result<(), String> {
        let case = format!("moe_exact {ty} h{hidden} f{ffn} e{n_expert} k{k} t{n_tok}");
        let mut r = rng(hidden as u64 * 13 + ffn as u64);
        let gate_up = random_matrix(&mut r, ty, n_expert * ffn, hidden);
        let gate_w = random_matrix(&mut r, ty, n_expert * ffn, hidden);
        let down = random_matrix(&mut r, ty, n_expert * hidden, ffn);
        let h = mixed(&mut r, n_tok * hidden, 2.0);
        let x0 = mixed(&mut r, n_tok * hidden, 1.0);
        let slots = n_tok * k;
        let ids: Vec<i32> = (0..slots).map(|s| ((s * 5 + s / k) % n_expert) as i32).collect();
        let weights: Vec<f32> = (0..slots).map(|_| r.random::<f32>()).collect();
        let (rb_in, rb_out) = (ty.row_bytes(hidden).unwrap(), ty.row_bytes(ffn).unwrap());
        // The CPU: gate and up rows by dot_row, act = silu(g) * u, down, then the sum in choice order.
        let mut want_act = vec![0f32; slots * ffn];
        let mut want_out = vec![0f32; slots * hidden];
        for s in 0..slots {
            let (e, xs) = (ids[s] as usize, &h[(s / k) * hidden..][..hidden]);
            for o in 0..ffn {
                let row = (e * ffn + o) * rb_in;
                let g = dot_row(ty, &gate_w[row..row + rb_in], xs);
                let u = dot_row(ty, &gate_up[row..row + rb_in], xs);
                want_act[s * ffn + o] = silu(g) * u;
            }
            for o in 0..hidden {
                let row = (e * hidden + o) * rb_out;
                want_out[s * hidden + o] = dot_row(ty, &down[row..row + rb_out], &want_act[s * ffn..][..ffn]);
            }
        }
        let mut want_x = x0.clone();
        for t in 0..n_tok {
            for i in 0..hidden {
                let mut m = 0.0f32;
                for j in 0..k {
                    m += want_out[(t * k + j) * hidden + i] * weights[t * k + j];
                }
                want_x[t * hidden + i] += m;
            }
        }
        let gw = d.upload_matrix(ty, hidden, ffn, n_expert, &gate_w).map_err(cuda)?;
        let uw = d.upload_matrix(ty, hidden, ffn, n_expert, &gate_up).map_err(cuda)?;
        let dw = d.upload_matrix(ty, ffn, hidden, n_expert, &down).map_err(cuda)?;
        let (hd, idd, wd) =
            (d.upload(&h).map_err(cuda)?, d.upload(&ids).map_err(cuda)?, d.upload(&weights).map_err(cuda)?);
        let mut gate = d.alloc_zeros::<f32>(slots * ffn).map_err(cuda)?;
        let mut act = d.alloc_zeros::<f32>(slots * ffn).map_err(cuda)?;
        let mut out = d.alloc_zeros::<f32>(slots * hidden).map_err(cuda)?;
        let mut xd = d.upload(&x0).map_err(cuda)?;
        let per_token = ExactRows::Slots { ids: idd.as_slice(), in_div: k };
        d.matvec_exact(&gw, hd.as_slice(), per_token, gate.as_mut(), None, false).map_err(cuda)?;
        d.matvec_exact(&uw, hd.as_slice(), per_token, act.as_mut(), Some(gate.as_slice()), false)
            .map_err(cuda)?;
        let per_slot = ExactRows::Slots { ids: idd.as_slice(), in_div: 1 };
        d.matvec_exact(&dw, act.as_slice(), per_slot, out.as_mut(), None, false).map_err(cuda)?;
        d.moe_combine_exact(
            out.as_slice(),
            idd.as_slice(),
            wd.as_slice(),
            n_tok,
            k,
            hidden,
            n_expert,
            xd.as_mut(),
        )
        .map_err(cuda)?;
        same_bits(&format!("{case} act"), &d.download(act.as_slice()).map_err(cuda)?, &want_act)?;
        same_bits(&format!("{case} out"), &d.download(out.as_slice()).map_err(cuda)?, &want_out)?;
        same_bits(&format!("{case} x"), &d.download(xd.as_slice()).map_err(cuda)?, &want_x)
    }

    fn rmsnorm_is_the_cpus_bit_for_bit(d: &CudaDevice) {
        for (rows, n) in [(1, 5), (3, 64), (7, 1000), (2, 2048)] {
            let mut r = rng(rows as u64 * 100 + n as u64);
            let (x, w) = (mixed(&mut r, rows * n, 3.0), mixed(&mut r, n, 1.0));
            let eps = 1e-6f32;
            let mut want = vec![0f32; rows * n];
            for (o, xr) in want.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
                rms_norm(xr, &w, eps, o);
            }
            let run = || -> Result<Vec<f32>, String> {
                let (xd, wd) = (d.upload(&x).map_err(cuda)?, d.upload(&w).map_err(cuda)?);
                let mut od = d.alloc_zeros::<f32>(rows * n).map_err(cuda)?;
                d.rmsnorm_exact(xd.as_slice(), wd.as_slice(), rows, n, eps, od.as_mut()).map_err(cuda)?;
                d.download(od.as_slice()).map_err(cuda)
            };
            same_bits(&format!("rmsnorm_exact {rows}x{n}"), &run().unwrap(), &want).unwrap();
        }
    }

    fn head_norm_rope_is_the_cpus_bit_for_bit(d: &CudaDevice) {
        for (n_tok, n_head, head_dim, pos0, stride_extra) in
            [(1, 4, 16, 0, 0), (5, 2, 24, 3, 8), (3, 32, 128, 1000, 0)]
        {
            let mut r = rng((n_tok * 31 + n_head * 7 + head_dim) as u64);
            let stride = n_head * head_dim + stride_extra;
            let x = mixed(&mut r, n_tok * stride, 3.0);
            let w = mixed(&mut r, head_dim, 1.0);
            let eps = 1e-6f32;
            let mut table = RopeTable::<f32>::new(head_dim, 1e6);
            table.ensure(pos0 + n_tok);
            let mut want = x.clone();
            let mut normed = vec![0f32; head_dim];
            for t in 0..n_tok {
                for h in 0..n_head {
                    let head = &mut want[t * stride + h * head_dim..][..head_dim];
                    rms_norm(head, &w, eps, &mut normed);
                    head.copy_from_slice(&normed);
                    table.apply(head, pos0 + t);
                }
            }
            let run = || -> Result<Vec<f32>, String> {
                let (mut xd, wd) = (d.upload(&x).map_err(cuda)?, d.upload(&w).map_err(cuda)?);
                let (cos, sin) = table.tables();
                let (cd, sd) = (d.upload(cos).map_err(cuda)?, d.upload(sin).map_err(cuda)?);
                let tabs = (cd.as_slice(), sd.as_slice());
                d.head_norm_rope_exact(
                    xd.as_mut(),
                    stride,
                    n_tok,
                    n_head,
                    head_dim,
                    (wd.as_slice(), eps),
                    pos0,
                    tabs,
                )
                .map_err(cuda)?;
                d.download(xd.as_slice()).map_err(cuda)
            };
            same_bits(
                &format!("head_norm_rope_exact t{n_tok} h{n_head} d{head_dim}"),
                &run().unwrap(),
                &want,
            )
            .unwrap();
        }
    }

    fn attention_is_the_cpus_bit_for_bit(d: &CudaDevice) {
        for (n_tok, n_head, n_kv, head_dim, pos0) in
            [(1, 4, 2, 16, 0), (5, 4, 2, 24, 0), (1, 32, 4, 128, 70), (37, 4, 1, 24, 3), (8, 8, 8, 256, 11)]
        {
            let mut r = rng((n_tok * 7 + n_head * 3 + head_dim + pos0) as u64);
            let n_ctx = pos0 + n_tok;
            let kv_dim = n_kv * head_dim;
            let q = mixed(&mut r, n_tok * n_head * head_dim, 1.0);
            let keys = mixed(&mut r, n_ctx * kv_dim, 1.0);
            let values = mixed(&mut r, n_ctx * kv_dim, 1.0);
            let scale = (1.0 / (head_dim as f64).sqrt()) as f32;
            let mut want = vec![0f32; q.len()];
            let mut scores = Vec::new();
            for t in 0..n_tok {
                for h in 0..n_head {
                    let kv = KvView {
                        keys: &keys,
                        values: &values,
                        row_width: kv_dim,
                        offset: (h / (n_head / n_kv)) * head_dim,
                    };
                    let at = (t * n_head + h) * head_dim;
                    causal_attention_head(
                        &q[at..at + head_dim],
                        kv,
                        pos0 + t + 1,
                        scale,
                        &mut scores,
                        &mut want[at..at + head_dim],
                    );
                }
            }
            let run = || -> Result<Vec<f32>, String> {
                let (qd, kd, vd) = (
                    d.upload(&q).map_err(cuda)?,
                    d.upload(&keys).map_err(cuda)?,
                    d.upload(&values).map_err(cuda)?,
                );
                let mut od = d.alloc_zeros::<f32>(q.len()).map_err(cuda)?;
                let shape = AttentionShape { n_tok, n_head, n_kv_head: n_kv, head_dim, pos0 };
                d.attention_exact(qd.as_slice(), kd.as_slice(), vd.as_slice(), od.as_mut(), shape, scale)
                    .map_err(cuda)?;
                d.download(od.as_slice()).map_err(cuda)
            };
            same_bits(
                &format!("attention_exact t{n_tok} h{n_head}/{n_kv} d{head_dim} at{pos0}"),
                &run().unwrap(),
                &want,
            )
            .unwrap();
        }
    }

    fn router_is_the_cpus_bit_for_bit_including_ties(d: &CudaDevice) {
        for (n_tok, n_expert, k, ties) in
            [(1, 8, 2, false), (13, 128, 8, false), (6, 37, 5, false), (4, 16, 4, true)]
        {
            let mut r = rng((n_tok * 100 + n_expert + k) as u64);
            let logits: Vec<f32> = if ties {
                // Few distinct values: the k-th place is often shared, ties go to the lower index.
                (0..n_tok * n_expert).map(|_| r.random_range(0..3) as f32 * 0.5).collect()
            } else {
                mixed(&mut r, n_tok * n_expert, 4.0)
            };
            let (mut want_ids, mut want_w) = (vec![0u32; n_tok * k], vec![0f32; n_tok * k]);
            let mut probs = vec![0f32; n_expert];
            for t in 0..n_tok {
                route(
                    &logits[t * n_expert..][..n_expert],
                    true,
                    &mut probs,
                    &mut want_ids[t * k..][..k],
                    &mut want_w[t * k..][..k],
                );
            }
            let run = || -> Result<(Vec<i32>, Vec<f32>), String> {
                let ld = d.upload(&logits).map_err(cuda)?;
                let mut idd = d.alloc_zeros::<i32>(n_tok * k).map_err(cuda)?;
                let mut wd = d.alloc_zeros::<f32>(n_tok * k).map_err(cuda)?;
                d.softmax_topk_exact(ld.as_slice(), n_tok, n_expert, k, true, idd.as_mut(), wd.as_mut())
                    .map_err(cuda)?;
                Ok((d.download(idd.as_slice()).map_err(cuda)?, d.download(wd.as_slice()).map_err(cuda)?))
            };
            let (ids, w) = run().unwrap();
            let case = format!("softmax_topk_exact t{n_tok} e{n_expert} k{k} ties {ties}");
            let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
            assert_eq!(ids, want_ids, "{case}: experts");
            same_bits(&case, &w, &want_w).unwrap();
        }
    }
}
