//! The error of a state source: every problem, with the file, object and field.

#![forbid(unsafe_code)]

use std::{fmt, path::PathBuf};

use crate::model::Problem;

/// Every problem of a state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match p.line {
                Some(line) => write!(
                    f,
                    "{}:{line}: {}: {}: {}",
                    self.file.display(),
                    p.object,
                    p.field,
                    p.message
                )?,
                None => write!(
                    f,
                    "{}: {}: {}: {}",
                    self.file.display(),
                    p.object,
                    p.field,
                    p.message
                )?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for StateError {}
