//! `blockship-bench`: generate test images (`gen-image`); scenarios follow.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use blockship_bench::image::{self, Profile};

#[derive(Parser)]
#[command(name = "blockship-bench", about = "Blockship benchmark harness")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a deterministic test image.
    GenImage {
        /// mixed, random or sparse.
        #[arg(long, default_value = "mixed")]
        profile: Profile,
        /// Size, e.g. 1GiB.
        #[arg(long)]
        size: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        out: PathBuf,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::GenImage { profile, size, seed, out } => {
            let size = parse_size::Config::new()
                .with_binary()
                .parse_size(&size)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            image::generate(&out, size, profile, seed)?;
            let (z, t, r) = image::composition(profile, size);
            println!("wrote {} ({size} bytes: {z} zero, {t} text, {r} random)", out.display());
            Ok(())
        }
    }
}
