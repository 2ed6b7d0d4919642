//! A Redis URL from the command line: checked when the flag is parsed, and shown in messages
//! without its password. Shared by `vtox-sink --redis` and the coordinator's `--redis`.

/// A clap value parser: the URL as given, when the redis crate can open it.
pub fn parse(s: &str) -> Result<String, String> {
    redis::Client::open(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("not a Redis URL ({e}); expected e.g. redis://127.0.0.1:6379"))
}

/// The URL with any password hidden, for messages and logs.
pub fn shown(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            shown("redis://user:secret@10.0.0.1:6379/0"),
            "redis://***@10.0.0.1:6379/0"
        );
        assert_eq!(shown("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    #[test]
    fn urls_are_checked() {
        assert!(parse("redis://127.0.0.1:6379").is_ok());
        assert!(parse("http://x").unwrap_err().contains("not a Redis URL"));
    }
}
