use std::path::PathBuf;

/// Why a configuration could not be loaded. Every variant names the file, key or variable at fault and never
/// carries a secret's value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// toml's message already carries line, column and the offending key.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: environment variable {var} is not set")]
    MissingEnv { key: String, var: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid { key: key.into(), message: message.into() }
    }
}
