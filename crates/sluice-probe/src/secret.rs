//! Passwords: read from a file once, kept out of `Debug` output, logs and failure messages.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::ProbeSetupError;

/// The largest password file read; a bigger one is a mistake (or `/dev/zero`).
pub const PASSWORD_FILE_MAX: u64 = 4096;

/// Bytes that must not be shown: `Debug` prints `Secret(..)`.
pub(crate) struct Secret(Vec<u8>);

impl Secret {
    pub(crate) fn new(bytes: Vec<u8>) -> Secret {
        Secret(bytes)
    }

    /// The secret itself, for the wire only.
    pub(crate) fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Reads the password in `path`: at most [`PASSWORD_FILE_MAX`] bytes, trailing CR and LF
/// removed, not empty. Errors name the file, never its content.
pub(crate) fn read_password_file(path: &Path) -> Result<Secret, ProbeSetupError> {
    let fail = |problem: String| ProbeSetupError::PasswordFile {
        path: path.to_owned(),
        problem,
    };
    let file = File::open(path).map_err(|error| fail(error.to_string()))?;
    let mut bytes = Vec::new();
    file.take(PASSWORD_FILE_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| fail(error.to_string()))?;
    if bytes.len() as u64 > PASSWORD_FILE_MAX {
        return Err(fail(format!("larger than {PASSWORD_FILE_MAX} bytes")));
    }
    while let Some(b'\n' | b'\r') = bytes.last() {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(fail("empty".to_owned()));
    }
    Ok(Secret(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str, content: &[u8]) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("sluice-probe-secret-{}-{name}", std::process::id()));
        std::fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn trailing_newlines_are_trimmed() {
        let path = temp_file("crlf", b"pa ss\r\n");
        assert_eq!(read_password_file(&path).unwrap().expose(), b"pa ss");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn errors_name_the_file_not_the_content() {
        let path = temp_file("blank", b"\n");
        let error = read_password_file(&path).unwrap_err().to_string();
        assert!(
            error.contains("blank") && error.ends_with("empty"),
            "{error}"
        );
        std::fs::remove_file(path).unwrap();

        let missing = std::env::temp_dir().join("sluice-probe-secret-does-not-exist");
        let error = read_password_file(&missing).unwrap_err().to_string();
        assert!(error.contains("does-not-exist"), "{error}");

        let error = read_password_file(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("larger than"), "{error}");
    }

    #[test]
    fn debug_hides_the_bytes() {
        assert_eq!(format!("{:?}", Secret::new(b"x".to_vec())), "Secret(..)");
    }
}
