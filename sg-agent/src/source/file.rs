//! The state source of a single host: a local file, in either format, watched by the
//! agent (`agent::watch`).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use super::{read_file, Source, StateError};

/// A state file on this host.
#[derive(Clone, Debug)]
pub struct FileSource {
    path: PathBuf,
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> FileSource {
        FileSource { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Source for FileSource {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn read(&mut self) -> Result<Vec<u8>, StateError> {
        read_file(&self.path)
    }
}
