//! Where fleetctl writes: data to stdout, diagnostics to stderr, one message per line.
//!
//! Write errors are ignored on purpose: `fleetctl list-units | head -1` must not panic when the
//! reader goes away.

use std::io::Write;

fn with_newline(msg: &str) -> std::borrow::Cow<'_, str> {
    if msg.ends_with('\n') {
        msg.into()
    } else {
        format!("{msg}\n").into()
    }
}

/// Prints one line of data (a newline is added unless present).
pub fn out(msg: impl AsRef<str>) {
    out_raw(&with_newline(msg.as_ref()));
}

/// Prints text exactly as given.
pub fn out_raw(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

/// Prints one diagnostic line (a newline is added unless present).
pub fn err(msg: impl AsRef<str>) {
    let mut stderr = std::io::stderr().lock();
    let _ = stderr.write_all(with_newline(msg.as_ref()).as_bytes());
    let _ = stderr.flush();
}

/// Go's `%v` of a string slice: `[a b c]`, as fleet printed unit lists.
pub fn go_list<S: AsRef<str>>(items: &[S]) -> String {
    let joined: Vec<&str> = items.iter().map(|s| s.as_ref()).collect();
    format!("[{}]", joined.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_list_formats_like_go() {
        assert_eq!(go_list::<&str>(&[]), "[]");
        assert_eq!(go_list(&["a.service"]), "[a.service]");
        assert_eq!(
            go_list(&["a.service", "b.service"]),
            "[a.service b.service]"
        );
    }
}
