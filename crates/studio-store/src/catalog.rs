//! The base models a deployment offers: the entries of the models folder.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

/// The storage layout of a base model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    /// A single `NAME.gguf` file.
    Gguf,
    /// A Hugging Face folder `NAME/` with `config.json`.
    HuggingFace,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BaseModel {
    pub name: String,
    pub path: PathBuf,
    pub format: ModelFormat,
    /// The file's modification time, shown as the model's `created`.
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{}", not_found_message(.name, .available))]
    NotFound {
        name: String,
        available: Vec<String>,
    },
    #[error("cannot read the models folder {}", .dir.display())]
    Unreadable {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn not_found_message(name: &str, available: &[String]) -> String {
    // A megabyte name is not sent back whole in the error.
    const MAX_CHARS: usize = 80;
    let length = name.chars().count();
    let name = if length <= MAX_CHARS {
        name.to_owned()
    } else {
        let start: String = name.chars().take(MAX_CHARS).collect();
        format!("{start}… ({length} characters)")
    };
    if available.is_empty() {
        format!("model '{name}' not found: no base models are installed; add NAME.gguf or a Hugging Face folder NAME/ to the models folder (--models-dir), or run fetch-model")
    } else {
        format!(
            "model '{name}' not found; available base models: {}",
            available.join(", ")
        )
    }
}

/// Lists the models folder on every call, so a model copied in is usable without a restart.
#[derive(Clone, Debug)]
pub struct ModelCatalog {
    dir: PathBuf,
}

impl ModelCatalog {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Lists the base models, sorted by name. A missing folder is an empty catalog.
    pub fn list(&self) -> Result<Vec<BaseModel>, CatalogError> {
        let unreadable = |source| CatalogError::Unreadable {
            dir: self.dir.clone(),
            source,
        };
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(unreadable(err)),
        };
        let mut models = Vec::new();
        for entry in entries {
            let path = entry.map_err(unreadable)?.path();
            if let Some(model) = base_model(&path) {
                models.push(model);
            }
        }
        models.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(models)
    }

    /// Finds the base model `name`, or an error that lists what exists.
    pub fn resolve(&self, name: &str) -> Result<BaseModel, CatalogError> {
        let models = self.list()?;
        match models.iter().find(|model| model.name == name) {
            Some(model) => Ok(model.clone()),
            None => Err(CatalogError::NotFound {
                name: name.to_owned(),
                available: models.into_iter().map(|model| model.name).collect(),
            }),
        }
    }
}

fn base_model(path: &Path) -> Option<BaseModel> {
    let file_name = path.file_name()?.to_str()?;
    if file_name.starts_with('.') {
        return None;
    }
    let (name, format, stamp_path) = if path.is_dir() {
        let config = path.join("config.json");
        if !config.is_file() {
            return None;
        }
        (file_name.to_owned(), ModelFormat::HuggingFace, config)
    } else {
        let name = file_name.strip_suffix(".gguf")?;
        (name.to_owned(), ModelFormat::Gguf, path.to_path_buf())
    };
    let created_at = std::fs::metadata(&stamp_path)
        .and_then(|m| m.modified())
        .map(DateTime::<Utc>::from)
        .ok()?;
    Some(BaseModel {
        name,
        path: path.to_path_buf(),
        format,
        created_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_gguf_files_and_hf_folders() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tiny.gguf"), b"GGUF").unwrap();
        std::fs::create_dir(dir.path().join("llama")).unwrap();
        std::fs::write(dir.path().join("llama/config.json"), b"{}").unwrap();
        std::fs::create_dir(dir.path().join("empty-folder")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"").unwrap();

        let models = ModelCatalog::new(dir.path()).list().unwrap();
        let names: Vec<_> = models.iter().map(|m| (m.name.as_str(), m.format)).collect();
        assert_eq!(
            names,
            [
                ("llama", ModelFormat::HuggingFace),
                ("tiny", ModelFormat::Gguf)
            ]
        );
    }

    #[test]
    fn resolve_unknown_lists_available() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tiny.gguf"), b"GGUF").unwrap();
        let err = ModelCatalog::new(dir.path()).resolve("huge").unwrap_err();
        assert_eq!(
            err.to_string(),
            "model 'huge' not found; available base models: tiny"
        );
    }

    #[test]
    fn resolve_finds_gguf_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tiny.gguf"), b"GGUF").unwrap();
        let model = ModelCatalog::new(dir.path()).resolve("tiny").unwrap();
        assert_eq!(model.path, dir.path().join("tiny.gguf"));
    }

    #[test]
    fn missing_folder_is_empty_catalog() {
        let models = ModelCatalog::new("/nonexistent-models-folder")
            .list()
            .unwrap();
        assert!(models.is_empty());
    }
}
