//! One function per training method: read the data, build the trainer's job as the worker
//! builds it, and run it with a progress observer.

use std::ops::ControlFlow;
use std::path::Path;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use studio_core::dataset::{Conversation, DatasetFormat};
use studio_core::JobSpec;
use studio_train::distill::{check_student_layers, teacher_replies};
use studio_train::loader::read_config;
use studio_train::{run_distillation, run_dpo, run_sft, DistillJob, DpoJob, RunOutcome, SftJob, TrainError};
use studio_worker::plan;

use super::data::{read_conversations, read_pairs, write_conversations, FileRole};
use super::progress::ProgressObserver;
use super::{resolve_model, LocalRun};
use crate::cli::TrainMethod;

/// The file, in the output folder, that receives the teacher's replies to a prompts-only file.
const TEACHER_REPLIES_FILE: &str = "teacher_replies.jsonl";

/// Runs supervised fine-tuning on a file of conversations.
pub(super) fn supervised(run: &LocalRun<'_>) -> anyhow::Result<RunOutcome> {
    let (examples, _, validation) = read_supervised_files(run, TrainMethod::Supervised)?;
    print_start(run, TrainMethod::Supervised, examples.len(), "examples");
    let job = sft_job(run, &examples, validation.as_deref());
    observe(run, |observer| run_sft(&job, observer))
}

/// Runs DPO on a file of preference pairs. The reference model is the base model.
pub(super) fn dpo(run: &LocalRun<'_>) -> anyhow::Result<RunOutcome> {
    let args = run.args;
    let pairs = read_pairs(&args.training_file, FileRole::Training)?;
    let validation = args
        .validation_file
        .as_deref()
        .map(|path| read_pairs(path, FileRole::Validation))
        .transpose()?;
    print_start(run, TrainMethod::Dpo, pairs.len(), "preference pairs");
    let job = DpoJob {
        model_path: run.model_path,
        base_model_name: &run.spec.model,
        pairs: &pairs,
        validation: validation.as_deref(),
        approach: plan::approach(run.spec),
        settings: plan::train_settings(run.spec),
        beta: run.spec.dpo_beta().expect("called for DPO specs only"),
        output_dir: &args.output_dir,
        checkpoint_dir: Some(&run.checkpoint_dir),
        resume_from: args.resume_from.as_deref(),
        export_merged: args.merged,
    };
    observe(run, |observer| run_dpo(&job, observer))
}

/// Runs distillation from the teacher into the run's model. A prompts-only training file is
/// first answered by the teacher, and the replies are written to OUTPUT_DIR/teacher_replies.jsonl.
pub(super) fn distillation(run: &LocalRun<'_>) -> anyhow::Result<RunOutcome> {
    let distillation = run.spec.distillation().expect("called for distillation specs only");
    let teacher_name = &distillation.teacher_model;
    let teacher_path = resolve_model(run.models_dir, teacher_name).with_context(|| {
        format!("teacher model '{teacher_name}' is not a GGUF file, a Hugging Face folder or a model in the models folder")
    })?;
    let distill = plan::distill_settings(run.spec).expect("called for distillation specs only");
    // Checked first, so a bad index fails before the teacher answers a prompts-only file.
    if let Some(layers) = &distill.student_layers {
        let config = read_config(run.model_path)?;
        check_student_layers(layers, config.num_hidden_layers)?;
    }
    let (examples, format, validation) = read_supervised_files(run, TrainMethod::Distillation)?;
    let examples = match format {
        DatasetFormat::Prompts => write_teacher_replies(run.spec, &teacher_path, &examples, &run.args.output_dir)?,
        _ => examples,
    };
    print_start(run, TrainMethod::Distillation, examples.len(), "examples");
    let job = DistillJob {
        sft: sft_job(run, &examples, validation.as_deref()),
        teacher_path: &teacher_path,
        teacher_adapter: None,
        teacher_name,
        distill,
    };
    observe(run, |observer| run_distillation(&job, observer))
}

/// Reads the training file, with its format, and the validation file of a supervised or
/// distillation run.
fn read_supervised_files(
    run: &LocalRun<'_>,
    method: TrainMethod,
) -> anyhow::Result<(Vec<Conversation>, DatasetFormat, Option<Vec<Conversation>>)> {
    let args = run.args;
    let (examples, format) = read_conversations(&args.training_file, FileRole::Training, method)?;
    let validation = args
        .validation_file
        .as_deref()
        .map(|path| read_conversations(path, FileRole::Validation, method).map(|(conversations, _)| conversations))
        .transpose()?;
    Ok((examples, format, validation))
}

/// Builds the supervised job that a supervised run trains and a distillation run extends.
fn sft_job<'a>(run: &'a LocalRun<'_>, examples: &'a [Conversation], validation: Option<&'a [Conversation]>) -> SftJob<'a> {
    let args = run.args;
    SftJob {
        model_path: run.model_path,
        base_model_name: &run.spec.model,
        examples,
        validation,
        approach: plan::approach(run.spec),
        settings: plan::train_settings(run.spec),
        output_dir: &args.output_dir,
        checkpoint_dir: Some(&run.checkpoint_dir),
        resume_from: args.resume_from.as_deref(),
        export_merged: args.merged,
    }
}

fn print_start(run: &LocalRun<'_>, method: TrainMethod, count: usize, unit: &str) {
    println!(
        "Training {} with the {} method on {count} {unit} from {}",
        run.spec.model,
        method.as_str(),
        run.args.training_file.display()
    );
}

/// Runs `train` with a progress observer that writes OUTPUT_DIR/metrics.csv, and removes the
/// bar afterwards, also when the run fails.
fn observe(
    run: &LocalRun<'_>,
    train: impl FnOnce(&mut ProgressObserver) -> Result<RunOutcome, TrainError>,
) -> anyhow::Result<RunOutcome> {
    let mut observer = ProgressObserver::new(&run.args.output_dir)?;
    let outcome = train(&mut observer);
    observer.finish();
    Ok(outcome?)
}

/// Has the teacher write a greedy reply to each prompt, as a distillation job does, and
/// writes the conversations to `output/teacher_replies.jsonl`.
fn write_teacher_replies(
    spec: &JobSpec,
    teacher_path: &Path,
    prompts: &[Conversation],
    output: &Path,
) -> anyhow::Result<Vec<Conversation>> {
    let params = plan::teacher_reply_params(spec);
    println!(
        "The teacher {} is writing replies to {} prompts (at most {} tokens each)",
        teacher_path.display(),
        prompts.len(),
        params.max_new_tokens
    );
    let bar = ProgressBar::new(prompts.len() as u64);
    bar.set_style(ProgressStyle::with_template("{bar:30} reply {pos}/{len}  elapsed {elapsed}  left {eta}").expect("valid progress template"));
    let mut on_progress = |done: usize| {
        bar.set_position(done as u64);
        if bar.is_hidden() && (done.is_multiple_of(25) || done == prompts.len()) {
            println!("teacher replies {done}/{}", prompts.len());
        }
        ControlFlow::Continue(())
    };
    let conversations = teacher_replies(teacher_path, None, prompts, &params, &mut on_progress);
    bar.finish_and_clear();
    let conversations = conversations?.expect("the progress callback never stops the teacher");

    let path = output.join(TEACHER_REPLIES_FILE);
    write_conversations(&path, &conversations)?;
    println!("Wrote the teacher's replies to {}", path.display());
    Ok(conversations)
}
