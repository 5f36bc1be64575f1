fn main() {
    let arch = std::env::args().nth(1).unwrap_or("compute_90".into());
    match moe_kernels::cuda::compile_program(&arch) {
        Ok(ptx) => { println!("ok: {} bytes of PTX", ptx.len()); if std::env::args().nth(2).is_some() { println!("{ptx}"); } }
        Err(e) => println!("ERR: {e}"),
    }
}
