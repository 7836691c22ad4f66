//! Measures training throughput and peak memory on a fixed batch, the way the PyTorch CPU anchor
//! does: `batch` rows of `seq` tokens cut from a text file, every next token a target, one
//! AdamW step per iteration, the first `warmup` steps left out of the figures.
//!
//! Usage: `cargo run --release -p studio-train --example throughput -- MODEL lora|full TEXT
//! [steps=6] [batch=8] [seq=128] [warmup=1]`

use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use studio_train::batch::{batch_loss, Batch};
use studio_train::chat::EncodedExample;
use studio_train::loader::load_model;
use studio_train::lora;
use studio_train::model::{ForwardContext, Llama};
use studio_train::optim::{AdamW, AdamWConfig};
use studio_train::rng::Rng;
use studio_train::LoraSettings;

/// Peak resident memory of this process in MiB, from `/proc/self/status` (Linux only).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(args.len() >= 3, "usage: throughput MODEL lora|full TEXT [steps] [batch] [seq] [warmup]");
    let number = |index: usize, default: usize| args.get(index).map_or(Ok(default), |v| v.parse());
    let (steps, batch_size, seq_len, warmup) = (number(3, 6)?, number(4, 8)?, number(5, 128)?, number(6, 1)?);
    let device = Device::Cpu;

    let loaded = load_model(Path::new(&args[0]), &device)?;
    let text = std::fs::read_to_string(&args[2])?;
    let ids = loaded.tokenizer.encode(text.as_str(), false).map_err(anyhow::Error::msg)?.get_ids().to_vec();
    anyhow::ensure!(ids.len() >= batch_size * seq_len, "{} has {} tokens; need {}", args[2], ids.len(), batch_size * seq_len);
    let rows: Vec<EncodedExample> = ids
        .chunks(seq_len)
        .take(batch_size)
        .map(|chunk| EncodedExample { ids: chunk.to_vec(), targets: vec![true; chunk.len()] })
        .collect();
    let batch = Batch::new(&rows.iter().collect::<Vec<_>>(), loaded.special.pad, &device)?;

    let mut model = Llama::from_weights(&loaded.config, &loaded.weights, &device)?;
    drop(loaded);
    let vars = match args[1].as_str() {
        "lora" => {
            lora::attach(&mut model, &LoraSettings::default(), &mut Rng::new(0))?;
            model.lora_vars()
        }
        "full" => model.make_all_trainable()?.into_iter().map(|(_, var)| var).collect(),
        other => anyhow::bail!("unknown approach {other:?}; use lora or full"),
    };
    let trainable: usize = vars.iter().map(|v| v.elem_count()).sum();
    let mut optimizer = AdamW::new(vars, AdamWConfig::default())?;
    println!("{} trainable parameters; batch {batch_size} x {seq_len} tokens", trainable);

    let mut timed = Vec::new();
    for step in 0..steps {
        let started = Instant::now();
        let loss = batch_loss(&model, &batch, &mut ForwardContext::eval())?;
        let mean = (loss.sum_nll / batch.n_targets as f64)?;
        let value = mean.to_scalar::<f32>()?;
        let grads = mean.backward()?;
        optimizer.step(&grads, if args[1] == "full" { 2e-5 } else { 2e-4 })?;
        let seconds = started.elapsed().as_secs_f64();
        println!("step {step}: loss {value:.6}, {seconds:.2} s, {:.1} tokens/s", batch.n_tokens as f64 / seconds);
        if step >= warmup {
            timed.push(seconds);
        }
    }
    timed.sort_by(f64::total_cmp);
    let median = timed[timed.len() / 2];
    println!("median step {median:.2} s, {:.1} tokens/s", batch.n_tokens as f64 / median);
    if let Some(peak) = peak_rss_mib() {
        println!("peak resident memory: {peak:.0} MiB");
    }
    Ok(())
}
