//! Bucket and object name rules, as the service applies them: shared by the
//! emulator (which refuses what the service refuses) and the client side
//! (which checks `gs://` URLs and mount arguments before any call).

/// Checks a bucket name the way GCS does (3–63 characters, or up to 222 with dots,
/// of `a-z 0-9 - _ .`, starting and ending with a letter or digit).
pub fn valid_bucket_name(name: &str) -> bool {
    let max = if name.contains('.') { 222 } else { 63 };
    let bytes = name.as_bytes();
    (3..=max).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(b))
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
}

/// Object names the service accepts: 1–1024 bytes, not `.` or `..`, no
/// carriage return or line feed.
pub fn valid_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 1024
        && name != "."
        && name != ".."
        && !name.contains(['\r', '\n'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names() {
        assert!(valid_bucket_name("my-bucket_1"));
        assert!(valid_bucket_name("a.b.c"));
        assert!(!valid_bucket_name("ab"));
        assert!(!valid_bucket_name("-abc"));
        assert!(!valid_bucket_name("ABC"));
        assert!(!valid_bucket_name(".appendable"));
        assert!(!valid_bucket_name(&"a".repeat(64)));
    }

    #[test]
    fn object_names() {
        assert!(valid_object_name("a/b/c.jpg"));
        assert!(valid_object_name("dir/"));
        for bad in ["", ".", "..", "a\nb", "a\rb"] {
            assert!(!valid_object_name(bad), "{bad:?}");
        }
        assert!(!valid_object_name(&"x".repeat(1025)));
    }
}
