//! Measures LoRA training throughput and peak memory on a JSONL chat dataset.
//!
//! Usage: `cargo run --release -p studio-train --example lora_throughput -- MODEL.gguf DATA.jsonl
//! [examples=32] [max_seq_len=128] [batch_size=8] [epochs=1]`

use std::path::PathBuf;

use studio_core::dataset::Conversation;
use studio_train::{run_lora_sft, EventLevel, LoraSettings, SftJob, StepMetrics, TrainObserver, TrainSettings};

struct Printer {
    steps: Vec<StepMetrics>,
}

impl TrainObserver for Printer {
    fn on_step(&mut self, metrics: &StepMetrics) {
        println!(
            "step {:>3}/{} loss {:.4} grad_norm {:.4} tokens/s {:.1}",
            metrics.step, metrics.total_steps, metrics.train_loss, metrics.grad_norm, metrics.tokens_per_second
        );
        self.steps.push(metrics.clone());
    }

    fn on_event(&mut self, level: EventLevel, message: &str) {
        println!("[{level:?}] {message}");
    }

    fn should_cancel(&mut self) -> bool {
        false
    }
}

/// Peak resident memory of this process in MiB, from `/proc/self/status` (Linux only).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(args.len() >= 2, "usage: lora_throughput MODEL.gguf DATA.jsonl [examples] [max_seq_len] [batch_size] [epochs]");
    let number = |index: usize, default: usize| args.get(index).map_or(Ok(default), |v| v.parse());
    let (n_examples, max_seq_len, batch_size, n_epochs) = (number(2, 32)?, number(3, 128)?, number(4, 8)?, number(5, 1)?);

    let text = std::fs::read_to_string(&args[1])?;
    let examples: Vec<Conversation> = text
        .lines()
        .take(n_examples)
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let output_dir = std::env::temp_dir().join("lora-throughput-adapter");
    let job = SftJob {
        model_path: &PathBuf::from(&args[0]),
        base_model_name: "benchmark",
        examples: &examples,
        lora: LoraSettings::default(),
        settings: TrainSettings { n_epochs, batch_size, learning_rate: 1e-4, max_seq_len, weight_decay: 0.0, seed: 0 },
        output_dir: &output_dir,
    };
    let mut printer = Printer { steps: Vec::new() };
    let started = std::time::Instant::now();
    run_lora_sft(&job, &mut printer)?;
    let seconds = started.elapsed().as_secs_f64();

    // The first step warms caches and allocations, so it is left out of the steady-state rate.
    let steady = &printer.steps[1.min(printer.steps.len() - 1)..];
    let tokens: f64 = steady.iter().map(|m| m.tokens_per_second).sum::<f64>() / steady.len() as f64;
    println!("mean tokens/s (steps after the first): {tokens:.1}");
    println!("wall time including model load: {seconds:.1} s");
    if let Some(peak) = peak_rss_mib() {
        println!("peak resident memory: {peak:.0} MiB");
    }
    Ok(())
}
