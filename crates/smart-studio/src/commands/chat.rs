//! `smart-studio chat`: a conversation with a model in the terminal. Each line read from
//! standard input is a user turn, and the reply is printed as it is generated.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use studio_core::dataset::{Message, Role};
use studio_train::generate::{ChatModel, SamplingParams};
use studio_train::loader::load_model;

use crate::cli::ChatArgs;
use crate::commands::train::resolve_model;
use crate::config::Config;

pub async fn run(config: &Config, args: &ChatArgs) -> anyhow::Result<()> {
    let models_dir = config.models_dir.clone();
    let args = args.clone();
    tokio::task::spawn_blocking(move || chat(models_dir, &args))
        .await
        .context("the chat task panicked")?
}

fn chat(models_dir: PathBuf, args: &ChatArgs) -> anyhow::Result<()> {
    let device = Device::Cpu;
    let model_path = resolve_model(&models_dir, &args.model)?;
    let loaded = load_model(&model_path, &device)?;
    let model = ChatModel::from_loaded(&loaded, args.adapter.as_deref(), &device)?;
    drop(loaded);
    let params = SamplingParams {
        max_new_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: 0,
        seed: args.seed,
    };
    params.validate()?;

    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "Chatting with {}. Type a message and press Enter; Ctrl-D ends the chat.",
            args.model
        );
    }
    let stdin = std::io::stdin();
    converse(
        &model,
        &params,
        args.system.as_deref(),
        stdin.lock(),
        &mut std::io::stdout(),
        interactive,
    )
}

/// Runs the conversation: one user turn per non-empty input line, each reply followed by a
/// blank line. The whole conversation so far is the prompt of each reply.
fn converse(
    model: &ChatModel,
    params: &SamplingParams,
    system: Option<&str>,
    input: impl BufRead,
    output: &mut dyn Write,
    interactive: bool,
) -> anyhow::Result<()> {
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(message(Role::System, system));
    }
    let prompt = || {
        if interactive {
            eprint!("> ");
        }
    };
    prompt();
    for line in input.lines() {
        let line = line.context("cannot read standard input")?;
        let line = line.trim();
        if line.is_empty() {
            prompt();
            continue;
        }
        messages.push(message(Role::User, line));
        let mut write_error = None;
        let reply = model.reply(&messages, params, &[], &mut |piece| {
            if write_error.is_none() {
                if let Err(err) = output
                    .write_all(piece.as_bytes())
                    .and_then(|()| output.flush())
                {
                    write_error = Some(err);
                }
            }
        })?;
        if let Some(err) = write_error {
            return Err(err).context("cannot write the reply to standard output");
        }
        writeln!(output, "\n")?;
        output.flush()?;
        messages.push(message(Role::Assistant, &reply.text));
        prompt();
    }
    Ok(())
}

fn message(role: Role, content: &str) -> Message {
    Message {
        role,
        content: content.to_owned(),
        weight: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_prints_one_reply_per_user_line() {
        let dir = tempfile::tempdir().unwrap();
        studio_train::tiny::write_tiny_model_folder(dir.path(), "llama", 4).unwrap();
        let model = ChatModel::load(dir.path(), None, &Device::Cpu).unwrap();
        let params = SamplingParams {
            max_new_tokens: 5,
            ..SamplingParams::default()
        };
        let mut output = Vec::new();

        converse(
            &model,
            &params,
            Some("Be brief."),
            "hello\n\nhow are you\n".as_bytes(),
            &mut output,
            false,
        )
        .unwrap();

        let first = model
            .reply(
                &[
                    message(Role::System, "Be brief."),
                    message(Role::User, "hello"),
                ],
                &params,
                &[],
                &mut |_| {},
            )
            .unwrap();
        let second = model
            .reply(
                &[
                    message(Role::System, "Be brief."),
                    message(Role::User, "hello"),
                    message(Role::Assistant, &first.text),
                    message(Role::User, "how are you"),
                ],
                &params,
                &[],
                &mut |_| {},
            )
            .unwrap();
        let printed = String::from_utf8(output).unwrap();
        assert_eq!(printed, format!("{}\n\n{}\n\n", first.text, second.text));
    }
}
