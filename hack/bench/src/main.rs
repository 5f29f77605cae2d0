//! `ringfence-bench`: the pieces of the benchmark harness that must be fast and predictable.
//!
//! - `mock`: a canned upstream (A2A agent and OpenAI chat completions, JSON or SSE), with an
//!   optional fixed delay.
//! - `load`: an HTTP/1.1 load generator, closed loop (`--concurrency`) or open loop (`--rate`)
//!   with coordinated-omission correction; prints one JSON line of results.
//! - `sink`: a loopback OTLP/HTTP endpoint that takes span exports and counts them.
//! - `certs`: a CA and two leaf certificates for the nginx mTLS baseline.
//!
//! `hack/bench/run.sh` drives them; see docs/benchmarks.md.
#![forbid(unsafe_code)]

mod load;
mod mock;
mod sink;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve canned responses.
    Mock(mock::Args),
    /// Generate load and print a JSON line of latencies and errors.
    Load(load::Args),
    /// Take OTLP/HTTP span exports on loopback and count them.
    Sink(sink::Args),
    /// Write ca.crt, caller.{crt,key}, callee.{crt,key} into DIR.
    Certs { dir: PathBuf },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Mock(args) => mock::run(args),
        Command::Load(args) => load::run(args),
        Command::Sink(args) => sink::run(args),
        Command::Certs { dir } => certs(&dir),
    }
}

fn certs(dir: &std::path::Path) -> anyhow::Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "bench CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca, ca_key);
    std::fs::write(dir.join("ca.crt"), ca_cert.pem())?;
    for name in ["caller", "callee"] {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![format!("{name}.bench")])?;
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.signed_by(&key, &issuer)?;
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem())?;
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem())?;
    }
    Ok(())
}
