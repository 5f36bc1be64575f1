//! Writing to the terminal: what every command prints through.

/// Prints text to stdout; a reader that went away (`| head`) is not an error.
pub(crate) fn print_all(text: &str) {
    use std::io::Write as _;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}
