//! The command line: global options shared by every command, and one subcommand per process.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "smart-studio",
    version,
    about = "Self-hosted fine-tuning of language models, with an OpenAI-compatible REST API.",
    long_about = None
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    #[command(subcommand)]
    pub command: Command,
}

/// Options every command reads. Each one can also come from the environment variable named in
/// its help.
#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// Folder for uploaded files, job artifacts and worker scratch space; created when missing.
    #[arg(long, env = "STUDIO_DATA_DIR", default_value = "./studio-data", global = true)]
    pub data_dir: PathBuf,

    /// Folder of base models, one `<model name>.gguf` file each.
    #[arg(long, env = "STUDIO_MODELS_DIR", default_value = "./models", global = true)]
    pub models_dir: PathBuf,

    /// Database URL: postgres://USER:PASSWORD@HOST:5432/DATABASE for Postgres, or sqlite://PATH
    /// for an SQLite file [default: sqlite://DATA_DIR/studio.db]. Not used by fetch-model, train
    /// and eval; the password is never printed.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,

    /// IP address the REST API listens on; 0.0.0.0 listens on every interface.
    #[arg(long, env = "STUDIO_HOST", default_value = "127.0.0.1", global = true)]
    pub host: IpAddr,

    /// TCP port the REST API listens on (1-65535).
    #[arg(
        long,
        env = "STUDIO_PORT",
        default_value_t = 8000,
        value_parser = clap::value_parser!(u16).range(1..),
        global = true
    )]
    pub port: u16,

    /// Log filter in tracing's EnvFilter syntax, such as `info` or `info,studio_worker=debug`
    /// [default: info; warn for demo, so that its progress bar stays readable].
    #[arg(long, env = "RUST_LOG", global = true)]
    pub log: Option<String>,

    /// Storage of uploaded files, checkpoints and trained models: s3://BUCKET/PREFIX for Amazon
    /// S3 or an S3-compatible server (the prefix is optional), or file://PATH for a local folder
    /// [default: DATA_DIR/artifacts]. Used by serve, worker, up and demo.
    #[arg(long, env = "STUDIO_ARTIFACTS_URL", value_name = "URL", global = true)]
    pub artifacts_url: Option<String>,

    /// Base URL of an S3-compatible server, such as http://127.0.0.1:9000 [default: Amazon S3].
    /// Plain HTTP is used only when the URL starts with http://.
    #[arg(long, env = "STUDIO_S3_ENDPOINT", value_name = "URL", global = true)]
    pub s3_endpoint: Option<String>,

    /// Region of the S3 bucket [default: us-east-1].
    #[arg(long, env = "STUDIO_S3_REGION", global = true)]
    pub s3_region: Option<String>,

    /// Access key id for an s3:// artifacts URL.
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide_env_values = true, global = true)]
    pub s3_access_key_id: Option<String>,

    /// Secret access key for an s3:// artifacts URL; never printed or logged. Prefer the
    /// environment variable: other users of the machine can read a flag in the process list.
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true, global = true)]
    pub s3_secret_access_key: Option<Secret>,

    /// Session token of temporary S3 credentials; never printed or logged.
    #[arg(long, env = "AWS_SESSION_TOKEN", hide_env_values = true, global = true)]
    pub s3_session_token: Option<Secret>,
}

/// A secret option value, such as a password or key, that `Debug` hides.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Returns the value, for the client that authenticates with it only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Secret, Self::Err> {
        Ok(Secret(value.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(****)")
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the REST API only; run workers separately with `worker`.
    Serve,
    /// Run one worker that claims queued jobs and trains them.
    Worker(WorkerArgs),
    /// Run migrations, then the REST API and one worker in this process.
    Up(WorkerArgs),
    /// Apply the database migrations and exit.
    Migrate,
    /// Download the demo base model `smollm2-135m-instruct` into the models folder if it is absent.
    FetchModel,
    /// Fine-tune the demo model on the bundled example dataset, end to end over the REST API.
    Demo(DemoArgs),
    /// Fine-tune locally from a JSONL file, without a server or database.
    Train(Box<TrainArgs>),
    /// Print the mean loss and token accuracy of a model, with an optional adapter, on a dataset.
    Eval(EvalArgs),
    /// Chat with a model in the terminal: each line of standard input is a user turn.
    Chat(ChatArgs),
}

/// A local run. `--config` takes a JSON job body as `POST /v1/fine_tuning/jobs` does; flags
/// override its fields.
///
/// OUTPUT_DIR/metrics.csv has one row per optimizer step. Its reward_chosen, reward_rejected,
/// reward_accuracy and reward_margin columns are filled by DPO runs and empty otherwise.
#[derive(Clone, Debug, Args)]
pub struct TrainArgs {
    /// JSON file shaped like a job create request (model, method, training_type, seed).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Base model: a name in the models folder, a GGUF file or a Hugging Face folder. For
    /// distillation it is the student.
    #[arg(long)]
    pub model: Option<String>,

    /// Training method [default: method.type of --config, else supervised]. Replaces the
    /// config's method; its hyperparameters shared by every method carry over.
    #[arg(long, value_enum)]
    pub method: Option<TrainMethod>,

    /// Training data, one JSON object per line: conversations (OpenAI chat, prompt/completion
    /// or Alpaca) for supervised and distillation runs, preference pairs for DPO, or prompts
    /// alone for distillation, whose teacher then writes the replies.
    #[arg(long, value_name = "FILE")]
    pub training_file: PathBuf,

    /// Validation data in the training file's format, with replies. Without it a supervised or
    /// distillation run holds out a tenth of a training set of 20 or more examples, and a DPO
    /// run holds out nothing.
    #[arg(long, value_name = "FILE")]
    pub validation_file: Option<PathBuf>,

    /// Folder that receives adapter/, merged/ or model/, checkpoints/, metrics.csv and, for a
    /// prompts-only distillation file, teacher_replies.jsonl.
    #[arg(long, default_value = "./train-output")]
    pub output_dir: PathBuf,

    /// Continue from a checkpoint folder (OUTPUT_DIR/checkpoints/step-N) of the same run.
    #[arg(long, value_name = "DIR")]
    pub resume_from: Option<PathBuf>,

    /// For LoRA, also write the base model with the adapter merged in (OUTPUT_DIR/merged).
    #[arg(long)]
    pub merged: bool,

    /// `lora` or `full`.
    #[arg(long)]
    pub approach: Option<String>,

    /// Passes over the training data.
    #[arg(long)]
    pub n_epochs: Option<u32>,

    /// Examples per micro-batch.
    #[arg(long)]
    pub batch_size: Option<u32>,

    /// Micro-batches per optimizer step.
    #[arg(long)]
    pub gradient_accumulation_steps: Option<u32>,

    /// Peak learning rate [default: 1e-4 for LoRA, 2e-5 for full].
    #[arg(long)]
    pub learning_rate: Option<f64>,

    /// `linear`, `cosine` or `constant` decay after warmup.
    #[arg(long)]
    pub lr_scheduler: Option<String>,

    /// Fraction of the steps spent warming up.
    #[arg(long)]
    pub warmup_ratio: Option<f64>,

    /// Tokens per example; longer ones are truncated.
    #[arg(long)]
    pub max_seq_len: Option<u32>,

    /// Write a checkpoint every this many steps.
    #[arg(long)]
    pub checkpoint_interval: Option<u64>,

    /// Evaluate every this many steps (0: at epoch ends).
    #[arg(long)]
    pub eval_interval: Option<u64>,

    /// LoRA rank.
    #[arg(long)]
    pub r: Option<u32>,

    /// LoRA alpha.
    #[arg(long)]
    pub alpha: Option<f64>,

    /// Comma-separated LoRA target modules, or all-linear.
    #[arg(long)]
    pub target_modules: Option<String>,

    /// Seed of initialisation, shuffling and dropout.
    #[arg(long)]
    pub seed: Option<u64>,

    /// DPO only: scales the log-probability ratios in the loss; larger keeps the model nearer
    /// the base model [default: 0.1].
    #[arg(long)]
    pub beta: Option<f64>,

    /// Distillation only: the teacher, a name in the models folder, a GGUF file or a Hugging
    /// Face folder. Its tokenizer must match the student's.
    #[arg(long, value_name = "MODEL")]
    pub teacher_model: Option<String>,

    /// Distillation only: softmax temperature applied to both models' logits [default: 2].
    #[arg(long)]
    pub temperature: Option<f64>,

    /// Distillation only: weight of the distillation term in the loss, from 0 to 1; the rest
    /// weighs the cross-entropy [default: 0.5].
    #[arg(long)]
    pub kd_weight: Option<f64>,

    /// Distillation only: comma-separated, increasing decoder layer indices of --model that
    /// build a smaller student, such as 0,3,6. Needs --approach full.
    #[arg(long, value_delimiter = ',', value_name = "LAYERS")]
    pub student_layers: Option<Vec<u32>>,
}

/// The `method.type` of a local run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TrainMethod {
    Supervised,
    /// Direct preference optimisation on preference pairs.
    Dpo,
    /// Knowledge distillation from --teacher-model.
    Distillation,
}

impl TrainMethod {
    /// Returns the name that `method.type` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            TrainMethod::Supervised => "supervised",
            TrainMethod::Dpo => "dpo",
            TrainMethod::Distillation => "distillation",
        }
    }
}

#[derive(Clone, Debug, Args)]
pub struct EvalArgs {
    /// Base model: a name in the models folder, a GGUF file or a Hugging Face folder.
    #[arg(long)]
    pub model: String,

    /// A PEFT adapter folder to apply.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,

    /// Dataset, one JSON conversation per line.
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,

    /// Tokens per example; longer ones are truncated.
    #[arg(long, default_value_t = 1024)]
    pub max_seq_len: usize,

    /// Examples per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
}

/// A terminal conversation with a local model.
#[derive(Clone, Debug, Args)]
pub struct ChatArgs {
    /// Model: a name in the models folder, a GGUF file or a Hugging Face folder (such as a fully
    /// fine-tuned model/ folder).
    #[arg(long)]
    pub model: String,

    /// A PEFT adapter folder to apply, such as a LoRA job's adapter/ folder.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,

    /// A system message that starts the conversation.
    #[arg(long)]
    pub system: Option<String>,

    /// The maximum number of tokens of each reply.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,

    /// Sampling temperature from 0 to 2; 0 always picks the most likely token.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,

    /// Nucleus sampling: keep the most likely tokens up to this total probability (above 0, at most 1).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,

    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Settings of a worker (`worker` and `up`).
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Name of this worker in job rows and logs [default: HOSTNAME-PID].
    #[arg(long, env = "STUDIO_WORKER_ID")]
    pub worker_id: Option<String>,

    /// Seconds to wait between polls while the queue is empty.
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
    pub poll_interval: f64,

    /// Seconds a claimed job stays owned by this worker after its last heartbeat; when the lease
    /// expires another worker may claim the job.
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    pub lease: f64,

    /// Seconds between heartbeats that extend the lease; must be shorter than --lease.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub heartbeat_interval: f64,

    /// Folder for a job's working files while it trains [default: DATA_DIR/scratch].
    #[arg(long, env = "STUDIO_SCRATCH_DIR")]
    pub scratch_dir: Option<PathBuf>,
}

/// Hyperparameters of the demo job. The defaults keep it to a few minutes on two CPU cores.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Passes over the example dataset.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub n_epochs: u32,

    /// Conversations per optimizer step.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,

    /// Peak learning rate of AdamW.
    #[arg(long, default_value_t = 2e-3, value_parser = positive_number)]
    pub learning_rate: f64,

    /// Tokens per conversation; longer ones are truncated.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_seq_len: u32,

    /// LoRA rank.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub r: u32,

    /// LoRA alpha; the adapter's output is scaled by alpha / r.
    #[arg(long, default_value_t = 16.0, value_parser = positive_number)]
    pub alpha: f64,
}

fn positive_number(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(number) if number.is_finite() && number > 0.0 => Ok(number),
        _ => Err(format!("{value:?} is not a positive number")),
    }
}
