//! Raw results as JSON Lines: one object per line, each with a `type` field.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde_json::Value;

use crate::util::Result;

/// Appends results to one JSON Lines file.
pub struct Recorder {
    out: BufWriter<File>,
}

impl Recorder {
    /// Creates (truncating) `path`.
    pub fn create(path: &Path) -> Result<Recorder> {
        let file =
            File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(Recorder {
            out: BufWriter::new(file),
        })
    }

    /// Writes one record; `value` must be an object, and gets `"type": kind` first.
    pub fn write(&mut self, kind: &str, value: Value) -> Result<()> {
        let mut obj = serde_json::Map::new();
        obj.insert("type".into(), Value::from(kind));
        if let Value::Object(fields) = value {
            obj.extend(fields);
        }
        serde_json::to_writer(&mut self.out, &Value::Object(obj))?;
        self.out.write_all(b"\n")?;
        self.out.flush()?;
        Ok(())
    }
}
