//! The engine's errors: every way a datastore or a request can be refused.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error while reading or writing a file.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The file does not start with the shard magic: it is not a datastore shard.
    #[error("{path}: not a datastore shard (bad magic bytes)")]
    BadMagic { path: PathBuf },
    /// The file was written by a format version this build cannot read.
    #[error("{path}: unsupported format version {found} (this build reads version {supported})")]
    UnsupportedVersion { path: PathBuf, found: u32, supported: u32 },
    /// The file is shorter (or longer) than its header says.
    #[error("{path}: truncated or padded file: header says {expected} bytes, file has {actual}")]
    Truncated { path: PathBuf, expected: u64, actual: u64 },
    /// A stored checksum does not match the bytes it covers.
    #[error("{path}: checksum mismatch in {section}: the file is corrupt")]
    ChecksumMismatch { path: PathBuf, section: &'static str },
    /// A header or manifest field has an impossible value.
    #[error("{path}: corrupt datastore: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// A search request with a bad field (empty context, id out of range, bad span...).
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    /// Bad input to the builder (id out of range, no documents, document too long...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A shard name that the datastore does not have.
    #[error("unknown shard {0:?}")]
    UnknownShard(String),
    /// The shard exists but is out of service: its file changed under the mapping, or it failed
    /// a check. It serves again once the datastore is reopened (or reloaded) from whole files.
    #[error("shard {shard:?} is out of service: {reason}")]
    ShardUnavailable { shard: String, reason: String },
    /// Every shard the search could use is out of service.
    #[error("no shard is in service ({0}); reopen the datastore once its files are whole")]
    NoShardInService(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Corrupt { path: path.into(), reason: reason.into() }
    }
}
