//! The `halfstep` binary.

use clap::Parser;
use halfstep_server::cli::{self, Cli, Command};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Serve(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(cli::serve(args)),
        Command::Generate(args) => cli::generate(args),
        Command::TinyModel { dir, seed } => {
            let spec = halfstep_model::testmodel::TinyModelSpec {
                seed,
                ..Default::default()
            };
            spec.write(&dir)?;
            eprintln!("wrote the tiny model to {}", dir.display());
            Ok(())
        }
        Command::Bandwidth { mib } => {
            let kern = halfstep_model::Kernels::global();
            let gbs = halfstep_model::kernels::bandwidth::read_bandwidth_gbs(&kern, mib << 20, 5);
            println!(
                "memory read bandwidth: {gbs:.1} GB/s ({mib} MiB, best of 5, {} threads)",
                kern.pool.threads()
            );
            let gflops = halfstep_model::kernels::bandwidth::peak_fma_gflops(&kern, 3);
            println!(
                "peak f32 FMA: {gflops:.1} GFLOP/s (best of 3, {} threads)",
                kern.pool.threads()
            );
            Ok(())
        }
        Command::Openapi { output } => {
            let doc = halfstep_server::api::openapi::openapi_json();
            match output {
                Some(p) => std::fs::write(&p, doc)?,
                None => print!("{doc}"),
            }
            Ok(())
        }
    }
}
