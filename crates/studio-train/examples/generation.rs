//! Measures greedy generation speed with and without the KV cache. The prompt is one chat turn
//! rendered with the model's template, followed by `tokens` new tokens. The cached run is
//! repeated `repeats` times and the best is reported, the uncached run once, because it is slow.
//! Rates are new tokens over the whole time, prompt processing included.
//!
//! Usage: `cargo run --release -p studio-train --example generation -- MODEL [tokens=64]
//! [repeats=3]`

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::Device;
use studio_core::dataset::{Message, Role};
use studio_train::generate::{generate, generate_uncached, ChatModel, Flow, SamplingParams};

/// Peak resident memory of this process in MiB, from `/proc/self/status` (Linux only).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(!args.is_empty(), "usage: generation MODEL [tokens] [repeats]");
    let number = |index: usize, default: usize| args.get(index).map_or(Ok(default), |v| v.parse());
    let (tokens, repeats) = (number(1, 64)?, number(2, 3)?);

    let model = ChatModel::load(Path::new(&args[0]), None, &Device::Cpu)?;
    let messages = [Message {
        role: Role::User,
        content: "Write a short story about a lighthouse keeper who finds a message in a bottle.".into(),
        weight: None,
    }];
    let prompt = model.encode_prompt(&messages)?;
    // No stop token, so every run decodes exactly `tokens` tokens.
    let params = SamplingParams { max_new_tokens: tokens, temperature: 0.0, ..SamplingParams::default() };

    let mut best_cached = Duration::MAX;
    let mut best_first_token = Duration::MAX;
    let mut cached_tokens = Vec::new();
    for _ in 0..repeats {
        let started = Instant::now();
        let mut first_token = None;
        let generation = generate(&model.model, &prompt, &params, &[], &mut |_| {
            first_token.get_or_insert_with(|| started.elapsed());
            Flow::Continue
        })?;
        best_cached = best_cached.min(started.elapsed());
        best_first_token = best_first_token.min(first_token.unwrap_or_default());
        cached_tokens = generation.tokens;
    }
    let started = Instant::now();
    let uncached = generate_uncached(&model.model, &prompt, &params, &[])?;
    let uncached_time = started.elapsed();
    anyhow::ensure!(uncached.tokens == cached_tokens, "cached and uncached generation differ");

    let decode_rate = |time: Duration| (tokens as f64) / time.as_secs_f64();
    println!("prompt: {} tokens, generated: {tokens} tokens (greedy)", prompt.len());
    println!(
        "KV cache: {:.2} s in all, first token after {:.3} s, {:.1} tokens/s (best of {repeats})",
        best_cached.as_secs_f64(),
        best_first_token.as_secs_f64(),
        decode_rate(best_cached)
    );
    println!(
        "no cache: {:.2} s in all, {:.1} tokens/s (one run); same tokens as the cached run",
        uncached_time.as_secs_f64(),
        decode_rate(uncached_time)
    );
    if let Some(peak) = peak_rss_mib() {
        println!("peak RSS: {peak:.0} MiB");
    }
    Ok(())
}
